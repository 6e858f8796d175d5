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
    python evaluate.py --checkpoint runs/cifar10/checkpoint.pt --seeds 0-149999:50000   # EDM's: min FID of 3 sets
    torchrun --nproc_per_node 8 evaluate.py --checkpoint runs/cifar10/checkpoint.pt --seeds 0-49999   # 8 GPUs sample

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


def existing_only(jobs, sets):
    """The jobs whose samples of the sets [(lo, hi)] are all in shards of their fingerprint; a line for each other."""
    kept, n = [], sum(hi - lo for lo, hi in sets)
    for j in jobs:
        have = n - sample.missing_runs(j.folder, sets, n, j.fp)[0]
        if have >= n:
            kept.append(j)
        else:
            print(f"skipped: {j.folder}: {have} of {n} samples made (--existing samples nothing)")
    if not kept:
        raise data.DataError(f"--existing: none of the {len(jobs)} settings has its {n} samples yet; run without it")
    return kept


def level_losses(jobs, args, device):
    """({checkpoint path: metrics.level_losses} on --level-loss test images, the images read once per data set;
    how many images were used, at most --level-loss)."""
    held_out = {d: data.load_images(d, False, args.data_root)[:args.level_loss]
                for d in dict.fromkeys(j.ck.dataset for j in jobs)}
    return ({ck.path: metrics.level_losses(ck, held_out[ck.dataset], args.batch_size, device, args.level_sigmas)
             for ck in {j.ck.path: j.ck for j in jobs}.values()}, min(len(x) for x in held_out.values()))


def evaluate_one(args, job, scorers, device, losses, rank=0, world=1):
    """Sample (what is missing: every process its share) and score one job (rank 0); returns its metrics.json, which
    keeps earlier scores of the same samples, on rank 0 (None on the others)."""
    t0 = time.time()
    return sample.make(job, args, device, rank, world, then=lambda result: score(args, job, scorers, device, losses,
                                                                                 result, t0))


def score(args, job, scorers, device, losses, result, t0):
    """A job's nearest.png, per-level test loss and scores (each --seeds set apart) into metrics.json."""
    if args.nearest:
        inc = metrics.inception(args.inception_weights, device) if "inception" in args.metrics else None
        lo, hi = args.sets[0]
        samples = sample.collect(job.folder, min(hi, lo + 10), job.fp, lo)
        train_images = data.load_images(job.ck.dataset, True, args.data_root, folder_flag="--ref")
        metrics.save_nearest(os.path.join(job.folder, "nearest.png"), samples, train_images, args.nearest, inc, device)
    if job.ck.path in losses:
        result["test_dsm_loss_per_" + ("sigma" if args.level_sigmas else "level")] = losses[job.ck.path]
    path = os.path.join(job.folder, "metrics.json")
    old = (os.path.exists(path) and utils.whole_or_none(utils.read_json, path)) or {}
    seeds = lambda r: r.get("seeds", f"0-{r.get('n', 0) - 1}")       # a record of before --seeds: images 0 to n - 1
    same = old.get("fingerprint") == job.fp and seeds(old) == result["seeds"]
    earlier = {seeds(s): s for s in old.get("sets", [old])} \
        if old.get("fingerprint") == job.fp else {}             # each set's scores of the same samples are kept
    sets, meta = [], {*result, "sets", "set_min", "set_max", "seconds"}
    for lo, hi in args.sets:
        kept = {k: v for k, v in earlier.get(f"{lo}-{hi - 1}", {}).items() if k not in meta}     # its scores alone
        scores = dict(kept, seeds=f"{lo}-{hi - 1}", n=hi - lo)
        for name in args.metrics:
            scores.update(scorers[name, job.ck.dataset](sample.read_shards(job.folder, hi, job.fp, lo)))
        sets.append(scores)
    result = {**(old if same else {}), **(across_sets(sets) if len(sets) > 1 else sets[0]), **result}
    result.update(seeds=sample.seeds_text(args.sets), n=args.n, seconds=round(time.time() - t0, 1))
    utils.save_json(result, path)
    return result


def across_sets(sets):
    """Several sets' scores as one record (EDM's protocol: each set's scores, their mean and minimum): each number's
    mean over the sets, its minimum and maximum under set_min and set_max (a spread's not: 'std'), class histograms
    summed, None for a score some sets lack, each set's note once, the rest the first set's; the sets themselves
    under `sets`."""
    out, low, high = {}, {}, {}
    for k in dict.fromkeys(k for s in sets for k in s):
        if k in ("seeds", "n"):
            continue
        v, values = sets[0].get(k), [s.get(k) for s in sets]
        numbers = [isinstance(x, (int, float)) and not isinstance(x, bool) for x in values]
        if all(numbers):
            out[k] = sum(values) / len(values)
            if not k.endswith("_std"):
                low[k], high[k] = min(values), max(values)
        elif any(numbers) and None in values:           # a score some sets lack (too few images): none for all
            out[k] = None
        elif all(isinstance(x, list) for x in values):
            out[k] = [sum(c) for c in zip(*values)]
        elif k == "note":                               # each set's own, once
            out[k] = "; ".join(dict.fromkeys(x for x in values if x))
        else:
            out[k] = v
    return dict(out, set_min=low, set_max=high, sets=sets)


def table_rows(r):
    """(label suffix, n cell, record) of a result's rows: itself; of several --seeds sets, each set, then their mean,
    minimum and maximum."""
    if "sets" not in r:
        return [("", r["n"], r)]
    k, sizes = len(r["sets"]), {s["n"] for s in r["sets"]}
    n = f"{k}x{sizes.pop()}" if len(sizes) == 1 else r["n"]
    base = {key: v for key, v in r.items() if key not in r["set_min"] and not key.endswith("_std")}
    return ([(f" seeds {s['seeds']}", s["n"], {**r, **s}) for s in r["sets"]] + [(f" mean of {k}", n, r)]
            + [(f" {what} of {k}", n, {**base, **r[f"set_{what}"]}) for what in ("min", "max")])


def print_table(results):
    """The table: a row per checkpoint and sampler setting (each --seeds set, their mean, min and max), the sample
    count in each, and the paper's rows beside CIFAR-10's."""
    paper = any(r.get("fid") is not None and r["dataset"] == "cifar10" for r in results)     # the paper's rows too
    columns = [c for s in metrics.SCORERS.values() for c in s.columns
               if any(c[1](r) != "-" for r in results) or (paper and c[0] in ("Inception score", "FID"))]
    label = lambda r, end: (r["checkpoint"] + (" (EMA)" if r["sampler"]["ema"] else ""))[-(46 - len(end)):] + end
    sampler = lambda s: s.get("name", "als") + (f" churn {s['s_churn']:g}" if s.get("s_churn") else "")
    print(f"\n{'':2}{'checkpoint / source':<46} {'sampler':>15} {'step_lr':>8} {'T':>4} {'NFE':>5} {'n':>10} "
          + " ".join(f"{h:>16}" for h, _ in columns))
    if paper:
        for name, m, s, f in [PAPER, SEED_REPORT]:
            cells = {"Inception score": f"{m:.2f} +- {s:.2f}", "FID": f"{f:.2f}"}
            print(f"{'':2}{name:<46} {'-':>15} {'-':>8} {'-':>4} {'-':>5} {'-':>10} "
                  + " ".join(f"{cells.get(h, '-'):>16}" for h, _ in columns))
    scored = [r for r in results if r.get("fid") is not None]
    best = min(scored, key=lambda r: r["fid"]) if len(scored) > 1 else None
    for r in results:
        s = r["sampler"]
        step_lr, T = (format(s["step_lr"], ".2g"), s["steps_each"]) if "step_lr" in s else ("-", "-")
        for end, n, row in table_rows(r):
            print(f"{'*' if r is best and row is r else ' ':<2}{label(r, end):<46} {sampler(s):>15} "
                  f"{step_lr:>8} {T:>4} {r['nfe']:>5} {n:>10} " + " ".join(f"{cell(row):>16}" for _, cell in columns))
    if best:
        print("* lowest FID" + (" (the mean over --seeds sets)" if "sets" in best else ""))
    notes = {s["note"] for r in results if r["dataset"] != "mnist" for s in r.get("sets") or [r] if s.get("note")}
    for note in sorted(notes):
        print(f"{note} (the table's '-')")
    for ref in sorted({r["fid_reference"] for r in results if r["dataset"] == "mnist" and r.get("fid") is not None}):
        print(f"MNIST: the paper reports no Inception score or FID; FID here is against the {ref}")


def run_name(path, ema):
    """A checkpoint's run, for a legend: the name of its folder, and whether its EMA weights were used."""
    return os.path.basename(os.path.dirname(os.path.abspath(path))) + (" (EMA)" if ema else "")


def distinct(labels, path=lambda key: key):
    """{key: label} with the run's folder (of path(key)) added where two labels would be the same."""
    twice = {v for v in labels.values() if list(labels.values()).count(v) > 1}
    return {k: v + f" [{run_name(path(k), False)}]" if v in twice else v for k, v in labels.items()}


def legend_labels(cks, weights=True):
    """{path: its label} of {path: checkpoint}, told apart (distinct)."""
    return distinct({p: ck.label(weights) for p, ck in cks.items()})


def save_level_loss_figure(path, jobs, losses, n):
    """--level-loss: each checkpoint's test DSM loss on n held-out images against sigma (log-log), a line per
    checkpoint."""
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    cks = {j.ck.path: j.ck for j in jobs if j.ck.path in losses}
    labels = legend_labels(cks)
    for ck in cks.values():
        sig = [float(ck.sigmas[k - 1]) if isinstance(k, int) else k for k in losses[ck.path]]     # level -> sigma
        ax.plot(sig, list(losses[ck.path].values()), "o-", ms=3, label=labels[ck.path])
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("noise level sigma")
    ax.set_ylabel("test DSM loss (eq. 5, lambda = sigma^2)"), ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=8)
    ax.set_title(f"the fit at each noise level, on {n:,} held-out images")
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


def count_text(r):
    """A result's sample count for a legend: '100 samples', or '3 x 500 samples' for --seeds sets."""
    sizes = {s.get("n") for s in r.get("sets") or [r]}
    if len(r.get("sets") or []) > 1:
        return (f"{len(r['sets'])} x {sizes.pop():,} samples" if len(sizes) == 1 and None not in sizes
                else f"{r['n']:,} samples in {len(r['sets'])} sets")
    return f"{r['n']:,} samples"


def save_sweep_figure(path, results):
    """Each metric against network evaluations per sample (the budget), a line per checkpoint (its recipe, network
    and EMA choice), sampler and S_churn; the sample count in the title, or in each line where they differ."""
    keys = [k for s in metrics.SCORERS.values() for k in s.sweep if any(r.get(k) is not None for r in results)]
    if not keys:
        return
    plt = figures.pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys) + 3, 4.2), squeeze=False)
    groups, networks = {}, {}
    for r in results:
        s = r["sampler"]
        networks[r["checkpoint"], s["ema"]] = r.get("network") or run_name(r["checkpoint"], s["ema"])   # or older
        groups.setdefault((r["checkpoint"], s["ema"], s.get("name", "als"), s.get("s_churn", 0)), []).append(r)
    networks = distinct(networks, path=lambda key: key[0])
    counts = {count_text(r) for r in results}
    markers = dict(zip(samplers.SAMPLERS, "os^Dv<>p"))
    colours = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")     # a colour per line
    for ax, k in zip(axes[0], keys):
        for c, ((ckpt, ema, name, churn), rs) in enumerate(groups.items()):
            rs = sorted(rs, key=lambda r: r["nfe"])
            label = f"{networks[ckpt, ema]}; {name}" + (f" S_churn {churn:g}" if churn else "") + \
                ("" if len(counts) == 1 else f"; {' / '.join(sorted({count_text(r) for r in rs}))}")
            ax.plot([r["nfe"] for r in rs], [r.get(k) for r in rs], markers.get(name, "o") + ("--" if churn else "-"),
                    color=colours(c % colours.N), label=label)
        ax.set_xscale("log"), ax.set_xlabel("network evaluations per sample")
        ax.set_title(metrics.NAMES[k]), ax.grid(alpha=0.3)
    if len(counts) == 1:
        fig.suptitle(f"{counts.pop()} per point")
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
    sample.check_flags(p, args, scored=bool(args.metrics))
    utils.quiet_other_ranks()
    ckpts = sample.checkpoints_of(p, args.checkpoint, prefer="cifar10")     # Fig. 6 is CIFAR-10's
    rank, world, device = utils.dist_init(args.device)          # torchrun: sampling split across processes
    jobs = sample.plan(args, ckpts)
    utils.same_on_every_rank([j.fp for j in jobs], "samples", rank, world, device)
    if args.existing:                           # rank 0 reads the shards (and sets damaged ones aside)
        kept = utils.collective(lambda: [j.folder for j in existing_only(jobs, args.sets)], rank, world, device)
        jobs = [j for j in jobs if j.folder in utils.broadcast(kept, world)]
    def ready():                                # rank 0: reference statistics and losses before any sampling
        return ({(name, d): metrics.SCORERS[name].make(args, d, device)
                 for name in args.metrics for d in dict.fromkeys(j.ck.dataset for j in jobs)},
                level_losses(jobs, args, device) if args.level_loss else ({}, 0))
    scorers, (losses, n_level) = utils.collective(ready, rank, world, device) or ({}, ({}, 0))
    results = [evaluate_one(args, j, scorers, device, losses, rank, world) for j in jobs]
    utils.collective(lambda: report(out, jobs, losses, results, n_level), rank, world, device)
    if world > 1:
        utils.dist_exit(0)                      # every rank waits for rank 0's figures, then leaves the group
    return results


def report(out, jobs, losses, results, n_level):
    """The figures of several results (level_loss.png, training_loss.png, sweep.png) and the table."""
    if losses:
        save_level_loss_figure(os.path.join(out, "level_loss.png"), jobs, losses, n_level)
        save_training_loss_figure(os.path.join(out, "training_loss.png"), jobs)
    print_table(results)
    if len(results) > 1:
        save_sweep_figure(os.path.join(out, "sweep.png"), results)


if __name__ == "__main__":
    main()
