"""Denoising score matching and sliced score matching against values computed by hand."""
import os

import pytest
import torch

import checkpoints
import common
from conftest import DATA


class LevelScaledScore(torch.nn.Module):
    """s(x, i) = w_i * x: tiny enough to compute the loss by hand (a norm-conditioned network: level indices)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x, labels):
        return self.w[labels].view(-1, 1, 1, 1) * x


def test_dsm_loss_by_hand():
    net = LevelScaledScore([0.5, -2.0])
    sigmas = torch.tensor([2.0, 0.5])
    x = torch.tensor([[[[1.0, 2.0]]], [[[-1.0, 0.0]]]])       # (2, 1, 1, 2)
    z = torch.tensor([[[[0.5, -1.0]]], [[[2.0, 1.0]]]])
    labels = torch.tensor([0, 1])
    want = []
    for b, i in enumerate([0, 1]):
        sig, w = sigmas[i].item(), net.w[i].item()
        total = 0.0
        for xe, ze in zip(x[b].flatten().tolist(), z[b].flatten().tolist()):
            xt = xe + sig * ze                                  # perturbed sample
            total += (w * xt + (xt - xe) / sig ** 2) ** 2       # (s - target)^2
        want.append(0.5 * total * sig ** 2)
    model = common.ScoreModel(net, sigmas)                      # sigma 2.0 means label 0, 0.5 label 1
    per = common.dsm_loss(model, x, sigmas[labels], z)
    assert torch.allclose(per, torch.tensor(want), rtol=1e-6)
    # anneal_power 0 drops the sigma^2 weighting
    per0 = common.dsm_loss(model, x, sigmas[labels], z, anneal_power=0.0)
    assert torch.allclose(per0, torch.tensor(want) / sigmas[labels] ** 2, rtol=1e-6)


def test_dsm_loss_is_zero_for_the_exact_denoising_score():
    """For data that is a single point x0, s(x~, i) = -(x~ - x0)/sigma_i^2 is optimal: loss 0."""
    x0 = torch.rand(1, 1, 4, 4)
    sigmas = common.geometric_sigmas(1.0, 0.01, 10)
    model = lambda xt, sigma: -(xt - x0) / sigma.view(-1, 1, 1, 1) ** 2
    loss = common.dsm_loss(model, x0.expand(10, -1, -1, -1), sigmas).mean()
    assert loss.item() < 1e-6
    # and a wrong score is penalised: s = 0 gives E 1/2 ||z||^2 = 8 per example
    zero = lambda xt, sigma: torch.zeros_like(xt)
    big = common.dsm_loss(zero, x0.expand(4000, -1, -1, -1), sigmas[torch.randint(0, 10, (4000,))]).mean()
    assert abs(big.item() - 8.0) < 0.3


def test_ssm_vr_by_hand_on_a_linear_score():
    A = torch.tensor([[1.0, 2.0], [-0.5, 3.0]])
    b = torch.tensor([0.5, -1.0])
    x = torch.tensor([[1.0, -1.0], [0.0, 2.0], [3.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [0.5, -1.0], [2.0, 1.0]])
    score = lambda x: x @ A.T + b
    want = torch.stack([vi @ A @ vi + 0.5 * (A @ xi + b).pow(2).sum() for xi, vi in zip(x, v)]).mean()
    got = common.sliced_score_matching_vr(score, x, vectors=v)
    assert abs(got.item() - want.item()) < 1e-5


def test_ssm_vr_nonlinear_score_with_particles():
    """s(x) = -x^3 elementwise: grad s = diag(-3 x^2). Two particles per example are averaged."""
    x = torch.tensor([[1.0, -2.0], [0.5, 1.5]])
    v = torch.tensor([[[1.0, 1.0], [2.0, -1.0]], [[0.0, 1.0], [1.0, 1.0]]])   # (particles, B, d)
    got = common.sliced_score_matching_vr(lambda x: -x ** 3, x, n_particles=2, vectors=v)
    terms = [(-3 * x[i] ** 2 * v[p, i] ** 2).sum() + 0.5 * (x[i] ** 6).sum() for p in range(2) for i in range(2)]
    assert abs(got.item() - torch.stack(terms).mean().item()) < 1e-4


def test_ssm_vr_gradient_reaches_the_parameters():
    A = torch.tensor([[1.0, 2.0], [-0.5, 3.0]], requires_grad=True)
    x = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    v = torch.tensor([[1.0, 0.5], [0.5, -1.0]])
    common.sliced_score_matching_vr(lambda x: x @ A.T, x, vectors=v).backward()
    # d/dA [v^T A v + 1/2 ||A x||^2] = v v^T + (A x) x^T, averaged over the batch
    want = sum(torch.outer(vi, vi) + torch.outer(A.detach() @ xi, xi) for xi, vi in zip(x, v)) / 2
    assert torch.allclose(A.grad, want, atol=1e-5)


def test_ssm_vr_estimates_the_score_matching_objective():
    """E_v[v^T A v] = tr(A): with random Gaussian projections the mean approaches it."""
    torch.manual_seed(0)
    A = torch.tensor([[1.0, 2.0, 0.0], [-0.5, 3.0, 1.0], [0.0, 0.0, -2.0]])
    x = torch.zeros(1, 3)                                       # s(x) = 0 there: only the trace remains
    got = common.sliced_score_matching_vr(lambda x: x @ A.T, x, n_particles=100000)
    assert abs(got.item() - torch.trace(A).item()) < 0.1


#----------------------------------------------------------------------------
# Sliced score matching as the image objective.

def official_anneal_ssm_vr(scorenet, samples, labels, sigmas, noise, vectors):
    """ermongroup/ncsn's losses/sliced_sm.py anneal_sliced_score_estimation_vr, n_particles 1, its two
    random draws passed in: the formula our annealed_ssm_loss must reproduce."""
    used_sigmas = sigmas[labels].view(samples.shape[0], *([1] * len(samples.shape[1:])))
    dup_samples = (samples + noise * used_sigmas).contiguous().requires_grad_(True)
    grad1 = scorenet(dup_samples, labels)
    grad2 = torch.autograd.grad(torch.sum(grad1 * vectors), dup_samples, create_graph=True)[0]
    grad1 = grad1.view(dup_samples.shape[0], -1)
    loss1 = torch.sum(grad1 * grad1, dim=-1) / 2.
    loss2 = torch.sum((vectors * grad2).view(dup_samples.shape[0], -1), dim=-1)
    return ((loss1 + loss2) * (used_sigmas.squeeze() ** 2)).mean(dim=0)


@pytest.mark.parametrize("name", ["mnist", "cifar"])
def test_annealed_ssm_equals_the_official_formula(name, official_reference):
    ref = official_reference[name]
    model = checkpoints.load(os.path.join(DATA, f"official_{name}_ngf4.pth")).model
    sigmas = official_reference["sigmas"]
    g = torch.Generator().manual_seed(0)
    noise, vectors = torch.randn(ref["x"].shape, generator=g), torch.randn(ref["x"].shape, generator=g)
    want = official_anneal_ssm_vr(model.net, ref["x"], ref["labels"], sigmas, noise, vectors)
    per = common.annealed_ssm_loss(model, ref["x"], sigmas[ref["labels"]], noise, vectors)
    got = per.mean()
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()) and abs(want.item()) > 1e-3
    assert per.shape == (len(ref["x"]),)
