"""The GPU paths on CUDA, skipped without a GPU (python gpu_check.py runs them with bench.py's GPU figures):
training with bf16 autocast, --compile, channels_last and pinned loading, resume, NCSN++, sampling, scoring and
likelihoods, --device auto. The random streams are the device's (torch.Generator(device)), so CUDA runs are checked
against CUDA runs, and scores of the same images against the CPU's."""
import os

import numpy as np
import pytest
import torch

import checkpoints
import evaluate
import sample
import train_mnist
import utils
from conftest import DATA

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TINY = ["--ngf", "8", "--num-workers", "2", "--n-samples", "4", "--steps-each", "2", "--batch-size", "32"]


def losses(out):
    import csv
    with open(os.path.join(out, "metrics.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_device_auto_is_the_gpu():
    assert utils.get_device("auto").type == "cuda"


def test_training_on_cuda_resumes_where_it_stopped(mnist_root, tmp_path):
    """A run stopped at step 3 and resumed to 6 continues the uninterrupted run's losses (cuDNN's autotuned
    convolutions: to float tolerance)."""
    base = ["--data-root", mnist_root, *TINY, "--sample-every", "100"]
    train_mnist.main([*base, "--out", str(tmp_path / "gpu"), "--iters", "6", "--device", "cuda"])
    train_mnist.main([*base, "--out", str(tmp_path / "half"), "--iters", "3", "--device", "cuda"])
    train_mnist.main([*base, "--out", str(tmp_path / "half"), "--iters", "6", "--device", "cuda", "--resume"])
    assert len(losses(tmp_path / "gpu")) == 6 and all(np.isfinite(losses(tmp_path / "gpu")))
    assert losses(tmp_path / "half") == pytest.approx(losses(tmp_path / "gpu"), rel=1e-3)
    ck = checkpoints.load(tmp_path / "half" / "checkpoint.pt")           # a GPU checkpoint loads on the CPU
    assert ck.step == 6 and next(ck.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("arch", ["refinenet", "ncsnpp"])
def test_bf16_compile_and_channels_last_train_both_networks(arch, mnist_root, tmp_path):
    out = tmp_path / arch
    extra = ["--recipe", "edm", "--arch", "ncsnpp"] if arch == "ncsnpp" else []
    train_mnist.main(["--data-root", mnist_root, *TINY, *extra, "--out", str(out), "--iters", "4", "--device", "cuda",
                      "--amp", "bf16", "--compile", "--channels-last", "--sample-every", "4"])
    assert len(losses(out)) == 4 and all(np.isfinite(losses(out)))
    assert os.path.exists(out / "samples_4.png")


def test_sampling_on_cuda_and_scoring_on_either_device(mnist_root, tmp_path):
    """Samples on cuda do not depend on the batch size (per-image generators), and the digit classifier's scores
    of one set of samples are the same on cuda and on the CPU."""
    ck = os.path.join(DATA, "official_mnist_ngf4.pth")
    base = ["--checkpoint", ck, "--n", "16", "--steps-each", "2"]
    [gpu] = sample.main([*base, "--batch-size", "8", "--out", str(tmp_path / "gpu"), "--device", "cuda"])
    [big] = sample.main([*base, "--batch-size", "16", "--out", str(tmp_path / "big"), "--device", "cuda"])
    a, b = sample.collect(gpu["folder"], 16).int(), sample.collect(big["folder"], 16).int()
    assert (a - b).abs().float().mean() < 0.5 and gpu["fingerprint"] == big["fingerprint"]
    scoring = [*base, "--batch-size", "8", "--metrics", "classifier", "--data-root", mnist_root, "--classifier-cache",
               str(tmp_path / "clf"), "--existing", "--out", str(tmp_path / "gpu")]
    [on_gpu] = evaluate.main([*scoring, "--device", "cuda"])
    [on_cpu] = evaluate.main([*scoring, "--device", "cpu"])           # the classifier cached by the first
    for k in ("classifier_is", "confident_share", "frechet_distance"):
        assert on_gpu[k] == pytest.approx(on_cpu[k], rel=1e-3, abs=1e-6), k


def test_likelihood_on_cuda_with_both_solvers(mnist_root, tmp_path):
    import likelihood
    out = tmp_path / "edm"
    train_mnist.main(["--data-root", mnist_root, *TINY, "--recipe", "edm", "--out", str(out), "--iters", "2",
                      "--device", "cuda"])
    base = ["--checkpoint", str(out / "checkpoint.pt"), "--data-root", mnist_root, "--n", "4", "--batch-size", "2",
            "--device", "cuda", "--out", str(tmp_path / "lik")]
    [heun] = likelihood.main([*base, "--solver", "heun", "--steps", "4"])
    [rk45] = likelihood.main([*base, "--solver", "rk45", "--rtol", "1e-3", "--atol", "1e-3"])
    assert heun["nfe_per_image"] == 8 and np.isfinite(heun["bits_per_dim"]) and np.isfinite(rk45["bits_per_dim"])
