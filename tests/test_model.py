"""RefineNet and CondInstanceNorm++: sizes, shapes, and the normalisation formula itself."""
import math

import numpy as np
import pytest
import torch

import common
import utils


@pytest.mark.parametrize("args, count", [((1, 64), 7_638_657), ((3, 128), 30_117_635)])
def test_parameter_counts_equal_the_official_models(args, count):
    net = common.RefineNet(*args)
    assert sum(p.numel() for p in net.parameters()) == count


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_score_has_the_shape_of_x_and_depends_on_the_label(channels, size):
    torch.manual_seed(0)
    net = common.RefineNet(channels, 8, image_size=size).eval()
    with torch.no_grad():
        # make the levels differ, as after training (at init all beta are 0)
        net.normalizer.embed.weight.normal_(1.0, 0.5)
        x = torch.rand(2, channels, size, size)
        s0 = net(x, torch.tensor([0, 0]))
        s9 = net(x, torch.tensor([9, 9]))
    assert s0.shape == x.shape and torch.isfinite(s0).all()
    assert (s0 - s9).abs().max() > 1e-3


def test_refinenet_refuses_bad_settings():
    with pytest.raises(ValueError, match="even image_size"):
        common.RefineNet(1, 8, image_size=27)
    with pytest.raises(ValueError, match="ngf"):
        common.RefineNet(1, 0)


def _cin_plus_direct(x, labels, weight, bias=True):
    """The CondInstanceNorm++ formula written out element by element in float64."""
    x = x.double()
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    for b in range(B):
        g, a = weight[labels[b], :C].double(), weight[labels[b], C:2 * C].double()
        beta = weight[labels[b], 2 * C:].double() if bias else torch.zeros(C, dtype=torch.float64)
        mu = [x[b, k].sum() / (H * W) for k in range(C)]
        m = sum(mu) / C
        v = math.sqrt(sum((mk - m) ** 2 for mk in mu) / (C - 1) + 1e-5)
        for k in range(C):
            s = math.sqrt(((x[b, k] - mu[k]) ** 2).sum() / (H * W) + 1e-5)
            out[b, k] = g[k] * ((x[b, k] - mu[k]) / s + a[k] * (mu[k] - m) / v) + beta[k]
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_cond_instance_norm_plus_matches_the_formula(bias):
    torch.manual_seed(1)
    norm = common.CondInstanceNorm2dPlus(5, 3, bias=bias)
    with torch.no_grad():
        norm.embed.weight.normal_(0.5, 1.0)                      # all three parameters matter
    x = torch.randn(4, 5, 6, 7) * torch.arange(1, 6).view(1, 5, 1, 1) + torch.randn(4, 5, 1, 1) * 3
    labels = torch.tensor([0, 2, 1, 2])
    got = norm(x, labels)
    want = _cin_plus_direct(x, labels, norm.embed.weight.detach(), bias)
    assert (got.double() - want).abs().max() < 1e-5


def test_cond_instance_norm_plus_initialisation():
    torch.manual_seed(2)
    norm = common.CondInstanceNorm2dPlus(256, 10)
    w = norm.embed.weight.detach()
    gamma_alpha, beta = w[:, :512], w[:, 512:]
    assert abs(gamma_alpha.mean().item() - 1.0) < 0.005
    assert abs(gamma_alpha.std().item() - 0.02) < 0.002
    assert (beta == 0).all()


def test_geometric_sigmas():
    s = common.geometric_sigmas(1.0, 0.01, 10)
    want = np.exp(np.linspace(np.log(1.0), np.log(0.01), 10)).astype(np.float32)
    assert s.dtype == torch.float32 and s.shape == (10,)
    assert np.array_equal(s.numpy(), want)                      # label i means sigmas[i]
    assert (s[1:] < s[:-1]).all() and s[0] == 1.0
    ratios = s[1:] / s[:-1]
    assert torch.allclose(ratios, ratios[0].expand(9), rtol=1e-5)
    for bad in [(0.01, 1.0, 10), (1.0, 1.0, 10), (1.0, 0.0, 10), (1.0, 0.01, 1)]:
        with pytest.raises(ValueError):
            common.geometric_sigmas(*bad)


def test_get_device():
    assert utils.get_device("cpu") == torch.device("cpu")
    assert utils.get_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        utils.get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            utils.get_device("cuda")
