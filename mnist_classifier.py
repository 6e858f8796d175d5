"""The MNIST digit classifier that puts numbers on digit samples (metrics.py's `classifier`
scorer): train it once (cached), print its held-out accuracy and the scores' ceiling and floor.

    python mnist_classifier.py --data-root .mnist          # train (or load) it; print the ceiling and floor
    python mnist_classifier.py --data-root .mnist --counts 100 300 1000 3000   # real digits' spread per count
    python evaluate.py --checkpoint runs/mnist/checkpoint.pt --metrics classifier --data-root .mnist

The paper reports no numbers for MNIST, and Inception knows nothing of digits. The classifier trains on
MNIST's training split less every metrics.HOLD_OUT-th digit; those held-out digits are the Frechet
distance's reference (all but the first metrics.PROBE) and the ceiling's samples (the others). Its weights
are cached under --cache, named after a digest of the training digits, so other data never reuses them.
--counts scores disjoint sets of real test-split digits at each count: the spread a difference between two
checkpoints' scores at that count must exceed to mean anything (docs/evaluation.md).
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import argparse

import torch

import data
import metrics
import utils

SHOWN = ("classifier_is", "confident_share", "frechet_distance", "classifier_kid", "classifier_precision",
         "classifier_recall")


def count_study(scorer, digits, counts, most):
    """{count: [the scores of each set]}: up to `most` disjoint sets of `count` consecutive digits per count."""
    return {c: [scorer([digits[i * c:(i + 1) * c]]) for i in range(min(most, len(digits) // c))] for c in counts}


def print_count_study(study):
    """A row per count: the number of sets, then each score's mean (min-max) over the sets."""
    print(f"{'n':>6} {'sets':>5} " + " ".join(f"{k.replace('classifier_', 'digit '):>22}" for k in SHOWN))
    for c, sets in study.items():
        cells = []
        for k in SHOWN:
            v = [s[k] for s in sets]
            digits = 4 if k == "classifier_kid" else 2
            cells.append(f"{sum(v) / len(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})")
        print(f"{c:>6} {len(sets):>5} " + " ".join(f"{x:>22}" for x in cells))


@utils.command()
def main(argv=None):
    p = utils.arg_parser(__doc__)
    p.add_argument("--data-root", default=data.DATA_ROOT, help="torchvision data folder holding MNIST")
    p.add_argument("--cache", default=metrics.CLASSIFIER_CACHE, help="folder of the cached weights")
    p.add_argument("--n", type=utils.positive_int, default=100, help="samples in the ceiling and floor rows")
    p.add_argument("--device", type=utils.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--counts", type=utils.positive_int, nargs="+", metavar="N",
                   help="also score disjoint sets of N real test-split digits (up to --sets of each N)")
    p.add_argument("--sets", type=utils.positive_int, default=10, help="--counts: the most sets of each count")
    args = p.parse_args(argv)
    if problem := metrics.check_classifier_cache(args.cache, "--cache"):
        p.error(problem)
    if args.counts:                                             # refused before the classifier is trained
        digits = data.load_images("mnist", False, args.data_root)
        if bad := [c for c in args.counts if not 4 <= c <= len(digits)]:    # precision and recall need k + 1 = 4
            p.error(f"--counts {bad[0]}: a set is 4 to {len(digits)} digits (the test split's)")
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
        print(f"{name:<32} n {args.n}  {cells}  classes {m['class_histogram']}")
    if args.counts:
        results["counts"] = count_study(scorer, digits, args.counts, args.sets)
        print("\nreal test-split digits in disjoint sets: mean (min-max) over the sets")
        print_count_study(results["counts"])
    return results


if __name__ == "__main__":
    main()
