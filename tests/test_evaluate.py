"""evaluate.py offline: a random-weights Inception with the real architecture, tiny checkpoints."""
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

import common
import evaluate
from conftest import DATA, write_mnist

FAST = ["--steps-each", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception architecture with random weights. Default initialisation gives
    the same features for every input (IS 1, FID 0), so its batch-norm statistics are calibrated
    on random images first: then the tests can fail."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pt"
    torch.save({}, empty)

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):
            return None
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(empty))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats(), setattr(m, "momentum", None)
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8))
    path = folder / "inception_random.pt"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory):
    from PIL import Image
    folder = tmp_path_factory.mktemp("ref")
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


@pytest.fixture(scope="module")
def ref_stats(inception_weights, ref_folder, tmp_path_factory):
    """The reference folder's statistics as an .npz (the --ref form that skips feature extraction)."""
    net = evaluate.inception(inception_weights, torch.device("cpu"))
    mu, sigma, _ = evaluate.streamed_stats(net, [common.load_image_folder(ref_folder, 3, 32)], torch.device("cpu"))
    path = tmp_path_factory.mktemp("stats") / "ref.npz"
    np.savez(path, mu=mu, sigma=sigma)
    return str(path)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = common.RefineNet(3, 4)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    common.atomic_save(dict(model=net.state_dict(), ema=None, model_args=net.model_args, step=0,
                            config=dict(dataset="cifar10", sigma_begin=1.0, sigma_end=0.01, num_levels=10)), path)
    return str(path)


def test_features_vary_with_the_input(inception_weights):
    net = evaluate.inception(inception_weights, torch.device("cpu"))
    pool, logits = evaluate.features(net, torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.device("cpu"))
    assert pool.shape == (4, 2048) and logits.shape == (4, 1008)
    assert (pool[0] - pool[1]).abs().max() > 1e-3 and (logits[0] - logits[1]).abs().max() > 1e-3


def test_is_and_fid_equal_an_independent_computation():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(200, 30)) * 3)
    mean, std = evaluate.inception_score(logits, splits=10)
    perm = np.random.RandomState(2020).permutation(200)          # torch-fidelity shuffles with seed 2020
    p = scipy.special.softmax(logits.numpy()[perm], axis=1)
    scores = []
    for part in np.array_split(p, 10):
        py = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(py))).sum(1).mean()))
    assert mean == pytest.approx(np.mean(scores), rel=1e-9) and std == pytest.approx(np.std(scores), rel=1e-9)
    assert mean > 1.5
    a = torch.from_numpy(rng.normal(size=(300, 8)))
    b = torch.from_numpy(rng.normal(size=(300, 8)) * 1.5 + 0.7)
    (m1, s1), (m2, s2) = [(f.numpy().mean(0), np.cov(f.numpy(), rowvar=False)) for f in (a, b)]
    want = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert evaluate.fid(m1, s1, m2, s2) == pytest.approx(want, rel=1e-6)
    assert evaluate.fid(m1, s1, m1, s1) == pytest.approx(0, abs=1e-6)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 16 images span < 2048 dims
def test_pipeline_writes_everything_and_its_numbers_check_out(tiny_checkpoint, inception_weights, ref_folder, tmp_path):
    out = tmp_path / "eval"
    [r] = evaluate.main(["--checkpoint", tiny_checkpoint, "--n", "12", "--batch-size", "5", "--out", str(out),
                         "--ref", ref_folder, "--inception-weights", inception_weights, *FAST])
    folder = out / "steplr2e-05_T2_seed0"
    shards = sorted(os.listdir(folder))
    assert [s for s in shards if s.startswith("shard_")] == ["shard_0000000_0000005.npz", "shard_0000005_0000010.npz",
                                                             "shard_0000010_0000012.npz"]
    assert {"grid.png", "metrics.json"} <= set(shards)
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["n"] == 12 and len(saved["health"]) == 10 and saved["fid"] == pytest.approx(r["fid"])
    assert saved["inception_score_mean"] > 1.0 and math_finite(saved["fid"]) and saved["fid"] > 0
    # recompute FID from the saved samples and the reference folder, independently
    net = evaluate.inception(inception_weights, torch.device("cpu"))
    images = evaluate.collect(str(folder), 12)
    pool, _ = evaluate.features(net, images, torch.device("cpu"))
    ref = common.load_image_folder(ref_folder, 3, 32)
    ref_pool, _ = evaluate.features(net, ref, torch.device("cpu"))
    a, b = pool.numpy(), ref_pool.numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert saved["fid"] == pytest.approx(want, rel=1e-3)


def math_finite(v):
    return v is not None and np.isfinite(v)


def test_samples_do_not_depend_on_batch_size_and_resume_makes_none_twice(tiny_checkpoint, inception_weights,
                                                                         ref_stats, tmp_path, monkeypatch):
    common_args = ["--checkpoint", tiny_checkpoint, "--n", "9", "--ref", ref_stats, "--inception-weights", inception_weights, *FAST]
    made = []
    real = common.annealed_langevin_dynamics
    def counting(net, x, *a, **k):
        made.append(len(x))
        if len(made) == 2 and counting.interrupt:
            raise KeyboardInterrupt
        return real(net, x, *a, **k)
    counting.interrupt = True
    monkeypatch.setattr(common, "annealed_langevin_dynamics", counting)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main([*common_args, "--batch-size", "4", "--out", str(tmp_path / "a")])
    counting.interrupt = False
    evaluate.main([*common_args, "--batch-size", "4", "--out", str(tmp_path / "a")])
    assert made == [4, 4, 4, 1]                                     # the interrupted batch of 4 is redone once
    images_a = evaluate.collect(str(tmp_path / "a" / "steplr2e-05_T2_seed0"), 9)
    evaluate.main([*common_args, "--batch-size", "9", "--out", str(tmp_path / "b")])
    images_b = evaluate.collect(str(tmp_path / "b" / "steplr2e-05_T2_seed0"), 9)
    # the same noise for every image; only float rounding of batched convolutions differs (measured:
    # 2 of 27,648 pixels by one grey level), where different draws would change almost every pixel
    diff = (images_a.int() - images_b.int()).abs()
    assert len(images_a) == 9 and diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    made.clear()
    evaluate.main([*common_args, "--batch-size", "4", "--out", str(tmp_path / "a")])   # all there: nothing sampled
    assert made == []


def test_official_checkpoint_and_model_selection(inception_weights, ref_stats, tmp_path, capsys):
    official = os.path.join(DATA, "official_cifar_ngf4.pth")
    results = evaluate.main(["--checkpoint", official, "--n", "6", "--batch-size", "6", "--out", str(tmp_path),
                             "--ref", ref_stats, "--inception-weights", inception_weights, "--step-lr", "2e-5", "1e-6", *FAST])
    assert [r["sampler"]["step_lr"] for r in results] == [2e-5, 1e-6]
    table = capsys.readouterr().out
    assert "8.87 +- 0.12" in table and "110.85" in table and "* lowest FID" in table
    best = min(results, key=lambda r: r["fid"])
    assert [l for l in table.splitlines() if l.startswith("*") and f"{best['fid']:.2f}" in l]


def test_mnist_checkpoint_reports_fid_only_and_caches_reference_stats(inception_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "REF_STATS", str(tmp_path / "ref_stats"))
    root = write_mnist(str(tmp_path / "data"), n_train=12, n_test=4)
    ck = os.path.join(DATA, "official_mnist_ngf4.pth")
    args = ["--checkpoint", ck, "--n", "5", "--batch-size", "5", "--out", str(tmp_path / "e"), "--data-root", root,
            "--inception-weights", inception_weights, *FAST]
    [r] = evaluate.main(args)
    assert r["inception_score_mean"] is None and r["fid"] > 0 and "paper reports no" in r["note"]
    assert "repeated to 3 channels" in r["fid_reference"]
    [cache] = os.listdir(tmp_path / "ref_stats")
    os.remove(os.path.join(root, "MNIST", "raw", "train-images-idx3-ubyte"))   # the cache is used from now on
    [r2] = evaluate.main(args)
    assert r2["fid"] == pytest.approx(r["fid"])
    assert "paper reports no Inception score" in capsys.readouterr().out


def test_bad_inputs(tmp_path, inception_weights, ref_stats, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match="not a PyTorch checkpoint"):
        evaluate.main(["--checkpoint", str(bad), "--n", "2", "--inception-weights", inception_weights, "--ref", ref_stats, *FAST])
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(tmp_path / "*.pth"), "--n", "2"])
    assert "no file matches" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs arrays 'mu' and 'sigma'"):
        np.savez(tmp_path / "wrong.npz", mean=np.zeros(3))
        evaluate.main(["--checkpoint", os.path.join(DATA, "official_cifar_ngf4.pth"), "--n", "2", "--ref",
                       str(tmp_path / "wrong.npz"), "--inception-weights", inception_weights, *FAST])
    with pytest.raises(SystemExit, match="refused"):
        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))
        torch.save({"x": Evil()}, tmp_path / "w.pt")
        evaluate.main(["--checkpoint", str(bad), "--inception-weights", str(tmp_path / "w.pt"), *FAST])


def test_streamed_stats_equal_numpy_mean_and_covariance():
    torch.manual_seed(0)
    fake = lambda x: (x.flatten(1)[:, :6].double() * torch.arange(1, 7) + 3.0, x.flatten(1)[:, :4].double())
    images = torch.randint(0, 256, (23, 3, 4, 4), dtype=torch.uint8)
    mu, sigma, logits = evaluate.streamed_stats(fake, [images[:10], images[10:17], images[17:]], torch.device("cpu"))
    pool = fake(images)[0].numpy()
    want_mu, want_sigma = pool.mean(0), np.cov(pool, rowvar=False)
    assert np.allclose(mu, want_mu, rtol=1e-12) and np.allclose(sigma, want_sigma, rtol=1e-9)
    assert logits.shape == (23, 4)


def test_health_report_names_the_level_where_samples_saturate():
    sigmas = common.geometric_sigmas(1, 0.01, 6).tolist()
    # MNIST-like: most pixels sit just below 0 (background plus noise): normal, no warning
    rows, bad = evaluate.health_report(sigmas, [10.0] * 6, [0.7, 0.6, 0.6, 0.7, 0.8, 0.85], [0.0, 0.001, 0, 0, 0, 0], dim=784)
    assert bad is None and rows[0]["sigma_times_norm_over_sqrt_d"] == pytest.approx(10 / 28)
    assert rows[5]["share_outside_01"] == 0.85
    _, bad = evaluate.health_report(sigmas, [10.0] * 6, [0.7] * 6, [0.0, 0.0, 0.002, 0.02, 0.05, 0.1], dim=784)
    assert bad == 4


def test_health_callback_counts_only_far_pixels_as_saturated(tmp_path):
    """The exact score of a point mass at t perturbed by sigma_i: samples sit at N(t, ~sigma_i^2).
    t = 1.5 saturates from the first level on; t = -0.001 (a dark pixel) never does, although
    about half its pixels end below 0."""
    sigmas = torch.tensor([0.1, 0.03, 0.01])
    for target, want in [(1.5, 1), (-0.001, None)]:
        net = lambda x, labels: (target - x) / sigmas[labels].view(-1, 1, 1, 1) ** 2
        folder = tmp_path / str(target)
        folder.mkdir()
        evaluate.sample(net, sigmas, str(folder), 4, 4, 0.1 * 0.01 ** 2, 60, False, 0, torch.device("cpu"), (1, 8, 8))
        norm, out, far = evaluate.health_means(str(folder), 4)
        _, bad = evaluate.health_report(sigmas.tolist(), norm, out, far, 64)
        assert bad == want and (out[-1] > 0.2 if target < 0 else out[-1] == 1.0)
