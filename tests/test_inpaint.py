"""inpaint.py: the paper's inpainting figure (Algorithm 2) on real-format digits, resumable, scored.
The sampler itself is tested in test_samplers.py."""
import os

import numpy as np
import torch

import common
import inpaint
import train_mnist
from conftest import DATA, one_thread

FAST = ["--device", "cpu"]


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
    train_mnist.main(["--data-root", mnist_root, "--out", str(out), "--recipe", "ncsnv2", "--ngf", "4",
                      "--num-workers", "0",
                      "--batch-size", "16", "--iters", "1", "--num-levels", "5", "--n-samples", "2", *FAST])
    m = inpaint.main(["--checkpoint", str(out / "checkpoint.pt"), "--data-root", mnist_root, "--n-images", "2",
                      "--completions", "1", "--mask", "centre", "--out", str(tmp_path / "i"), *FAST])
    assert m["settings"]["steps_each"] == 5 and len(m["settings"]["sigmas"]) == 5         # the recipe's sampler
    assert np.load(os.path.join(m["folder"], "completions.npz"))["completions"].shape == (2, 1, 1, 28, 28)


def test_inpaint_works_for_the_edm_recipe(mnist_root, tmp_path):
    """The Denoiser's score (D - x) / sigma^2 goes through Algorithm 2 unchanged: the observed pixels are
    kept (up to the last level's noise), the hidden ones are made."""
    out = tmp_path / "edm"
    train_mnist.main(["--data-root", mnist_root, "--out", str(out), "--recipe", "edm", "--ngf", "4",
                      "--num-workers", "0", "--batch-size", "16", "--iters", "1", "--n-samples", "2", *FAST])
    m = inpaint.main(["--checkpoint", str(out / "checkpoint.pt"), "--data-root", mnist_root, "--n-images", "2",
                      "--completions", "1", "--mask", "centre", "--out", str(tmp_path / "i"), *FAST])
    assert len(m["settings"]["sigmas"]) == 18 and m["settings"]["steps_each"] == 1       # the recipe's ladder
    z = np.load(os.path.join(m["folder"], "completions.npz"))
    done, originals, known = z["completions"], z["originals"], z["known"]
    assert done.shape == (2, 1, 1, 28, 28) and np.isfinite(done).all() and 0 < known.mean() < 1
    keep = np.broadcast_to(known, originals.shape)
    off = np.abs(done[:, 0][keep].astype(int) - originals[keep])       # Algorithm 2 leaves them y + sigma_L z
    assert off.max() <= 5 * 0.01 * 255 + 1
    assert (done[:, 0][~keep] != originals[~keep]).mean() > 0.5                     # the hidden ones, made


def test_torchrun_completes_an_inpainting_bitwise_as_one_process(mnist_root, tmp_path):
    """`torchrun --nproc_per_node 2 inpaint.py` (gloo) on a folder one process left part made: the two processes
    make the missing images between them and rank 0 writes the figure and completions.npz, bitwise one process's."""
    import json
    import shutil
    import subprocess
    import sys
    from conftest import ROOT
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["--checkpoint", os.path.join(DATA, "official_mnist_ngf4.pth"), "--data-root", mnist_root,
            "--n-images", "5", "--completions", "2", "--steps-each", "2", "--batch-size", "2", *FAST]
    with one_thread():                                  # one process, in-process: the subprocesses' one thread each
        inpaint.main([*args, "--out", str(tmp_path / "one")])
    [folder] = [os.path.join(tmp_path / "one", d) for d in os.listdir(tmp_path / "one")]
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    half = folder.replace(str(tmp_path / "one"), str(tmp_path / "two"))
    for name in ["image_00001.npz", "image_00002.npz", "image_00004.npz", "completions.npz", "metrics.json"]:
        os.remove(os.path.join(half, name))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "inpaint.py", *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1
    a, b = (np.load(os.path.join(f, "completions.npz")) for f in (folder, half))
    assert a["completions"].shape == (5, 2, 1, 28, 28) and np.array_equal(a["completions"], b["completions"])
    assert json.loads(open(os.path.join(half, "metrics.json")).read())["n_images"] == 5
