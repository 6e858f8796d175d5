"""Every command in the README and docs/ runs as written, as far as its flags go: each one parses
with its script's own parser (nothing is run)."""
import argparse
import glob
import importlib
import os
import re
import shlex

import pytest

import utils
from conftest import ROOT

COMMAND = re.compile(r"(?:python3?|torchrun(?: --[\w-]+(?: [\w:.-]+)?)*) (\w+)\.py\b([^`#|\n]*)")


def documented_commands():
    """(file, script, argument list) of every `python X.py ...` and `torchrun ... X.py ...` written
    in README.md and docs/*.md, continuation lines joined."""
    found = []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        text = re.sub(r"\\\n\s*", " ", open(path).read())
        text = re.sub(r"`[^`]+`", lambda m: re.sub(r"\s*\n\s*", " ", m.group(0)), text)   # inline code over lines
        for m in COMMAND.finditer(text):
            found.append((os.path.basename(path), m.group(1), m.group(2).strip()))
    return found


class Parsed(Exception):
    pass


def test_the_docs_hold_commands_of_every_tool():
    scripts = {s for _, s, _ in documented_commands()}
    assert {"toy_gmm", "train_mnist", "train_cifar", "sample", "metrics", "evaluate", "inpaint", "bench",
            "manifold", "mnist_classifier"} <= scripts


@pytest.mark.parametrize("where, script, args", documented_commands())
def test_documented_command_parses(where, script, args, monkeypatch):
    assert "..." not in args, f"{where}: `{script}.py {args}` is not a command one can run"
    real = argparse.ArgumentParser.parse_args
    def parse_then_stop(self, argv=None, namespace=None):
        real(self, argv, namespace)
        raise Parsed
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(utils, "device_name", lambda text: text)        # --device cuda parses on any machine
    module = importlib.import_module(script)
    with pytest.raises(Parsed):
        module.main(shlex.split(args))


TORCHRUN = re.compile(r"torchrun ((?:--[\w-]+(?: [\w:.-]+)? )*)(\w+\.py)\b([^`#|\n]*)")


@pytest.mark.parametrize("where, command", [(os.path.basename(p), m.group(0)) for p in
                                            [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs",
                                                                                               "*.md"))]
                                            for m in TORCHRUN.finditer(open(p).read())] +
                         [(f, m.group(0)) for f in sorted(glob.glob(os.path.join(ROOT, "*.py")))
                          for m in TORCHRUN.finditer(open(f).read())])
def test_documented_torchrun_commands_reach_the_script_whole(where, command):
    """torchrun's own parser takes abbreviations of its flags anywhere on the line: `--n 500` after the script
    is refused there as ambiguous (--nnodes, --nproc-per-node, ...). Each documented command must hand its
    script every argument as written."""
    from torch.distributed.run import get_args_parser
    m = TORCHRUN.match(command)
    words = shlex.split(command)[1:]
    parsed = get_args_parser().parse_args(words)
    assert parsed.training_script == m.group(2) and parsed.training_script_args == shlex.split(m.group(3)), where


def test_lines_are_within_120_characters():
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))
    files = [f for f in files if not f.endswith("test_official.py")]     # the equivalence tests stay as written
    long = [f"{os.path.basename(f)}:{i}" for f in files for i, line in enumerate(open(f), 1)
            if len(line.rstrip("\n")) > 120]
    assert long == []
