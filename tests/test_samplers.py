"""Langevin samplers on Gaussians, where the stationary law of each update is known exactly."""
import subprocess
import sys
import weakref

import torch

import common
from conftest import ROOT


def test_langevin_dynamics_reaches_a_gaussian():
    torch.manual_seed(0)
    mu, var, h = torch.tensor([2.0, -1.0]), 0.5, 0.01
    x = torch.rand(20000, 2) * 16 - 8
    x = common.langevin_dynamics(lambda x: -(x - mu) / var, x, step_size=h, n_steps=2000)
    # x' = x + h/2 s(x) + sqrt(h) z is an AR(1) chain with variance var / (1 - h / (4 var))
    want_var = var / (1 - h / (4 * var))
    assert torch.allclose(x.mean(0), mu, atol=0.02)
    assert torch.allclose(x.var(0), torch.full((2,), want_var), rtol=0.04)


def test_annealed_langevin_reaches_the_last_level_gaussian():
    """Data N(mu, s2) perturbed by sigma_i has score -(x - mu) / (s2 + sigma_i^2)."""
    torch.manual_seed(0)
    mu, s2 = 0.3, 1.0
    sigmas = common.geometric_sigmas(1.0, 0.1, 5)
    score = lambda x, labels: -(x - mu) / (s2 + sigmas[labels].view(-1, 1) ** 2)
    x0 = torch.rand(20000, 2) * 16 - 8
    step_lr = 0.02                              # alpha_0 = 2 < 2 v_0 = 4: stable at every level
    x, levels = common.annealed_langevin_dynamics(score, x0, sigmas, n_steps_each=300, step_lr=step_lr)
    v = s2 + sigmas[-1].item() ** 2
    a = step_lr                                   # alpha at the last level: step_lr (sigma_L / sigma_L)^2
    want_var = v / (1 - a / (2 * v))              # stationary variance of x + a s + sqrt(2a) z
    assert abs(x.mean().item() - mu) < 0.02
    assert abs(x.var(0).mean().item() - want_var) / want_var < 0.03
    assert len(levels) == 5 and torch.equal(levels[-1], x)
    # level 0 sits at the wider perturbed law, v_0 = 2, inflated by its large step to 2 v_0
    v0, a0 = 2.0, step_lr * 100
    assert abs(levels[0].var().item() - v0 / (1 - a0 / (2 * v0))) < 0.2



def test_reverse_diffusion_follows_the_exact_variance_recursion():
    """Data N(mu, s2): from x ~ N(mu, s2 + sigma_1^2) each step maps variance V to
    (1 - d / (s2 + sigma_i^2))^2 V + d, d = sigma_i^2 - sigma_{i+1}^2, and the last (noise-free)
    step multiplies it by (s2 / (s2 + sigma_L^2))^2: close to s2 itself for many levels."""
    torch.manual_seed(0)
    mu, s2 = 0.3, 0.04
    sigmas = common.geometric_sigmas(5.0, 0.01, 200)
    score = lambda x, labels: -(x - mu) / (s2 + sigmas[labels].view(-1, 1) ** 2)
    x0 = mu + (s2 + sigmas[0] ** 2).sqrt() * torch.randn(40000, 2)
    seen = []
    x = common.reverse_diffusion(score, x0, sigmas, callback=lambda i, step, x, s: seen.append((i, step)))
    v = s2 + sigmas[0].item() ** 2
    for i in range(len(sigmas)):
        nxt = sigmas[i + 1].item() ** 2 if i + 1 < len(sigmas) else 0.0
        d = sigmas[i].item() ** 2 - nxt
        v = (1 - d / (s2 + sigmas[i].item() ** 2)) ** 2 * v + (d if nxt else 0.0)
    assert abs(x.mean().item() - mu) < 0.005 and abs(x.var(0).mean().item() - v) / v < 0.03
    assert abs(v - s2) / s2 < 0.05 and seen == [(i, 0) for i in range(200)]      # 2.9% above s2
    # without the noise of the steps the samples collapse: the noise is what makes it a sampler
    x_ode = common.reverse_diffusion(score, x0, sigmas, randn_like=torch.zeros_like)
    assert x_ode.var().item() < 0.5 * s2


def test_annealed_langevin_steps_labels_and_denoising():
    sigmas = torch.tensor([1.0, 0.5, 0.1])
    score = lambda x, labels: torch.full_like(x, float(labels[0]) + 1)
    calls = []
    x0 = torch.zeros(3, 1)
    zero_noise = torch.zeros_like
    x, levels = common.annealed_langevin_dynamics(
        score, x0, sigmas, n_steps_each=4, step_lr=0.01, randn_like=zero_noise,
        callback=lambda i, t, x, s: calls.append((i, t)))
    assert calls == [(i, t) for i in range(3) for t in range(4)]
    # with no noise each step adds alpha_i * (i + 1), alpha_i = 0.01 (sigma_i / 0.1)^2
    want = sum(4 * 0.01 * (s / 0.1) ** 2 * (i + 1) for i, s in enumerate([1.0, 0.5, 0.1]))
    assert torch.allclose(x, torch.full_like(x, want), rtol=1e-5)
    assert torch.allclose(levels[0], torch.full_like(x, 4 * 0.01 * 100 * 1), rtol=1e-5)
    xd, _ = common.annealed_langevin_dynamics(score, x0, sigmas, n_steps_each=4, step_lr=0.01,
                                              randn_like=zero_noise, denoise=True, keep_levels=False)
    assert torch.allclose(xd, x + 0.1 ** 2 * 3, rtol=1e-5)   # x + sigma_L^2 s(x, L-1)


def test_annealed_langevin_is_reproducible_with_a_generator():
    net = lambda x, labels: -x
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        rl = lambda x: torch.randn(x.shape, generator=g)
        return common.annealed_langevin_dynamics(net, torch.zeros(4, 3), [1.0, 0.1], 5, 0.01, randn_like=rl)[0]
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_annealed_langevin_keeps_no_trajectory():
    """Every input the sampler hands the network must be freed: live states stay O(1)."""
    def live_inputs(n_steps_each):
        refs = []
        def score(x, labels):
            refs.append(weakref.ref(x))
            return -x
        x, levels = common.annealed_langevin_dynamics(score, torch.rand(8, 1, 4, 4), [1.0, 0.5, 0.1], n_steps_each, 1e-3)
        return sum(r() is not None for r in refs)
    assert live_inputs(5) == live_inputs(200) <= 2


MEMORY_SCRIPT = """
import resource, sys, torch, common
torch.set_num_threads(1)
n = int(sys.argv[1])
x = torch.rand(2_000_000)                            # 8 MB a state
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
common.annealed_langevin_dynamics(lambda x, l: -x, x, [1.0, 0.5], n, 1e-3, keep_levels=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def test_sampler_peak_memory_does_not_grow_with_steps():
    def peak_mb(n):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(n)], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        return float(out.split()[-1])
    few, many = peak_mb(2), peak_mb(100)
    # a kept trajectory would add 200 states x 8 MB = 1.6 GB; allow a few states of slack
    assert many - few < 40, (few, many)
