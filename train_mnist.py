"""Train an NCSN on MNIST: the paper's Figs. 3 (loss curve) and 4 (samples, generation process).

    python train_mnist.py                                  # the paper: RefineNet(1, 64), 200k steps of batch 128
    python train_mnist.py --iters 2000 --out runs/mnist_smoke
    python train_mnist.py --resume                         # continue runs/mnist/checkpoint.pt
    torchrun --nproc_per_node 2 train_mnist.py             # 2 GPUs; --batch-size stays the global batch

The data set is torchvision's MNIST under --data-root. Every other setting is the paper's,
shared with train_cifar.py (common.TRAIN_DEFAULTS; `--help` lists them); the loop is common.train.
"""
import common

OUT = "runs/mnist"    # output folder: config.json, metrics.csv, checkpoints, figures
NGF = 64              # RefineNet(1, 64): 7,638,657 parameters


def main(argv=None):
    return common.train_main(argv, dataset="mnist", out=OUT, ngf=NGF)


if __name__ == "__main__":
    main()
