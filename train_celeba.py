"""Train an NCSN on CelebA, the paper's third data set (its CelebA samples figure).

    python train_celeba.py                                 # RefineNet(3, 128), 200k steps of batch 128
    python train_celeba.py --resume                        # continue runs/celeba/checkpoint.pt
    torchrun --nproc_per_node 2 train_celeba.py

torchvision's CelebA under --data-root, with the official preprocessing: centre crop 140,
resize to 32, random horizontal flips. Offline (torchvision's download often fails on Google
Drive's quota), put the files in torchvision's layout: <data-root>/celeba/img_align_celeba/
(unzipped img_align_celeba.zip) and the five list_*.txt / identity_CelebA.txt files. The first
run decodes the 162,770 training JPEGs once and caches them beside the files. Every other
setting is train.TrainConfig's, as CIFAR-10's.
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import train


def main(argv=None):
    return train.main(argv, dataset="celeba")


if __name__ == "__main__":
    main()
