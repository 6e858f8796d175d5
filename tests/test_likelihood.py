"""likelihood.py: the probability-flow ODE's log-likelihood against closed forms (Gaussian data, the toy mixture),
the Hutchinson-Skilling estimator against the exact divergence, the bits/dim arithmetic, the script end to end."""
import json
import math
import os

import numpy as np
import pytest
import torch

import common
import likelihood
import train_mnist
from conftest import DATA, one_thread


def gaussian_model(mean, var):
    """The exact noisy score of data N(mean, var I): p_sigma = N(mean, (var + sigma^2) I)."""
    return lambda x, sigma: -(x - mean) / (var + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)


@pytest.mark.parametrize("solver, estimator, tol", [("rk45", "exact", 1e-4), ("rk45", "rademacher", 1e-4),
                                                    ("heun", "exact", 2e-3)])
def test_gaussian_data_give_their_exact_log_density(solver, estimator, tol):
    """log p_{sigma_min}(x) of N(mean, var I) data at sigma_min is log N(x; mean, (var + sigma_min^2) I); with the
    exact prior at sigma_max the ODE gives it to the solver's tolerance. (For this score df/dx = c I, so one
    Rademacher vector gives the divergence exactly.)"""
    torch.manual_seed(0)
    mean, var, lo, hi, shape = 0.3, 0.04, 0.01, 5.0, (6, 1, 2, 3)
    x = mean + math.sqrt(var + lo ** 2) * torch.randn(shape, dtype=torch.float64)
    vectors = None if estimator == "exact" else (torch.randint(0, 2, (1, *shape)) * 2 - 1).double()
    prior = lambda y: likelihood.gaussian_log_density(y, mean, var + hi ** 2)
    log_p, nfe = likelihood.log_likelihood(gaussian_model(mean, var), x, lo, hi, prior, solver, vectors,
                                           rtol=1e-8, atol=1e-8, steps=64)
    want = likelihood.gaussian_log_density(x, mean, var + lo ** 2)
    assert log_p.shape == (6,) and torch.allclose(log_p, want, rtol=tol, atol=tol * 10)
    assert nfe == 128 if solver == "heun" else nfe > 10


def test_the_toy_mixture_gives_its_exact_log_density():
    """common.py's 2-D mixture: its exact perturbed score through the ODE, its exact density at sigma_max as the
    prior: the answer is common.toy_log_prob(x, sigma_min) to the tolerance."""
    x = common.toy_sample(64, torch.Generator().manual_seed(1)).double()
    lo, hi = 0.05, 20.0
    log_p, _ = likelihood.log_likelihood(common.toy_score, x, lo, hi, lambda y: common.toy_log_prob(y, hi), "rk45",
                                         None, rtol=1e-8, atol=1e-8)
    assert torch.allclose(log_p, common.toy_log_prob(x, lo), rtol=1e-5, atol=1e-4)
    far = likelihood.log_likelihood(common.toy_score, x + 3.0, lo, hi, lambda y: common.toy_log_prob(y, hi), "rk45",
                                    None, rtol=1e-8, atol=1e-8)[0]
    assert (far < log_p).float().mean() > 0.8                       # moved off the modes: less likely


def test_hutchinson_estimate_is_unbiased_for_the_exact_divergence():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()
    model = lambda x, sigma: net(x)
    x = torch.randn(3, 5, dtype=torch.float64)
    _, exact = likelihood.drift_and_divergence(model, x, 0.7)
    for draw in ("rademacher", "gaussian"):
        g = torch.Generator().manual_seed(2)
        v = torch.randn(4000, 3, 5, generator=g, dtype=torch.float64)
        v = v.sign() if draw == "rademacher" else v
        each = torch.stack([likelihood.drift_and_divergence(model, x, 0.7, v[k:k + 1])[1] for k in range(0, 4000, 10)])
        _, mean = likelihood.drift_and_divergence(model, x, 0.7, v)
        se = each.std(0) / math.sqrt(len(v))                  # of the mean over all 4000 vectors
        assert ((mean - exact).abs() < 4 * se + 1e-9).all() and (each.std(0) > 0).all(), draw


def test_bits_per_dim_of_the_dequantised_8bit_data():
    """Uniform on [0, 1]^D (log p = 0) is 8 bits a dimension, a density 256^D concentrated on one grey level is 0,
    and the formula on a number: 8 - log p / (D ln 2)."""
    assert likelihood.bits_per_dim(torch.tensor(0.0), 784).item() == pytest.approx(8.0)
    assert likelihood.bits_per_dim(torch.tensor(784 * math.log(256)), 784).item() == pytest.approx(0.0, abs=1e-9)
    assert likelihood.bits_per_dim(torch.tensor(-1000.0), 100).item() == pytest.approx(8 + 1000 / (100 * math.log(2)))


def test_the_papers_level_only_network_is_refused_in_one_line(mnist_root, capsys):
    with pytest.raises(SystemExit) as e:
        likelihood.main(["--checkpoint", os.path.join(DATA, "official_mnist_ngf4.pth"), "--data-root", mnist_root,
                         "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "knows only its 10 trained noise levels" in err and "--recipe ncsnv2" in err


@pytest.mark.parametrize("recipe", ["ncsnv2", "edm"])
def test_the_script_writes_resumable_shards_and_their_mean(recipe, mnist_root, tmp_path):
    out = tmp_path / recipe
    train_mnist.main(["--data-root", mnist_root, "--out", str(out), "--recipe", recipe, "--ngf", "4", "--iters", "1",
                      "--batch-size", "16", "--num-workers", "0", "--n-samples", "2", "--nfe", "3", "--num-levels", "5",
                      "--device", "cpu"])
    args = ["--checkpoint", str(out / "checkpoint.pt"), "--data-root", mnist_root, "--n", "6", "--batch-size", "2",
            "--solver", "heun", "--steps", "2", "--out", str(tmp_path / "lik"), "--device", "cpu"]
    [r] = likelihood.main(args)
    assert r["n"] == 6 and r["images_scored_now"] == 6 and r["nfe_per_image"] == 4 and math.isfinite(r["bits_per_dim"])
    shards = sorted(f for f in os.listdir(r["folder"]) if f.startswith("shard_"))
    per_image = np.concatenate([np.load(os.path.join(r["folder"], f))["bits_per_dim"] for f in shards])
    assert len(shards) == 3 and r["bits_per_dim"] == pytest.approx(per_image.mean())
    assert r["bits_per_dim_se"] == pytest.approx(per_image.std(ddof=1) / math.sqrt(6))
    os.remove(os.path.join(r["folder"], shards[1]))                  # as a kill leaves it
    [again] = likelihood.main(args)
    assert again["images_scored_now"] == 2 and again["bits_per_dim"] == r["bits_per_dim"]
    saved = json.loads(open(os.path.join(r["folder"], "likelihood.json")).read())
    assert saved["bits_per_dim"] == again["bits_per_dim"] and saved["settings"]["prior_var"] > 0
    [other] = likelihood.main([*args, "--seed", "1"])                # other dequantisation and vectors: other folder
    assert other["folder"] != r["folder"] and other["images_scored_now"] == 6
    rk = [*args[:4], "--n", "2", "--out", str(tmp_path / "lik"), "--device", "cpu"]     # no heun flags
    [adaptive] = likelihood.main([*rk, "--solver", "rk45", "--rtol", "0.1", "--atol", "0.1"])
    assert adaptive["nfe_per_image"] >= 6 and math.isfinite(adaptive["bits_per_dim"])


def test_torchrun_makes_the_same_shards_as_one_process(mnist_root, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    out = tmp_path / "edm"
    train_mnist.main(["--data-root", mnist_root, "--out", str(out), "--recipe", "edm", "--ngf", "4", "--iters", "1",
                      "--batch-size", "16", "--num-workers", "0", "--n-samples", "2", "--nfe", "3", "--device", "cpu"])
    args = ["--checkpoint", str(out / "checkpoint.pt"), "--data-root", mnist_root, "--n-images", "6",
            "--batch-size", "2", "--solver", "heun", "--steps", "2", "--device", "cpu"]
    with one_thread():                                  # one process, in-process: the subprocesses' one thread each
        likelihood.main([*args, "--out", str(tmp_path / "one")])
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "likelihood.py", *args, "--out", str(tmp_path / "two")], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("bits/dim on 6 held-out images") == 1
    [a], [b] = ([os.path.join(tmp_path / k, d) for d in os.listdir(tmp_path / k)] for k in ("one", "two"))
    for name in sorted(f for f in os.listdir(a) if f.startswith("shard_")):
        with np.load(os.path.join(a, name)) as x, np.load(os.path.join(b, name)) as y:
            assert np.array_equal(x["bits_per_dim"], y["bits_per_dim"]), name
    assert json.load(open(os.path.join(b, "likelihood.json")))["bits_per_dim"] == \
        json.load(open(os.path.join(a, "likelihood.json")))["bits_per_dim"]
