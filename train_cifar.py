"""Train an NCSN on CIFAR-10: the paper's Figs. 3 (loss curve) and 5 (samples, generation process).

    python train_cifar.py                                  # the paper: RefineNet(3, 128), 200k steps of batch 128
    python train_cifar.py --batch-size 100 --epochs 500    # the seed report's run
    python train_cifar.py --resume                         # continue runs/cifar10/checkpoint.pt
    torchrun --nproc_per_node 2 train_cifar.py             # 2 GPUs at the paper's global batch 128

The data set is torchvision's CIFAR10 under --data-root, with random horizontal flips. Every
other setting is the paper's, shared with train_mnist.py (common.TRAIN_DEFAULTS; `--help` lists
them); the loop is common.train.
"""
import common

OUT = "runs/cifar10"  # output folder: config.json, metrics.csv, checkpoints, figures
NGF = 128             # RefineNet(3, 128): 30,117,635 parameters


def main(argv=None):
    return common.train_main(argv, dataset="cifar10", out=OUT, ngf=NGF)


if __name__ == "__main__":
    main()
