"""The ncsnv2 recipe: NCSNv2's techniques against known values, the scale-conditioned network,
both recipes through training, resume and evaluation, and the MNIST classifier's numbers."""
import argparse
import json
import math
import os

import pytest
import torch

import checkpoints
import common
import edm
import data
import evaluate
import losses
import sample
import metrics
import mnist_classifier
import train
import train_mnist

TINY = ["--ngf", "4", "--num-workers", "0", "--n-samples", "4", "--device", "cpu", "--batch-size", "16"]


def test_technique_2_and_4_solvers_give_the_known_values():
    assert common.ratio_for_dimension(784) == pytest.approx(1.0820, abs=5e-5)       # MNIST
    assert common.ratio_for_dimension(3072) == pytest.approx(1.0398, abs=5e-5)      # CIFAR-10
    assert common.num_levels_for(16.07, 0.01, common.ratio_for_dimension(784)) == 95
    assert common.num_levels_for(4.0, 1.0, 2.0) == 3                                  # exact powers: no extra level
    assert common.step_lr_for(1.0398, 0.01, 5) == pytest.approx(6.5e-6, rel=0.01)
    assert common.step_lr_for(1.0376, 0.01, 5) == pytest.approx(6.2e-6, rel=0.01)    # NCSNv2's CIFAR-10 config
    assert common.step_lr_for(1.0820, 0.01, 10) == pytest.approx(8.6e-6, rel=0.01)
    # the chosen step brings the expression closest to 1: any other is farther
    def expr(e, g=1.0820, s=0.01, T=10):
        c = 2 * e / (s * s - s * s * (1 - e / s ** 2) ** 2)
        return (1 - e / s ** 2) ** (2 * T) * (g * g - c) + c
    e = common.step_lr_for(1.0820, 0.01, 10)
    assert expr(e) > 1 and all(expr(e * f) > expr(e) for f in (0.8, 0.95, 1.05, 1.25))
    with pytest.raises(ValueError, match="no solution"):
        common.ratio_for_dimension(2)


def test_technique_1_is_the_largest_pairwise_distance():
    torch.manual_seed(0)
    x = torch.rand(301, 3, 4, 4)
    want = max((a - b).norm().item() for a in x.flatten(1).double() for b in x.flatten(1).double())
    assert common.max_pairwise_distance(x, chunk=64) == pytest.approx(want, rel=1e-9)
    x[17] += 3                                                        # an outlier sets sigma_1
    assert common.max_pairwise_distance(x, chunk=50) > want + 5
    sub = common.max_pairwise_distance(x, max_images=100)              # a seeded random subset: a lower bound
    assert sub <= common.max_pairwise_distance(x) and sub == common.max_pairwise_distance(x, max_images=100)


def test_scale_conditioned_network_is_s_over_sigma_at_any_sigma():
    torch.manual_seed(0)
    sigmas = common.geometric_sigmas(5.0, 0.01, 12)
    net = common.RefineNet(1, 4, num_classes=12, image_size=28, conditioning="scale", sigmas=sigmas).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        at = lambda s: net(x, torch.full((3,), s))
        base = at(1.0)
        for s in (0.01, 0.37, 2.5, 40.0):                          # 0.37 and 40 are not training levels
            assert torch.allclose(at(s) * s, base, rtol=1e-5, atol=1e-6)
        model = common.ScoreModel(net, sigmas)                     # behind the contract it takes any sigma too
        assert model.any_sigma and torch.allclose(model(x, torch.tensor([0.37, 0.37, 0.37])) * 0.37, base, rtol=1e-5)
    # one set of InstanceNorm++ parameters whatever L; the norm-conditioned network has L of them
    norm = common.RefineNet(1, 4, num_classes=12, image_size=28)
    assert net.normalizer.embed.weight.shape[0] == 1 and norm.normalizer.embed.weight.shape[0] == 12
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in norm.parameters())


def test_the_default_recipe_is_the_paper_s():
    cfg = train.resolve(train.TrainConfig())
    assert (cfg.lr, cfg.sigma_begin, cfg.sigma_end, cfg.num_levels, cfg.conditioning) == (1e-3, 1.0, 0.01, 10, "norm")
    assert (cfg.ema, cfg.dequantize, cfg.steps_each, cfg.step_lr, cfg.denoise) == (0.0, True, 100, 2e-5, False)
    v2 = train.resolve(train.TrainConfig(recipe="ncsnv2", lr=1e-3, steps_each=10))     # flags given win
    assert (v2.lr, v2.steps_each, v2.sigma_begin, v2.conditioning, v2.ema) == (1e-3, 10, "auto", "scale", 0.999)
    assert (v2.sampler, v2.nfe, v2.s_churn) == ("heun", 35, 10.0)
    # the recipe's figure budget belongs to its sampler: another --sampler runs at its own default
    als = train.resolve(train.TrainConfig(recipe="ncsnv2", sampler="als"))
    assert (als.sampler, als.nfe, als.s_churn, als.steps_each) == ("als", None, 0.0, 5)
    assert train.resolve(train.TrainConfig(recipe="ncsnv2", sampler="dpmpp2m", nfe=20)).nfe == 20


def test_ncsnv2_recipe_trains_stores_auto_values_resumes_and_evaluates(mnist_root, tmp_path, capsys):
    out, full = tmp_path / "run", tmp_path / "full"
    args = [*TINY, "--data-root", mnist_root, "--recipe", "ncsnv2", "--lr", "1e-3", "--snapshot-every", "100",
            "--sample-every", "100"]
    train_mnist.main([*args, "--out", str(full), "--iters", "4"])
    train_mnist.main([*args, "--out", str(out), "--iters", "2"])
    train_mnist.main([*args, "--out", str(out), "--iters", "4", "--resume"])
    cfg = json.loads((out / "config.json").read_text())
    images = data.load_images("mnist", True, mnist_root).float() / 255
    assert cfg["sigma_begin"] == pytest.approx(common.max_pairwise_distance(images)) and cfg["sigma_begin"] > 5
    L = common.num_levels_for(cfg["sigma_begin"], 0.01, common.ratio_for_dimension(784))
    assert cfg["num_levels"] == L and cfg["auto"] == ["sigma_begin", "num_levels", "step_lr"]
    assert cfg["step_lr"] == pytest.approx(common.step_lr_for(common.level_ratio(cfg["sigma_begin"], 0.01, L), 0.01, 5))
    assert (cfg["conditioning"], cfg["dequantize"], cfg["ema"], cfg["denoise"]) == ("scale", False, 0.999, True)
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (out, full))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])           # resumed exactly
    ck = checkpoints.load(out / "checkpoint.pt")
    assert ck.model_args["conditioning"] == "scale" and len(ck.sigmas) == L and ck.ema and ck.any_sigma
    assert torch.allclose(ck.model.net.sigmas, common.geometric_sigmas(cfg["sigma_begin"], 0.01, L))
    assert (ck.recipe, ck.sampler, ck.nfe, ck.settings["s_churn"], ck.settings["steps_each"]) == \
        ("ncsnv2", "heun", 35, 10.0, 5)
    # evaluate.py needs no flags: the recipe's sampler (the best measured: Heun, S_churn 10, 35 NFE), as the figures
    assert (cfg["sampler"], cfg["nfe"], cfg["s_churn"]) == ("heun", 35, 10.0)
    assert "(heun, 35 network evaluations each)" in capsys.readouterr().out
    [r] = evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--n", "3", "--batch-size", "3",
                         "--metrics", "none", "--out", str(tmp_path / "h"), "--device", "cpu"])
    assert (r["sampler"]["name"], r["sampler"]["s_churn"], r["nfe"], len(r["sampler"]["sigmas"])) == \
        ("heun", 10.0, 35, 18)
    # --sampler als (the plan evaluate.py makes of it): NCSNv2's own T = 5, its step size and its denoising step,
    # not the Heun budget
    s = sample.sampler_settings("als", ck, 0)
    assert (s.kwargs["steps_each"], s.kwargs["denoise"], s.nfe) == (5, True, 5 * L + 1)
    assert s.kwargs["step_lr"] == pytest.approx(cfg["step_lr"])
    # an --nfe budget: T = (NFE - 1) // L, with technique 4's step for that T
    s = sample.sampler_settings("als", ck, 0, nfe=3 * L + 1)
    assert s.kwargs["steps_each"] == 3 and s.kwargs["step_lr"] == pytest.approx(
        common.step_lr_for(common.level_ratio(cfg["sigma_begin"], 0.01, L), 0.01, 3))


def test_lognormal_levels_follow_edm_s_density_and_uniform_stays_the_paper_s():
    sigmas = common.geometric_sigmas(16.07, 0.01, 95)
    assert losses.level_probs(sigmas, "uniform") is None                 # randint: the paper's draws, unchanged
    p = losses.level_probs(sigmas, "lognormal")
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert sigmas[p.argmax()].item() == pytest.approx(math.exp(-1.2), rel=0.05)    # the mode of N(-1.2, 1.2^2)
    assert p[sigmas > 1].sum().item() == pytest.approx(0.16, abs=0.01)  # P(ln sigma > 0) = 1 - Phi(1)
    drawn = torch.cat([losses.step_draws(0, s, (512, 1, 2, 2), sigmas, probs=p)["sigma"] for s in range(40)])
    labels = (drawn[:, None] == sigmas[None]).float().argmax(1)          # each draw is one of the levels
    assert torch.equal(sigmas[labels], drawn)
    freq = torch.bincount(labels, minlength=95).float() / len(labels)
    assert (freq - p).abs().max().item() < 0.01 and freq[sigmas > 1].sum().item() == pytest.approx(0.16, abs=0.01)
    a, b = (losses.step_draws(3, 7, (64, 1, 2, 2), sigmas, probs=p)["sigma"] for _ in range(2))
    assert torch.equal(a, b)                                             # fixed by (seed, step)


def test_sigma_dist_is_stored_must_match_on_resume_and_old_checkpoints_resume(mnist_root, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--data-root", mnist_root, "--out", str(out), "--snapshot-every", "100", "--sample-every", "100",
            "--steps-each", "2"]
    train_mnist.main([*args, "--iters", "2", "--sigma-dist", "lognormal"])
    assert json.loads((out / "config.json").read_text())["sigma_dist"] == "lognormal"
    with pytest.raises(SystemExit, match="sigma-dist lognormal"):
        train_mnist.main([*args, "--iters", "3", "--resume"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)         # a checkpoint written before the flag existed
    ckpt["config"].pop("sigma_dist")
    torch.save(ckpt, out / "checkpoint.pt")
    assert train_mnist.main([*args, "--iters", "3", "--resume"]) == 3


def test_classifier_scores_real_digits_above_noise_and_caches_itself(mnist_root, tmp_path, capsys):
    cache = tmp_path / "clf"
    res = mnist_classifier.main(["--data-root", mnist_root, "--cache", str(cache), "--n", "40", "--device", "cpu"])
    real, noise = res["real held-out digits (ceiling)"], res["uniform noise (floor)"]
    assert real["classifier_is"] > 3 * noise["classifier_is"] and real["classifier_is"] <= 10
    assert real["frechet_distance"] < noise["frechet_distance"] / 3
    assert real["classifier_kid"] < noise["classifier_kid"] / 3 and real["classifier_recall"] > 0.5
    assert real["classifier_precision"] > noise["classifier_precision"]
    assert real["confident_share"] > noise["confident_share"]
    assert sum(real["class_histogram"]) == 40 and len(real["class_histogram"]) == 10
    [weights] = os.listdir(cache)
    assert "training the MNIST classifier" in capsys.readouterr().out
    mnist_classifier.main(["--data-root", mnist_root, "--cache", str(cache), "--n", "40", "--device", "cpu"])
    assert "training the MNIST classifier" not in capsys.readouterr().out and os.listdir(cache) == [weights]


def test_classifier_count_study_scores_disjoint_sets_of_test_digits(mnist_root, tmp_path, capsys):
    """--counts 4 8 --sets 3 on 20 test digits: sets 0-3, 4-7, 8-11 and 0-7, 8-15, each the scorer's numbers of
    exactly those digits; a count larger than the test split is refused in one line."""
    args = ["--data-root", mnist_root, "--cache", str(tmp_path / "clf"), "--n", "10", "--device", "cpu"]
    res = mnist_classifier.main([*args, "--counts", "4", "8", "--sets", "3"])
    study = res["counts"]
    assert [len(study[4]), len(study[8])] == [3, 2]
    digits = data.load_images("mnist", False, mnist_root)
    scorer = metrics.DigitScorer(argparse.Namespace(data_root=mnist_root, classifier_cache=str(tmp_path / "clf")),
                                 "mnist", torch.device("cpu"))
    for c, i in [(4, 1), (8, 1), (4, 2)]:
        want = scorer([digits[i * c:(i + 1) * c]])
        assert study[c][i]["frechet_distance"] == pytest.approx(want["frechet_distance"])
        assert study[c][i]["class_histogram"] == want["class_histogram"] and sum(want["class_histogram"]) == c
    assert study[4][0]["frechet_distance"] != study[4][1]["frechet_distance"]
    out = capsys.readouterr().out
    fds = [s["frechet_distance"] for s in study[8]]
    assert f"{sum(fds) / 2:.2f} ({min(fds):.2f}-{max(fds):.2f})" in out and "n 10" in out
    with pytest.raises(SystemExit) as e:
        mnist_classifier.main([*args, "--counts", "21"])
    assert e.value.code == 2 and "--counts 21: a set is 4 to 20 digits" in capsys.readouterr().err


def test_both_recipes_evaluate_with_the_classifier_and_a_sweep_figure(mnist_root, tmp_path, capsys):
    paths = []
    for recipe in ("ncsn", "ncsnv2"):
        out = tmp_path / recipe
        train_mnist.main([*TINY, "--data-root", mnist_root, "--recipe", recipe, "--out", str(out), "--iters", "2",
                          "--num-levels", "4", "--steps-each", "1", "--n-samples", "2"])
        paths.append(str(out / "checkpoint.pt"))
    results = evaluate.main(["--checkpoint", *paths, "--n", "4", "--batch-size", "4", "--metrics", "classifier",
                             "--sampler", "als", "--nfe", "4", "9", "--data-root", mnist_root,
                             "--classifier-cache", str(tmp_path / "clf"),
                             "--out", str(tmp_path / "e"), "--device", "cpu"])
    # ncsnv2 spends L x T + 1 (denoising): --nfe 4 buys no T on its 4 levels and is skipped with a line, not overspent
    assert [(r["sampler"]["steps_each"], r["nfe"]) for r in results] == [(1, 4), (2, 8), (2, 9)]
    assert "--nfe 4 is too few for --sampler als" in capsys.readouterr().out
    for r in results:
        c = r
        assert 1 <= c["classifier_is"] <= 10 and c["frechet_distance"] > 0 and sum(c["class_histogram"]) == 4
    assert (tmp_path / "e" / "sweep.png").stat().st_size > 10_000
    # the same samples again without metrics: the scores made before are kept, nothing is sampled
    again = evaluate.main(["--checkpoint", paths[0], "--n", "4", "--metrics", "none", "--nfe", "4", "--device", "cpu",
                           "--out", str(tmp_path / "e" / "ncsn_checkpoint")])
    scores = ("classifier_is", "confident_share", "frechet_distance", "class_histogram")
    assert again[0]["samples_made_now"] == 0 and [again[0][k] for k in scores] == [results[0][k] for k in scores]
    with open(os.path.join(results[0]["folder"], "metrics.json")) as f:
        saved = json.load(f)
    assert [saved[k] for k in scores] == [results[0][k] for k in scores]
    # ancestral sampling: --nfe levels for the scale-conditioned network, its own 4 for the paper's
    anc = evaluate.main(["--checkpoint", *paths, "--n", "4", "--batch-size", "4", "--metrics", "none",
                         "--sampler", "ancestral",
                         "--out", str(tmp_path / "a"), "--device", "cpu"])
    assert [(len(r["sampler"]["sigmas"]), r["nfe"], r["sampler"]["name"]) for r in anc] == \
        [(4, 4, "ancestral")] * 2
    [r] = evaluate.main(["--checkpoint", paths[1], "--n", "4", "--metrics", "none", "--sampler", "ancestral",
                         "--nfe", "7",
                         "--out", str(tmp_path / "a7"), "--device", "cpu"])
    sig = r["sampler"]["sigmas"]
    assert r["nfe"] == 7 and len(sig) == 7 and sig[0] == pytest.approx(results[-1]["sampler"]["sigmas"][0])
    assert sample.collect(r["folder"], 4).float().std() > 0
    [r] = evaluate.main(["--checkpoint", paths[0], "--n", "2", "--batch-size", "2", "--metrics", "none",
                         "--sampler", "ancestral", "--nfe", "7", "--out", str(tmp_path / "a8"), "--device", "cpu"])
    assert r["nfe"] == 4 and len(r["sampler"]["sigmas"]) == 4       # a budget above the 4 trained levels buys them
    with pytest.raises(SystemExit, match="with churn needs a scale-conditioned network"):
        evaluate.main(["--checkpoint", paths[0], "--metrics", "none", "--sampler", "heun", "--s-churn", "10",
                       "--out", str(tmp_path / "a9"), "--device", "cpu"])
    # in a grid of both, the combination that does not apply is skipped with a line, the rest is done
    grid = evaluate.main(["--checkpoint", *paths, "--n", "4", "--metrics", "none", "--sampler", "als", "heun",
                          "--s-churn", "10", "--nfe", "7",
                          "--out", str(tmp_path / "a"), "--device", "cpu"])
    assert [(r["checkpoint"] == paths[1], r["sampler"]["name"]) for r in grid] == [
        (False, "als"), (True, "als"), (True, "heun")]
    assert "skipped: " in capsys.readouterr().out
    auto = evaluate.main(["--checkpoint", *paths, "--n", "4", "--metrics", "none", "--sampler", "auto", "--nfe", "7",
                          "--out", str(tmp_path / "a"), "--device", "cpu"])        # each network's better sampler
    assert [(r["sampler"]["name"], r["sampler"].get("s_churn")) for r in auto] == [("als", None), ("heun", 10.0)]
    assert "skipped" not in capsys.readouterr().out
    assert [r["samples_made_now"] for r in auto] == [0, 0]              # the grid's als and heun samples, reused
    [big] = evaluate.main(["--checkpoint", paths[1], "--n", "2", "--metrics", "none", "--sampler", "auto", "--nfe",
                           "300", "--out", str(tmp_path / "a" / "ncsnv2_checkpoint"), "--device", "cpu"])
    assert big["sampler"]["name"] == "als" and big["nfe"] <= 300                 # beyond heun's measured range
    made = evaluate.main(["--checkpoint", *paths, "--n", "4", "--metrics", "none", "--sampler", "auto",
                          "--nfe", "7", "9",
                          "--existing", "--out", str(tmp_path / "a"), "--device", "cpu"])
    assert [(r["nfe"], r["samples_made_now"]) for r in made] == [(4, 0), (7, 0)]
    assert capsys.readouterr().out.count("0 of 4 samples made (--existing samples nothing)") == 2
    with pytest.raises(SystemExit, match="none of the 1 settings has its 4 samples"):
        evaluate.main(["--checkpoint", paths[0], "--n", "4", "--metrics", "none", "--nfe", "9", "--existing",
                       "--out", str(tmp_path / "a" / "ncsn_checkpoint"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="MNIST digits only"):
        evaluate.main(["--checkpoint", os.path.join(os.path.dirname(__file__), "data", "official_cifar_ngf4.pth"),
                       "--metrics", "classifier", "--device", "cpu", "--out", str(tmp_path / "c")])


def test_edm_recipe_trains_measures_sigma_data_resumes_and_samples_with_heun(mnist_root, tmp_path, capsys):
    """--recipe edm: EDM's Denoiser around a continuous RefineNet, its loss, EMA with warm-up, the Heun
    sampler; sigma_data and the mean pixel measured and stored; resume exact; evaluate.py needs no flags."""
    out, full = tmp_path / "run", tmp_path / "full"
    args = [*TINY, "--data-root", mnist_root, "--recipe", "edm", "--snapshot-every", "100", "--sample-every", "100"]
    train_mnist.main([*args, "--out", str(full), "--iters", "4"])
    assert "--sigma-data auto: " in capsys.readouterr().out
    train_mnist.main([*args, "--out", str(out), "--iters", "2"])
    train_mnist.main([*args, "--out", str(out), "--iters", "4", "--resume"])
    cfg = json.loads((out / "config.json").read_text())
    mean, sd = data.pixel_stats(data.load_images("mnist", True, mnist_root))
    assert cfg["sigma_data"] == pytest.approx(sd) and "sigma_data" in cfg["auto"]
    assert (cfg["conditioning"], cfg["objective"], cfg["ema_warmup"], cfg["sampler"]) == ("continuous", "edm", True,
                                                                                          "heun")
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (out, full))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])           # resumed exactly
    ck = checkpoints.load(out / "checkpoint.pt")
    assert isinstance(ck.model.net, edm.Denoiser) and ck.sampler == "heun" and ck.model.predicts_denoised
    assert ck.sigma_data == pytest.approx(sd) and ck.data_mean == pytest.approx(mean)
    [r] = evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--n", "2", "--batch-size", "2",
                         "--metrics", "none", "--level-loss", "4", "--data-root", mnist_root,
                         "--out", str(tmp_path / "e"), "--device", "cpu"])
    assert r["sampler"]["name"] == "heun" and r["nfe"] == 2 * 18 - 1 and len(r["test_dsm_loss_per_level"]) > 0
    [far] = evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--n", "2", "--batch-size", "2",
                           "--metrics", "none", "--sigma-max", "40", "--out", str(tmp_path / "e"), "--device", "cpu"])
    sig, near = far["sampler"]["sigmas"], r["sampler"]["sigmas"]        # EDM's sigma_max: the schedule's start only
    assert sig[0] == pytest.approx(40) and sig[-1] == near[-1] and len(sig) == len(near) and sig[0] > near[0]
    assert far["folder"] != r["folder"]
    for bad in (["--sigma-max", "0.001"], ["--sigma-max", "40", "--sampler", "als"]):
        with pytest.raises(SystemExit, match="--sigma-max .* needs --sampler heun, dpmpp2m or ancestral"):
            evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--metrics", "none", *bad,
                           "--out", str(tmp_path / "e"), "--device", "cpu"])
    assert sample.collect(r["folder"], 2).float().std() > 0
    with pytest.raises(SystemExit) as e:
        train_mnist.main([*args, "--out", str(tmp_path / "bad"), "--conditioning", "scale"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "EDM's denoiser: it needs --conditioning continuous, not scale" in err


def test_the_figures_sampler_is_refused_before_training_and_may_change_on_resume(mnist_root, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--data-root", mnist_root, "--out", str(out), "--n-samples", "2", "--steps-each", "1"]
    for flags, named in [(["--sampler", "heun", "--s-churn", "10"], "with churn needs a scale-conditioned network"),
                         (["--nfe", "5"], "--nfe 5 is too few for --sampler als")]:
        with pytest.raises(SystemExit) as e:
            train_mnist.main([*args, "--iters", "1", *flags])
        assert named in str(e.value) and "change --sampler, --nfe or --s-churn" in str(e.value)
        assert not (out / "checkpoint.pt").exists() and "\n" not in str(e.value)
    train_mnist.main([*args, "--iters", "1", "--sampler", "heun", "--nfe", "40"])    # all 10 levels (19 evaluations)
    assert json.loads((out / "config.json").read_text())["nfe"] == 40
    os.remove(out / "checkpoint.pt")
    train_mnist.main([*args, "--iters", "1", "--sampler", "heun", "--nfe", "9"])     # 5 of the 10 levels
    assert train_mnist.main([*args, "--iters", "2", "--resume", "--sampler", "dpmpp2m", "--nfe", "10"]) == 2
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["sampler"], cfg["nfe"], cfg["s_churn"]) == ("dpmpp2m", 10, 0.0)
