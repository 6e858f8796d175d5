"""Fig. 2: Langevin dynamics gets the mode weights wrong; annealed Langevin dynamics gets them right.

Samples of p = 1/5 N((-5,-5), I) + 4/5 N((5,5), I) three ways, each with the exact scores:
(a) i.i.d.; (b) Langevin dynamics (eq. 4); (c) annealed Langevin dynamics (the paper's
Algorithm 1: alpha_i = eps sigma_i^2 / sigma_L^2, x <- x + alpha_i/2 s(x, sigma_i) + sqrt(alpha_i) z),
both samplers starting from uniform noise on [-8, 8]^2.

    python langevin_compare.py                                          # the official settings
    python langevin_compare.py --sigma-begin 10 --sigma-end 0.1         # the paper text's: diverges

The default levels, 20 down to 1, are those of the official code; the paper's text prints 10
down to 0.1, for which the first levels are unstable (see the stability table this prints).
Writes to --out: langevin_compare.png, metrics.json, langevin_compare.npz.
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import os

import numpy as np
import torch

import common
import figures
import utils

#----------------------------------------------------------------------------
# Defaults: the official toy runner (ermongroup/ncsn runners/toy_runner.py).

OUT = "runs/langevin_compare"   # output folder
SEED = 0                        # seeds the starting points and every noise draw
N = 1280                        # samples per method
EPS = 0.1                       # epsilon: Langevin step size, and annealed step at the last level
STEPS = 1000                    # Langevin dynamics steps
STEPS_EACH = 100                # annealed Langevin steps per noise level (T)
SIGMA_BEGIN = 20.0              # sigma_1, the largest noise level
SIGMA_END = 1.0                 # sigma_L, the smallest
NUM_LEVELS = 10                 # L, geometric in between
BOUND = 8.0                     # start uniform on [-BOUND, BOUND]^2; plot range
FAR = 50.0                      # a sample beyond this in any coordinate (or not finite) has diverged
MODES = {"(5,5)": (5.0, 5.0), "(-5,-5)": (-5.0, -5.0)}


def stability_table(sigmas, eps):
    """Per level: the update on a Gaussian mode of variance v = 1 + sigma^2 is the linear map
    x - mu <- (1 - alpha/(2v)) (x - mu) + noise, stable only while alpha < 4v."""
    rows = []
    for i, sigma in enumerate(sigmas):
        alpha = eps * sigma ** 2 / sigmas[-1] ** 2
        limit = 4 * (1 + sigma ** 2)
        rows.append(dict(level=i + 1, sigma=sigma, alpha=alpha, limit=limit, ratio=alpha / limit, stable=alpha < limit))
    return rows


def print_table(rows):
    print(f"{'level':>5} {'sigma':>9} {'alpha_i':>10} {'4(1+s^2)':>10} {'alpha/limit':>11}  stable")
    for r in rows:
        print(f"{r['level']:>5} {r['sigma']:>9.4g} {r['alpha']:>10.4g} {r['limit']:>10.4g} {r['ratio']:>11.3g}  "
              f"{'yes' if r['stable'] else 'NO'}")
    bad = [r for r in rows if not r["stable"]]
    if bad:
        worst = max(bad, key=lambda r: r["ratio"])
        print(f"unstable: level(s) {', '.join(str(r['level']) for r in bad)}; worst is level {worst['level']} "
              f"(sigma {worst['sigma']:.4g}) with alpha {worst['ratio']:.2f}x the limit: expect samples to diverge")


def mode_fractions(x):
    """Share of samples nearer each mode (over all n), and the count that diverged."""
    ok = torch.isfinite(x).all(1) & (x.abs() <= FAR).all(1)
    means = torch.tensor(list(MODES.values()), dtype=x.dtype)
    nearest = torch.cdist(torch.where(ok[:, None], x, 0.0), means).argmin(1)
    out = {f"frac_near_{name}": ((nearest == k) & ok).float().mean().item() for k, name in enumerate(MODES)}
    n_bad = int((~ok).sum())
    return dict(out, n_diverged=n_bad, diverged=n_bad > 0)


def plot(path, samples, metrics, settings):
    plt = figures.pyplot()

    t = torch.linspace(-BOUND, BOUND, 161)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    dens = common.toy_log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp().reshape(161, 161)
    titles = {"iid": "(a) i.i.d. samples", "langevin": f"(b) Langevin dynamics, {settings['steps']} steps",
              "annealed": f"(c) annealed Langevin, {settings['num_levels']} x {settings['steps_each']} steps\n"
                          f"(samples p perturbed by sigma_L = {settings['sigma_end']:g})"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    for ax, (name, x) in zip(axes, samples.items()):
        m = metrics[name]
        ax.contour(xx, yy, dens, levels=6, colors="0.75", linewidths=0.7)
        keep = torch.isfinite(x).all(1) & (x.abs() <= BOUND).all(1)
        ax.scatter(x[keep, 0], x[keep, 1], s=3, alpha=0.6, color="C0" if name == "iid" else "C3")
        text = f"near (5,5): {m['frac_near_(5,5)']:.3f}\nnear (-5,-5): {m['frac_near_(-5,-5)']:.3f}"
        if m["diverged"]:
            text += f"\ndiverged: {m['n_diverged']} of {len(x)}"
        ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", fontsize=11,
                bbox=dict(facecolor="white", alpha=0.85, edgecolor="0.7"))
        ax.set_xlim(-BOUND, BOUND), ax.set_ylim(-BOUND, BOUND), ax.set_aspect("equal")
        ax.set_title(titles[name], fontsize=13)
    fig.suptitle(f"p = 0.2 N((-5,-5), I) + 0.8 N((5,5), I); eps = {settings['eps']:g}, sigmas "
                 f"{settings['sigma_begin']:g} to {settings['sigma_end']:g}", fontsize=12)
    figures.save_figure(fig, path)


@utils.command()
def main(argv=None):
    p = utils.arg_parser(__doc__)
    p.add_argument("--out", default=OUT, help="output folder")
    p.add_argument("--seed", type=utils.seed, default=SEED, help="random seed")
    p.add_argument("--n", type=utils.positive_int, default=N, help="samples per method")
    p.add_argument("--eps", type=utils.positive_float, default=EPS, help="step size epsilon")
    p.add_argument("--steps", type=utils.positive_int, default=STEPS, help="Langevin dynamics steps")
    p.add_argument("--steps-each", type=utils.positive_int, default=STEPS_EACH, help="annealed steps per level")
    p.add_argument("--sigma-begin", type=utils.positive_float, default=SIGMA_BEGIN, help="largest noise level")
    p.add_argument("--sigma-end", type=utils.positive_float, default=SIGMA_END, help="smallest noise level")
    p.add_argument("--num-levels", type=utils.positive_int, default=NUM_LEVELS, help="number of noise levels")
    args = p.parse_args(argv)
    if problem := utils.check_out(args.out):
        p.error(problem)
    try:
        sigmas = common.geometric_sigmas(args.sigma_begin, args.sigma_end, args.num_levels).double()
    except ValueError as e:
        p.error(str(e))

    rows = stability_table(sigmas.tolist(), args.eps)
    print_table(rows)
    print(f"Langevin dynamics: alpha {args.eps:g} against limit 4 (v = 1): "
          f"{'stable' if args.eps < 4 else 'UNSTABLE'}")

    gen = torch.Generator().manual_seed(args.seed)
    randn_like = lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)
    x0 = (torch.rand(args.n, 2, generator=gen, dtype=torch.float64) * 2 - 1) * BOUND
    with np.errstate(all="ignore"):
        samples = {
            "iid": common.toy_sample(args.n, gen).double(),
            "langevin": common.langevin_dynamics(common.toy_score, x0, args.eps, args.steps, randn_like=randn_like),
            # Algorithm 1 with eps is the official update with step_lr = eps / 2 (common.annealed_langevin_dynamics)
            "annealed": common.annealed_langevin_dynamics(common.toy_score, x0, sigmas, steps_each=args.steps_each,
                                                          step_lr=args.eps / 2, randn_like=randn_like),
        }
    metrics = {name: mode_fractions(x) for name, x in samples.items()}
    for name, m in metrics.items():
        print(f"{name:>9}: near (5,5) {m['frac_near_(5,5)']:.3f}, near (-5,-5) {m['frac_near_(-5,-5)']:.3f}"
              + (f", DIVERGED: {m['n_diverged']} samples" if m["diverged"] else ""))
    metrics.update(stability=rows, settings=vars(args), sigmas=sigmas.tolist())
    utils.save_json(metrics, os.path.join(args.out, "metrics.json"))
    with utils.atomic_path(os.path.join(args.out, "langevin_compare.npz")) as tmp:
        np.savez(tmp, x0=x0.numpy(), sigmas=sigmas.numpy(), **{k: v.numpy() for k, v in samples.items()})
    plot(os.path.join(args.out, "langevin_compare.png"), samples, metrics, vars(args))
    print(f"wrote {args.out}/langevin_compare.png, metrics.json, langevin_compare.npz")
    return metrics


if __name__ == "__main__":
    main()
