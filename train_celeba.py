"""Train an NCSN on CelebA, the paper's third data set (its CelebA samples figure).

    python train_celeba.py                                 # RefineNet(3, 128), 200k steps of batch 128
    python train_celeba.py --resume                        # continue runs/celeba/checkpoint.pt
    torchrun --nproc_per_node 2 train_celeba.py

torchvision's CelebA under --data-root (offline: the layout its error names), centre crop 140, resize to 32,
random flips; the first run caches the decoded JPEGs beside them. Every other setting is train.py's.
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import functools

import train

main = functools.partial(train.main, dataset="celeba")

if __name__ == "__main__":
    main()
