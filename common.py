"""The paper, in one file: Song & Ermon (2019), "Generative Modeling by Estimating Gradients of
the Data Distribution" (noise conditional score networks, NCSN). Torch and the standard library
only, no file I/O: copy it alone into another project. Sections, top to bottom:
    noise levels and the paper's sampler settings (with NCSNv2's techniques 1, 2 and 4); the toy
    mixture (Figs. 1-2); CondInstanceNorm++ and RefineNet (Sec. 4.3, appendix A); the contract
    model(x, sigma) (ScoreModel); losses: annealed DSM (eq. 5-6) and sliced score matching; the
    samplers: Langevin dynamics (eq. 4), annealed Langevin dynamics (Algorithm 1) and its
    inpainting (Algorithm 2).

    import torch, common
    sigmas = common.geometric_sigmas()                           # the paper's 10 levels, 1 to 0.01
    model = common.ScoreModel(common.RefineNet(1, 64), sigmas)   # model(x, sigma): one float sigma per image
    x = common.annealed_langevin_dynamics(model, torch.rand(64, 1, 28, 28), sigmas)

tests/test_official.py checks the network and loss against outputs of the official
implementation on its own checkpoint files.
"""
import math

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


def step_lr_for(gamma, sigma_end, steps_each):
    """Technique 4: the step_lr e of annealed_langevin_dynamics (alpha_i = e sigma_i^2 / sigma_L^2)
    that brings (1 - e/s^2)^(2T) (gamma^2 - 2e/(s^2 - s^2 (1 - e/s^2)^2)) + 2e/(s^2 - s^2 (1 - e/s^2)^2)
    closest to 1, s = sigma_L, T = steps_each. The expression exceeds 1 for every e in (0, s^2),
    so this is its minimum (golden-section search on log e)."""
    s2 = sigma_end ** 2
    def f(log_e):
        e = math.exp(log_e)
        c = 2 * e / (s2 - s2 * (1 - e / s2) ** 2)
        return (1 - e / s2) ** (2 * steps_each) * (gamma ** 2 - c) + c
    lo, hi, r = math.log(s2) - 40, math.log(s2), (math.sqrt(5) - 1) / 2
    for _ in range(200):
        a, b = hi - r * (hi - lo), lo + r * (hi - lo)
        lo, hi = (lo, b) if f(a) < f(b) else (a, hi)
    return math.exp((lo + hi) / 2)


def auto_step_lr(sigma_begin, sigma_end, num_levels, steps_each):
    """Technique 4's step_lr for T = steps_each on geometric_sigmas(sigma_begin, sigma_end, num_levels)."""
    return step_lr_for(level_ratio(sigma_begin, sigma_end, num_levels), sigma_end, steps_each)


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
    s_theta(x) / sigma; labels are the noise levels themselves (floats), so it can be evaluated at
    any sigma. Its `sigmas` buffer records the training levels.
    conditioning='continuous' is EDM's raw network F(x; c_noise) (Karras et al. 2022, Sec. 5),
    to be wrapped by edm.Denoiser: x is the preconditioned input (no 2x - 1 map), labels the float
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
        if self.conditioning == "scale":                        # labels: sigma itself, one float per image
            sigma = labels.to(x.dtype)
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
# The contract: every sampler and loss calls model(x, sigma), one float sigma per image (B,).

LEVEL_MATCH = 1e-4     # a sigma within this of a trained level, in ln sigma, is that level


class ScoreModel(nn.Module):
    """A network behind the one call: model(x, sigma) -> the score s(x; sigma), shaped like x.

    The paper's norm-conditioned RefineNet knows only its trained `sigmas` (label i means
    sigmas[i]): each sigma is mapped to its level's index, and any other sigma is refused
    (k-diffusion's DiscreteSchedule, EDM's round_sigma; strict=False skips that check and its host
    sync, for training, whose sigmas are drawn from the levels). Integer levels never leave this wrapper.
    Any other network (RefineNet conditioning='scale', EDM's Denoiser) takes any sigma (any_sigma).
    evaluate(x, sigma) gives (score, denoised) from one network evaluation, each exactly from the
    network's own output: D(x; sigma) = x + sigma^2 s(x; sigma) (Tweedie's formula) for a score
    network, s = (D - x) / sigma^2 for one that predicts D (predicts = 'denoised').
    """

    def __init__(self, net, sigmas, strict=True):
        super().__init__()
        self.net = net
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32).clone(), persistent=False)
        self.any_sigma = getattr(net, "conditioning", "norm") != "norm"
        self.predicts_denoised = getattr(net, "predicts", "score") == "denoised"
        self.strict = strict        # False: trust that every sigma is a level (training's draws): no host sync

    def distance(self, sigma):
        """(distance in ln sigma to the nearest trained level, that level's index), per sigma."""
        return (sigma.double().log()[:, None] - self.sigmas.to(sigma.device).double().log()[None]).abs().min(1)

    def labels(self, sigma):
        """The network's conditioning input for `sigma`: the level index (norm), else sigma itself."""
        if self.any_sigma:
            return sigma
        d, index = self.distance(sigma)
        if self.strict and (d > LEVEL_MATCH).any():
            raise ValueError(f"sigma {sigma[d.argmax()].item():.4g} is not a trained level of this "
                             "norm-conditioned network; it knows only its own")
        return index

    def evaluate(self, x, sigma):
        """(score, denoised) at `sigma` (a number or one per image) from one network evaluation."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(len(x))
        out = self.net(x, self.labels(sigma))
        s2 = sigma.view(-1, *[1] * (x.dim() - 1)) ** 2
        return ((out - x) / s2, out) if self.predicts_denoised else (out, x + s2 * out)

    def forward(self, x, sigma, denoised=False):
        return self.evaluate(x, sigma)[1 if denoised else 0]

#----------------------------------------------------------------------------
# Losses: per image; the training loop reduces them.

def _view(sigma, x):
    return sigma.to(x).view(-1, *[1] * (x.dim() - 1))                  # (B, 1, 1, 1)


def dsm_loss(model, x, sigma, noise=None, anneal_power=2.0):
    """Annealed denoising score matching, the paper's eq. (5)-(6) with lambda(sigma) = sigma^2, per image:

        l = 1/2 || s(x~, sigma) + (x~ - x) / sigma^2 ||^2 * sigma^anneal_power,
        x~ = x + sigma z,  z = noise ~ N(0, I),
    sigma (B,) one level per image (eq. 6 draws it uniformly from the levels). The target is written
    -(x~ - x) / sigma^2 as in eq. (5) and the official code.
    """
    used = _view(sigma, x)
    noise = torch.randn_like(x) if noise is None else noise
    perturbed = x + noise * used
    target = -(perturbed - x) / used ** 2
    return 0.5 * (model(perturbed, sigma) - target).flatten(1).pow(2).sum(1) * used.flatten() ** anneal_power


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


def annealed_ssm_loss(model, x, sigma, noise=None, vectors=None, n_particles=1):
    """Annealed sliced score matching (the official anneal_sliced_score_estimation_vr, training.algo
    ssm), per image: SSM-VR of s(., sigma) at x~ = x + sigma z, weighted by sigma^2 as DSM's lambda,
        l = sigma^2 E_v [ v^T grad_x~ s(x~, sigma) v + 1/2 ||s(x~, sigma)||^2 ].
    It needs no knowledge of the noise (unlike DSM), at the cost of a second backward pass."""
    perturbed = x + (torch.randn_like(x) if noise is None else noise) * _view(sigma, x)
    score_fn = lambda xs: model(xs, sigma.repeat(n_particles))
    return sliced_score_matching_vr(score_fn, perturbed, n_particles, vectors, reduction="none") * sigma.to(x) ** 2

#----------------------------------------------------------------------------
# The paper's samplers. Each runs without autograd and keeps no trajectory (memory O(batch));
# randn_like draws every noise (a seeded one makes samples reproducible); callback(i, step, x,
# score) sees every update (its last call of level i is that level's end state).

@torch.no_grad()
def langevin_dynamics(score_fn, x, step_size, n_steps, *, randn_like=torch.randn_like):
    """Langevin dynamics, the paper's eq. (4): x <- x + step_size/2 * s(x) + sqrt(step_size) z.
    score_fn(x) is called under torch.no_grad(). Returns the final x (a new tensor)."""
    for _ in range(n_steps):
        x = x + 0.5 * step_size * score_fn(x) + math.sqrt(step_size) * randn_like(x)
    return x


@torch.no_grad()
def annealed_langevin_dynamics(model, x, sigmas, *, randn_like=torch.randn_like, callback=None,
                               steps_each=STEPS_EACH, step_lr=STEP_LR, denoise=False):
    """Annealed Langevin dynamics (the paper's Algorithm 1), as the official sampler.

    For each level i = 0, ..., L-1 (sigma descending) and steps_each steps:
        alpha_i = step_lr * (sigma_i / sigma_L)^2
        x <- x + alpha_i * s(x, sigma_i) + sqrt(2 alpha_i) z
    which is Algorithm 1 of arXiv:1907.05600 (alpha_i = eps sigma_i^2 / sigma_L^2, x <- x +
    alpha_i/2 s + sqrt(alpha_i) z) with eps = 2 * step_lr. The paper prints eps = 2e-5; its
    official code, which made its samples, runs this update with step_lr = 2e-5 (eps = 4e-5), the
    default here. With denoise, one last step x <- x + sigma_L^2 s(x, sigma_L) removes the remaining
    noise (NCSNv2's technique 5). Network evaluations: L * steps_each (+ 1 with denoise).
    x: the start, U(0, 1) images in the paper. Returns the final x.
    """
    sigmas = [float(s) for s in sigmas]
    for i, sigma in enumerate(sigmas):
        level = x.new_full((len(x),), sigma)
        alpha = step_lr * (sigma / sigmas[-1]) ** 2
        for step in range(steps_each):
            score = model(x, level)
            x = x + alpha * score + math.sqrt(2 * alpha) * randn_like(x)
            if callback is not None:
                callback(i, step, x, score)
    if denoise:
        x = x + sigmas[-1] ** 2 * model(x, x.new_full((len(x),), sigmas[-1]))
    return x


@torch.no_grad()
def annealed_langevin_inpainting(model, x, known, mask, sigmas, *, randn_like=torch.randn_like,
                                 steps_each=STEPS_EACH, step_lr=STEP_LR):
    """Inpainting with annealed Langevin dynamics (the paper's Algorithm 2; the official
    anneal_Langevin_dynamics_inpainting). mask (bool, broadcastable to x) marks the known pixels,
    whose values are `known`. At each level i they are set to y_i = known + sigma_i z (one draw
    per level) before every step and after it; the other pixels follow annealed_langevin_dynamics'
    update. Returns the final x.
    """
    sigmas = [float(s) for s in sigmas]
    for sigma in sigmas:
        level = x.new_full((len(x),), sigma)
        alpha = step_lr * (sigma / sigmas[-1]) ** 2
        y = known + sigma * randn_like(known)                          # the known pixels at this level's noise
        x = torch.where(mask, y, x)
        for _ in range(steps_each):
            x = x + alpha * model(x, level) + math.sqrt(2 * alpha) * randn_like(x)
            x = torch.where(mask, y, x)
    return x
