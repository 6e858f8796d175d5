"""The table of Fig. 6: Inception score and FID of annealed Langevin samples (CIFAR-10); samples,
pictures and digit scores for any checkpoint.

    python evaluate.py --checkpoint runs/cifar10/checkpoint.pt --n 5000
    python evaluate.py --checkpoint run/logs/cifar10/checkpoint.pth                 # an official checkpoint
    python evaluate.py --checkpoint 'runs/cifar10/checkpoint_*.pt' --step-lr 2e-5 1e-5 --n 1000   # appendix B.2
    python evaluate.py ... --inception-weights weights-inception-2015-12-05-6726825d.pth --ref ref.npz   # offline
    python evaluate.py --checkpoint runs/mnist/checkpoint.pt --metrics none --n 64 --png      # samples only, no network needed
    python evaluate.py --checkpoint A.pt B.pt --metrics classifier --nfe 100 300 1000          # MNIST: quality against cost
    python evaluate.py --checkpoint runs/cifar10/checkpoint.pt --n 100 --nearest 5            # memorisation check
    python evaluate.py --checkpoint runs/ncsnv2/checkpoint.pt --sampler als ancestral --nfe 100 1000   # two samplers

Samples come from common.annealed_langevin_dynamics (the paper's 10 levels, 100 steps each,
step_lr 2e-5, uniform start), or with --sampler ancestral from common.reverse_diffusion. Image i is drawn with its own generator seeded by (--seed, i), so
samples do not depend on the batch size. They are written in shards as they are made, in a
folder named after a fingerprint of what makes them (the weights used, the sampler settings,
the seed, the image shape): a rerun of the same evaluation makes only the missing ones, and
samples of other weights or settings are never counted. Metrics use torch-fidelity's port of
the TensorFlow Inception network the paper used (OpenAI's Inception score, 10 splits; TTUR's
FID) against statistics of the training set, cached under a key of the images' content and
the Inception weights. Writes per checkpoint and sampler setting: samples.json (the
fingerprint), shards, grid.png (first 100 samples), process.png (the first 8 at the end of
each level), metrics.json (with a per-level sampler health report); png/ with --png; nearest.png
with --nearest; sweep.png (each metric against network evaluations) when several are compared.
"""
import argparse
import glob
import itertools
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import common
import utils

#----------------------------------------------------------------------------
# Defaults: the evaluation protocol; the sampler's are the paper's (common.STEP_LR, STEPS_EACH).

OUT = "runs/eval"        # root of the outputs: <OUT>/<checkpoint name>/<sampler setting>_<fingerprint>/
N = 50_000               # samples per evaluation (the usual protocol; model selection can use fewer)
BATCH_SIZE = 100         # images sampled at once
SEED = 0                 # image i uses a generator seeded by (SEED, i)
FEATURES = 2048          # Inception pool features: the size of a reference mu and sigma
PAPER = ("paper (NCSN, CIFAR-10)", 8.87, 0.12, 25.32)
SEED_REPORT = ("seed report", 4.17, 0.13, 110.85)

#----------------------------------------------------------------------------
# Inception features and the two metrics.

def inception(weights, device):
    """torch-fidelity's TF-Inception port; `weights` None downloads the released file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    if weights is not None:
        common.read_checkpoint(weights)          # weights_only=True first: refuse a file that carries code
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=weights)
    except Exception as e:
        if weights is not None:
            raise common.CheckpointError(f"{weights}: not torch-fidelity Inception weights ({utils.first_line(e)[:100]})")
        raise utils.DataError(f"could not download the Inception weights ({utils.first_line(e)[:80]}); pass "
                               "--inception-weights weights-inception-2015-12-05-6726825d.pth (torch-fidelity v0.2.0 release)")
    return net.to(device)


@torch.no_grad()
def features(net, images, device, batch_size=100):
    """Pool features (N, 2048) and unbiased logits (N, 1008), float64, of uint8 images (N, C, H, W)."""
    pool, logits = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x        # MNIST: digits repeated to 3 channels
        p, l = net(x)
        pool.append(p.double().cpu()), logits.append(l.double().cpu())
    return torch.cat(pool), torch.cat(logits)


@torch.no_grad()
def streamed_stats(net, batches, device):
    """mu, sigma of the pool features and all logits, over an iterable of uint8 batches. Sums of
    features and of their outer products build up in float64 (as EDM's fid.py): memory is one
    batch plus 2048^2, whatever the number of images."""
    n, s1, s2, logits = 0, 0, 0, []
    for images in batches:
        pool, l = features(net, images, device)
        n, s1, s2 = n + len(pool), s1 + pool.sum(0), s2 + pool.T @ pool
        logits.append(l.float())
    mu = s1 / n
    sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)
    return mu.numpy(), sigma.numpy(), torch.cat(logits).double()


def inception_score(logits, splits=10):
    """exp E_x KL(p(y|x) || p(y)) per split (OpenAI's), via torch-fidelity; returns (mean, std)."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    m = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    return m["inception_score_mean"], m["inception_score_std"]


fid = utils.frechet_distance       # on Inception pool features: FID

#----------------------------------------------------------------------------
# Reference statistics, cached under a key of what they were computed from.

def read_stats(path):
    """(mu, sigma) of a statistics .npz, refused in one line unless both are finite 2048-feature arrays."""
    try:
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise utils.DataError(f"--ref {path}: needs arrays 'mu' and 'sigma' (as written by an earlier run)")
            mu, sigma = f["mu"], f["sigma"]
    except utils.DataError:
        raise
    except Exception as e:      # zipfile, pickle and OS errors by cause
        raise utils.DataError(f"--ref {path}: not a readable .npz of statistics ({utils.first_line(e)[:80]})") from None
    if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
        raise utils.DataError(f"--ref {path}: mu has shape {mu.shape} and sigma {sigma.shape}; Inception statistics "
                               f"are ({FEATURES},) and ({FEATURES}, {FEATURES})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise utils.DataError(f"--ref {path}: mu or sigma holds NaN or infinite values")
    return mu, sigma


def reference_stats(args, dataset, net, net_digest, device, cache_dir):
    """(mu, sigma, label) of --ref: a stats .npz, a folder of images, or the data set's training
    set. Computed statistics are cached in cache_dir under a key of the images' bytes, the
    Inception weights and the feature path (resize and channel handling), so that other images
    or weights never reuse them."""
    spec = utils.DATASETS[dataset]
    if args.ref and args.ref.endswith(".npz"):
        return (*read_stats(args.ref), f"statistics {args.ref}")
    if args.ref:
        images, label = utils.load_image_folder(args.ref, spec["channels"], spec["image_size"], flag="--ref"), f"folder {args.ref}"
    else:
        images = utils.load_images(dataset, True, args.data_root, folder_flag="--ref")
        label = f"{dataset} training set" + (", digits repeated to 3 channels" if spec["channels"] == 1 else "")
    import torch_fidelity
    path = f"inception-v3-compat 299 bilinear, torch-fidelity {torch_fidelity.__version__}, channels {spec['channels']}->3"
    key = utils.digest(images, net_digest, path)[:16]
    cache = os.path.join(cache_dir, f"{'folder' if args.ref else dataset}_{len(images)}_{key}.npz")
    if os.path.exists(cache):
        print(f"reference statistics of the {label}: {cache} (cached; key of images, weights and feature path)")
        mu, sigma = read_stats(cache)
        return mu, sigma, label
    print(f"reference statistics of the {label}: {len(images)} images, computed once")
    mu, sigma, _ = streamed_stats(net, [images[i:i + 1000] for i in range(0, len(images), 1000)], device)
    with utils.atomic_path(cache) as tmp:
        np.savez(tmp, mu=mu, sigma=sigma)
    print(f"saved them as {cache} (reused while the images and weights are the same)")
    return mu, sigma, label

#----------------------------------------------------------------------------
# Samples: in a folder keyed by a fingerprint, in shards, resumable, with a health report.

class StaleSamples(utils.DataError):
    """A folder or shard holding samples of other weights or settings."""


def fingerprint(net, settings):
    """The key of a set of samples: the weights actually used and every sampler setting."""
    return utils.digest(net.state_dict(), json.dumps(settings, sort_keys=True))


def open_folder(folder, fp, settings, info):
    """Create the samples folder or check that it holds samples of this fingerprint."""
    meta = os.path.join(folder, "samples.json")
    if os.path.exists(meta):
        with open(meta) as f:
            old = json.load(f)
        if old.get("fingerprint") != fp:
            what = [k for k in settings if old.get("settings", {}).get(k) != settings[k]] or ["the weights"]
            raise StaleSamples(f"{folder} holds samples made with other {', '.join(what)}; "
                               "use another --out, or delete that folder")
        return
    os.makedirs(folder, exist_ok=True)
    utils.save_json(dict(fingerprint=fp, settings=settings, checkpoint=info["path"], ema=info["ema"], step=info["step"]), meta)


def _shards(folder, fp=None):
    """{(start, end): path} of the shards in `folder`; with fp, refuse any made under another."""
    found = {}
    for path in glob.glob(os.path.join(folder, "shard_*.npz")):
        m = re.fullmatch(r"shard_(\d+)_(\d+)\.npz", os.path.basename(path))
        if m:
            if fp is not None:
                with np.load(path) as f:
                    if "fingerprint" not in f or str(f["fingerprint"]) != fp:
                        raise StaleSamples(f"{path} was made by other weights or sampler settings; delete it or use another --out")
            found[int(m.group(1)), int(m.group(2))] = path
    return found


def sample(net, sigmas, folder, n, batch_size, step_lr, steps_each, denoise, seed, device, shape, fp="", ancestral=False):
    """Make the images of [0, n) that no shard holds yet; each batch becomes shard_<start>_<end>.npz,
    stamped with the fingerprint fp. Annealed Langevin dynamics from U(0, 1), or with ancestral
    common.reverse_diffusion from U(0, 1) + sigma_1 z."""
    have = set()
    for (a, b) in _shards(folder, fp):
        have.update(range(a, b))
    missing = [i for i in range(n) if i not in have]
    runs = []                                   # contiguous missing ranges, cut to the batch size
    for i in missing:
        if runs and runs[-1][1] == i and runs[-1][1] - runs[-1][0] < batch_size:
            runs[-1][1] += 1
        else:
            runs.append([i, i + 1])
    L = len(sigmas)
    bar = tqdm(total=n, initial=n - len(missing), desc="sampling", unit="img", dynamic_ncols=True)
    for start, end in runs:
        noise = utils.SampleNoise([(seed, i) for i in range(start, end)], device)   # image i: seeded by (seed, i)
        x0, randn_like = noise.rand(*shape), noise.randn_like
        if ancestral:
            x0 = x0 + sigmas[0] * randn_like(x0)
        norm_sum, out_sum, far_sum = (torch.zeros(L, device=device) for _ in range(3))
        snaps = []                             # end-of-level states of the first images, for process.png
        def health(level, step, x, score):     # at the end of each level, no host sync
            if step == steps_each - 1:
                if start == 0:
                    snaps.append(x[:PROCESS_ROWS].clone())
                m = 3 * float(sigmas[level])   # a sample of level i is data + N(0, sigma_i^2): beyond 3 sigma_i is off
                norm_sum[level] += score.flatten(1).norm(dim=1).sum()
                out_sum[level] += ((x < 0) | (x > 1)).float().mean(dim=(1, 2, 3)).sum()
                far_sum[level] += ((x < -m) | (x > 1 + m)).float().mean(dim=(1, 2, 3)).sum()
        if ancestral:                          # any levels: a scale-conditioned net takes sigma itself
            score = net if len(sigmas) == net.model_args["num_classes"] else lambda x, i: net(x, sigmas[i])
            x = common.reverse_diffusion(score, x0, sigmas, callback=health, randn_like=randn_like)
        else:
            x, _ = common.annealed_langevin_dynamics(net, x0, sigmas, steps_each, step_lr, denoise=denoise,
                                                     keep_levels=False, callback=health, randn_like=randn_like)
        non_finite = (~torch.isfinite(x)).flatten(1).any(1).sum()
        images = (torch.nan_to_num(x, nan=0.0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
        path = os.path.join(folder, f"shard_{start:07d}_{end:07d}.npz")
        extra = dict(levels=torch.stack(snaps).cpu().numpy()) if snaps else {}
        with utils.atomic_path(path) as tmp:
            np.savez(tmp, images=images, **extra, score_norm_sum=norm_sum.cpu().numpy(), out_of_range_sum=out_sum.cpu().numpy(),
                     far_out_sum=far_sum.cpu().numpy(), non_finite=non_finite.cpu().numpy(), fingerprint=np.array(fp))
        bar.update(end - start)
    bar.close()
    return len(missing)


def existing_only(jobs, n):
    """The jobs whose first n samples are all in shards of their fingerprint; a line for each other."""
    kept = []
    for j in jobs:
        have = sum(min(b, n) - a for a, b in _shards(j["folder"], j["fp"]) if a < n)
        if have >= n:
            kept.append(j)
        else:
            print(f"skipped: {j['folder']}: {have} of {n} samples made (--existing samples nothing)")
    if not kept:
        raise utils.DataError(f"--existing: none of the {len(jobs)} settings has its {n} samples yet; run without it")
    return kept


def read_shards(folder, n, fp=None):
    """Yield the first n images shard by shard, as uint8 (B, C, H, W) tensors."""
    for (a, b), path in sorted(_shards(folder, fp).items()):
        if a < n:
            with np.load(path) as f:
                yield torch.from_numpy(f["images"][:n - a])


def collect(folder, n, fp=None):
    """The first n images in one tensor (the grid, tests)."""
    images = torch.cat(list(read_shards(folder, n, fp)))
    assert len(images) == n, f"{folder}: {len(images)} images for n={n}"
    return images


def health_means(folder, n, fp=None):
    """Per level, over the shards of [0, n): mean score norm, share of pixels outside [0, 1],
    share more than 3 sigma_i outside it; and the number of samples that were not finite."""
    sums, count, non_finite = [0, 0, 0], 0, 0
    for (a, b), path in _shards(folder, fp).items():
        if a < n:
            with np.load(path) as f:
                sums = [t + f[k] for t, k in zip(sums, ["score_norm_sum", "out_of_range_sum", "far_out_sum"])]
                non_finite += int(f["non_finite"]) if "non_finite" in f else 0
                count += b - a
    return [t / count for t in sums] + [non_finite]


SATURATED = 0.01   # warn when over 1% of pixels lie more than 3 sigma_i outside [0, 1] (0.13% for a correct sample)


def health_report(sigmas, score_norm, out_share, far_share, dim):
    """Rows per level, and the first level where samples saturate (None when none does).
    Pixels just outside [0, 1] are normal (dark MNIST background plus the level's noise);
    pixels more than 3 sigma_i outside it are not."""
    rows = [dict(level=i + 1, sigma=float(s), mean_score_norm=float(g), sigma_times_norm_over_sqrt_d=float(s * g / math.sqrt(dim)),
                 share_outside_01=float(o), share_beyond_3_sigma=float(f))
            for i, (s, g, o, f) in enumerate(zip(sigmas, score_norm, out_share, far_share))]
    bad = next((r["level"] for r in rows if r["share_beyond_3_sigma"] > SATURATED), None)
    return rows, bad


def shown_levels(L, rows=20):
    """About `rows` of L levels, evenly spaced, the first and the last included (0-based)."""
    every = math.ceil(L / rows)
    return [i for i in range(L) if i % every == 0 or i == L - 1]


def print_health(rows, bad, non_finite, n, title):
    print(f"sampler health ({title}), at the end of each level:")
    print(f"  {'level':>5} {'sigma':>8} {'mean |s|':>10} {'sigma|s|/sqrt(D)':>16} {'outside [0,1]':>14} {'> 3 sigma out':>14}")
    for r in (rows[i] for i in shown_levels(len(rows))):
        print(f"  {r['level']:>5} {r['sigma']:8.4f} {r['mean_score_norm']:10.4g} {r['sigma_times_norm_over_sqrt_d']:16.3f} "
              f"{r['share_outside_01']:14.2%} {r['share_beyond_3_sigma']:14.2%}")
    if bad:
        r = rows[bad - 1]
        print(f"WARNING: samples saturate from level {bad} (sigma {r['sigma']:.4g}) on: {r['share_beyond_3_sigma']:.1%} of pixels "
              f"lie more than 3 sigma outside [0, 1] at its end; try a smaller --step-lr")
    if non_finite:
        print(f"WARNING: {non_finite} of {n} samples became NaN or infinite (stored as black where NaN); try a smaller --step-lr")

@torch.no_grad()
def level_losses(net, info, images, batch_size, device):
    """{level: test DSM loss} at shown_levels of the checkpoint's training levels: eq. (5) with
    lambda = sigma^2 on `images` (uint8, / 255), the same noise z at every level (seeded). How
    well the network fits each level, apart from any sampler; the loss of a perfect score is
    not 0 but the level's irreducible part, so compare checkpoints level by level."""
    sigmas = common.geometric_sigmas(info["sigma_begin"], info["sigma_end"], info["num_levels"]).to(device)
    x_all = images.float() / 255
    z_all = torch.randn(x_all.shape, generator=torch.Generator().manual_seed(utils.stable_seed(SEED, -2)))
    net, losses = net.to(device), {}
    for i in shown_levels(len(sigmas)):
        total = 0.0
        for lo in range(0, len(x_all), batch_size):
            x, z = x_all[lo:lo + batch_size].to(device), z_all[lo:lo + batch_size].to(device)
            labels = torch.full((len(x),), i, dtype=torch.long, device=device)
            total += common.dsm_loss(net, x, labels, sigmas, noise=z, reduction="none").sum().item()
        losses[i + 1] = total / len(x_all)
    net.cpu()
    print(f"test DSM loss per training level ({info['path']}, {'EMA' if info['ema'] else 'raw'} weights, "
          f"{len(x_all)} held-out images, the same noise at every level):")
    print("  " + "  ".join(f"{i:>2} {float(sigmas[i - 1]):.3g}: {v:.4g}" for i, v in losses.items()))
    return losses

def add_level_losses(jobs, args, device):
    """job['level_loss'] = level_losses of its checkpoint on --level-loss test images: once per
    checkpoint, the images read once per data set."""
    done, held_out = {}, {}
    for j in jobs:
        key, dataset = j["info"]["path"], j["info"]["dataset"]
        if key not in done:
            if dataset not in held_out:
                held_out[dataset] = utils.load_images(dataset, False, args.data_root)[:args.level_loss]
            done[key] = level_losses(j["net"], j["info"], held_out[dataset], args.batch_size, device)
        j["level_loss"] = done[key]

#----------------------------------------------------------------------------
# Pictures of a set of samples: the generation process, PNG files, nearest training images.

PROCESS_ROWS = 8         # samples shown in process.png


def save_process(folder, settings, fp):
    """process.png: the first PROCESS_ROWS samples at the end of each level, as the first shard kept them."""
    first = [path for (a, b), path in _shards(folder, fp).items() if a == 0]
    with np.load(first[0]) as f:
        if "levels" not in f:                   # a shard of an older version: no states were kept
            return
        levels = list(torch.from_numpy(f["levels"]))
    utils.save_process_figure(os.path.join(folder, "process.png"), levels, settings["sigmas"])


def save_pngs(folder, n, fp):
    """png/<i>.png for each of the first n samples (EDM's layout), skipping those already written."""
    from PIL import Image
    os.makedirs(os.path.join(folder, "png"), exist_ok=True)
    i = 0
    for images in read_shards(folder, n, fp):
        for img in images:
            path = os.path.join(folder, "png", f"{i:06d}.png")
            if not os.path.exists(path):
                with utils.atomic_path(path) as tmp:
                    Image.fromarray(img.permute(1, 2, 0).squeeze(2).numpy()).save(tmp)
            i += 1


@torch.no_grad()
def nearest_neighbours(samples, train_images, k, embed, chunk=1000):
    """Indices (G, k) of the k training images nearest to each sample, by L2 distance between
    embed(images) (pixels, or Inception features), streamed over the training set in chunks."""
    q = embed(samples)
    best_d = torch.full((len(q), 0), math.inf, dtype=q.dtype)
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    for lo in range(0, len(train_images), chunk):
        d = torch.cdist(q, embed(train_images[lo:lo + chunk]))
        d, i = torch.cat([best_d, d], 1), torch.cat([best_i, torch.arange(lo, lo + d.shape[1]).expand(len(q), -1)], 1)
        best_d, order = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        best_i = i.gather(1, order)
    return best_i


def save_nearest(folder, args, job, inc, device):
    """nearest.png: for up to 10 samples, the --nearest training images nearest in pixels (and, with
    the Inception metrics, in Inception pool features): a memorisation check, as NCSNv2's."""
    samples = collect(folder, min(10, args.n), job["fp"])
    train_images = utils.load_images(job["info"]["dataset"], True, args.data_root, folder_flag="--ref")
    pixels = lambda x: x.flatten(1).double()
    rows = [samples[:, None], train_images[nearest_neighbours(samples, train_images, args.nearest, pixels)]]
    if inc is not None:
        rows.append(train_images[nearest_neighbours(samples, train_images, args.nearest,
                                                    lambda x: features(inc, x, device)[0])])
    grid = torch.cat(rows, 1)                                     # (G, 1 + k (+ k), C, H, W)
    utils.save_image_grid(os.path.join(folder, "nearest.png"), grid.flatten(0, 1).float() / 255, nrow=grid.shape[1])

#----------------------------------------------------------------------------
# Evaluation: plan every job first (checkpoints, sampler settings, folders), then sample and score.

def scale_conditioned(info):
    """Whether load_score_net's network is s(x)/sigma (technique 3): it takes any noise levels."""
    return info["model_args"].get("conditioning", "norm") == "scale"


def sampler_settings(args, info, nfe=None, steps_each=None, step_lr=None, sampler="als"):
    """One sampler setting for a checkpoint: its recipe's unless the flags say otherwise; an
    --nfe budget sets T = (budget - denoise step) // L; step_lr 'auto' is technique 4's for T.
    The ancestral sampler takes one step per level: nfe levels from sigma_1 to sigma_L."""
    spec = utils.DATASETS[info["dataset"]]
    shape = [spec["channels"], spec["image_size"], spec["image_size"]]
    if sampler == "ancestral":
        L = nfe or info["num_levels"]
        if L != info["num_levels"] and not scale_conditioned(info):
            raise common.CheckpointError(f"{info['path']}: --sampler ancestral with {L} levels needs a scale-conditioned "
                                         f"network (--recipe ncsnv2); this one knows its {info['num_levels']} levels only")
        return dict(sampler="reverse_diffusion, start U(0, 1) + sigma_1 z", seed=args.seed, shape=shape, step_lr=None,
                    steps_each=1, denoise=False, sigmas=common.geometric_sigmas(info["sigma_begin"], info["sigma_end"], L).tolist())
    sigmas = common.geometric_sigmas(info["sigma_begin"], info["sigma_end"], info["num_levels"]).tolist()
    denoise = info.get("denoise", False) if args.denoise is None else args.denoise
    T, step_lr = common.sampler_defaults(info, nfe, steps_each, step_lr, denoise)
    return dict(sampler="annealed_langevin_dynamics, uniform start", sigmas=sigmas, step_lr=step_lr, steps_each=T,
                denoise=denoise, seed=args.seed, shape=shape)


def plan(args, ckpts):
    """Load every checkpoint (on the CPU) and name each evaluation's folder, before any work."""
    jobs, skipped = [], []
    for ckpt in ckpts:
        net, info = common.load_score_net(ckpt, ema=args.ema)
        if "sigma_begin" not in info:
            raise common.CheckpointError(f"{ckpt}: no noise levels stored (config sigma_begin, sigma_end, num_levels)")
        info.setdefault("dataset", "mnist" if info["model_args"]["in_channels"] == 1 else "cifar10")
        name = f"{os.path.basename(os.path.dirname(os.path.abspath(ckpt)))}_{os.path.splitext(os.path.basename(ckpt))[0]}"
        base = args.out if (args.out and len(ckpts) == 1) else os.path.join(args.out or OUT, name)
        samplers = dict.fromkeys(("ancestral" if scale_conditioned(info) else "als") if s == "auto" else s
                                 for s in args.sampler)
        grid = itertools.product(samplers, args.nfe or [None], args.steps_each or [None], args.step_lr or [None])
        for sampler, nfe, steps_each, step_lr in grid:
            if sampler == "ancestral" and (steps_each or step_lr):
                continue                                        # one step per level, no step size
            try:
                settings = sampler_settings(args, info, nfe, steps_each, step_lr, sampler)
            except common.CheckpointError as e:                # ancestral on a norm-conditioned network:
                skipped.append(e)                              # fine in a grid of several, an error alone
                continue
            fp = fingerprint(net, settings)
            tag = (f"ancestral_L{len(settings['sigmas'])}" if sampler == "ancestral" else
                   f"steplr{settings['step_lr']:.4g}_T{settings['steps_each']}{'_denoise' if settings['denoise'] else ''}")
            jobs.append(dict(net=net, info=info, folder=os.path.join(base, f"{tag}_seed{args.seed}_{fp[:10]}"), fp=fp,
                             settings=settings))
    if skipped and not jobs:
        raise skipped[0]
    for e in skipped:
        print(f"skipped: {e}")
    return jobs


def evaluate_one(args, job, scorers, device):
    """Sample (what is missing), report the sampler's health and the chosen metrics for one job."""
    t0 = time.time()
    net, info, folder, fp, settings = (job[k] for k in ("net", "info", "folder", "fp", "settings"))
    sigmas, shape = torch.tensor(settings["sigmas"], device=device), tuple(settings["shape"])
    open_folder(folder, fp, settings, info)
    made = sample(net.to(device), sigmas, folder, args.n, args.batch_size, settings["step_lr"], settings["steps_each"],
                  settings["denoise"], args.seed, device, shape, fp, ancestral=settings["sampler"].startswith("reverse"))
    net.cpu()
    *means, non_finite = health_means(folder, args.n, fp)
    grid = collect(folder, min(100, args.n), fp)
    utils.save_image_grid(os.path.join(folder, "grid.png"), grid.float() / 255, nrow=int(math.ceil(math.sqrt(len(grid)))))
    save_process(folder, settings, fp)
    if args.png:
        save_pngs(folder, args.n, fp)
    if args.nearest:
        save_nearest(folder, args, job, scorers.get("inception", (None,))[0], device)
    rows, bad = health_report(sigmas.tolist(), *means, int(np.prod(shape)))
    print_health(rows, bad, non_finite, args.n, f"{info['path']}, {settings['sampler'].split(',')[0]}, "
                 f"step_lr {settings['step_lr'] or '-':.4}, T {settings['steps_each']}")
    nfe = len(settings["sigmas"]) * settings["steps_each"] + settings["denoise"]
    metrics = dict(checkpoint=info["path"], dataset=info["dataset"], n=args.n, nfe=nfe, sampler=dict(settings, ema=info["ema"]),
                   fingerprint=fp, folder=folder, health=rows, saturating_level=bad, non_finite_samples=non_finite,
                   samples_made_now=made)
    if job.get("level_loss"):
        metrics["test_dsm_loss_per_level"] = job["level_loss"]
    if "inception" in scorers:
        inc, refs = scorers["inception"]
        mu_ref, sigma_ref, ref_label = refs[info["dataset"]]
        mu, sigma, logits = streamed_stats(inc, read_shards(folder, args.n, fp), device)
        is_mean, is_std = inception_score(logits) if shape[0] == 3 else (None, None)
        metrics.update(inception_score_mean=is_mean, inception_score_std=is_std, fid=fid(mu, sigma, mu_ref, sigma_ref),
                       fid_reference=ref_label)
        if shape[0] == 1:
            metrics["note"] = "the paper reports no Inception score or FID for MNIST; FID against " + ref_label
    if "classifier" in scorers:
        metrics["classifier"] = scorers["classifier"](torch.cat(list(read_shards(folder, args.n, fp))))
    metrics["seconds"] = round(time.time() - t0, 1)
    path = os.path.join(folder, "metrics.json")
    if os.path.exists(path):                   # the same samples: keep the scores an earlier run made of them
        with open(path) as f:
            old = json.load(f)
        if old.get("fingerprint") == fp:
            metrics = {**{k: old[k] for k in SCORES if k in old and k not in metrics}, **metrics}
    utils.save_json(metrics, path)
    return metrics


SCORES = ("inception_score_mean", "inception_score_std", "fid", "fid_reference", "note", "classifier")


def make_scorers(args, jobs, device):
    """The metrics asked for, with everything they need loaded (before any sampling)."""
    scorers = {}
    if "inception" in args.metrics:
        inc = inception(args.inception_weights, device)
        inc_digest = utils.digest(inc.state_dict())
        cache_dir = args.ref_cache or os.path.join(args.out or OUT, "ref_stats")
        refs = {d: reference_stats(args, d, inc, inc_digest, device, cache_dir)
                for d in dict.fromkeys(j["info"]["dataset"] for j in jobs)}
        scorers["inception"] = (inc, refs)
    if "classifier" in args.metrics:
        if any(j["info"]["dataset"] != "mnist" for j in jobs):
            raise utils.DataError("--metrics classifier scores MNIST digits only; drop it for other data sets")
        import mnist_classifier
        scorers["classifier"] = mnist_classifier.DigitScorer(args.data_root, device, args.classifier_cache)
    return scorers


def print_table(results):
    fmt = lambda m, s: "-" if m is None else f"{m:.2f} +- {s:.2f}"
    label = lambda r: r["checkpoint"][-38:] + (" (EMA)" if r["sampler"]["ema"] else "")
    print(f"\n{'':2}{'checkpoint / source':<46} {'step_lr':>8} {'T':>4} {'NFE':>5} {'n':>6} {'Inception score':>16} {'FID':>8}"
          f" {'digit IS':>8} {'confident':>9} {'digit FD':>8}")
    if any("fid" in r and r["dataset"] == "cifar10" for r in results):
        for name, m, s, f in [PAPER, SEED_REPORT]:
            print(f"{'':2}{name:<46} {'-':>8} {'-':>4} {'-':>5} {'-':>6} {fmt(m, s):>16} {f:>8.2f}")
    scored = [r for r in results if "fid" in r]
    best = min(scored, key=lambda r: r["fid"]) if len(scored) > 1 else None
    for r in results:
        c = r.get("classifier")
        step_lr = format(r["sampler"]["step_lr"], ".2g") if r["sampler"]["step_lr"] else "ancestr."
        print(f"{'*' if r is best else ' ':<2}{label(r):<46} {step_lr:>8} {r['sampler']['steps_each']:>4} "
              f"{r['nfe']:>5} {r['n']:>6} {fmt(r.get('inception_score_mean'), r.get('inception_score_std')):>16} "
              f"{format(r['fid'], '.2f') if 'fid' in r else '-':>8} " + (f"{c['classifier_is']:>8.2f} {c['confident_share']:>9.2f} "
              f"{c['frechet_distance']:>8.2f}" if c else f"{'-':>8} {'-':>9} {'-':>8}"))
    if best:
        print("* lowest FID")
    for ref in sorted({r["fid_reference"] for r in results if r["dataset"] == "mnist" and "fid" in r}):
        print(f"MNIST: the paper reports no Inception score or FID; FID here is against the {ref}")


def save_sweep_figure(path, results):
    """Each metric against network evaluations per sample, a line per checkpoint (and EMA choice)."""
    plt = utils.pyplot()
    keys = [k for k in ("fid", "inception_score_mean") if any(r.get(k) is not None for r in results)]
    keys += [k for k in ("classifier_is", "frechet_distance") if any("classifier" in r for r in results)]
    if not keys:
        return
    value = lambda r, k: r["classifier"][k] if k in ("classifier_is", "frechet_distance") else r.get(k)
    names = {"fid": "FID", "inception_score_mean": "Inception score", "classifier_is": "classifier Inception score (max 10)",
             "frechet_distance": "Frechet distance, classifier features"}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
    groups = {}
    for r in results:
        groups.setdefault((r["checkpoint"], r["sampler"]["ema"], r["sampler"]["sampler"].split(",")[0]), []).append(r)
    for ax, k in zip(axes[0], keys):
        for (ckpt, ema, sampler), rs in groups.items():
            rs = sorted(rs, key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in rs], [value(r, k) for r in rs], "o-" if sampler.startswith("annealed") else "s--",
                    label=f"{os.path.basename(os.path.dirname(os.path.abspath(ckpt)))}{' (EMA)' if ema else ''}"
                          f"{', ancestral' if sampler.startswith('reverse') else ''}")
        ax.set_xscale("log"), ax.set_xlabel("network evaluations per sample"), ax.set_title(names[k]), ax.grid(alpha=0.3)
    axes[0][0].legend()
    utils.save_figure(fig, path)


def main(argv=None):
    p = utils.arg_parser(__doc__)
    p.add_argument("--checkpoint", action="extend", nargs="+", required=True, help="checkpoint file(s) or glob(s)")
    p.add_argument("--n", type=utils.positive_int, default=N, help="samples per evaluation")
    p.add_argument("--batch-size", type=utils.positive_int, default=BATCH_SIZE, help="images sampled at once")
    p.add_argument("--out", default=None, help=f"output folder (default {OUT}/<checkpoint name>)")
    p.add_argument("--device", type=utils.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=SEED, help="image i uses a generator seeded by (seed, i)")
    p.add_argument("--metrics", nargs="+", choices=["inception", "classifier", "none"], default=["inception"],
                   help="inception: IS and FID (the paper's); classifier: mnist_classifier.py's digit scores; none")
    p.add_argument("--ref", default=None, help="FID reference: a folder of images or a stats .npz (default: the training set)")
    p.add_argument("--ref-cache", default=None, help="folder of cached reference statistics (default: <--out or runs/eval>/ref_stats)")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights file (default: download)")
    p.add_argument("--classifier-cache", default="runs/mnist_classifier", help="folder of the MNIST classifier's weights")
    p.add_argument("--data-root", default=utils.DATA_ROOT, help="torchvision data folder")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="EMA weights (default: if the checkpoint has them)")
    p.add_argument("--step-lr", type=lambda t: t if t == "auto" else utils.positive_float(t), nargs="+", default=None,
                   help="step_lr value(s); auto: technique 4's for T (default: the checkpoint's recipe's)")
    p.add_argument("--steps-each", type=utils.positive_int, nargs="+", default=None,
                   help="steps per noise level, T (default: the checkpoint's recipe's)")
    p.add_argument("--nfe", type=utils.positive_int, nargs="+", default=None,
                   help="network evaluations per sample instead of --steps-each: T = (NFE - denoise) // L")
    p.add_argument("--sampler", nargs="+", choices=["als", "ancestral", "auto"], default=["als"],
                   help="annealed Langevin dynamics (the paper's), and/or ancestral sampling (common.reverse_diffusion: "
                        "one network evaluation per level, --nfe levels for a scale-conditioned network); auto: "
                        "ancestral for a scale-conditioned network, Langevin for the paper's")
    p.add_argument("--existing", action="store_true",
                   help="score only the settings whose samples are all made; skip the others with a line (a sweep "
                        "figure of what exists, without sampling)")
    p.add_argument("--png", action="store_true", help="also write every sample as png/<i>.png")
    p.add_argument("--level-loss", type=utils.positive_int, default=None, metavar="N",
                   help="also the test DSM loss of about 20 training levels on N held-out images (the network's "
                        "fit per level, apart from the sampler)")
    p.add_argument("--nearest", type=utils.positive_int, default=None,
                   help="nearest.png: the K nearest training images of 10 samples (pixels; Inception features too)")
    p.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=None,
                   help="end with x + sigma_L^2 s(x, L) (default: the checkpoint's recipe's)")
    args = p.parse_args(argv)
    device = utils.get_device(args.device)
    args.metrics = [] if "none" in args.metrics else args.metrics
    if args.nfe and args.steps_each:
        p.error("--nfe and --steps-each both set T; give one")
    if args.ref and args.ref.endswith(".npz"):
        try:
            read_stats(args.ref)                                  # a bad file stops us before any work
        except utils.DataError as err:
            p.error(str(err))
    for flag, path in [("--out", args.out or OUT), ("--ref-cache", args.ref_cache)]:
        if path and (problem := utils.check_out(path, flag)):
            p.error(problem)
    ckpts = []
    for pattern in args.checkpoint:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            p.error(f"--checkpoint {pattern}: no file matches")
        ckpts += [c for c in found if c not in ckpts]
    try:
        jobs = plan(args, ckpts)
        if args.existing:
            jobs = existing_only(jobs, args.n)
        scorers = make_scorers(args, jobs, device)              # every reference ready before any sampling
        if args.level_loss:
            add_level_losses(jobs, args, device)
        results = [evaluate_one(args, j, scorers, device) for j in jobs]
    except (common.CheckpointError, utils.DataError) as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        raise SystemExit(f"error: {e.filename or ''}: {e.strerror or e}; samples written before are kept") from None
    except KeyboardInterrupt:
        print("\ninterrupted: the shards written so far are kept; the same command continues from them", file=sys.stderr)
        raise SystemExit(130) from None
    except RuntimeError as e:
        if not utils.is_out_of_memory(e):
            raise
        raise SystemExit(f"error: out of memory ({utils.first_line(e)[:80]}); use a smaller --batch-size") from None
    print_table(results)
    if len(results) > 1:
        save_sweep_figure(os.path.join(args.out or OUT, "sweep.png"), results)
    return results


if __name__ == "__main__":
    main()
