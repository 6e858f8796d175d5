"""Exact likelihoods of held-out images in bits per dimension, through the probability-flow ODE of the VE
process (Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 13 and appendix D.2; their
likelihood.py): any network that takes any sigma (--recipe ncsnv2, --recipe edm, NCSN++).

    python likelihood.py --checkpoint runs/edm/checkpoint.pt --n 500 --data-root .mnist
    python likelihood.py --checkpoint C --solver heun --steps 16 32 64          # fixed-step Heun at 3 budgets
    python likelihood.py --checkpoint C --estimator exact --n 4                 # exact divergence (small images)
    torchrun --nproc_per_node 8 likelihood.py --checkpoint C --n-images 10000   # the batches split across GPUs

With sigma as the time variable the ODE is dx/dsigma = f(x, sigma) = -sigma s(x, sigma), and along it
d log p_sigma(x(sigma)) / dsigma = -div f, so from a (dequantised) image x(sigma_min) = x:
    log p_{sigma_min}(x) = log p_{sigma_max}(x(sigma_max)) + int_{sigma_min}^{sigma_max} div f(x(sigma), sigma) dsigma.
The divergence is exact (one backward pass per dimension) or the Hutchinson-Skilling estimate E_v[v^T (df/dx) v]
with --vectors K Rademacher or Gaussian vectors per image, fixed along its path (seeded by (--seed, i, draw)).
p_{sigma_max} is the data convolved with N(0, sigma_max^2 I); it is replaced by the Gaussian of the same first two
moments, N(m, (sigma_max^2 + s^2) I) with the data's mean m and standard deviation s where the recipe stored them
(EDM's data_mean and sigma_data), else m = 0.5 and s = 0: the error is of order s^2 / sigma_max^2 per dimension.
Results are written per batch in resumable shards keyed by a fingerprint (weights, images, settings), then
likelihood.json: the mean bits/dim with its standard error, the network evaluations and seconds per image.
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import argparse
import json
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import data
import sample
import samplers
import utils

#----------------------------------------------------------------------------
# Defaults.

OUT = "runs/likelihood"      # <OUT>/<checkpoint name>/<solver setting>_<fingerprint>/
N = 500                      # held-out images (the first ones of the test split)
BATCH_SIZE = 100
SOLVER = "rk45"              # rk45 (scipy's adaptive solver, as score_sde) or heun (fixed steps)
RTOL = ATOL = 1e-5           # rk45's tolerances (score_sde's)
STEPS = 32                   # heun's steps on EDM's rho = 7 schedule, run upwards: 2 network evaluations each
ESTIMATOR = "rademacher"     # the divergence: rademacher or gaussian (Hutchinson-Skilling), or exact
VECTORS = 1                  # Hutchinson vectors per image (score_sde: 1)
DRAWS = 1                    # dequantisation draws per image (their mean is reported)
SEED = 0

#----------------------------------------------------------------------------
# The probability-flow ODE, its divergence, two solvers.

def drift_and_divergence(model, x, sigma, vectors=None):
    """f = -sigma s(x, sigma), the VE probability-flow ODE dx/dsigma (g^2 = d sigma^2 / d sigma = 2 sigma in eq. 13),
    and div f per image: exact (vectors None: one backward pass per dimension, for small dimensions) or
    Hutchinson-Skilling, the mean of v^T (df/dx) v over `vectors` (K, *x.shape): unbiased for E[v v^T] = I."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = -sigma * model(x, x.new_full((len(x),), sigma))
        if vectors is None:
            flat, div = f.flatten(1), x.new_zeros(len(x))
            for d in range(flat.shape[1]):
                div = div + torch.autograd.grad(flat[:, d].sum(), x, retain_graph=True)[0].flatten(1)[:, d]
        else:
            div = x.new_zeros(len(x))
            for k, v in enumerate(vectors):
                vjp = torch.autograd.grad(f, x, v, retain_graph=k + 1 < len(vectors))[0]
                div = div + (vjp * v).flatten(1).sum(1) / len(vectors)
    return f.detach(), div.detach()


def heun_ode(field, x, sigmas):
    """Heun's method (trapezoidal, 2 evaluations a step) for dx/dsigma = f and d(delta)/dsigma = div f along the
    increasing `sigmas`: (x at the last sigma, the integral of div f per image, network evaluations)."""
    delta, nfe = x.new_zeros(len(x), dtype=torch.float64), 0
    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        f0, d0 = field(x, s0)
        f1, d1 = field(x + (s1 - s0) * f0, s1)
        x = x + (s1 - s0) / 2 * (f0 + f1)
        delta, nfe = delta + (s1 - s0) / 2 * (d0 + d1).double(), nfe + 2
    return x, delta, nfe


def rk45_ode(field, x, sigma_min, sigma_max, rtol=RTOL, atol=ATOL):
    """scipy's RK45 on the batch's [x, delta] (float64), as score_sde's likelihood.py: one step size for the batch.
    Returns (x(sigma_max), the integral of div f per image, network evaluations)."""
    from scipy.integrate import solve_ivp
    n, shape = len(x), x.shape
    def ode(sigma, y):
        f, d = field(torch.from_numpy(y[:-n]).to(x).reshape(shape), float(sigma))
        out = np.concatenate([f.double().cpu().numpy().ravel(), d.double().cpu().numpy()])
        if not np.isfinite(out).all():              # scipy would shrink its step for ever on NaN
            raise utils.UserError(f"the ODE's field is not finite at sigma {sigma:.4g} (a network that diverges "
                                  "there?); nothing is written for these images")
        return out
    y0 = np.concatenate([x.double().cpu().numpy().ravel(), np.zeros(n)])
    sol = solve_ivp(ode, (sigma_min, sigma_max), y0, rtol=rtol, atol=atol, method="RK45", t_eval=[sigma_max])
    if not sol.success:
        raise utils.UserError(f"RK45 did not reach sigma_max ({sol.message}); loosen --rtol / --atol or use --solver "
                              "heun")
    y = torch.from_numpy(sol.y[:, -1])
    return y[:-n].to(x).reshape(shape), y[-n:].to(x.device), sol.nfev


def gaussian_log_density(x, mean, var):
    """log N(x; mean, var I) per image (N, ...) in nats."""
    d = x[0].numel()
    return -0.5 * d * math.log(2 * math.pi * var) - ((x.double() - mean) ** 2).flatten(1).sum(1) / (2 * var)


def log_likelihood(model, x, sigma_min, sigma_max, log_prior, solver=SOLVER, vectors=None, rtol=RTOL, atol=ATOL,
                   steps=STEPS):
    """log p_{sigma_min}(x) per image (nats) under model(x, sigma) -> score: the ODE from sigma_min up to sigma_max
    (module docstring), log_prior(x(sigma_max)) its end's density. Returns (log p, network evaluations)."""
    field = lambda y, s: drift_and_divergence(model, y, s, vectors)
    if solver == "rk45":
        end, delta, nfe = rk45_ode(field, x, sigma_min, sigma_max, rtol, atol)
    else:
        up = samplers.karras_sigmas(steps + 1, sigma_min, sigma_max)[:-1].double().flip(0).tolist()
        end, delta, nfe = heun_ode(field, x, up)
    return log_prior(end) + delta, nfe


def bits_per_dim(log_p, dims):
    """Bits per dimension of 8-bit data from log p(x) (nats) of its uniform dequantisation x = (x_uint8 + u) / 256,
    u ~ U[0, 1)^D, in [0, 1]^D: log P(x_uint8) >= E_u[log p(x)] - D ln 256 (Theis et al. 2016), so
        bits/dim = -(log p(x) - D ln 256) / (D ln 2) = 8 - log p(x) / (D ln 2)."""
    return -(log_p - dims * math.log(256)) / (dims * math.log(2))

#----------------------------------------------------------------------------
# Held-out images in resumable shards (sample.py's: fingerprinted, made where missing, split across processes).

def settings_of(args, ck):
    """The record the fingerprint hashes: the solver, the estimator, the levels, the prior and the seeds."""
    mean = ck.data_mean if math.isfinite(ck.data_mean) else 0.5
    spread = ck.sigma_data if math.isfinite(ck.sigma_data) else 0.0
    sigma_min, sigma_max = args.sigma_min or ck.sigma_end, args.sigma_max or ck.sigma_begin
    return dict(solver=args.solver, steps=args.steps if args.solver == "heun" else None,
                rtol=args.rtol if args.solver == "rk45" else None, atol=args.atol if args.solver == "rk45" else None,
                estimator=args.estimator, vectors=args.vectors if args.estimator != "exact" else None,
                draws=args.draws, seed=args.seed, sigma_min=float(sigma_min), sigma_max=float(sigma_max),
                prior_mean=float(mean), prior_var=float(sigma_max ** 2 + spread ** 2),
                batch_size=args.batch_size if args.solver == "rk45" else None)     # rk45's steps are the batch's


def shard_values(ck, images, start, s, device):
    """Per image of a batch (images [start, start + B)): bits/dim (the mean over the dequantisation draws) and the
    network evaluations spent on it."""
    dims, bpd, nfe = images[0].numel(), 0.0, 0
    prior = lambda y: gaussian_log_density(y, s["prior_mean"], s["prior_var"])
    for draw in range(s["draws"]):
        noise = utils.SampleNoise([(s["seed"], i, draw) for i in range(start, start + len(images))], device)
        x = (images.to(device).float() + noise.rand(*images.shape[1:])) / 256          # uniform dequantisation
        vectors = None
        if s["estimator"] == "gaussian":
            vectors = torch.stack([noise.randn_like(x) for _ in range(s["vectors"])])
        elif s["estimator"] == "rademacher":
            vectors = torch.stack([(noise.rand(*x.shape[1:]) < 0.5).float() * 2 - 1 for _ in range(s["vectors"])])
        log_p, n = log_likelihood(ck.model, x, s["sigma_min"], s["sigma_max"], prior, s["solver"], vectors, s["rtol"],
                                  s["atol"], s["steps"])
        bpd, nfe = bpd + bits_per_dim(log_p, dims).cpu() / s["draws"], nfe + n
    if not torch.isfinite(bpd).all():
        raise utils.UserError(f"images {start}-{start + len(images) - 1}: the log-likelihood is not finite (the ODE "
                              f"left the numbers between sigma {s['sigma_min']:g} and {s['sigma_max']:g}: a smaller "
                              "--sigma-max, or a trained network); nothing is written for them")
    return bpd, nfe


def run_shards(ck, images, s, folder, fp, args, device, rank, world, spans):
    """Every missing batch of [0, n) (rank r of `world`: every world-th) into shard_<start>_<end>.npz."""
    made, runs = sample.missing_runs(folder, [(0, len(images))], args.batch_size, fp, verify=False, spans=spans)
    bar = tqdm(total=len(images), initial=len(images) - made, desc="likelihood", unit="img", dynamic_ncols=True,
               disable=rank > 0)
    model = ck.model.to(device)
    for start, end in list(runs)[rank::world]:
        t0 = time.time()
        bpd, nfe = shard_values(ck, images[start:end], start, s, device)
        seconds = (time.time() - t0) / (end - start)
        with utils.atomic_path(os.path.join(folder, f"shard_{start:07d}_{end:07d}.npz")) as tmp:
            np.savez(tmp, bits_per_dim=bpd.numpy(), nfe=np.full(end - start, nfe),
                     seconds=np.full(end - start, seconds), fingerprint=np.array(fp))
        bar.update(min((end - start) * world, bar.total - bar.n))
    bar.close()
    model.cpu()
    return made


def summary(folder, n, fp):
    """Mean bits/dim, its standard error, NFE and seconds per image over the shards of [0, n)."""
    values = {k: [] for k in ("bits_per_dim", "nfe", "seconds")}
    for a, b, path, first in sample.covering(folder, n, fp):
        with np.load(path) as f:
            for k in values:
                values[k].append(f[k][first:first + b - a])
    v = {k: np.concatenate(x) for k, x in values.items()}
    if len(v["bits_per_dim"]) != n:
        raise utils.UserError(f"{folder} holds {len(v['bits_per_dim'])} of the {n} images; run the same command again")
    return dict(n=n, bits_per_dim=float(v["bits_per_dim"].mean()),
                bits_per_dim_se=float(v["bits_per_dim"].std(ddof=1) / math.sqrt(n)) if n > 1 else None,
                nfe_per_image=float(v["nfe"].mean()), seconds_per_image=float(v["seconds"].mean()))

#----------------------------------------------------------------------------
# The command line.

def check(p, args, ck):
    """Refuse, in one line, a network that cannot give the score at every sigma of the ODE, or levels it lacks."""
    if not ck.any_sigma:
        p.error(f"{ck.path}: this network knows only its {len(ck.sigmas)} trained noise levels (the paper's recipe), "
                "and the probability-flow ODE needs its score at every sigma between them: use a checkpoint of "
                "--recipe ncsnv2 or --recipe edm")
    lo, hi = args.sigma_min or ck.sigma_end, args.sigma_max or ck.sigma_begin
    if not hi > lo:
        p.error(f"--sigma-min {lo:g} must be below --sigma-max {hi:g}")


def setting(args, ck, images):
    """(settings, fingerprint, folder) of one solver setting (args.steps one value)."""
    s = settings_of(args, ck)
    fp = utils.digest(ck.model.net.state_dict(), images, json.dumps(s, sort_keys=True))
    tag = f"{s['solver']}" + (f"_steps{s['steps']}" if s["steps"] else f"_rtol{s['rtol']:g}")
    return s, fp, os.path.join(args.out or os.path.join(OUT, utils.checkpoint_name(ck.path)),
                               f"{tag}_{s['estimator']}_seed{s['seed']}_{fp[:10]}")


def one_setting(args, ck, images, device, rank, world, s, fp, folder):
    """The shards, summary and likelihood.json of one solver setting (args.steps one value; s, fp, folder: its
    setting())."""
    def prepare():
        meta = os.path.join(folder, "settings.json")
        if not os.path.exists(meta):
            utils.save_json(dict(fingerprint=fp, settings=s, checkpoint=ck.path), meta)
        sample.shards(folder, fp, verify=True)                  # set damaged shards aside before any plan
    def finish(made):
        result = dict(checkpoint=ck.path, dataset=ck.dataset, recipe=ck.recipe, settings=s, folder=folder,
                      images_scored_now=made, **summary(folder, len(images), fp))
        utils.save_json(result, os.path.join(folder, "likelihood.json"))
        return result
    return utils.shared_folder(folder, rank, world, device, prepare, lambda: list(sample.shards(folder, fp)),
                               lambda spans: run_shards(ck, images, s, folder, fp, args, device, rank, world, spans),
                               finish)


@utils.command()
def main(argv=None):
    p = utils.arg_parser(__doc__)
    p.add_argument("--checkpoint", help="a checkpoint of a network that takes any sigma (default: the newest "
                                        f"training run's under {checkpoints.RUNS}/)")
    p.add_argument("--data-root", default=data.DATA_ROOT, help="torchvision data folder")
    p.add_argument("--dataset-path", help="a folder of images instead (its held-out every 20th)")
    p.add_argument("--n", "--n-images", dest="n", type=utils.positive_int, default=N,
                   help="held-out images (the first of the test split); under torchrun write --n-images (torchrun "
                        "takes --n for an abbreviation of its own flags)")
    p.add_argument("--batch-size", type=utils.positive_int, default=BATCH_SIZE, help="images integrated at once")
    p.add_argument("--seed", type=utils.seed, default=SEED, help="image i, draw k: seeded by (seed, i, k)")
    p.add_argument("--solver", choices=["rk45", "heun"], default=SOLVER, help="rk45 (adaptive, scipy) or heun")
    p.add_argument("--rtol", type=utils.positive_float, default=RTOL, help="rk45: relative tolerance")
    p.add_argument("--atol", type=utils.positive_float, default=ATOL, help="rk45: absolute tolerance")
    p.add_argument("--steps", type=utils.positive_int, nargs="+", default=None,
                   help=f"heun: steps (2 network evaluations each; default {STEPS}); several: one result each")
    p.add_argument("--estimator", choices=["rademacher", "gaussian", "exact"], default=ESTIMATOR,
                   help="the divergence: Hutchinson-Skilling with Rademacher or Gaussian vectors, or exact")
    p.add_argument("--vectors", type=utils.positive_int, default=VECTORS, help="Hutchinson vectors per image")
    p.add_argument("--draws", type=utils.positive_int, default=DRAWS, help="dequantisation draws per image")
    p.add_argument("--sigma-min", type=utils.positive_float, help="the ODE's start (default: the checkpoint's sigma_L)")
    p.add_argument("--sigma-max", type=utils.positive_float, help="its end (default: the checkpoint's sigma_1)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, help="EMA weights (default: if present)")
    p.add_argument("--out", help=f"output folder (default {OUT}/<checkpoint name>)")
    p.add_argument("--device", type=utils.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if args.out and (problem := utils.check_out(args.out)):
        p.error(problem)
    if args.steps and args.solver == "rk45":
        p.error("--steps is --solver heun's; rk45 chooses its own steps (--rtol, --atol)")
    args.steps = args.steps or [STEPS]
    utils.quiet_other_ranks()
    args.checkpoint = sample.default_checkpoint(p) if args.checkpoint is None else args.checkpoint
    ck = checkpoints.load(args.checkpoint, ema=args.ema)
    check(p, args, ck)
    rank, world, device = utils.dist_init(args.device)
    load = lambda: data.load_images(ck.dataset, False, args.data_root, args.dataset_path, folder_flag="--dataset-path")
    images = utils.collective(load, rank, world, device)               # rank 0 first: it downloads what is missing
    images = (load() if rank else images)[:args.n]
    if len(images) < args.n:
        print(f"{len(images)} held-out images (of --n {args.n}): all of them")
    each = [argparse.Namespace(**{**vars(args), "steps": steps}) for steps in args.steps]
    plans = [setting(a, ck, images) for a in each]
    for problem in (utils.name_problem(folder, "the output folder") for _, _, folder in plans):
        if problem:
            raise utils.UserError(problem)                  # before any setting's work
    results = [one_setting(a, ck, images, device, rank, world, *plan) for a, plan in zip(each, plans)]
    if rank == 0:
        for r in results:
            se = f" +- {r['bits_per_dim_se']:.4f}" if r["bits_per_dim_se"] is not None else ""
            print(f"{r['checkpoint']}: {r['bits_per_dim']:.4f}{se} bits/dim on {r['n']} held-out images "
                  f"({r['settings']['solver']}, {r['nfe_per_image']:.0f} NFE and {r['seconds_per_image']:.2f} s per "
                  f"image); {r['folder']}/likelihood.json")
    if world > 1:
        utils.dist_exit(0)
    return results


if __name__ == "__main__":
    main()
