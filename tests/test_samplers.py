"""The sampler family (samplers.SAMPLERS) on Gaussians and the toy mixture, where the stationary law
of each update, or the probability-flow ODE's solution, is known exactly; and the inpainting sampler."""
import math
import os
import subprocess
import sys
import weakref

import pytest
import torch

import checkpoints
import common
import evaluate
import samplers
import sample
import train_mnist
from conftest import ROOT, write_mnist


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
    score = lambda x, sigma: -(x - mu) / (s2 + sigma.view(-1, 1) ** 2)
    x0 = torch.rand(20000, 2) * 16 - 8
    step_lr = 0.02                              # alpha_0 = 2 < 2 v_0 = 4: stable at every level
    ends = {}
    x = common.annealed_langevin_dynamics(score, x0, sigmas, steps_each=300, step_lr=step_lr,
                                          callback=lambda i, step, x, s: ends.__setitem__(i, x))
    levels = [ends[i] for i in range(5)]
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
    score = lambda x, sigma: -(x - mu) / (s2 + sigma.view(-1, 1) ** 2)
    x0 = mu + math.sqrt(s2) * torch.randn(40000, 2)           # data; the sampler adds sigma_1 z
    seen = []
    x = samplers.reverse_diffusion(score, x0, sigmas, callback=lambda i, step, x, s: seen.append((i, step)))
    v = s2 + sigmas[0].item() ** 2
    for i in range(len(sigmas)):
        nxt = sigmas[i + 1].item() ** 2 if i + 1 < len(sigmas) else 0.0
        d = sigmas[i].item() ** 2 - nxt
        v = (1 - d / (s2 + sigmas[i].item() ** 2)) ** 2 * v + (d if nxt else 0.0)
    assert abs(x.mean().item() - mu) < 0.005 and abs(x.var(0).mean().item() - v) / v < 0.03
    assert abs(v - s2) / s2 < 0.05 and seen == [(i, 0) for i in range(200)]      # 2.9% above s2
    # without the noise of the steps the samples collapse: the noise is what makes it a sampler
    x_ode = samplers.reverse_diffusion(score, x0, sigmas, randn_like=torch.zeros_like)
    assert x_ode.var().item() < 0.5 * s2


def test_annealed_langevin_steps_levels_and_denoising():
    sigmas = torch.tensor([1.0, 0.5, 0.1])
    level = {1.0: 0, 0.5: 1, 0.1: 2}
    score = lambda x, sigma: torch.full_like(x, level[round(float(sigma[0]), 4)] + 1.0)
    calls = []
    x0 = torch.zeros(3, 1)
    zero_noise = torch.zeros_like
    ends = {}
    def callback(i, t, x, s):
        calls.append((i, t))
        ends[i] = x
    x = common.annealed_langevin_dynamics(score, x0, sigmas, steps_each=4, step_lr=0.01, randn_like=zero_noise,
                                          callback=callback)
    assert calls == [(i, t) for i in range(3) for t in range(4)]
    # with no noise each step adds alpha_i * (i + 1), alpha_i = 0.01 (sigma_i / 0.1)^2
    want = sum(4 * 0.01 * (s / 0.1) ** 2 * (i + 1) for i, s in enumerate([1.0, 0.5, 0.1]))
    assert torch.allclose(x, torch.full_like(x, want), rtol=1e-5)
    assert torch.allclose(ends[0], torch.full_like(x, 4 * 0.01 * 100 * 1), rtol=1e-5)
    xd = common.annealed_langevin_dynamics(score, x0, sigmas, steps_each=4, step_lr=0.01,
                                           randn_like=zero_noise, denoise=True)
    assert torch.allclose(xd, x + 0.1 ** 2 * 3, rtol=1e-5)   # x + sigma_L^2 s(x, L-1)


def test_annealed_langevin_is_reproducible_with_a_generator():
    net = lambda x, sigma: -x
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        rl = lambda x: torch.randn(x.shape, generator=g)
        return common.annealed_langevin_dynamics(net, torch.zeros(4, 3), [1.0, 0.1], steps_each=5, step_lr=0.01,
                                                 randn_like=rl)
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_annealed_langevin_keeps_no_trajectory():
    """Every input the sampler hands the network must be freed: live states stay O(1)."""
    def live_inputs(steps_each):
        refs = []
        def score(x, sigma):
            refs.append(weakref.ref(x))
            return -x
        common.annealed_langevin_dynamics(score, torch.rand(8, 1, 4, 4), [1.0, 0.5, 0.1], steps_each=steps_each,
                                          step_lr=1e-3)
        return sum(r() is not None for r in refs)
    assert live_inputs(5) == live_inputs(200) <= 2


MEMORY_SCRIPT = """
import resource, sys, torch, common
torch.set_num_threads(1)
n = int(sys.argv[1])
x = torch.rand(2, 1_000_000)                         # 8 MB a state: 2 images
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
common.annealed_langevin_dynamics(lambda x, s: -x, x, [1.0, 0.5], steps_each=n, step_lr=1e-3)
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


#----------------------------------------------------------------------------
# EDM's Heun and DPM-Solver++(2M): the probability-flow ODE of a Gaussian has a closed form.

def gaussian_score(mu, s2):
    """model(x, sigma) of data N(mu, s2) perturbed by sigma: -(x - mu) / (s2 + sigma^2)."""
    return lambda x, sigma: -(x - mu) / (s2 + sigma.view(-1, 1) ** 2)


@pytest.mark.parametrize("name", ["heun", "dpmpp2m"])
def test_ode_solvers_are_second_order_on_a_gaussian(name):
    """From x_T = x + sigma_max z the ODE ends at mu + (x_T - mu) s / sqrt(s^2 + sigma_max^2): the error of a
    second-order solver falls about 4x when N doubles (measured: heun 4.9-5.0x, dpmpp2m 4.0-5.0x)."""
    torch.set_default_dtype(torch.float64)
    try:
        mu, s = 0.5, 0.3
        x, z = torch.zeros(2000, 1), torch.randn(2000, 1, generator=torch.Generator().manual_seed(0))
        errors = []
        for n in (10, 20, 40):
            sigmas = samplers.karras_sigmas(n, 0.01, 10.0)[:-1].double()
            exact = mu + (x + sigmas[0] * z - mu) * s / math.sqrt(s ** 2 + sigmas[0] ** 2)
            draws = iter([z])
            out = samplers.SAMPLERS[name].run(gaussian_score(mu, s * s), x, sigmas,
                                            randn_like=lambda t: next(draws))
            errors.append((out - exact).abs().max().item())
        assert errors[-1] < 5e-3 and all(3.5 < a / b < 6 for a, b in zip(errors, errors[1:])), errors
    finally:
        torch.set_default_dtype(torch.float32)




@pytest.mark.parametrize("name, n, churn, nfe, tol", [("heun", 18, 0.0, 35, 0.1), ("dpmpp2m", 35, 0.0, 35, 0.1),
                                                      ("heun", 18, 10.0, 35, 0.15), ("heun", 50, 10.0, 99, 0.05)])
def test_fast_samplers_recover_the_toy_mixture(name, n, churn, nfe, tol):
    """Mode weights 0.8 / 0.2 within 0.02 and per-mode means within 0.1, variances 1 within `tol`, from sigma 20
    to 0.01. The ODE (churn 0) is there by 35 NFE; with S_churn 10 the variance is 10-14% high at 35 NFE (the
    added noise's discretisation error, measured) and within 5% at 99."""
    torch.manual_seed(0)
    sigmas = samplers.karras_sigmas(n, 0.01, 20.0)[:-1]
    spec = samplers.SAMPLERS[name]
    kwargs = dict(s_churn=churn) if churn else {}
    assert spec.nfe(n, **kwargs) == nfe
    x = spec.run(common.toy_score, common.toy_sample(20000), sigmas, **kwargs)
    big = x.sum(1) > 0
    assert abs(big.float().mean().item() - 0.8) < 0.02
    for mode, mean in [(big, 5.0), (~big, -5.0)]:
        assert (x[mode].mean(0) - mean).abs().max() < 0.1 and (x[mode].var(0) - 1).abs().max() < tol


def test_karras_sigmas_are_edm_s_time_steps():
    s = samplers.karras_sigmas(5, 0.002, 80.0)
    assert len(s) == 6 and s[-1] == 0 and s[0] == pytest.approx(80.0) and s[4] == pytest.approx(0.002, rel=1e-5)
    # eq. 5: evenly spaced in sigma^(1/7)
    even = torch.linspace(80 ** (1 / 7), 0.002 ** (1 / 7), 5).double()
    assert torch.allclose(s[:5].double() ** (1 / 7), even, rtol=1e-5)


def test_norm_conditioned_networks_step_only_on_their_trained_levels():
    trained = common.geometric_sigmas()
    assert torch.equal(samplers.trained_subset(trained, 10), trained)
    sub = samplers.trained_subset(trained, 4)
    assert sub[0] == trained[0] and sub[-1] == trained[-1] and len(sub) == 4
    seen = []
    class Net(torch.nn.Module):                            # a norm-conditioned network sees level indices only
        def forward(self, x, labels):
            seen.append(labels.clone())
            return torch.zeros_like(x)
    model = common.ScoreModel(Net(), trained)
    assert not model.any_sigma
    model(torch.zeros(2, 1), sub[[1, 2]])
    assert seen[-1].tolist() == [3, 6]                     # indices of the trained levels
    model(torch.zeros(2, 1), torch.tensor([0.01, 1.0]) * (1 + 1e-6))     # within LEVEL_MATCH of a level: that level
    assert seen[-1].tolist() == [9, 0]
    with pytest.raises(ValueError, match="not a trained level"):
        model(torch.zeros(1, 1), torch.tensor([0.5]))
    assert len(seen) == 2                                  # refused before the network ran
    ck = checkpoints.record(common.RefineNet(1, 4, 10, 28), dict(sigma_begin=1.0, sigma_end=0.01, num_levels=10), "p")
    heun = sample.sampler_settings("heun", ck, 0)
    assert heun.nfe == 19 and heun.sigmas == tuple(trained.tolist())        # Heun over the 10 levels: 19 NFE
    assert sample.sampler_settings("heun", ck, 0, nfe=9).nfe == 9             # 5 of them
    assert sample.sampler_settings("heun", ck, 0, nfe=35).sigmas == heun.sigmas     # a budget above them: all 10
    assert sample.sampler_settings("ancestral", ck, 0, nfe=11).nfe == 10
    for name, nfe, churn in [("heun", 19, 10.0), ("als", 5, None)]:
        with pytest.raises(sample.Inapplicable):
            sample.sampler_settings(name, ck, 0, nfe=nfe, s_churn=churn)


@pytest.mark.cli
def test_a_new_sampler_is_one_function_and_one_table_entry(monkeypatch, tmp_path):
    """Register a toy sampler with a setting no other sampler has (x -> x + shrink * score, one NFE a level):
    with no other change its setting is a flag of sample.py and evaluate.py (a grid of values), each value
    lands in its own fingerprinted folder, and it draws the training figures."""
    def toy(model, x, sigmas, *, randn_like=torch.randn_like, callback=None, shrink=0.0):
        for i in range(len(sigmas)):
            score = model(x, sigmas[i].expand(len(x)))
            x = x + shrink * sigmas[i] ** 2 * score
            if callback:
                callback(i, 0, x, score)
        return x
    monkeypatch.setitem(samplers.SAMPLERS, "toy", samplers.Sampler(toy, lambda n, **_: n,
                                                                   samplers.levels_bought(samplers.geometric)))
    net = common.RefineNet(1, 4, 10, 28)
    ck = tmp_path / "ck" / "checkpoint.pt"
    checkpoints.write_checkpoint(dict(model=net.state_dict(), ema=None, model_args=net.model_args, step=0,
                                 config=dict(dataset="mnist", sigma_begin=1.0, sigma_end=0.01, num_levels=10)), ck)
    base = ["--checkpoint", str(ck), "--sampler", "toy", "--n", "3", "--device", "cpu", "--out", str(tmp_path / "s")]
    plain, still, moved = sample.main([*base, "--shrink", "0", "0.5"]) + evaluate.main([*base, "--shrink", "1",
                                                                                         "--metrics", "none"])
    assert [r["nfe"] for r in (plain, still, moved)] == [10] * 3 and plain["sampler"]["name"] == "toy"
    assert os.path.basename(plain["folder"]).startswith("toy_L10_seed0") and "shrink" not in plain["sampler"]
    assert os.path.basename(moved["folder"]).startswith("toy_L10_shrink1_") and moved["sampler"]["shrink"] == 1.0
    assert len({r["folder"] for r in (plain, still, moved)}) == 3 and len(plain["health"]) == 10
    assert not torch.equal(sample.collect(plain["folder"], 3), sample.collect(moved["folder"], 3))
    with pytest.raises(SystemExit):
        sample.main([*base, "--shrink", "-1"])                               # the flag's type comes from the default
    root = write_mnist(str(tmp_path / "digits"), n_train=16, n_test=4)
    out = tmp_path / "run"
    train_mnist.main(["--data-root", root, "--out", str(out), "--ngf", "4", "--num-workers", "0", "--batch-size", "8",
                      "--iters", "1", "--n-samples", "2", "--device", "cpu", "--sampler", "toy"])
    assert (out / "samples_1.png").exists() and (out / "process_1.png").exists()


#----------------------------------------------------------------------------
# Inpainting (Algorithm 2).

def test_inpainting_samples_the_conditional_of_a_gaussian():
    """x ~ N(0, S), S = [[1, r], [r, 1]]: with x1 = a known, x2 must follow N(r a, 1 - r^2)."""
    torch.manual_seed(0)
    r, a = 0.8, 1.5
    S = torch.tensor([[1.0, r], [r, 1.0]], dtype=torch.float64)
    sigmas = common.geometric_sigmas(1.0, 0.01, 8).double()
    def score(x, sigma):                                      # of the data perturbed by sigma_i: -(S + sigma^2 I)^-1 x
        s2 = sigma[0] ** 2
        return -x @ torch.linalg.inv(S + s2 * torch.eye(2, dtype=torch.float64))
    n = 20000
    known = torch.full((n, 2), a, dtype=torch.float64)
    mask = torch.tensor([True, False])
    x = common.annealed_langevin_inpainting(score, torch.rand(n, 2, dtype=torch.float64), known, mask, sigmas,
                                            steps_each=200, step_lr=2e-5 * 2)
    assert torch.allclose(x[:, 0], torch.full((n,), a, dtype=torch.float64), atol=0.05)   # a + sigma_L z
    assert abs(x[:, 1].mean().item() - r * a) < 0.02 and abs(x[:, 1].var().item() - (1 - r * r)) < 0.02
    # with no noise the known pixels are exactly the known values
    zero = lambda t: torch.zeros_like(t)
    x = common.annealed_langevin_inpainting(score, torch.rand(4, 2, dtype=torch.float64), known[:4], mask, sigmas,
                                            steps_each=3, step_lr=1e-4, randn_like=zero)
    assert torch.equal(x[:, 0], known[:4, 0])


@pytest.mark.cli
def test_a_sampler_s_own_flags_apply_to_it_alone(tmp_path, capsys):
    """In a grid of samplers each takes its own settings (--steps-each: als; --s-churn: heun); a flag that no
    sampler asked for takes is refused before any work, naming the flag."""
    net = common.RefineNet(1, 4, 10, 28)
    ck = tmp_path / "ck" / "checkpoint.pt"
    checkpoints.write_checkpoint(dict(model=net.state_dict(), ema=None, model_args=net.model_args, step=0,
                                 config=dict(dataset="mnist", sigma_begin=1.0, sigma_end=0.01, num_levels=10)), ck)
    base = ["--checkpoint", str(ck), "--n", "2", "--device", "cpu", "--out", str(tmp_path / "s")]
    results = sample.main([*base, "--sampler", "als", "heun", "--steps-each", "1", "--s-churn", "0"])
    assert [(r["sampler"]["name"], r["nfe"]) for r in results] == [("als", 10), ("heun", 19)]
    assert results[0]["sampler"]["steps_each"] == 1 and "s_churn" not in results[1]["sampler"]
    [plain] = sample.main([*base, "--sampler", "heun"])              # --s-churn 0 is the default: the same folder
    assert plain["folder"] == results[1]["folder"] and plain["samples_made_now"] == 0
    with pytest.raises(SystemExit) as e:
        sample.main([*base, "--sampler", "ancestral", "--steps-each", "3"])
    assert e.value.code == 2 and "--steps-each is a setting of no sampler asked for" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s" / "ancestral_L10")
