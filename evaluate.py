"""The table of Fig. 6: Inception score and FID of annealed Langevin samples (CIFAR-10).

    python evaluate.py --checkpoint runs/cifar10/checkpoint.pt --n 5000
    python evaluate.py --checkpoint run/logs/cifar10/checkpoint.pth                 # an official checkpoint
    python evaluate.py --checkpoint 'runs/cifar10/checkpoint_*.pt' --step-lr 2e-5 1e-5 --n 1000   # appendix B.2
    python evaluate.py ... --inception-weights weights-inception-2015-12-05-6726825d.pth --ref ref.npz   # offline

Samples come from common.annealed_langevin_dynamics (the paper's 10 levels, 100 steps each,
step_lr 2e-5, uniform start). Image i is drawn with its own generator seeded by (--seed, i), so
samples do not depend on the batch size. They are written in shards as they are made, in a
folder named after a fingerprint of what makes them (the weights used, the sampler settings,
the seed, the image shape): a rerun of the same evaluation makes only the missing ones, and
samples of other weights or settings are never counted. Metrics use torch-fidelity's port of
the TensorFlow Inception network the paper used (OpenAI's Inception score, 10 splits; TTUR's
FID) against statistics of the training set, cached under a key of the images' content and
the Inception weights. Writes per checkpoint and sampler setting: samples.json (the
fingerprint), shards, grid.png (first 100 samples), metrics.json (with a per-level sampler
health report).
"""
import argparse
import glob
import hashlib
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
            raise common.CheckpointError(f"{weights}: not torch-fidelity Inception weights ({common.first_line(e)[:100]})")
        raise common.DataError(f"could not download the Inception weights ({common.first_line(e)[:80]}); pass "
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


def fid(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (TTUR's), via torch-fidelity."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    return fid_statistics_to_metric(dict(mu=mu1, sigma=sigma1), dict(mu=mu2, sigma=sigma2), False)["frechet_inception_distance"]

#----------------------------------------------------------------------------
# Reference statistics, cached under a key of what they were computed from.

def digest(*parts):
    """SHA-256 (hex) of tensors (dtype, shape and bytes), state dicts, strings and numbers."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict):
            h.update(digest(*[x for k, v in part.items() for x in (k, v)]).encode())
        elif torch.is_tensor(part):
            t = part.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(part.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def read_stats(path):
    """(mu, sigma) of a statistics .npz, refused in one line unless both are finite 2048-feature arrays."""
    try:
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise common.DataError(f"--ref {path}: needs arrays 'mu' and 'sigma' (as written by an earlier run)")
            mu, sigma = f["mu"], f["sigma"]
    except common.DataError:
        raise
    except Exception as e:      # zipfile, pickle and OS errors by cause
        raise common.DataError(f"--ref {path}: not a readable .npz of statistics ({common.first_line(e)[:80]})") from None
    if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
        raise common.DataError(f"--ref {path}: mu has shape {mu.shape} and sigma {sigma.shape}; Inception statistics "
                               f"are ({FEATURES},) and ({FEATURES}, {FEATURES})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise common.DataError(f"--ref {path}: mu or sigma holds NaN or infinite values")
    return mu, sigma


def reference_stats(args, dataset, net, net_digest, device, cache_dir):
    """(mu, sigma, label) of --ref: a stats .npz, a folder of images, or the data set's training
    set. Computed statistics are cached in cache_dir under a key of the images' bytes, the
    Inception weights and the feature path (resize and channel handling), so that other images
    or weights never reuse them."""
    spec = common.DATASETS[dataset]
    if args.ref and args.ref.endswith(".npz"):
        return (*read_stats(args.ref), f"statistics {args.ref}")
    if args.ref:
        images, label = common.load_image_folder(args.ref, spec["channels"], spec["image_size"], flag="--ref"), f"folder {args.ref}"
    else:
        images = common.load_images(dataset, True, args.data_root, folder_flag="--ref")
        label = f"{dataset} training set" + (", digits repeated to 3 channels" if spec["channels"] == 1 else "")
    import torch_fidelity
    path = f"inception-v3-compat 299 bilinear, torch-fidelity {torch_fidelity.__version__}, channels {spec['channels']}->3"
    key = digest(images, net_digest, path)[:16]
    cache = os.path.join(cache_dir, f"{'folder' if args.ref else dataset}_{len(images)}_{key}.npz")
    if os.path.exists(cache):
        print(f"reference statistics of the {label}: {cache} (cached; key of images, weights and feature path)")
        mu, sigma = read_stats(cache)
        return mu, sigma, label
    print(f"reference statistics of the {label}: {len(images)} images, computed once")
    mu, sigma, _ = streamed_stats(net, [images[i:i + 1000] for i in range(0, len(images), 1000)], device)
    with common.atomic_path(cache) as tmp:
        np.savez(tmp, mu=mu, sigma=sigma)
    print(f"saved them as {cache} (reused while the images and weights are the same)")
    return mu, sigma, label

#----------------------------------------------------------------------------
# Samples: in a folder keyed by a fingerprint, in shards, resumable, with a health report.

class StaleSamples(common.DataError):
    """A folder or shard holding samples of other weights or settings."""


def fingerprint(net, settings):
    """The key of a set of samples: the weights actually used and every sampler setting."""
    return digest(net.state_dict(), json.dumps(settings, sort_keys=True))


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
    common.save_json(dict(fingerprint=fp, settings=settings, checkpoint=info["path"], ema=info["ema"], step=info["step"]), meta)


def _generators(seed, start, end, device):
    """Image i's own generator, seeded by (seed, i): samples do not depend on the batch size."""
    return [torch.Generator(device=device).manual_seed(common.stable_seed(seed, i)) for i in range(start, end)]


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


def sample(net, sigmas, folder, n, batch_size, step_lr, steps_each, denoise, seed, device, shape, fp=""):
    """Make the images of [0, n) that no shard holds yet; each batch becomes shard_<start>_<end>.npz,
    stamped with the fingerprint fp."""
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
        gens = _generators(seed, start, end, device)
        x0 = torch.stack([torch.rand(shape, generator=g, device=device) for g in gens])
        randn_like = lambda t: torch.stack([torch.randn(t.shape[1:], generator=g, device=device) for g in gens])
        norm_sum, out_sum, far_sum = (torch.zeros(L, device=device) for _ in range(3))
        def health(level, step, x, score):     # at the end of each level, no host sync
            if step == steps_each - 1:
                m = 3 * float(sigmas[level])   # a sample of level i is data + N(0, sigma_i^2): beyond 3 sigma_i is off
                norm_sum[level] += score.flatten(1).norm(dim=1).sum()
                out_sum[level] += ((x < 0) | (x > 1)).float().mean(dim=(1, 2, 3)).sum()
                far_sum[level] += ((x < -m) | (x > 1 + m)).float().mean(dim=(1, 2, 3)).sum()
        x, _ = common.annealed_langevin_dynamics(net, x0, sigmas, steps_each, step_lr, denoise=denoise,
                                                 keep_levels=False, callback=health, randn_like=randn_like)
        non_finite = (~torch.isfinite(x)).flatten(1).any(1).sum()
        images = (torch.nan_to_num(x, nan=0.0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
        path = os.path.join(folder, f"shard_{start:07d}_{end:07d}.npz")
        with common.atomic_path(path) as tmp:
            np.savez(tmp, images=images, score_norm_sum=norm_sum.cpu().numpy(), out_of_range_sum=out_sum.cpu().numpy(),
                     far_out_sum=far_sum.cpu().numpy(), non_finite=non_finite.cpu().numpy(), fingerprint=np.array(fp))
        bar.update(end - start)
    bar.close()
    return len(missing)


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


def print_health(rows, bad, non_finite, n, title):
    print(f"sampler health ({title}), at the end of each level:")
    print(f"  {'level':>5} {'sigma':>8} {'mean |s|':>10} {'sigma|s|/sqrt(D)':>16} {'outside [0,1]':>14} {'> 3 sigma out':>14}")
    for r in rows:
        print(f"  {r['level']:>5} {r['sigma']:8.4f} {r['mean_score_norm']:10.4g} {r['sigma_times_norm_over_sqrt_d']:16.3f} "
              f"{r['share_outside_01']:14.2%} {r['share_beyond_3_sigma']:14.2%}")
    if bad:
        r = rows[bad - 1]
        print(f"WARNING: samples saturate from level {bad} (sigma {r['sigma']:.4g}) on: {r['share_beyond_3_sigma']:.1%} of pixels "
              f"lie more than 3 sigma outside [0, 1] at its end; try a smaller --step-lr")
    if non_finite:
        print(f"WARNING: {non_finite} of {n} samples became NaN or infinite (stored as black where NaN); try a smaller --step-lr")

#----------------------------------------------------------------------------

def evaluate_one(args, job, ref, inc, device):
    """Sample (what is missing), report the sampler's health, IS and FID for one checkpoint and step_lr."""
    t0 = time.time()
    net, info, step_lr, folder, fp, settings = (job[k] for k in ("net", "info", "step_lr", "folder", "fp", "settings"))
    spec = common.DATASETS[info["dataset"]]
    sigmas = torch.tensor(settings["sigmas"], device=device)
    shape = tuple(settings["shape"])
    open_folder(folder, fp, settings, info)
    made = sample(net.to(device), sigmas, folder, args.n, args.batch_size, step_lr, args.steps_each, args.denoise,
                  args.seed, device, shape, fp)
    net.cpu()
    *means, non_finite = health_means(folder, args.n, fp)
    common.save_image_grid(os.path.join(folder, "grid.png"), collect(folder, min(100, args.n), fp).float() / 255, nrow=10)
    rows, bad = health_report(sigmas.tolist(), *means, int(np.prod(shape)))
    print_health(rows, bad, non_finite, args.n, f"{info['path']}, step_lr {step_lr:g}")
    mu, sigma, logits = streamed_stats(inc, read_shards(folder, args.n, fp), device)
    assert len(logits) == args.n
    is_mean, is_std = inception_score(logits) if spec["channels"] == 3 else (None, None)
    mu_ref, sigma_ref, ref_label = ref
    metrics = dict(checkpoint=info["path"], dataset=info["dataset"], n=args.n, inception_score_mean=is_mean,
                   inception_score_std=is_std, fid=fid(mu, sigma, mu_ref, sigma_ref), fid_reference=ref_label,
                   sampler=dict(settings, ema=info["ema"]), fingerprint=fp, folder=folder, health=rows,
                   saturating_level=bad, non_finite_samples=non_finite, samples_made_now=made,
                   seconds=round(time.time() - t0, 1))
    if spec["channels"] == 1:
        metrics["note"] = "the paper reports no Inception score or FID for MNIST; FID against " + ref_label
    common.save_json(metrics, os.path.join(folder, "metrics.json"))
    return metrics


def plan(args, ckpts):
    """Load every checkpoint (on the CPU) and name each evaluation's folder, before any work."""
    jobs = []
    for ckpt in ckpts:
        net, info = common.load_score_net(ckpt, ema=args.ema)
        if "sigma_begin" not in info:
            raise common.CheckpointError(f"{ckpt}: no noise levels stored (config sigma_begin, sigma_end, num_levels)")
        info.setdefault("dataset", "mnist" if info["model_args"]["in_channels"] == 1 else "cifar10")
        spec = common.DATASETS[info["dataset"]]
        sigmas = common.geometric_sigmas(info["sigma_begin"], info["sigma_end"], info["num_levels"]).tolist()
        name = f"{os.path.basename(os.path.dirname(os.path.abspath(ckpt)))}_{os.path.splitext(os.path.basename(ckpt))[0]}"
        base = args.out if (args.out and len(ckpts) == 1) else os.path.join(args.out or OUT, name)
        for step_lr in args.step_lr:
            settings = dict(sampler="annealed_langevin_dynamics, uniform start", sigmas=sigmas, step_lr=step_lr,
                            steps_each=args.steps_each, denoise=args.denoise, seed=args.seed,
                            shape=[spec["channels"], spec["image_size"], spec["image_size"]])
            fp = fingerprint(net, settings)
            tag = f"steplr{step_lr:g}_T{args.steps_each}{'_denoise' if args.denoise else ''}_seed{args.seed}_{fp[:10]}"
            jobs.append(dict(net=net, info=info, step_lr=step_lr, folder=os.path.join(base, tag), fp=fp, settings=settings))
    return jobs


def print_table(results):
    fmt = lambda m, s: "-" if m is None else f"{m:.2f} +- {s:.2f}"
    best = min(results, key=lambda r: r["fid"])
    print(f"\n{'':2}{'checkpoint / source':<44} {'step_lr':>8} {'n':>6} {'Inception score':>16} {'FID':>8}")
    for label, m, s, f in [PAPER, SEED_REPORT]:
        print(f"{'':2}{label:<44} {'-':>8} {'-':>6} {fmt(m, s):>16} {f:>8.2f}")
    for r in results:
        mark = "*" if (r is best and len(results) > 1) else " "
        print(f"{mark:<2}{r['checkpoint'][-44:]:<44} {r['sampler']['step_lr']:>8.2g} {r['n']:>6} "
              f"{fmt(r['inception_score_mean'], r['inception_score_std']):>16} {r['fid']:>8.2f}")
    if len(results) > 1:
        print("* lowest FID")
    for ref in sorted({r["fid_reference"] for r in results if r["dataset"] == "mnist"}):
        print(f"MNIST: the paper reports no Inception score or FID; FID here is against the {ref}")


def main(argv=None):
    p = common.arg_parser(__doc__)
    p.add_argument("--checkpoint", action="extend", nargs="+", required=True, help="checkpoint file(s) or glob(s)")
    p.add_argument("--n", type=common.positive_int, default=N, help="samples per evaluation")
    p.add_argument("--batch-size", type=common.positive_int, default=BATCH_SIZE, help="images sampled at once")
    p.add_argument("--out", default=None, help=f"output folder (default {OUT}/<checkpoint name>)")
    p.add_argument("--device", type=common.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=SEED, help="image i uses a generator seeded by (seed, i)")
    p.add_argument("--ref", default=None, help="FID reference: a folder of images or a stats .npz (default: the training set)")
    p.add_argument("--ref-cache", default=None, help="folder of cached reference statistics (default: <--out or runs/eval>/ref_stats)")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights file (default: download)")
    p.add_argument("--data-root", default=common.DATA_ROOT, help="torchvision data folder")
    p.add_argument("--denoise", action="store_true", help="end with x + sigma_L^2 s(x, L)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="EMA weights (default: if the checkpoint has them)")
    p.add_argument("--step-lr", type=common.positive_float, nargs="+", default=[common.STEP_LR], help="step_lr value(s)")
    p.add_argument("--steps-each", type=common.positive_int, default=common.STEPS_EACH, help="steps per noise level")
    args = p.parse_args(argv)
    device = common.get_device(args.device)
    if args.ref and args.ref.endswith(".npz"):
        try:
            read_stats(args.ref)                                  # a bad file stops us before any work
        except common.DataError as err:
            p.error(str(err))
    for flag, path in [("--out", args.out or OUT), ("--ref-cache", args.ref_cache)]:
        if path and (problem := common.check_out(path, flag)):
            p.error(problem)
    ckpts = []
    for pattern in args.checkpoint:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            p.error(f"--checkpoint {pattern}: no file matches")
        ckpts += [c for c in found if c not in ckpts]
    try:
        jobs = plan(args, ckpts)
        inc = inception(args.inception_weights, device)
        inc_digest = digest(inc.state_dict())
        cache_dir = args.ref_cache or os.path.join(args.out or OUT, "ref_stats")
        refs = {d: reference_stats(args, d, inc, inc_digest, device, cache_dir)       # before any sampling
                for d in dict.fromkeys(j["info"]["dataset"] for j in jobs)}
        results = [evaluate_one(args, j, refs[j["info"]["dataset"]], inc, device) for j in jobs]
    except (common.CheckpointError, common.DataError) as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        raise SystemExit(f"error: {e.filename or ''}: {e.strerror or e}; samples written before are kept") from None
    except KeyboardInterrupt:
        print("\ninterrupted: the shards written so far are kept; the same command continues from them", file=sys.stderr)
        raise SystemExit(130) from None
    except RuntimeError as e:
        if not common.is_out_of_memory(e):
            raise
        raise SystemExit(f"error: out of memory ({common.first_line(e)[:80]}); use a smaller --batch-size") from None
    print_table(results)
    return results


if __name__ == "__main__":
    main()
