"""metrics.py: scorers through their table, on any images; nearest neighbours."""
import os

import numpy as np
import pytest
import torch

import evaluate
import metrics
import sample
from conftest import DATA, write_mnist

FAST = ["--device", "cpu"]


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return write_mnist(str(tmp_path_factory.mktemp("mnist")), n_train=200, n_test=20)


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
