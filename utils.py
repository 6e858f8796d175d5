"""What every script needs around the paper: devices, files written atomically, flag types,
stable seeds, processes (torchrun) and stop signals, per-sample noise, checkpoint writing, image data sets (MNIST, CIFAR-10, CelebA,
image folders), the Frechet distance and figure helpers. Module level imports: torch and the
standard library only (torchvision, PIL, numpy and matplotlib are imported on use).
The paper itself is common.py; the training machinery train.py.
"""
import os
import re
import json
import math
import hashlib
import argparse
import datetime
import secrets
import signal
import sys
import tempfile
import contextlib

import torch
import torch.nn.functional as F

#----------------------------------------------------------------------------
# Small helpers.

def get_device(name="auto"):
    """torch.device for a `--device` flag: 'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "auto") and not re.fullmatch(r"cuda(:\d+)?", name or ""):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{name}: CUDA is not available on this machine; use --device cpu or auto")
    dev = torch.device(name)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


TMP_PREFIX = ".tmp-"     # atomic_path's temporary files: TMP_PREFIX + 8 hex digits + "-" + final name


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same extension); when the block succeeds it
    replaces `path`, when it fails it is removed: a crash never leaves half a file. The file is
    created with the user's umask, as open() would."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{secrets.token_hex(4)}-{name}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_temporaries(folder):
    """Remove the temporary files that atomic_path left in `folder` when its process was killed
    (its naming, and the older mkstemp one; call it where this process is the folder's one writer). Returns the bytes freed."""
    freed = 0
    for name in os.listdir(folder):
        if re.fullmatch(re.escape(TMP_PREFIX) + r"[A-Za-z0-9_]{8}-.+", name):
            freed += os.path.getsize(os.path.join(folder, name))
            os.remove(os.path.join(folder, name))
    return freed


def check_out(path, flag="--out"):
    """None when `path` is, or can be made, a writable folder; else why not, in one line."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path} is a file, not a folder; choose another {flag}"
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return f"{flag} {path}: cannot write there ({e.strerror or e}); choose a writable folder"
    return None


def is_out_of_memory(e):
    """Whether an exception is torch running out of memory (CUDA's error, or the CPU allocator's)."""
    return isinstance(e, torch.OutOfMemoryError) or bool(re.search(r"out of memory|can't allocate memory", str(e)))


def first_line(e):
    """An exception's message cut to its first line (120 characters), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


def save_json(obj, path):
    """Write JSON atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _positive(cast, what):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text}")
        return value
    return parse


positive_int = _positive(int, "integer")        # argparse types: refused with a message naming the value
positive_float = _positive(float, "number")     # finite and > 0


def finite_float(text):
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def device_name(text):
    """argparse type for --device: auto, cpu, cuda or cuda:N, refused at once when not available."""
    try:
        get_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def rate(text):
    """argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), got {text}")
    return value


def count(text):
    """argparse type: an integer >= 0."""
    return 0 if text.strip() == "0" else positive_int(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except None and False (the help says what they mean)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def arg_parser(doc):
    """A script's ArgumentParser: the first paragraph of its docstring, defaults shown."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=HelpFormatter)


def digest(*parts):
    """SHA-256 (hex) of tensors (dtype, shape and bytes), state dicts, strings and numbers: the
    key of cached results and of sample folders (what they were computed from)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict):
            h.update(digest(*[x for k, v in part.items() for x in (k, v)]).encode())
        elif torch.is_tensor(part):
            t = part.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(part.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def stable_seed(*ints):
    """A 63-bit seed from a tuple of integers: the first 8 bytes of BLAKE2b over their signed
    64-bit little-endian bytes. The same on every machine and Python version (unlike hash())."""
    data = b"".join(int(i).to_bytes(8, "little", signed=True) for i in ints)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1

#----------------------------------------------------------------------------
# Processes (one code path: a single process is world size 1) and stop signals.

def dist_init(device_name="auto"):
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPUs); else a single process.
    Returns (rank, world_size, device)."""
    device = get_device(device_name)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    # generous timeout: the other ranks wait while rank 0 samples figures
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(hours=2))
    return rank, world, device


def dist_exit(code=0, barrier=True):
    """Leave the process group and exit. Barrier, destroy, flush, os._exit: gloo's worker threads
    can otherwise abort the interpreter at exit ("terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        try:
            if barrier:
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)

class Stopped(Exception):
    """Raised inside the figure sampler when a stop signal arrives."""


class StopSignal:
    """SIGINT / SIGTERM set `name`; the loop then finishes its step, saves and exits (a second
    signal takes the default action). A context manager that restores the old handlers."""

    def __init__(self):
        self.name, self.old = None, {}

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    def check(self, *args):
        """A sampler callback: stop sampling at once when a signal came."""
        if self.name is not None:
            raise Stopped

    def agreed(self, world, device):
        """Whether to stop now; with several processes, whether any rank got a signal."""
        if world == 1:
            return self.name is not None
        flag = torch.tensor([self.name is not None], dtype=torch.float32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.name = self.name or ("a signal on another rank" if flag.item() else None)
        return self.name is not None


#----------------------------------------------------------------------------
# Seeded noise per sample, and checkpoint writing.

class SampleNoise:
    """One torch.Generator per sample, seeded by stable_seed(*key) (EDM's StackedRandomGenerator):
    every draw of sample i depends on its key only, not on the batch it is drawn in."""

    def __init__(self, keys, device):
        self.gens = [torch.Generator(device=device).manual_seed(stable_seed(*k)) for k in keys]
        self.device = device

    def rand(self, *shape):
        return torch.stack([torch.rand(shape, generator=g, device=self.device) for g in self.gens])

    def randn_like(self, t):
        return torch.stack([torch.randn(t.shape[1:], generator=g, device=self.device) for g in self.gens])


def atomic_save(obj, path):
    """torch.save atomically, synced to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


#----------------------------------------------------------------------------
# Image data: whole data sets as uint8 tensors (N, C, H, W); MNIST and CIFAR-10 fit in memory.

DATASETS = {  # the official configs: channels, image size, random horizontal flips, RefineNet width
    "mnist": dict(channels=1, image_size=28, flip=False, ngf=64),
    "cifar10": dict(channels=3, image_size=32, flip=True, ngf=128),
    "celeba": dict(channels=3, image_size=32, flip=True, ngf=128),         # centre crop 140, then resized
}
CELEBA_CROP = 140        # the official CelebA preprocessing: centre crop 140 x 140, resize to 32
DATA_ROOT = "./data"     # where torchvision's data sets are looked for, and downloaded into
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class DataError(RuntimeError):
    """A data set that cannot be found or read; the message says what to put where."""


def to_8bit(img, channels):
    """A PIL image of any mode as 8-bit 'L' (channels 1) or 'RGB' (3). 16- and 32-bit integer
    greys (PNG's I;16, I) are scaled from 0-65535, palettes expanded, alpha dropped, CMYK and
    other colour spaces converted; floating-point images are refused (their range is unknown)."""
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


def load_image_folder(path, channels, image_size, split=None, flag="--dataset-path"):
    """uint8 (N, C, H, W) of every image under `path` (recursively, sorted), made 8-bit L or RGB
    (to_8bit) and, if their size differs, resized and centre-cropped. split='train' / 'test'
    keeps all but every 20th image / every 20th image. An unreadable file stops it, named."""
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
            raise DataError(f"{flag} {path}: {f} is not a readable image ({first_line(e)}); "
                            "remove or replace it") from None
        if img.size != (image_size, image_size):
            img = TF.center_crop(TF.resize(img, image_size), image_size)
        images.append(TF.pil_to_tensor(img))
    return torch.stack(images)


def damaged_files(dataset, data_root):
    """Files of torchvision's layout under data_root that are present but damaged (an MD5 other
    than torchvision's, or an IDX file shorter than its header says), as messages."""
    import torchvision
    from torchvision.datasets.utils import calculate_md5
    found = []
    def check_md5(path, md5):
        if os.path.isfile(path) and calculate_md5(path) != md5:
            found.append(f"{path} is present but damaged (MD5 {calculate_md5(path)}, expected {md5}: truncated or "
                         "another file); delete it to download it again, or copy a good one")
    if dataset == "mnist":
        raw = os.path.join(data_root, "MNIST", "raw")
        for name, md5 in torchvision.datasets.MNIST.resources:
            check_md5(os.path.join(raw, name), md5)
            idx = os.path.join(raw, name[:-3])
            if os.path.isfile(idx):
                with open(idx, "rb") as f:
                    head = f.read(16)
                dims = [int.from_bytes(head[4 + 4 * k:8 + 4 * k], "big") for k in range(head[3] if len(head) > 3 else 0)]
                want = 4 * (1 + len(dims)) + math.prod(dims)
                if len(head) < 8 or os.path.getsize(idx) != want:
                    found.append(f"{idx} is present but truncated ({os.path.getsize(idx)} bytes, its header says {want}); "
                                 "delete it (and its .gz) to download it again, or copy a good one")
    elif dataset == "cifar10":
        cls = torchvision.datasets.CIFAR10
        check_md5(os.path.join(data_root, cls.filename), cls.tgz_md5)
        for name, md5 in cls.train_list + cls.test_list:
            check_md5(os.path.join(data_root, cls.base_folder, name), md5)
    else:
        for _, md5, name in torchvision.datasets.CelebA.file_list:
            check_md5(os.path.join(data_root, "celeba", name), md5)
    return found


def load_celeba(data_root, train):
    """torchvision's CelebA split with the official preprocessing (centre crop 140, resize to 32),
    uint8 (N, 3, 32, 32). Decoding 162,770 JPEGs takes minutes, so the result is cached beside
    them under a key of the file names (celeba/ncsn_<split>_<N>_<key>.pt)."""
    import torchvision
    import torchvision.transforms.functional as TF
    from tqdm import tqdm
    split = "train" if train else "test"
    ds = torchvision.datasets.CelebA(data_root, split=split, target_type=[], download=True)
    size = DATASETS["celeba"]["image_size"]
    cache = os.path.join(data_root, "celeba", f"ncsn_{split}_{len(ds)}_{digest(list(ds.filename), CELEBA_CROP, size)[:12]}.pt")
    if os.path.exists(cache):
        from common import read_checkpoint
        return read_checkpoint(cache)["images"]
    images = torch.empty(len(ds), 3, size, size, dtype=torch.uint8)
    for i in tqdm(range(len(ds)), desc=f"CelebA {split}: crop {CELEBA_CROP}, resize {size}", unit="img", mininterval=2):
        with ds[i][0] as img:
            images[i] = TF.pil_to_tensor(TF.resize(TF.center_crop(to_8bit(img, 3), CELEBA_CROP), size))
    atomic_save(dict(images=images), cache)
    return images


def load_images(dataset, train, data_root=DATA_ROOT, dataset_path=None, folder_flag="--dataset-path"):
    """uint8 images (N, C, H, W) of the train or test split: torchvision's MNIST / CIFAR10 / CelebA
    under data_root (downloaded when missing), or a folder of images (dataset_path)."""
    spec = DATASETS[dataset]
    if dataset_path:
        return load_image_folder(dataset_path, spec["channels"], spec["image_size"], "train" if train else "test")
    import torchvision
    try:
        if dataset == "celeba":
            return load_celeba(data_root, train)
        if dataset == "mnist":
            return torchvision.datasets.MNIST(data_root, train=train, download=True).data[:, None].contiguous()
        data = torchvision.datasets.CIFAR10(data_root, train=train, download=True).data      # (N, 32, 32, 3)
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    except Exception as e:
        damaged = damaged_files(dataset, data_root)
        if damaged:
            raise DataError(damaged[0] + (f" ({len(damaged) - 1} more damaged)" if len(damaged) > 1 else "")) from None
        where = {"mnist": f"{os.path.join(data_root, 'MNIST', 'raw')}: train-images-idx3-ubyte.gz, "
                          "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
                 "cifar10": f"{data_root}: cifar-10-python.tar.gz (or its folder cifar-10-batches-py)",
                 "celeba": f"{os.path.join(data_root, 'celeba')} (torchvision's layout; its download often fails on "
                           "Google Drive's quota): the folder img_align_celeba (unzipped img_align_celeba.zip), "
                           "list_eval_partition.txt, identity_CelebA.txt, list_attr_celeba.txt, list_bbox_celeba.txt, "
                           "list_landmarks_align_celeba.txt"}[dataset]
        raise DataError(f"{dataset} is not under --data-root {data_root} and could not be downloaded ({first_line(e)}); "
                        f"copy these files into {where}" + (f", or pass {folder_flag} FOLDER of images" if folder_flag else "")) from None

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians of features (TTUR's
    FID formula), via torch-fidelity."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    return fid_statistics_to_metric(dict(mu=mu1, sigma=sigma1), dict(mu=mu2, sigma=sigma2), False)["frechet_inception_distance"]

#----------------------------------------------------------------------------
# Figure helpers shared by the scripts (matplotlib, PIL and torchvision are imported on use).

def save_figure(fig, path, dpi=110):
    """Save a matplotlib figure atomically (temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no screen needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_image_grid(path, images, nrow):
    """images (N, C, H, W) in [0, 1] (clamped) -> one PNG grid, written atomically; tiles under
    64 pixels are enlarged (nearest neighbour) so that 28x28 digits can be seen."""
    import torchvision
    from PIL import Image
    images = images.detach().float().clamp(0, 1).cpu()
    scale = max(1, round(64 / images.shape[-1]))
    images = F.interpolate(images, scale_factor=scale, mode="nearest") if scale > 1 else images
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    with atomic_path(path) as tmp:
        Image.fromarray((grid.permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()).save(tmp)


def save_process_figure(path, levels, sigmas, rows=8, columns=10):
    """The generation process (Figs. 4b, 5b): one row per sample, one column per noise level (at
    most `columns`, evenly spaced, the last level always shown)."""
    import torchvision
    plt = pyplot()
    keep = sorted({len(levels) - 1 - round(k * (len(levels) - 1) / (columns - 1)) for k in range(columns)})
    levels, sigmas = [levels[i] for i in keep], [sigmas[i] for i in keep]
    L, n = len(levels), min(rows, len(levels[0]))
    tiles = torch.stack([lv[:n].float().clamp(0, 1).cpu() for lv in levels], 1).flatten(0, 1)   # (n*L, C, H, W)
    grid = torchvision.utils.make_grid(tiles, nrow=L, padding=2, pad_value=1.0).permute(1, 2, 0).numpy()
    w = levels[0].shape[-1] + 2
    fig, ax = plt.subplots(figsize=(1.0 * L + 0.6, 1.0 * n + 0.8))
    ax.imshow(grid, cmap="gray" if grid.shape[2] == 1 else None)
    ax.set_xticks([w * (i + 0.5) for i in range(L)], [f"{float(s):.3g}" for s in sigmas], fontsize=8)
    ax.set_yticks([]), ax.set_xlabel(r"end of noise level $\sigma_i$")
    ax.set_title("Annealed Langevin dynamics: state at the end of each level")
    save_figure(fig, path, dpi=100)
