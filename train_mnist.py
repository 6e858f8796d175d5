"""Train an NCSN on MNIST: the paper's Figs. 3 (loss curve) and 4 (samples, generation process).

    python train_mnist.py                                  # the paper: RefineNet(1, 64), 200k steps of batch 128
    python train_mnist.py --iters 2000 --out runs/mnist_smoke
    python train_mnist.py --resume                         # continue runs/mnist/checkpoint.pt
    torchrun --nproc_per_node 2 train_mnist.py             # 2 GPUs; --batch-size stays the global batch

torchvision's MNIST under --data-root; every other setting is train.py's (--help lists them).
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import functools

import train

main = functools.partial(train.main, dataset="mnist")

if __name__ == "__main__":
    main()
