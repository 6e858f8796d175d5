"""EDM's preconditioning, continuous conditioning and loss: the coefficients against their
closed forms, the denoiser's score against the exact score of a Gaussian data set, the loss weight's
unit-variance target, and the continuous RefineNet."""
import math

import pytest
import torch

import common
import edm
import samplers

SD, MU = 0.3, 0.13           # about MNIST's pixel standard deviation and mean in [0, 1]


class Zero(torch.nn.Module):
    """F = 0: for Gaussian data the optimal F (the skip connection alone is E[x0 | x])."""
    def forward(self, x, c_noise):
        return torch.zeros_like(x)


def test_coefficients_are_edm_table_1():
    sigma = torch.tensor([1e-4, SD, 1.0, 1e4], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.edm_coefficients(sigma, SD)
    for s, a, b, c, n in zip(sigma.tolist(), c_skip.tolist(), c_out.tolist(), c_in.tolist(), c_noise.tolist()):
        assert a == pytest.approx(SD ** 2 / (s ** 2 + SD ** 2), rel=1e-6)
        assert b == pytest.approx(s * SD / math.sqrt(s ** 2 + SD ** 2), rel=1e-6)
        assert c == pytest.approx(1 / math.sqrt(s ** 2 + SD ** 2), rel=1e-6) and n == pytest.approx(math.log(s) / 4)
    assert c_skip[1] == pytest.approx(0.5) and c_skip[0] == pytest.approx(1, abs=1e-6) and c_skip[-1] < 1e-8
    assert c_out[0] < 1e-3 and c_out[-1] == pytest.approx(SD, rel=1e-6)


def test_the_denoiser_score_is_the_exact_score_of_a_gaussian_data_set():
    """x0 ~ N(mu, sd^2 I): p_sigma = N(mu, (sd^2 + sigma^2) I), score -(x - mu) / (sd^2 + sigma^2); with F = 0
    the preconditioned denoiser is exactly E[x0 | x], so its score is exact at every sigma."""
    d = edm.Denoiser(Zero(), SD, MU, [16.0, 1.0, 0.01]).double()
    sd, mu = d.sigma_data.item(), d.data_mean.item()             # as stored (float32 buffers)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64) * 3
    model = common.ScoreModel(d, d.sigmas)
    assert model.any_sigma and model.predicts_denoised
    for sigma in (0.002, 0.05, 0.3, 1.0, 16.0, 80.0):
        s = torch.full((5,), sigma, dtype=torch.float64)
        score, denoised = model.evaluate(x, s)                   # both from one evaluation
        assert torch.allclose(score, -(x - mu) / (sd ** 2 + sigma ** 2), rtol=1e-9, atol=0)
        assert torch.equal(denoised, d(x, s)) and torch.equal(model(x, s), score)


def test_the_loss_weight_makes_the_target_unit_variance_at_every_sigma():
    """lambda ||D - x||^2 = ||F - F_target||^2: with F = 0 the per-pixel loss is F_target^2, whose mean is 1
    for data of standard deviation sd, at every sigma (EDM's point); without the weight it is not."""
    torch.manual_seed(0)
    d = common.ScoreModel(edm.Denoiser(Zero(), SD, MU, [1.0]), [1.0])
    x = MU + SD * torch.randn(4000, 1, 4, 4)
    for sigma in (0.002, 0.03, 0.3, 3.0, 30.0):
        s = torch.full((len(x),), sigma)
        per_pixel = edm.edm_loss(d, x, s, SD).mean().item() / 16
        assert per_pixel == pytest.approx(1.0, abs=0.03)
        plain = ((d(x + sigma * torch.randn_like(x), s, denoised=True) - x) ** 2).mean().item()
        assert plain == pytest.approx(SD ** 2 * sigma ** 2 / (sigma ** 2 + SD ** 2), rel=0.05)   # not unit


def test_continuous_refinenet_is_conditioned_on_any_sigma_and_samples_through_the_family():
    torch.manual_seed(0)
    net = common.RefineNet(1, 8, num_classes=10, image_size=8, conditioning="continuous")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, 8, 8)
    a, b = net(x, torch.tensor([-1.0, -1.0])), net(x, torch.tensor([0.5, 0.5]))
    assert a.shape == x.shape and (a - b).abs().mean() > 1e-3          # the output depends on c_noise
    assert torch.allclose(net(x[:1], torch.tensor([0.5])), b[:1], atol=1e-5)   # per sample, not per batch
    norm = common.RefineNet(1, 32, 10, 28)
    cont = common.RefineNet(1, 32, 10, 28, conditioning="continuous")
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert (count(norm), count(cont), count(cont.embed_noise)) == (1_964_865, 2_567_777, 6_272)   # the docstring's
    d = edm.Denoiser(net, SD, MU, common.geometric_sigmas(4.0, 0.01, 6))
    out = samplers.heun(common.ScoreModel(d, d.sigmas), torch.rand(2, 1, 8, 8),
                        samplers.karras_sigmas(5, 0.01, 4.0)[:-1])
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="'norm', 'scale' or 'continuous'"):
        common.RefineNet(1, 8, conditioning="film")
