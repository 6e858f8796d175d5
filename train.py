"""Train a noise conditional score network: RefineNet and annealed denoising score matching
(the paper's Sec. 4.2 and 5), resumable, on one process or several (torchrun).

    python train.py --dataset mnist                       # the paper's MNIST run (= python train_mnist.py)
    python train.py --dataset cifar10 --batch-size 100 --epochs 500
    python train.py --dataset cifar10 --resume            # continue runs/cifar10/checkpoint.pt
    torchrun --nproc_per_node 2 train.py --dataset cifar10

Every setting is a TrainConfig field and a flag of the same name. Under --out: config.json, metrics.csv,
checkpoint.pt (the latest), checkpoint_<step>.pt, loss.png, samples_<step>.png and process_<step>.png.
Exit status: 0 finished, 3 stopped by SIGINT/SIGTERM (continue with --resume), 1 an error, 2 a bad flag.
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import argparse
import contextlib
import dataclasses
import functools
import math
import os
import time
import types

import torch
from tqdm import tqdm

import checkpoints
import common
import data
import losses
import ncsnpp
import samplers
import train_io
import utils
from train_io import LOG_EVERY, TrainError  # noqa: F401  (train.TrainError, train.LOG_EVERY)

#----------------------------------------------------------------------------
# Settings: each TrainConfig field is a flag (--batch-size for batch_size); the data sets' are data.DATASETS.

ITERS = 200_000      # the paper's optimizer steps, when neither --iters nor --epochs is given
TEST_EVERY = 100     # steps between test losses (the official code's)
EXIT_STOPPED = 3     # exit status of a run stopped by a signal: continue it with --resume


def _setting(default, help, **kw):
    return dataclasses.field(default=default, metadata=dict(help=help, **kw))


NCSNPP = dict(ngf=32, channel_mult=[1, 2, 2], num_blocks=1, dropout=0.0)   # --arch ncsnpp's: measured, docs/ncsnpp.md

RECIPES = {   # what a recipe gives each of these flags when it is not given
    # the paper's (Sec. 5, appendix B.1; the official configs)
    "ncsn": dict(lr=1e-3, sigma_begin=common.SIGMA_BEGIN, sigma_end=common.SIGMA_END, num_levels=common.NUM_LEVELS,
                 conditioning="norm", objective="dsm", ema=0.0, ema_warmup=False, dequantize=True, s_churn=0.0,
                 steps_each=common.STEPS_EACH, step_lr=common.STEP_LR, denoise=False, sampler="als", nfe=None),
    # NCSNv2's techniques 1-5; its figures and evaluate.py: the best measured sampler (docs/samplers.md)
    "ncsnv2": dict(lr=1e-4, sigma_begin="auto", sigma_end=common.SIGMA_END, num_levels="auto", conditioning="scale",
                   objective="dsm", ema=0.999, ema_warmup=False, dequantize=False, steps_each=5, step_lr="auto",
                   denoise=True, sampler="heun", nfe=35, s_churn=10.0),
    # EDM's preconditioning, loss and sampler (docs/edm.md)
    "edm": dict(lr=1e-3, sigma_begin="auto", sigma_end=common.SIGMA_END, num_levels=18, conditioning="continuous",
                objective="edm", sigma_data="auto", ema=0.999, ema_warmup=True, dequantize=False, steps_each=1,
                step_lr="auto", denoise=False, sampler="heun", nfe=None, s_churn=0.0),
}


@dataclasses.dataclass
class TrainConfig:
    """Every training setting. None: the recipe's (RECIPES) or the data set's (data.DATASETS). A
    resumed run must use the checkpoint's value of every one but MAY_CHANGE's."""
    # data and outputs
    dataset: str = _setting("mnist", "data set", choices=list(data.DATASETS))
    data_root: str = _setting(data.DATA_ROOT, "torchvision data folder (downloaded into when missing)")
    dataset_path: str = _setting(None, "a folder of images to train on instead (every 20th held out)")
    out: str = _setting(None, "output folder (default: runs/<dataset>)")
    resume: bool = _setting(False, "continue from <out>/checkpoint.pt")
    recipe: str = _setting("ncsn", "ncsn: the paper's; ncsnv2: the improved techniques; edm: EDM's preconditioning, "
                           "continuous conditioning, loss and Heun sampler", choices=list(RECIPES))
    # training
    batch_size: int = _setting(128, "global batch per optimizer step", type=utils.positive_int)
    iters: int = _setting(None, f"optimizer steps (default {ITERS:,} without --epochs)", type=utils.positive_int)
    epochs: int = _setting(None, "epochs (with --iters too: whichever ends first)", type=utils.positive_int)
    lr: float = _setting(None, "Adam learning rate", type=utils.positive_float)
    beta1: float = _setting(0.9, "Adam beta1 (beta2 is 0.999)", type=utils.rate)
    arch: str = _setting("refinenet", "the score network: refinenet, the paper's; ncsnpp, NCSN++ (Song et al. 2021, "
                         "as EDM's SongUNet), with --recipe ncsnv2 or edm (it takes any sigma)",
                         choices=list(checkpoints.ARCHS))
    ngf: int = _setting(None, "network width: RefineNet's ngf (default: 64 for MNIST, 128 for the others), NCSN++'s "
                        f"base channels (default {NCSNPP['ngf']})", type=utils.positive_int)
    channel_mult: list = _setting(None, "ncsnpp: channels per resolution, times --ngf (default "
                                  f"{' '.join(map(str, NCSNPP['channel_mult']))})", type=utils.positive_int, nargs="+")
    num_blocks: int = _setting(None, f"ncsnpp: residual blocks per resolution (default {NCSNPP['num_blocks']})",
                               type=utils.positive_int)
    attn_resolutions: list = _setting(None, "ncsnpp: resolutions with self-attention (default: half the image size)",
                                      type=utils.positive_int, nargs="+")
    dropout: float = _setting(None, f"ncsnpp: dropout rate (default {NCSNPP['dropout']})", type=utils.rate)
    sigma_begin: float = _setting(None, "sigma_1, the largest noise level; auto: the largest distance between two "
                                  "training images (technique 1)", type=utils.number_or_auto(utils.positive_float))
    sigma_end: float = _setting(None, "sigma_L, the smallest", type=utils.positive_float)
    num_levels: int = _setting(None, "L, the number of noise levels; auto: technique 2's for the image size",
                               type=utils.number_or_auto(utils.positive_int))
    conditioning: str = _setting(None, "norm: CondInstanceNorm++ per level; scale: s(x)/sigma (technique 3); "
                                 "continuous: EDM's preconditioned denoiser, norms conditioned on ln(sigma)/4",
                                 choices=["norm", "scale", "continuous"])
    objective: str = _setting(None, "dsm: denoising score matching (eq. 5-6); ssm: annealed sliced score matching "
                              "(SSM-VR per level, weighted by sigma^2); edm: EDM's loss, ln sigma ~ N(--p-mean, "
                              "--p-std^2), continuous conditioning only (losses.OBJECTIVES)",
                              choices=lambda: list(losses.OBJECTIVES))
    sigma_data: float = _setting(None, "continuous conditioning: the data's standard deviation in the preconditioning; "
                                 "auto: measured on the training set", type=utils.number_or_auto(utils.positive_float))
    p_mean: float = _setting(losses.P_MEAN, "EDM's P_mean: ln sigma's mean (--objective edm, --sigma-dist lognormal)",
                             type=utils.finite_float)
    p_std: float = _setting(losses.P_STD, "EDM's P_std: ln sigma's standard deviation", type=utils.positive_float)
    sigma_dist: str = _setting("uniform", "the noise level of each training image: uniform over the levels (eq. 6), or "
                               "lognormal: EDM's ln sigma ~ N(--p-mean, --p-std^2) on the levels (Karras et al. 2022)",
                               choices=["uniform", "lognormal"])
    anneal_power: float = _setting(2.0, "lambda(sigma) = sigma^anneal_power (dsm)", type=utils.finite_float)
    dequantize: bool = _setting(None, "uniform dequantisation (x_uint8 + U(0, 1)) / 256, else x_uint8 / 255")
    ema: float = _setting(None, "EMA rate of the weights, 0 = off (technique 5)", type=utils.rate)
    ema_warmup: bool = _setting(None, "EMA rate min(--ema, (1 + n) / (10 + n)) at update n (TensorFlow's num_updates, "
                                "score_sde's EMA): short runs' averages forget the initial weights")
    ema_halflife: float = _setting(None, "EDM's EMA instead of a fixed rate: the weights' half-life in images, rate "
                                   "0.5^(batch / half-life)", type=utils.positive_float)
    ema_rampup: float = _setting(0.05, "with --ema-halflife: the half-life at most this share of the images seen so "
                                 "far (EDM's ramp-up; 0: none)", type=utils.rate)
    lr_warmup: float = _setting(None, "the learning rate ramps up linearly over this many images (EDM's lr ramp-up)",
                                type=utils.positive_float)
    seed: int = _setting(0, "fixes initialisation, data order and every noise draw", type=utils.seed)
    minutes: float = _setting(None, "also end the run after this much wall-clock time (a training budget in time)",
                              type=utils.positive_float)
    # checkpoints and figures
    snapshot_every: int = _setting(5_000, "steps between checkpoint_<step>.pt", type=utils.positive_int)
    sample_every: int = _setting(5_000, "steps between sample figures", type=utils.positive_int)
    n_samples: int = _setting(64, "images in each sample grid", type=utils.positive_int)
    sampler: str = _setting(None, "the figures' sampler (samplers.SAMPLERS)", choices=lambda: list(samplers.SAMPLERS))
    steps_each: int = _setting(None, "sampler steps per noise level (T)", type=utils.positive_int)
    step_lr: float = _setting(None, "sampler step_lr (eps / 2); auto: technique 4's for T",
                              type=utils.number_or_auto(utils.positive_float))
    denoise: bool = _setting(None, "end the sampler with x + sigma_L^2 s(x, L)")
    nfe: int = _setting(None, "the figures' network evaluations per image (None: the sampler's own on the trained "
                        "levels)", type=utils.positive_int)
    s_churn: float = _setting(None, "heun: EDM's S_churn in the figures (0: the ODE)", type=utils.nonnegative_float)
    # machinery
    device: str = _setting("auto", "auto, cpu, cuda or cuda:N", type=utils.device_name)
    num_workers: int = _setting(2, "data loader processes", type=utils.count)
    grad_accum: int = _setting(1, "micro-batches per optimizer step", type=utils.positive_int)
    amp: str = _setting("none", "bf16 autocast for the forward pass", choices=["none", "bf16"])
    channels_last: bool = _setting(False, "channels_last memory format (slower on CPUs: see bench.py)")
    compile: bool = _setting(False, "torch.compile the training forward and backward")


MAY_CHANGE = ("out", "resume", "data_root",                                # where things are
              "iters", "epochs", "minutes", "snapshot_every", "sample_every",   # the length, what is written when
              "n_samples", "sampler", "steps_each", "step_lr", "denoise", "nfe", "s_churn",   # the figures' sampler
              "device", "num_workers", "grad_accum", "amp", "channels_last", "compile")   # the machinery


def parser(fixed=()):
    """argparse flags generated from TrainConfig, less the `fixed` fields."""
    p = utils.arg_parser(__doc__)
    for f in (f for f in dataclasses.fields(TrainConfig) if f.name not in fixed):
        help, choices = f.metadata["help"], f.metadata.get("choices")
        if any(f.name in r for r in RECIPES.values()):
            help += " (default: the recipe's, " + ", ".join(f"{r} {v.get(f.name)}" for r, v in RECIPES.items()) + ")"
        if f.type is bool:
            kind = dict(action=argparse.BooleanOptionalAction if f.default is None else "store_true")
        else:       # callable choices: a table's keys (losses.OBJECTIVES, SAMPLERS), read now
            kind = dict(type=f.metadata.get("type", f.type), choices=choices() if callable(choices) else choices,
                        nargs=f.metadata.get("nargs"))
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=help, **kind)
    return p


def resolve(cfg):
    """Fill the settings left unset from the recipe and the data set."""
    recipe = {k: v for k, v in RECIPES[cfg.recipe].items() if getattr(cfg, k) is None}
    if cfg.sampler not in (None, RECIPES[cfg.recipe]["sampler"]):     # the recipe's budget is its own sampler's
        recipe.update({k: v for k, v in dict(nfe=None, s_churn=0.0).items() if k in recipe})
    if cfg.arch == "ncsnpp":
        spec = data.DATASETS[cfg.dataset]
        cfg = dataclasses.replace(cfg, **{k: v for k, v in NCSNPP.items() if getattr(cfg, k) is None},
                                  attn_resolutions=cfg.attn_resolutions or ncsnpp.attention_default(spec["image_size"]))
    cfg = dataclasses.replace(cfg, **recipe, ngf=cfg.ngf or data.DATASETS[cfg.dataset]["ngf"],
                              out=cfg.out or os.path.join(checkpoints.RUNS, cfg.dataset))
    if cfg.conditioning == "continuous" and cfg.sigma_data is None:
        cfg = dataclasses.replace(cfg, sigma_data="auto")
    return cfg


def check_config(cfg):
    """The settings that no single flag can check (on a resolved config); returns the error or None."""
    if cfg.sigma_begin != "auto" and cfg.sigma_begin <= cfg.sigma_end:       # sigma_end is always a number
        return f"--sigma-begin ({cfg.sigma_begin}) must be larger than --sigma-end ({cfg.sigma_end})"
    if cfg.num_levels != "auto" and cfg.num_levels < 2:
        return "--num-levels must be at least 2"
    if cfg.ngf < 2:
        return "--ngf must be at least 2"
    if cfg.ema_halflife and not cfg.ema:
        return "--ema-halflife sets the rate of the EMA, which --ema 0 turns off; drop one of them"
    if cfg.arch == "refinenet" and (given := [k for k in train_io.NCSNPP_FLAGS if getattr(cfg, k) is not None]):
        return f"--{given[0].replace('_', '-')} is a setting of --arch ncsnpp; drop it, or add --arch ncsnpp"
    if cfg.arch == "ncsnpp" and cfg.conditioning == "norm":
        return ("--arch ncsnpp takes any sigma: train it with --recipe ncsnv2 or edm (or --conditioning scale or "
                "continuous), not the paper's norm conditioning")
    try:
        train_io.tiny_network(cfg)                     # the network's own checks (image size, resolutions)
    except ValueError as e:
        return str(e)
    if cfg.objective == "edm" and cfg.conditioning != "continuous":
        return f"--objective edm trains EDM's denoiser: it needs --conditioning continuous, not {cfg.conditioning}"
    parts = int(os.environ.get("WORLD_SIZE", "1")) * cfg.grad_accum      # torchrun's processes x micro-batches
    if cfg.batch_size % parts:
        return (f"--batch-size {cfg.batch_size} must be divisible by processes x --grad-accum ({parts}); "
                f"e.g. --batch-size {parts * max(1, cfg.batch_size // parts)}")
    if cfg.resume and not os.path.isfile(os.path.join(cfg.out, "checkpoint.pt")):
        return f"--resume: {cfg.out} holds no checkpoint.pt to continue; check --out, or drop --resume to start"
    return None


def resolve_auto(cfg, train_images, device, state, say, pixels):
    """(cfg with its 'auto' settings as numbers, their names): the checkpoint's, else NCSNv2's techniques'."""
    auto = [k for k in ("sigma_begin", "num_levels", "step_lr", "sigma_data") if getattr(cfg, k) == "auto"]
    if state is not None:
        return dataclasses.replace(cfg, **{k: state["config"][k] for k in auto}), auto
    if "sigma_begin" in auto:        # a number was checked against --sigma-end by check_config
        cfg = dataclasses.replace(cfg, sigma_begin=common.max_pairwise_distance(train_images.to(device).float() / 255))
        say(f"--sigma-begin auto: {cfg.sigma_begin:.4g}, the largest distance between two of the "
            f"{min(len(train_images), common.MAX_DISTANCE_IMAGES):,} training images (technique 1)")
        if cfg.sigma_begin <= cfg.sigma_end:
            raise TrainError(f"sigma_begin {cfg.sigma_begin:.4g} must be larger than --sigma-end {cfg.sigma_end}")
    if "num_levels" in auto:
        D, gamma = train_images[0].numel(), common.ratio_for_dimension(train_images[0].numel())
        cfg = dataclasses.replace(cfg, num_levels=common.num_levels_for(cfg.sigma_begin, cfg.sigma_end, gamma))
        say(f"--num-levels auto: {cfg.num_levels} levels (ratio at most {gamma:.4f} for D = {D}, technique 2)")
    if "sigma_data" in auto:
        cfg = dataclasses.replace(cfg, sigma_data=pixels[1])
        say(f"--sigma-data auto: {cfg.sigma_data:.4f}, the standard deviation of the training pixels (EDM)")
    if "step_lr" in auto:
        step_lr = common.auto_step_lr(cfg.sigma_begin, cfg.sigma_end, cfg.num_levels, cfg.steps_each)
        cfg = dataclasses.replace(cfg, step_lr=step_lr)
        say(f"--step-lr auto: {step_lr:.4g} for T = {cfg.steps_each} (technique 4)")
    return cfg, auto


def run_length(cfg, steps_per_epoch):
    """(total steps, the limit that ends the run): a flag the user gave wins; both: the first."""
    limits = [(cfg.iters, f"--iters {cfg.iters}")] if cfg.iters else []
    if cfg.epochs:
        limits.append((cfg.epochs * steps_per_epoch, f"--epochs {cfg.epochs} x {steps_per_epoch} steps"))
    return min(limits) if limits else (ITERS, f"the paper's {ITERS:,} steps")

#----------------------------------------------------------------------------
# The objective, a batch and its draws, one optimizer step, the test loss, the EMA.

def objective(cfg):
    """loss(model, x, draws) of cfg's --objective, its options bound."""
    spec = losses.OBJECTIVES[cfg.objective]
    return functools.partial(spec.loss, **{k: getattr(cfg, k) for k in spec.options})


def batch_draws(cfg, shape, step, sigmas, stream=0):
    """losses.step_draws of a global batch of `shape` for cfg's objective and level distribution."""
    return losses.step_draws(cfg.seed, step, shape, sigmas, losses.OBJECTIVES[cfg.objective].needs,
                             losses.level_probs(sigmas, cfg.sigma_dist, cfg.p_mean, cfg.p_std), stream)


def batch(cfg, images, step, sigmas, rank=0, world=1):
    """This process's share of the global batch at `step`, (images in [0, 1], their draws); all shares are drawn."""
    lo, n = rank * len(images), len(images)
    draws = {k: v[lo:lo + n] for k, v in batch_draws(cfg, (n * world, *images.shape[1:]), step, sigmas).items()}
    x = data.to_unit(images, draws["u"] if cfg.dequantize else None)
    if data.DATASETS[cfg.dataset]["flip"]:
        x = torch.where(draws["flip"][:, None, None, None], x.flip(3), x)
    return x, draws


def train_step(model, optimizer, x, draws, loss, grad_accum=1, amp=False, lr=None):
    """One Adam step on `x` (this process's images in [0, 1]) and their `draws`: loss(model, x, draws) per image,
    averaged. Gradients build up over grad_accum micro-batches, all-reduced once (EDM's ddp_sync); amp: bf16
    autocast; lr: this step's learning rate (--lr-warmup's ramp), else the optimizer's. Returns this process's mean
    loss as a device scalar (no host sync)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    micro = len(x) // grad_accum
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=x.device)
    ddp = getattr(model, "_orig_mod", model)             # the DDP module under torch.compile
    for k in range(grad_accum):
        part = slice(k * micro, (k + 1) * micro)
        with contextlib.nullcontext() if world == 1 or k == grad_accum - 1 else ddp.no_sync():
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                value = loss(model, x[part], {name: d[part] for name, d in draws.items()}).mean() / grad_accum
            value.backward()
        total += value.detach()
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.step()
    return total


@torch.no_grad()
def test_loss(model, test_images, sigmas, step, cfg):
    """The loss of one test batch (a different batch each time, draws of stream 1, no flips)."""
    B = min(cfg.batch_size, len(test_images))
    t = (step // TEST_EVERY) % max(1, len(test_images) // B)
    images = test_images[t * B:(t + 1) * B].to(sigmas.device)
    draws = batch_draws(cfg, images.shape, step, sigmas, stream=1)
    with torch.autocast(sigmas.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
        return objective(cfg)(model, data.to_unit(images, draws["u"] if cfg.dequantize else None), draws).mean().item()


@torch.no_grad()
def ema_update(ema, net, rate):
    """NCSNv2's EMA, ema <- rate * ema + (1 - rate) * net, under no_grad: it never carries autograd history."""
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - rate)


#----------------------------------------------------------------------------
# The training loop.

def start(cfg):
    """The set-up of a run (processes, the run to continue, data, network, metrics log, config.json) as a namespace."""
    rank, world, device = utils.dist_init(cfg.device)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    spec = data.DATASETS[cfg.dataset]
    if cfg.amp == "bf16" and (slow := utils.slow_bf16(device)):
        say(slow)
    if rank == 0 and (freed := utils.remove_temporaries(cfg.out)):      # main() made --out a writable folder
        say(f"removed the temporary files of an interrupted write in {cfg.out} ({freed / 2**20:.1f} MiB)")
    state = train_io.resume_state(cfg)
    train_images, test_images = data.train_and_test(cfg.dataset, cfg.data_root, cfg.dataset_path, cfg.batch_size,
                                                     rank, world)
    measure = state is None and (cfg.conditioning == "continuous" or cfg.sigma_data == "auto")   # else unused
    pixels = data.pixel_stats(train_images) if measure else (math.nan, math.nan)          # or the checkpoint's
    cfg, auto = resolve_auto(cfg, train_images, device, state, say, pixels)
    model_args, data_id = train_io.network_args(cfg), data.identity(train_images)
    if state is not None:          # a setting newer than the checkpoint: the paper's recipe's value, or its default
        default = {**dataclasses.asdict(TrainConfig()), **RECIPES["ncsn"]}.get
        train_io.check_resume(state, cfg, model_args, data_id, MAY_CHANGE, default)
    train_io.figure_settings(cfg)                                   # refused now, not after hours of training
    steps_per_epoch = len(train_images) // cfg.batch_size
    total_steps, limit = run_length(cfg, steps_per_epoch)
    step, epoch, pos = (state["step"], state["epoch"], state["pos"]) if state else (0, 0, 0)
    if step >= total_steps and figures_drawn(cfg, step):    # at its target already: nothing trained or rewritten
        say(f"{cfg.out}/checkpoint.pt is at step {step:,}, the target ({limit}) is step {total_steps:,}: nothing to "
            "train, nothing rewritten; raise --iters or --epochs to train on")
        return types.SimpleNamespace(step=step, done=True)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    sigmas = common.geometric_sigmas(cfg.sigma_begin, cfg.sigma_end, cfg.num_levels).to(device)
    raw, model, ema, opt = train_io.build(cfg, model_args, sigmas, state, world, pixels[0])   # the Denoiser's mu
    log = train_io.MetricsLog(os.path.join(cfg.out, "metrics.csv"), step, rank == 0, cfg.batch_size, world)
    if rank == 0:
        train_io.save_config(cfg, os.path.join(cfg.out, "config.json"), world_size=world, device_used=str(device),
                             micro_batch=cfg.batch_size // (world * cfg.grad_accum), steps_per_epoch=steps_per_epoch,
                             total_steps=total_steps, train_images=len(train_images), test_images=len(test_images),
                             dataset_spec=spec, auto=auto)
    timed = f", or {cfg.minutes:g} minutes" if cfg.minutes else ""
    say((f"resumed at step {step} (epoch {epoch}, batch {pos}); " if state else "") +
        f"{cfg.dataset}: {len(train_images)} training images, {steps_per_epoch} steps/epoch; training to step "
        f"{total_steps:,} ({limit}{timed}); {world} process(es) on {device}; " + train_io.describe(cfg, raw))
    return types.SimpleNamespace(
        cfg=cfg, rank=rank, world=world, device=device, say=say, sigmas=sigmas, loss=objective(cfg), log=log,
        train_images=train_images, test_images=test_images, raw=raw, model=model, ema=ema, opt=opt,
        step=step, epoch=epoch, pos=pos, total_steps=total_steps, last_saved=step if state else None, done=False,
        parts=dict(net=raw, ema=ema, opt=opt, model_args=model_args, cfg=cfg, data=data_id))    # of every checkpoint


def figures_drawn(cfg, step):
    """Whether the figures of `step` are in the run's folder (else the loop's end draws them, resumed or not)."""
    return os.path.exists(os.path.join(cfg.out, f"samples_{step}.png"))


def train(cfg):
    """Train a RefineNet with annealed DSM as `cfg` (a resolved TrainConfig) says.
    Returns (final step, the name of the signal that stopped the run, or None)."""
    r = start(cfg)
    if r.done:                                          # at its target already (start said so)
        return r.step, None
    try:
        return loop(r)
    finally:
        r.log.close()                                   # its TensorBoard events


def loop(r):
    """The training loop of a started run (start): returns (final step, the stop signal's name or None)."""
    cfg, rank, world, device, sigmas, log, step, epoch, pos = (r.cfg, r.rank, r.world, r.device, r.sigmas, r.log,
                                                               r.step, r.epoch, r.pos)
    stream = data.batches(r.train_images, cfg.batch_size, cfg.seed, cfg.num_workers, epoch, pos, rank, world, device)
    bar = tqdm(total=r.total_steps, initial=step, disable=rank != 0, desc="training", unit="step", dynamic_ncols=True)
    last_saved, stopped, t0 = r.last_saved, False, time.time()
    with utils.StopSignal() as stop:
        try:        # one optimizer step an iteration; rank 0 alone writes files
            while step < r.total_steps and not stopped:
                epoch, pos, images = next(stream)
                x, draws = batch(cfg, images, step, sigmas, rank, world)
                lr = cfg.lr * min(1.0, (step + 1) * cfg.batch_size / cfg.lr_warmup) if cfg.lr_warmup else None
                loss = train_step(r.model, r.opt, x, draws, r.loss, cfg.grad_accum, cfg.amp == "bf16", lr)
                if r.ema is not None:
                    ema_update(r.ema, r.raw, train_io.ema_rate(cfg, step))
                step += 1
                log.pending.append((step, epoch, loss))
                bar.update(1)
                if rank == 0 and step % TEST_EVERY == 0:
                    log.tests[step] = test_loss(common.ScoreModel(r.raw, sigmas, strict=False), r.test_images, sigmas,
                                                step, cfg)
                # Snapshot and figures (a stop signal cuts the figures short).
                if step % cfg.snapshot_every == 0:
                    log.flush(step)
                    if rank == 0:
                        train_io.save_checkpoint(step, epoch, pos, True, **r.parts)
                    last_saved = step
                if step % cfg.sample_every == 0:      # every rank flushes (a collective), rank 0 draws
                    log.flush(step)
                if rank == 0 and step % cfg.sample_every == 0:
                    train_io.save_sample_figures(r.ema or r.raw, cfg, step, log, device, stop)
                # Stop? Alone, at once; with several processes, every LOG_EVERY steps, all at one step.
                if world == 1 or step % LOG_EVERY == 0:
                    stopped = stop.agreed(world, device)
                if train_io.out_of_time(cfg, t0, step, world, device):
                    r.total_steps = step        # --minutes: the run ends here, as if --iters said so
                if step % LOG_EVERY == 0 or step == r.total_steps or stopped:
                    bar.set_postfix_str(log.flush(step) or "", refresh=False)
        except train_io.NonFiniteLoss as e:
            kept = (f"{cfg.out}/checkpoint.pt of step {last_saved} is kept" if last_saved is not None
                    else "no checkpoint was written")
            raise TrainError(f"non-finite loss at step {e.args[0]}; stopped; {kept}") from None
        finally:
            bar.close(), stream.close()
        if rank == 0 and last_saved != step:
            train_io.save_checkpoint(step, epoch, pos, not stopped, **r.parts)
        if stopped:
            r.say(f"stopped by {stop.name} at step {step}: wrote {cfg.out}/checkpoint.pt; continue with --resume")
            return step, stop.name
        if rank == 0 and not figures_drawn(cfg, step) and \
                not train_io.save_sample_figures(r.ema or r.raw, cfg, step, log, device, stop):   # the last step's
            r.say(f"stopped by {stop.name} while drawing the figures of step {step}: {cfg.out}/checkpoint.pt is "
                  "complete; --resume draws them")
            return step, stop.name
    r.say(f"done: step {step}; wrote {cfg.out}/checkpoint.pt, metrics.csv, loss.png, samples_{step}.png, "
          f"process_{step}.png")
    return step, None


@utils.command()
def main(argv=None, **fixed):
    """The command line of train.py; train_mnist.py, train_cifar.py and train_celeba.py fix `dataset`.
    Returns the final step; exits with EXIT_STOPPED when a signal stopped the run."""
    p = parser(fixed)
    cfg = resolve(TrainConfig(**vars(p.parse_args(argv)), **fixed))
    if problem := check_config(cfg) or utils.check_out(cfg.out):
        p.error(problem)
    lead = int(os.environ.get("RANK", "0")) == 0                   # torchrun: rank 0 holds the folder
    with utils.folder_lock(cfg.out) if lead else contextlib.nullcontext():      # one writer per --out
        try:
            step, stopped = train(cfg)
        except RuntimeError as e:
            if not utils.is_out_of_memory(e):
                raise
            raise TrainError(f"out of memory with --ngf {cfg.ngf} and --batch-size {cfg.batch_size} on {cfg.device} "
                             f"({utils.first_line(e)[:80]}); use a smaller --ngf or --batch-size, or --grad-accum, "
                             "then --resume") from None
    if torch.distributed.is_initialized():
        utils.dist_exit(EXIT_STOPPED if stopped else 0)
    if stopped:
        raise SystemExit(EXIT_STOPPED)
    return step


if __name__ == "__main__":
    main()
