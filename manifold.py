"""The manifold experiment (the paper's Fig. 1, left): sliced score matching of a score network on
images does not converge when the data lie on a low-dimensional manifold, and does once the data
are perturbed by a tiny Gaussian noise N(0, 0.0001).

    python manifold.py --data-root .mnist              # real MNIST digits at 16x16, a small ResNet: minutes on a CPU
    python manifold.py --dataset cifar10 --image-size 32 --nef 32 --iters 50000   # the paper's (official config)
    python manifold.py --resume                            # continue an interrupted run

Two runs from the same initial network on the same batches, SSM-VR (common.sliced_score_matching_vr,
one projection per image), Adam: one on the images as they are, one on images + sigma z
(--noise-std 0.01, variance 0.0001, the official noise_std). Writes under --out: manifold.png
(both loss curves), metrics.json (mean and variance of each loss over the last --tail of the
iterations, and the iteration where a loss became non-finite, if one did), losses.npz, and
manifold.pt (the state, every --save-every iterations, for --resume).
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import os
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import checkpoints
import common
import data
import figures
import utils

#----------------------------------------------------------------------------
# Defaults: small enough for real MNIST digits on 2 CPU cores (the official config in comments).

OUT = "runs/manifold"
DATASET = "mnist"        # mnist or cifar10 (the paper's figure)
IMAGE_SIZE = 16          # the official MNIST scorenet setting (CIFAR-10: 32)
NEF = 16                 # network width (official: 32)
ITERS = 1500             # per run (official: 50,000)
BATCH_SIZE = 64          # (official: 128)
LR = 1e-3                # Adam, as the official config
NOISE_STD = 0.01         # the perturbed run's sigma: N(0, 0.0001)
TAIL = 0.2               # the share of iterations the metrics summarise (the last ones)
SAVE_EVERY = 500         # iterations between saved states
SEED = 0


class ResScore(nn.Module):
    """A small residual score network s(x) without noise conditioning: a 3x3 convolution, residual
    blocks (GroupNorm, ELU, 3x3 convolutions) at full and half resolution, and back (the official
    ResScore is a larger encoder-decoder of the same kind)."""

    def __init__(self, channels, nef):
        super().__init__()
        block = lambda c: nn.Sequential(nn.GroupNorm(min(8, c), c), nn.ELU(), nn.Conv2d(c, c, 3, padding=1),
                                        nn.GroupNorm(min(8, c), c), nn.ELU(), nn.Conv2d(c, c, 3, padding=1))
        self.inp = nn.Conv2d(channels, nef, 3, padding=1)
        self.full1, self.full2 = block(nef), block(nef)
        self.down, self.low = nn.Conv2d(nef, 2 * nef, 3, stride=2, padding=1), block(2 * nef)
        self.up = nn.ConvTranspose2d(2 * nef, nef, 4, stride=2, padding=1)
        self.out = nn.Sequential(nn.GroupNorm(min(8, nef), nef), nn.ELU(), nn.Conv2d(nef, channels, 3, padding=1))

    def forward(self, x):
        h = self.inp(2 * x - 1)
        h = h + self.full1(h)
        g = self.down(h)
        g = g + self.low(g)
        h = h + self.up(g)
        return self.out(h + self.full2(h))


def load_data(args):
    """uint8 training images at --image-size."""
    import torchvision.transforms.functional as TF
    images = data.load_images(args.dataset, True, args.data_root, folder_flag=None)
    if images.shape[-1] != args.image_size:
        images = TF.resize(images, [args.image_size] * 2, antialias=True)
    return images


def summary(losses, tail):
    """Mean and variance of the finite losses in the last `tail` share of the iterations, and the
    first iteration (1-based) with a non-finite loss (None if none)."""
    bad = np.flatnonzero(~np.isfinite(losses))
    last = losses[int(len(losses) * (1 - tail)):]
    last = last[np.isfinite(last)]
    return dict(tail_mean=float(last.mean()) if len(last) else None,
                tail_variance=float(last.var()) if len(last) else None,
                first_non_finite=int(bad[0]) + 1 if len(bad) else None)


def save_plot(path, losses, args):
    plt = figures.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    titles = {"no_noise": "data as they are", "noise": f"data + N(0, {args.noise_std ** 2:g})"}
    w = max(1, min(100, len(losses["noise"]) // 20))
    for ax, (name, l) in zip(axes, losses.items()):
        it = np.arange(1, len(l) + 1)
        ax.plot(it, l, color="0.75", lw=0.5, label="per iteration")
        ok = np.isfinite(l)
        if ok.sum() >= w:
            smooth = np.convolve(np.where(ok, l, 0), np.ones(w) / w, mode="valid")
            ax.plot(it[w - 1:], smooth, color="C0" if name == "noise" else "C3", lw=1.5, label=f"mean of {w}")
        if ok.any():
            lo, hi = np.percentile(l[ok], [1, 99])
            ax.set_ylim(lo - 0.2 * abs(hi - lo), hi + 0.2 * abs(hi - lo))
        ax.set_xlabel("iteration"), ax.set_ylabel("sliced score matching loss"), ax.set_title(titles[name])
        ax.grid(alpha=0.3), ax.legend()
    fig.suptitle(f"SSM-VR on {args.dataset} at {args.image_size}x{args.image_size}: loss on the data manifold "
                 f"and off it (variance over the last {args.tail:.0%}: no noise "
                 f"{summary(losses['no_noise'], args.tail)['tail_variance'] or float('nan'):.3g}, "
                 f"noise {summary(losses['noise'], args.tail)['tail_variance'] or float('nan'):.3g})")
    figures.save_figure(fig, path)


MAY_CHANGE = ("iters", "save_every", "tail", "device", "out", "resume", "data_root")   # on --resume


def resumable(state, args):
    """The saved state of manifold.pt, refused in one line unless it is this script's and of these
    settings (all but MAY_CHANGE's) with at most --iters iterations done."""
    path = os.path.join(args.out, "manifold.pt")
    if not (isinstance(state, dict) and {"iteration", "settings", "noise", "no_noise"} <= set(state)):
        raise checkpoints.CheckpointError(f"{path}: not a state of manifold.py (or of a version before its settings "
                                     "were stored); use another --out")
    if changed := utils.changed_settings(state["settings"], vars(args), MAY_CHANGE):
        raise checkpoints.CheckpointError(f"{path} was made with {', '.join(changed)}; resume with the same values")
    if state["iteration"] > args.iters:
        raise checkpoints.CheckpointError(f"{path} has {state['iteration']} iterations done, more than --iters "
                                     f"{args.iters}; give at least that many")
    return state


def train_runs(runs, losses, images, start, args, device, state_path):
    """Iterations start, ..., --iters - 1 of both runs, one SSM-VR step each on the same batch and
    projections (the perturbed run adds --noise-std z); the state is saved every --save-every."""
    for it in tqdm(range(start, args.iters), initial=start, total=args.iters, desc="SSM, two runs", unit="it"):
        g = torch.Generator().manual_seed(utils.stable_seed(args.seed, it))
        x = images[torch.randint(len(images), (args.batch_size,), generator=g)].to(device).float() / 255
        z, v = (torch.randn(x.shape, generator=g).to(device) for _ in range(2))
        for name, (net, opt) in runs.items():
            if it > 0 and not np.isfinite(losses[name][it - 1]):
                continue                                       # a run that diverged stays stopped
            loss = common.sliced_score_matching_vr(net, x + (args.noise_std * z if name == "noise" else 0), vectors=v)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[name][it] = loss.item()
        if (it + 1) % args.save_every == 0 or it + 1 == args.iters:
            state = {name: dict(model=net.state_dict(), optimizer=opt.state_dict(),
                                losses=torch.from_numpy(losses[name])) for name, (net, opt) in runs.items()}
            checkpoints.write_checkpoint({"iteration": it + 1, "settings": vars(args), **state}, state_path)


@utils.command()
def main(argv=None):
    p = utils.arg_parser(__doc__)
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default=DATASET, help="training images")
    p.add_argument("--data-root", default=data.DATA_ROOT, help="torchvision data folder")
    p.add_argument("--image-size", type=utils.positive_int, default=IMAGE_SIZE, help="images resized to this")
    p.add_argument("--nef", type=utils.positive_int, default=NEF, help="network width")
    p.add_argument("--iters", type=utils.positive_int, default=ITERS, help="iterations per run")
    p.add_argument("--batch-size", type=utils.positive_int, default=BATCH_SIZE, help="images per iteration")
    p.add_argument("--lr", type=utils.positive_float, default=LR, help="Adam learning rate")
    p.add_argument("--noise-std", type=utils.positive_float, default=NOISE_STD, help="sigma of the perturbed run")
    p.add_argument("--tail", type=utils.positive_float, default=TAIL, help="share of the last iterations summarised")
    p.add_argument("--save-every", type=utils.positive_int, default=SAVE_EVERY, help="iterations between saved states")
    p.add_argument("--seed", type=utils.seed, default=SEED, help="initial network, batches and projections")
    p.add_argument("--resume", action="store_true", help="continue <out>/manifold.pt")
    p.add_argument("--device", type=utils.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=OUT, help="output folder")
    args = p.parse_args(argv)
    if args.tail >= 1 or args.image_size % 2:
        p.error("--tail must be below 1 and --image-size even")
    device, state_path = utils.get_device(args.device), os.path.join(args.out, "manifold.pt")
    if os.path.exists(state_path) and not args.resume:
        p.error(f"{state_path} exists; pass --resume to continue it, or choose another --out")
    if args.resume and not os.path.exists(state_path):
        p.error(f"--resume: {state_path} does not exist; check --out, or drop --resume to start")
    if problem := utils.check_out(args.out):
        p.error(problem)
    state = resumable(checkpoints.read_checkpoint(state_path), args) if args.resume else None
    images = load_data(args)
    torch.manual_seed(args.seed)
    init = ResScore(images.shape[1], args.nef)
    runs = {name: copy_of(init, device, args.lr) for name in ("no_noise", "noise")}
    losses = {name: np.full(args.iters, np.nan) for name in runs}
    start = 0
    if state is not None:
        start = state["iteration"]
        for name, (net, opt) in runs.items():
            net.load_state_dict(state[name]["model"]), opt.load_state_dict(state[name]["optimizer"])
            losses[name][:start] = state[name]["losses"][:start].numpy()
        print(f"resumed {state_path} at iteration {start}")
    t0 = time.time()
    train_runs(runs, losses, images, start, args, device, state_path)
    metrics = {name: summary(l, args.tail) for name, l in losses.items()}
    metrics.update(settings=vars(args), train_images=len(images), seconds=round(time.time() - t0, 1))
    utils.save_json(metrics, os.path.join(args.out, "metrics.json"))
    with utils.atomic_path(os.path.join(args.out, "losses.npz")) as tmp:
        np.savez(tmp, **losses)
    save_plot(os.path.join(args.out, "manifold.png"), losses, args)
    for name in runs:
        m = metrics[name]
        print(f"{name:>8}: loss over the last {args.tail:.0%}: mean {m['tail_mean']}, variance {m['tail_variance']}"
              + (f"; non-finite from iteration {m['first_non_finite']}" if m["first_non_finite"] else ""))
    print(f"wrote {args.out}/manifold.png, metrics.json, losses.npz")
    return metrics


def copy_of(net, device, lr):
    """An independent copy of the initial network and its Adam optimizer."""
    import copy
    net = copy.deepcopy(net).to(device)
    return net, torch.optim.Adam(net.parameters(), lr=lr)


if __name__ == "__main__":
    main()
