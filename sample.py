"""Samples of a checkpoint with any sampler of the family (samplers.SAMPLERS): resumable shards in a
folder keyed by a fingerprint, a per-level health report and pictures. Needs no Inception weights.

    python sample.py --checkpoint runs/mnist/checkpoint.pt --n 64 --png        # the paper's sampler
    python sample.py --checkpoint runs/ncsnv2/checkpoint.pt --sampler heun dpmpp2m --nfe 20 35
    python sample.py --checkpoint C --sampler heun --s-churn 0 10 --nfe 35    # EDM's stochastic Heun
    python sample.py --checkpoint C --seeds 0-149999:50000                       # EDM's three sets of 50,000
    torchrun --nproc_per_node 8 sample.py --checkpoint C --seeds 0-49999        # 8 GPUs: each makes 1/8

Image i is drawn with its own generator seeded by (--seed, i), so samples do not depend on the
batch size, and --seeds (EDM's seed ranges) names which images i to make. They are written in
shards as they are made, in a folder named after a fingerprint of what makes them (the weights
used, the sampler settings, the seed, the image shape): a rerun makes only the missing ones, and
samples of other weights or settings are never counted. Writes per checkpoint and sampler
setting: samples.json (the fingerprint), shard_<start>_<end>.npz, grid.png (the first set's first
100), process.png (the first 8 at the end of each level), health.json (the per-level health
report), png/<i>.png with --png. Scoring is metrics.py's; both, evaluate.py.
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import argparse
import dataclasses
import glob
import itertools
import json
import math
import os
import re

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import data
import figures
import health
import samplers
import utils

#----------------------------------------------------------------------------
# Defaults.

OUT = "runs/eval"        # root of the outputs: <OUT>/<checkpoint name>/<sampler setting>_<fingerprint>/
N = 50_000               # samples per setting (the usual protocol; model selection can use fewer)
BATCH_SIZE = 100         # images sampled at once
SEED = 0                 # image i uses a generator seeded by (SEED, i)
AUTO = {  # --sampler auto, per kind of model (kind): (largest --nfe, sampler, its settings unless given), the first
    "trained levels only": ((None, "als", {}),),     # that covers the budget; measured on real digits: docs/samplers.md
    "any sigma": ((100, "heun", {"s_churn": 10.0}), (None, "als", {})),
    "a denoiser": ((None, "heun", {}),)}

#----------------------------------------------------------------------------
# Sampler settings: one record per setting; its `record()` is what the fingerprint hashes.

class Inapplicable(utils.UserError):
    """A sampler setting that this checkpoint cannot run; skipped with a line within a grid."""


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    name: str                        # a key of samplers.SAMPLERS
    sigmas: tuple                    # the levels the sampler steps through, descending
    seed: int                        # image i's generator is seeded by (seed, i)
    shape: tuple                     # (C, H, W)
    params: tuple = ()               # the sampler's own settings, (keyword, value) pairs

    @property
    def kwargs(self):
        return dict(self.params)

    @property
    def nfe(self):
        """Network evaluations per sample, as the sampler states them."""
        return samplers.SAMPLERS[self.name].nfe(len(self.sigmas), **self.kwargs)

    def record(self):
        """The plain dict of this setting (samples.json, metrics.json, the fingerprint): values only."""
        return dict(name=self.name, sigmas=list(self.sigmas), seed=self.seed, shape=list(self.shape), **self.kwargs)

    def tag(self):
        """The folder name's start: steplr<e>_T<T>[_denoise] (the paper's), else <name>_L<levels>[_<setting><v>]."""
        kw = self.kwargs
        parts = [] if self.name == "als" else [self.name]
        parts += [f"steplr{kw.pop('step_lr'):.4g}"] if "step_lr" in kw else []
        parts += [f"T{kw.pop('steps_each')}"] if "steps_each" in kw else [f"L{len(self.sigmas)}"]
        parts += ["denoise"] if kw.pop("denoise", False) else []
        return "_".join(parts + [f"{k}{v:g}" for k, v in kw.items()])


def all_settings():
    """{setting: (default, the samplers that take it)} over samplers.SAMPLERS: each is a flag."""
    found = {}
    for name, entry in samplers.SAMPLERS.items():
        for k, default in samplers.settings(entry.run).items():
            found.setdefault(k, (default, []))[1].append(name)
    return found


def recipe_settings(ck, name):
    """The checkpoint's recipe's values of sampler `name`'s settings, less those that take the word
    'auto': the sampler's plan knows whether the recipe's value was the technique's."""
    entry = samplers.SAMPLERS[name]
    own = samplers.settings(entry.run)
    return {k: v for k, v in ck.settings.items() if k in own and k not in entry.auto}


def sampler_settings(name, ck, seed, nfe=None, sigma_max=None, **given):
    """The SamplerSettings of sampler `name` for a checkpoint (checkpoints.Checkpoint) at an --nfe
    budget: its recipe's unless `given` (flags; None = not given) says otherwise, on the levels its
    table entry's plan buys. Raises Inapplicable for a setting the sampler lacks, a budget it cannot
    meet, or levels the network does not know."""
    entry = samplers.SAMPLERS[name]
    if extra := [k for k, v in given.items() if v is not None and k not in samplers.settings(entry.run)]:
        raise Inapplicable(f"--sampler {name} has no setting {', '.join(extra)}")
    try:
        levels, params = entry.plan(entry, ck, nfe, sigma_max, {k: v for k, v in given.items() if v is not None})
    except samplers.Refused as e:
        raise Inapplicable(f"{ck.path}: --sampler {name} {e}") from None
    settings = SamplerSettings(name, tuple(torch.as_tensor(levels).tolist()), seed, ck.shape, tuple(params.items()))
    if nfe and settings.nfe > nfe:
        raise Inapplicable(f"--nfe {nfe} is too few for --sampler {name} on {ck.path}: it spends at least "
                           f"{settings.nfe}")
    return settings


def fingerprint(ck, settings):
    """The key of a set of samples: the weights actually used and every sampler setting's value."""
    return utils.digest(ck.model.net.state_dict(), json.dumps(settings.record(), sort_keys=True))

#----------------------------------------------------------------------------
# A folder of samples: shards keyed by the fingerprint, made where missing.

class StaleSamples(utils.UserError):
    """A folder or shard holding samples of other weights or settings."""


def open_folder(folder, fp, settings, ck):
    """Create the samples folder or check that it holds samples of this fingerprint; set a damaged samples.json
    aside."""
    meta = os.path.join(folder, "samples.json")
    record = settings.record()
    old = utils.whole_or_none(utils.read_json, meta) if os.path.exists(meta) else None
    if old is not None and old.get("fingerprint") != fp:
        what = [k for k in record if old.get("settings", {}).get(k) != record[k]] or ["the weights"]
        raise StaleSamples(f"{folder} holds samples made with other {', '.join(what)}; "
                           "use another --out, or delete that folder")
    os.makedirs(folder, exist_ok=True)
    if old is None:
        utils.save_json(dict(fingerprint=fp, settings=record, checkpoint=ck.path, ema=ck.ema, step=ck.step), meta)


def shards(folder, fp=None, verify=False):
    """{(start, end): path} of the shards in `folder`; with fp, refuse any made under another; with
    verify, read each whole and set a damaged one aside (its samples are missing again)."""
    found = {}
    for path in glob.glob(os.path.join(folder, "shard_*.npz")):
        m = re.fullmatch(r"shard_(\d+)_(\d+)\.npz", os.path.basename(path))
        if not m:
            continue
        if fp is not None:
            stored = utils.whole_or_none(utils.read_npz, path, None if verify else ["fingerprint"])
            if stored is None:
                continue
            if str(stored.get("fingerprint")) != fp:
                raise StaleSamples(f"{path} was made by other weights or sampler settings; "
                                   "delete it or use another --out")
        found[int(m.group(1)), int(m.group(2))] = path
    return found


def missing_runs(folder, sets, batch_size, fp, verify=True, spans=None):
    """(how many images of the sets [(lo, hi)] no shard holds, a generator of their ranges, each gap cut to the
    batch size): memory O(shards) whatever the counts. verify: read each shard whole first (shards); spans: the
    (start, end) of the shards, listed before (every process the same list)."""
    spans = sorted(shards(folder, fp, verify=verify) if spans is None else spans)
    def gaps(lo, hi):                                   # the parts of [lo, hi) that no shard holds
        pos = lo
        for a, b in spans + [(hi, hi)]:
            if a > pos:
                yield pos, min(a, hi)
            pos = max(pos, b)
            if pos >= hi:
                return
    def runs():
        for lo, hi in sets:
            for a, b in gaps(lo, hi):
                yield from ((s, min(s + batch_size, b)) for s in range(a, b, batch_size))
    return sum(b - a for lo, hi in sets for a, b in gaps(lo, hi)), runs()


@torch.no_grad()
def sample(model, settings, folder, sets, batch_size, device, fp, rank=0, world=1, verify=True, spans=None):
    """Make the images of the sets [(lo, hi)] of image indices that no shard holds yet with settings' sampler from
    U(0, 1), with model(x, sigma) on `device`; each batch becomes shard_<start>_<end>.npz, stamped with the
    fingerprint (the first set's first batch also keeps its states at each level: process.png). Of `world`
    processes, rank r makes the r-th of every `world` missing batches: the same batches, shards and images as one
    process. Returns how many were made (by all)."""
    sigmas = torch.tensor(settings.sigmas, device=device)
    run = samplers.SAMPLERS[settings.name].run
    made, runs = missing_runs(folder, sets, batch_size, fp, verify, spans)
    total = sum(hi - lo for lo, hi in sets)
    bar = tqdm(total=total, initial=total - made, desc="sampling" + (f" ({world} processes)" if world > 1 else ""),
               unit="img", dynamic_ncols=True, disable=rank > 0)
    for start, end in itertools.islice(runs, rank, None, world):
        noise = utils.SampleNoise([(settings.seed, i) for i in range(start, end)], device)   # image i: (seed, i)
        monitor = health.Health(sigmas, end - start, device, keep_states=start == sets[0][0])
        x = run(model, noise.rand(*settings.shape), sigmas, randn_like=noise.randn_like, callback=monitor,
                **settings.kwargs)
        non_finite = (~torch.isfinite(x)).flatten(1).any(1)
        images = (torch.nan_to_num(x, nan=0.0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
        extra = dict(levels=torch.stack([monitor.states[i] for i in sorted(monitor.states)]).cpu().numpy()) \
            if monitor.states else {}
        with utils.atomic_path(os.path.join(folder, f"shard_{start:07d}_{end:07d}.npz")) as tmp:
            np.savez(tmp, images=images, **extra, health=monitor.stats.cpu().numpy(),
                     non_finite_each=non_finite.cpu().numpy(), fingerprint=np.array(fp))
        bar.update(min((end - start) * world, bar.total - bar.n))          # the others make as many meanwhile
    bar.close()
    return made


def covering(folder, end, fp=None, start=0):
    """(a, b, path, first) of the shards that hold images [start, end) once each, in order: `first` is the
    shard's row of image `a` (a shard that overlaps an earlier one is read from there on)."""
    chain, pos = [], start
    for (a, b), path in sorted(shards(folder, fp).items()):
        if b > pos and a <= pos < end:
            chain.append((pos, min(b, end), path, pos - a))
            pos = min(b, end)
    return chain


def read_shards(folder, end, fp=None, start=0):
    """Yield images [start, end) shard by shard (each sample once), as uint8 (B, C, H, W) tensors."""
    for a, b, path, first in covering(folder, end, fp, start):
        with np.load(path) as f:
            yield torch.from_numpy(f["images"][first:first + b - a])


def read_folder(folder, flag):
    """Every image of a sample.py folder, read as sample.py reads it: the shards of its samples.json's
    fingerprint only (another's refused), a damaged shard set aside, each image once; uint8 (N, C, H, W)."""
    meta = os.path.join(folder, "samples.json")
    fp = (utils.whole_or_none(utils.read_json, meta) or {}).get("fingerprint")
    if fp is None:
        raise utils.UserError(f"{flag} {folder}: its samples.json was damaged (set aside); run the sample.py command "
                              "that made the folder again to restore it")
    spans = shards(folder, fp, verify=True)
    if not spans:
        raise utils.UserError(f"{flag} {folder}: no readable shard of samples; run the sample.py command again")
    runs = []                                            # the contiguous runs of images the shards hold
    for a, b in sorted(spans):
        if runs and a <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], b)
        else:
            runs.append([a, b])
    return torch.cat([x for lo, hi in runs for x in read_shards(folder, hi, fp, lo)])


def collect(folder, end, fp=None, start=0):
    """Images [start, end) in one tensor (the grid, tests)."""
    images = torch.cat(list(read_shards(folder, end, fp, start)))
    assert len(images) == end - start, f"{folder}: {len(images)} images for [{start}, {end})"
    return images

#----------------------------------------------------------------------------
# Pictures of a set of samples.

def save_process(folder, settings, fp, start=0):
    """process.png: the first health.PROCESS_ROWS samples at the end of each level, as the shard at `start` (else
    the first that did) kept them."""
    for (a, b), path in sorted(shards(folder, fp).items(), key=lambda s: (s[0][0] != start, s[0])):
        with np.load(path) as f:
            if "levels" in f.files:
                levels = list(torch.from_numpy(f["levels"]))
                break
    else:
        return
    figures.save_process_figure(os.path.join(folder, "process.png"), levels, list(settings.sigmas),
                              title=f"{settings.name}: state at the end of each level")


def save_pngs(folder, sets, fp):
    """png/<i>.png for each sample i of the sets (EDM's layout), skipping those already written."""
    from PIL import Image
    os.makedirs(os.path.join(folder, "png"), exist_ok=True)
    for lo, hi in sets:
        i = lo
        for images in read_shards(folder, hi, fp, lo):
            for img in images:
                path = os.path.join(folder, "png", f"{i:06d}.png")
                if not os.path.exists(path):
                    with utils.atomic_path(path) as tmp:
                        Image.fromarray(img.permute(1, 2, 0).squeeze(2).numpy()).save(tmp)
                i += 1

#----------------------------------------------------------------------------
# Plan (every checkpoint x setting, before any work), then make each job's samples.

@dataclasses.dataclass
class Job:
    ck: checkpoints.Checkpoint
    settings: SamplerSettings
    folder: str
    fp: str


def add_flags(p):
    """The sampling flags, shared with evaluate.py."""
    p.add_argument("--checkpoint", action="extend", nargs="+",
                   help=f"checkpoint file(s) or glob(s) (default: the newest training run's under {checkpoints.RUNS}/)")
    p.add_argument("--n", type=utils.positive_int, default=None, help=f"samples per setting: images 0 to n - 1 "
                   f"(default {N:,})")
    p.add_argument("--seeds", type=utils.seed_ranges, action="extend", nargs="+", metavar="RANGE",
                   help="instead of --n, the images to make and score as sets (EDM's seed ranges): 0-49999, several "
                        "disjoint ranges, or 0-149999:50000 for three sets of 50,000; each set is scored apart")
    p.add_argument("--batch-size", type=utils.positive_int, default=BATCH_SIZE, help="images sampled at once")
    p.add_argument("--seed", type=utils.seed, default=SEED, help="image i uses a generator seeded by (seed, i)")
    p.add_argument("--device", type=utils.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help=f"output folder (default {OUT}/<checkpoint name>)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="EMA weights (default: if the checkpoint has them)")
    p.add_argument("--sampler", nargs="+", choices=[*samplers.SAMPLERS, "auto"], default=None,
                   help="samplers of samplers.SAMPLERS: als (the paper's annealed Langevin dynamics), ancestral "
                        "(reverse diffusion), heun (EDM), dpmpp2m (DPM-Solver++(2M)); auto: " + auto_help()
                        + " (default: the checkpoint's recipe's sampler and budget: ncsn als, ncsnv2 heun --s-churn "
                        "10 --nfe 35, edm heun)")
    p.add_argument("--nfe", type=utils.positive_int, nargs="+", default=None,
                   help="network evaluations per sample: als: T = (NFE - denoise) // L; the others: as many levels "
                        "as the budget buys (a norm-conditioned network: a subset of its own)")
    for k, (default, names) in all_settings().items():      # every keyword setting of every sampler function
        flag, auto = "--" + k.replace("_", "-"), any(k in samplers.SAMPLERS[n].auto for n in names)
        what = f"{', '.join(names)}: {k}" + (" (or auto: technique 4's step for T)" if auto else "")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{what} (default: the checkpoint's recipe's, else {default})")
        else:                                                # > 0 where the default is, else >= 0
            parse = ((utils.positive_int if default > 0 else utils.count) if isinstance(default, int)
                     else utils.positive_float if default > 0 else utils.nonnegative_float)
            p.add_argument(flag, type=utils.number_or_auto(parse) if auto else parse, nargs="+", default=None,
                           help=f"{what}; several values form a grid (default: the checkpoint's recipe's, else "
                                f"{default:g})")
    p.add_argument("--sigma-max", type=utils.positive_float, default=None,
                   help="heun, dpmpp2m, ancestral: the first noise level (EDM's sigma_max; default: the checkpoint's "
                        "sigma_1); a scale- or continuous-conditioned network")
    p.add_argument("--png", action="store_true", help="also write every sample as png/<i>.png")


def default_checkpoint(p, prefer=None):
    """The newest training run's checkpoint (of data set `prefer` when there is one), said in one line; without
    any run, a one-line error naming --checkpoint."""
    if (newest := checkpoints.newest_run(prefer)) is None:
        p.error(f"no --checkpoint given and no training run under {checkpoints.RUNS}/ (a folder with checkpoint.pt "
                "and config.json); pass --checkpoint FILE")
    print(f"checkpoint {newest[0]}: {newest[1]}", flush=True)
    return newest[0]


def checkpoints_of(p, patterns, prefer=None):
    """The checkpoint files of --checkpoint's names and globs, in order, each once; none given: the newest run's."""
    if not patterns:
        return [default_checkpoint(p, prefer)]
    found = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            p.error(f"--checkpoint {pattern}: no file matches")
        found += [c for c in matches if c not in found]
    return found


def auto_help():
    """AUTO in words, for --help."""
    name = lambda s, kw: s + "".join(f" --{k.replace('_', '-')} {v:g}" for k, v in kw.items())
    return "; ".join(f"a model of {c}: " + ", then ".join(
        f"{name(s, kw)} up to NFE {m}" if m else name(s, kw) for m, s, kw in rows) for c, rows in AUTO.items())


def kind(ck):
    """A checkpoint's model as AUTO knows it: a denoiser (EDM's), a score network of any sigma, or of its
    trained levels only (the paper's)."""
    return "a denoiser" if ck.model.predicts_denoised else "any sigma" if ck.any_sigma else "trained levels only"


def auto_sampler(ck, nfe):
    """--sampler auto: (name, settings) of the best measured sampler of a checkpoint's kind of model at an
    --nfe budget (AUTO)."""
    return next((s, kw) for most, s, kw in AUTO[kind(ck)] if most is None or (nfe is not None and nfe <= most))


def plan(args, ckpts):
    """Load every checkpoint (on the CPU) and name each setting's folder, before any work."""
    jobs, skipped = [], []
    for path in ckpts:
        ck = checkpoints.load(path, ema=args.ema)
        data.spec(ck.dataset, ck.path)
        name = utils.checkpoint_name(path)
        base = args.out if (args.out and len(ckpts) == 1) else os.path.join(args.out or OUT, name)
        recipes = args.sampler is None      # the checkpoint's recipe's sampler, at its budget and settings
        names = list(all_settings())
        grid = itertools.product(args.sampler or [ck.sampler], args.nfe or [ck.nfe if recipes else None],
                                 *[getattr(args, k) if isinstance(getattr(args, k), list) else [getattr(args, k)]
                                   for k in names])
        for sampler, nfe, *values in grid:
            sampler, chosen = auto_sampler(ck, nfe) if sampler == "auto" else (sampler, {})
            given = dict(zip(names, values))
            recipe = recipe_settings(ck, sampler) if recipes else {}
            given.update((k, v) for k, v in {**recipe, **chosen}.items() if given.get(k) is None)
            own = samplers.settings(samplers.SAMPLERS[sampler].run)     # a sampler's own flags apply to it alone
            try:
                settings = sampler_settings(sampler, ck, args.seed, nfe, args.sigma_max,
                                            **{k: v for k, v in given.items() if k in own})
            except Inapplicable as e:               # fine in a grid of several, an error alone
                skipped.append(e)
                continue
            fp = fingerprint(ck, settings)
            folder = os.path.join(base, f"{settings.tag()}_seed{args.seed}_{fp[:10]}")
            if problem := utils.name_problem(folder, "the output folder"):
                raise utils.UserError(problem)          # before any setting's work
            if all(j.folder != folder for j in jobs):
                jobs.append(Job(ck, settings, folder, fp))
    if skipped and not jobs:
        raise skipped[0]
    for e in dict.fromkeys(str(e) for e in skipped):
        print(f"skipped: {e}")
    return jobs


def make(job, args, device, rank=0, world=1, then=None):
    """A job on every process: rank 0 takes the folder (its lock; damaged files set aside), every rank makes its
    share of the missing batches, then rank 0 alone writes grid.png, process.png, png/ and the health report, and
    returns then(what describes them) (the start of metrics.json; then: evaluate.py's scores); None elsewhere. A
    failure on any rank stops every rank (utils.collective)."""
    ck, settings = job.ck, job.settings
    def prepare():
        open_folder(job.folder, job.fp, settings, ck)
        shards(job.folder, job.fp, verify=True)                         # set damaged shards aside before any plan
    def work(spans):                                                    # the same spans: the same missing batches
        made = sample(ck.model.to(device), settings, job.folder, args.sets, args.batch_size, device, job.fp, rank,
                      world, spans=spans)
        ck.model.cpu()
        return made
    return utils.shared_folder(job.folder, rank, world, device, prepare, lambda: list(shards(job.folder, job.fp)),
                               work, lambda made: (then or (lambda d: d))(describe(job, args, made)))


def describe(job, args, made):
    """grid.png (the first set's first 100), process.png, png/ and the health report of a job's samples; returns
    what describes them, also written as health.json."""
    ck, settings = job.ck, job.settings
    covered = [c for lo, hi in args.sets for c in covering(job.folder, hi, job.fp, lo)]
    if (have := sum(b - a for a, b, _, _ in covered)) != args.n:
        raise utils.UserError(f"{job.folder} holds {have} of the {args.n} samples after sampling (a shard removed "
                              "meanwhile?); run the same command again to make the rest")
    *means, non_finite = health.health_means(covered)
    lo, hi = args.sets[0]
    grid = collect(job.folder, min(hi, lo + 100), job.fp, lo)
    figures.save_image_grid(os.path.join(job.folder, "grid.png"), grid.float() / 255,
                          nrow=int(math.ceil(math.sqrt(len(grid)))))
    save_process(job.folder, settings, job.fp, lo)
    if args.png:
        save_pngs(job.folder, args.sets, job.fp)
    rows, bad = health.health_report(settings.sigmas, *means, int(np.prod(settings.shape)))
    health.print_health(rows, bad, non_finite, args.n, f"{ck.path}, {settings.name}, {settings.tag()}",
                        health.remedy(settings.name, settings.kwargs.get("s_churn", 0.0)))
    described = dict(checkpoint=ck.path, network=ck.label(), dataset=ck.dataset, n=args.n,
                     seeds=seeds_text(args.sets), nfe=settings.nfe, sampler=dict(settings.record(), ema=ck.ema),
                     fingerprint=job.fp, folder=job.folder, health=rows, saturating_level=bad,
                     non_finite_samples=non_finite, samples_made_now=made)
    utils.save_json(described, os.path.join(job.folder, "health.json"))
    return described


def seeds_text(sets):
    """The sets [(lo, hi)] as --seeds writes them: '0-499 500-999'."""
    return " ".join(f"{lo}-{hi - 1}" for lo, hi in sets)


def check_flags(p, args, scored=False):
    """Refuse what no single sampling flag can check (scored: a set of 1 sample, which no score takes); fill
    args.sets (the sets of image indices: --seeds', else [0, --n)) and args.n (the images in them); make --out
    (sample.py and evaluate.py)."""
    if args.seeds and args.n is not None:
        p.error("--n and --seeds both say which images to make; give one (--n N is --seeds 0-<N-1>)")
    args.sets = sorted(s for ranges in args.seeds for s in ranges) if args.seeds else [(0, args.n or N)]
    if overlap := next((f"{a}-{b - 1} and {c}-{d - 1}" for (a, b), (c, d) in zip(args.sets, args.sets[1:])
                        if c < b), None):
        p.error(f"--seeds {overlap} overlap: each set is scored apart, so the ranges must be disjoint")
    args.n = sum(hi - lo for lo, hi in args.sets)
    if scored and min(hi - lo for lo, hi in args.sets) < 2:
        p.error("a set of 1 sample cannot be scored (a Frechet distance needs a covariance): give --n 2 or more "
                "(each --seeds set too), or --metrics none")
    if args.nfe and args.steps_each:
        p.error("--nfe and --steps-each both set T; give one")
    if args.sampler is not None:                    # else each checkpoint's recipe's: checked per checkpoint (plan)
        names = [[s for rows in AUTO.values() for _, s, _ in rows] if n == "auto" else [n] for n in args.sampler]
        taken = {k for group in names for name in group for k in samplers.settings(samplers.SAMPLERS[name].run)}
        for k in all_settings():
            if getattr(args, k) is not None and k not in taken:
                p.error(f"--{k.replace('_', '-')} is a setting of no sampler asked for (--sampler "
                        f"{' '.join(args.sampler)}); drop it or add a sampler that takes it")
    if problem := utils.check_out(args.out or OUT):
        p.error(problem)


@utils.command()
def main(argv=None):
    p = utils.arg_parser(__doc__)
    add_flags(p)
    args = p.parse_args(argv)
    check_flags(p, args)
    utils.quiet_other_ranks()
    ckpts = checkpoints_of(p, args.checkpoint)
    rank, world, device = utils.dist_init(args.device)      # torchrun: the missing batches split across processes
    jobs = plan(args, ckpts)
    utils.same_on_every_rank([j.fp for j in jobs], "samples", rank, world, device)
    results = [make(job, args, device, rank, world) for job in jobs]
    if world > 1:
        utils.dist_exit(0)
    return results


if __name__ == "__main__":
    main()
