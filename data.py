"""Image data sets as whole uint8 tensors (N, C, H, W): torchvision's MNIST, CIFAR-10 and CelebA (downloaded
when missing, with the official preprocessing) and folders of images; the checks that name a damaged file;
a training run's batches, in an order fixed by (seed, epoch). torchvision and PIL are imported on use.
"""
import contextlib
import hashlib
import math
import os

import torch

import checkpoints
import utils

DATASETS = {  # the official configs: channels, image size, random horizontal flips, RefineNet width
    "mnist": dict(channels=1, image_size=28, flip=False, ngf=64),
    "cifar10": dict(channels=3, image_size=32, flip=True, ngf=128),
    "celeba": dict(channels=3, image_size=32, flip=True, ngf=128),         # centre crop 140, then resized
}
CELEBA_CROP = 140        # the official CelebA preprocessing: centre crop 140 x 140, resize to 32
DATA_ROOT = "./data"     # where torchvision's data sets are looked for, and downloaded into
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class DataError(utils.UserError):
    """A data set that cannot be found or read; the message says what to put where."""


def to_8bit(img, channels):
    """A PIL image of any mode as 8-bit 'L' (channels 1) or 'RGB' (3): integer greys (I;16, I) scaled from 0-65535,
    palettes expanded, alpha dropped, colour spaces converted; floating-point ones refused (range unknown)."""
    import numpy as np
    from PIL import Image
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"{img.mode} values {a.min()} to {a.max()} are not 16-bit")
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError("a floating-point image (mode F); save it as 8- or 16-bit")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("L" if channels == 1 else "RGB")


def image_array(a, what, channels, image_size):
    """uint8 (N, C, H, W) of a user's array of images, or a one-line DataError naming what is wrong and the fix.
    Accepted: uint8, or an integer dtype whose values all lie in 0-255 (cast); floats and booleans are refused
    (no range is guessed: 0-1, -1-1 and 0-255 images are all common). Layouts: (N, C, H, W), (N, H, W, C),
    (N, H, W) and (H, W) for one channel; the channels and the H x W size must be those of the data set."""
    import numpy as np
    a = np.asarray(a)
    shape = a.shape                                          # as the user saved it, for the messages
    fix = "save uint8 0-255 (for [0, 1] floats: (x * 255).round().clip(0, 255).astype(np.uint8))"
    if a.dtype.kind not in "ui":
        raise DataError(f"{what}: images of dtype {a.dtype} are not read (no range is guessed); {fix}")
    if a.size and a.dtype != np.uint8 and (int(a.min()) < 0 or int(a.max()) > 255):
        raise DataError(f"{what}: {a.dtype} values from {int(a.min())} to {int(a.max())}, outside 0-255; {fix}")
    if a.ndim == 2 or (a.ndim == 3 and channels == 1):
        a = a.reshape((-1, 1) + a.shape[-2:])                      # (H, W) or (N, H, W): one channel
    elif a.ndim == 4 and a.shape[1] != channels and a.shape[-1] == channels:
        a = a.transpose(0, 3, 1, 2)                                # (N, H, W, C)
    if a.ndim != 4 or a.shape[1] != channels or a.shape[2:] != (image_size, image_size):
        raise DataError(f"{what}: images of shape {shape}; this data set's are (N, {channels}, {image_size}, "
                        f"{image_size}) or (N, {image_size}, {image_size}, {channels}): pass the matching "
                        "--dataset or resize them")
    if len(a) < 2:
        raise DataError(f"{what}: {len(a)} image(s); the scores need at least 2")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))


def load_image_folder(path, channels, image_size, split=None, flag="--dataset-path", resize=True):
    """uint8 (N, C, H, W) of every image under `path` (recursively, sorted; to_8bit; resized and centre-cropped if
    of another size, or with resize=False, as for images to score, refused); split='train' / 'test': all but every
    20th / every 20th. An unreadable file stops it, named."""
    from PIL import Image
    import torchvision.transforms.functional as TF
    if not os.path.isdir(path):
        raise DataError(f"{flag} {path}: no such folder")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
    if len(files) < 2:
        raise DataError(f"{flag} {path}: found {len(files)} images ({', '.join(IMAGE_EXTENSIONS)}); need at least 2")
    if split is not None:
        files = [f for i, f in enumerate(files) if (i % 20 == 0) == (split == "test")]
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                img = to_8bit(im, channels)
        except Exception as e:          # PIL raises OSError, SyntaxError, ValueError, ... by format
            raise DataError(f"{flag} {path}: {f} is not a readable image ({utils.first_line(e)}); "
                            "remove or replace it") from None
        if img.size != (image_size, image_size) and not resize:
            raise DataError(f"{flag} {path}: {os.path.relpath(f, path)} is {img.size[0]}x{img.size[1]}; this data "
                            f"set's images are {image_size}x{image_size} and images to score or complete are not "
                            "resized: resize them, or pass the matching --dataset or checkpoint")
        if img.size != (image_size, image_size):
            img = TF.center_crop(TF.resize(img, image_size), image_size)
        images.append(TF.pil_to_tensor(img))
    return torch.stack(images)


def idx_problem(path):
    """What is wrong with an uncompressed MNIST IDX file (None when nothing): a header that is not IDX's
    (bytes 0, 0, type 0x08 for uint8, 1 or 3 dimensions), or a size other than the header's."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8 or head[:3] != b"\x00\x00\x08" or head[3] not in (1, 3):
        return f"not an IDX file of bytes (its header starts {head[:4].hex(' ') or 'empty'}, IDX's 00 00 08 01 or 03)"
    dims = [int.from_bytes(head[4 + 4 * k:8 + 4 * k], "big") for k in range(head[3])]
    want, size = 4 * (1 + len(dims)) + math.prod(dims), os.path.getsize(path)
    if size != want:
        return f"{'truncated' if size < want else 'longer than its header says'} ({size} bytes, its header says {want})"
    return None


def damaged_files(dataset, data_root):
    """Messages for the files of torchvision's layout under data_root that are present but damaged (an MD5
    other than torchvision's, or an IDX file of another size than its header says)."""
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import calculate_md5
    if dataset == "mnist":
        files = [(os.path.join(data_root, "MNIST", "raw", name), md5) for name, md5 in tvd.MNIST.resources]
    elif dataset == "cifar10":
        files = [(os.path.join(data_root, tvd.CIFAR10.filename), tvd.CIFAR10.tgz_md5)] + [
            (os.path.join(data_root, tvd.CIFAR10.base_folder, name), md5)
            for name, md5 in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list]
    else:
        files = [(os.path.join(data_root, "celeba", name), md5) for _, md5, name in tvd.CelebA.file_list]
    found = []
    for path, md5 in files:
        if os.path.isfile(path) and (actual := calculate_md5(path)) != md5:
            found.append(f"{path} is present but damaged (MD5 {actual}, expected {md5}: truncated or another file); "
                         "delete it to download it again, or copy a good one")
        idx = path[:-3]         # MNIST's uncompressed .gz
        if dataset == "mnist" and os.path.isfile(idx) and (why := idx_problem(idx)):
            found.append(f"{idx} is present but {why}; delete it (and its .gz) to download it again, or copy a good "
                         "one")
    return found


def load_celeba(data_root, train):
    """torchvision's CelebA split with the official preprocessing, uint8 (N, 3, 32, 32). Decoding 162,770 JPEGs
    takes minutes: cached beside them under a key of the file names (celeba/ncsn_<split>_<N>_<key>.pt)."""
    import torchvision
    import torchvision.transforms.functional as TF
    from tqdm import tqdm
    split = "train" if train else "test"
    ds = torchvision.datasets.CelebA(data_root, split=split, target_type=[], download=True)
    size = DATASETS["celeba"]["image_size"]
    key = utils.digest(list(ds.filename), CELEBA_CROP, size)[:12]
    cache = os.path.join(data_root, "celeba", f"ncsn_{split}_{len(ds)}_{key}.pt")
    if os.path.exists(cache):
        return checkpoints.read_checkpoint(cache)["images"]
    images = torch.empty(len(ds), 3, size, size, dtype=torch.uint8)
    for i in tqdm(range(len(ds)), desc=f"CelebA {split}: crop {CELEBA_CROP}, resize {size}", unit="img", mininterval=2):
        with ds[i][0] as img:
            images[i] = TF.pil_to_tensor(TF.resize(TF.center_crop(to_8bit(img, 3), CELEBA_CROP), size))
    checkpoints.write_checkpoint(dict(images=images), cache)
    return images


def spec(dataset, where="the checkpoint"):
    """DATASETS[dataset], or a DataError naming the data set and the known ones."""
    if dataset not in DATASETS:
        raise DataError(f"{where} names the data set {dataset!r}, which is none of {', '.join(DATASETS)}")
    return DATASETS[dataset]


# The folders under --data-root that torchvision makes for a download, deepest first.
DOWNLOAD_FOLDERS = {"mnist": [("MNIST", "raw"), ("MNIST",), ()], "cifar10": [()], "celeba": [("celeba",), ()]}


def load_images(dataset, train, data_root=DATA_ROOT, dataset_path=None, folder_flag=None):
    """uint8 images (N, C, H, W) of the train or test split: torchvision's MNIST / CIFAR10 / CelebA under
    data_root (downloaded when missing), or a folder of images (dataset_path)."""
    spec = DATASETS[dataset]
    if dataset_path:
        return load_image_folder(dataset_path, spec["channels"], spec["image_size"], "train" if train else "test")
    import torchvision
    made = [f for f in (os.path.join(data_root, *sub) for sub in DOWNLOAD_FOLDERS[dataset]) if not os.path.isdir(f)]
    try:
        if dataset == "celeba":
            return load_celeba(data_root, train)
        if dataset == "mnist":
            return torchvision.datasets.MNIST(data_root, train=train, download=True).data[:, None].contiguous()
        data = torchvision.datasets.CIFAR10(data_root, train=train, download=True).data      # (N, 32, 32, 3)
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    except Exception as e:
        for folder in made:          # the empty folders a failed download made (deepest first); files are kept
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if damaged := damaged_files(dataset, data_root):
            raise DataError(damaged[0] + (f" ({len(damaged) - 1} more damaged)" if len(damaged) > 1 else "")) from None
        where = {"mnist": f"{os.path.join(data_root, 'MNIST', 'raw')}: train-images-idx3-ubyte.gz, "
                          "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
                 "cifar10": f"{data_root}: cifar-10-python.tar.gz (or its folder cifar-10-batches-py)",
                 "celeba": f"{os.path.join(data_root, 'celeba')} (torchvision's layout; its download often fails on "
                           "Google Drive's quota): the folder img_align_celeba (unzipped img_align_celeba.zip), "
                           "list_eval_partition.txt, identity_CelebA.txt, list_attr_celeba.txt, list_bbox_celeba.txt, "
                           "list_landmarks_align_celeba.txt"}[dataset]
        folder = f", or pass {folder_flag} FOLDER of images" if folder_flag else ""
        raise DataError(f"{dataset} is not under --data-root {data_root} and could not be downloaded "
                        f"({utils.first_line(e)}); copy these files into {where}{folder}") from None


def train_and_test(dataset, data_root, dataset_path, batch_size, rank=0, world=1):
    """(train, test) uint8 images for a run of `world` processes: rank 0 first, as it alone downloads."""
    if rank != 0:
        torch.distributed.barrier()
    images = [load_images(dataset, split, data_root, dataset_path, "--dataset-path") for split in (True, False)]
    if rank == 0 and world > 1:
        torch.distributed.barrier()
    if len(images[0]) < batch_size:
        raise DataError(f"the training set has {len(images[0])} images, fewer than one batch of {batch_size}")
    return images

def identity(images):
    """The count and a content digest (SHA-256 of the uint8 bytes, 16 hex digits) of images: what a checkpoint
    records of its training data, so that a resume on other images is refused."""
    return f"{len(images)} images, sha256 {hashlib.sha256(images.contiguous().numpy()).hexdigest()[:16]}"

#----------------------------------------------------------------------------
# Training batches of the training set (one uint8 tensor), in an order fixed by (seed, epoch).

def batches(images, batch_size, seed, num_workers, epoch, pos, rank, world, device):
    """Yield (epoch, batches done in it, this rank's uint8 batch on the device) from batch `pos` of `epoch` on: each
    epoch a permutation fixed by (seed, epoch) in global batches (no partial one), each rank taking its slice."""
    per_rank = batch_size // world
    while True:
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(utils.stable_seed(seed, epoch, -1)))
        first = (b * batch_size + rank * per_rank for b in range(pos, len(images) // batch_size))
        order = [perm[lo:lo + per_rank].tolist() for lo in first]
        # a tensor is a map-style data set: images[list of indices] is a batch, gathered in the workers; the loader's
        # own generator (its workers' seeds) leaves the global one to dropout, so that a resumed run continues it
        own = torch.Generator().manual_seed(utils.stable_seed(seed, epoch, -2))
        loader = torch.utils.data.DataLoader(images, batch_size=None, sampler=order, num_workers=num_workers,
                                             pin_memory=device.type == "cuda", worker_init_fn=utils.ignore_stop_signals,
                                             generator=own)
        for batch in loader:
            pos += 1
            yield epoch, pos, batch.to(device, non_blocking=True)
        epoch, pos = epoch + 1, 0


def pixel_stats(images, chunk=4096):
    """(mean, standard deviation) of every pixel of uint8 images in [0, 1] (x_uint8 / 255), in chunks."""
    s = s2 = 0.0
    for lo in range(0, len(images), chunk):
        x = images[lo:lo + chunk].double() / 255
        s, s2 = s + x.sum().item(), s2 + (x * x).sum().item()
    n = images.numel()
    return s / n, max(s2 / n - (s / n) ** 2, 0.0) ** 0.5


def to_unit(images, u=None):
    """uint8 images to [0, 1]: with u ~ U(0, 1), the official code's uniform dequantisation x = x_01 * 255/256 +
    U(0, 1/256) = (x_uint8 + u) / 256; without, x_uint8 / 255 (NCSNv2's default)."""
    return (images.float() + u) / 256.0 if u is not None else images.float() / 255.0
