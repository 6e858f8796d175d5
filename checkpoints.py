"""Checkpoints: written atomically, read with weights_only=True, and loaded (ours or ermongroup/ncsn's)
into one typed record, Checkpoint, whose model is behind the one contract model(x, sigma). Training
builds the same record from its config (`record`), bench.py from its flags.
"""
import dataclasses
import glob
import inspect
import json
import math
import os
import re

import torch

import common
import edm
import ncsnpp
import samplers
import utils


class CheckpointError(utils.UserError):
    """A file that is not a usable NCSN checkpoint; the message names the file and the problem."""

#----------------------------------------------------------------------------
# Files: written atomically, read with weights_only=True.

def write_checkpoint(obj, path):
    """torch.save atomically (temporary file, synced, then renamed): read_checkpoint's counterpart."""
    with utils.atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def read_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True, turning every failure into one CheckpointError line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file" + (" (it is a folder)" if os.path.isdir(path) else ""))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... by cause
        msg = str(e)
        if re.search(r"Unsupported (global|class)|GLOBAL ", msg):   # a pickled reference to code
            raise CheckpointError(f"{path}: refused: the file holds pickled Python objects, not just tensors "
                                  "(loading it could run code); re-save a plain state_dict") from None
        why = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
        why = why.group(1).strip() if why else f"{type(e).__name__}: {(msg.strip().splitlines() or [''])[0]}"
        why = why if len(why) <= 100 else why[:why.rfind(" ", 0, 100)] + " ..."
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or truncated or damaged ({why})"
                              + snapshot_hint(path)) from None


def snapshot_hint(path):
    """Where a training run left whole copies beside a damaged checkpoint: its numbered snapshots."""
    snaps = [(int(m.group(1)), name) for name in os.listdir(os.path.dirname(os.path.abspath(path)))
             if (m := re.fullmatch(r"checkpoint_(\d+)\.pt", name)) and name != os.path.basename(path)]
    if not snaps:
        return "; use another file"
    step, name = max(snaps)
    return f"; {name} beside it is a whole snapshot of step {step} (to resume from it, copy it to checkpoint.pt)"


RUNS = "runs"                # where training writes its runs (train.py: runs/<dataset>): a script's default


def newest_run(prefer=None, root=RUNS):
    """(checkpoint.pt of the newest training run under `root`, why it was chosen), of data set `prefer` when one
    is there; None when there is no run. A run is a folder with checkpoint.pt and config.json; newest by the
    checkpoint's modification time."""
    runs = []
    for path in glob.glob(os.path.join(glob.escape(root), "**", "checkpoint.pt"), recursive=True):
        try:                                        # read only: another run's files are never touched
            with open(os.path.join(os.path.dirname(path), "config.json")) as f:
                config = json.load(f)
            runs.append((os.path.getmtime(path), path, config.get("dataset")))
        except (OSError, ValueError, AttributeError):
            continue
    if not runs:
        return None
    preferred = [r for r in runs if prefer is not None and r[2] == prefer]
    _, path, _ = max(preferred or runs)
    why = (f"the newest {prefer} run under {root}/" if preferred else f"the newest training run under {root}/")
    return path, why + " (no --checkpoint given)"

#----------------------------------------------------------------------------
# Networks: what a checkpoint's model_args describe.

ARCHS = {"refinenet": common.RefineNet, "ncsnpp": ncsnpp.NCSNpp}     # --arch: the score networks


def full_model_args(model_args):
    """model_args with the architecture's defaults filled in (a file may store only the settings it
    changed; one without 'arch' is the paper's RefineNet)."""
    arch = model_args.get("arch", "refinenet")
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    defaults = {k: p.default for k, p in inspect.signature(ARCHS[arch]).parameters.items() if k != "sigmas"
                and p.default is not inspect.Parameter.empty}
    return {**defaults, **model_args, "arch": arch}


def build_network(model_args, sigmas=None, sigma_data=math.nan, data_mean=math.nan):
    """The network model_args describe, as a checkpoint stores it: RefineNet or NCSN++ (`arch`), and
    for continuous conditioning EDM's Denoiser around it (sigma_data, data_mean: its buffers,
    measured on the training set). ScoreModel(build_network(...), sigmas) puts it behind the contract."""
    args = full_model_args(model_args)
    arch, conditioning = args.pop("arch"), args.get("conditioning")
    net = ARCHS[arch](**args, sigmas=sigmas if conditioning == "scale" else None)
    if conditioning != "continuous":
        return net
    levels = torch.full((args.get("num_classes", common.NUM_LEVELS),), math.nan) if sigmas is None else sigmas
    return edm.Denoiser(net, sigma_data, data_mean, levels)


def official_to_ours(state_dict):
    """Rename an official CondRefineNetDilated state dict: strip 'module.', and turn the
    RCU names '{i}_{j}_norm' / '{i}_{j}_conv' (1-based, 2 stages a block) into list indices."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        key = re.sub(r"\.(\d+)_(\d+)_(norm|conv)\.",
                     lambda m: f".{m.group(3)}s.{(int(m.group(1)) - 1) * 2 + int(m.group(2)) - 1}.", key)
        out[key] = value
    return out


def fit_state_dict(net, state_dict, path):
    """Load with strict=True after checking names and shapes, so a mismatch is one clear line."""
    expected = net.state_dict()
    what = f"{type(getattr(net, 'net', net)).__name__}({', '.join(f'{k}={v}' for k, v in net.model_args.items())})"
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not fit {what}: {len(missing)} missing (e.g. {missing[:1]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    for k, v in expected.items():
        if not torch.is_tensor(state_dict[k]) or state_dict[k].shape != v.shape:
            got = tuple(state_dict[k].shape) if torch.is_tensor(state_dict[k]) else type(state_dict[k]).__name__
            raise CheckpointError(f"{path}: tensor '{k}' has shape {got} but {what} expects {tuple(v.shape)}")
    net.load_state_dict(state_dict, strict=True)

#----------------------------------------------------------------------------
# The record every tool gets.

@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint. `model` is behind the contract, model(x, sigma) -> score (common.ScoreModel);
    `sigmas` its trained levels, descending: geometric_sigmas(*levels), levels = (sigma_begin,
    sigma_end, num_levels) as the run stored them; `sampler` and `settings` its recipe's sampler with the
    keyword settings of samplers.SAMPLERS' functions (the Langevin ones apply to 'als' whatever the
    recipe's sampler), `nfe` its recipe's budget (None: the sampler's own on the trained levels)."""
    model: torch.nn.Module
    path: str
    dataset: str
    sigmas: torch.Tensor
    levels: tuple
    recipe: str = "ncsn"
    sampler: str = "als"
    settings: dict = dataclasses.field(default_factory=dict)
    nfe: int = None
    sigma_data: float = math.nan
    data_mean: float = math.nan
    format: str = "ncsn-repro"
    step: int = None
    ema: bool = False

    @property
    def any_sigma(self):
        return self.model.any_sigma

    @property
    def model_args(self):
        return self.model.net.model_args

    @property
    def shape(self):
        """(C, H, W) of the images."""
        a = self.model_args
        return a["in_channels"], a["image_size"], a["image_size"]

    def label(self, weights=True):
        """For a legend: its recipe, network and width, training steps, and (weights) whether its EMA."""
        net = {"ncsnpp": "NCSN++"}.get(self.model_args.get("arch"), "RefineNet")
        steps = f", {self.step:,} steps" if self.step else ""
        return f"{self.recipe} recipe, {net} ngf {self.model_args['ngf']}{steps}" + \
            (" (EMA)" if self.ema and weights else "")

    @property
    def sigma_begin(self):
        return self.levels[0]

    @property
    def sigma_end(self):
        return self.levels[1]


def record(net, config, path, **found):
    """The Checkpoint of a network `net` (build_network's) trained with `config` (a TrainConfig as a
    dict, or any dict with its keys): what training and bench.py hand the samplers."""
    levels = [config.get(k) for k in ("sigma_begin", "sigma_end", "num_levels")]
    if None in levels:
        raise CheckpointError(f"{path}: no noise levels stored (config sigma_begin, sigma_end, num_levels)")
    if not (all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels)
            and levels[0] > levels[1] > 0 and levels[2] == int(levels[2]) >= 2):
        raise CheckpointError(f"{path}: its noise levels (sigma_begin, sigma_end, num_levels = {levels}) are not "
                              "numbers sigma_begin > sigma_end > 0 and num_levels >= 2; it was not saved by a run")
    sigmas = common.geometric_sigmas(*levels)
    known = {k for entry in samplers.SAMPLERS.values() for k in samplers.settings(entry.run)}
    settings = {k: v for k, v in config.items() if k in known and v is not None}        # the recipe's
    mean_and_sd = dict(sigma_data=float(net.sigma_data), data_mean=float(net.data_mean)) \
        if isinstance(net, edm.Denoiser) else {}
    return Checkpoint(common.ScoreModel(net, sigmas), os.fspath(path),
                      config.get("dataset") or ("mnist" if net.model_args["in_channels"] == 1 else "cifar10"),
                      sigmas, tuple(levels), config.get("recipe") or "ncsn", config.get("sampler") or "als", settings,
                      config.get("nfe"), **mean_and_sd, **found)


def load(path, map_location="cpu", ema=None):
    """The Checkpoint of this project's file or an official ermongroup/ncsn one, the model in eval mode.

    Official files are torch.save([state_dict, optimizer_state]) with keys prefixed 'module.';
    their in_channels, ngf and num_classes are read off the tensors (image size is not stored:
    28 is assumed for 1 channel, 32 otherwise, the official configs), their levels are the paper's.
    Our files are dicts with 'model', optional 'ema', 'model_args' and 'config'. ema: None uses the
    EMA weights when the file has them, True requires them, False takes the raw weights. A file
    that names no data set is taken as MNIST (1 channel) or CIFAR-10 (3), the official pair.
    """
    ckpt = read_checkpoint(path, map_location)
    if isinstance(ckpt, (list, tuple)) and len(ckpt) >= 1 and isinstance(ckpt[0], dict):
        state = official_to_ours(ckpt[0])
        if "begin_conv.weight" not in state or "normalizer.embed.weight" not in state:
            raise CheckpointError(f"{path}: a list, but not an official NCSN checkpoint "
                                  "(no begin_conv / normalizer tensors)")
        c_in, ngf = state["begin_conv.weight"].shape[1], state["begin_conv.weight"].shape[0]
        model_args = dict(in_channels=c_in, ngf=ngf, num_classes=state["normalizer.embed.weight"].shape[0],
                          image_size=28 if c_in == 1 else 32)
        config = dict(sigma_begin=common.SIGMA_BEGIN, sigma_end=common.SIGMA_END, num_levels=model_args["num_classes"])
        found = dict(format="official", ema=False)
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("model_args"), dict):
        model_args = full_model_args(ckpt["model_args"])
        use_ema = ckpt.get("ema") is not None if ema is None else ema
        if use_ema and ckpt.get("ema") is None:
            raise CheckpointError(f"{path}: EMA weights asked for, but the checkpoint has none (trained with --ema 0)")
        state = ckpt["ema"] if use_ema else ckpt["model"]
        config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        found = dict(format="ncsn-repro", step=ckpt.get("step"), ema=bool(use_ema))
    else:
        raise CheckpointError(f"{path}: not an NCSN checkpoint (expected this project's dict with 'model' and "
                              "'model_args', or the official [state_dict, optimizer_state] list)")
    try:
        net = build_network(model_args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model settings {model_args}: {e}") from None
    fit_state_dict(net, state, path)
    ck = record(net, config, path, **found)
    ck.model = ck.model.to(map_location).eval()
    return ck
