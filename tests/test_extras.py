"""The rest of the paper: inpainting (Algorithm 2), CelebA, sliced score matching as the image
objective, the manifold experiment, nearest neighbours and samples without metrics."""
import json
import os

import numpy as np
import pytest
import torch

import bench
import common
import utils
import evaluate
import inpaint
import manifold
import train
import train_celeba
import train_mnist
from conftest import DATA, write_mnist

FAST = ["--device", "cpu"]


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return write_mnist(str(tmp_path_factory.mktemp("mnist")), n_train=200, n_test=20)

#----------------------------------------------------------------------------
# Inpainting.

def test_inpainting_samples_the_conditional_of_a_gaussian():
    """x ~ N(0, S), S = [[1, r], [r, 1]]: with x1 = a known, x2 must follow N(r a, 1 - r^2)."""
    torch.manual_seed(0)
    r, a = 0.8, 1.5
    S = torch.tensor([[1.0, r], [r, 1.0]], dtype=torch.float64)
    sigmas = common.geometric_sigmas(1.0, 0.01, 8).double()
    def score(x, labels):                                     # of the data perturbed by sigma_i: -(S + sigma^2 I)^-1 x
        s2 = sigmas[labels[0]] ** 2
        return -x @ torch.linalg.inv(S + s2 * torch.eye(2, dtype=torch.float64))
    n = 20000
    known = torch.full((n, 2), a, dtype=torch.float64)
    mask = torch.tensor([True, False])
    x = common.annealed_langevin_inpainting(score, torch.rand(n, 2, dtype=torch.float64), known, mask, sigmas,
                                            n_steps_each=200, step_lr=2e-5 * 2)
    assert torch.allclose(x[:, 0], torch.full((n,), a, dtype=torch.float64), atol=0.05)   # a + sigma_L z
    assert abs(x[:, 1].mean().item() - r * a) < 0.02 and abs(x[:, 1].var().item() - (1 - r * r)) < 0.02
    # with no noise the known pixels are exactly the known values
    zero = lambda t: torch.zeros_like(t)
    x = common.annealed_langevin_inpainting(score, torch.rand(4, 2, dtype=torch.float64), known[:4], mask, sigmas, 3,
                                            1e-4, randn_like=zero)
    assert torch.equal(x[:, 0], known[:4, 0])


def test_masks():
    right, centre = inpaint.make_mask("right", 28), inpaint.make_mask("centre", 28)
    assert right[:, :14].all() and not right[:, 14:].any()
    assert (~centre).sum() == 14 * 14 and not centre[7:21, 7:21].any() and centre[0].all()
    rnd = inpaint.make_mask("random", 28, 0.75)
    assert abs((~rnd).float().mean().item() - 0.75) < 0.05 and torch.equal(rnd, inpaint.make_mask("random", 28, 0.75))


def test_inpaint_script_completes_resumes_and_scores(mnist_root, tmp_path, monkeypatch):
    from PIL import Image
    ck = os.path.join(DATA, "official_mnist_ngf4.pth")
    holes = np.zeros((56, 56), np.uint8)
    holes[:, 28:] = 255                                          # white = fill: the right half, at twice the size
    Image.fromarray(holes).save(tmp_path / "holes.png")
    base = ["--checkpoint", ck, "--data-root", mnist_root, "--n-images", "3", "--completions", "2", "--steps-each", "2",
            "--mask", str(tmp_path / "holes.png"), *FAST]
    args = [*base, "--out", str(tmp_path / "a"), "--classifier", "--classifier-cache", str(tmp_path / "clf")]
    m = inpaint.main([*args, "--batch-size", "2"])
    assert m["share_to_fill"] == 0.5
    saved = np.load(os.path.join(m["folder"], "completions.npz"))
    comp, orig, known = saved["completions"], saved["originals"], saved["known"]
    assert comp.shape == (3, 2, 1, 28, 28) and known[:, :14].all() and not known[:, 14:].any()
    diff = np.abs(comp.astype(int) - orig[:, None].astype(int))
    assert diff[..., known].max() <= 15 and diff[..., ~known].mean() > 20      # known: the image + sigma_L noise
    assert set(m["label_agreement"]) == {"completions", "noise", "mean image"}
    assert all(0 <= v <= 1 for v in m["label_agreement"].values())
    # the same completions whatever the batch size; a rerun makes nothing again
    m2 = inpaint.main([*base, "--out", str(tmp_path / "b"), "--batch-size", "6"])
    comp2 = np.load(os.path.join(m2["folder"], "completions.npz"))["completions"]
    assert np.abs(comp.astype(int) - comp2.astype(int)).max() <= 1
    calls = []
    monkeypatch.setattr(common, "annealed_langevin_inpainting", lambda *a, **k: calls.append(1))
    inpaint.main([*args, "--batch-size", "2"])
    assert calls == [] and os.path.exists(os.path.join(m["folder"], "inpainting.png"))


def test_inpaint_works_for_the_ncsnv2_recipe(mnist_root, tmp_path):
    out = tmp_path / "v2"
    train_mnist.main(["--data-root", mnist_root, "--out", str(out), "--recipe", "ncsnv2", "--ngf", "4", "--num-workers", "0",
                      "--batch-size", "16", "--iters", "1", "--num-levels", "5", "--n-samples", "2", *FAST])
    m = inpaint.main(["--checkpoint", str(out / "checkpoint.pt"), "--data-root", mnist_root, "--n-images", "2",
                      "--completions", "1", "--mask", "centre", "--out", str(tmp_path / "i"), *FAST])
    assert m["settings"]["steps_each"] == 5 and len(m["settings"]["sigmas"]) == 5         # the recipe's sampler
    assert np.load(os.path.join(m["folder"], "completions.npz"))["completions"].shape == (2, 1, 1, 28, 28)

#----------------------------------------------------------------------------
# CelebA in torchvision's layout.

def write_celeba(root, n=6):
    """torchvision's CelebA layout with n JPEGs of 178 x 218: red inside the centre 140 x 140, blue outside."""
    from PIL import Image
    folder = os.path.join(root, "celeba")
    os.makedirs(os.path.join(folder, "img_align_celeba"))
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    img = np.zeros((218, 178, 3), np.uint8)
    img[..., 2] = 255
    img[39:179, 19:159] = (255, 0, 0)
    for name in names:
        Image.fromarray(img).save(os.path.join(folder, "img_align_celeba", name), quality=95)
    split = [0] * (n - 2) + [2, 2]                                # the last two are the test split
    write = lambda f, lines: open(os.path.join(folder, f), "w").write("\n".join(lines) + "\n")
    write("list_eval_partition.txt", [f"{a} {s}" for a, s in zip(names, split)])
    write("identity_CelebA.txt", [f"{a} {i}" for i, a in enumerate(names)])
    write("list_attr_celeba.txt", [str(n), "Smiling Young"] + [f"{a} 1 -1" for a in names])
    write("list_bbox_celeba.txt", [str(n), "image_id x_1 y_1 width height"] + [f"{a} 1 2 3 4" for a in names])
    write("list_landmarks_align_celeba.txt", [str(n), "lefteye_x lefteye_y"] + [f"{a} 1 2" for a in names])
    return root


def test_celeba_loads_with_the_official_preprocessing_and_trains(tmp_path, monkeypatch):
    import torchvision.datasets.celeba as celeba
    monkeypatch.setattr(celeba, "check_integrity", lambda *a, **k: True)   # only the MD5 check: these are not the real files
    root = write_celeba(str(tmp_path / "data"))
    images = utils.load_images("celeba", True, root)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    # the centre crop of 140 keeps only the red square
    assert (images[:, 0].float().mean() > 240) and (images[:, 2].float().mean() < 15)
    [cache] = [f for f in os.listdir(os.path.join(root, "celeba")) if f.startswith("ncsn_train")]
    assert torch.equal(utils.load_images("celeba", True, root), images)       # from the cache
    assert utils.load_images("celeba", False, root).shape[0] == 2
    out = tmp_path / "run"
    train_celeba.main(["--data-root", root, "--out", str(out), "--ngf", "4", "--num-workers", "0", "--batch-size", "2",
                       "--iters", "2", "--n-samples", "1", "--steps-each", "1", *FAST])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == "celeba" and cfg["ngf"] == 4 and cfg["dataset_spec"]["flip"] is True
    assert train.resolve(train.TrainConfig(dataset="celeba")).ngf == 128
    [r] = evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--n", "2", "--metrics", "none", "--steps-each", "1",
                         "--out", str(tmp_path / "e"), *FAST])
    assert r["dataset"] == "celeba" and r["sampler"]["shape"] == [3, 32, 32]


def test_missing_celeba_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision.datasets.celeba as celeba
    def quota(*a, **k):
        raise RuntimeError("The daily quota of the file img_align_celeba.zip is exceeded")
    monkeypatch.setattr(celeba, "download_file_from_google_drive", quota)
    with pytest.raises(utils.DataError) as e:
        utils.load_images("celeba", True, str(tmp_path))
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "celeba") in msg and "img_align_celeba" in msg and "list_eval_partition.txt" in msg
    assert "quota" in msg and "\n" not in msg

#----------------------------------------------------------------------------
# Sliced score matching as the image objective.

def official_anneal_ssm_vr(scorenet, samples, labels, sigmas, noise, vectors):
    """ermongroup/ncsn's losses/sliced_sm.py anneal_sliced_score_estimation_vr, n_particles 1, its two
    random draws passed in: the formula our annealed_ssm_loss must reproduce."""
    used_sigmas = sigmas[labels].view(samples.shape[0], *([1] * len(samples.shape[1:])))
    dup_samples = (samples + noise * used_sigmas).contiguous().requires_grad_(True)
    grad1 = scorenet(dup_samples, labels)
    grad2 = torch.autograd.grad(torch.sum(grad1 * vectors), dup_samples, create_graph=True)[0]
    grad1 = grad1.view(dup_samples.shape[0], -1)
    loss1 = torch.sum(grad1 * grad1, dim=-1) / 2.
    loss2 = torch.sum((vectors * grad2).view(dup_samples.shape[0], -1), dim=-1)
    return ((loss1 + loss2) * (used_sigmas.squeeze() ** 2)).mean(dim=0)


@pytest.mark.parametrize("name", ["mnist", "cifar"])
def test_annealed_ssm_equals_the_official_formula(name, official_reference):
    ref = official_reference[name]
    net, _ = common.load_score_net(os.path.join(DATA, f"official_{name}_ngf4.pth"))
    sigmas = official_reference["sigmas"]
    g = torch.Generator().manual_seed(0)
    noise, vectors = torch.randn(ref["x"].shape, generator=g), torch.randn(ref["x"].shape, generator=g)
    want = official_anneal_ssm_vr(net, ref["x"], ref["labels"], sigmas, noise, vectors)
    got = common.annealed_ssm_loss(net, ref["x"], ref["labels"], sigmas, noise=noise, vectors=vectors)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()) and abs(want.item()) > 1e-3
    per = common.annealed_ssm_loss(net, ref["x"], ref["labels"], sigmas, noise=noise, vectors=vectors, reduction="none")
    assert per.shape == (len(ref["x"]),) and per.mean().item() == pytest.approx(got.item(), rel=1e-6)


def test_ssm_objective_trains_and_accumulates_like_one_batch(mnist_root, tmp_path):
    base = ["--data-root", mnist_root, "--ngf", "4", "--num-workers", "0", "--batch-size", "16", "--n-samples", "1",
            "--steps-each", "1", *FAST]
    train_mnist.main([*base, "--iters", "2", "--objective", "ssm", "--out", str(tmp_path / "a")])
    train_mnist.main([*base, "--iters", "2", "--objective", "ssm", "--out", str(tmp_path / "b"), "--grad-accum", "4"])
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in "ab")
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) < 1e-5
    assert a["config"]["objective"] == "ssm"
    with pytest.raises(SystemExit, match=r"--objective ssm \(flags: dsm\)"):       # resume must keep the objective
        train_mnist.main([*base, "--out", str(tmp_path / "a"), "--resume", "--iters", "3"])


def test_bench_times_the_ssm_objective(tmp_path):
    [dsm] = bench.main(["--configs", "mnist", "--batch-size", "2", "--warmup", "1", "--repeats", "1", *FAST])
    [ssm] = bench.main(["--configs", "mnist", "--batch-size", "2", "--warmup", "1", "--repeats", "1", "--objective", "ssm", *FAST])
    assert ssm["objective"] == "ssm" and ssm["train_images_per_s"] > 0 and ssm["train_gflop_per_image"] is None
    assert dsm["train_gflop_per_image"] > 3 * 3.7

#----------------------------------------------------------------------------
# The manifold experiment.

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

#----------------------------------------------------------------------------
# Samples without metrics; nearest neighbours.

def test_samples_without_metrics_need_no_inception(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "inception", lambda *a: pytest.fail("--metrics none loads no network"))
    [r] = evaluate.main(["--checkpoint", os.path.join(DATA, "official_mnist_ngf4.pth"), "--n", "5", "--batch-size", "3",
                         "--metrics", "none", "--steps-each", "2", "--png", "--nearest", "3", "--data-root", mnist_root,
                         "--out", str(tmp_path / "e"), *FAST])
    names = set(os.listdir(r["folder"]))
    assert {"grid.png", "process.png", "metrics.json", "nearest.png", "png"} <= names and "fid" not in r
    assert sorted(os.listdir(os.path.join(r["folder"], "png"))) == [f"{i:06d}.png" for i in range(5)]
    from PIL import Image
    first = np.asarray(Image.open(os.path.join(r["folder"], "png", "000000.png")))
    assert np.array_equal(first, evaluate.collect(r["folder"], 1)[0, 0].numpy())


def test_nearest_neighbours_equal_a_brute_force_search():
    torch.manual_seed(0)
    train_images = torch.randint(0, 256, (2500, 1, 6, 6), dtype=torch.uint8)
    samples = train_images[[5, 1777]].clone()
    samples[0, 0, 0, 0] ^= 1                                    # nearly, not exactly, training image 5
    idx = evaluate.nearest_neighbours(samples, train_images, 4, lambda x: x.flatten(1).double(), chunk=700)
    want = torch.cdist(samples.flatten(1).double(), train_images.flatten(1).double()).argsort(1)[:, :4]
    assert torch.equal(idx, want) and idx[0, 0] == 5 and idx[1, 0] == 1777
