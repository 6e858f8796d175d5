"""train.py (and train_mnist.py / train_cifar.py): outputs, resume, DDP, accumulation, signals, NaN."""
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error

import pytest
import torch

import checkpoints
import common
import data
import losses
import utils
import train
import train_io
import train_cifar
import train_mnist
from conftest import ROOT, write_cifar10, write_mnist

FAST = ["--device", "cpu"]

TINY = ["--ngf", "4", "--num-workers", "0", "--n-samples", "4", "--steps-each", "2", "--device", "cpu"]


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)   # only the MD5 check
    return write_cifar10(str(tmp_path / "cifar"))


def loss_column(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def weights(path, key="model"):
    return torch.load(path, weights_only=True)[key]


def run(script, root, out, *extra):
    return script.main(["--data-root", root, "--out", str(out), *TINY, *extra])


def test_mnist_end_to_end_writes_every_output(small_mnist, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "TEST_EVERY", 5)
    out = tmp_path / "run"
    assert run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "10", "--snapshot-every", "5",
               "--sample-every", "5") == 10
    names = set(os.listdir(out))
    assert {"config.json", "metrics.csv", "checkpoint.pt", "checkpoint_5.pt", "checkpoint_10.pt", "loss.png",
            "samples_5.png", "process_5.png", "samples_10.png", "process_10.png"} <= names
    assert not [n for n in names if "tmp" in n]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["ngf"] == 4 and cfg["batch_size"] == 16 and cfg["steps_per_epoch"] == 4 and "torch" in cfg["versions"]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert [int(r["epoch"]) for r in rows] == [0] * 4 + [1] * 4 + [2] * 2
    assert rows[4]["test_loss"] and rows[9]["test_loss"] and not rows[3]["test_loss"]
    assert float(rows[-1]["images_per_s"]) > 0
    ck = checkpoints.load(out / "checkpoint.pt")
    assert ck.step == 10 and ck.model_args["ngf"] == 4 and ck.sigma_end == pytest.approx(0.01)
    # the same numbers and the sample grids as TensorBoard events, read back with tensorboard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    train_loss = [(e.step, e.value) for e in board.Scalars("loss/train")]
    assert train_loss == [(int(r["step"]), pytest.approx(float(r["loss"]), rel=1e-5)) for r in rows]
    assert [(e.step, e.value) for e in board.Scalars("loss/test")] == \
        [(int(r["step"]), pytest.approx(float(r["test_loss"]), rel=1e-5)) for r in rows if r["test_loss"]]
    grids = board.Images("samples")
    assert [g.step for g in grids] == [5, 10] and grids[0].width > 28 and grids[0].height > 28


def test_cifar_end_to_end_through_torchvision(cifar_root, tmp_path):
    out = tmp_path / "run"
    run(train_cifar, cifar_root, out, "--batch-size", "8", "--iters", "3", "--sample-every", "3")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_images"] == 40 and cfg["test_images"] == 10 and cfg["dataset_spec"]["flip"] is True
    assert {"samples_3.png", "process_3.png", "loss.png"} <= set(os.listdir(out))
    from PIL import Image
    grid = Image.open(out / "samples_3.png")                   # 2 x 2 tiles of 32 px, enlarged to 64, 2 px apart
    assert grid.mode == "RGB" and grid.size == (2 * 64 + 3 * 2,) * 2
    assert checkpoints.load(out / "checkpoint.pt").model_args == dict(in_channels=3, ngf=4, num_classes=10,
                                                                      image_size=32, conditioning="norm")
    torch.manual_seed(0)
    init = common.RefineNet(3, 4).state_dict()
    trained = weights(out / "checkpoint.pt")
    assert len(loss_column(out)) == 3 and not torch.equal(trained["begin_conv.weight"], init["begin_conv.weight"])


def test_train_step_is_annealed_dsm_on_dequantised_flipped_images():
    """train.train_step against dsm_loss by hand, with the step's own draws (utils.stable_seed)."""
    torch.manual_seed(0)
    net, sigmas = common.RefineNet(3, 4), common.geometric_sigmas()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)              # the network stays as it is
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    model = common.ScoreModel(net, sigmas)
    cfg = train.resolve(train.TrainConfig(dataset="cifar10", batch_size=6, seed=3, dequantize=True))
    x_step, draws = train.batch(cfg, images, 5, sigmas)                                      # CIFAR-10 flips
    loss = train.train_step(model, opt, x_step, draws, losses.dsm)
    d = losses.step_draws(3, 5, images.shape, sigmas)
    x = (images.float() + d["u"]) / 256
    x[d["flip"]] = x[d["flip"]].flip(3)
    assert 0 < d["flip"].sum() < 6 and (d["u"] < 1).all() and (d["u"] >= 0).all() and torch.equal(x, x_step)
    assert set(d["sigma"].tolist()) <= set(sigmas.tolist())                   # one of the levels each
    with torch.no_grad():
        want = common.dsm_loss(model, x, d["sigma"], d["noise"]).mean()
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    x_mnist, _ = train.batch(dataclasses.replace(cfg, dataset="mnist"), images, 5, sigmas)       # no flips
    unflipped = train.train_step(model, opt, x_mnist, draws, losses.dsm)
    assert abs(unflipped.item() - loss.item()) > 1e-4 * loss.item()
    # the derivation is BLAKE2b of the integers, not Python's hash(): the same on every interpreter
    import hashlib
    raw = b"".join(i.to_bytes(8, "little", signed=True) for i in (3, 5, 0))
    assert utils.stable_seed(3, 5, 0) == int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 1


def test_epochs_or_iters_the_flag_given_wins(small_mnist, tmp_path, capsys):
    # 64 training images in batches of 16: 4 steps an epoch
    assert run(train_mnist, small_mnist, tmp_path / "a", "--batch-size", "16", "--epochs", "2") == 8
    assert "training to step 8 (--epochs 2 x 4 steps)" in capsys.readouterr().out
    assert run(train_mnist, small_mnist, tmp_path / "b", "--batch-size", "16", "--epochs", "2", "--iters", "5") == 5
    assert "training to step 5 (--iters 5)" in capsys.readouterr().out
    assert train.run_length(train.TrainConfig(), 4) == (200_000, "the paper's 200,000 steps")
    assert train.run_length(train.TrainConfig(epochs=500), 500)[0] == 250_000     # the seed report's CIFAR-10 run


def test_every_setting_is_one_flag_and_is_saved(small_mnist, tmp_path):
    import dataclasses
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert {a.dest for a in train.parser()._actions} - {"help"} == fields
    assert {a.dest for a in train.parser({"dataset"})._actions} - {"help"} == fields - {"dataset"}
    out = tmp_path / "run"
    train.main(["--dataset", "mnist", "--data-root", small_mnist, "--out", str(out), *TINY, "--batch-size", "16",
                "--iters", "1", "--lr", "2e-4"])
    saved = json.loads((out / "config.json").read_text())
    assert fields <= set(saved) and saved["lr"] == 2e-4 and saved["ngf"] == 4 and saved["iters"] == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"] == {k: saved[k] for k in fields}
    assert train.resolve(train.TrainConfig(dataset="cifar10")).ngf == 128        # the data set's default width


def test_loss_goes_down_on_a_fixed_small_batch(tmp_path):
    root = write_mnist(str(tmp_path / "d"), n_train=16, n_test=4)
    out = tmp_path / "run"
    run(train_mnist, root, out, "--ngf", "8", "--batch-size", "16", "--iters", "40", "--lr", "3e-3")
    l = loss_column(out)
    assert sum(l[-5:]) / 5 < 0.8 * sum(l[:5]) / 5, l


def test_resume_continues_exactly(small_mnist, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--batch-size", "16", "--ema", "0.9", "--snapshot-every", "100", "--sample-every", "100"]
    run(train_mnist, small_mnist, full, *args, "--iters", "7")
    run(train_mnist, small_mnist, part, *args, "--iters", "3")                 # stops mid-epoch
    capsys.readouterr()
    run(train_mnist, small_mnist, part, *args, "--iters", "7", "--resume")
    assert "at step 3 (epoch 0, batch 3)" in capsys.readouterr().out
    assert loss_column(part) == loss_column(full) and len(loss_column(full)) == 7
    for key in ["model", "ema"]:
        a, b = weights(full / "checkpoint.pt", key), weights(part / "checkpoint.pt", key)
        assert all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = weights(full / "checkpoint.pt", "optimizer"), weights(part / "checkpoint.pt", "optimizer")
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])


def test_ema_follows_its_formula(small_mnist, tmp_path):
    out = tmp_path / "run"
    run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "1", "--ema", "0.75")
    torch.manual_seed(0)
    init = common.RefineNet(1, 4).state_dict()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    k = "res2.0.conv1.weight"
    assert not torch.equal(ck["model"][k], init[k])
    assert torch.allclose(ck["ema"][k], 0.75 * init[k] + 0.25 * ck["model"][k], atol=1e-7)
    loaded = checkpoints.load(out / "checkpoint.pt")                          # evaluation takes the EMA
    assert loaded.ema and torch.equal(loaded.model.net.state_dict()[k], ck["ema"][k])


def test_ema_update_keeps_no_autograd_history():
    net, ema = common.RefineNet(1, 4), common.RefineNet(1, 4).requires_grad_(False)
    before = [p.clone() for p in ema.parameters()]
    train.ema_update(ema, net, 0.9)
    for e, b, p in zip(ema.parameters(), before, net.parameters()):
        assert e.grad_fn is None and not e.requires_grad
        assert torch.allclose(e, 0.9 * b + 0.1 * p.detach(), atol=1e-7)


def test_ema_rate_by_half_life_ramps_up_as_edms():
    cfg = train.TrainConfig(batch_size=10, ema=0.999, ema_halflife=1000.0, ema_rampup=0.05)
    # update n: the half-life is min(1000, 0.05 x 10 n) images, the rate 0.5^(10 / half-life)
    assert train_io.ema_rate(cfg, 0) == pytest.approx(0.5 ** (10 / 0.5))
    assert train_io.ema_rate(cfg, 999) == pytest.approx(0.5 ** (10 / 500))
    assert train_io.ema_rate(cfg, 10 ** 6) == pytest.approx(0.5 ** (10 / 1000))                   # ramped up
    assert train_io.ema_rate(dataclasses.replace(cfg, ema_rampup=0.0), 0) == pytest.approx(0.5 ** 0.01)
    assert train_io.ema_rate(dataclasses.replace(cfg, ema_halflife=None, ema_warmup=True), 0) == pytest.approx(2 / 11)
    assert train_io.ema_rate(dataclasses.replace(cfg, ema_halflife=None), 0) == 0.999


def test_lr_warmup_and_a_time_budget(small_mnist, tmp_path):
    out = tmp_path / "wu"
    run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "2", "--lr", "1e-3", "--lr-warmup", "64")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"] == \
        pytest.approx(1e-3 * 2 * 16 / 64)                                  # the lr of step 2: 32 of 64 images
    fast = tmp_path / "timed"
    assert run(train_mnist, small_mnist, fast, "--batch-size", "16", "--iters", "100000", "--minutes", "1e-6") == 1
    assert torch.load(fast / "checkpoint.pt", weights_only=True)["step"] == 1      # ended at once, saved, done


def test_grad_accumulation_equals_the_large_batch(small_mnist, tmp_path):
    run(train_mnist, small_mnist, tmp_path / "a", "--batch-size", "16", "--iters", "2")
    run(train_mnist, small_mnist, tmp_path / "b", "--batch-size", "16", "--iters", "2", "--grad-accum", "4")
    a, b = weights(tmp_path / "a" / "checkpoint.pt"), weights(tmp_path / "b" / "checkpoint.pt")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert loss_column(tmp_path / "a") == pytest.approx(loss_column(tmp_path / "b"), rel=1e-5)


def test_ddp_two_processes_equal_one_process(small_mnist, tmp_path):
    # figures at every step, snapshots never: the log's flush before the figures is a collective of every rank
    base = [*TINY, "--data-root", small_mnist, "--batch-size", "16", "--iters", "2", "--sample-every", "1"]
    train_mnist.main([*base, "--out", str(tmp_path / "one")])         # one process, here: its arithmetic to 1e-5
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train.py", "--dataset", "mnist", *base, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["micro_batch"] == 8
    a, b = weights(tmp_path / "one" / "checkpoint.pt"), weights(tmp_path / "two" / "checkpoint.pt")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert loss_column(tmp_path / "one") == pytest.approx(loss_column(tmp_path / "two"), rel=1e-5)


@pytest.mark.parametrize("signals", [[signal.SIGHUP], [signal.SIGTERM, signal.SIGTERM],
                                     [signal.SIGINT, signal.SIGTERM]], ids=lambda s: "-".join(x.name for x in s))
def test_sigterm_writes_a_loadable_checkpoint(signals, small_mnist, tmp_path):
    """A pre-emption (SIGTERM) or a closed terminal (SIGHUP): the step ends, the checkpoint is written, status 3; a
    second signal while the first is handled is ignored (it would cut the checkpoint and the message short)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_mnist.py", *TINY, "--data-root", small_mnist, "--out", str(out),
                             "--batch-size", "16", "--iters", "100000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.csv").exists() and len(loss_column(out)) >= 3):   # rows come every 10 steps
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == train.EXIT_STOPPED, output[-2000:]          # "stopped, resume me"
    assert f"stopped by {signals[0].name}" in output
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] >= 3 and ck["step"] == len(loss_column(out))
    assert checkpoints.load(out / "checkpoint.pt").step == ck["step"]


def test_sigterm_under_torchrun_stops_every_rank_at_one_step(small_mnist, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_mnist.py",
               *TINY, "--data-root", small_mnist, "--out", str(out), "--batch-size", "16", "--iters", "100000"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.csv").exists() and len(loss_column(out)) >= 10):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)               # torchrun forwards it to both workers
    output, _ = proc.communicate(timeout=90)
    assert "stopped by SIGTERM" in output
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] % train.LOG_EVERY == 0 and ck["step"] == len(loss_column(out)) >= 10


def torchrun_worker(launcher, rank):
    """The pid of torchrun's worker process of `rank` (a child of the launcher with RANK=rank in its environment)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return pid


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc (Linux)")
def test_a_rank_killed_under_torchrun_leaves_the_survivor_one_line_and_the_checkpoint(small_mnist, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_mnist.py",
               *TINY, "--data-root", small_mnist, "--out", str(out), "--batch-size", "16", "--iters", "100000",
               "--snapshot-every", "2"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ((out / "checkpoint_4.pt").exists()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.kill(torchrun_worker(proc.pid, 1), signal.SIGKILL)
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert "another process of this torchrun run has gone" in output and "with --resume" in output, output[-3000:]
    assert f"{os.sep}train.py\", line" not in output, output[-3000:]      # no traceback of the survivor's
    ck = checkpoints.load(out / "checkpoint.pt")
    assert ck.step >= 4 and ck.step % 2 == 0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_mnist, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = common.dsm_loss
    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] >= 7 else loss
    monkeypatch.setattr(common, "dsm_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "20", "--snapshot-every", "5")
    assert "non-finite loss at step 7" in str(e.value) and "step 5" in str(e.value)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not (out / "checkpoint_10.pt").exists()


def test_resume_refuses_another_model_and_overwrite(small_mnist, tmp_path):
    out = tmp_path / "run"
    run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "1")
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds checkpoint.pt; pass --resume"):
        run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "2")
    with pytest.raises(SystemExit, match=r"different model: ngf 4 \(flags: 8\)"):
        run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "2", "--resume", "--ngf", "8")
    with pytest.raises(SystemExit, match=r"--batch-size 16 \(flags: 32\)"):
        run(train_mnist, small_mnist, out, "--batch-size", "32", "--iters", "2", "--resume")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_at_its_target_says_so_in_one_line_and_rewrites_nothing(small_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "3") == 3
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    capsys.readouterr()
    for target in (["--iters", "2"], ["--iters", "3"]):
        assert run(train_mnist, small_mnist, out, "--batch-size", "16", *target, "--resume") == 3
        said = capsys.readouterr().out
        assert said.count("\n") == 1 and f"is at step 3, the target (--iters {target[1]}) is step {target[1]}: " \
            "nothing to train, nothing rewritten" in said and "training to step" not in said, said
        assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_resume_on_other_training_images_is_refused(small_mnist, tmp_path):
    from PIL import Image
    import numpy as np
    out, other = tmp_path / "run", write_mnist(str(tmp_path / "other"), seed=1)     # as many images, other digits
    run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "1")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["data"] == data.identity(
        data.load_images("mnist", True, small_mnist))
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"trained on 64 images, sha256 [0-9a-f]{16}; --data-root .*other now holds "
                                         r"64 images, sha256 [0-9a-f]{16}: resume on the same images"):
        run(train_mnist, other, out, "--batch-size", "16", "--iters", "2", "--resume")
    assert run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "2", "--resume") == 2  # the same: on
    assert (out / "checkpoint.pt").read_bytes() != before
    # a --dataset-path folder whose images changed since the checkpoint
    folder, out = tmp_path / "imgs", tmp_path / "folder_run"
    folder.mkdir()
    for i in range(20):
        Image.fromarray(np.full((28, 28), 10 * i, np.uint8)).save(folder / f"{i:02d}.png")
    train_mnist.main(["--dataset-path", str(folder), "--out", str(out), *TINY, "--batch-size", "4", "--iters", "1"])
    Image.fromarray(np.full((28, 28), 7, np.uint8)).save(folder / "05.png")          # a training image (00: test)
    with pytest.raises(SystemExit, match=r"trained on 19 images, sha256 .*; --dataset-path .*imgs now holds 19 images"):
        train_mnist.main(["--dataset-path", str(folder), "--out", str(out), *TINY, "--batch-size", "4", "--iters",
                          "2", "--resume"])


def test_missing_data_offline_gives_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as mnist
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(mnist, "download_and_extract_archive", offline)
    with pytest.raises(SystemExit) as e:
        run(train_mnist, str(tmp_path / "empty"), tmp_path / "run", "--iters", "1")
    msg = str(e.value)
    assert "\n" not in msg and os.path.join("empty", "MNIST", "raw") in msg and "train-images-idx3-ubyte.gz" in msg
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not (tmp_path / "empty").exists()              # the folders the failed download made are removed
    (tmp_path / "kept" / "MNIST").mkdir(parents=True)       # and the user's own are kept, files and all
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        run(train_mnist, str(tmp_path / "kept"), tmp_path / "run", "--iters", "1")
    assert sorted(os.listdir(tmp_path / "kept")) == ["MNIST", "notes.txt"] and not os.listdir(tmp_path / "kept" /
                                                                                               "MNIST")


def test_folder_dataset(tmp_path):
    from PIL import Image
    import numpy as np
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i in range(30):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 36, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "run"
    train_cifar.main(["--dataset-path", str(tmp_path / "imgs"), "--out", str(out), *TINY, "--batch-size", "4",
                      "--iters", "2"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_images"] == 28 and cfg["test_images"] == 2
    assert data.load_images("cifar10", True, dataset_path=str(tmp_path / "imgs")).shape == (28, 3, 32, 32)
    with pytest.raises(data.DataError, match="no such folder"):
        data.load_images("cifar10", True, dataset_path=str(tmp_path / "nope"))


@pytest.mark.parametrize("bad, message", [
    (["--batch-size", "-4"], "expected a positive integer, got -4"),
    (["--sigma-begin", "0.01", "--sigma-end", "1"], "must be larger than --sigma-end"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--amp", "fp8"], "invalid choice"),
    (["--ema", "1.5"], "expected a rate in [0, 1)"),
])
def test_bad_flags_are_refused(bad, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_mnist.main(bad)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_channels_last_gives_the_same_update(small_mnist, tmp_path):
    run(train_mnist, small_mnist, tmp_path / "a", "--batch-size", "16", "--iters", "2")
    run(train_mnist, small_mnist, tmp_path / "b", "--batch-size", "16", "--iters", "2", "--channels-last")
    a, b = weights(tmp_path / "a" / "checkpoint.pt"), weights(tmp_path / "b" / "checkpoint.pt")
    assert set(a) == set(b) and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_bf16_autocast_trains_close_to_fp32(small_mnist, tmp_path):
    run(train_mnist, small_mnist, tmp_path / "a", "--batch-size", "16", "--iters", "3")
    run(train_mnist, small_mnist, tmp_path / "b", "--batch-size", "16", "--iters", "3", "--amp", "bf16")
    fp32, bf16 = loss_column(tmp_path / "a"), loss_column(tmp_path / "b")
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=0.03)          # same draws, other arithmetic
    a, b = weights(tmp_path / "a" / "checkpoint.pt"), weights(tmp_path / "b" / "checkpoint.pt")
    k = "res2.0.conv1.weight"
    assert not torch.equal(a[k], b[k]) and (a[k] - b[k]).norm() < 0.1 * a[k].norm()


#----------------------------------------------------------------------------
# Issue 10: nothing promised is lost, every failure one line.

def test_stop_signal_during_figure_sampling_ends_the_run_promptly(small_mnist, tmp_path):
    """Figures of 10 x 100,000 sampler steps would take an hour; SIGTERM must end the run in seconds
    with checkpoint.pt at the current step and the 'stopped' exit status."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_mnist.py", *TINY, "--data-root", small_mnist, "--out", str(out),
                             "--batch-size", "16", "--iters", "100", "--sample-every", "3", "--steps-each", "100000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:                       # wait until the loop pauses for the figures
        lines.append(line)
        if "for the figures" in line:
            break
    time.sleep(1.0)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    output = "".join(lines) + proc.communicate(timeout=60)[0]
    assert time.time() - t0 < 10, output[-2000:]
    assert proc.returncode == train.EXIT_STOPPED and "stopped by SIGTERM at step 3" in output
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert not (out / "samples_3.png").exists()                   # no half-made figure
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_stale_temporary_files_are_removed_and_others_kept(small_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".tmp-a1b2c3d4-checkpoint.pt").write_bytes(b"\0" * 3_000_000)   # a write killed by kill -9
    (out / ".tmp-x_9yz8w7-metrics.csv").write_text("step\n")                 # the older mkstemp naming
    (out / ".tmp-notes.txt").write_text("mine")                               # not this project's naming
    (out / "notes.tmp").write_text("mine")
    run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "1")
    names = set(os.listdir(out))
    assert ".tmp-a1b2c3d4-checkpoint.pt" not in names and ".tmp-x_9yz8w7-metrics.csv" not in names
    assert {".tmp-notes.txt", "notes.tmp", "checkpoint.pt"} <= names
    assert "removed the temporary files of an interrupted write" in capsys.readouterr().out


def test_torn_metrics_row_does_not_block_resume(small_mnist, tmp_path):
    out, full = tmp_path / "run", tmp_path / "full"
    args = ["--batch-size", "16", "--snapshot-every", "100", "--sample-every", "100"]
    run(train_mnist, small_mnist, full, *args, "--iters", "6")
    run(train_mnist, small_mnist, out, *args, "--iters", "3")
    with open(out / "metrics.csv", "a") as f:
        f.write("4,1,41.2,,15.1\n1")                             # died mid-row (of step 1x), after the checkpoint
    run(train_mnist, small_mnist, out, *args, "--iters", "6", "--resume")
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 7)) and loss_column(out) == loss_column(full)


def test_a_damaged_row_inside_metrics_csv_keeps_every_valid_row_and_the_file(small_mnist, tmp_path, capsys):
    """An unparsable row in the middle (a hand edit, a disk error): every valid row before and after it is kept on
    --resume, and the damaged file is set aside as metrics.csv.damaged, named in one line."""
    out = tmp_path / "run"
    args = ["--batch-size", "16", "--snapshot-every", "100", "--sample-every", "100"]
    run(train_mnist, small_mnist, out, *args, "--iters", "4")
    lines = (out / "metrics.csv").read_text().splitlines(keepends=True)
    damaged = "".join(lines[:2] + ["2,1,not a number,,15.1\n", "garbage\n"] + lines[2:])
    (out / "metrics.csv").write_text(damaged)
    capsys.readouterr()
    run(train_mnist, small_mnist, out, *args, "--iters", "6", "--resume")
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert [r["loss"] for r in rows[:4]] == [line.split(",")[2] for line in lines[1:5]]
    assert (out / "metrics.csv.damaged").read_text() == damaged
    err = capsys.readouterr().err
    assert "2 row(s) do not parse (line 3, 4)" in err and "the 4 valid rows are kept" in err


def test_tensorboard_of_a_resumed_run_shows_each_step_once(small_mnist, tmp_path):
    """A run killed after logging step 6 but before its checkpoint (rolled back to checkpoint_3.pt here) and resumed:
    TensorBoard hides the killed run's events after step 3 (purge_step), so each step's loss is shown once."""
    import shutil
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    args = ["--batch-size", "16", "--snapshot-every", "3", "--sample-every", "100"]
    run(train_mnist, small_mnist, out, *args, "--iters", "6")
    shutil.copy(out / "checkpoint_3.pt", out / "checkpoint.pt")
    time.sleep(1.1)                                     # event files are named by the second they were opened in
    run(train_mnist, small_mnist, out, *args, "--iters", "6", "--resume")
    board = EventAccumulator(str(out), size_guidance={"scalars": 0})
    board.Reload()
    assert [e.step for e in board.Scalars("loss/train")] == [1, 2, 3, 4, 5, 6]
    with open(out / "metrics.csv") as f:
        assert [e.value for e in board.Scalars("loss/train")] == \
            pytest.approx([float(r["loss"]) for r in csv.DictReader(f)], rel=1e-5)


def test_outputs_follow_the_umask(small_mnist, tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "2", "--snapshot-every", "2")
    finally:
        os.umask(old)
    for name in ["checkpoint.pt", "checkpoint_2.pt", "metrics.csv", "config.json", "samples_2.png", "loss.png"]:
        assert (out / name).stat().st_mode & 0o777 == 0o640, name


def _one_line_exit(capsys, fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    message = str(e.value) if not isinstance(e.value.code, int) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in message.strip() and e.value.code != 0
    return message


@pytest.mark.parametrize("flags, message", [
    (["--beta1", "1.5"], "expected a rate in [0, 1), got 1.5"),
    (["--lr", "-1"], "expected a positive number, got -1"),
    (["--lr", "nan"], "expected a positive number, got nan"),
    (["--anneal-power", "inf"], "expected a finite number, got inf"),
    (["--num-workers", "-2"], "expected an integer >= 0, got -2"),
])
def test_out_of_range_settings_are_refused(flags, message, capsys):
    assert message in _one_line_exit(capsys, train_mnist.main, flags)


def test_failures_give_one_line_and_lose_nothing(small_mnist, tmp_path, capsys, monkeypatch):
    # an --ngf that cannot fit in memory
    msg = _one_line_exit(capsys, run, train_mnist, small_mnist, tmp_path / "big", "--ngf", "200000", "--iters", "1",
                         "--batch-size", "16")
    assert "out of memory with --ngf 200000" in msg and "smaller --ngf" in msg
    # --out an existing file, or a folder that cannot be written
    (tmp_path / "file").write_text("keep me")
    message = _one_line_exit(capsys, run, train_mnist, small_mnist, tmp_path / "file", "--iters", "1")
    assert "is a file, not a folder" in message
    assert (tmp_path / "file").read_text() == "keep me"
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    target = ro / "run" if not os.access(ro, os.W_OK) else "/sys/ncsn-read-only"    # root ignores file modes
    assert "cannot write there" in _one_line_exit(capsys, run, train_mnist, small_mnist, target, "--iters", "1")
    # a resume checkpoint without model_args
    out = tmp_path / "run"
    run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "2")
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    ck.pop("model_args")
    torch.save(ck, out / "checkpoint.pt")
    msg = _one_line_exit(capsys, run, train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "3", "--resume")
    assert "lacks model_args" in msg
    # the disk fills while a checkpoint is written: the old one survives, one line, no temporary file
    out = tmp_path / "full"
    run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "2")
    before = (out / "checkpoint.pt").read_bytes()
    real = torch.save
    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    msg = _one_line_exit(capsys, run, train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "4", "--resume")
    monkeypatch.setattr(torch, "save", real)
    assert "No space left on device" in msg and "checkpoint.pt is the last complete one" in msg
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert checkpoints.load(out / "checkpoint.pt").step == 2


def test_non_finite_loss_message_reads_well(small_mnist, tmp_path, monkeypatch):
    real = common.dsm_loss
    monkeypatch.setattr(common, "dsm_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(SystemExit) as e:
        run(train_mnist, small_mnist, tmp_path / "run", "--batch-size", "16", "--iters", "5")
    assert str(e.value) == "error: non-finite loss at step 1; stopped; no checkpoint was written"


def test_ssm_objective_trains_and_accumulates_like_one_batch(small_mnist, tmp_path):
    base = ["--data-root", small_mnist, "--ngf", "4", "--num-workers", "0", "--batch-size", "16", "--n-samples", "1",
            "--steps-each", "1", *FAST]
    train_mnist.main([*base, "--iters", "2", "--objective", "ssm", "--out", str(tmp_path / "a")])
    train_mnist.main([*base, "--iters", "2", "--objective", "ssm", "--out", str(tmp_path / "b"), "--grad-accum", "4"])
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in "ab")
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) < 1e-5
    assert a["config"]["objective"] == "ssm"
    with pytest.raises(SystemExit, match=r"--objective ssm \(flags: dsm\)"):       # resume must keep the objective
        train_mnist.main([*base, "--out", str(tmp_path / "a"), "--resume", "--iters", "3"])


def test_sigterm_to_the_process_group_with_loader_workers_loses_nothing(small_mnist, tmp_path):
    """Slurm's scancel, timeout and kill -- -PGID signal every process of the group, the data-loader workers
    too: the workers must not die of it first; the run ends as for a signal to the main process alone."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_mnist.py", *TINY, "--num-workers", "2", "--data-root", small_mnist,
                             "--out", str(out), "--batch-size", "16", "--iters", "100000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not ((out / "metrics.csv").exists() and len(loss_column(out)) >= 3):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == train.EXIT_STOPPED and "stopped by SIGTERM" in output, output[-2000:]
    assert "Traceback" not in output and "DataLoader worker" not in output
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == len(loss_column(out)) >= 3


def test_a_signal_during_the_last_figures_is_no_success(small_mnist, tmp_path):
    """The run's last step is saved; the figures cut short are not claimed, and --resume draws them."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_mnist.py", *TINY, "--data-root", small_mnist, "--out", str(out),
                             "--batch-size", "16", "--iters", "2", "--steps-each", "100000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "for the figures" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    output = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == train.EXIT_STOPPED and "while drawing the figures of step 2" in output, output[-2000:]
    assert "done" not in output and not (out / "samples_2.png").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "2", "--resume") == 2
    assert (out / "samples_2.png").exists() and (out / "process_2.png").exists()


def test_a_new_objective_is_one_callable_and_one_table_entry(small_mnist, tmp_path, monkeypatch):
    """Register a toy loss (the score's squared norm at the drawn sigma, weighted by a draw it declares) and
    train 2 steps with it through train_mnist.py: its flag exists, it gets its draws, its values are the loss
    column, and the run resumes with it."""
    seen = []
    def toy(model, x, draws, anneal_power=2.0):
        per_image = draws["normal"].abs() * model(x, draws["sigma"]).flatten(1).pow(2).mean(1) ** (anneal_power / 2)
        seen.append((sorted(draws), anneal_power, per_image.mean().item()))
        return per_image
    monkeypatch.setitem(losses.OBJECTIVES, "toy", losses.Objective(toy, ("normal",), ("anneal_power",)))
    out = tmp_path / "toy"
    run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "2", "--objective", "toy", "--anneal-power",
        "3")
    assert [(keys, power) for keys, power, _ in seen[:2]] == [(["flip", "noise", "normal", "sigma", "u"], 3.0)] * 2
    assert loss_column(out) == pytest.approx([v for _, _, v in seen[:2]], rel=1e-5)
    assert json.loads((out / "config.json").read_text())["objective"] == "toy"
    run(train_mnist, small_mnist, out, "--batch-size", "16", "--iters", "3", "--objective", "toy", "--anneal-power",
        "3", "--resume")
    assert len(loss_column(out)) == 3
    with pytest.raises(SystemExit) as e:                  # the table's keys are the flag's choices
        run(train_mnist, small_mnist, tmp_path / "x", "--objective", "nope")
    assert e.value.code == 2
