"""What every script needs around the paper: devices, files written atomically, flag types, stable
seeds and per-sample noise, processes (torchrun), the one wrapper of every script's main (stop
signals, one-line errors, exit statuses), figures. Module level imports: torch and the standard
library (PIL and matplotlib are imported on use). The paper is common.py; data sets data.py.
"""
import os
import re
import json
import math
import hashlib
import argparse
import datetime
import signal
import sys
import secrets
import tempfile
import contextlib
import functools

import torch

import startup
from startup import EXIT_INTERRUPTED, STOP_SIGNALS   # 130: stopped outside training's loop; by these signals

#----------------------------------------------------------------------------
# Errors a user can fix, and files written atomically.

class UserError(Exception):
    """Bad input or a state of the files that the user can fix: every script turns it into one line
    ("error: <message>") and exit status 1. The message names the problem and the fix."""


class FolderBusy(UserError):
    """An output folder that another process is writing; the message names it."""


class Damaged(UserError):
    """A stored file that cannot be read back whole (truncated, flipped bytes, not its format)."""


TMP_PREFIX = ".tmp-"     # atomic_path's temporary files: TMP_PREFIX + 8 hex digits + "-" + final name


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same extension); when the block succeeds it replaces
    `path`, when it fails it is removed: a crash never leaves half a file. Created with the umask."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{secrets.token_hex(4)}-{name}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:    # a full disk says "No space left on device" without a file name: name it
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), path) from e
    except RuntimeError as e:   # torch.save's writer reports a failed write as a RuntimeError
        if "write" not in str(e):
            raise
        raise OSError(getattr(e, "errno", None) or 5, f"write failed ({str(e).splitlines()[0][:60]})", path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

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


@contextlib.contextmanager
def folder_lock(folder):
    """One writer per output folder: an exclusive flock on <folder>/.lock, which names its holder. The
    system drops it when the process ends, however it ends, so a killed run leaves no stale lock."""
    import fcntl
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise FolderBusy(f"{folder} is being written by {holder}; wait for it to end, or use another --out") from None
    f.seek(0), f.truncate()
    f.write(f"process {os.getpid()} ({' '.join(sys.argv)[:200]})\n"), f.flush()
    try:
        yield
    finally:
        f.close()


def remove_temporaries(folder):
    """Remove the temporary files that atomic_path left in `folder` when its process was killed (call
    it where this process is the folder's one writer). Returns the bytes freed."""
    freed = 0
    for name in os.listdir(folder):
        if re.fullmatch(re.escape(TMP_PREFIX) + r"[A-Za-z0-9_]{8}-.+", name):
            freed += os.path.getsize(os.path.join(folder, name))
            os.remove(os.path.join(folder, name))
    return freed


def name_problem(path, flag="--out"):
    """Why the file system cannot hold `path` (a name in it longer than its limit, usually 255 bytes), in one line
    naming the fix; None when it can. Nothing is made: output folders derived from a checkpoint's name and the
    sampler settings are checked before any work."""
    parent = os.path.abspath(path)
    while not os.path.isdir(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = -1
    limit = limit if limit > 0 else 255                  # -1: the system sets no limit it can tell
    for name in os.path.abspath(path).split(os.sep):
        if len(os.fsencode(name)) > limit:
            fix = f"give a shorter {flag}" if flag.startswith("--") else "give a shorter --out"
            return (f"{flag}: the name {name[:30]}... ({len(os.fsencode(name))} bytes) is longer than the file "
                    f"system's {limit}; {fix}, or rename the checkpoint to a shorter name")
    return None


def check_file_out(path, flag="--json"):
    """None when `path` can be written as a file (checked before the work it records); else why not, in one line."""
    if os.path.isdir(path):
        return f"{flag} {path} is a folder; give a file name, e.g. {os.path.join(path, 'results.json')}"
    return name_problem(path, flag) or check_out(os.path.dirname(os.path.abspath(path)), f"{flag}'s folder")


def check_out(path, flag="--out"):
    """None when `path` is, or can be made, a writable folder; else why not, in one line."""
    if problem := name_problem(path, flag):
        return problem
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path} is a file, not a folder; choose another {flag}"
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return f"{flag} {path}: cannot write there ({e.strerror or e}); choose a writable folder"
    return None


def slow_bf16(device, cpuinfo=None):
    """Why --amp bf16 would crawl on `device`, or None: a CPU without native bf16 (no avx512_bf16 or
    amx_bf16 flag, e.g. an AVX2-only EPYC) emulates it, about 12x slower than fp32 (docs/speed.md)."""
    if device.type != "cpu":
        return None
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None                     # not Linux: nothing to tell
    if re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo):
        return None
    return ("warning: --amp bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 flag): emulated, "
            "about 12x slower than fp32 here; drop --amp on this machine")


def is_out_of_memory(e):
    """Whether an exception is torch running out of memory (CUDA's error, or the CPU allocator's)."""
    return isinstance(e, torch.OutOfMemoryError) or bool(re.search(r"out of memory|can't allocate memory", str(e)))


def is_lost_peer(e):
    """Whether an exception is a collective failing because another process of a torchrun run has gone (killed,
    or ended by its own error) or stopped answering: a RuntimeError of gloo's connection closed or reset, NCCL's
    communicator aborted, a collective timed out."""
    lost = r"[Cc]onnection (closed|reset) by peer|communicator was aborted|[Tt]imed out"
    return torch.distributed.is_initialized() and isinstance(e, RuntimeError) and (
        isinstance(e, torch.distributed.DistError) or bool(re.search(lost, str(e))))


def first_line(e):
    """An exception's message cut to its first line (120 characters), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


def save_json(obj, path):
    """Write JSON atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def read_npz(path, keys=None):
    """The arrays `keys` (default: all) of an .npz written by this project, each read whole (its CRC
    checked); Damaged names the file and why when that fails. Pickled objects are never loaded."""
    import zipfile
    import numpy as np
    try:
        with np.load(path) as f:
            return {k: f[k] for k in (f.files if keys is None else keys) if k in f.files}
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError) as e:
        why = "not an .npz archive" if "pickle" in str(e) else first_line(e)[:80]
        raise Damaged(f"{path}: {why}") from None


def read_json(path):
    """A JSON object written by this project; Damaged when it cannot be parsed or is not an object."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise Damaged(f"{path}: {first_line(e)[:80]}") from None
    if not isinstance(obj, dict):
        raise Damaged(f"{path}: a JSON {type(obj).__name__}, not an object")
    return obj


def whole_or_none(read, path, *args):
    """read(path, *args) (read_json, read_npz), or None when the file is damaged: then it is set aside
    (set_aside), to be made again."""
    try:
        return read(path, *args)
    except Damaged as e:
        set_aside(path, f"{e}: damaged")
        return None


def set_aside(path, why):
    """Rename a damaged file to <path>.damaged (or .damaged-2, ...) so that it is made again and
    nothing is deleted; says so in one line."""
    new, k = path + ".damaged", 1
    while os.path.exists(new):
        k += 1
        new = f"{path}.damaged-{k}"
    os.replace(path, new)
    print(f"warning: {why}; set aside as {os.path.basename(new)}, made again", file=sys.stderr, flush=True)
    return new


def _number(cast, what, ok=lambda v: True):
    """An argparse type: `text` as a finite number (cast) for which ok(value) holds, else refused with
    a message naming what was expected and the value given. Integers stay below 2^63 (int64: torch's
    integers and stable_seed's, and any run's length)."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if cast is int and value >= 2 ** 63:
            raise argparse.ArgumentTypeError(f"expected {what} below 2^63, got {text}")
        if not (cast is int or math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


positive_int = _number(int, "a positive integer", lambda v: v > 0)
count = _number(int, "an integer >= 0", lambda v: v >= 0)
seed = _number(int, "a seed, an integer from 0 to 2^63 - 1", lambda v: v >= 0)
positive_float = _number(float, "a positive number", lambda v: v > 0)
nonnegative_float = _number(float, "a number >= 0", lambda v: v >= 0)
finite_float = _number(float, "a finite number")
rate = _number(float, "a rate in [0, 1)", lambda v: 0 <= v < 1)


MAX_SETS = 10_000        # --seeds A-B:S: the most sets one range is cut into


def seed_ranges(text):
    """argparse type for --seeds (EDM's seed ranges, image indices here): 'A-B' (inclusive) is one set, 'A' a set
    of one, 'A-B:S' the range cut into consecutive sets of S ('0-2999:1000' = 0-999 1000-1999 2000-2999). Returns
    [(lo, hi)], half-open."""
    m = re.fullmatch(r"(\d+)(?:-(\d+))?(?::(\d+))?", text.strip())
    lo, hi, size = (None, None, None) if m is None else (int(m[1]), int(m[2] or m[1]) + 1, int(m[3] or 0))
    if m is None or hi <= lo or hi > 2 ** 63 or (m[3] and (size == 0 or (hi - lo) % size)):
        raise argparse.ArgumentTypeError(f"expected seed ranges A-B (A <= B, inclusive), A, or A-B:S (S dividing "
                                         f"the B - A + 1 seeds), got {text!r}")
    if size and (hi - lo) // size > MAX_SETS:
        raise argparse.ArgumentTypeError(f"{text}: {(hi - lo) // size:,} sets; at most {MAX_SETS:,} (a larger S)")
    return [(a, min(a + (size or hi - lo), hi)) for a in range(lo, hi, size or hi - lo)]


def number_or_auto(parse):
    """argparse type: `parse`'s value, or the word 'auto' (an NCSNv2 technique chooses the value)."""
    return lambda text: "auto" if text == "auto" else parse(text)


def device_name(text):
    """argparse type for --device: auto, cpu, cuda or cuda:N, refused at once when not available."""
    try:
        get_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except None and False (the help says what they mean)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, refusing an empty value for any flag that takes a path or a name (a flag of
    type str): '' would mean the current folder, or no file at all."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        for a in self._actions:
            value = getattr(ns, a.dest, None) if a.option_strings and a.type in (None, str) else None
            if value == "" or (isinstance(value, list) and "" in value):
                self.error(f"argument {a.option_strings[-1]}: an empty value; give a path or name, or leave the "
                           "flag out")
        return ns, rest


def arg_parser(doc):
    """A script's ArgumentParser: the first paragraph of its docstring, defaults shown."""
    return ArgumentParser(description=doc.split("\n\n")[0], formatter_class=HelpFormatter)


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


def changed_settings(saved, now, may_change, default=lambda key: None):
    """The one rule of every resumable script: the settings of `now` (a dict) other than `may_change`
    that differ from `saved` (the run's stored ones; a key an older file lacks takes default(key)),
    as '--flag saved (flags: now)' strings. Empty when the run may continue."""
    return [f"--{k.replace('_', '-')} {saved.get(k, default(k))} (flags: {v})" for k, v in now.items()
            if k not in may_change and saved.get(k, default(k)) != v]


def checkpoint_name(path):
    """<folder>_<file> of a checkpoint path (runs/mnist/checkpoint.pt -> mnist_checkpoint): its outputs' folder name."""
    return f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}_{os.path.splitext(os.path.basename(path))[0]}"


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

def any_rank(flag, world, device):
    """Whether `flag` holds on any process (a MAX all-reduce that every rank must join); alone, flag itself."""
    if world == 1:
        return flag
    t = torch.tensor([flag], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def collective(work, rank, world, device, everyone=False):
    """work() on rank 0 (every rank with `everyone`), then every rank learns whether it failed on any: the rank that
    failed raises its error, the others a UserError saying so, so no rank waits on a peer that has left. Returns
    work()'s value (None where it did not run). One process: work() itself."""
    value, error = None, None
    if rank == 0 or everyone:
        try:
            value = work()
        except Exception as e:                  # a UserError, OSError, out of memory: re-raised below
            error = e
    if any_rank(error is not None, world, device) and error is None:
        raise UserError("another process stopped with an error (its message is above); files written before are whole")
    if error is not None:
        raise error
    return value


def shared_folder(folder, rank, world, device, prepare, listing, work, finish):
    """The one way one or several processes fill an output folder (its name checked by the caller, name_problem,
    before any folder's work): rank 0 takes it (its lock; the temporary files of a killed writer removed; then
    prepare(): set damaged files aside), every rank lists what is there (listing()) and none writes before all
    have, every rank does its share (work(listed)), then rank 0 alone returns finish(work's value); None on the
    other ranks. A failure on any rank stops every rank (collective)."""
    with contextlib.ExitStack() as held:
        def take():
            held.enter_context(folder_lock(folder))
            remove_temporaries(folder)
            prepare()
        collective(take, rank, world, device)
        listed = collective(listing, rank, world, device, everyone=True)
        done = collective(lambda: work(listed), rank, world, device, everyone=True)
        return collective(lambda: finish(done), rank, world, device)


def quiet_other_ranks():
    """Under torchrun, ranks other than 0 print nothing to stdout (their errors still reach stderr)."""
    if int(os.environ.get("RANK", "0")):
        sys.stdout = open(os.devnull, "w")


def ignore_stop_signals(*_):
    """A worker's initialiser (data loaders): SIGINT / SIGTERM / SIGHUP are for the main process alone. A
    cluster's pre-emption, Ctrl-C and a closed terminal signal the whole process group; workers that died of it
    would end the run with a DataLoader error before the main process could save."""
    for s in STOP_SIGNALS:
        signal.signal(s, startup.ignore)


def leave_group_if_unhandled(e):
    """Under torchrun, an exception that command() does not turn into one line (a bug's traceback, argparse's exit
    after the group was joined) still leaves the process group before the process ends: without it gloo can abort
    the interpreter, and the other ranks learn nothing."""
    handled = (KeyboardInterrupt, UserError, OSError)
    if not torch.distributed.is_initialized() or isinstance(e, handled) or is_out_of_memory(e) or is_lost_peer(e):
        return
    if isinstance(e, SystemExit):
        dist_exit(e.code if isinstance(e.code, int) else 1, barrier=False)
    import traceback
    traceback.print_exc()
    dist_exit(1, barrier=False)


def broadcast(obj, world):
    """Rank 0's picklable `obj` on every rank (one process: obj itself)."""
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def same_on_every_rank(value, what, rank, world, device):
    """Refuse, on every rank, a `value` that differs from rank 0's (what the processes planned)."""
    first = broadcast(value, world)
    def check():
        if value != first:
            raise UserError(f"this process planned other {what} than rank 0 (did a checkpoint change while the "
                            "processes started?); run again")
    collective(check, rank, world, device, everyone=True)


def _interrupt(signum, frame):
    """command()'s SIGINT / SIGTERM / SIGHUP: stop at once, as Ctrl-C. Further stop signals are ignored
    meanwhile, so a second one cannot cut the unwinding (atomic writes, the folder lock) or the closing line short."""
    for s in STOP_SIGNALS:
        signal.signal(s, startup.ignore)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def command(oom="use a smaller --batch-size"):
    """The one wrapper of every script's main(argv=None). SIGTERM (a cluster's pre-emption, a
    `timeout`) and SIGHUP (a closed terminal or ssh session) are met like Ctrl-C, and any of them that
    the script does not handle itself ends it with one line and status 130 (later ones ignored
    meanwhile); a UserError or a failed write (OSError) is one line and status 1, as is running out
    of memory, with `oom` as the fix, and a torchrun process whose peer has gone. Flag errors stay argparse's
    (status 2); a stopped training exits 3 itself. Every file is written atomically, so what was written
    before is whole. Under torchrun the process leaves its group before it exits. The signal handlers are restored
    when main returns (tests call main in-process), except startup.py's: a script is then ending,
    and a signal during its exit is ignored rather than reported as one "while starting"."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            import threading
            signals = threading.current_thread() is threading.main_thread()
            old = {s: signal.getsignal(s) for s in startup.takeable()} if signals else {}
            for s in old:                                   # startup.py's quiet exit until now
                signal.signal(s, _interrupt)
            code = 1
            try:
                try:
                    return main(*args, **kwargs)
                except BaseException as e:
                    leave_group_if_unhandled(e)
                    raise
            except KeyboardInterrupt as e:
                message, code = (f"interrupted by {str(e) or 'SIGINT'}: files written before are whole; the same "
                                 "command continues where it can"), EXIT_INTERRUPTED
            except UserError as e:
                message = f"error: {e}"
            except OSError as e:
                message = f"error: {e.filename or ''}: {e.strerror or e}; files written before are intact"
            except RuntimeError as e:
                if is_lost_peer(e):             # gloo's message after its source location, "[.../pair.cc:561] "
                    why = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [""])[0])
                    message = (f"error: another process of this torchrun run has gone or stopped answering "
                               f"({why.split('. ')[0][:80]}); files written before are whole: run the command again "
                               "(training: with --resume)")
                elif is_out_of_memory(e):
                    message = f"error: out of memory ({first_line(e)[:80]}); {oom}"
                else:
                    raise
            finally:
                for s, h in old.items():
                    signal.signal(s, startup.ignore if h is startup.quit_while_starting else h)
            if torch.distributed.is_initialized():      # the other ranks meet the same error, or time out
                print(message, file=sys.stderr)
                dist_exit(code, barrier=False)
            if code == 1:
                raise SystemExit(message)               # printed by Python; the message stays on the exception
            print("\n" + message, file=sys.stderr, flush=True)
            raise SystemExit(code)
        return run
    return wrap


class Stopped(Exception):
    """Raised inside the figure sampler when a stop signal arrives."""


class StopSignal:
    """SIGINT / SIGTERM / SIGHUP set `name`; the loop then finishes its step, saves and exits. Later signals are
    ignored, so that none cuts the checkpoint or the closing line short. A context manager that restores the old
    handlers."""

    def __init__(self):
        self.name, self.old = None, {}

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in startup.takeable()}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():       # once a signal came, later ones stay ignored (the exit is under way)
            signal.signal(s, h if self.name is None else startup.ignore)

    def _handle(self, signum, frame):
        self.name = self.name or signal.Signals(signum).name

    def check(self, *args):
        """A sampler callback: stop sampling at once when a signal came."""
        if self.name is not None:
            raise Stopped

    def agreed(self, world, device):
        """Whether to stop now; with several processes, whether any rank got a signal."""
        if any_rank(self.name is not None, world, device) and self.name is None:
            self.name = "a signal on another rank"
        return self.name is not None


#----------------------------------------------------------------------------
# Seeded noise per sample.

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
