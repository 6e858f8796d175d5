"""checkpoints.load: our files, official files, and every kind of bad file gets one clear line."""
import errno
import os

import pytest
import torch

import checkpoints
import common
import utils
from conftest import DATA


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


class Payload:
    """Pickling this object would run code on load with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_args": {}, "x": Payload(str(marker))}, bad)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load(bad)
    assert "refused" in _one_line(e) and str(bad) in _one_line(e)
    assert not marker.exists()


def test_random_file_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "random.pt"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(checkpoints.CheckpointError, match="not a PyTorch checkpoint") as e:
        checkpoints.load(bad)
    _one_line(e)


def test_missing_file_and_foreign_objects(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no such checkpoint"):
        checkpoints.load(tmp_path / "nope.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(checkpoints.CheckpointError, match="not an NCSN checkpoint") as e:
        checkpoints.load(other)
    _one_line(e)


def test_wrong_shape_official_state_dict(tmp_path):
    state, opt = torch.load(os.path.join(DATA, "official_mnist_ngf4.pth"), weights_only=True)
    state["module.res2.1.conv1.weight"] = torch.zeros(8, 8, 5, 5)
    bad = tmp_path / "shape.pth"
    torch.save([state, opt], bad)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load(bad)
    msg = _one_line(e)
    assert "res2.1.conv1.weight" in msg and "(8, 8, 5, 5)" in msg and "(8, 8, 3, 3)" in msg


def test_our_checkpoint_of_another_size_is_refused(tmp_path):
    net = common.RefineNet(1, 8)
    bad = tmp_path / "ours.pt"
    checkpoints.write_checkpoint({"model": net.state_dict(), "model_args": dict(net.model_args, ngf=16)}, bad)
    with pytest.raises(checkpoints.CheckpointError, match="ngf=16") as e:
        checkpoints.load(bad)
    _one_line(e)
    del_one = dict(net.state_dict())
    del_one.pop("end_conv.bias")
    checkpoints.write_checkpoint({"model": del_one, "model_args": net.model_args}, bad)
    with pytest.raises(checkpoints.CheckpointError, match="1 missing") as e:
        checkpoints.load(bad)


def test_our_checkpoint_round_trip_and_ema_choice(tmp_path):
    torch.manual_seed(0)
    net = common.RefineNet(3, 8).eval()
    ema = common.RefineNet(3, 8).eval()
    path = tmp_path / "ckpt.pt"
    checkpoints.write_checkpoint({"model": net.state_dict(), "ema": ema.state_dict(), "model_args": net.model_args,
                        "step": 7, "config": {"sigma_begin": 1.0, "sigma_end": 0.01, "num_levels": 10}}, path)
    x, labels = torch.rand(2, 3, 32, 32), torch.tensor([1, 8])
    with torch.no_grad():
        ck = checkpoints.load(path)
        assert torch.equal(ck.model(x, ck.sigmas[labels]), ema(x, labels))    # EMA by default when present
        raw = checkpoints.load(path, ema=False)
        assert torch.equal(raw.model(x, raw.sigmas[labels]), net(x, labels))
    assert ck.ema and not raw.ema and ck.step == 7 and ck.sigma_end == pytest.approx(0.01)
    assert ck.model_args == net.model_args and ck.format == "ncsn-repro" and ck.shape == (3, 32, 32)
    assert ck.dataset == "cifar10" and ck.sampler == "als" and not ck.any_sigma      # what a file without them means
    checkpoints.write_checkpoint({"model": net.state_dict(), "ema": None, "model_args": net.model_args}, path)
    with pytest.raises(checkpoints.CheckpointError, match="EMA weights asked for"):
        checkpoints.load(path, ema=True)


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoints.write_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.write_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]                         # no temporary file left behind


def test_atomic_path_removes_the_temporary_file_of_a_failed_write(tmp_path):
    path = tmp_path / "figure.png"
    with pytest.raises(RuntimeError):
        with utils.atomic_path(path) as tmp:
            assert tmp.endswith("figure.png") and os.path.dirname(tmp) == str(tmp_path)   # same folder, same extension
            open(tmp, "w").write("partial")
            raise RuntimeError("plotting failed")
    assert os.listdir(tmp_path) == []


def test_a_truncated_checkpoint_names_the_snapshot_beside_it_in_one_whole_line(tmp_path):
    net = common.RefineNet(in_channels=1, ngf=4, num_classes=3, image_size=8)
    whole = tmp_path / "checkpoint_200.pt"
    checkpoints.write_checkpoint(dict(model=net.state_dict()), whole)
    cut = tmp_path / "checkpoint.pt"
    cut.write_bytes(whole.read_bytes()[:3000])                      # a copy cut short
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.read_checkpoint(cut)
    msg = str(e.value)
    _one_line(e)
    assert "truncated" in msg and "checkpoint_200.pt beside it is a whole snapshot of step 200" in msg
    assert msg.count("(") == msg.count(")")                          # the reason is not cut mid-sentence


def test_a_failed_write_names_the_file_it_was_writing(tmp_path, monkeypatch):
    """A full disk reports "No space left on device" without a file name; the error names it."""
    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    target = tmp_path / "checkpoint.pt"
    with pytest.raises(OSError) as e:
        checkpoints.write_checkpoint({"x": torch.zeros(1)}, target)
    assert e.value.filename == str(target) and e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []                                # no temporary file is left
