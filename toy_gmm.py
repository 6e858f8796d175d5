"""Fig. 1: a score model trained by score matching is accurate only where the data live.

An MLP is trained with sliced score matching (SSM-VR) on p = 1/5 N((-5,-5), I) + 4/5 N((5,5), I)
and its scores are compared with the exact ones on [-8, 8]^2.

    python toy_gmm.py                          # the paper's settings (10,000 iterations)
    python toy_gmm.py --iters 2000 --out runs/toy_quick

Writes to --out: toy_gmm.png (density, true and estimated score fields, error map, loss
curve), metrics.json (errors near and far from the data) and toy_gmm.npz (every array).
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import os
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import common
import figures
import utils

#----------------------------------------------------------------------------
# Defaults: the paper's toy experiment (Sec. 3.2.1) and the official toy runner.

OUT = "runs/toy_gmm"     # output folder
SEED = 0                 # seeds the data, the projections and the network
ITERS = 10_000           # SSM optimizer steps
BATCH_SIZE = 128         # samples of p per step
LR = 1e-3                # Adam learning rate
HIDDEN = 128             # MLP width: Linear-Softplus-Linear-Softplus-Linear
BOUND = 8.0              # the figure and the grid cover [-BOUND, BOUND]^2
FAR = 3.0                # "low density": farther than FAR standard deviations from both modes


def make_mlp(hidden=HIDDEN):
    """s_theta: R^2 -> R^2, three linear layers with Softplus."""
    return nn.Sequential(nn.Linear(2, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
                         nn.Linear(hidden, 2))


def train(net, iters, batch_size, lr, generator):
    """SSM-VR with one Gaussian projection per sample; returns the loss of every step."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = np.empty(iters)
    bar = tqdm(range(iters), desc="sliced score matching", unit="it", mininterval=1.0)
    for it in bar:
        x = common.toy_sample(batch_size, generator)
        loss = common.sliced_score_matching_vr(net, x, n_particles=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[it] = loss.item()
        if not np.isfinite(losses[it]):
            raise utils.UserError(f"the SSM loss is {losses[it]} at iteration {it + 1}: training diverged; "
                                     "use a smaller --lr (nothing was written)")
        if it % 200 == 0:
            bar.set_postfix(loss=f"{losses[max(0, it - 199):it + 1].mean():.3f}", refresh=False)
    return losses


def grid(n, bound=BOUND):
    """(n*n, 2) points of a regular grid on [-bound, bound]^2, x fastest."""
    t = torch.linspace(-bound, bound, n)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], 1)


def score_errors(net, generator, n_data=10_000, n_grid=101):
    """Squared score errors under p (Monte Carlo) and on the low-density part of the grid."""
    with torch.no_grad():
        xd = common.toy_sample(n_data, generator)
        fisher = (net(xd) - common.toy_score(xd)).pow(2).sum(1).mean().item()
        xg = grid(n_grid)
        err = (net(xg) - common.toy_score(xg)).pow(2).sum(1)
        far = torch.cdist(xg, common.TOY_MEANS).min(1).values > FAR
    return dict(fisher_divergence=fisher, mse_low_density=err[far].mean().item(),
                mse_high_density_grid=err[~far].mean().item(), low_density_fraction_of_grid=far.float().mean().item(),
                low_to_data_ratio=err[far].mean().item() / fisher), xg, err


def plot(path, net, losses, metrics):
    plt = figures.pyplot()

    fine = grid(201)
    dens = common.toy_log_prob(fine).exp().reshape(201, 201).numpy()
    pts = grid(21)
    with torch.no_grad():
        true, est = common.toy_score(pts).numpy(), net(pts).numpy()
        err = (net(fine) - common.toy_score(fine)).pow(2).sum(1).reshape(201, 201).numpy()
    extent = [-BOUND, BOUND, -BOUND, BOUND]
    scale = np.linalg.norm(true, axis=1).max() / (0.9 * 2 * BOUND / 20)   # longest true arrow: 0.9 grid step

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.8))

    def discs(ax):
        for mx, my in common.TOY_MEANS.tolist():
            ax.add_patch(plt.Circle((mx, my), FAR, fill=False, color="red", lw=1.8, ls="--"))

    for ax, field, title in [(axes[0], true, r"Data scores $\nabla_x \log p(x)$"),
                             (axes[1], est, r"Estimated scores $s_\theta(x)$")]:
        ax.imshow(dens, origin="lower", extent=extent, cmap="Oranges")
        ax.quiver(pts[:, 0], pts[:, 1], field[:, 0], field[:, 1], angles="xy", scale_units="xy",
                  scale=scale, width=0.004, color="black")
        discs(ax)
        ax.set_title(title, fontsize=13)
    im = axes[2].imshow(np.log10(err + 1e-4), origin="lower", extent=extent, cmap="viridis")
    discs(axes[2])
    fig.colorbar(im, ax=axes[2], fraction=0.046, label=r"$\log_{10} \|s_\theta - \nabla_x \log p\|^2$")
    axes[2].set_title("Squared score error", fontsize=13)
    for ax in axes[:3]:
        ax.set_xlim(-BOUND, BOUND), ax.set_ylim(-BOUND, BOUND), ax.set_aspect("equal")
    w = min(200, len(losses))
    smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
    axes[3].plot(np.arange(len(losses)), losses, color="0.8", lw=0.5, label="per step")
    axes[3].plot(np.arange(w - 1, len(losses)), smooth, color="C0", lw=1.5, label=f"mean of {w}")
    axes[3].set_xlabel("iteration"), axes[3].set_ylabel("SSM-VR loss"), axes[3].legend()
    lo, hi = np.percentile(losses, [1, 99.5])
    axes[3].set_ylim(lo - 0.1 * abs(lo), hi)
    axes[3].set_title("Training loss", fontsize=13)
    fig.suptitle(f"Score error under p: {metrics['fisher_divergence']:.3g};  far from the data "
                 f"(red circles: {FAR:g} sd around the modes): {metrics['mse_low_density']:.3g} "
                 f"({metrics['low_to_data_ratio']:.0f}x)", fontsize=13)
    figures.save_figure(fig, path)


@utils.command()
def main(argv=None):
    p = utils.arg_parser(__doc__)
    p.add_argument("--out", default=OUT, help="output folder")
    p.add_argument("--seed", type=utils.seed, default=SEED, help="random seed")
    p.add_argument("--iters", type=utils.positive_int, default=ITERS, help="SSM optimizer steps")
    p.add_argument("--batch-size", type=utils.positive_int, default=BATCH_SIZE, help="samples per step")
    p.add_argument("--lr", type=utils.positive_float, default=LR, help="Adam learning rate")
    args = p.parse_args(argv)
    if problem := utils.check_out(args.out):
        p.error(problem)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    net = make_mlp()
    losses = train(net, args.iters, args.batch_size, args.lr, gen)
    metrics, xg, err = score_errors(net, torch.Generator().manual_seed(args.seed + 1))
    metrics.update(final_loss=float(losses[-min(100, len(losses)):].mean()), seconds=round(time.time() - t0, 1),
                   settings=vars(args))
    utils.save_json(metrics, os.path.join(args.out, "metrics.json"))
    pts = grid(21)
    with torch.no_grad(), utils.atomic_path(os.path.join(args.out, "toy_gmm.npz")) as tmp:
        np.savez(tmp, losses=losses, grid=xg.numpy(), grid_sq_error=err.numpy(),
                 arrow_points=pts.numpy(), true_scores=common.toy_score(pts).numpy(), est_scores=net(pts).numpy(),
                 density=common.toy_log_prob(xg).exp().numpy())
    plot(os.path.join(args.out, "toy_gmm.png"), net, losses, metrics)
    print(f"score error under p {metrics['fisher_divergence']:.4g} | far from data {metrics['mse_low_density']:.4g} "
          f"({metrics['low_to_data_ratio']:.1f}x) | final loss {metrics['final_loss']:.4g} | {metrics['seconds']} s")
    print(f"wrote {args.out}/toy_gmm.png, metrics.json, toy_gmm.npz")
    return metrics


if __name__ == "__main__":
    main()
