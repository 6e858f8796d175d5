"""NCSN++ (ncsnpp.py): shapes at every image size, per-image conditioning, the parameter count against
a formula written here from the architecture's description, bitwise determinism, the contract."""
import pytest
import torch

import common
import ncsnpp


def small(size=28, channels=1, **kw):
    args = dict(ngf=8, channel_mult=(1, 2, 2), num_blocks=1, dropout=0.0)
    return ncsnpp.NCSNpp(channels, size, **{**args, **kw})


@pytest.mark.parametrize("size,channels,mult", [(28, 1, (1, 2, 2)), (32, 3, (1, 2, 2)), (64, 3, (1, 2, 2, 2))])
@pytest.mark.parametrize("conditioning", ["continuous", "scale"])
def test_output_shape_at_each_image_size(size, channels, mult, conditioning):
    torch.manual_seed(0)
    net = small(size, channels, channel_mult=mult, conditioning=conditioning)
    x = torch.rand(2, channels, size, size)
    out = net(x, torch.tensor([0.5, 2.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        small(30)
    with pytest.raises(ValueError, match="takes any sigma"):
        small(conditioning="norm")


def test_output_depends_on_each_images_own_sigma():
    torch.manual_seed(0)
    net = small()
    with torch.no_grad():                          # a trained network's last layers are not near zero
        net.end_conv.weight.normal_(0, 0.1)
        for blk in [b for stage in [*net.enc, *net.dec] for b in stage]:
            blk.conv1.weight.normal_(0, 0.1)
    x = torch.rand(1, 1, 28, 28).expand(2, -1, -1, -1)
    a = net(x, torch.tensor([0.1, 0.1]))
    b = net(x, torch.tensor([0.1, 0.9]))
    assert torch.equal(a[0], b[0])                 # image 0's sigma did not change: nor did its output
    assert (a[1] - b[1]).abs().max() > 1e-3        # image 1's did


def conv(ci, co, k):
    return ci * co * k * k + co


def block(ci, co, emb, resample=False, attention=False):
    """Parameters of one residual block: two GroupNorms, two 3x3 convs, the embedding's linear map, a
    1x1 skip where channels or resolution change; attention adds a GroupNorm, qkv and a projection."""
    n = 2 * ci + conv(ci, co, 3) + emb * co + co + 2 * co + conv(co, co, 3)
    n += conv(ci, co, 1) if ci != co or resample else 0
    return n + (2 * co + conv(co, 3 * co, 1) + conv(co, co, 1) if attention else 0)


def formula(c_in, size, ngf, mult, blocks, attn):
    """NCSN++'s parameter count, from the description: noise MLP (2 ngf -> 4 ngf -> 4 ngf), the first
    conv, per resolution a down block and the image's 3x3 path (after the first) and `blocks` blocks;
    the decoder two blocks at the lowest resolution or an up block, then blocks + 1 blocks taking
    one skip each; the final GroupNorm and conv."""
    emb = 4 * ngf
    n = (2 * ngf * emb + emb) + (emb * emb + emb) + conv(c_in, ngf, 3)
    c, c_aux, skips = ngf, c_in, [ngf]
    for level, m in enumerate(mult):
        if level:
            n += block(c, c, emb, resample=True) + conv(c_aux, c, 3)
            c_aux = c
            skips.append(c)
        for _ in range(blocks):
            n += block(c, ngf * m, emb, attention=(size >> level) in attn)
            c = ngf * m
            skips.append(c)
    for level in reversed(range(len(mult))):
        n += block(c, c, emb, attention=True) + block(c, c, emb) if level == len(mult) - 1 else \
            block(c, c, emb, resample=True)
        for i in range(blocks + 1):
            n += block(c + skips.pop(), ngf * mult[level], emb,
                       attention=i == blocks and (size >> level) in attn)
            c = ngf * mult[level]
    return n + 2 * c + conv(c, c_in, 3)


@pytest.mark.parametrize("c_in,size,ngf,mult,blocks,attn", [
    (1, 28, 16, (1, 2, 2), 2, [14]), (3, 32, 32, (2, 2, 2), 1, [16, 8]), (3, 64, 8, (1, 2, 2, 2), 1, [8])])
def test_parameter_count_matches_the_formula(c_in, size, ngf, mult, blocks, attn):
    net = ncsnpp.NCSNpp(c_in, size, ngf, mult, blocks, attn)
    assert sum(p.numel() for p in net.parameters()) == formula(c_in, size, ngf, mult, blocks, attn)


def test_bitwise_deterministic():
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        net = small(dropout=0.1).train()
        x = torch.rand(3, 1, 28, 28)
        outs.append(net(x, torch.tensor([0.1, 0.5, 1.0])))
    assert torch.equal(*outs)


def test_behind_the_contract_any_sigma():
    torch.manual_seed(0)
    sigmas = common.geometric_sigmas()
    model = common.ScoreModel(small(conditioning="scale", sigmas=sigmas), sigmas)
    assert model.any_sigma and not model.predicts_denoised
    x = torch.rand(2, 1, 28, 28)
    score, denoised = model.evaluate(x, 0.123)                    # not a trained level: taken
    assert torch.allclose(denoised, x + 0.123 ** 2 * score)
