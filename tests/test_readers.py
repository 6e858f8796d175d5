"""One reader per kind of user file (issue 30.1): image arrays in documented dtypes, ranges and layouts only, checked
against the data set's size and channels; a sample folder read as sample.py reads it. Each refusal is one line
that names the problem and the fix."""
import argparse
import os
import re

import numpy as np
import pytest
import torch

import data
import evaluate
import metrics
import sample
from conftest import DATA

CHECKPOINT = f"{DATA}/official_mnist_ngf4.pth"
IMAGES = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def read(tmp_path, a, dataset="mnist"):
    np.savez(tmp_path / "x.npz", images=a)
    return metrics.read_images(str(tmp_path / "x.npz"), dataset)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64])
def test_integer_images_in_0_255_read_as_the_same_uint8_and_others_are_refused(tmp_path, dtype):
    small = (IMAGES // 2).numpy()                           # 0-127: fits every integer dtype, int8 included
    assert torch.equal(read(tmp_path, small.astype(dtype)), IMAGES // 2)
    big = small.astype(dtype)
    big[0, 0, 0, 0] = -1 if np.iinfo(dtype).min < 0 else 256
    with pytest.raises(data.DataError, match=r"outside 0-255; save uint8") as e:
        read(tmp_path, big)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, bool])
@pytest.mark.parametrize("scale", [1 / 255, 1.0])                   # images in [0, 1] and in [0, 255]
def test_floats_and_booleans_are_refused_with_the_conversion(tmp_path, dtype, scale):
    with pytest.raises(data.DataError, match=r"dtype .* are not read \(no range is guessed\); save uint8") as e:
        read(tmp_path, (IMAGES.numpy() * scale).astype(dtype))
    assert "\n" not in str(e.value) and "--images" in str(e.value)


def test_layouts_nchw_nhwc_nhw_read_as_the_same_images(tmp_path):
    a = IMAGES.numpy()
    for layout in (a, a.transpose(0, 2, 3, 1), a[:, 0]):                # (N, C, H, W), (N, H, W, C), (N, H, W)
        assert torch.equal(read(tmp_path, layout), IMAGES)
    colour = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(read(tmp_path, colour.permute(0, 2, 3, 1).numpy(), "cifar10"), colour)


@pytest.mark.parametrize("shape, dataset, message", [
    ((4, 1, 32, 32), "mnist", r"shape \(4, 1, 32, 32\); this data set's are \(N, 1, 28, 28\)"),
    ((4, 3, 28, 28), "mnist", r"shape \(4, 3, 28, 28\)"),
    ((4, 28, 28, 3), "mnist", r"shape \(4, 28, 28, 3\)"),
    ((4, 32, 32), "cifar10", r"shape \(4, 32, 32\); this data set's are \(N, 3, 32, 32\)"),
    ((2, 2, 1, 28, 28), "mnist", r"shape \(2, 2, 1, 28, 28\)"),
    ((28, 28), "mnist", r"1 image\(s\); the scores need at least 2"),
])
def test_other_sizes_channels_and_counts_are_one_line_before_any_scorer(tmp_path, shape, dataset, message):
    with pytest.raises(data.DataError, match=message) as e:
        read(tmp_path, np.zeros(shape, np.uint8), dataset)
    assert "\n" not in str(e.value)


def test_metrics_reads_a_sample_folder_as_sample_py_does(tmp_path, capsys):
    """Its own shards, each image once across disjoint --seeds sets; a shard of other weights refused in one line;
    a damaged shard set aside (named) and the rest scored."""
    base = ["--checkpoint", CHECKPOINT, "--steps-each", "1", "--device", "cpu", "--batch-size", "2"]
    [r] = sample.main([*base, "--seeds", "0-3", "6-7", "--out", str(tmp_path / "s")])
    folder = r["folder"]
    got = metrics.read_images(folder, "mnist")
    assert torch.equal(got, torch.cat([sample.collect(folder, 4), sample.collect(folder, 8, start=6)]))
    [other] = sample.main([*base, "--n", "2", "--seed", "1", "--out", str(tmp_path / "o")])
    foreign = [f for f in os.listdir(other["folder"]) if f.startswith("shard_")][0]
    os.replace(os.path.join(other["folder"], foreign), os.path.join(folder, "shard_0000010_0000012.npz"))
    with pytest.raises(SystemExit, match="made by other weights or sampler settings; delete it"):
        metrics.main(["--images", folder, "--metrics", "none", "--device", "cpu"])
    os.remove(os.path.join(folder, "shard_0000010_0000012.npz"))
    open(os.path.join(folder, "shard_0000002_0000004.npz"), "wb").write(b"half a shard")
    capsys.readouterr()
    assert metrics.main(["--images", folder, "--metrics", "none", "--device", "cpu"])["n"] == 4
    assert "shard_0000002_0000004.npz" in capsys.readouterr().err
    assert os.path.exists(os.path.join(folder, "shard_0000002_0000004.npz.damaged"))


@pytest.mark.parametrize("flags", [["--n", "1"], ["--seeds", "0-4", "5"]])
def test_evaluate_refuses_a_set_of_one_sample_before_any_folder(tmp_path, flags, capsys):
    out = tmp_path / "e"
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", CHECKPOINT, *flags, "--metrics", "classifier", "--out", str(out)])
    err = capsys.readouterr().err
    assert "a set of 1 sample cannot be scored" in err and "--metrics none" in err and not out.exists()


def test_output_paths_are_checked_before_the_work(tmp_path, capsys, monkeypatch):
    """--json to a folder or under a file, and an output folder whose derived name (checkpoint name + settings) is
    longer than the file system takes: one line naming the fix, before any sampling or scoring, nothing made."""
    import shutil
    import inpaint
    from conftest import write_mnist
    np.savez(tmp_path / "x.npz", images=IMAGES.numpy())
    (tmp_path / "file").write_text("")
    scored = []
    monkeypatch.setattr(metrics, "read_images", lambda *a: scored.append(a) or IMAGES)
    for bad, message in [(tmp_path, "is a folder; give a file name"), (tmp_path / "file" / "m.json", "is a file")]:
        with pytest.raises(SystemExit):
            metrics.main(["--images", str(tmp_path / "x.npz"), "--metrics", "none", "--json", str(bad)])
        assert message in capsys.readouterr().err and not scored
    long = tmp_path / ("c" * 250 + ".pth")                    # a legal file name; <folder>_<name> is not
    shutil.copy(CHECKPOINT, long)
    monkeypatch.chdir(tmp_path)
    root = write_mnist(str(tmp_path / "data"), n_train=4, n_test=4)
    for main, extra in [(sample.main, []), (evaluate.main, ["--metrics", "none"]),
                        (inpaint.main, ["--data-root", root, "--n-images", "1", "--completions", "1"])]:
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(long), "--n" if main is not inpaint.main else "--batch-size", "2",
                  "--steps-each", "1", "--device", "cpu", *extra])
        said = str(e.value.code) + capsys.readouterr().err
        last = said.strip().splitlines()[-1]                   # argparse's usage lines, then one line
        assert "longer than the file system's 255; give a shorter --out" in last, said
    for root in ("runs/eval", "runs/inpaint"):               # the folder names were refused before any was made
        assert not any(d for _, d, _ in os.walk(tmp_path / root))


def test_an_unwritable_classifier_cache_is_refused_before_any_training_or_sampling(tmp_path, capsys, monkeypatch):
    """--classifier-cache (metrics.py, evaluate.py, inpaint.py) and mnist_classifier.py's --cache that cannot hold
    the weights once trained: one line before the classifier is trained or any sample made."""
    import inpaint
    import mnist_classifier
    from conftest import write_mnist
    trained = []
    monkeypatch.setattr(metrics, "train_classifier", lambda *a: trained.append(a))
    (tmp_path / "file").write_text("")
    bad, root = str(tmp_path / "file"), write_mnist(str(tmp_path / "data"), n_train=4, n_test=4)
    np.savez(tmp_path / "x.npz", images=IMAGES.numpy())
    for main, args in [
            (metrics.main, ["--images", str(tmp_path / "x.npz"), "--metrics", "classifier", "--data-root", root]),
            (evaluate.main, ["--checkpoint", CHECKPOINT, "--n", "2", "--metrics", "classifier", "--data-root", root,
                             "--out", str(tmp_path / "e")]),
            (inpaint.main, ["--checkpoint", CHECKPOINT, "--classifier", "--n-images", "1", "--data-root", root,
                            "--out", str(tmp_path / "i")]),
            (mnist_classifier.main, ["--data-root", root])]:
        flag = "--cache" if main is mnist_classifier.main else "--classifier-cache"
        with pytest.raises(SystemExit) as e:
            main([*args, flag, bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{flag} {bad} is a file, not a folder" in err and not trained, err
    assert not (tmp_path / "e").exists() and not (tmp_path / "i").exists()


def test_folders_of_images_to_score_are_refused_at_another_size_and_training_resizes(tmp_path, capsys):
    """A folder of 32x32 images for MNIST: --images of metrics.py and inpaint.py, and --ref, refuse it in one line
    (a score of resized images would pass for one of the images given); --dataset-path resizes, as documented."""
    from PIL import Image
    import inpaint
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(folder / f"{i}.png")
    message = ": 0.png is 32x32; this data set's images are 28x28 and images to score or complete are not resized"
    for main, args in [(metrics.main, ["--images", str(folder), "--metrics", "none"]),
                       (inpaint.main, ["--checkpoint", CHECKPOINT, "--images", str(folder), "--device", "cpu",
                                       "--out", str(tmp_path / "i")])]:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert str(e.value).startswith("error: --images") and message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(data.DataError, match=re.escape(f"--ref {folder}{message}")):
        metrics.reference_stats(argparse.Namespace(ref=str(folder)), "mnist", None, "cpu")
    assert data.load_images("mnist", True, dataset_path=str(folder)).shape == (2, 1, 28, 28)
