"""Shared test setup: import the flat scripts from the repository root; small fixed threads."""
import contextlib
import os
import signal
import subprocess
import sys
import urllib.error
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
sys.path.insert(0, ROOT)
import startup                              # the stop signals (it takes none here: pytest is not a script)

for _s in startup.STOP_SIGNALS:             # pytest started as a `&` job or under nohup: the scripts would
    if signal.getsignal(_s) is signal.SIG_IGN:       # inherit the ignored signals, and keep ignoring them
        signal.signal(_s, signal.default_int_handler if _s == signal.SIGINT else signal.SIG_DFL)
if os.environ.get("PYTEST_XDIST_WORKER"):       # pytest -n 2: one thread a worker (and its subprocesses)
    os.environ["OMP_NUM_THREADS"] = "1"
import torch
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as a subprocess with OMP_NUM_THREADS=1 runs: the same arithmetic, bitwise (a run made
    in-process is the one-process reference of a torchrun test, without a second interpreter's start)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


SCIENCE = {"test_losses", "test_model", "test_samplers", "test_official", "test_edm", "test_common_alone",
           "test_checkpoints", "test_ncsnpp"}   # the science against known values; every other file runs scripts


def pytest_collection_modifyitems(items):
    """Markers by file: `science` (fast: losses, networks, samplers, official equivalence), `cli` (the
    scripts end to end) and `battery` (bad values on every flag); both of the latter are `slow`.
    python -m pytest -m "not slow" runs the science alone."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        kind = "battery" if module == "test_battery" else "science" if module in SCIENCE else "cli"
        kind = "cli" if item.get_closest_marker("cli") else kind       # a script run in a science file
        item.add_marker(kind)
        if kind != "science":
            item.add_marker("slow")


@pytest.fixture(autouse=True)
def no_process_outlives_its_test(monkeypatch):
    """Every subprocess a test starts (subprocess.run's too) is marked in its environment, which its own children
    inherit (torchrun's workers, which run in sessions of their own; data-loader workers); when the test ends, each
    of them still there is killed. A test that fails while a training runs (a signal never delivered, a timeout)
    must not leave it taking a core from the rest of the suite. They stay in pytest's process group: a signal to
    the group still reaches them."""
    started, tag = [], uuid.uuid4().hex

    class Tracked(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            env = os.environ if kwargs.get("env") is None else kwargs["env"]
            super().__init__(*args, **dict(kwargs, env=dict(env, NCSN_TEST_PROCESS=tag)))
            started.append(self)
    monkeypatch.setattr(subprocess, "Popen", Tracked)
    yield
    if started:
        for pid in marked(f"NCSN_TEST_PROCESS={tag}"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    for proc in started:
        if proc.poll() is None:                 # no /proc to find the marks in (not Linux)
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def marked(mark):
    """The pids whose environment holds `mark` (Linux's /proc; elsewhere none are found)."""
    pids = []
    for pid in (int(p) for p in (os.listdir("/proc") if os.path.isdir("/proc") else []) if p.isdigit()):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark.encode() in f.read().split(b"\0"):
                    pids.append(pid)
    return pids


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """A tiny MNIST in torchvision's format (write_mnist), 500 training and 20 test digits: the one
    data folder the tests share."""
    return write_mnist(str(tmp_path_factory.mktemp("mnist")), n_train=500, n_test=20)


@pytest.fixture(scope="session")
def small_mnist(tmp_path_factory):
    """64 training and 16 test digits: 4 steps an epoch in batches of 16 (the training tests count epochs)."""
    return write_mnist(str(tmp_path_factory.mktemp("mnist64")))


@pytest.fixture(scope="session")
def official_reference():
    """Inputs, scores and DSM losses computed by ermongroup/ncsn on the two ngf-4 fixtures."""
    return torch.load(os.path.join(DATA, "official_reference.pt"), weights_only=True)


@pytest.fixture
def offline(monkeypatch):
    """torchvision's downloads fail as they do without a network: tests never download."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.mnist as mnist
    def fail(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(mnist, "download_and_extract_archive", fail)
    monkeypatch.setattr(cifar, "download_and_extract_archive", fail)


def write_mnist(root, n_train=64, n_test=16, seed=0):
    """A tiny MNIST in torchvision's on-disk format: uncompressed IDX files under root/MNIST/raw.
    Digits are simple strokes (a bar whose angle depends on the label) so there is structure to learn."""
    import numpy as np
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        t = np.linspace(-9, 9, 40)
        for i, lab in enumerate(labels):
            a = np.pi * lab / 10
            r = (14 + t * np.sin(a)).round().astype(int), (14 + t * np.cos(a)).round().astype(int)
            images[i][r] = 255
            images[i] = np.maximum(images[i], rng.integers(0, 30, (28, 28)).astype(np.uint8))
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(np.array([2051, n, 28, 28], ">i4").tobytes() + images.tobytes())
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(np.array([2049, n], ">i4").tobytes() + labels.tobytes())
    return root


def write_cifar10(root, n_train=40, n_test=10, seed=0):
    """A tiny CIFAR-10 in torchvision's on-disk format: pickled batches in root/cifar-10-batches-py
    (their MD5 sums differ from the real ones, so tests patch only torchvision's integrity check)."""
    import pickle
    import numpy as np
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    def batch(n):
        base = rng.integers(0, 256, (n, 3, 1, 1))
        img = np.clip(base + rng.integers(-40, 40, (n, 3, 32, 32)), 0, 255).astype(np.uint8)
        return {"data": img.reshape(n, 3072), "labels": rng.integers(0, 10, n).tolist()}
    per = n_train // 5
    for i in range(1, 6):
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump(batch(per), f)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root
