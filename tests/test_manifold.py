"""manifold.py: Fig. 1 (left), sliced score matching on the data manifold, resumable."""
import numpy as np
import pytest

import manifold

FAST = ["--device", "cpu"]


def test_manifold_runs_resumes_and_summarises(mnist_root, tmp_path):
    args = ["--data-root", mnist_root, "--iters", "24", "--save-every", "8", "--nef", "8", "--batch-size", "8", *FAST]
    full = manifold.main([*args, "--out", str(tmp_path / "full")])
    manifold.main([*args[:2], "--iters", "8", *args[4:], "--out", str(tmp_path / "part")])
    part = manifold.main([*args, "--out", str(tmp_path / "part"), "--resume"])
    a, b = (np.load(tmp_path / r / "losses.npz") for r in ("full", "part"))
    assert np.allclose(a["noise"], b["noise"]) and np.allclose(a["no_noise"], b["no_noise"])
    assert not np.allclose(a["noise"], a["no_noise"])                        # the noise changes the loss
    assert full["noise"]["tail_variance"] == pytest.approx(part["noise"]["tail_variance"])
    assert (tmp_path / "full" / "manifold.png").stat().st_size > 10_000
    s = manifold.summary(np.array([1.0, 2, 3, 4, 5, 6, 7, 8, 9, np.nan]), 0.3)
    assert s == dict(tail_mean=8.5, tail_variance=0.25, first_non_finite=10)
