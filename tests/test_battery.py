"""Issue 20's hostile battery: every flag of every script's parser, read from the parser itself, gets
bad values (0, -1, nan, inf, 2^64, empty, a folder, a missing file, a text file, random bytes). Each
run either finishes (a value that is fine there: tiny settings) or is refused with status 1 or 2 in
one line; never a traceback, never a file written outside the run's own output, never an input
changed. A new flag joins the battery by being in a parser."""
import argparse
import contextlib
import importlib
import os
import signal

import pytest

from conftest import DATA, write_mnist

CHECKPOINT = os.path.join(DATA, "official_mnist_ngf4.pth")
TINY_SAMPLING = ["--checkpoint", CHECKPOINT, "--n", "1", "--steps-each", "1", "--device", "cpu"]
SCRIPTS = {   # script: the least it needs, tiny, with every output under OUT ("{out}")
    "toy_gmm": ["--iters", "2", "--batch-size", "8", "--out", "{out}"],
    "langevin_compare": ["--n", "16", "--steps", "2", "--steps-each", "2", "--out", "{out}"],
    "manifold": ["--data-root", "{data}", "--iters", "2", "--batch-size", "4", "--nef", "4", "--device", "cpu",
                 "--out", "{out}"],
    "train_mnist": ["--data-root", "{data}", "--ngf", "4", "--batch-size", "8", "--iters", "1", "--n-samples", "1",
                    "--steps-each", "1", "--num-workers", "0", "--device", "cpu", "--out", "{out}"],
    "sample": [*TINY_SAMPLING, "--out", "{out}"],
    "evaluate": [*TINY_SAMPLING, "--metrics", "none", "--out", "{out}"],
    "inpaint": ["--checkpoint", CHECKPOINT, "--data-root", "{data}", "--n-images", "1", "--completions", "1",
                "--steps-each", "1", "--device", "cpu", "--out", "{out}"],
    "likelihood": ["--checkpoint", "{edm}", "--data-root", "{data}", "--n", "1", "--batch-size", "1", "--solver",
                   "heun", "--steps", "1", "--device", "cpu", "--out", "{out}"],
    "metrics": ["--images", "{images}", "--metrics", "none", "--json", "{out}/m.json", "--device", "cpu"],
    "bench": ["--configs", "mnist", "--batch-size", "1", "--warmup", "1", "--repeats", "1", "--device", "cpu",
              "--json", "{out}/b.json"],
}
NUMBERS = ["0", "-1", "nan", "inf", str(2 ** 64), ""]
PATHS = ["", "{folder}", "{missing}", "{text}", "{random}"]
OUTPUTS = {"--out": ["", "{text}"], "--json": ["", "{folder}"],       # where a run writes: a folder or a new
           "--cache": ["", "{text}"], "--ref-cache": ["", "{text}"],  # file is fine there, these are not
           "--classifier-cache": ["", "{text}"]}
SECONDS = 60      # a value that makes a tiny run take longer than this was not refused when it should be


class _Parser(Exception):
    pass


def parser_of(script):
    """The script's own parser, caught as main() parses."""
    module = importlib.import_module(script)
    def catch(self, *a, **k):
        raise _Parser(self)
    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = catch
    try:
        module.main([])
    except _Parser as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{script}.main did not parse its flags")


def cases(script):
    """(flag, value) pairs: numbers for flags of a number type, paths for the others, nonsense for choices."""
    for action in parser_of(script)._actions:
        if not action.option_strings or action.nargs == 0 or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1]
        if flag in OUTPUTS:
            yield from ((flag, v) for v in OUTPUTS[flag])
        elif action.choices:
            yield from ((flag, v) for v in ["", "nonsense"])
        elif action.type not in (None, str):
            yield from ((flag, v) for v in NUMBERS)
        else:
            yield from ((flag, v) for v in PATHS)


ALL = [(s, f, v) for s in SCRIPTS for f, v in cases(s)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "folder").mkdir()
    (root / "text.txt").write_text("not what you think\n")
    (root / "random.bin").write_bytes(os.urandom(4096))
    images = root / "images"
    images.mkdir()
    from PIL import Image
    Image.new("L", (28, 28), 128).save(images / "0.png")
    mnist = write_mnist(str(root / "mnist"), n_train=16, n_test=8)
    import train_mnist                              # a network that takes any sigma, for likelihood.py
    train_mnist.main(["--data-root", mnist, "--out", str(root / "edm"), "--recipe", "edm", "--ngf", "4", "--iters", "1",
                      "--batch-size", "8", "--num-workers", "0", "--n-samples", "1", "--device", "cpu"])
    return dict(data=mnist, folder=str(root / "folder"), missing=str(root / "missing.pt"), text=str(root / "text.txt"),
                random=str(root / "random.bin"), images=str(images), edm=str(root / "edm" / "checkpoint.pt"))


def snapshot(root):
    """Every file under root with its size and modification time."""
    return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
            for d, _, files in os.walk(root) for f in files}


@contextlib.contextmanager
def time_limit(seconds):
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("script,flag,value", ALL, ids=[f"{s}{f}={v!r}" for s, f, v in ALL])
def test_a_bad_value_is_refused_in_one_line_or_harmless(script, flag, value, inputs, tmp_path, monkeypatch,
                                                           capsys, offline):
    monkeypatch.chdir(tmp_path)                     # a default output folder would land here: outside "out"
    out = tmp_path / "out"
    fill = lambda a: a.format(out=out, **inputs)
    base, args = [fill(a) for a in SCRIPTS[script]], []
    i = 0
    while i < len(base):                            # the flag under test replaces its value in the base
        if base[i] == flag:
            i += 1
            while i < len(base) and not base[i].startswith("--"):
                i += 1
        else:
            args.append(base[i])
            i += 1
    before = snapshot(os.path.dirname(inputs["folder"]))
    code = 0
    with time_limit(SECONDS):
        try:
            importlib.import_module(script).main([*args, flag, fill(value)])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            message = str(e.code) if isinstance(e.code, str) else None
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code:
        assert code in (1, 2), (code, err[-500:])
        lines = [message] if message else [line for line in err.splitlines() if line.strip()][-1:]
        assert lines and "\n" not in lines[0] and lines[0].strip(), err[-500:]
    outside = [p for p in os.listdir(tmp_path) if p != "out"]
    assert outside == [], f"wrote {outside} outside the run's output"
    assert snapshot(os.path.dirname(inputs["folder"])) == before, "an input changed"
