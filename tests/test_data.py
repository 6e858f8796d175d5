"""Image data: every PIL mode to correct 8-bit, unreadable files and damaged data sets named in one line."""
import gzip
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import train
import train_celeba
from conftest import write_cifar10, write_mnist

FAST = ["--device", "cpu"]


def _load(folder, channels):
    return data.load_image_folder(str(folder), channels, 8).double()


def test_sixteen_bit_grey_png_keeps_its_brightness(tmp_path):
    """A 16-bit PNG read as 8-bit without scaling is almost all white; the true mean is v / 257."""
    v = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    for i in range(2):
        Image.fromarray(v).save(tmp_path / f"{i}.png")
    assert Image.open(tmp_path / "0.png").mode.startswith("I")          # PIL's 16-bit grey modes
    grey = _load(tmp_path, 1)
    assert abs(grey.mean().item() - v.mean() / 257) < 0.5 and grey.max() == 255 and grey.min() == 0
    rgb = _load(tmp_path, 3)                                             # repeated into three channels
    assert torch.equal(rgb[:, 0], grey[:, 0]) and torch.equal(rgb[:, 2], grey[:, 0])


def test_palette_rgba_and_cmyk_images_have_their_true_colours(tmp_path):
    # palette: left half index 0 = (200, 10, 30), right half index 1 = (0, 100, 250)
    p = Image.new("P", (8, 8))
    p.putpalette([200, 10, 30, 0, 100, 250] + [0] * 762)
    p.putdata([0 if x < 4 else 1 for y in range(8) for x in range(8)])
    (tmp_path / "p").mkdir()
    p.save(tmp_path / "p" / "a.png"), p.save(tmp_path / "p" / "b.png")
    assert _load(tmp_path / "p", 3).mean(dim=(0, 2, 3)).tolist() == [100.0, 55.0, 140.0]
    # RGBA: the colour channels are kept, the alpha dropped
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 40, 120, 220, np.arange(8)[None] * 30
    (tmp_path / "rgba").mkdir()
    for i in range(2):
        Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba" / f"{i}.png")
    assert _load(tmp_path / "rgba", 3).mean(dim=(0, 2, 3)).tolist() == [40.0, 120.0, 220.0]
    # CMYK: (0, 0, 0, 0) is white, (255, 0, 0, 0) cyan (0, 255, 255)
    cmyk = np.zeros((8, 8, 4), np.uint8)
    cmyk[:4, :, 0] = 255
    (tmp_path / "cmyk").mkdir()
    for i in range(2):
        Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk" / f"{i}.tif")
    assert _load(tmp_path / "cmyk", 3).mean(dim=(0, 2, 3)).tolist() == [127.5, 255.0, 255.0]
    grey = _load(tmp_path / "cmyk", 1).mean().item()                     # L = 0.299 R + 0.587 G + 0.114 B
    assert abs(grey - (255 + 0.701 * 255) / 2) < 1


def test_unreadable_images_are_named_in_one_line(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(data.DataError) as e:
        data.load_image_folder(str(tmp_path), 1, 8)
    assert "broken.png is not a readable image" in str(e.value) and "\n" not in str(e.value)
    os.remove(tmp_path / "broken.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "full.png").write_bytes(raw[:len(raw) // 2])          # a truncated download
    with pytest.raises(data.DataError, match="full.png is not a readable image"):
        data.load_image_folder(str(tmp_path), 3, 8)
    os.remove(tmp_path / "full.png")
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(data.DataError, match="float.tif is not a readable image .*floating-point"):
        data.load_image_folder(str(tmp_path), 1, 8)


def test_truncated_mnist_file_is_named(tmp_path, offline):
    root = write_mnist(str(tmp_path))
    path = os.path.join(root, "MNIST", "raw", "train-images-idx3-ubyte")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:len(raw) - 100])
    with pytest.raises(data.DataError) as e:
        data.load_images("mnist", True, root)
    assert f"{path} is present but truncated" in str(e.value) and "not under --data-root" not in str(e.value)


def test_a_corrupt_idx_header_is_not_called_truncated(tmp_path, offline):
    root = write_mnist(str(tmp_path))
    path = os.path.join(root, "MNIST", "raw", "t10k-images-idx3-ubyte")
    raw = bytearray(open(path, "rb").read())
    raw[2] = 0x0D                                                      # the type byte: float, not uint8
    open(path, "wb").write(bytes(raw))
    with pytest.raises(data.DataError) as e:
        data.load_images("mnist", False, root)
    assert f"{path} is present but not an IDX file of bytes (its header starts 00 00 0d 03" in str(e.value)
    assert "truncated" not in str(e.value)
    raw[2] = 0x08
    open(path, "wb").write(bytes(raw) + b"\0" * 7)                     # a good header, 7 bytes too many
    with pytest.raises(data.DataError, match="longer than its header says"):
        data.load_images("mnist", False, root)


def test_mnist_archive_with_the_wrong_checksum_is_named(tmp_path, offline):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, _ in __import__("torchvision").datasets.MNIST.resources:
        with gzip.open(raw / name, "wb") as f:
            f.write(b"\0" * 100)
    with pytest.raises(data.DataError) as e:
        data.load_images("mnist", False, str(tmp_path))
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz is present but damaged (MD5" in msg and "3 more damaged" in msg
    assert "\n" not in msg


def test_cifar_batches_with_the_wrong_checksum_are_named(tmp_path, offline):
    root = write_cifar10(str(tmp_path))               # real layout, but not the real files' MD5 sums
    with pytest.raises(data.DataError) as e:
        data.load_images("cifar10", True, root)
    assert os.path.join("cifar-10-batches-py", "data_batch_1") + " is present but damaged" in str(e.value)


def test_missing_data_set_says_where_to_put_the_files(tmp_path, offline):
    with pytest.raises(data.DataError) as e:
        data.load_images("cifar10", True, str(tmp_path))
    assert "cifar-10-python.tar.gz" in str(e.value) and "could not be downloaded" in str(e.value)


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
    monkeypatch.setattr(celeba, "check_integrity", lambda *a, **k: True)   # only the MD5 check: not the real files
    root = write_celeba(str(tmp_path / "data"))
    images = data.load_images("celeba", True, root)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    # the centre crop of 140 keeps only the red square
    assert (images[:, 0].float().mean() > 240) and (images[:, 2].float().mean() < 15)
    [cache] = [f for f in os.listdir(os.path.join(root, "celeba")) if f.startswith("ncsn_train")]
    assert torch.equal(data.load_images("celeba", True, root), images)       # from the cache
    assert data.load_images("celeba", False, root).shape[0] == 2
    out = tmp_path / "run"
    train_celeba.main(["--data-root", root, "--out", str(out), "--ngf", "4", "--num-workers", "0", "--batch-size", "2",
                       "--iters", "2", "--n-samples", "1", "--steps-each", "1", *FAST])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == "celeba" and cfg["ngf"] == 4 and cfg["dataset_spec"]["flip"] is True
    assert train.resolve(train.TrainConfig(dataset="celeba")).ngf == 128
    [r] = evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--n", "2", "--metrics", "none",
                         "--steps-each", "1",
                         "--out", str(tmp_path / "e"), *FAST])
    assert r["dataset"] == "celeba" and r["sampler"]["shape"] == [3, 32, 32]


def test_missing_celeba_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision.datasets.celeba as celeba
    def quota(*a, **k):
        raise RuntimeError("The daily quota of the file img_align_celeba.zip is exceeded")
    monkeypatch.setattr(celeba, "download_file_from_google_drive", quota)
    with pytest.raises(data.DataError) as e:
        data.load_images("celeba", True, str(tmp_path))
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "celeba") in msg and "img_align_celeba" in msg
    assert "list_eval_partition.txt" in msg
    assert "quota" in msg and "\n" not in msg
