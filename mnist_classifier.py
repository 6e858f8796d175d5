"""The MNIST digit classifier that puts numbers on digit samples (metrics.py's `classifier`
scorer): train it once (cached), print its held-out accuracy and the scores' ceiling and floor.

    python mnist_classifier.py --data-root .mnist          # train (or load) it; print the ceiling and floor
    python evaluate.py --checkpoint runs/mnist/checkpoint.pt --metrics classifier --data-root .mnist

The paper reports no numbers for MNIST, and Inception knows nothing of digits. The classifier trains on
MNIST's training split less every metrics.HOLD_OUT-th digit; those held-out digits are the Frechet
distance's reference (all but the first metrics.PROBE) and the ceiling's samples (the others). Its weights
are cached under --cache, named after a digest of the training digits, so other data never reuses them.
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import argparse

import torch

import data
import metrics
import utils


@utils.command()
def main(argv=None):
    p = utils.arg_parser(__doc__)
    p.add_argument("--data-root", default=data.DATA_ROOT, help="torchvision data folder holding MNIST")
    p.add_argument("--cache", default=metrics.CLASSIFIER_CACHE, help="folder of the cached weights")
    p.add_argument("--n", type=utils.positive_int, default=100, help="samples in the ceiling and floor rows")
    p.add_argument("--device", type=utils.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    device = utils.get_device(args.device)
    opts = argparse.Namespace(data_root=args.data_root, classifier_cache=args.cache)
    scorer = metrics.DigitScorer(opts, "mnist", device)
    print(f"held-out accuracy {scorer.accuracy:.4f}; {len(scorer.held_out)} held-out digits kept for the ceiling")
    if not 2 <= args.n <= len(scorer.held_out):
        p.error(f"--n is between 2 and {len(scorer.held_out)}, the held-out digits kept for the ceiling")
    rows = {"real held-out digits (ceiling)": scorer.held_out[:args.n],
            "uniform noise (floor)": torch.randint(0, 256, (args.n, 1, 28, 28), dtype=torch.uint8,
                                                   generator=torch.Generator().manual_seed(metrics.SEED))}
    results = {name: scorer([images]) for name, images in rows.items()}
    for name, m in results.items():
        cells = "  ".join(f"{header} {cell(m)}" for header, cell in metrics.SCORERS["classifier"].columns)
        print(f"{name:<32} {cells}  classes {m['class_histogram']}")
    return results


if __name__ == "__main__":
    main()
