"""metrics.py: scorers through their table, on any images; nearest neighbours."""
import json
import os

import numpy as np
import pytest
import torch

import evaluate
import metrics
import sample
from conftest import DATA

FAST = ["--device", "cpu"]


def test_samples_without_metrics_need_no_inception(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "inception", lambda *a: pytest.fail("--metrics none loads no network"))
    [r] = evaluate.main(["--checkpoint", os.path.join(DATA, "official_mnist_ngf4.pth"), "--n", "5", "--batch-size", "3",
                         "--metrics", "none", "--steps-each", "2", "--png", "--nearest", "3", "--data-root", mnist_root,
                         "--out", str(tmp_path / "e"), *FAST])
    names = set(os.listdir(r["folder"]))
    assert {"grid.png", "process.png", "metrics.json", "nearest.png", "png"} <= names and "fid" not in r
    # sample.py alone makes the same samples (the same folder) and imports no scorer
    [s] = sample.main(["--checkpoint", os.path.join(DATA, "official_mnist_ngf4.pth"), "--n", "5", "--steps-each", "2",
                       "--out", str(tmp_path / "e"), *FAST])
    assert s["folder"] == r["folder"] and s["samples_made_now"] == 0
    assert sorted(os.listdir(os.path.join(r["folder"], "png"))) == [f"{i:06d}.png" for i in range(5)]
    from PIL import Image
    first = np.asarray(Image.open(os.path.join(r["folder"], "png", "000000.png")))
    assert np.array_equal(first, sample.collect(r["folder"], 1)[0, 0].numpy())


def test_nearest_neighbours_equal_a_brute_force_search():
    torch.manual_seed(0)
    train_images = torch.randint(0, 256, (2500, 1, 6, 6), dtype=torch.uint8)
    samples = train_images[[5, 1777]].clone()
    samples[0, 0, 0, 0] ^= 1                                    # nearly, not exactly, training image 5
    idx = metrics.nearest_neighbours(samples, train_images, 4, lambda x: x.flatten(1).double(), chunk=700)
    want = torch.cdist(samples.flatten(1).double(), train_images.flatten(1).double()).argsort(1)[:, :4]
    assert torch.equal(idx, want) and idx[0, 0] == 5 and idx[1, 0] == 1777


def test_a_new_metric_is_one_scorer_and_one_table_entry(monkeypatch, tmp_path, capsys):
    """Register a toy scorer (the mean grey level) and use it from evaluate.py: its number in the result and
    metrics.json, its column in the table, and it describes exactly the samples in the folder."""
    def make(opts, dataset, device):
        return lambda batches: dict(mean_grey=torch.cat(list(batches)).double().mean().item())
    monkeypatch.setitem(metrics.SCORERS, "grey", metrics.Scorer(make, (("mean grey", metrics._number("mean_grey")),),
                                                                ("mean_grey",)))
    [r] = evaluate.main(["--checkpoint", os.path.join(DATA, "official_mnist_ngf4.pth"), "--n", "3", "--steps-each", "1",
                         "--metrics", "grey", "--out", str(tmp_path / "e"), *FAST])
    assert r["mean_grey"] == pytest.approx(sample.collect(r["folder"], 3).double().mean().item())
    assert f"{r['mean_grey']:.2f}" in capsys.readouterr().out.split("mean grey")[1]
    saved = json.load(open(os.path.join(r["folder"], "metrics.json")))
    assert saved["mean_grey"] == pytest.approx(r["mean_grey"])


def test_metrics_scores_an_npz_of_images_as_edm_writes_them(tmp_path):
    """metrics.py on any images: an .npz in EDM's (N, H, W, C) layout scores as the same images (N, C, H, W)."""
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    np.savez(tmp_path / "nhwc.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "nchw.npz", images=images.numpy())
    assert torch.equal(metrics.read_images(str(tmp_path / "nhwc.npz"), "mnist"), images)
    assert torch.equal(metrics.read_images(str(tmp_path / "nchw.npz"), "mnist"), images)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SystemExit, match="not an .npz of images"):
        metrics.main(["--images", str(tmp_path / "bad.npz"), "--metrics", "none", *FAST])


def test_kid_is_the_unbiased_cubic_kernel_mmd_computed_by_hand():
    """KID of x = {0, 1}, y = {0, 2} in one dimension, k(a, b) = (a b + 1)^3: the off-diagonal kernel sums are
    2 within x and 2 within y, over m (m - 1) = 2; the cross sum is 1 + 1 + 1 + 27 = 30, twice over m^2 = 4."""
    mean, std = metrics.kid(np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]]))
    assert mean == pytest.approx((2 + 2) / 2 - 2 * 30 / 4) and std == pytest.approx(0.0)    # every subset is all


def test_kid_is_about_zero_for_two_samples_of_one_distribution_and_not_for_a_shifted_one():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(600, 16, generator=g, dtype=torch.float64) for _ in range(2))
    same, same_std = metrics.kid(a, b, subset_size=300)
    shifted, _ = metrics.kid(a + 0.5, b, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3 and shifted > 20 * max(abs(same), same_std)
    fd = metrics.fid(a.mean(0).numpy(), np.cov(a.numpy(), rowvar=False),
                     b.mean(0).numpy(), np.cov(b.numpy(), rowvar=False))
    assert fd > 0.2                     # the Frechet distance of the same two samples is biased above 0


def test_precision_and_recall_count_points_inside_the_other_sets_k_nearest_neighbour_balls():
    """k = 3 in one dimension. Reference {0, 1, 2, 3}: the balls' radii (distance to the 3rd nearest other point)
    are 3, 2, 2, 3; generated {0.5, 5.5, 6, 100}: 0.5 (near 0), 5.5 and 6 (within 3 of 3) are inside, 100 is not.
    The generated balls' radii are 99.5, 94.5, 94, 99.5: every reference point is inside 0.5's."""
    precision, recall = metrics.precision_recall(np.array([[0.5], [5.5], [6.0], [100.0]]),
                                                 np.array([[0.0], [1.0], [2.0], [3.0]]))
    assert precision == pytest.approx(3 / 4) and recall == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(500, 8, generator=g, dtype=torch.float64) for _ in range(2))
    assert metrics.precision_recall(a, a) == (1.0, 1.0)                          # a set against itself
    p_same, r_same = metrics.precision_recall(a, b)
    p_far, r_far = metrics.precision_recall(a + 3, b)                            # shifted by 3 sd on each axis
    assert min(p_same, r_same) > 0.8 and max(p_far, r_far) < 0.1
    p_narrow, r_narrow = metrics.precision_recall(0.3 * a, b)                   # good samples of a part of the data
    assert p_narrow > 0.9 and r_narrow < 0.5
