"""Every matplotlib figure the project writes keeps all its text inside the image, whatever the data's range.

Each figure writer is drawn on data of ordinary, huge and negative ranges, with long titles; the text
that the saved figure draws (titles, axis and tick labels, legends, colour bars, annotations) must lie within its
canvas. A scan of the scripts finds every function that calls figures.save_figure, so a new figure cannot go
untested. The image grids (samples, inpainting, nearest neighbours) are PIL images with no text.
"""
import ast
import glob
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
import evaluate
import figures
import langevin_compare
import manifold
import metrics
import toy_gmm

RANGES = {"ordinary": (1.0, 0.0), "huge": (1e9, 0.0), "negative": (1e4, -3e4)}


@pytest.fixture
def drawn(monkeypatch):
    """figures.save_figure, recording (caller, text outside the canvas, path) for every figure saved."""
    real, seen = figures.save_figure, []

    def spy(fig, path, dpi=110):
        real(fig, path, dpi)
        w, h = fig.bbox.width, fig.bbox.height
        texts = figures.drawn_text(fig)
        assert texts, "a figure with no text drawn: the check would pass vacuously"
        out = [(t, [round(v) for v in b.extents]) for t, b in texts
               if b.x0 < -1 or b.y0 < -1 or b.x1 > w + 1 or b.y1 > h + 1]
        size = Image.open(path).size                 # the file is the canvas that was checked, at the saved dpi
        assert abs(size[0] - fig.get_size_inches()[0] * dpi) <= 2 and abs(size[1] - fig.get_size_inches()[1] * dpi) <= 2
        code = sys._getframe(1).f_code
        seen.append(((os.path.basename(code.co_filename), code.co_name), out, path, [t for t, _ in texts]))
    monkeypatch.setattr(figures, "save_figure", spy)
    return seen


def curve(n, scale, shift, seed=0):
    g = np.random.default_rng(seed)
    return (np.abs(g.standard_normal(n)) + np.linspace(3, 1, n)) * scale + shift


def draw_all(tmp, scale, shift):
    """Call every figure writer once on data of this range."""
    long = "a title long enough to be cut off at either edge of a narrow canvas " * 2
    # Fig. 1: scores of the toy mixture, the score error, the training loss
    toy_gmm.plot(tmp / "fig1.png", lambda x: -x * scale, curve(400, scale, shift),
                 dict(fisher_divergence=scale, mse_low_density=3 * scale + shift, low_to_data_ratio=3.0))
    # Fig. 2: samples of the three samplers, one of them diverged
    g = torch.Generator().manual_seed(0)
    samples = {k: torch.randn(300, 2, generator=g) * 5 for k in ("iid", "langevin", "annealed")}
    m = {k: {"frac_near_(5,5)": 0.8, "frac_near_(-5,-5)": 0.2, "diverged": k == "langevin", "n_diverged": 7}
         for k in samples}
    langevin_compare.plot(tmp / "fig2.png", samples, m, dict(steps=1000, num_levels=10, steps_each=100,
                                                              sigma_end=0.01 * scale, eps=2e-5 * scale,
                                                              sigma_begin=scale))
    # the manifold figure (sliced score matching on and off the data manifold)
    losses = {"no_noise": curve(300, scale, shift), "noise": curve(300, scale, shift, 1)}
    losses["no_noise"][100] = np.nan
    manifold.save_plot(tmp / "manifold.png", losses, types.SimpleNamespace(noise_std=0.01 * scale, dataset="cifar10",
                                                                         image_size=32, tail=0.2))
    # Fig. 3's loss curve, and the generation process (Figs. 4b, 5b)
    rows = [dict(step=s, loss=v, test_loss=v * 1.1 if s % 50 == 0 else "") for s, v in
            enumerate(curve(500, scale, shift), 1)]
    figures.save_loss_figure(tmp / "loss.png", rows, "annealed DSM loss " + long[:40])
    levels = [torch.rand(8, 1, 28, 28, generator=g) for _ in range(12)]
    figures.save_process_figure(tmp / "process.png", levels, list(np.geomspace(50 * scale, 0.01 * scale, 12)), long)
    # evaluate.py: per-level test loss, training loss against wall-clock, the sweep
    jobs = []
    for i, (recipe, arch) in enumerate([("edm", "ncsnpp"), ("ncsnv2", "refinenet")]):
        run = tmp / f"run{i}"
        run.mkdir(exist_ok=True)
        (run / "config.json").write_text(json.dumps(dict(batch_size=64)))
        (run / "metrics.csv").write_text("step,epoch,loss,test_loss,images_per_s\n" + "".join(
            f"{s},0,{abs(v) + 1e-12:.6g},,{40 + 10 * i}\n" for s, v in enumerate(curve(200, scale, shift), 1)))
        ck = types.SimpleNamespace(path=str(run / "checkpoint.pt"), step=200, sigmas=torch.tensor([50.0, 5, 0.5]),
                                   label=lambda weights=True, r=recipe, a=arch: f"{r} recipe, {a} ngf 32, 200 steps")
        jobs.append(types.SimpleNamespace(ck=ck))
    level = {j.ck.path: {1: 5 * scale, 2: scale, 3: 0.2 * scale, 0.01: 0.1 * scale} for j in jobs}
    evaluate.save_level_loss_figure(tmp / "level_loss.png", jobs, level, 500)
    evaluate.save_training_loss_figure(tmp / "training_loss.png", jobs)
    keys = [k for s in metrics.SCORERS.values() for k in s.sweep]
    results = [dict({k: float(v) for k, v in zip(keys, curve(len(keys), scale, shift, nfe))}, checkpoint=j.ck.path,
                    network=j.ck.label(), nfe=nfe, n=1500, sets=[dict(n=500)] * 3,
                    sampler=dict(name=name, s_churn=churn, ema=True))
               for j in jobs for name, churn in [("heun", 0), ("heun", 10), ("dpmpp2m", 0)] for nfe in (9, 35, 1000)]
    evaluate.save_sweep_figure(tmp / "sweep.png", results)


def writers():
    """{(file, function)} of every function in the scripts that saves a matplotlib figure (calls save_figure)."""
    found = set()
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.FunctionDef) and node.name != "save_figure" and any(
                    isinstance(c, ast.Call) and getattr(c.func, "attr", getattr(c.func, "id", None)) == "save_figure"
                    for c in ast.walk(node)):
                found.add((os.path.basename(path), node.name))
    return found


@pytest.mark.parametrize("data_range", RANGES)
def test_every_figure_keeps_its_text_inside_the_image(tmp_path, drawn, data_range):
    draw_all(tmp_path, *RANGES[data_range])
    assert {caller for caller, *_ in drawn} == writers()          # every figure writer of the scripts was drawn
    cut = {os.path.basename(path): out for _, out, path, _ in drawn if out}
    assert not cut, f"text outside the canvas: {cut}"


def test_the_check_finds_text_cut_off(tmp_path):
    """Without fit_text the Fig. 2 layout (equal-aspect panels under a two-line title) loses its tick labels at the
    bottom edge: the measure sees it, and fit_text's larger canvas keeps them."""
    plt = figures.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    for ax in axes:
        ax.set_xlim(-8, 8), ax.set_ylim(-8, 8), ax.set_aspect("equal"), ax.set_title("a\ntwo-line title")
    fig.suptitle("a suptitle")
    fig.tight_layout()
    assert figures.text_overflow(fig)[1] > 0.05                     # tick labels below the bottom edge
    figures.fit_text(fig)
    assert figures.text_overflow(fig) == (0.0, 0.0, 0.0, 0.0)
    plt.close(fig)


def test_legends_name_recipe_network_sampler_and_count_not_folders(tmp_path, drawn):
    draw_all(tmp_path, 1.0, 0.0)
    text = {os.path.basename(path): " | ".join(t) for _, _, path, t in drawn}
    assert "edm recipe, ncsnpp ngf 32, 200 steps; heun S_churn 10" in text["sweep.png"]
    assert "ncsnv2 recipe, refinenet ngf 32, 200 steps; dpmpp2m" in text["sweep.png"]
    assert "3 x 500 samples per point" in text["sweep.png"]                 # the count: three --seeds sets of 500
    assert "500 held-out images" in text["level_loss.png"]
    for name in ("sweep.png", "level_loss.png", "training_loss.png"):
        assert "edm recipe" in text[name] and "run0" not in text[name] and "run1" not in text[name]


def test_the_count_names_unequal_sets_as_they_are():
    assert evaluate.count_text(dict(n=600, sets=[dict(n=100), dict(n=500)])) == "600 samples in 2 sets"
    assert evaluate.count_text(dict(n=1500, sets=[dict(n=500)] * 3)) == "3 x 500 samples"
    assert evaluate.count_text(dict(n=100)) == "100 samples"
