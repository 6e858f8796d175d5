"""A training run's set-up and files for train.py's loop: metrics.csv, checkpoints (written; read back, checked
and restored for --resume), the network and optimizer, config.json, the figures (Figs. 3-5). Rank 0 alone writes.
"""
import copy
import csv
import dataclasses
import io
import math
import os
import platform
import shutil
import time

import torch
from tqdm import tqdm

import checkpoints
import common
import data
import figures
import sample
import samplers
import utils

LOG_EVERY = 10       # steps between host syncs: metrics rows, finiteness and stop checks

#----------------------------------------------------------------------------
# Errors, the metrics log.

class TrainError(utils.UserError):
    """A run that cannot start or go on; the message says why and what to do."""


class NonFiniteLoss(TrainError):
    """The loss of step args[0] is NaN or infinite."""


class MetricsLog:
    """metrics.csv, one row per step after `upto`, and the same numbers (and the sample grids) as TensorBoard events
    beside it (`tensorboard --logdir runs`). `pending` (step, epoch, device loss) rows are written every LOG_EVERY
    steps (one host sync; averaged over the `world` processes); a non-finite one raises NonFiniteLoss."""
    COLUMNS = ["step", "epoch", "loss", "test_loss", "images_per_s"]

    def __init__(self, path, upto, write, images_per_step, world):
        self.path, self.write, self.images_per_step, self.world = path, write, images_per_step, world
        self.rows, self.pending, self.tests, self.board = [], [], {}, None
        if write:
            self.rows = read_metrics(path, upto, set_damaged_aside=True)
            with utils.atomic_path(path) as tmp, open(tmp, "w") as f:
                f.write(",".join(self.COLUMNS) + "\n")
                f.writelines(self._line(r) for r in self.rows)
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard hides what a killed run logged after the checkpoint this run starts from
            self.board = SummaryWriter(os.path.dirname(path) or ".", purge_step=upto + 1)
        self.t, self.step = time.time(), upto

    @staticmethod
    def _line(r):
        test = "" if r["test_loss"] == "" else f"{r['test_loss']:.6g}"
        return f"{r['step']},{r['epoch']},{r['loss']:.6g},{test},{r['images_per_s']}\n"

    def flush(self, step):
        """Write the pending rows; returns the status line (None when none were pending)."""
        if not self.pending:
            return None
        losses = torch.stack([loss for _, _, loss in self.pending])
        if self.world > 1:
            torch.distributed.all_reduce(losses)
            losses /= self.world
        rate = (step - self.step) * self.images_per_step / max(time.time() - self.t, 1e-9)
        new = [dict(step=s, epoch=e, loss=v, test_loss=self.tests.pop(s, ""), images_per_s=f"{rate:.1f}")
               for (s, e, _), v in zip(self.pending, losses.tolist())]
        self.pending, self.t, self.step = [], time.time(), step
        if bad := [r["step"] for r in new if not math.isfinite(r["loss"])]:
            raise NonFiniteLoss(bad[0])
        if self.write:
            self.rows.extend(new)
            with open(self.path, "a") as f:
                f.writelines(self._line(r) for r in new)
            for r in new:
                self.board.add_scalar("loss/train", r["loss"], r["step"])
                if r["test_loss"] != "":
                    self.board.add_scalar("loss/test", r["test_loss"], r["step"])
            self.board.add_scalar("images_per_s", rate, step)
            self.board.flush()
        return f"loss {new[-1]['loss']:.4g}, {rate:.0f} img/s"

    def add_grid(self, tag, images, step):
        """A grid of images (N, C, H, W) in [0, 1] as a TensorBoard image of `step` (the writing process only)."""
        if self.board is not None:
            import torchvision
            grid = torchvision.utils.make_grid(images.detach().float().nan_to_num(0.0).clamp(0, 1).cpu(),
                                               nrow=int(math.ceil(math.sqrt(len(images)))), padding=2, pad_value=1.0)
            self.board.add_image(tag, grid, step)
            self.board.flush()

    def close(self):
        if self.board is not None:
            self.board.close()


def read_metrics(path, upto, set_damaged_aside=False):
    """The valid rows of an earlier metrics.csv up to step `upto`. A row that does not parse is dropped: the last
    one quietly when the file does not end its line (a killed writer's torn row), any other after the file is
    set aside as metrics.csv.damaged (set_damaged_aside: the caller rewrites it) with one line naming it."""
    try:
        with open(path, newline="", errors="replace") as f:         # bytes that are no text: rows that do not parse
            text = f.read()
    except FileNotFoundError:
        return []
    reader = csv.DictReader(io.StringIO(text))
    parsed, rows, bad = [(r, reader.line_num) for r in reader], [], []
    for i, (r, line) in enumerate(parsed):
        try:
            row = dict(step=int(r["step"]), epoch=int(r["epoch"]), loss=float(r["loss"]),
                       test_loss=float(r["test_loss"]) if r["test_loss"] else "",
                       images_per_s=str(float(r["images_per_s"])))
        except (TypeError, ValueError, KeyError):
            if i < len(parsed) - 1 or text.endswith("\n"):
                bad.append(line)
            continue
        if row["step"] <= upto:
            rows.append(row)
    if bad and set_damaged_aside:
        utils.set_aside(path, f"{path}: {len(bad)} row(s) do not parse (line {', '.join(map(str, bad[:5]))}); "
                              f"the {len(rows)} valid rows are kept")
    return rows


def save_checkpoint(step, epoch, pos, numbered, *, net, ema, opt, model_args, cfg, data):
    """<cfg.out>/checkpoint.pt, the latest: everything resume needs; when numbered also checkpoint_<step>.pt, the
    same bytes (a hard link; a copy where links are not supported)."""
    out, path = cfg.out, os.path.join(cfg.out, "checkpoint.pt")
    try:
        checkpoints.write_checkpoint(dict(model=net.state_dict(), ema=ema and ema.state_dict(),
                                          optimizer=opt.state_dict(), step=step, epoch=epoch, pos=pos,
                                          model_args=model_args, config=dataclasses.asdict(cfg), data=data,
                                          rng=dict(torch=torch.get_rng_state())), path)
        if numbered:
            with utils.atomic_path(os.path.join(out, f"checkpoint_{step}.pt")) as tmp:
                os.remove(tmp)
                try:
                    os.link(path, tmp)
                except OSError:
                    shutil.copyfile(path, tmp)
    except OSError as e:
        raise TrainError(f"could not write the checkpoint of step {step} in {out} ({e.strerror or e}); the files "
                         "written before are intact (checkpoint.pt is the last complete one): make room, then --resume")


NCSNPP_FLAGS = ("channel_mult", "num_blocks", "attn_resolutions", "dropout")      # NCSN++'s settings alone


def network_args(cfg):
    """The model_args of cfg's network (checkpoints.build_network's): RefineNet's five, or NCSN++'s."""
    spec = data.DATASETS[cfg.dataset]
    args = dict(in_channels=spec["channels"], ngf=cfg.ngf, num_classes=cfg.num_levels, image_size=spec["image_size"],
                conditioning=cfg.conditioning)
    if cfg.arch == "refinenet":
        return args
    return dict(arch=cfg.arch, **args, **{k: getattr(cfg, k) for k in NCSNPP_FLAGS})


def tiny_network(cfg):
    """The network cfg describes, at its smallest (its settings checked in a moment, before any work)."""
    tiny = dict(ngf=4, num_classes=2 if cfg.num_levels == "auto" else cfg.num_levels)
    if cfg.arch == "ncsnpp":
        tiny["num_blocks"] = 1
    return checkpoints.build_network({**network_args(cfg), **tiny})


def figure_record(cfg, net=None):
    """The figures' checkpoint record (checkpoints.record) of a resolved config; without `net`, of a tiny
    network the config describes (to check the figures' sampler before training)."""
    net = net or tiny_network(cfg)
    return checkpoints.record(net, dataclasses.asdict(cfg), cfg.out)


def figure_settings(cfg, ck=None):
    """The figures' SamplerSettings (--sampler, --nfe, --s-churn, the Langevin flags) on a resolved config;
    a TrainError naming the flags where the sampler cannot run them."""
    ck = ck or figure_record(cfg)
    try:
        return sample.sampler_settings(cfg.sampler, ck, cfg.seed, cfg.nfe, **sample.recipe_settings(ck, cfg.sampler))
    except sample.Inapplicable as e:
        raise TrainError(f"the figures' sampler: {e}; change --sampler, --nfe or --s-churn") from None


def save_sample_figures(net, cfg, step, log, device, stop):
    """samples_<step>.png and process_<step>.png (Figs. 4, 5) with --sampler from the same start every time (the
    grid also in `log`'s TensorBoard events), and loss.png (Fig. 3) of log's rows. Returns False, writing nothing,
    when a stop signal cut sampling short."""
    ck = figure_record(cfg, net)
    settings = figure_settings(cfg, ck)
    tqdm.write(f"step {step}: sampling {cfg.n_samples} images for the figures ({cfg.sampler}, {settings.nfe} "
               "network evaluations each)")
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    x0 = torch.rand(cfg.n_samples, *ck.shape, generator=g, device=device)
    levels = {}
    def keep(i, _, x, score):          # the state at each level's end: its last call
        stop.check()
        levels[i] = x
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            x = samplers.SAMPLERS[cfg.sampler].run(
                ck.model.to(device), x0, torch.tensor(settings.sigmas, device=device),
                randn_like=lambda t: torch.randn(t.shape, generator=g, device=device), callback=keep, **settings.kwargs)
    except utils.Stopped:
        return False
    except RuntimeError as e:
        if not utils.is_out_of_memory(e):
            raise
        raise TrainError(f"out of memory sampling the figures' {cfg.n_samples} images at step {step} "
                         f"({utils.first_line(e)[:60]}); use a smaller --n-samples, then --resume") from None
    figures.save_image_grid(os.path.join(cfg.out, f"samples_{step}.png"), x, nrow=int(math.ceil(math.sqrt(len(x)))))
    figures.save_process_figure(os.path.join(cfg.out, f"process_{step}.png"), [levels[i] for i in sorted(levels)],
                              list(settings.sigmas), title=f"{cfg.sampler}: state at the end of each level")
    figures.save_loss_figure(os.path.join(cfg.out, "loss.png"), log.rows, f"annealed {cfg.objective.upper()} loss")
    log.add_grid("samples", x, step)
    return True

#----------------------------------------------------------------------------
# Resume, the network, config.json.

def resume_state(cfg):
    """The checkpoint to continue (None for a fresh run); refused unless it is a whole training checkpoint."""
    path = os.path.join(cfg.out, "checkpoint.pt")
    if not os.path.exists(path):
        return None
    if not cfg.resume:
        raise TrainError(f"{cfg.out} already holds checkpoint.pt; pass --resume to continue it, or choose another "
                         "--out")
    state = checkpoints.read_checkpoint(path, map_location="cpu")
    keys = ("model", "optimizer", "model_args", "config", "step", "epoch", "pos", "rng")
    if lacking := [k for k in keys if not isinstance(state, dict) or k not in state]:
        raise TrainError(f"{path} lacks {', '.join(lacking)}: not a training checkpoint of this project; "
                         "continue it with the version that wrote it, or train into another --out")
    return state


def check_resume(state, cfg, model_args, data_id, may_change, default):
    """Refuse to continue a checkpoint of another model, of other training images (data.identity; a checkpoint that
    predates the record is not checked) or of other settings (all but `may_change`; default(name): a setting's value
    when the checkpoint predates it)."""
    path, old = os.path.join(cfg.out, "checkpoint.pt"), state["model_args"]
    if state.get("data", data_id) != data_id:
        source = f"--dataset-path {cfg.dataset_path}" if cfg.dataset_path else f"--data-root {cfg.data_root}"
        raise TrainError(f"{path} was trained on {state['data']}; {source} now holds {data_id}: resume on the same "
                         "images, or train into another --out")
    if old != model_args:
        diff = ", ".join(f"{k} {old.get(k)} (flags: {v})" for k, v in model_args.items() if old.get(k) != v)
        raise TrainError(f"{path} holds a different model: {diff}; resume with the same settings or another --out")
    if diff := utils.changed_settings(state["config"], dataclasses.asdict(cfg), may_change, default):
        raise TrainError(f"{path} was trained with {', '.join(diff)}; resume with the same values")


def build(cfg, model_args, sigmas, state, world, data_mean=math.nan):
    """The network (continuous conditioning: EDM's Denoiser, with cfg.sigma_data and the mean pixel), the module
    that trains it (common.ScoreModel; DDP, torch.compile), its EMA (None when off), Adam; restored from `state`."""
    torch.manual_seed(cfg.seed)
    net = checkpoints.build_network(model_args, sigmas, cfg.sigma_data, data_mean)
    net = net.to(sigmas.device, memory_format=torch.channels_last if cfg.channels_last else None)
    ema = copy.deepcopy(net).requires_grad_(False) if cfg.ema > 0 else None
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])      # its lr is --lr, which may not change
        if ema is not None:         # --ema may not change on resume: the checkpoint has one
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
    model = common.ScoreModel(net, sigmas, strict=False)     # the draws are levels: no host sync a step
    model = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[sigmas.device.index] if sigmas.device.type == "cuda" else None)
    model = torch.compile(model) if cfg.compile else model    # checkpoints save net's state dict all the same
    return net, model, ema, opt


def save_config(cfg, path, **found):
    """config.json: every setting, what the run found (processes, data sizes) and the versions."""
    import numpy
    import torchvision
    versions = dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                    numpy=numpy.__version__)
    utils.save_json(dict(dataclasses.asdict(cfg), **found, versions=versions), path)


def ema_rate(cfg, step):
    """The EMA rate of update n = step + 1: --ema; with --ema-warmup min(--ema, (1 + n) / (10 + n)); with
    --ema-halflife H (EDM's) 0.5^(B / H) for batch B, H at most --ema-rampup x the n B images seen."""
    n = step + 1
    if cfg.ema_halflife:
        half = min(cfg.ema_halflife, n * cfg.batch_size * cfg.ema_rampup) if cfg.ema_rampup else cfg.ema_halflife
        return 0.5 ** (cfg.batch_size / half)
    return min(cfg.ema, (1 + n) / (10 + n)) if cfg.ema_warmup else cfg.ema


def out_of_time(cfg, t0, step, world, device):
    """Whether --minutes have passed since t0; with several processes, whether they have on any rank (asked
    every LOG_EVERY steps, all at one step)."""
    if not cfg.minutes or (world > 1 and step % LOG_EVERY):
        return False
    return utils.any_rank(time.time() - t0 > 60 * cfg.minutes, world, device)


def describe(cfg, net):
    """The recipe and the network, for the start-of-run line."""
    arch = "RefineNet" if cfg.arch == "refinenet" else "NCSN++"
    shape = "" if cfg.arch == "refinenet" else (
        f", channels x {' '.join(map(str, cfg.channel_mult))}, {cfg.num_blocks} blocks each, attention at "
        f"{cfg.attn_resolutions}, dropout {cfg.dropout:g}")
    return (f"recipe {cfg.recipe}: {arch}({net.model_args['in_channels']}, {cfg.ngf}{shape}, {cfg.conditioning}-"
            f"conditioned, {cfg.num_levels} levels {cfg.sigma_begin:.4g} to {cfg.sigma_end:.4g}"
            + (", log-normal training levels" if cfg.sigma_dist == "lognormal" and cfg.objective != "edm" else "")
            + (f", EDM's loss, ln sigma ~ N({cfg.p_mean:g}, {cfg.p_std:g}^2), sigma_data {cfg.sigma_data:.4f}, "
               f"mean pixel {float(net.data_mean):.4f}" if cfg.objective == "edm" else "")
            + f"): {sum(p.numel() for p in net.parameters()):,} parameters")
