"""The paper, in one file: Song & Ermon (2019), "Generative Modeling by Estimating Gradients of
the Data Distribution" (noise conditional score networks, NCSN). Sections, top to bottom, each
usable on its own (module level imports: torch and the standard library only):
    noise levels and the paper's sampler settings (with NCSNv2's techniques 1, 2 and 4); the toy
    mixture (Figs. 1-2); CondInstanceNorm++ and RefineNet (Sec. 4.3, appendix A); losses: annealed
    DSM (eq. 5-6) and SSM-VR; checkpoints: writing, and reading ours and ermongroup/ncsn's files.
The samplers (Algorithms 1 and 2 and their successors) are samplers.py; data sets data.py; files,
flags, processes and figures utils.py; the training machinery train.py.
tests/test_official.py checks the network and loss against outputs of the official
implementation on its own checkpoint files.
"""
import os
import re
import secrets
import contextlib
import math
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

#----------------------------------------------------------------------------
# Noise levels, and the paper's sampler settings (Sec. 5; the official configs): every script
# takes its defaults from here.

SIGMA_BEGIN = 1.0        # sigma_1, the largest noise level
SIGMA_END = 0.01         # sigma_L, the smallest
NUM_LEVELS = 10          # L, geometric in between
STEPS_EACH = 100         # T, annealed Langevin steps per level
STEP_LR = 2e-5           # the official sampler's step_lr (eps / 2 of Algorithm 1; see annealed_langevin_dynamics)
NOISE_FEATURES = 32      # continuous conditioning: positional features of c_noise (RefineNet)
NOISE_EMBED = 64         # and the width of the MLP that maps them for every CondInstanceNorm++


def geometric_sigmas(sigma_begin=SIGMA_BEGIN, sigma_end=SIGMA_END, num_levels=NUM_LEVELS):
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


# NCSNv2 (Song & Ermon 2020, "Improved Techniques for Training Score-Based Generative Models"):
# techniques 1, 2 and 4 choose the levels and the step size; technique 3 is RefineNet's
# conditioning='scale', technique 5 the EMA of train.py.

MAX_DISTANCE_IMAGES = 50_000    # technique 1 is exact up to this many images, else on a seeded random subset


@torch.no_grad()
def max_pairwise_distance(x, chunk=1024, max_images=MAX_DISTANCE_IMAGES, seed=0):
    """Technique 1: sigma_1 = the largest Euclidean distance between two data points, x of shape
    (N, ...), computed exactly in chunks on x's device (on a random subset of max_images,
    seeded, when N is larger)."""
    x = x.flatten(1).double()
    if len(x) > max_images:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_images].to(x.device)]
    best = x.new_zeros(())
    for i in range(0, len(x), chunk):
        best = torch.maximum(best, torch.cdist(x[i:i + chunk], x[i:]).max())
    return best.item()


def _normal_cdf(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


def ratio_for_dimension(D):
    """Technique 2: the ratio gamma = sigma_{i-1} / sigma_i solving
    Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) = 0.5 (bisection)."""
    a = math.sqrt(2 * D)
    f = lambda g: _normal_cdf(a * (g - 1) + 3 * g) - _normal_cdf(a * (g - 1) - 3 * g) - 0.5
    lo, hi = 1.0, 10.0
    if f(hi) > 0:
        raise ValueError(f"technique 2 has no solution for D = {D} (too few dimensions)")
    for _ in range(100):
        lo, hi = ((lo + hi) / 2, hi) if f((lo + hi) / 2) > 0 else (lo, (lo + hi) / 2)
    return (lo + hi) / 2


def level_ratio(sigma_begin, sigma_end, num_levels):
    """gamma = sigma_{i-1} / sigma_i of geometric_sigmas(sigma_begin, sigma_end, num_levels)."""
    return (sigma_begin / sigma_end) ** (1 / (num_levels - 1))


def num_levels_for(sigma_begin, sigma_end, gamma):
    """Technique 2's L: the fewest geometric levels from sigma_begin to sigma_end whose ratio is at most gamma."""
    return math.ceil(math.log(sigma_begin / sigma_end) / math.log(gamma) - 1e-9) + 1


def step_lr_for(gamma, sigma_end, n_steps_each):
    """Technique 4: the step_lr e of annealed_langevin_dynamics (alpha_i = e sigma_i^2 / sigma_L^2)
    that brings (1 - e/s^2)^(2T) (gamma^2 - 2e/(s^2 - s^2 (1 - e/s^2)^2)) + 2e/(s^2 - s^2 (1 - e/s^2)^2)
    closest to 1, s = sigma_L, T = n_steps_each. The expression exceeds 1 for every e in (0, s^2),
    so this is its minimum (golden-section search on log e)."""
    s2 = sigma_end ** 2
    def f(log_e):
        e = math.exp(log_e)
        c = 2 * e / (s2 - s2 * (1 - e / s2) ** 2)
        return (1 - e / s2) ** (2 * n_steps_each) * (gamma ** 2 - c) + c
    lo, hi, r = math.log(s2) - 40, math.log(s2), (math.sqrt(5) - 1) / 2
    for _ in range(200):
        a, b = hi - r * (hi - lo), lo + r * (hi - lo)
        lo, hi = (lo, b) if f(a) < f(b) else (a, hi)
    return math.exp((lo + hi) / 2)


def auto_step_lr(sigma_begin, sigma_end, num_levels, n_steps_each):
    """Technique 4's step_lr for T = n_steps_each on geometric_sigmas(sigma_begin, sigma_end, num_levels)."""
    return step_lr_for(level_ratio(sigma_begin, sigma_end, num_levels), sigma_end, n_steps_each)


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
    num_classes = -E (continuous conditioning, EDM's c_noise): [gamma | alpha | beta] is a linear
    map of the network's E-wide noise embedding instead, starting at gamma = alpha = 1, beta = 0.
    """

    def __init__(self, num_features, num_classes, bias=True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        width = (3 if bias else 2) * num_features
        self.embed = nn.Embedding(num_classes, width) if num_classes > 0 else nn.Linear(-num_classes, width)
        with torch.no_grad():
            if num_classes > 0:
                self.embed.weight[:, :2 * num_features].normal_(1.0, 0.02)
                self.embed.weight[:, 2 * num_features:].zero_()
            else:
                self.embed.weight.normal_(0.0, 0.02)
                self.embed.bias.copy_(torch.cat([torch.ones(2 * num_features), torch.zeros(width - 2 * num_features)]))

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

    conditioning='norm' is the paper's: CondInstanceNorm++ with parameters per level.
    conditioning='scale' is NCSNv2's technique 3: one unconditional network (InstanceNorm++, a
    single set of parameters) whose output is divided by the noise level, s(x, sigma) =
    s_theta(x) / sigma. Its `sigmas` buffer maps level labels to sigma; labels may also be the
    noise levels themselves (a float tensor), so it can be evaluated at any sigma, not only at
    the training levels.
    conditioning='continuous' is EDM's raw network F(x; c_noise) (Karras et al. 2022, Sec. 5),
    to be wrapped by Denoiser: x is the preconditioned input (no 2x - 1 map), labels the float
    c_noise = ln(sigma) / 4; NOISE_FEATURES positional features of c_noise (EDM's
    PositionalEmbedding) go through one small MLP shared by all norms (two layers, NOISE_EMBED
    wide, SiLU), and each CondInstanceNorm++ maps that embedding linearly to its gamma, alpha,
    beta: the per-level table of rows becomes a function of any sigma. RefineNet(1, 32) has
    2,567,777 parameters, 602,912 (31%) more than its 10-level norm-conditioned twin, nearly all in
    the per-norm linear maps; the shared MLP is 6,272.
    """

    def __init__(self, in_channels, ngf, num_classes=NUM_LEVELS, image_size=32, conditioning="norm", sigmas=None):
        super().__init__()
        if in_channels < 1 or ngf < 2 or num_classes < 1:
            raise ValueError(f"RefineNet needs in_channels >= 1, ngf >= 2, num_classes >= 1; "
                             f"got {in_channels}, {ngf}, {num_classes}")
        if image_size % 2:
            raise ValueError(f"RefineNet needs an even image_size, got {image_size}")
        if conditioning not in ("norm", "scale", "continuous"):
            raise ValueError(f"RefineNet conditioning is 'norm', 'scale' or 'continuous', got {conditioning!r}")
        self.model_args = dict(in_channels=in_channels, ngf=ngf, num_classes=num_classes, image_size=image_size,
                               conditioning=conditioning)
        self.conditioning = conditioning
        n = {"norm": num_classes, "scale": 1, "continuous": -NOISE_EMBED}[conditioning]
        if conditioning == "continuous":
            half = NOISE_FEATURES // 2
            self.register_buffer("freqs", (1 / 10_000) ** (torch.arange(half) / (half - 1)))   # EDM's, endpoint
            self.embed_noise = nn.Sequential(nn.Linear(NOISE_FEATURES, NOISE_EMBED), nn.SiLU(),
                                             nn.Linear(NOISE_EMBED, NOISE_EMBED), nn.SiLU())
        if conditioning == "scale":         # NaN until set (training) or loaded (checkpoints)
            self.register_buffer("sigmas", torch.full((num_classes,), math.nan) if sigmas is None else
                                 torch.as_tensor(sigmas, dtype=torch.float32).clone())
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
        if self.conditioning == "scale":
            sigma = labels.to(x.dtype) if labels.is_floating_point() else self.sigmas[labels]
            labels = torch.zeros(len(x), dtype=torch.long, device=x.device)     # the one set of norm parameters
        if self.conditioning == "continuous":                   # labels: c_noise; norms take its embedding
            angles = labels.to(x.dtype)[:, None] * self.freqs.to(x.dtype)[None]
            labels = self.embed_noise(torch.cat([angles.cos(), angles.sin()], 1))
        h = self.begin_conv(x if self.conditioning == "continuous" else 2 * x - 1)
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
        out = self.end_conv(F.elu(self.normalizer(h, labels)))
        return out / sigma.view(-1, *[1] * (x.dim() - 1)) if self.conditioning == "scale" else out

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


def edm_coefficients(sigma, sigma_data):
    """(c_skip, c_out, c_in, c_noise) of EDM's Table 1 (Karras et al. 2022) for sigmas of any shape."""
    sd2 = torch.as_tensor(sigma_data).to(sigma) ** 2
    return sd2 / (sigma ** 2 + sd2), sigma * sd2.sqrt() / (sigma ** 2 + sd2).sqrt(), \
        1 / (sigma ** 2 + sd2).sqrt(), sigma.log() / 4


class Denoiser(nn.Module):
    """EDM's preconditioning (Karras et al. 2022, Sec. 5 and Table 1) around a continuous RefineNet F,
    for images in [0, 1] centred on the training set's mean pixel mu:
        D(x; sigma) = mu + c_skip (x - mu) + c_out F(c_in (x - mu); c_noise),
        c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
        c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4,
    sd = sigma_data, the training pixels' standard deviation (EDM: 0.5 for [-1, 1] images; mu = 0
    there). F sees unit-variance inputs and has a unit-variance target at every sigma. Called as
    every score network of this project, score_net(x, labels) with labels level indices into
    `sigmas` or noise levels (floats), it returns the score s(x, sigma) = (D(x; sigma) - x) / sigma^2
    (Tweedie), so every sampler of samplers.py works with it unchanged; denoised=True returns D
    itself (through forward, as DistributedDataParallel needs)."""

    conditioning = "continuous"

    def __init__(self, net, sigma_data, data_mean, sigmas):
        super().__init__()
        self.net = net
        self.register_buffer("sigma_data", torch.tensor(float(sigma_data)))
        self.register_buffer("data_mean", torch.tensor(float(data_mean)))
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32).clone())

    @property
    def model_args(self):
        return self.net.model_args

    def forward(self, x, labels, denoised=False):
        sigma = (labels if labels.is_floating_point() else self.sigmas[labels]).to(x.dtype)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        view = lambda c: c.view(-1, *[1] * (x.dim() - 1))
        centred = x - self.data_mean.to(x.dtype)
        d = self.data_mean + view(c_skip) * centred + view(c_out) * self.net(view(c_in) * centred, c_noise)
        return d if denoised else (d - x) / view(sigma) ** 2


def score_network(model_args, sigmas=None, sigma_data=math.nan, data_mean=math.nan):
    """The network a checkpoint's model_args describe: RefineNet, or for continuous conditioning
    the Denoiser around it (sigma_data, data_mean: its buffers, as measured on the training set)."""
    net = RefineNet(**model_args, sigmas=sigmas if model_args.get("conditioning") == "scale" else None)
    if model_args.get("conditioning") != "continuous":
        return net
    levels = torch.full((model_args.get("num_classes", NUM_LEVELS),), math.nan) if sigmas is None else sigmas
    return Denoiser(net, sigma_data, data_mean, levels)


def edm_loss(denoiser, x, sigma, sigma_data, noise=None, reduction="mean"):
    """EDM's loss (Karras et al. 2022, eq. 8 with Table 1's lambda): per example
        lambda(sigma) || D(x + sigma n; sigma) - x ||^2,  lambda = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2,
    summed over pixels (so it equals || F - F_target ||^2, a unit-variance target at every sigma),
    averaged over the batch. sigma (B,) is drawn by the caller: EDM's ln sigma ~ N(P_mean, P_std^2)."""
    noise = torch.randn_like(x) if noise is None else noise
    s = sigma.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
    weight = 1 / edm_coefficients(s, sigma_data)[1] ** 2
    per_example = (weight * (denoiser(x + s * noise, sigma, denoised=True) - x) ** 2).flatten(1).sum(1)
    return per_example.mean() if reduction == "mean" else per_example


def sliced_score_matching_vr(score_fn, x, n_particles=1, vectors=None, reduction="mean"):
    """Sliced score matching with variance reduction (SSM-VR; Song et al. 2019, Algorithm 1).

        J = E_x E_v [ v^T grad_x(s(x)) v + 1/2 ||s(x)||^2 ],   v ~ N(0, I),
    the Hessian-vector product v^T grad(s) v taken by one extra backward pass of v^T s(x),
    never the full Jacobian. score_fn maps a (N, ...) batch to scores of the same shape (the
    particles come as n_particles consecutive copies of x). vectors: optional projections,
    shape (n_particles, *x.shape) or x.shape. Returns the loss averaged over particles and the
    batch (reduction='mean') or per example ('none'), differentiable in score_fn's parameters.
    """
    xs = x.detach().unsqueeze(0).expand(n_particles, *x.shape).reshape(-1, *x.shape[1:])
    xs.requires_grad_(True)
    v = torch.randn_like(xs) if vectors is None else vectors.reshape(xs.shape).to(xs)
    with torch.enable_grad():
        s = score_fn(xs)
        vjp = torch.autograd.grad((s * v).sum(), xs, create_graph=True)[0]  # v^T grad_x s, per row
    loss1 = 0.5 * s.flatten(1).pow(2).sum(1)                  # 1/2 ||s(x)||^2
    loss2 = (vjp * v).flatten(1).sum(1)                       # v^T grad_x s(x) v
    per_example = (loss1 + loss2).view(n_particles, -1).mean(0)
    return per_example.mean() if reduction == "mean" else per_example


def annealed_ssm_loss(score_net, x, labels, sigmas, noise=None, vectors=None, n_particles=1, reduction="mean"):
    """Annealed sliced score matching (the official anneal_sliced_score_estimation_vr, training.algo
    ssm): SSM-VR of s(., i) at x~ = x + sigma_i z, weighted by sigma_i^2 as DSM's lambda,
        l_i = sigma_i^2 E_v [ v^T grad_x~ s(x~, i) v + 1/2 ||s(x~, i)||^2 ].
    It needs no knowledge of the noise (unlike DSM), at the cost of a second backward pass."""
    used = sigmas.to(x.device)[labels]
    perturbed = x + (torch.randn_like(x) if noise is None else noise) * used.view(-1, *[1] * (x.dim() - 1))
    score_fn = lambda xs: score_net(xs, labels.repeat(n_particles))
    per_example = sliced_score_matching_vr(score_fn, perturbed, n_particles, vectors, reduction="none") * used ** 2
    return per_example.mean() if reduction == "mean" else per_example

#----------------------------------------------------------------------------
# Checkpoints: reading ours or the official implementation's files.

class CheckpointError(ValueError):
    """A file that is not a usable NCSN checkpoint; the message names the file and the problem."""


TMP_PREFIX = ".tmp-"     # atomic_path's temporary files: TMP_PREFIX + 8 hex digits + "-" + final name


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same extension); when the block succeeds it replaces
    `path`, when it fails it is removed: a crash never leaves half a file. Created with the umask."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{secrets.token_hex(4)}-{name}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:    # a full disk says "No space left on device" without a file name: name it
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), path) from e
    except RuntimeError as e:   # torch.save's writer reports a failed write as a RuntimeError
        if "write" not in str(e):
            raise
        raise OSError(getattr(e, "errno", None) or 5, f"write failed ({str(e).splitlines()[0][:60]})", path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_checkpoint(obj, path):
    """torch.save atomically (temporary file, synced, then renamed): read_checkpoint's counterpart."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def full_model_args(model_args):
    """model_args with RefineNet's defaults filled in (files of older versions lack newer settings)."""
    defaults = {k: p.default for k, p in inspect.signature(RefineNet).parameters.items() if k != "sigmas"
                and p.default is not inspect.Parameter.empty}
    return {**defaults, **model_args}


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
        why = why if len(why) <= 100 else why[:why.rfind(" ", 0, 100)] + " ..."
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or truncated or damaged ({why})"
                              + _snapshot_hint(path)) from None


def _snapshot_hint(path):
    """Where a training run left whole copies beside a damaged checkpoint: its numbered snapshots."""
    snaps = [(int(m.group(1)), name) for name in os.listdir(os.path.dirname(os.path.abspath(path)))
             if (m := re.fullmatch(r"checkpoint_(\d+)\.pt", name)) and name != os.path.basename(path)]
    if not snaps:
        return "; use another file"
    step, name = max(snaps)
    return f"; {name} beside it is a whole snapshot of step {step} (to resume from it, copy it to checkpoint.pt)"


def levels_of(info):
    """The training levels of a checkpoint (load_score_net's info): geometric_sigmas of its settings."""
    return geometric_sigmas(info["sigma_begin"], info["sigma_end"], info["num_levels"])


def load_score_net(path, map_location="cpu", ema=None):
    """Load a RefineNet from this project's checkpoint or an official ermongroup/ncsn file.

    Official files are torch.save([state_dict, optimizer_state]) with keys prefixed 'module.';
    their in_channels, ngf and num_classes are read off the tensors (image size is not stored:
    28 is assumed for 1 channel, 32 otherwise, the official configs). Our files are dicts with
    'model', optional 'ema', 'model_args' and 'config'. ema: None uses the EMA weights when the
    file has them, True requires them, False takes the raw weights.
    A file that names no data set is taken as MNIST (1 channel) or CIFAR-10 (3), the official pair.
    Returns (net in eval mode, info dict: format, model_args, sigma settings, dataset, step, ema).
    """
    ckpt = read_checkpoint(path, map_location)
    info = {"path": os.fspath(path)}
    if isinstance(ckpt, (list, tuple)) and len(ckpt) >= 1 and isinstance(ckpt[0], dict):
        state = official_to_ours(ckpt[0])
        if "begin_conv.weight" not in state or "normalizer.embed.weight" not in state:
            raise CheckpointError(f"{path}: a list, but not an official NCSN checkpoint "
                                  "(no begin_conv / normalizer tensors)")
        c_in, ngf = state["begin_conv.weight"].shape[1], state["begin_conv.weight"].shape[0]
        model_args = dict(in_channels=c_in, ngf=ngf, num_classes=state["normalizer.embed.weight"].shape[0],
                          image_size=28 if c_in == 1 else 32)
        info.update(format="official", step=None, ema=False, dataset="mnist" if c_in == 1 else "cifar10",
                    sigma_begin=SIGMA_BEGIN, sigma_end=SIGMA_END, num_levels=model_args["num_classes"])
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("model_args"), dict):
        model_args = full_model_args(ckpt["model_args"])
        use_ema = ckpt.get("ema") is not None if ema is None else ema
        if use_ema and ckpt.get("ema") is None:
            raise CheckpointError(f"{path}: EMA weights asked for, but the checkpoint has none (trained with --ema 0)")
        state = ckpt["ema"] if use_ema else ckpt["model"]
        config = ckpt.get("config") or {}
        info.update(format="ncsn-repro", step=ckpt.get("step"), ema=bool(use_ema),
                    **{k: config[k] for k in ("sigma_begin", "sigma_end", "num_levels", "dataset", "recipe",
                                              "steps_each", "step_lr", "denoise", "sampler", "nfe", "s_churn")
                       if k in config})
    else:
        raise CheckpointError(f"{path}: not an NCSN checkpoint (expected this project's dict with 'model' and "
                              "'model_args', or the official [state_dict, optimizer_state] list)")
    try:
        net = score_network(model_args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model settings {model_args}: {e}") from None
    _fit_state_dict(net, state, path)
    if not all(k in info for k in ("sigma_begin", "sigma_end", "num_levels")):
        raise CheckpointError(f"{path}: no noise levels stored (config sigma_begin, sigma_end, num_levels)")
    levels = [info[k] for k in ("sigma_begin", "sigma_end", "num_levels")]
    if not (all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels)
            and levels[0] > levels[1] > 0 and levels[2] == int(levels[2]) >= 2):
        raise CheckpointError(f"{path}: its noise levels (sigma_begin, sigma_end, num_levels = {levels}) are not "
                              "numbers sigma_begin > sigma_end > 0 and num_levels >= 2; it was not saved by a run")
    info.setdefault("dataset", "mnist" if model_args.get("in_channels") == 1 else "cifar10")
    info["model_args"] = net.model_args
    return net.to(map_location).eval(), info
