"""Train an NCSN on CIFAR-10: the paper's Figs. 3 (loss curve) and 5 (samples, generation process).

    python train_cifar.py                                  # the paper: RefineNet(3, 128), 200k steps of batch 128
    python train_cifar.py --batch-size 100 --epochs 500    # 250,000 steps
    python train_cifar.py --resume                         # continue runs/cifar10/checkpoint.pt
    torchrun --nproc_per_node 2 train_cifar.py             # 2 GPUs at the paper's global batch 128

torchvision's CIFAR10 under --data-root, with random horizontal flips; every other setting is train.py's.
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import functools

import train

main = functools.partial(train.main, dataset="cifar10")

if __name__ == "__main__":
    main()
