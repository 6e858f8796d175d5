"""The table of Fig. 6: Inception score and FID of samples (CIFAR-10), and the same table for any
checkpoints, samplers and metrics: sample.py makes the samples, metrics.py scores them.

    python evaluate.py --checkpoint runs/cifar10/checkpoint.pt --n 5000
    python evaluate.py --checkpoint run/logs/cifar10/checkpoint.pth                 # an official checkpoint
    python evaluate.py --checkpoint 'runs/cifar10/checkpoint_*.pt' --step-lr 2e-5 1e-5 --n 1000   # appendix B.2
    python evaluate.py ... --inception-weights weights-inception-2015-12-05-6726825d.pth --ref ref.npz   # offline
    python evaluate.py --checkpoint runs/mnist/checkpoint.pt --metrics none --n 64 --png      # samples only
    python evaluate.py --checkpoint A.pt B.pt --metrics classifier --nfe 100 300 1000   # MNIST: quality against cost
    python evaluate.py --checkpoint runs/cifar10/checkpoint.pt --n 100 --nearest 5            # memorisation check
    python evaluate.py --checkpoint runs/ncsnv2/checkpoint.pt --sampler als heun --nfe 35 100   # two samplers

flags -> plan (checkpoints x sampler settings) -> scorers (reference statistics before any sampling) -> per
setting: samples (sample.make) and scores (metrics.SCORERS) into metrics.json, which keeps an earlier run's
scores of the same samples -> the table -> sweep.png (each metric against network evaluations).
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import os
import time

import data
import figures
import metrics
import sample
import samplers
import train_io
import utils

#----------------------------------------------------------------------------
# Defaults: sample.py's (N, BATCH_SIZE, SEED, OUT); the paper's rows of the table.

PAPER = ("paper (NCSN, CIFAR-10)", 8.87, 0.12, 25.32)
SEED_REPORT = ("seed report", 4.17, 0.13, 110.85)


def existing_only(jobs, n):
    """The jobs whose first n samples are all in shards of their fingerprint; a line for each other."""
    kept = []
    for j in jobs:
        have = sum(min(b, n) - a for a, b in sample.shards(j.folder, j.fp) if a < n)
        if have >= n:
            kept.append(j)
        else:
            print(f"skipped: {j.folder}: {have} of {n} samples made (--existing samples nothing)")
    if not kept:
        raise data.DataError(f"--existing: none of the {len(jobs)} settings has its {n} samples yet; run without it")
    return kept


def level_losses(jobs, args, device):
    """{checkpoint path: metrics.level_losses} on --level-loss test images, the images read once per data set."""
    held_out = {d: data.load_images(d, False, args.data_root)[:args.level_loss]
                for d in dict.fromkeys(j.ck.dataset for j in jobs)}
    return {ck.path: metrics.level_losses(ck, held_out[ck.dataset], args.batch_size, device, args.level_sigmas)
            for ck in {j.ck.path: j.ck for j in jobs}.values()}


def evaluate_one(args, job, scorers, device, losses):
    """Sample (what is missing) and score one job; metrics.json keeps earlier scores of the same samples."""
    t0 = time.time()
    result = sample.make(job, args, device)
    if args.nearest:
        inc = metrics.inception(args.inception_weights, device) if "inception" in args.metrics else None
        samples = sample.collect(job.folder, min(10, args.n), job.fp)
        train_images = data.load_images(job.ck.dataset, True, args.data_root, folder_flag="--ref")
        metrics.save_nearest(os.path.join(job.folder, "nearest.png"), samples, train_images, args.nearest, inc, device)
    if job.ck.path in losses:
        result["test_dsm_loss_per_" + ("sigma" if args.level_sigmas else "level")] = losses[job.ck.path]
    for name in args.metrics:
        result.update(scorers[name, job.ck.dataset](sample.read_shards(job.folder, args.n, job.fp)))
    result["seconds"] = round(time.time() - t0, 1)
    path = os.path.join(job.folder, "metrics.json")
    old = (os.path.exists(path) and utils.whole_or_none(utils.read_json, path)) or {}
    if old.get("fingerprint") == job.fp and old.get("n") == args.n:    # the same samples: keep their earlier scores
        result = {**{k: v for k, v in old.items() if k not in result}, **result}
    utils.save_json(result, path)
    return result


def print_table(results):
    columns = [c for s in metrics.SCORERS.values() for c in s.columns if any(c[1](r) != "-" for r in results)]
    label = lambda r: r["checkpoint"][-38:] + (" (EMA)" if r["sampler"]["ema"] else "")
    print(f"\n{'':2}{'checkpoint / source':<46} {'sampler':>9} {'step_lr':>8} {'T':>4} {'NFE':>5} {'n':>6} "
          + " ".join(f"{h:>16}" for h, _ in columns))
    if any(r.get("fid") is not None and r["dataset"] == "cifar10" for r in results):
        for name, m, s, f in [PAPER, SEED_REPORT]:
            cells = {"Inception score": f"{m:.2f} +- {s:.2f}", "FID": f"{f:.2f}"}
            print(f"{'':2}{name:<46} {'-':>9} {'-':>8} {'-':>4} {'-':>5} {'-':>6} "
                  + " ".join(f"{cells.get(h, '-'):>16}" for h, _ in columns))
    scored = [r for r in results if r.get("fid") is not None]
    best = min(scored, key=lambda r: r["fid"]) if len(scored) > 1 else None
    for r in results:
        s = r["sampler"]
        step_lr, T = (format(s["step_lr"], ".2g"), s["steps_each"]) if "step_lr" in s else ("-", "-")
        print(f"{'*' if r is best else ' ':<2}{label(r):<46} {s.get('name', 'als'):>9} {step_lr:>8} {T:>4} "
              f"{r['nfe']:>5} {r['n']:>6} " + " ".join(f"{cell(r):>16}" for _, cell in columns))
    if best:
        print("* lowest FID")
    for ref in sorted({r["fid_reference"] for r in results if r["dataset"] == "mnist" and r.get("fid") is not None}):
        print(f"MNIST: the paper reports no Inception score or FID; FID here is against the {ref}")


def run_name(path, ema):
    """A checkpoint's run, for a legend: the name of its folder, and whether its EMA weights were used."""
    return os.path.basename(os.path.dirname(os.path.abspath(path))) + (" (EMA)" if ema else "")


def network_label(ck, weights=True):
    """A checkpoint for a legend: its recipe, network and width, training steps, and (weights) whether its EMA."""
    args = ck.model.net.model_args
    net = {"ncsnpp": "NCSN++"}.get(args.get("arch"), "RefineNet")
    steps = f", {ck.step:,} steps" if ck.step else ""
    return f"{ck.recipe} recipe, {net} ngf {args['ngf']}{steps}" + (" (EMA)" if ck.ema and weights else "")


def legend_labels(cks, weights=True):
    """{path: network_label} of {path: checkpoint}, with the run's folder added where two labels would be the same."""
    labels = {p: network_label(ck, weights) for p, ck in cks.items()}
    twice = {v for v in labels.values() if list(labels.values()).count(v) > 1}
    return {p: v + f" [{run_name(p, False)}]" if v in twice else v for p, v in labels.items()}


def save_level_loss_figure(path, jobs, losses):
    """--level-loss: each checkpoint's test DSM loss against sigma (log-log), a line per checkpoint."""
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    cks = {j.ck.path: j.ck for j in jobs if j.ck.path in losses}
    labels = legend_labels(cks)
    for ck in cks.values():
        sig = [float(ck.sigmas[k - 1]) if isinstance(k, int) else k for k in losses[ck.path]]     # level -> sigma
        ax.plot(sig, list(losses[ck.path].values()), "o-", ms=3, label=labels[ck.path])
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("noise level sigma")
    ax.set_ylabel("test DSM loss (eq. 5, lambda = sigma^2)"), ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=8)
    figures.save_figure(fig, path)


def training_curve(path, step=None):
    """The run beside checkpoint `path`: (wall-clock minutes, training loss) per step up to the checkpoint's, from
    its metrics.csv (each row's rate is images/s over its LOG_EVERY steps) and config.json; None without them."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        batch = utils.read_json(os.path.join(folder, "config.json"))["batch_size"]
        rows = train_io.read_metrics(os.path.join(folder, "metrics.csv"), step or float("inf"))
    except (OSError, utils.Damaged, KeyError):
        return None
    minutes, t = [], 0.0
    for r in rows:
        t += batch / max(float(r["images_per_s"]), 1e-9) / 60
        minutes.append(t)
    return (minutes, [r["loss"] for r in rows]) if rows else None


def save_training_loss_figure(path, jobs):
    """--level-loss: each checkpoint's training loss (mean of 50 steps) against its run's wall-clock, a line per run;
    the fit per second of compute, which per-step curves hide when the networks' step times differ."""
    import numpy as np
    cks = {j.ck.path: j.ck for j in jobs}
    labels = legend_labels(cks, weights=False)             # the loss of the trained weights, not their EMA
    curves = {p: c for p, ck in cks.items() if (c := training_curve(p, ck.step)) is not None}
    if not curves:
        return
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for p, curve in curves.items():
        minutes, loss = (np.array(c) for c in curve)
        w = max(1, min(50, len(loss)))
        ax.plot(minutes[w - 1:], np.convolve(loss, np.ones(w) / w, mode="valid"), label=labels[p])
    ax.set_yscale("log"), ax.set_xlabel("wall-clock minutes of training")
    ax.set_ylabel("training loss (moving mean of 50 steps)")
    ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=8)
    figures.save_figure(fig, path)


def save_sweep_figure(path, results):
    """Each metric against network evaluations per sample, a line per checkpoint (EMA choice) and sampler."""
    keys = [k for s in metrics.SCORERS.values() for k in s.sweep if any(r.get(k) is not None for r in results)]
    if not keys:
        return
    plt = figures.pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys) + 3, 4.2), squeeze=False)
    groups = {}
    for r in results:
        s = r["sampler"]
        groups.setdefault((r["checkpoint"], s["ema"], s.get("name", "als"), s.get("s_churn", 0)), []).append(r)
    markers = dict(zip(samplers.SAMPLERS, "os^Dv<>p"))
    colours = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")     # a colour per line
    for ax, k in zip(axes[0], keys):
        for c, ((ckpt, ema, name, churn), rs) in enumerate(groups.items()):
            rs = sorted(rs, key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in rs], [r.get(k) for r in rs], markers.get(name, "o") + ("--" if churn else "-"),
                    color=colours(c % colours.N),
                    label=f"{run_name(ckpt, ema)}, {name}" + (f" S_churn {churn:g}" if churn else ""))
        ax.set_xscale("log"), ax.set_xlabel("network evaluations per sample"), ax.set_title(metrics.NAMES[k])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))      # beside the plots, not on them
    figures.save_figure(fig, path)


@utils.command()
def main(argv=None):
    p = utils.arg_parser(__doc__)
    sample.add_flags(p)
    metrics.add_flags(p)
    p.add_argument("--existing", action="store_true",
                   help="score only the settings whose samples are all made, skip the rest with a line (no sampling)")
    p.add_argument("--level-loss", type=utils.positive_int, metavar="N",
                   help="also the test DSM loss of about 20 levels on N held-out images: the fit apart from a sampler")
    p.add_argument("--level-sigmas", type=utils.positive_float, nargs="+", metavar="SIGMA",
                   help="--level-loss at these sigmas, to compare ladders (a norm-conditioned network: those it knows)")
    p.add_argument("--nearest", type=utils.positive_int,
                   help="nearest.png: the K nearest training images of 10 samples (pixels; Inception features too)")
    args = p.parse_args(argv)
    if args.level_sigmas and not args.level_loss:
        p.error("--level-sigmas sets the levels of --level-loss N: give --level-loss too")
    out = args.out or sample.OUT
    metrics.check_flags(p, args, out)          # a bad --ref stops us before any folder is made
    sample.check_flags(p, args)
    device = utils.get_device(args.device)
    jobs = sample.plan(args, sample.checkpoints_of(p, args.checkpoint))
    if args.existing:
        jobs = existing_only(jobs, args.n)
    scorers = {(name, d): metrics.SCORERS[name].make(args, d, device)     # ready before any sampling
               for name in args.metrics for d in dict.fromkeys(j.ck.dataset for j in jobs)}
    losses = level_losses(jobs, args, device) if args.level_loss else {}
    results = []
    for j in jobs:
        with utils.folder_lock(j.folder):                   # one writer per folder
            results.append(evaluate_one(args, j, scorers, device, losses))
    if losses:
        save_level_loss_figure(os.path.join(out, "level_loss.png"), jobs, losses)
        save_training_loss_figure(os.path.join(out, "training_loss.png"), jobs)
    print_table(results)
    if len(results) > 1:
        save_sweep_figure(os.path.join(out, "sweep.png"), results)
    return results


if __name__ == "__main__":
    main()
