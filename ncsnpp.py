"""NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
Equations"), the U-Net that followed RefineNet, as EDM's SongUNet configures it for its VE models
(Karras et al. 2022, training/networks.py, --arch ncsnpp): a Fourier embedding of the noise shared
by every block, residual blocks at falling resolutions, a residual encoder fed by the input
image at every resolution ("input skips"), skip connections into the decoder, the [1, 3, 3, 1]
resampling filter, self-attention, dropout. Pure PyTorch (torch only), behind the same call as
common.RefineNet: net(x, labels) with one float label per image, for the two conditionings that
take any sigma:
    conditioning='continuous': EDM's raw network F(x; c_noise) for edm.Denoiser (labels: c_noise);
    conditioning='scale': score_sde's VE NCSN++, s(x, sigma) = F(2x - 1; ln sigma) / sigma (labels: sigma).

    import common, ncsnpp
    net = ncsnpp.NCSNpp(1, 28, ngf=32, conditioning="scale", sigmas=common.geometric_sigmas())
    model = common.ScoreModel(net, net.sigmas)                 # model(x, sigma), any sigma
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_LEVELS = 10          # the training levels recorded in `sigmas` (as RefineNet's num_classes)
FOURIER_SCALE = 16.0     # the Fourier embedding's frequencies ~ N(0, 16^2) (score_sde's fourier_scale)
FILTER = (1, 3, 3, 1)    # the resampling filter (NCSN++'s; DDPM++ uses (1, 1))


def attention_default(image_size):
    """The resolution with self-attention unless told: half the image size (EDM's 16 for 32x32 images)."""
    return [image_size // 2]


def conv(c_in, c_out, k, scale=1.0):
    """A k x k convolution, 'same' padding, Xavier-uniform weights times `scale`, zero bias (EDM's init)."""
    c = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    with torch.no_grad():
        nn.init.xavier_uniform_(c.weight).mul_(scale), c.bias.zero_()
    return c


def linear(c_in, c_out):
    lin = nn.Linear(c_in, c_out)
    with torch.no_grad():
        nn.init.xavier_uniform_(lin.weight), lin.bias.zero_()
    return lin


def group_norm(c):
    """EDM's GroupNorm: 32 groups, at least 4 channels each, eps 1e-6."""
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)


class Resample(nn.Module):
    """Halve or double the resolution with the separable FIR filter f f^T / (sum f)^2, per channel."""

    def __init__(self, up):
        super().__init__()
        f = torch.tensor(FILTER, dtype=torch.float32)
        self.register_buffer("f", (torch.outer(f, f) / f.sum() ** 2)[None, None], persistent=False)
        self.up = up

    def forward(self, x):
        f, c = self.f.to(x.dtype), x.shape[1]
        if self.up:                                     # (H, W) -> (2H, 2W)
            return F.conv_transpose2d(x, (f * 4).tile(c, 1, 1, 1), groups=c, stride=2, padding=1)
        return F.conv2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=1)     # (H, W) -> (H/2, W/2)


class Block(nn.Module):
    """EDM's UNetBlock as NCSN++ sets it: GroupNorm-SiLU-conv (resampled), plus the embedding's
    shift, GroupNorm-SiLU-dropout-conv (zero-initialised), a 1x1 skip where the shape changes, each
    sum times sqrt(1/2); then, with attention, one head of self-attention over the pixels."""

    def __init__(self, c_in, c_out, emb, up=False, down=False, attention=False, dropout=0.0):
        super().__init__()
        self.c_in, self.attention, self.dropout = c_in, attention, dropout
        self.resample = Resample(up) if up or down else nn.Identity()
        self.norm0, self.conv0 = group_norm(c_in), conv(c_in, c_out, 3)
        self.affine = linear(emb, c_out)
        self.norm1, self.conv1 = group_norm(c_out), conv(c_out, c_out, 3, scale=1e-5)
        self.skip = conv(c_in, c_out, 1) if c_in != c_out or up or down else None
        if attention:
            self.norm2, self.qkv = group_norm(c_out), conv(c_out, 3 * c_out, 1, scale=math.sqrt(0.2))
            self.proj = conv(c_out, c_out, 1, scale=1e-5)

    def forward(self, x, emb):
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None].to(h.dtype)))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        x = (h + (x if self.skip is None else self.skip(self.resample(x)))) * math.sqrt(0.5)
        if self.attention:
            B, C, H, W = x.shape                        # q, k, v interleaved per channel, as EDM's
            q, k, v = self.qkv(self.norm2(x)).reshape(B, 1, C, 3, H * W).transpose(2, 4).unbind(3)
            a = F.scaled_dot_product_attention(q, k, v)                     # softmax(q k^T / sqrt(C)) v
            x = (self.proj(a.transpose(2, 3).reshape(B, C, H, W)) + x) * math.sqrt(0.5)
        return x


class NCSNpp(nn.Module):
    """NCSN++ for images of `image_size` (divisible by 2^(len(channel_mult) - 1): 28 and 32 with three
    resolutions, 64 with four). ngf is the base width (EDM's model_channels); resolution i has
    ngf * channel_mult[i] channels and num_blocks residual blocks (the decoder one more), with
    attention at attn_resolutions (default: attention_default) and in the
    decoder's first block. The noise embedding is Fourier features of the label (2 ngf of them)
    through a two-layer MLP 4 ngf wide. Scale-conditioned, its `sigmas` buffer records the training levels."""

    def __init__(self, in_channels, image_size=32, ngf=128, channel_mult=(2, 2, 2), num_blocks=4,
                 attn_resolutions=None, dropout=0.1, num_classes=NUM_LEVELS, conditioning="continuous", sigmas=None):
        super().__init__()
        levels = len(channel_mult)
        if conditioning not in ("scale", "continuous"):
            raise ValueError(f"NCSN++ conditioning is 'scale' or 'continuous' (it takes any sigma), "
                             f"got {conditioning!r}")
        if in_channels < 1 or ngf < 4 or num_blocks < 1 or not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"NCSN++ needs in_channels >= 1, ngf >= 4, num_blocks >= 1 and channel multipliers >= 1; "
                             f"got {in_channels}, {ngf}, {num_blocks}, {list(channel_mult)}")
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"NCSN++ with {levels} resolutions needs an image size divisible by "
                             f"{2 ** (levels - 1)}, got {image_size}")
        if not 0 <= dropout < 1:
            raise ValueError(f"NCSN++ dropout is in [0, 1), got {dropout}")
        attn = attention_default(image_size) if attn_resolutions is None else list(attn_resolutions)
        self.model_args = dict(arch="ncsnpp", in_channels=in_channels, image_size=image_size, ngf=ngf,
                               channel_mult=list(channel_mult), num_blocks=num_blocks, attn_resolutions=attn,
                               dropout=dropout, num_classes=num_classes, conditioning=conditioning)
        self.conditioning = conditioning
        if conditioning == "scale":         # the training levels (edm.Denoiser records them for 'continuous')
            self.register_buffer("sigmas", torch.full((num_classes,), math.nan) if sigmas is None else
                                 torch.as_tensor(sigmas, dtype=torch.float32).clone())
        self.register_buffer("freqs", torch.randn(ngf) * FOURIER_SCALE)      # 2 ngf features: cos and sin
        emb = 4 * ngf
        self.map = nn.Sequential(linear(2 * ngf, emb), nn.SiLU(), linear(emb, emb), nn.SiLU())
        block = lambda c_in, c_out, **kw: Block(c_in, c_out, emb, dropout=dropout, **kw)

        # Encoder: at each resolution after the first, a downsampling block and the image's own
        # downsampled path (aux, the residual encoder), then num_blocks blocks; every output is a skip.
        self.begin = conv(in_channels, ngf, 3)
        self.enc, self.aux = nn.ModuleList(), nn.ModuleList()
        c, c_aux, skips = ngf, in_channels, [ngf]
        for level, mult in enumerate(channel_mult):
            res, stage = image_size >> level, nn.ModuleList()
            if level > 0:
                stage.append(block(c, c, down=True))
                self.aux.append(nn.Sequential(Resample(up=False), conv(c_aux, c, 3)))
                c_aux = c
                skips.append(c)
            for _ in range(num_blocks):
                stage.append(block(c, ngf * mult, attention=res in attn))
                c = ngf * mult
                skips.append(c)
            self.enc.append(stage)

        # Decoder: two blocks at the lowest resolution (the first with attention), else an
        # upsampling block; then num_blocks + 1 blocks, each taking one skip.
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = image_size >> level
            stage = nn.ModuleList([block(c, c, attention=True), block(c, c)] if level == levels - 1
                                  else [block(c, c, up=True)])
            for i in range(num_blocks + 1):
                stage.append(block(c + skips.pop(), ngf * mult, attention=i == num_blocks and res in attn))
                c = ngf * mult
            self.dec.append(stage)
        self.end_norm, self.end_conv = group_norm(c), conv(c, in_channels, 3, scale=1e-5)

    def forward(self, x, labels):
        labels = labels.to(x.dtype)
        if self.conditioning == "scale":                # score_sde's VE NCSN++: embed ln sigma, divide by sigma
            sigma, labels, x = labels, labels.log(), 2 * x - 1
        angles = 2 * math.pi * labels[:, None] * self.freqs.to(x.dtype)[None]
        emb = self.map(torch.cat([angles.sin(), angles.cos()], 1))
        h = self.begin(x)
        skips, aux = [h], x
        for level, stage in enumerate(self.enc):
            for j, blk in enumerate(stage):
                h = blk(h, emb)
                if level > 0 and j == 0:                # the residual encoder: the image's path joins
                    h = aux = (h + self.aux[level - 1](aux)) / math.sqrt(2)
                skips.append(h)
        for stage in self.dec:
            for blk in stage:
                h = blk(h if blk.c_in == h.shape[1] else torch.cat([h, skips.pop()], 1), emb)
        out = self.end_conv(F.silu(self.end_norm(h)))
        return out / sigma.view(-1, 1, 1, 1) if self.conditioning == "scale" else out
