"""evaluate.py offline: a random-weights Inception with the real architecture, tiny checkpoints."""
import functools
import glob
import json
import os
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch

import checkpoints
import common
import samplers
import data
import evaluate
import metrics
import health
import sample
from conftest import DATA, one_thread, write_cifar10, write_mnist

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
def ref_pool(inception_weights, ref_folder):
    """The reference folder's Inception pool features (16, 2048), float64, computed once."""
    net = metrics.inception(inception_weights, torch.device("cpu"))
    return metrics.features(net, data.load_image_folder(ref_folder, 3, 32), torch.device("cpu"))[0].numpy()


@pytest.fixture(scope="module")
def ref_stats(ref_pool, tmp_path_factory):
    """The reference folder's statistics as an .npz (the --ref form that skips feature extraction)."""
    path = tmp_path_factory.mktemp("stats") / "ref.npz"
    np.savez(path, mu=ref_pool.mean(0), sigma=np.cov(ref_pool, rowvar=False))
    return str(path)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = common.RefineNet(3, 4)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    checkpoints.write_checkpoint(dict(model=net.state_dict(), ema=None, model_args=net.model_args, step=0,
                            config=dict(dataset="cifar10", sigma_begin=1.0, sigma_end=0.01, num_levels=10)), path)
    return str(path)


def test_features_vary_with_the_input(inception_weights):
    net = metrics.inception(inception_weights, torch.device("cpu"))
    pool, logits = metrics.features(net, torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.device("cpu"))
    assert pool.shape == (4, 2048) and logits.shape == (4, 1008)
    assert (pool[0] - pool[1]).abs().max() > 1e-3 and (logits[0] - logits[1]).abs().max() > 1e-3


def test_is_and_fid_equal_an_independent_computation():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(200, 30)) * 3)
    mean, std = metrics.inception_score(logits, splits=10)
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
    assert metrics.fid(m1, s1, m2, s2) == pytest.approx(want, rel=1e-6)
    assert metrics.fid(m1, s1, m1, s1) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("n1, n2, d", [(30, 16, 200), (500, 40, 64), (12, 900, 300)])
def test_fid_equals_the_gram_matrix_formula_when_there_are_fewer_samples_than_features(n1, n2, d):
    """Covariances of fewer samples than features are singular, and the square roots of their product's round-off
    eigenvalues add up. tr (S1 S2)^(1/2) is the sum of the singular values of X2 X1^T / ((n1 - 1)(n2 - 1))^(1/2)
    of the centred samples: an exact route that never forms S1 or S2. torch-fidelity's general eigvals agrees to
    its own round-off."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    rng = np.random.default_rng(n1)
    x1, x2 = rng.normal(size=(n1, d)) * rng.uniform(0.1, 3, d), rng.normal(size=(n2, d)) + 0.3
    (m1, s1), (m2, s2) = [(x.mean(0), np.cov(x, rowvar=False)) for x in (x1, x2)]
    roots = np.linalg.svd((x2 - m2) @ (x1 - m1).T / np.sqrt((n1 - 1) * (n2 - 1)), compute_uv=False).sum()
    want = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * roots
    assert metrics.fid(m1, s1, m2, s2) == pytest.approx(want, rel=1e-9)
    assert metrics.fid(m2, s2, m1, s1) == pytest.approx(want, rel=1e-9)         # either set first
    assert metrics.fid(m1, s1, m2, s2, x1) == pytest.approx(want, rel=1e-9)     # from the features S1 came from
    assert metrics.fid(m2, s2, m1, s1, x2) == pytest.approx(want, rel=1e-9)
    official = fid_statistics_to_metric(dict(mu=m1, sigma=s1), dict(mu=m2, sigma=s2), False)
    assert official["frechet_inception_distance"] == pytest.approx(want, rel=1e-5)


def test_pipeline_writes_everything_and_its_numbers_check_out(tiny_checkpoint, inception_weights, ref_folder, ref_pool,
                                                           tmp_path):
    out = tmp_path / "eval"
    [r] = evaluate.main(["--checkpoint", tiny_checkpoint, "--n", "12", "--batch-size", "5", "--out", str(out),
                         "--ref", ref_folder, "--inception-weights", inception_weights, *FAST])
    folder = out / f"steplr2e-05_T2_seed0_{r['fingerprint'][:10]}"
    assert r["folder"] == str(folder)
    shards = sorted(os.listdir(folder))
    assert [s for s in shards if s.startswith("shard_")] == ["shard_0000000_0000005.npz", "shard_0000005_0000010.npz",
                                                             "shard_0000010_0000012.npz"]
    assert {"grid.png", "metrics.json", "samples.json"} <= set(shards)
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["n"] == 12 and len(saved["health"]) == 10 and saved["fid"] == pytest.approx(r["fid"])
    assert saved["inception_score_mean"] > 1.0 and math_finite(saved["fid"]) and saved["fid"] > 0
    # recompute FID from the saved samples and the reference folder, independently
    net = metrics.inception(inception_weights, torch.device("cpu"))
    pool, _ = metrics.features(net, sample.collect(str(folder), 12), torch.device("cpu"))
    a, b = pool.numpy(), ref_pool
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ca, cb = a64 - a64.mean(0), b64 - b64.mean(0)      # tr (Sa Sb)^(1/2): the singular values of the centred features
    roots = np.linalg.svd(cb @ ca.T / np.sqrt((len(a) - 1) * (len(b) - 1)), compute_uv=False).sum()
    want = ((a64.mean(0) - b64.mean(0)) ** 2).sum() + np.trace(np.cov(a64, rowvar=False) + np.cov(b64, rowvar=False)) \
        - 2 * roots
    assert saved["fid"] == pytest.approx(want, rel=1e-3)
    # KID, precision and recall of the same features (the reference folder's computed statistics keep them)
    kid, _ = metrics.kid(a.astype(np.float32), b.astype(np.float32))
    precision, recall = metrics.precision_recall(a.astype(np.float32), b.astype(np.float32))
    assert saved["kid"] == pytest.approx(kid, rel=1e-3, abs=1e-6)
    assert (saved["precision"], saved["recall"]) == pytest.approx((precision, recall))


def math_finite(v):
    return v is not None and np.isfinite(v)


def test_samples_do_not_depend_on_batch_size_and_resume_makes_none_twice(tiny_checkpoint, inception_weights,
                                                                         ref_stats, tmp_path, monkeypatch):
    common_args = ["--checkpoint", tiny_checkpoint, "--n", "9", "--ref", ref_stats,
                   "--inception-weights", inception_weights, *FAST]
    made = []
    real = common.annealed_langevin_dynamics
    @functools.wraps(real)                                          # the same settings as the real sampler
    def counting(net, x, *a, **k):
        made.append(len(x))
        if len(made) == 2 and counting.interrupt:
            raise KeyboardInterrupt
        return real(net, x, *a, **k)
    counting.interrupt = True
    monkeypatch.setitem(samplers.SAMPLERS, "als", samplers.SAMPLERS["als"]._replace(run=counting))
    with pytest.raises(SystemExit) as e:                            # Ctrl-C: a message, status 130
        evaluate.main([*common_args, "--batch-size", "4", "--out", str(tmp_path / "a")])
    assert e.value.code == 130
    counting.interrupt = False
    [ra] = evaluate.main([*common_args, "--batch-size", "4", "--out", str(tmp_path / "a")])
    assert made == [4, 4, 4, 1] and ra["samples_made_now"] == 5    # the interrupted batch of 4 is redone once
    images_a = sample.collect(ra["folder"], 9)
    with np.load(os.path.join(ra["folder"], "shard_0000000_0000004.npz")) as f:   # process.png's states: the
        last = torch.from_numpy(f["levels"][-1])                                   # shards' own first samples
    assert last.shape == (4, *images_a.shape[1:]) and os.path.exists(os.path.join(ra["folder"], "process.png"))
    assert torch.equal((last.clamp(0, 1) * 255 + 0.5).to(torch.uint8), images_a[:4])
    [rb] = evaluate.main([*common_args, "--batch-size", "9", "--out", str(tmp_path / "b")])
    images_b = sample.collect(rb["folder"], 9)
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
                             "--ref", ref_stats, "--inception-weights", inception_weights, "--step-lr", "2e-5", "1e-6",
                             *FAST])
    assert [r["sampler"]["step_lr"] for r in results] == [2e-5, 1e-6]
    assert "kid" not in results[0]              # statistics alone (mu, sigma) hold no features for KID
    table = capsys.readouterr().out
    assert "8.87 +- 0.12" in table and "110.85" in table and "* lowest FID" in table
    best = min(results, key=lambda r: r["fid"])
    assert [l for l in table.splitlines() if l.startswith("*") and f"{best['fid']:.2f}" in l]


def test_mnist_checkpoint_reports_fid_only_and_caches_reference_stats_by_content(inception_weights, tmp_path, capsys):
    root = write_mnist(str(tmp_path / "data"), n_train=6, n_test=4)
    ck = os.path.join(DATA, "official_mnist_ngf4.pth")
    cache = tmp_path / "cache"
    args = ["--checkpoint", ck, "--n", "3", "--batch-size", "3", "--out", str(tmp_path / "e"), "--data-root", root,
            "--inception-weights", inception_weights, "--ref-cache", str(cache), *FAST]
    [r] = evaluate.main(args)
    assert r["inception_score_mean"] is None and r["fid"] > 0 and "paper reports no" in r["note"]
    assert "repeated to 3 channels" in r["fid_reference"]
    [first] = os.listdir(cache)
    assert "computed once" in capsys.readouterr().out
    [r2] = evaluate.main(args)                                       # same images, same weights: the cache
    assert r2["fid"] == pytest.approx(r["fid"]) and r2["samples_made_now"] == 0
    out = capsys.readouterr().out
    assert f"{cache / first} (cached" in out and "paper reports no Inception score" in out
    # other images under the same name and --data-root: new statistics, never the old ones
    write_mnist(root, n_train=6, n_test=4, seed=1)
    [r3] = evaluate.main(args)
    assert len(os.listdir(cache)) == 2 and r3["fid"] != pytest.approx(r["fid"]) and r3["samples_made_now"] == 0
    # by default the cache lives under --out
    evaluate.main([a for a in args if a not in ("--ref-cache", str(cache))])
    assert len(os.listdir(tmp_path / "e" / "ref_stats")) == 1


def test_other_weights_or_settings_never_reuse_samples(tiny_checkpoint, inception_weights, ref_stats, tmp_path):
    """Same --out: another checkpoint, the same file trained further, EMA on/off: fresh samples each."""
    base = ["--n", "3", "--batch-size", "3", "--ref", ref_stats, "--inception-weights", inception_weights, *FAST]
    out = ["--out", str(tmp_path / "e")]
    [a] = evaluate.main(["--checkpoint", tiny_checkpoint, *out, *base])
    path = tmp_path / "ck" / "checkpoint.pt"
    path.parent.mkdir()
    state = torch.load(tiny_checkpoint, weights_only=True)
    ema = {k: v + 0.01 for k, v in state["model"].items()}
    checkpoints.write_checkpoint(dict(state, ema=ema), path)                    # the same run, later, with an EMA
    [b] = evaluate.main(["--checkpoint", str(path), *out, *base])
    [c] = evaluate.main(["--checkpoint", str(path), *out, *base, "--no-ema"])
    assert a["samples_made_now"] == b["samples_made_now"] == 3 and b["folder"] != a["folder"]
    # --no-ema takes the raw weights, which are the first file's: its samples are the right ones to reuse
    assert c["fingerprint"] == a["fingerprint"] and c["folder"] == a["folder"] and c["samples_made_now"] == 0
    assert not torch.equal(sample.collect(a["folder"], 3), sample.collect(b["folder"], 3))
    [d] = evaluate.main(["--checkpoint", str(path), *out, *base, "--seed", "1"])
    assert d["samples_made_now"] == 3 and d["folder"] != b["folder"]
    # a shard that another setting made, copied in by hand, is refused rather than counted
    shard = sorted(glob.glob(os.path.join(d["folder"], "shard_*.npz")))[0]
    shutil.copy(shard, os.path.join(b["folder"], "shard_0000003_0000004.npz"))
    with pytest.raises(SystemExit, match="made by other weights or sampler settings") as e:
        evaluate.main(["--checkpoint", str(path), *out, *base, "--n", "4"])
    assert "\n" not in str(e.value)


def test_two_checkpoints_with_the_same_name_keep_their_own_results(tiny_checkpoint, inception_weights, ref_stats,
                                                                   tmp_path):
    paths = []
    for run, shift in [("a", 0.0), ("b", 0.02)]:
        path = tmp_path / run / "logs" / "checkpoint.pt"                   # same parent folder and file name
        path.parent.mkdir(parents=True)
        state = torch.load(tiny_checkpoint, weights_only=True)
        checkpoints.write_checkpoint(dict(state, model={k: v + shift for k, v in state["model"].items()}), path)
        paths.append(str(path))
    results = evaluate.main(["--checkpoint", *paths, "--n", "2", "--batch-size", "2", "--out", str(tmp_path / "e"),
                             "--ref", ref_stats, "--inception-weights", inception_weights, *FAST])
    assert len({r["folder"] for r in results}) == 2
    for r in results:
        saved = json.loads(open(os.path.join(r["folder"], "metrics.json")).read())
        assert saved["checkpoint"] == r["checkpoint"] and saved["fid"] == pytest.approx(r["fid"])


def test_bad_inputs(tmp_path, inception_weights, ref_stats, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match="not a PyTorch checkpoint"):
        evaluate.main(["--checkpoint", str(bad), "--n", "2", "--inception-weights", inception_weights,
                       "--ref", ref_stats, *FAST])
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(tmp_path / "*.pth"), "--n", "2"])
    assert "no file matches" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="refused"):
        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))
        torch.save({"x": Evil()}, tmp_path / "w.pt")
        evaluate.main(["--checkpoint", os.path.join(DATA, "official_cifar_ngf4.pth"), "--inception-weights",
                       str(tmp_path / "w.pt"), *FAST])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", os.path.join(DATA, "official_cifar_ngf4.pth"), "--out", str(tmp_path / "file")])
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("kind, message", [
    ("corrupt", "not a readable .npz"), ("keys", "needs arrays 'mu' and 'sigma'"),
    ("shape", "mu has shape (3,)"), ("nan", "NaN or infinite"), ("pickle", "not a readable .npz")])
def test_bad_ref_file_is_refused_before_any_sampling(kind, message, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref.npz"
    if kind == "corrupt":
        ref.write_bytes(b"PK\x03\x04 half a zip file")
    elif kind == "keys":
        np.savez(ref, mean=np.zeros(2048))
    elif kind == "shape":
        np.savez(ref, mu=np.zeros(3), sigma=np.eye(3))
    elif kind == "nan":
        np.savez(ref, mu=np.full(2048, np.nan), sigma=np.eye(2048))
    else:
        np.savez(ref, mu=np.array([object()], dtype=object), sigma=np.eye(2048))
    calls = []
    fake = functools.wraps(common.annealed_langevin_dynamics)(lambda *a, **k: calls.append(1))
    monkeypatch.setitem(samplers.SAMPLERS, "als", samplers.SAMPLERS["als"]._replace(run=fake))
    monkeypatch.setattr(metrics, "inception", lambda *a: calls.append("inception"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", os.path.join(DATA, "official_cifar_ngf4.pth"), "--n", "2", "--ref", str(ref),
                       "--out", str(tmp_path / "e"), *FAST])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and message in err and str(ref) in err
    assert calls == [] and not (tmp_path / "e").exists()


def test_missing_data_names_evaluate_s_own_flag(inception_weights, tmp_path, monkeypatch):
    import urllib.error
    import torchvision.datasets.mnist as mnist
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(mnist, "download_and_extract_archive", offline)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", os.path.join(DATA, "official_mnist_ngf4.pth"), "--n", "2", "--data-root",
                       str(tmp_path / "none"), "--inception-weights", inception_weights, "--out", str(tmp_path / "e"),
                       *FAST])
    assert "--ref FOLDER" in str(e.value) and "--dataset-path" not in str(e.value)


def test_streamed_stats_equal_numpy_mean_and_covariance():
    torch.manual_seed(0)
    fake = lambda x: (x.flatten(1)[:, :6].double() * torch.arange(1, 7) + 3.0, x.flatten(1)[:, :4].double())
    images = torch.randint(0, 256, (23, 3, 4, 4), dtype=torch.uint8)
    batches = [images[:10], images[10:17], images[17:]]
    mu, sigma, logits, kept = metrics.streamed_stats(fake, batches, torch.device("cpu"), keep=12)
    pool = fake(images)[0].numpy()
    want_mu, want_sigma = pool.mean(0), np.cov(pool, rowvar=False)
    assert np.allclose(mu, want_mu, rtol=1e-12) and np.allclose(sigma, want_sigma, rtol=1e-9)
    assert logits.shape == (23, 4) and np.array_equal(kept, pool[:12].astype(np.float32))   # the first 12, in order


def test_health_report_names_the_level_where_samples_saturate():
    sigmas = common.geometric_sigmas(1, 0.01, 6).tolist()
    # MNIST-like: most pixels sit just below 0 (background plus noise): normal, no warning
    rows, bad = health.health_report(sigmas, [10.0] * 6, [0.7, 0.6, 0.6, 0.7, 0.8, 0.85], [0.0, 0.001, 0, 0, 0, 0],
                                     dim=784)
    assert bad is None and rows[0]["sigma_times_norm_over_sqrt_d"] == pytest.approx(10 / 28)
    assert rows[5]["share_outside_01"] == 0.85
    _, bad = health.health_report(sigmas, [10.0] * 6, [0.7] * 6, [0.0, 0.0, 0.002, 0.02, 0.05, 0.1], dim=784)
    assert bad == 4


def test_health_warning_names_the_setting_of_the_sampler_that_ran(capsys):
    """The saturation warning's advice fits the sampler: Langevin's step size, Heun's churn, and
    never a flag the sampler lacks."""
    sigmas = common.geometric_sigmas(1, 0.01, 3).tolist()
    rows, bad = health.health_report(sigmas, [1.0] * 3, [0.5] * 3, [0.0, 0.0, 0.2], dim=784)
    for name, churn, want, never in [("als", 0, "--step-lr", "--s-churn"), ("heun", 10.0, "--s-churn", "--step-lr"),
                                     ("heun", 0, "longer-trained", "--s"), ("dpmpp2m", 0, "longer-trained", "--s"),
                                     ("ancestral", 0, "longer-trained", "--s")]:
        health.print_health(rows, bad, 2, 4, "t", health.remedy(name, churn))
        warnings = [l for l in capsys.readouterr().out.splitlines() if l.startswith("WARNING")]
        assert len(warnings) == 2 and all(want in l and never not in l for l in warnings), (name, warnings)


def test_health_callback_counts_only_far_pixels_as_saturated(tmp_path):
    """The exact score of a point mass at t perturbed by sigma_i: samples sit at N(t, ~sigma_i^2).
    t = 1.5 saturates from the first level on; t = -0.001 (a dark pixel) never does, although
    about half its pixels end below 0."""
    sigmas = common.geometric_sigmas(0.1, 0.01, 3)
    settings = sample.SamplerSettings("als", tuple(sigmas.tolist()), 0, (1, 8, 8),
                                      (("steps_each", 60), ("step_lr", 0.1 * 0.01 ** 2), ("denoise", False)))
    for target, want in [(1.5, 1), (-0.001, None)]:
        model = lambda x, sigma: (target - x) / sigma.view(-1, 1, 1, 1) ** 2
        folder = tmp_path / str(target)
        folder.mkdir()
        sample.sample(model, settings, str(folder), [(0, 4)], 4, torch.device("cpu"), "fp")
        norm, out, far, non_finite = health.health_means(sample.covering(str(folder), 4))
        assert non_finite == 0
        _, bad = health.health_report(sigmas.tolist(), norm, out, far, 64)
        assert bad == want and (out[-1] > 0.2 if target < 0 else out[-1] == 1.0)


def test_out_of_memory_is_one_line(tiny_checkpoint, inception_weights, ref_stats, tmp_path, monkeypatch):
    @functools.wraps(common.annealed_langevin_dynamics)
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setitem(samplers.SAMPLERS, "als", samplers.SAMPLERS["als"]._replace(run=oom))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", tiny_checkpoint, "--n", "2", "--ref", ref_stats, "--inception-weights",
                       inception_weights, "--out", str(tmp_path / "e"), *FAST])
    assert "out of memory" in str(e.value) and "smaller --batch-size" in str(e.value) and "\n" not in str(e.value)


def test_level_loss_reports_the_test_dsm_loss_per_training_level(tmp_path, capsys):
    root = write_mnist(str(tmp_path / "data"), n_train=12, n_test=6)
    ck = os.path.join(DATA, "official_mnist_ngf4.pth")
    zero = tmp_path / "zero_output.pth"                    # the same network with its last conv zeroed: s = 0
    state, opt = torch.load(ck, weights_only=True)
    state["module.end_conv.weight"].zero_(), state["module.end_conv.bias"].zero_()
    torch.save([state, opt], zero)
    args = ["--n", "2", "--batch-size", "4", "--metrics", "none", "--data-root", root, "--level-loss", "6", *FAST]
    [r] = evaluate.main(["--checkpoint", str(zero), "--out", str(tmp_path / "z"), *args])
    losses = r["test_dsm_loss_per_level"]
    # s = 0 leaves 1/2 ||z / sigma||^2 sigma^2 = 1/2 ||z||^2: the same z at every level, about D / 2
    assert list(losses) == list(range(1, 11)) and max(losses.values()) == pytest.approx(min(losses.values()), rel=1e-6)
    assert losses[1] == pytest.approx(784 / 2, rel=0.1)
    assert "test DSM loss per training level" in capsys.readouterr().out
    saved = json.loads(open(os.path.join(r["folder"], "metrics.json")).read())
    assert saved["test_dsm_loss_per_level"] == pytest.approx({str(k): v for k, v in losses.items()})
    # --level-sigmas: the same levels for every network; a norm-conditioned one is scored at those it knows
    [r] = evaluate.main(["--checkpoint", ck, "--out", str(tmp_path / "s"), *args, "--level-sigmas", "1", "0.5", "0.01"])
    [own] = evaluate.main(["--checkpoint", ck, "--out", str(tmp_path / "s"), *args])
    per_sigma, per_level = r["test_dsm_loss_per_sigma"], own["test_dsm_loss_per_level"]
    assert (tmp_path / "s" / "level_loss.png").stat().st_size > 5_000           # the loss against sigma
    assert per_sigma == pytest.approx({1.0: per_level[1], 0.01: per_level[10]}, rel=1e-6)
    with pytest.raises(SystemExit, match="none of --level-sigmas is a trained level"):
        evaluate.main(["--checkpoint", ck, "--out", str(tmp_path / "s"), *args, "--level-sigmas", "0.5"])
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", ck, "--out", str(tmp_path / "s"), "--metrics", "none", "--level-sigmas", "1"])
    assert e.value.code == 2
    # the exact score of each perturbed test image given its clean one, -(x~ - x) / sigma^2: loss 0
    images = data.load_images("mnist", False, root)
    sigmas = common.geometric_sigmas(1.0, 0.01, 95)
    class Oracle(torch.nn.Module):                          # norm-conditioned: it sees level indices
        def forward(self, x, labels):
            return -(x - images.float() / 255) / sigmas[labels].view(-1, 1, 1, 1) ** 2
    config = dict(dataset="mnist", sigma_begin=1.0, sigma_end=0.01, num_levels=95)
    exact = metrics.level_losses(checkpoints.record(Oracle(), config, "oracle"), images, 6, torch.device("cpu"))
    assert list(exact) == [i + 1 for i in range(0, 95, 5)] + [95] and max(exact.values()) < 1e-6
    scale = common.RefineNet(1, 4, 95, 28, conditioning="scale", sigmas=sigmas)    # any sigma: 0.5 is not a level
    anywhere = metrics.level_losses(checkpoints.record(scale, config, "s"), images, 6, torch.device("cpu"),
                                    at=[0.5, 0.01])
    assert list(anywhere) == [0.5, 0.01] and all(v > 0 for v in anywhere.values())
    assert health.shown_levels(10) == list(range(10))


def test_fingerprints_hash_the_settings_values_not_function_names(monkeypatch):
    """A sample folder's key is the weights and the setting's values: renaming a sampler's function leaves it
    unchanged, any setting's value changes it."""
    torch.manual_seed(0)
    ck = checkpoints.record(common.RefineNet(1, 4, 10, 28), dict(sigma_begin=1.0, sigma_end=0.01, num_levels=10), "p")
    als = sample.sampler_settings("als", ck, 0)
    assert als.record() == dict(name="als", sigmas=common.geometric_sigmas().tolist(), seed=0, shape=[1, 28, 28],
                                steps_each=100, step_lr=2e-5, denoise=False) and als.tag() == "steplr2e-05_T100"
    before = sample.fingerprint(ck, als)
    @functools.wraps(common.annealed_langevin_dynamics)      # the same settings under another name
    def renamed(*a, **k):
        return common.annealed_langevin_dynamics(*a, **k)
    renamed.__name__ = renamed.__qualname__ = "algorithm_1"
    monkeypatch.setitem(samplers.SAMPLERS, "als", samplers.SAMPLERS["als"]._replace(run=renamed))
    assert sample.fingerprint(ck, sample.sampler_settings("als", ck, 0)) == before
    assert sample.fingerprint(ck, sample.sampler_settings("als", ck, 0, steps_each=99)) != before
    assert sample.fingerprint(ck, sample.sampler_settings("als", ck, 1)) != before
    with torch.no_grad():
        ck.model.net.end_conv.bias.add_(1e-3)
    assert sample.fingerprint(ck, als) != before


def test_level_loss_also_draws_each_runs_training_loss_against_wall_clock(tmp_path):
    """training_loss.png: a run's loss per step from its metrics.csv, against minutes from each row's images/s and
    config.json's batch; a checkpoint without its run's files is left out of the figure, not an error."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(os.path.join(DATA, "official_mnist_ngf4.pth"), run / "checkpoint.pth")
    (run / "config.json").write_text(json.dumps(dict(batch_size=64)))
    rows = [f"{s},0,{100 / s:.6g},,{32 if s <= 30 else 64}" for s in range(1, 61)]    # 2 s a step, then 1 s
    (run / "metrics.csv").write_text("step,epoch,loss,test_loss,images_per_s\n" + "\n".join(rows) + "\n")
    minutes, loss = evaluate.training_curve(str(run / "checkpoint.pth"))
    assert len(evaluate.training_curve(str(run / "checkpoint.pth"), step=20)[0]) == 20      # up to the checkpoint
    assert minutes[29] == pytest.approx(1.0) and minutes[-1] == pytest.approx(1.5) and loss[3] == pytest.approx(25)
    assert evaluate.training_curve(os.path.join(DATA, "official_mnist_ngf4.pth")) is None
    root = write_mnist(str(tmp_path / "data"), n_train=12, n_test=6)
    evaluate.main(["--checkpoint", str(run / "checkpoint.pth"), os.path.join(DATA, "official_mnist_ngf4.pth"),
                   "--n", "2", "--batch-size", "4", "--metrics", "none", "--data-root", root, "--level-loss", "4",
                   "--out", str(tmp_path / "e"), *FAST])
    assert (tmp_path / "e" / "training_loss.png").stat().st_size > 5_000
    # the legends name the recipe and network, and a run's folder only where two would read the same
    official = checkpoints.load(os.path.join(DATA, "official_mnist_ngf4.pth"))
    assert official.label() == "ncsn recipe, RefineNet ngf 4"
    twins = {f"runs/{d}/checkpoint.pt": official for d in ("a", "b")}
    assert sorted(evaluate.legend_labels(twins).values()) == ["ncsn recipe, RefineNet ngf 4 [a]",
                                                               "ncsn recipe, RefineNet ngf 4 [b]"]


def test_seed_ranges_read_as_edm_writes_them():
    import argparse
    import utils
    assert utils.seed_ranges("0-2999:1000") == [(0, 1000), (1000, 2000), (2000, 3000)]
    assert utils.seed_ranges("3-7") == [(3, 8)] and utils.seed_ranges("5") == [(5, 6)]
    assert utils.seed_ranges("10-19:5") == [(10, 15), (15, 20)]
    for bad in ["7-3", "0-9:4", "0-9:0", "a-b", "-1", "1-2-3", ""]:
        with pytest.raises(argparse.ArgumentTypeError, match="seed ranges"):
            utils.seed_ranges(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="at most 10,000"):
        utils.seed_ranges("0-999999999999:1")


def test_missing_runs_of_several_sets_skip_what_shards_hold(tmp_path):
    for a, b in [(0, 5), (22, 26)]:                 # names only: without a fingerprint nothing is read
        (tmp_path / f"shard_{a:07d}_{b:07d}.npz").write_bytes(b"")
    count, runs = sample.missing_runs(str(tmp_path), [(0, 10), (20, 30)], 4, None)
    assert count == 5 + 6 and list(runs) == [(5, 9), (9, 10), (20, 22), (26, 30)]
    assert [(a, b) for a, b, _, _ in sample.covering(str(tmp_path), 26, None, 22)] == [(22, 26)]
    assert sample.covering(str(tmp_path), 26, None, 21) == []          # image 21 is in no shard: nothing to chain


def test_seeds_sets_are_scored_apart_with_their_mean_min_and_max(tiny_checkpoint, inception_weights, ref_stats,
                                                                  tmp_path, capsys):
    """--seeds 0-8:3: three sets of images 0-2, 3-5, 6-8 in one folder, each scored on its own; the same images
    as --n 9 makes, and a set asked for alone is the same set (same folder, nothing sampled, the same scores)."""
    base = ["--checkpoint", tiny_checkpoint, "--batch-size", "3", "--ref", ref_stats,
            "--inception-weights", inception_weights, *FAST]
    [r] = evaluate.main([*base, "--seeds", "0-8:3", "--out", str(tmp_path / "a")])
    table = capsys.readouterr().out
    assert [s["seeds"] for s in r["sets"]] == ["0-2", "3-5", "6-8"] and [s["n"] for s in r["sets"]] == [3] * 3
    assert r["n"] == 9 and r["seeds"] == "0-2 3-5 6-8" and r["samples_made_now"] == 9
    fids = [s["fid"] for s in r["sets"]]
    assert len(set(fids)) == 3 and r["fid"] == pytest.approx(np.mean(fids))
    assert (r["set_min"]["fid"], r["set_max"]["fid"]) == (min(fids), max(fids)) and "kid_std" not in r["set_min"]
    assert all(k in table for k in ["seeds 3-5", "mean of 3", "min of 3", "max of 3", "3x3"])
    # 3 samples a set: no Inception score (its 10 splits would be empty: NaN), said once under the table
    assert r["inception_score_mean"] is None and all(s["inception_score_mean"] is None for s in r["sets"])
    assert table.count("no Inception score: its 10 splits need at least 10 samples, got 3") == 1
    saved = json.loads(open(os.path.join(r["folder"], "metrics.json")).read())
    assert [s["fid"] for s in saved["sets"]] == pytest.approx(fids)
    # a rerun of the same sets with no metrics keeps each set's scores (the same samples)
    [again] = evaluate.main([*base, "--seeds", "0-8:3", "--out", str(tmp_path / "a"), "--metrics", "none"])
    assert [s["fid"] for s in again["sets"]] == pytest.approx(fids) and again["samples_made_now"] == 0
    [kept] = evaluate.main([*base, "--seeds", "0-8:3", "--out", str(tmp_path / "a"), "--existing"])
    assert kept["fid"] == pytest.approx(r["fid"])
    [alone] = evaluate.main([*base, "--seeds", "3-5", "--out", str(tmp_path / "a")])
    assert alone["folder"] == r["folder"] and alone["samples_made_now"] == 0 and alone["fid"] == pytest.approx(fids[1])
    assert "sets" not in alone and alone["n"] == 3
    [fresh] = evaluate.main([*base, "--seeds", "3-5", "--out", str(tmp_path / "b"), "--metrics", "none"])  # alone
    assert os.path.exists(os.path.join(fresh["folder"], "process.png"))
    [whole] = evaluate.main([*base, "--n", "9", "--out", str(tmp_path / "c"), "--metrics", "none"])
    assert torch.equal(sample.collect(fresh["folder"], 6, start=3), sample.collect(whole["folder"], 9)[3:6])
    assert torch.equal(sample.collect(r["folder"], 9), sample.collect(whole["folder"], 9))


@pytest.mark.parametrize("flags, message", [(["--seeds", "0-5", "4-7"], "0-5 and 4-7 overlap"),
                                            (["--seeds", "0-4", "--n", "5"], "--n and --seeds both"),
                                            (["--seeds", "0-9:3"], "seed ranges")])
def test_bad_seed_sets_are_refused_before_any_work(flags, message, tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "e"), *flags, *FAST])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and not (tmp_path / "e").exists()


def test_the_designs_commands_as_written_evaluate_the_newest_run(inception_weights, ref_stats, tmp_path, monkeypatch,
                                                                 capsys):
    """The design's usage line in one folder: `train_cifar.py --batch-size B --epochs E`, then `evaluate.py --n N`
    with no --checkpoint scores the CIFAR-10 run (Fig. 6's data set) though a newer run of other data is there, and
    says so first; sample.py and inpaint.py take the newest run; with no run, one line naming --checkpoint."""
    import shutil
    import torchvision.datasets.cifar as cifar
    import inpaint
    import train_cifar
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)          # only the MD5 check
    monkeypatch.chdir(tmp_path)
    for main in (evaluate.main, sample.main, inpaint.main):
        with pytest.raises(SystemExit) as e:
            main(["--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "no --checkpoint given and no training run under runs/" in err, main
    write_cifar10("cifar")
    train_cifar.main(["--data-root", "cifar", "--batch-size", "20", "--epochs", "1", "--ngf", "4", "--num-workers",
                      "0", "--n-samples", "4", "--steps-each", "2", "--device", "cpu"])
    shutil.copytree("runs/cifar10", "runs/later")                 # a newer run of another data set
    config = json.loads(open("runs/later/config.json").read())
    open("runs/later/config.json", "w").write(json.dumps(dict(config, dataset="mnist")))
    os.utime("runs/later/checkpoint.pt", (os.path.getmtime("runs/cifar10/checkpoint.pt") + 10,) * 2)
    capsys.readouterr()
    [r] = evaluate.main(["--n", "4", "--batch-size", "4", "--ref", ref_stats, "--inception-weights", inception_weights,
                         *FAST])
    first = capsys.readouterr().out.splitlines()[0]
    assert r["checkpoint"] == os.path.join("runs", "cifar10", "checkpoint.pt") and r["n"] == 4 and r["fid"] > 0
    assert first == "checkpoint runs/cifar10/checkpoint.pt: the newest cifar10 run under runs/ (no --checkpoint given)"
    [s] = sample.main(["--n", "2", "--batch-size", "2", *FAST])
    assert s["checkpoint"] == os.path.join("runs", "later", "checkpoint.pt")
    assert "the newest training run under runs/" in capsys.readouterr().out
    done = inpaint.main(["--data-root", "cifar", "--n-images", "1", "--completions", "1", "--steps-each", "1",
                         "--device", "cpu"])
    assert done["checkpoint"] == os.path.join("runs", "later", "checkpoint.pt")


def test_torchrun_completes_a_run_bitwise_as_one_process_makes_it(tiny_checkpoint, inception_weights, ref_stats,
                                                                 tmp_path):
    """`torchrun --nproc_per_node 2 evaluate.py` (gloo) on a folder one process left half made (shards gone as a
    kill leaves them): the two processes make the missing batches between them, rank 0 alone writes and scores, and
    every shard, the health report and the FID are those of one process making all of it (here in-process, on one
    thread as the subprocesses); the same when one process completes what two left half made."""
    import subprocess
    import sys
    from conftest import ROOT
    env = dict(os.environ, OMP_NUM_THREADS="1")                 # one thread each: the same arithmetic
    args = ["--checkpoint", tiny_checkpoint, "--seeds", "0-5", "--batch-size", "2", "--ref", ref_stats,
            "--inception-weights", inception_weights, *FAST]

    def one_process(out):
        with one_thread():
            return evaluate.main([*args, "--out", str(out)])[0]
    a = one_process(tmp_path / "one")
    folder = a["folder"]
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    half = folder.replace(str(tmp_path / "one"), str(tmp_path / "two"))
    for name in ["shard_0000002_0000004.npz", "shard_0000004_0000006.npz", "metrics.json", "health.json", "grid.png"]:
        os.remove(os.path.join(half, name))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "evaluate.py", *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("checkpoint / source") == 1 and "(2 processes)" in two.stderr
    b = json.loads(open(os.path.join(half, "metrics.json")).read())
    assert b["samples_made_now"] == 4 and a["samples_made_now"] == 6
    assert b["health"] == a["health"] and b["fingerprint"] == a["fingerprint"]
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-12)       # numpy's BLAS threads: the features are bitwise
    shards = sorted(n for n in os.listdir(folder) if n.startswith("shard_"))
    assert shards == sorted(n for n in os.listdir(half) if n.startswith("shard_")) and len(shards) == 3
    for name in shards:
        with np.load(os.path.join(folder, name)) as x, np.load(os.path.join(half, name)) as y:
            assert np.array_equal(x["images"], y["images"]) and np.array_equal(x["health"], y["health"]), name
    # and the other way: what the two processes made, half lost, is completed by one process
    for name in ["shard_0000000_0000002.npz", "shard_0000004_0000006.npz", "metrics.json"]:
        os.remove(os.path.join(half, name))
    c = one_process(tmp_path / "two")
    assert c["samples_made_now"] == 4 and c["health"] == a["health"]
    assert c["fid"] == pytest.approx(a["fid"], rel=1e-12)
    for name in shards:
        with np.load(os.path.join(folder, name)) as x, np.load(os.path.join(half, name)) as y:
            assert np.array_equal(x["images"], y["images"]), name


def test_across_sets_gives_no_score_that_some_sets_lack_and_each_note_once():
    a = dict(seeds="0-9", n=10, fid=10.0, inception_score_mean=1.5, inception_score_std=0.1, class_histogram=[1, 2])
    b = dict(seeds="10-14", n=5, fid=20.0, inception_score_mean=None, inception_score_std=None,
             class_histogram=[3, 4], note="no Inception score: its 10 splits need at least 10 samples, got 5")
    r = dict(evaluate.across_sets([a, b]), n=15)                  # evaluate_one adds the count
    assert r["fid"] == 15.0 and (r["set_min"]["fid"], r["set_max"]["fid"]) == (10.0, 20.0)
    assert r["inception_score_mean"] is None and "inception_score_mean" not in r["set_min"]   # not set 0's 1.5
    assert r["class_histogram"] == [4, 6] and r["note"] == b["note"]
    assert [row["inception_score_mean"] for _, _, row in evaluate.table_rows(r)] == [1.5, None, None, None, None]


def test_the_table_prints_each_sets_note_once(capsys):
    notes = [f"no Inception score: its 10 splits need at least 10 samples, got {n}" for n in (3, 5, 5)]
    sets = [dict(seeds=f"{i}", n=n, fid=1.0 + i, inception_score_mean=None, note=note)
            for i, (n, note) in enumerate(zip((3, 5, 5), notes))]
    r = dict(evaluate.across_sets(sets), n=13, checkpoint="c.pt", sampler=dict(ema=True, name="heun"), nfe=35,
             dataset="cifar10")
    evaluate.print_table([r])
    printed = [line for line in capsys.readouterr().out.splitlines() if "splits need" in line]
    assert printed == [f"{notes[0]} (the table's '-')", f"{notes[1]} (the table's '-')"]   # not their join too
