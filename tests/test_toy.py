"""Figs. 1 and 2 on the toy mixture: exact scores, SSM's local accuracy, and the samplers' mode weights."""
import json
import os

import numpy as np
import pytest
import torch

import common
import langevin_compare
import toy_gmm


@pytest.mark.parametrize("sigma", [0.0, 0.5, 3.0, 20.0])
def test_exact_score_is_the_gradient_of_the_exact_log_density(sigma):
    torch.manual_seed(0)
    x = (torch.rand(500, 2, dtype=torch.float64) * 2 - 1) * 12
    xr = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(common.toy_log_prob(xr, sigma).sum(), xr)[0]
    assert torch.allclose(common.toy_score(x, sigma), grad, atol=1e-10)
    # and per-row sigmas, as the annealed sampler passes them
    per_row = common.toy_score(x[:3], torch.tensor([0.0, 0.5, 3.0], dtype=torch.float64))
    assert torch.allclose(per_row[2], common.toy_score(x[2:3], 3.0)[0])


def test_toy_density_integrates_to_one_and_samples_have_the_weights():
    t = torch.linspace(-14, 14, 561, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    for sigma in [0.0, 2.0]:
        mass = common.toy_log_prob(pts, sigma).exp().sum() * (t[1] - t[0]) ** 2
        assert abs(mass.item() - 1) < 1e-3
    x = common.toy_sample(20000, torch.Generator().manual_seed(0))
    assert abs((x.sum(1) > 0).float().mean().item() - 0.8) < 0.01


def test_toy_gmm_short_run_is_accurate_near_modes_only(tmp_path):
    out = tmp_path / "toy"
    m = toy_gmm.main(["--out", str(out), "--iters", "400", "--seed", "1"])
    assert m["mse_low_density"] > 10 * m["fisher_divergence"]
    assert m["fisher_divergence"] < 1.0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["low_to_data_ratio"] == pytest.approx(m["low_to_data_ratio"])
    arrays = np.load(out / "toy_gmm.npz")
    assert arrays["losses"].shape == (400,) and arrays["true_scores"].shape == arrays["est_scores"].shape
    # the saved fields: estimated scores close to the exact ones near the modes, far off away from them
    pts, true, est = arrays["arrow_points"], arrays["true_scores"], arrays["est_scores"]
    assert np.allclose(true, common.toy_score(torch.from_numpy(pts)).numpy(), atol=1e-5)
    d = np.linalg.norm(pts[:, None] - common.TOY_MEANS.numpy()[None], axis=2).min(1)
    err = ((est - true) ** 2).sum(1)
    assert err[d < 1.5].mean() < 1.0 and err[d > 5].mean() > 10 * err[d < 1.5].mean()
    # the numbers behind the figure's panels: the density on the grid, and the error map whose far part is the
    # reported mse_low_density
    g, dens, sq = arrays["grid"], arrays["density"], arrays["grid_sq_error"]
    assert np.allclose(dens, common.toy_log_prob(torch.from_numpy(g)).exp().numpy(), rtol=1e-5)
    far = np.linalg.norm(g[:, None] - common.TOY_MEANS.numpy()[None], axis=2).min(1) > toy_gmm.FAR
    assert sq[far].mean() == pytest.approx(m["mse_low_density"], rel=1e-5)
    assert (out / "toy_gmm.png").stat().st_size > 20_000
    # the loss falls from its start toward the optimum -1/2 E||grad log p||^2 = -1
    assert arrays["losses"][-50:].mean() < arrays["losses"][:10].mean() - 0.3


def test_annealed_langevin_recovers_mode_weights_and_langevin_does_not(tmp_path):
    out = tmp_path / "lc"
    m = langevin_compare.main(["--out", str(out), "--seed", "3"])
    a, l = m["annealed"], m["langevin"]
    assert abs(a["frac_near_(5,5)"] - 0.8) < 0.04 and abs(a["frac_near_(-5,-5)"] - 0.2) < 0.04
    assert not a["diverged"] and not l["diverged"]
    # plain Langevin keeps the basins of the uniform start: about half in each mode
    assert abs(l["frac_near_(5,5)"] - 0.8) > 0.15
    for name in ["langevin_compare.png", "metrics.json", "langevin_compare.npz"]:
        assert (out / name).exists()
    arrays = np.load(out / "langevin_compare.npz")
    assert arrays["annealed"].shape == (1280, 2) and arrays["sigmas"][0] == 20.0


def test_stability_table_flags_the_paper_text_setting():
    default = langevin_compare.stability_table(common.geometric_sigmas(20, 1, 10).tolist(), 0.1)
    paper_text = langevin_compare.stability_table(common.geometric_sigmas(10, 0.1, 10).tolist(), 0.1)
    assert all(r["stable"] for r in default)
    assert not paper_text[0]["stable"] and paper_text[0]["ratio"] == pytest.approx(1000 / 404, rel=1e-5)
    assert paper_text[-1]["stable"]


def test_diverging_setting_finishes_and_records_it(tmp_path, capsys):
    out = tmp_path / "bad"
    m = langevin_compare.main(["--out", str(out), "--sigma-begin", "10", "--sigma-end", "0.1", "--n", "200",
                               "--steps", "50", "--steps-each", "20"])
    assert m["annealed"]["diverged"] and m["annealed"]["n_diverged"] == 200
    assert "unstable: level(s) 1, 2, 3, 4, 5" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["annealed"]["diverged"] is True
    assert (out / "langevin_compare.png").exists()


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        langevin_compare.main(["--sigma-begin", "0.1", "--sigma-end", "1"])
    assert "sigma_begin > sigma_end" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toy_gmm.main(["--iters", "-5"])
    assert "expected a positive integer, got -5" in capsys.readouterr().err


def test_diverging_training_stops_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "toy"
    with pytest.raises(SystemExit) as e:
        toy_gmm.main(["--out", str(out), "--iters", "200", "--lr", "1e30"])
    assert "training diverged; use a smaller --lr" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() or os.listdir(out) == []                # no NaN metrics, no figure


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("keep")
    for script in (toy_gmm, langevin_compare):
        with pytest.raises(SystemExit):
            script.main(["--out", str(tmp_path / "f")])
        assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "keep"
