"""Shared pieces of the NCSN reproduction (Song & Ermon, 2019, "Generative Modeling by
Estimating Gradients of the Data Distribution").

Every script imports this one file. Sections, top to bottom:
    devices and small helpers (JSON, argparse types)
    noise levels
    toy data: the two-mode Gaussian mixture of Figs. 1 and 2
    CondInstanceNorm++ (the paper's Sec. 4.3 / appendix A)
    RefineNet: the 4-cascade dilated score network (CondRefineNetDilated of ermongroup/ncsn)
    losses: annealed denoising score matching (eq. 5-6), sliced score matching (SSM-VR)
    samplers: Langevin dynamics (eq. 4) and annealed Langevin dynamics (Algorithm 1)
    checkpoints: atomic saves, and loading ours or the official implementation's files
    distributed helpers, image data, and the training loop of train_mnist.py / train_cifar.py

The numbers match the official implementation (tests/test_official.py checks scores and
losses against outputs of ermongroup/ncsn on its own checkpoint files).
"""
import os
import re
import sys
import json
import math
import argparse
import datetime
import tempfile
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

#----------------------------------------------------------------------------
# Devices and small helpers.

def get_device(name="auto"):
    """torch.device for a `--device` flag: 'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name or ""):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    raise ValueError(f"--device {name!r}: unknown device; use auto, cpu, cuda or cuda:N")

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same extension); when the block succeeds it
    replaces `path`, when it fails it is removed: a crash never leaves half a file."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + name)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(obj, path):
    """Write JSON atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def positive_int(text):
    """argparse type: an integer > 0, refused with a message that names the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text):
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value

#----------------------------------------------------------------------------
# Noise levels.

def geometric_sigmas(sigma_begin=1.0, sigma_end=0.01, num_levels=10):
    """The noise levels {sigma_i}: a descending geometric sequence (the paper's Sec. 4.2).

    Label i always means sigmas[i], so label 0 is the largest noise. Computed in float64 and
    rounded once to float32, as the official code does (np.exp(np.linspace(log, log, L))).
    """
    if not (sigma_begin > sigma_end > 0):
        raise ValueError(f"noise levels need sigma_begin > sigma_end > 0, got {sigma_begin} and {sigma_end}")
    if num_levels < 2:
        raise ValueError(f"num_levels must be at least 2, got {num_levels}")
    logs = torch.linspace(math.log(sigma_begin), math.log(sigma_end), num_levels, dtype=torch.float64)
    return logs.exp().float()

#----------------------------------------------------------------------------
# Toy data of Figs. 1 and 2: p = 1/5 N((-5,-5), I) + 4/5 N((5,5), I).
# Perturbed by N(0, sigma^2 I), each component's covariance becomes (1 + sigma^2) I.

TOY_MEANS = torch.tensor([[5.0, 5.0], [-5.0, -5.0]])
TOY_WEIGHTS = torch.tensor([0.8, 0.2])


def _toy_component_logits(x, sigma):
    var = 1.0 + torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1) ** 2     # (N or 1, 1)
    d2 = ((x[:, None, :] - TOY_MEANS.to(x)) ** 2).sum(-1)                                          # (N, 2)
    logits = TOY_WEIGHTS.to(x).log() - 0.5 * d2 / var - math.log(2 * math.pi) - torch.log(var)  # log w_k N_k(x)
    return logits, var


def toy_log_prob(x, sigma=0.0):
    """log p_sigma(x) of the toy mixture, x of shape (N, 2); sigma a number or one per row."""
    return torch.logsumexp(_toy_component_logits(x, sigma)[0], dim=1)


def toy_score(x, sigma=0.0):
    """Exact score grad_x log p_sigma(x) = sum_k r_k(x) (mu_k - x) / (1 + sigma^2), r = responsibilities."""
    logits, var = _toy_component_logits(x, sigma)
    r = torch.softmax(logits, dim=1)                                                               # (N, 2)
    return (r[:, :, None] * (TOY_MEANS.to(x)[None] - x[:, None, :])).sum(1) / var


def toy_sample(n, generator=None):
    """n i.i.d. samples of the toy mixture."""
    k = torch.multinomial(TOY_WEIGHTS, n, replacement=True, generator=generator)
    return TOY_MEANS[k] + torch.randn(n, 2, generator=generator)

#----------------------------------------------------------------------------
# CondInstanceNorm++ (appendix A of the paper).

class CondInstanceNorm2dPlus(nn.Module):
    """Conditional instance normalisation++ for noise level `labels`.

    With mu_k, s_k the mean and standard deviation of channel k over space, and m, v the mean
    and standard deviation of (mu_1, ..., mu_C):
        z_k = gamma[i,k] * ((x_k - mu_k) / s_k + alpha[i,k] * (mu_k - m) / v) + beta[i,k]
    The paper writes the alpha term outside gamma; the official code (and so this one) puts it
    inside, the same family with alpha' = gamma * alpha. Official details kept: instance-norm
    eps 1e-5 on the biased variance, v = sqrt(unbiased variance of the means + 1e-5), and
    one embedding per level holding [gamma | alpha | beta], gamma and alpha ~ N(1, 0.02), beta 0.
    """

    def __init__(self, num_features, num_classes, bias=True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.embed = nn.Embedding(num_classes, (3 if bias else 2) * num_features)
        with torch.no_grad():
            self.embed.weight[:, :2 * num_features].normal_(1.0, 0.02)
            self.embed.weight[:, 2 * num_features:].zero_()

    def forward(self, x, labels):
        mu = x.mean(dim=(2, 3))                                        # (B, C)
        m = mu.mean(dim=1, keepdim=True)                               # (B, 1)
        v = torch.sqrt(mu.var(dim=1, keepdim=True) + 1e-5)             # unbiased, as torch.var
        h = F.instance_norm(x, eps=1e-5)                               # (x_k - mu_k) / s_k
        params = self.embed(labels)[..., None, None]                   # (B, 2C or 3C, 1, 1)
        gamma, alpha = params[:, :self.num_features], params[:, self.num_features:2 * self.num_features]
        h = gamma * (h + alpha * ((mu - m) / v)[..., None, None])
        if self.bias:
            h = h + params[:, 2 * self.num_features:]
        return h

#----------------------------------------------------------------------------
# RefineNet: the 4-cascade dilated score network (Sec. 4.3 and appendix A).
# Module names follow the official CondRefineNetDilated so its checkpoints map onto this one
# (see official_to_ours below); only its '{i}_{j}_norm' attribute names are made lists here.

def _conv3x3(c_in, c_out, dilation=1, bias=True):
    return nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=bias)


class ConvMeanPool(nn.Module):
    """Convolution, then 2x2 mean pooling: the one down-sampling step of the network."""

    def __init__(self, c_in, c_out, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)

    def forward(self, x):
        return F.avg_pool2d(self.conv(x), 2)


class CondResBlock(nn.Module):
    """Pre-activation residual block: (CondIN++, ELU, conv) twice, plus a shortcut.

    `down` starts a new stage. With dilation 1 it halves the resolution (ConvMeanPool); with a
    dilation > 1 the dilated convolutions stand in for down-scaling and the size stays (the
    official code's resample='down' with dilation). The channel change happens in conv2 of a
    `down` block and in conv1 otherwise, as in the official network.
    """

    def __init__(self, c_in, c_out, num_classes, down=False, dilation=1):
        super().__init__()
        c_mid = c_in if down else c_out
        self.normalize1 = CondInstanceNorm2dPlus(c_in, num_classes)
        self.conv1 = _conv3x3(c_in, c_mid, dilation)
        self.normalize2 = CondInstanceNorm2dPlus(c_mid, num_classes)
        if down and dilation == 1:
            self.conv2 = ConvMeanPool(c_mid, c_out, 3)
            self.shortcut = ConvMeanPool(c_in, c_out, 1)
        else:
            self.conv2 = _conv3x3(c_mid, c_out, dilation)
            self.shortcut = _conv3x3(c_in, c_out, dilation) if (down or c_in != c_out) else None

    def forward(self, x, labels):
        h = self.conv1(F.elu(self.normalize1(x, labels)))
        h = self.conv2(F.elu(self.normalize2(h, labels)))
        return h + (x if self.shortcut is None else self.shortcut(x))


class CondRCUBlock(nn.Module):
    """Residual conv units: n_blocks times x <- x + (CondIN++, ELU, conv3x3) x n_stages."""

    def __init__(self, features, n_blocks, n_stages, num_classes):
        super().__init__()
        self.n_blocks, self.n_stages = n_blocks, n_stages
        self.norms = nn.ModuleList([CondInstanceNorm2dPlus(features, num_classes) for _ in range(n_blocks * n_stages)])
        self.convs = nn.ModuleList([_conv3x3(features, features, bias=False) for _ in range(n_blocks * n_stages)])

    def forward(self, x, labels):
        for i in range(self.n_blocks):
            h = x
            for j in range(i * self.n_stages, (i + 1) * self.n_stages):
                h = self.convs[j](F.elu(self.norms[j](h, labels)))
            x = x + h
        return x


class CondMSFBlock(nn.Module):
    """Multi-resolution fusion: CondIN++ and conv3x3 per input, bilinear up-sampling, sum."""

    def __init__(self, in_planes, features, num_classes):
        super().__init__()
        self.norms = nn.ModuleList([CondInstanceNorm2dPlus(c, num_classes) for c in in_planes])
        self.convs = nn.ModuleList([_conv3x3(c, features) for c in in_planes])

    def forward(self, xs, labels, size):
        out = 0
        for x, norm, conv in zip(xs, self.norms, self.convs):
            h = conv(norm(x, labels))
            if h.shape[2:] != size:
                h = F.interpolate(h, size=size, mode="bilinear", align_corners=True)
            out = out + h
        return out


class CondCRPBlock(nn.Module):
    """Chained residual pooling with average pooling (5x5, stride 1), as the official network."""

    def __init__(self, features, n_stages, num_classes):
        super().__init__()
        self.norms = nn.ModuleList([CondInstanceNorm2dPlus(features, num_classes) for _ in range(n_stages)])
        self.convs = nn.ModuleList([_conv3x3(features, features, bias=False) for _ in range(n_stages)])

    def forward(self, x, labels):
        x = F.elu(x)
        path = x
        for norm, conv in zip(self.norms, self.convs):
            path = conv(F.avg_pool2d(norm(path, labels), 5, stride=1, padding=2))
            x = x + path
        return x


class CondRefineBlock(nn.Module):
    """One RefineNet cascade: RCU per input, fusion, chained residual pooling, output RCU."""

    def __init__(self, in_planes, features, num_classes, start=False, end=False):
        super().__init__()
        self.adapt_convs = nn.ModuleList([CondRCUBlock(c, 2, 2, num_classes) for c in in_planes])
        self.msf = None if start else CondMSFBlock(in_planes, features, num_classes)
        self.crp = CondCRPBlock(features, 2, num_classes)
        self.output_convs = CondRCUBlock(features, 3 if end else 1, 2, num_classes)

    def forward(self, xs, labels, size):
        hs = [adapt(x, labels) for adapt, x in zip(self.adapt_convs, xs)]
        h = hs[0] if self.msf is None else self.msf(hs, labels, size)
        return self.output_convs(self.crp(h, labels), labels)


class RefineNet(nn.Module):
    """Noise conditional score network s_theta(x, i) (the paper's Sec. 4.3).

    Four cascades of conditional residual blocks with ngf, 2ngf, 2ngf, 2ngf channels: stage 2
    halves the resolution by a mean pool, stages 3 and 4 use dilation 2 and 4 instead of
    further down-scaling; four RefineNet cascades fuse them back. Input x in [0, 1] (mapped
    to 2x - 1 inside), labels = noise-level indices; returns the score, shaped like x.
    RefineNet(1, 64) has 7,638,657 parameters and RefineNet(3, 128) 30,117,635, as the
    official MNIST and CIFAR-10 models. The 28x28 and 32x32 networks are the same module (the
    official 28x28 padding adjustment only applies to a stride-2 block this network lacks);
    image_size is kept for the record and checked to be even.
    """

    def __init__(self, in_channels, ngf, num_classes=10, image_size=32):
        super().__init__()
        if in_channels < 1 or ngf < 2 or num_classes < 1:
            raise ValueError(f"RefineNet needs in_channels >= 1, ngf >= 2, num_classes >= 1; got {in_channels}, {ngf}, {num_classes}")
        if image_size % 2:
            raise ValueError(f"RefineNet needs an even image_size, got {image_size}")
        self.model_args = dict(in_channels=in_channels, ngf=ngf, num_classes=num_classes, image_size=image_size)
        n = num_classes
        self.begin_conv = nn.Conv2d(in_channels, ngf, 3, padding=1)
        self.res1 = nn.ModuleList([CondResBlock(ngf, ngf, n), CondResBlock(ngf, ngf, n)])
        self.res2 = nn.ModuleList([CondResBlock(ngf, 2 * ngf, n, down=True), CondResBlock(2 * ngf, 2 * ngf, n)])
        self.res3 = nn.ModuleList([CondResBlock(2 * ngf, 2 * ngf, n, down=True, dilation=2),
                                   CondResBlock(2 * ngf, 2 * ngf, n, dilation=2)])
        self.res4 = nn.ModuleList([CondResBlock(2 * ngf, 2 * ngf, n, down=True, dilation=4),
                                   CondResBlock(2 * ngf, 2 * ngf, n, dilation=4)])
        self.refine1 = CondRefineBlock([2 * ngf], 2 * ngf, n, start=True)
        self.refine2 = CondRefineBlock([2 * ngf, 2 * ngf], 2 * ngf, n)
        self.refine3 = CondRefineBlock([2 * ngf, 2 * ngf], ngf, n)
        self.refine4 = CondRefineBlock([ngf, ngf], ngf, n, end=True)
        self.normalizer = CondInstanceNorm2dPlus(ngf, n)
        self.end_conv = nn.Conv2d(ngf, in_channels, 3, padding=1)

    def forward(self, x, labels):
        h = self.begin_conv(2 * x - 1)
        layers = []
        for stage in (self.res1, self.res2, self.res3, self.res4):
            for block in stage:
                h = block(h, labels)
            layers.append(h)                                    # sizes: full, 1/2, 1/2, 1/2
        l1, l2, l3, l4 = layers
        h = self.refine1([l4], labels, l4.shape[2:])
        h = self.refine2([l3, h], labels, l3.shape[2:])
        h = self.refine3([l2, h], labels, l2.shape[2:])
        h = self.refine4([l1, h], labels, l1.shape[2:])
        return self.end_conv(F.elu(self.normalizer(h, labels)))

#----------------------------------------------------------------------------
# Losses.

def dsm_loss(score_net, x, labels, sigmas, anneal_power=2.0, noise=None, reduction="mean"):
    """Annealed denoising score matching, the paper's eq. (5)-(6) with lambda(sigma) = sigma^2.

        l_i = 1/2 || s(x~, i) + (x~ - x) / sigma_i^2 ||^2 * sigma_i^anneal_power,
        x~ = x + sigma_i z,  z = noise ~ N(0, I),
    averaged over the batch (reduction='mean') or returned per example ('none').
    The target is written -(x~ - x) / sigma^2 as in eq. (5) and the official code.
    """
    sigmas = sigmas.to(x.device)
    used = sigmas[labels].view(-1, *([1] * (x.dim() - 1)))          # (B, 1, 1, 1)
    noise = torch.randn_like(x) if noise is None else noise
    perturbed = x + noise * used
    target = -(perturbed - x) / used ** 2
    score = score_net(perturbed, labels)
    per_example = 0.5 * (score - target).flatten(1).pow(2).sum(1) * used.flatten() ** anneal_power
    return per_example.mean() if reduction == "mean" else per_example


def sliced_score_matching_vr(score_fn, x, n_particles=1, vectors=None):
    """Sliced score matching with variance reduction (SSM-VR; Song et al. 2019, Algorithm 1).

        J = E_x E_v [ v^T grad_x(s(x)) v + 1/2 ||s(x)||^2 ],   v ~ N(0, I),
    the Hessian-vector product v^T grad(s) v taken by one extra backward pass of v^T s(x),
    never the full Jacobian. score_fn maps a (N, ...) batch to scores of the same shape.
    vectors: optional projections, shape (n_particles, *x.shape) or x.shape.
    Returns the scalar loss (mean over particles and batch), differentiable in score_fn's
    parameters.
    """
    xs = x.detach().unsqueeze(0).expand(n_particles, *x.shape).reshape(-1, *x.shape[1:])
    xs.requires_grad_(True)
    v = torch.randn_like(xs) if vectors is None else vectors.reshape(xs.shape).to(xs)
    with torch.enable_grad():
        s = score_fn(xs)
        vjp = torch.autograd.grad((s * v).sum(), xs, create_graph=True)[0]  # v^T grad_x s, per row
    loss1 = 0.5 * s.flatten(1).pow(2).sum(1)                  # 1/2 ||s(x)||^2
    loss2 = (vjp * v).flatten(1).sum(1)                       # v^T grad_x s(x) v
    return (loss1 + loss2).mean()

#----------------------------------------------------------------------------
# Samplers.

@torch.no_grad()
def langevin_dynamics(score_fn, x, step_size, n_steps, *, randn_like=torch.randn_like):
    """Langevin dynamics, the paper's eq. (4): x <- x + step_size/2 * s(x) + sqrt(step_size) z.

    score_fn(x) is called under torch.no_grad(). Returns the final x (a new tensor).
    """
    for _ in range(n_steps):
        x = x + 0.5 * step_size * score_fn(x) + math.sqrt(step_size) * randn_like(x)
    return x


@torch.no_grad()
def annealed_langevin_dynamics(score_net, x, sigmas, n_steps_each=100, step_lr=2e-5, *,
                               denoise=False, keep_levels=True, callback=None, randn_like=torch.randn_like):
    """Annealed Langevin dynamics (the paper's Algorithm 1), as the official sampler.

    For each level i = 0, ..., L-1 (sigma descending) and n_steps_each steps:
        alpha_i = step_lr * (sigma_i / sigma_L)^2
        x <- x + alpha_i * s(x, i) + sqrt(2 alpha_i) z
    which is the paper's annealed Langevin algorithm (Algorithm 1 of arXiv:1907.05600:
    alpha_i = eps sigma_i^2 / sigma_L^2, x <- x + alpha_i/2 s + sqrt(alpha_i) z) with
    eps = 2 * step_lr. The paper prints eps = 2e-5; its official code, which made its
    samples, runs this update with step_lr = 2e-5 (so eps = 4e-5), the default here.
    Runs without autograd and keeps no trajectory: memory is O(batch). With denoise, one
    last step x <- x + sigma_L^2 s(x, L-1) removes the remaining noise.

    Args:
        score_net: callable (x, labels) -> score; labels index sigmas.
        x: starting point, e.g. torch.rand (uniform noise) for images.
        keep_levels: also return the state at the end of each level (for Figs. 4b, 5b).
        callback: optional f(level, step, x, score) called after each update (health checks,
            custom snapshots); whatever it keeps is its own business.
    Returns:
        (x, levels): final sample, and the list of the L end-of-level states (empty unless
        keep_levels), each a clone on x's device.
    """
    sigmas = [float(s) for s in sigmas]
    levels = []
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i, sigma in enumerate(sigmas):
        labels.fill_(i)
        alpha = step_lr * (sigma / sigmas[-1]) ** 2
        for step in range(n_steps_each):
            score = score_net(x, labels)
            x = x + alpha * score + math.sqrt(2 * alpha) * randn_like(x)
            if callback is not None:
                callback(i, step, x, score)
        if keep_levels:
            levels.append(x.clone())
    if denoise:
        x = x + sigmas[-1] ** 2 * score_net(x, labels)
    return x, levels

#----------------------------------------------------------------------------
# Checkpoints: atomic saves; loading ours or the official implementation's files.

class CheckpointError(ValueError):
    """A file that is not a usable NCSN checkpoint; the message names the file and the problem."""


def atomic_save(obj, path):
    """torch.save atomically, synced to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


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


def _fit_state_dict(net, state_dict, path):
    """Load with strict=True after checking names and shapes, so a mismatch is one clear line."""
    expected = net.state_dict()
    what = "RefineNet(" + ", ".join(f"{k}={v}" for k, v in net.model_args.items()) + ")"
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
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({why[:100]})") from None


def load_score_net(path, map_location="cpu", ema=None):
    """Load a RefineNet from this project's checkpoint or an official ermongroup/ncsn file.

    Official files are torch.save([state_dict, optimizer_state]) with keys prefixed 'module.';
    their in_channels, ngf and num_classes are read off the tensors (image size is not stored:
    28 is assumed for 1 channel, 32 otherwise, the official configs). Our files are dicts with
    'model', optional 'ema', 'model_args' and 'config'. ema: None uses the EMA weights when the
    file has them, True requires them, False takes the raw weights.
    Returns (net in eval mode, info dict: format, model_args, sigma settings, step, ema).
    """
    ckpt = read_checkpoint(path, map_location)
    info = {"path": os.fspath(path)}
    if isinstance(ckpt, (list, tuple)) and len(ckpt) >= 1 and isinstance(ckpt[0], dict):
        state = official_to_ours(ckpt[0])
        if "begin_conv.weight" not in state or "normalizer.embed.weight" not in state:
            raise CheckpointError(f"{path}: a list, but not an official NCSN checkpoint (no begin_conv / normalizer tensors)")
        c_in, ngf = state["begin_conv.weight"].shape[1], state["begin_conv.weight"].shape[0]
        model_args = dict(in_channels=c_in, ngf=ngf, num_classes=state["normalizer.embed.weight"].shape[0],
                          image_size=28 if c_in == 1 else 32)
        info.update(format="official", step=None, ema=False, dataset="mnist" if c_in == 1 else "cifar10",
                    sigma_begin=1.0, sigma_end=0.01, num_levels=model_args["num_classes"])
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("model_args"), dict):
        model_args = dict(ckpt["model_args"])
        use_ema = ckpt.get("ema") is not None if ema is None else ema
        if use_ema and ckpt.get("ema") is None:
            raise CheckpointError(f"{path}: EMA weights asked for, but the checkpoint has none (trained with --ema 0)")
        state = ckpt["ema"] if use_ema else ckpt["model"]
        config = ckpt.get("config") or {}
        info.update(format="ncsn-repro", step=ckpt.get("step"), ema=bool(use_ema),
                    **{k: config[k] for k in ("sigma_begin", "sigma_end", "num_levels", "dataset") if k in config})
    else:
        raise CheckpointError(f"{path}: not an NCSN checkpoint (expected this project's dict with 'model' and "
                              "'model_args', or the official [state_dict, optimizer_state] list)")
    try:
        net = RefineNet(**model_args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model settings {model_args}: {e}") from None
    _fit_state_dict(net, state, path)
    info["model_args"] = model_args
    return net.to(map_location).eval(), info

#----------------------------------------------------------------------------
# Distributed helpers: one code path, a single process is world size 1.

def dist_init(device_name="auto"):
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPUs); else a single process.
    Returns (rank, world_size, device)."""
    device = get_device(device_name)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    # generous timeout: the other ranks wait while rank 0 samples figures
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(hours=2))
    return rank, world, device


def dist_exit(code=0):
    """Leave the process group and exit. Barrier, destroy, flush, os._exit: gloo's worker threads
    can otherwise abort the interpreter at exit ("terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        try:
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)

#----------------------------------------------------------------------------
# Image data: whole data sets as uint8 tensors (N, C, H, W); MNIST and CIFAR-10 fit in memory.

DATASETS = {  # name: channels, image size, random horizontal flips (as the official configs)
    "mnist": dict(channels=1, image_size=28, flip=False),
    "cifar10": dict(channels=3, image_size=32, flip=True),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class DataError(RuntimeError):
    """A data set that cannot be found or read; the message says what to put where."""


def load_image_folder(path, channels, image_size, split=None, flag="--dataset-path"):
    """uint8 (N, C, H, W) of every image under `path` (recursively, sorted), converted to L or
    RGB and, if their size differs, resized and centre-cropped. split='train' / 'test' keeps
    all but every 20th image / every 20th image."""
    from PIL import Image
    import torchvision.transforms.functional as TF
    if not os.path.isdir(path):
        raise DataError(f"{flag} {path}: no such folder")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
    if len(files) < 2:
        raise DataError(f"{flag} {path}: found {len(files)} images ({', '.join(IMAGE_EXTENSIONS)}); need at least 2")
    if split is not None:
        files = [f for i, f in enumerate(files) if (i % 20 == 0) == (split == "test")]
    images = []
    for f in files:
        img = Image.open(f).convert("L" if channels == 1 else "RGB")
        if img.size != (image_size, image_size):
            img = TF.center_crop(TF.resize(img, image_size), image_size)
        images.append(TF.pil_to_tensor(img))
    return torch.stack(images)


def load_images(dataset, train, data_root="./data", dataset_path=None):
    """uint8 images (N, C, H, W) of the train or test split: torchvision's MNIST / CIFAR10 under
    data_root (downloaded when missing), or a folder of images (dataset_path)."""
    spec = DATASETS[dataset]
    if dataset_path:
        return load_image_folder(dataset_path, spec["channels"], spec["image_size"], "train" if train else "test")
    import torchvision
    try:
        if dataset == "mnist":
            return torchvision.datasets.MNIST(data_root, train=train, download=True).data[:, None].contiguous()
        data = torchvision.datasets.CIFAR10(data_root, train=train, download=True).data      # (N, 32, 32, 3)
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        where = {"mnist": f"{os.path.join(data_root, 'MNIST', 'raw')}: train-images-idx3-ubyte.gz, "
                          "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
                 "cifar10": f"{data_root}: cifar-10-python.tar.gz (or its folder cifar-10-batches-py)"}[dataset]
        raise DataError(f"{dataset} is not under --data-root {data_root} and could not be downloaded ({reason}); "
                        f"copy these files into {where}, or pass --dataset-path FOLDER of images") from None


class _Batches(torch.utils.data.Dataset):
    """dataset[list of indices] -> a uint8 batch, so a DataLoader gathers whole batches in workers."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        return self.images[idx]


def epoch_batches(n, batch_size, seed, epoch, start, rank=0, world_size=1):
    """Index lists of one epoch from batch `start` on: a permutation fixed by (seed, epoch),
    cut into global batches (the last partial one dropped), each rank taking its slice."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    per_rank = batch_size // world_size
    for b in range(start, n // batch_size):
        lo = b * batch_size + rank * per_rank
        yield perm[lo:lo + per_rank].tolist()

#----------------------------------------------------------------------------
# Training (Sec. 4.2 and 5): annealed DSM with Adam; resumable, DDP, grad accumulation,
# bf16 autocast, EMA. train_mnist.py and train_cifar.py only choose the data set and defaults.

TEST_EVERY = 100     # steps between test losses (the official code's)
LOG_EVERY = 10       # steps between host syncs: metrics rows, finiteness and stop checks


class NonFiniteLoss(RuntimeError):
    pass


def _step_generator(device, seed, step, stream):
    """A generator fixed by (seed, step, stream): every random draw of a step is the same
    whatever the number of processes, gradient-accumulation steps or restarts."""
    return torch.Generator(device=device).manual_seed(hash((seed, step, stream)) & (2 ** 63 - 1))


def _perturbation(cfg, step, shape, num_levels, device, stream=0):
    """Noise-level labels, dequantisation noise, DSM noise and flips for a global batch."""
    g = _step_generator(device, cfg["seed"], step, stream)
    labels = torch.randint(num_levels, (shape[0],), generator=g, device=device)   # one random level each
    u = torch.rand(shape, generator=g, device=device)
    z = torch.randn(shape, generator=g, device=device)
    flip = torch.rand(shape[0], generator=g, device=device) < 0.5
    return labels, u, z, flip


def _dequantize(images, u):
    """Uniform dequantisation as the official code: x = x_01 * 255/256 + U(0, 1/256) = (x_uint8 + u) / 256."""
    return (images.float() + u) / 256.0


@torch.no_grad()
def ema_update(ema, net, rate):
    """Exponential moving average of the weights (NCSNv2): ema <- rate * ema + (1 - rate) * net.
    Under no_grad, so the average never carries autograd history from one step to the next."""
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - rate)


def _train_step(model, opt, images, sigmas, step, cfg, rank, world, device):
    B, K = cfg["batch_size"], cfg["grad_accum"]
    per_rank, micro = B // world, B // (world * K)
    labels, u, z, flip = _perturbation(cfg, step, (B, *images.shape[1:]), len(sigmas), device)
    lo = rank * per_rank
    x = _dequantize(images, u[lo:lo + per_rank])
    if cfg["flip"]:
        x = torch.where(flip[lo:lo + per_rank, None, None, None], x.flip(3), x)
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for k in range(K):
        mine, glob = slice(k * micro, (k + 1) * micro), slice(lo + k * micro, lo + (k + 1) * micro)
        # all-reduce gradients only on the last micro-batch (EDM's ddp_sync)
        ddp = getattr(model, "_orig_mod", model)             # the DDP module under torch.compile
        sync = contextlib.nullcontext() if (world == 1 or k == K - 1) else ddp.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["amp"] == "bf16"):
                loss = dsm_loss(model, x[mine], labels[glob], sigmas, cfg["anneal_power"], noise=z[glob]) / K
            loss.backward()
        total += loss.detach()
    opt.step()
    return total


@torch.no_grad()
def _test_loss(net, test_images, sigmas, step, cfg, device):
    B = min(cfg["batch_size"], len(test_images))
    t = (step // TEST_EVERY) % max(1, len(test_images) // B)
    images = test_images[t * B:(t + 1) * B].to(device)
    labels, u, z, _ = _perturbation(cfg, step, images.shape, len(sigmas), device, stream=1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["amp"] == "bf16"):
        return dsm_loss(net, _dequantize(images, u), labels, sigmas, cfg["anneal_power"], noise=z).item()


def save_figure(fig, path, dpi=110):
    """Save a matplotlib figure atomically (temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def _save_png(path, array):
    from PIL import Image
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp)


def save_image_grid(path, images, nrow):
    """images (N, C, H, W) in [0, 1] (clamped) -> one PNG grid, written atomically; tiles under
    64 pixels are enlarged (nearest neighbour) so that 28x28 digits can be seen."""
    import torchvision
    images = images.detach().float().clamp(0, 1).cpu()
    scale = max(1, round(64 / images.shape[-1]))
    images = F.interpolate(images, scale_factor=scale, mode="nearest") if scale > 1 else images
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    _save_png(path, (grid.permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy())


def save_process_figure(path, levels, sigmas, rows=8):
    """The generation process (Figs. 4b, 5b): one row per sample, one column per noise level."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchvision
    L, n = len(levels), min(rows, len(levels[0]))
    tiles = torch.stack([lv[:n].float().clamp(0, 1).cpu() for lv in levels], 1).flatten(0, 1)   # (n*L, C, H, W)
    grid = torchvision.utils.make_grid(tiles, nrow=L, padding=2, pad_value=1.0).permute(1, 2, 0).numpy()
    w = levels[0].shape[-1] + 2
    fig, ax = plt.subplots(figsize=(1.0 * L + 0.6, 1.0 * n + 0.8))
    ax.imshow(grid, cmap="gray" if grid.shape[2] == 1 else None)
    ax.set_xticks([w * (i + 0.5) for i in range(L)], [f"{float(s):.3g}" for s in sigmas], fontsize=8)
    ax.set_yticks([]), ax.set_xlabel(r"end of noise level $\sigma_i$")
    ax.set_title("Annealed Langevin dynamics: state at the end of each level")
    save_figure(fig, path, dpi=100)


def save_loss_figure(path, rows):
    """DSM loss against steps, train (per step and smoothed) and test (Fig. 3)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    test = [(r["step"], r["test_loss"]) for r in rows if r["test_loss"] != ""]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, loss, color="0.8", lw=0.5, label="train (per step)")
    w = max(1, min(len(loss) // 20, 500))
    if len(loss) >= w > 1:
        ax.plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, mode="valid"), color="C0", label=f"train (mean of {w})")
    if test:
        ax.plot(*zip(*test), "o-", color="C3", ms=3, lw=1, label="test")
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel("annealed DSM loss"), ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


METRICS_COLUMNS = ["step", "epoch", "loss", "test_loss", "images_per_s"]


def _read_metrics(path, upto):
    import csv
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= upto]
    for r in rows:
        r["step"], r["epoch"], r["loss"] = int(r["step"]), int(r["epoch"]), float(r["loss"])
        r["test_loss"] = float(r["test_loss"]) if r["test_loss"] else ""
    return rows


def _write_metrics(path, rows):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(",".join(METRICS_COLUMNS) + "\n")
        f.writelines(_metrics_line(r) for r in rows)


def _metrics_line(r):
    return f"{r['step']},{r['epoch']},{r['loss']:.6g},{r['test_loss'] if r['test_loss'] == '' else format(r['test_loss'], '.6g')},{r['images_per_s']}\n"


TRAIN_DEFAULTS = dict(      # the paper's settings (Sec. 5, appendix B.1) and the official configs
    data_root="./data",      # torchvision's data folder, downloaded into when missing
    batch_size=128,          # global batch per optimizer step (the paper's 128)
    epochs=500_000,          # effectively unbounded: --iters ends the run (as the official config)
    iters=200_000,           # optimizer steps (the paper: 200k)
    lr=1e-3,                 # Adam learning rate
    beta1=0.9,               # Adam beta1 (beta2 0.999)
    sigma_begin=1.0,         # sigma_1, the largest noise level
    sigma_end=0.01,          # sigma_L, the smallest
    num_levels=10,           # L geometric levels
    anneal_power=2.0,        # lambda(sigma) = sigma^2
    seed=0,                  # fixes initialisation, data order and every noise draw
    num_workers=2,           # data loader processes
    snapshot_every=5_000,    # steps between numbered checkpoints (the official snapshot_freq)
    sample_every=5_000,      # steps between sample grids and generation-process figures
    n_samples=64,            # images per sample grid
    steps_each=100,          # annealed Langevin steps per level (T)
    step_lr=2e-5,            # annealed Langevin step_lr (the official sampler's)
    ema=0.0,                 # EMA rate of the weights; 0 = off (the paper has none; NCSNv2 uses 0.999)
)

RESUME_MUST_MATCH = ("dataset", "dataset_path", "batch_size", "sigma_begin", "sigma_end", "num_levels", "seed", "anneal_power")


def train(cfg):
    """Train a RefineNet with annealed DSM; cfg holds every flag of train_mnist.py / train_cifar.py.
    Returns the final step. Writes config.json, metrics.csv, checkpoints and figures under cfg['out']."""
    import copy
    import signal
    import time
    from tqdm import tqdm

    rank, world, device = dist_init(cfg["device"])
    out, B, K = cfg["out"], cfg["batch_size"], cfg["grad_accum"]
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    if B % (world * K):
        raise SystemExit(f"error: --batch-size {B} must be divisible by processes ({world}) x --grad-accum ({K})")
    ckpt_path, metrics_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "metrics.csv")
    state = None
    if os.path.exists(ckpt_path):
        if not cfg["resume"]:
            raise SystemExit(f"error: {out} already holds checkpoint.pt; pass --resume to continue it, or choose another --out")
        state = read_checkpoint(ckpt_path, map_location="cpu")
        if not isinstance(state, dict) or "optimizer" not in state:
            raise SystemExit(f"error: {ckpt_path}: not a training checkpoint of this project (no optimizer state)")
    elif cfg["resume"]:
        say(f"--resume: no checkpoint at {ckpt_path} yet; starting from scratch")

    spec = DATASETS[cfg["dataset"]]
    model_args = dict(in_channels=spec["channels"], ngf=cfg["ngf"], num_classes=cfg["num_levels"], image_size=spec["image_size"])
    if state is not None:
        if state["model_args"] != model_args:
            diff = ", ".join(f"{k} {state['model_args'].get(k)} (flags: {v})" for k, v in model_args.items()
                             if state["model_args"].get(k) != v)
            raise SystemExit(f"error: {ckpt_path} holds a different model: {diff}; resume with the same settings or another --out")
        diff = [f"--{k.replace('_', '-')} {state['config'].get(k)} (flags: {cfg[k]})" for k in RESUME_MUST_MATCH
                if state["config"].get(k) != cfg[k]]
        if diff:
            raise SystemExit(f"error: {ckpt_path} was trained with {', '.join(diff)}; resume with the same values")
    if rank != 0:                       # rank 0 goes first: it alone downloads a missing data set
        torch.distributed.barrier()
    train_images = load_images(cfg["dataset"], True, cfg["data_root"], cfg["dataset_path"])
    test_images = load_images(cfg["dataset"], False, cfg["data_root"], cfg["dataset_path"])
    if rank == 0 and world > 1:
        torch.distributed.barrier()
    steps_per_epoch = len(train_images) // B
    if steps_per_epoch == 0:
        raise SystemExit(f"error: the training set has {len(train_images)} images, fewer than one batch of {B}")
    total_steps = min(cfg["iters"], cfg["epochs"] * steps_per_epoch)

    torch.manual_seed(cfg["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sigmas = geometric_sigmas(cfg["sigma_begin"], cfg["sigma_end"], cfg["num_levels"]).to(device)
    raw = RefineNet(**model_args).to(device)
    if cfg["channels_last"]:
        raw = raw.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(raw).requires_grad_(False) if cfg["ema"] > 0 else None
    opt = torch.optim.Adam(raw.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], 0.999))
    step, epoch, pos = 0, 0, 0
    if state is not None:
        raw.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        for group in opt.param_groups:
            group["lr"] = cfg["lr"]
        if ema is not None:
            ema.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        step, epoch, pos = state["step"], state["epoch"], state["pos"]
        torch.set_rng_state(state["rng"]["torch"])
        say(f"resumed {ckpt_path} at step {step} (epoch {epoch}, batch {pos})")
    model = raw if world == 1 else torch.nn.parallel.DistributedDataParallel(
        raw, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:       # checkpoints still save raw's state dict: no '_orig_mod.' prefixes
        model = torch.compile(model)

    rows = _read_metrics(metrics_path, step) if rank == 0 else []
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        _write_metrics(metrics_path, rows)
        import platform
        import numpy
        import torchvision
        save_json(dict(cfg, world_size=world, device_used=str(device), micro_batch=B // (world * K),
                       steps_per_epoch=steps_per_epoch, total_steps=total_steps, train_images=len(train_images),
                       test_images=len(test_images), versions=dict(python=platform.python_version(), torch=torch.__version__,
                       torchvision=torchvision.__version__, numpy=numpy.__version__)), os.path.join(out, "config.json"))
    say(f"{cfg['dataset']}: {len(train_images)} training images, {steps_per_epoch} steps/epoch; training to step "
        f"{total_steps} (min of --iters {cfg['iters']} and --epochs {cfg['epochs']}); {world} process(es) on {device}; "
        f"RefineNet({spec['channels']}, {cfg['ngf']}): {sum(p.numel() for p in raw.parameters()):,} parameters")

    def checkpoint(numbered):
        if rank != 0:
            return
        ck = dict(model=raw.state_dict(), ema=None if ema is None else ema.state_dict(), optimizer=opt.state_dict(),
                  step=step, epoch=epoch, pos=pos, model_args=model_args, config=dict(cfg), rng=dict(torch=torch.get_rng_state()))
        atomic_save(ck, ckpt_path)
        if numbered:
            atomic_save(ck, os.path.join(out, f"checkpoint_{step}.pt"))

    def figures():
        if rank != 0:
            return
        net = (ema if ema is not None else raw).eval()
        tqdm.write(f"step {step}: sampling {cfg['n_samples']} images for the figures "
                   f"({cfg['num_levels']} x {cfg['steps_each']} network evaluations{', EMA weights' if ema is not None else ''})")
        g = torch.Generator(device=device).manual_seed(cfg["seed"])           # same start for every grid
        x0 = torch.rand(cfg["n_samples"], spec["channels"], spec["image_size"], spec["image_size"], generator=g, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["amp"] == "bf16"):
            x, levels = annealed_langevin_dynamics(net, x0, sigmas, cfg["steps_each"], cfg["step_lr"],
                                                   randn_like=lambda t: torch.randn(t.shape, generator=g, device=device))
        raw.train()
        save_image_grid(os.path.join(out, f"samples_{step}.png"), x, nrow=int(math.ceil(math.sqrt(len(x)))))
        save_process_figure(os.path.join(out, f"process_{step}.png"), levels, sigmas.tolist())
        save_loss_figure(os.path.join(out, "loss.png"), rows)

    stop = {"signal": None}
    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)                 # a second one stops at once
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    pending, tests = [], {}                                   # device losses not yet logged; step -> test loss
    last_saved, t_log, step_log = (step if state is not None else None), time.time(), step

    def flush_log():
        """One host sync: log the pending losses, stop on a non-finite one."""
        nonlocal t_log, step_log
        if not pending:
            return
        losses = torch.stack([l for _, l in pending])
        if world > 1:
            torch.distributed.all_reduce(losses)
            losses /= world
        values = losses.tolist()
        rate = (step - step_log) * B / max(time.time() - t_log, 1e-9)
        new = [dict(step=s, epoch=ep, loss=v, test_loss=tests.pop(s, ""), images_per_s=f"{rate:.1f}")
               for ((s, ep), _), v in zip(pending, values)]
        bad = [r["step"] for r in new if not math.isfinite(r["loss"])]
        if bad:
            raise NonFiniteLoss(bad[0])
        if rank == 0:
            rows.extend(new)
            with open(metrics_path, "a") as f:
                f.writelines(_metrics_line(r) for r in new)
        bar.set_postfix(loss=f"{values[-1]:.4g}", img_s=f"{rate:.0f}", refresh=False)
        pending.clear()
        t_log, step_log = time.time(), step

    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="training", unit="step", dynamic_ncols=True)
    stop_now = False       # with several processes, only a flag all ranks agreed on stops the run
    try:
        while step < total_steps and not stop_now:
            loader = torch.utils.data.DataLoader(
                _Batches(train_images), batch_size=None, num_workers=cfg["num_workers"], pin_memory=device.type == "cuda",
                sampler=list(epoch_batches(len(train_images), B, cfg["seed"], epoch, pos, rank, world)))
            for images in loader:
                loss = _train_step(model, opt, images.to(device, non_blocking=True), sigmas, step, cfg, rank, world, device)
                if ema is not None:
                    ema_update(ema, raw, cfg["ema"])
                step, pos = step + 1, pos + 1
                pending.append(((step, epoch), loss))
                bar.update(1)
                if rank == 0 and step % TEST_EVERY == 0:
                    tests[step] = _test_loss(raw, test_images, sigmas, step, cfg, device)
                if world == 1:
                    stop_now = stop["signal"] is not None
                elif step % LOG_EVERY == 0:                 # every rank must stop at the same step
                    flag = torch.tensor([stop["signal"] is not None], dtype=torch.float32, device=device)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    stop_now = bool(flag.item())
                    stop["signal"] = stop["signal"] or ("a signal on another rank" if stop_now else None)
                if step % LOG_EVERY == 0 or step == total_steps:
                    flush_log()
                if step % cfg["snapshot_every"] == 0:
                    flush_log()
                    checkpoint(numbered=True)
                    last_saved = step
                if step % cfg["sample_every"] == 0:
                    flush_log()
                    figures()
                if step >= total_steps or stop_now:
                    break
            else:
                epoch, pos = epoch + 1, 0
        flush_log()
        if last_saved != step:
            checkpoint(numbered=not stop_now)
        bar.close()
        if stop_now:
            say(f"\nstopped by {stop['signal']} at step {step}: wrote {ckpt_path}; continue with --resume")
        else:
            if step % cfg["sample_every"] != 0:
                figures()
            say(f"\ndone: step {step}; wrote {out}/checkpoint.pt, metrics.csv, loss.png, samples_{step}.png, process_{step}.png")
    except NonFiniteLoss as e:
        kept = f"{ckpt_path} (step {last_saved}) is kept" if last_saved is not None else "no checkpoint was written"
        raise SystemExit(f"error: non-finite loss at step {e.args[0]}; stopped; the last good checkpoint {kept}") from None
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return step


def train_main(argv, *, dataset, **defaults):
    """The command line of train_mnist.py and train_cifar.py: TRAIN_DEFAULTS, updated by the
    script's own (out, ngf)."""
    d = dict(TRAIN_DEFAULTS, **defaults)
    p = argparse.ArgumentParser(description=f"Train an NCSN (RefineNet + annealed DSM) on {dataset}.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    nonneg = lambda t: 0 if t == "0" else positive_int(t)
    def ema_rate(t):
        v = float(t)
        if not 0 <= v < 1:
            raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), got {t}")
        return v
    def device(t):
        if t not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", t):
            raise argparse.ArgumentTypeError(f"unknown device {t!r}; use auto, cpu, cuda or cuda:N")
        return t
    p.add_argument("--data-root", default=d["data_root"], help="torchvision data folder (downloaded when missing)")
    p.add_argument("--dataset-path", default=None, help="a folder of images to train on instead (every 20th held out)")
    p.add_argument("--out", default=d["out"], help="output folder")
    p.add_argument("--batch-size", type=positive_int, default=d["batch_size"], help="global batch per optimizer step")
    p.add_argument("--epochs", type=positive_int, default=d["epochs"], help="stop after this many epochs")
    p.add_argument("--iters", type=positive_int, default=d["iters"], help="stop after this many optimizer steps")
    p.add_argument("--lr", type=positive_float, default=d["lr"], help="Adam learning rate")
    p.add_argument("--beta1", type=positive_float, default=d["beta1"], help="Adam beta1")
    p.add_argument("--ngf", type=positive_int, default=d["ngf"], help="RefineNet width (first cascade)")
    p.add_argument("--sigma-begin", type=positive_float, default=d["sigma_begin"], help="largest noise level")
    p.add_argument("--sigma-end", type=positive_float, default=d["sigma_end"], help="smallest noise level")
    p.add_argument("--num-levels", type=positive_int, default=d["num_levels"], help="number of noise levels L")
    p.add_argument("--anneal-power", type=float, default=d["anneal_power"], help="lambda(sigma) = sigma^power")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=nonneg, default=d["num_workers"], help="data loader processes")
    p.add_argument("--snapshot-every", type=positive_int, default=d["snapshot_every"], help="steps between checkpoint_<step>.pt")
    p.add_argument("--sample-every", type=positive_int, default=d["sample_every"], help="steps between sample figures")
    p.add_argument("--n-samples", type=positive_int, default=d["n_samples"], help="images in each sample grid")
    p.add_argument("--steps-each", type=positive_int, default=d["steps_each"], help="sampler steps per noise level")
    p.add_argument("--step-lr", type=positive_float, default=d["step_lr"], help="sampler step_lr (eps / 2)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="bf16 autocast for the forward pass")
    p.add_argument("--ema", type=ema_rate, default=d["ema"], help="EMA rate of the weights (0 = off)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (slower on CPUs: see bench.py)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward and backward")
    cfg = vars(p.parse_args(argv))
    if cfg["sigma_begin"] <= cfg["sigma_end"]:
        p.error(f"--sigma-begin ({cfg['sigma_begin']}) must be larger than --sigma-end ({cfg['sigma_end']})")
    if cfg["num_levels"] < 2:
        p.error("--num-levels must be at least 2")
    if cfg["ngf"] < 2:
        p.error("--ngf must be at least 2")
    try:
        get_device(cfg["device"])
    except ValueError as e:
        p.error(str(e))
    cfg.update(dataset=dataset, flip=DATASETS[dataset]["flip"])
    try:
        step = train(cfg)
    except (DataError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    if torch.distributed.is_initialized():
        dist_exit(0)
    return step
