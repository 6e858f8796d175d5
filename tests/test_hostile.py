"""Bad values for flags that every script shares: refused with status 2 and one line, before any file
is written (with tests/test_battery.py)."""
import contextlib
import glob
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import checkpoints
import data
import evaluate
import manifold
import metrics
import health
import sample
import samplers
import train
import train_mnist
import utils
from conftest import DATA, ROOT, write_mnist

CHECKPOINT = f"{DATA}/official_mnist_ngf4.pth"
SCRIPTS = {   # script: the least it needs besides the flag under test
    "toy_gmm": [], "langevin_compare": [], "manifold": [], "train_mnist": [],
    "sample": ["--checkpoint", CHECKPOINT], "evaluate": ["--checkpoint", CHECKPOINT],
    "inpaint": ["--checkpoint", CHECKPOINT],
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("value", [str(2 ** 63), str(2 ** 64), "-1", "1.5", "nan", ""])
def test_a_seed_out_of_range_is_one_line_and_writes_nothing(script, value, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main([*SCRIPTS[script], "--seed", value, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "--seed" in err[-1] and "seed" in err[-1].split("--seed")[1]
    assert "Traceback" not in "\n".join(err) and not out.exists()


def test_a_second_writer_of_a_folder_is_refused_naming_the_first(tmp_path):
    """Two runs into one --out: the second is refused in one line that names the first, and writes nothing;
    the lock dies with its holder, so a killed run leaves none behind."""
    root = write_mnist(str(tmp_path / "data"), n_train=32, n_test=8)
    out = tmp_path / "run"
    with utils.folder_lock(str(out)):
        with pytest.raises(SystemExit) as e:
            train_mnist.main(["--data-root", root, "--out", str(out), "--ngf", "4", "--num-workers", "0",
                              "--batch-size", "8", "--iters", "1", "--device", "cpu"])
        assert f"{out} is being written by process {os.getpid()}" in str(e.value) and "\n" not in str(e.value)
        assert os.listdir(out) == [".lock"]
    base = ["--checkpoint", CHECKPOINT, "--n", "2", "--steps-each", "1", "--device", "cpu",
            "--out", str(tmp_path / "e")]
    [r] = sample.main(base)
    with utils.folder_lock(r["folder"]):
        for main in (sample.main, evaluate.main):
            with pytest.raises(SystemExit, match="is being written by process"):
                main([*base, "--n", "4", *(["--metrics", "none"] if main is evaluate.main else [])])
    assert len([f for f in os.listdir(r["folder"]) if f.startswith("shard_")]) == 1
    # a holder killed with -9 releases the folder
    hold = f"import utils, time\nwith utils.folder_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(utils.FolderBusy, match=f"process {holder.pid}"):
        with utils.folder_lock(str(out)):
            pass
    holder.kill(), holder.wait()
    with utils.folder_lock(str(out)):
        pass


def test_numbers_describe_exactly_the_samples_named(tmp_path, monkeypatch):
    """A later run with a smaller --n reports no score made on more samples, and the health report counts
    the first n samples only, even inside a larger shard; overlapping shards are read once."""
    grey = lambda batches: dict(mean_grey=torch.cat(list(batches)).double().mean().item())
    make = lambda opts, dataset, device: grey
    monkeypatch.setitem(metrics.SCORERS, "grey", metrics.Scorer(make, (("grey", metrics._number("mean_grey")),), ()))
    base = ["--checkpoint", CHECKPOINT, "--steps-each", "1", "--device", "cpu", "--out", str(tmp_path / "e")]
    [r8] = evaluate.main([*base, "--n", "8", "--metrics", "grey"])
    [r4] = evaluate.main([*base, "--n", "4", "--metrics", "none"])
    assert "mean_grey" in r8 and "mean_grey" not in r4 and r4["n"] == 4 and r4["samples_made_now"] == 0
    # one shard of 8 samples, 3 of them made NaN by hand: --n 1 counts sample 0 alone
    [shard] = [f for f in os.listdir(r8["folder"]) if f.startswith("shard_")]
    path = os.path.join(r8["folder"], shard)
    with np.load(path) as f:
        arrays = dict(f)
    arrays["non_finite_each"] = np.array([False, True, True, False, True, False, False, False])
    np.savez(path, **arrays)
    means = lambda n: health.health_means(sample.covering(r8["folder"], n))
    assert means(1)[-1] == 0 and means(8)[-1] == 3
    assert means(3)[-1] == 2
    norm_1 = means(1)[0]
    assert np.allclose(norm_1, arrays["health"][0, 0])                 # sample 0's own score norms
    # a shard overlapping it (another batch size, by hand) is not read twice
    np.savez(os.path.join(r8["folder"], "shard_0000004_0000012.npz"), **{**arrays, "images": arrays["images"]})
    assert len(sample.collect(r8["folder"], 8)) == 8


@pytest.fixture
def digits(mnist_root):
    return mnist_root


def test_resume_refuses_a_different_run_and_allows_the_documented_changes(digits, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data-root", digits, "--out", str(out), "--ngf", "4", "--num-workers", "0", "--batch-size", "8",
            "--n-samples", "1", "--steps-each", "1", "--device", "cpu"]
    assert train_mnist.main([*base, "--iters", "2"]) == 2
    config = (out / "config.json").read_text()
    for flags, named in [(["--beta1", "0.5"], "--beta1 0.9"), (["--no-dequantize"], "--dequantize True"),
                         (["--lr", "2e-3"], "--lr 0.001"), (["--ema", "0.5"], "--ema 0.0"),
                         (["--recipe", "ncsnv2", "--conditioning", "norm"], "--recipe ncsn")]:
        with pytest.raises(SystemExit) as e:
            train_mnist.main([*base, "--iters", "3", "--resume", *flags])
        assert named in str(e.value) and "resume with the same values" in str(e.value) and "\n" not in str(e.value)
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
        assert (out / "config.json").read_text() == config                 # nothing rewritten as if it had run
    assert sorted(train.MAY_CHANGE) == sorted(set(train.MAY_CHANGE))
    assert train_mnist.main([*base, "--iters", "3", "--resume", "--num-workers", "1", "--snapshot-every", "7"]) == 3
    assert json.loads((out / "config.json").read_text())["num_workers"] == 1
    typo = tmp_path / "rnu"
    with pytest.raises(SystemExit) as e:
        train_mnist.main([*base[:2], "--out", str(typo), *base[4:], "--resume"])
    assert e.value.code == 2 and "holds no checkpoint.pt" in capsys.readouterr().err and not typo.exists()


def test_manifold_resume_refuses_other_settings_and_foreign_files(digits, tmp_path):
    out = tmp_path / "m"
    args = ["--data-root", digits, "--iters", "8", "--save-every", "4", "--nef", "8", "--batch-size", "4",
            "--device", "cpu", "--out", str(out)]
    manifold.main(args)
    for flags, named in [(["--lr", "0.01"], "--lr"), (["--noise-std", "0.5"], "--noise-std"),
                         (["--nef", "16"], "--nef"), (["--iters", "4"], "more than --iters 4")]:
        with pytest.raises(SystemExit) as e:
            manifold.main([*args, "--resume", *flags])
        assert named in str(e.value) and "\n" not in str(e.value) and "Traceback" not in str(e.value)
    manifold.main([*args[:2], "--iters", "12", *args[4:], "--resume"])      # a longer run: allowed
    torch.save({"iteration": 3}, out / "manifold.pt")                       # a foreign state
    with pytest.raises(SystemExit, match="not a state of manifold.py"):
        manifold.main([*args, "--resume"])


def tiny_checkpoint(path, **config):
    import common
    net = common.RefineNet(1, 4, 10, 28)
    checkpoints.write_checkpoint(dict(model=net.state_dict(), ema=None, model_args=net.model_args, step=0,
                                 config=dict(dict(dataset="mnist", sigma_begin=1.0, sigma_end=0.01, num_levels=10),
                                             **config)), path)
    return str(path)


@pytest.mark.parametrize("config, message", [(dict(sigma_begin="auto"), "are not numbers"),
                                             (dict(num_levels=1.5), "are not numbers"),
                                             (dict(dataset="svhn"), "names the data set 'svhn'")])
def test_a_checkpoint_with_bad_settings_is_one_line_in_every_script(config, message, tmp_path, capsys):
    import bench
    import inpaint
    ck = tiny_checkpoint(tmp_path / "ck.pt", **config)
    for main, extra in [(sample.main, []), (evaluate.main, ["--metrics", "none"]), (inpaint.main, []),
                        (bench.main, ["--device", "cpu"])]:
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", ck, *extra, *(["--out", str(tmp_path / "o")] if main is not bench.main else [])])
        text = str(e.value) if not isinstance(e.value.code, int) else capsys.readouterr().err.strip().splitlines()[-1]
        assert message in text and "Traceback" not in text, (main.__module__, text)


def test_any_n_needs_memory_of_the_shards_only(tmp_path):
    """--n 10^15: the plan of what to make is a generator; its count and first batch come at once."""
    t0 = time.time()
    count, runs = sample.missing_runs(str(tmp_path), [(0, 10 ** 15)], 100, None)
    assert count == 10 ** 15 and next(runs) == (0, 100) and next(runs) == (100, 200) and time.time() - t0 < 1


def test_bench_and_toy_refuse_in_one_line(tmp_path, capsys, monkeypatch):
    import bench
    import toy_gmm
    (tmp_path / "dir").mkdir()
    with pytest.raises(SystemExit) as e:
        bench.main(["--json", str(tmp_path / "dir"), "--device", "cpu"])
    assert e.value.code == 2 and "is a folder; give a file name" in capsys.readouterr().err
    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(toy_gmm, "train", oom)
    with pytest.raises(SystemExit, match="out of memory .*; use a smaller --batch-size"):
        toy_gmm.main(["--batch-size", "10000000", "--out", str(tmp_path / "t")])
    monkeypatch.setattr(bench, "bench_one", oom)
    with pytest.raises(SystemExit, match="out of memory .*; use a smaller --batch-size"):
        bench.main(["--batch-size", "4", "--device", "cpu", "--configs", "mnist"])


def interrupted(proc, signals):
    """Send `signals` to a running script, 1 ms apart; assert its one line and status 130. Returns its stderr."""
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.001)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == utils.EXIT_INTERRUPTED and "Traceback" not in err, err[-2000:]
    assert [line for line in err.splitlines() if line.startswith("interrupted by")] == \
        [f"interrupted by {signals[0].name}: files written before are whole; the same command continues where it can"]
    return err


SIGNALS = [[signal.SIGINT], [signal.SIGTERM], [signal.SIGHUP], [signal.SIGTERM, signal.SIGTERM],
           [signal.SIGINT, signal.SIGTERM]]


@pytest.mark.parametrize("signals", SIGNALS[:2], ids=lambda s: "-".join(x.name for x in s))
def test_a_signal_outside_a_script_s_own_handling_is_one_line_and_130(signals, digits, tmp_path):
    """inpaint.py had no handling at all (a KeyboardInterrupt traceback; SIGTERM: status 143). The other cases
    (SIGHUP, a second signal while the first is handled) go through the same wrapper: sample.py's and evaluate.py's
    test below."""
    proc = subprocess.Popen([sys.executable, "inpaint.py", "--checkpoint", CHECKPOINT, "--data-root", digits,
                             "--n-images", "2", "--completions", "2", "--steps-each", "100000", "--device", "cpu",
                             "--out", str(tmp_path / "i")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert "completions, mask" in proc.stdout.readline()               # start-up done: it is sampling
    time.sleep(1.0)
    interrupted(proc, signals)


@pytest.mark.parametrize("script, flags, signals", [("sample.py", [], SIGNALS[2]), ("sample.py", [], SIGNALS[4]),
                                                    ("evaluate.py", ["--metrics", "none"], SIGNALS[3])],
                         ids=["sample-SIGHUP", "sample-SIGINT-SIGTERM", "evaluate-SIGTERM-SIGTERM"])
def test_a_signal_while_sampling_is_one_line_and_130_and_keeps_the_folder(script, flags, signals, tmp_path):
    """sample.py and evaluate.py (one wrapper, utils.command) met by a closed terminal, Ctrl-C then SIGTERM and
    two SIGTERMs while sampling."""
    proc = subprocess.Popen([sys.executable, script, "--checkpoint", CHECKPOINT, "--n", "2", "--batch-size", "1",
                             "--steps-each", "100000", "--device", "cpu", "--out", str(tmp_path / "s"), *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / "s" / "**" / "samples.json"), recursive=True):   # sampling has begun
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    time.sleep(0.5)
    interrupted(proc, signals)
    [meta] = glob.glob(str(tmp_path / "s" / "**" / "samples.json"), recursive=True)
    assert "fingerprint" in json.loads(open(meta).read())           # the folder a rerun continues, whole


def test_the_one_wrapper_meets_sigterm_like_ctrl_c_and_user_errors_in_one_line(capsys):
    """utils.command runs every script's main: SIGTERM as Ctrl-C (130, one line, the handlers restored after),
    every user error class is one utils.UserError (one line, status 1), anything else stays a traceback."""
    old = signal.getsignal(signal.SIGTERM)
    @utils.command()
    def stopped():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    with pytest.raises(SystemExit) as e:
        stopped()
    assert e.value.code == 130 and signal.getsignal(signal.SIGTERM) is old
    assert capsys.readouterr().err.strip().startswith("interrupted by SIGTERM: files written before are whole")
    import inpaint
    for cls in (data.DataError, checkpoints.CheckpointError, train.TrainError, sample.Inapplicable,
                sample.StaleSamples, utils.FolderBusy, utils.Damaged):
        @utils.command()
        def bad():
            raise cls("what is wrong; what to do")
        with pytest.raises(SystemExit) as e:
            bad()
        assert issubclass(cls, utils.UserError) and str(e.value) == "error: what is wrong; what to do"
    @utils.command()
    def bug():
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        bug()
    scripts = [evaluate, inpaint, manifold, metrics, sample, train]
    assert all(m.main.__wrapped__ for m in scripts)          # each script's main is wrapped once


def test_a_signal_while_a_script_exits_is_ignored_not_reported_as_starting():
    """A script's handlers before main are startup.py's ("while starting: nothing was written"); restoring them
    when main ends let a second SIGTERM that came during the exit print that line after the real one (seen in CI).
    They become "ignore" instead; any other handler (a test calling main in-process) is restored as it was."""
    import startup
    @utils.command()
    def main(fail):
        if fail:
            raise utils.UserError("bad")
    old = signal.getsignal(signal.SIGTERM)
    try:
        for fail in (False, True):
            signal.signal(signal.SIGTERM, startup.quit_while_starting)
            with pytest.raises(SystemExit) if fail else contextlib.nullcontext():
                main(fail)
            assert signal.getsignal(signal.SIGTERM) is startup.ignore
        signal.signal(signal.SIGTERM, old)
        main(False)
        assert signal.getsignal(signal.SIGTERM) is old
    finally:
        signal.signal(signal.SIGTERM, old)


def test_damaged_stored_files_are_set_aside_and_made_again(tmp_path, monkeypatch, capsys):
    """A shard with flipped or cut bytes, a damaged samples.json or metrics.json, a killed writer's
    temporary file: named in one line, set aside (nothing deleted), remade; the samples equal the first run's."""
    grey = lambda batches: dict(mean_grey=torch.cat(list(batches)).double().mean().item())
    column = (("grey", metrics._number("mean_grey")),)
    monkeypatch.setitem(metrics.SCORERS, "grey", metrics.Scorer(lambda *a: grey, column, ()))
    base = ["--checkpoint", CHECKPOINT, "--steps-each", "1", "--device", "cpu", "--out", str(tmp_path / "e"),
            "--n", "4", "--batch-size", "2", "--metrics", "grey"]
    [r] = evaluate.main(base)
    folder = r["folder"]
    first = sample.collect(folder, 4).clone()
    a, b = sorted(f for f in os.listdir(folder) if f.startswith("shard_"))
    raw = open(os.path.join(folder, a), "rb").read()
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF                                     # inside the images' bytes
    open(os.path.join(folder, a), "wb").write(bytes(flipped))
    open(os.path.join(folder, b), "wb").write(raw[:len(raw) // 2])       # cut short
    open(os.path.join(folder, "samples.json"), "w").write('{"fingerprint": "ab')
    open(os.path.join(folder, "metrics.json"), "w").write("[1, 2]")                # JSON, but not an object
    open(os.path.join(folder, utils.TMP_PREFIX + "0a1b2c3d-shard_0000000_0000002.npz"), "wb").write(b"half")
    capsys.readouterr()
    [again] = evaluate.main(base)
    err = capsys.readouterr().err
    assert again["samples_made_now"] == 4 and again["mean_grey"] == r["mean_grey"]
    assert torch.equal(sample.collect(folder, 4), first)
    names = sorted(os.listdir(folder))
    for name in (a, b, "samples.json", "metrics.json"):
        assert name + ".damaged" in names and f"{name}: " in err and "set aside" in err
    assert not any(n.startswith(utils.TMP_PREFIX) for n in names)
    assert "Traceback" not in err


@pytest.mark.parametrize("script", ["train_mnist.py", "evaluate.py", "inpaint.py"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_a_script_imports_is_one_line_and_130(script, sig, tmp_path):
    """Ctrl-C or a pre-emption while torch is being imported: no KeyboardInterrupt traceback, no 143.
    The signal is sent once the process has mapped torch's library: mid-import, after startup.py."""
    proc = subprocess.Popen([sys.executable, script, "--out", str(tmp_path / "o")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while "libtorch" not in open(f"/proc/{proc.pid}/maps").read() and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == utils.EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines() == [f"interrupted by {sig.name} while starting: "
                                                                   "nothing was written"]
    assert not (tmp_path / "o").exists()


def test_bf16_on_a_cpu_without_native_bf16_is_named_at_start(digits, tmp_path, capsys, monkeypatch):
    cpu = torch.device("cpu")
    assert utils.slow_bf16(cpu, "flags : fpu sse2 avx2 fma") and "12x slower" in utils.slow_bf16(cpu, "avx2")
    assert utils.slow_bf16(cpu, "flags : avx2 avx512f avx512_bf16") is None
    assert utils.slow_bf16(cpu, "flags : avx2 amx_bf16 amx_tile") is None
    assert utils.slow_bf16(torch.device("meta")) is None
    monkeypatch.setattr(utils, "slow_bf16", lambda device, cpuinfo=None: "warning: bf16 crawls here")
    train_mnist.main(["--data-root", digits, "--out", str(tmp_path / "r"), "--ngf", "4", "--num-workers", "0",
                      "--batch-size", "8", "--iters", "1", "--n-samples", "1", "--steps-each", "1", "--device", "cpu",
                      "--amp", "bf16"])
    assert "warning: bf16 crawls here" in capsys.readouterr().out


def test_a_missing_data_set_suggests_only_flags_the_script_has(tmp_path, offline):
    """evaluate.py --level-loss reads the test split; evaluate.py has no --dataset-path, so its error must not
    suggest one (train.py's does)."""
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", CHECKPOINT, "--n", "1", "--steps-each", "1", "--metrics", "none",
                       "--level-loss", "4", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "e")])
    assert "mnist is not under --data-root" in str(e.value) and "--dataset-path" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        train_mnist.main(["--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "t"), "--ngf", "4"])
    assert "--dataset-path FOLDER" in str(e.value)


def test_out_of_memory_while_drawing_the_figures_names_n_samples(digits, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setitem(samplers.SAMPLERS, "als", samplers.SAMPLERS["als"]._replace(run=oom))
    with pytest.raises(SystemExit) as e:
        train_mnist.main(["--data-root", digits, "--out", str(tmp_path / "r"), "--ngf", "4", "--num-workers", "0",
                          "--batch-size", "8", "--iters", "2", "--n-samples", "200000", "--device", "cpu"])
    msg = str(e.value)
    assert "200000 images at step 2" in msg and "--n-samples" in msg and "--ngf" not in msg and "\n" not in msg
    assert os.path.isfile(tmp_path / "r" / "checkpoint.pt")          # the last step was saved before the figures


def test_a_garbage_ref_npz_is_refused_without_inviting_a_pickle(tmp_path):
    junk, pickled = tmp_path / "junk.npz", tmp_path / "pickled.npz"
    junk.write_bytes(os.urandom(2048))
    np.save(open(pickled, "wb"), np.array([{"mu": 1}], dtype=object), allow_pickle=True)
    for path in (junk, pickled):
        with pytest.raises(Exception) as e:
            metrics.read_stats(str(path))
        msg = str(e.value)
        assert f"--ref {path}" in msg and "not a readable .npz of statistics" in msg and "\n" not in msg
        assert "trust" not in msg and "allow_pickle" not in msg


def test_a_batch_that_does_not_split_is_a_flag_error_before_out_is_made(digits, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_mnist.main(["--data-root", digits, "--out", str(out), "--ngf", "4", "--batch-size", "8",
                          "--grad-accum", "3"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "--batch-size 8 must be divisible by processes x --grad-accum (3)" in err
    assert "e.g. --batch-size 6" in err and not out.exists()


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGHUP)])
def test_signals_that_come_together_end_in_one_line_and_no_traceback(first, second, capfd, monkeypatch):
    """A process group's signals arrive together: the first one's handler runs while the second is still pending.
    The handlers put in place meanwhile must be Python functions that ignore it: with SIG_IGN, CPython prints
    "Signal 15 ignored due to race condition" as a traceback (seen in CI, 1 run in about 10)."""
    unraisable = []                             # where CPython's "ignored due to race condition" goes
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(str(u.exc_value)))
    @utils.command()
    def main():
        both, me = {first, second}, threading.get_ident()
        signal.pthread_sigmask(signal.SIG_BLOCK, both)
        try:                                # sent to this thread alone (pytest's other threads would take them)
            signal.pthread_kill(me, first)
            signal.pthread_kill(me, second)
        finally:                            # both delivered at once, the lower number handled first; and never
            signal.pthread_sigmask(signal.SIG_UNBLOCK, both)     # left blocked: the subprocesses would inherit it
        time.sleep(1)
    with pytest.raises(SystemExit) as e:
        main()
    err = capfd.readouterr().err
    assert e.value.code == utils.EXIT_INTERRUPTED and f"interrupted by {min(first, second).name}" in err
    assert "race condition" not in err and "Traceback" not in err and unraisable == [], (err, unraisable)


def test_a_signal_the_process_was_started_ignoring_stays_ignored(tmp_path):
    """`nohup python sample.py ... &` ignores SIGHUP: closing the terminal must not stop the run (startup.py,
    utils.command and the training loop's StopSignal each leave SIG_IGN in place); SIGTERM still stops it."""
    def nohup():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    proc = subprocess.Popen([sys.executable, "sample.py", "--checkpoint", CHECKPOINT, "--n", "2", "--batch-size", "1",
                             "--steps-each", "100000", "--device", "cpu", "--out", str(tmp_path / "s")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=nohup)
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / "s" / "**" / "samples.json"), recursive=True):   # sampling has begun
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert proc.poll() is None                                      # still sampling
    interrupted(proc, [signal.SIGTERM])


def test_ignored_signals_stay_ignored_in_process_and_after_a_stop_and_while_finalizing():
    import startup
    old = {s: signal.getsignal(s) for s in startup.STOP_SIGNALS}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        seen = {}
        @utils.command()
        def main():
            seen["command"] = signal.getsignal(signal.SIGHUP)
            with utils.StopSignal():
                seen["loop"] = signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGTERM)
        main()
        assert seen["command"] is signal.SIG_IGN and seen["loop"][0] is signal.SIG_IGN
        assert seen["loop"][1] is not signal.SIG_IGN and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        # a stop signal came: when the loop ends, later ones are ignored (the exit is under way), not Ctrl-C's
        with utils.StopSignal() as stop:
            signal.raise_signal(signal.SIGTERM)
        assert stop.name == "SIGTERM" and signal.getsignal(signal.SIGTERM) is startup.ignore
        startup._ignore_while_finalizing()          # atexit's last: Python handlers would become SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for s, h in old.items():
            signal.signal(s, h)
