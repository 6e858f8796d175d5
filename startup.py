"""Imported first by every script, before torch: Ctrl-C, SIGTERM (a cluster's pre-emption) or SIGHUP
(a closed terminal or ssh session) while the imports run ends the process with one line and status 130
instead of a traceback or 143.
utils.command takes the signals over once the script's main() starts. A signal the process was started
ignoring (`nohup` ignores SIGHUP, a shell's `&` job SIGINT) stays ignored throughout. Standard library only;
it changes nothing when the program is not one of this project's scripts (tests, a notebook)."""
import atexit
import os
import signal
import sys

EXIT_INTERRUPTED = 130   # utils.EXIT_INTERRUPTED: 128 + SIGINT, the shell's own status for Ctrl-C
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def ignore(signum, frame):
    """A stop signal ignored by a Python handler that does nothing. Not SIG_IGN: a signal that arrived just before a
    Python handler was replaced by SIG_IGN is still pending, and CPython then prints "Signal N ignored due to race
    condition" as a traceback."""


def takeable():
    """The stop signals a handler may take: those not at SIG_IGN, which only the process's start sets here (nohup's
    SIGHUP; this project ignores with `ignore`): an ignored signal stays ignored."""
    return [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]


def quit_while_starting(signum, frame):
    sys.stderr.write(f"\ninterrupted by {signal.Signals(signum).name} while starting: nothing was written\n")
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


@atexit.register                     # registered first, so it runs last: after every other atexit function
def _ignore_while_finalizing():
    """The interpreter's finalization resets Python handlers to the default action (death by the signal, 143);
    a signal during the rest of an exit that already ignores them stays ignored. signal.signal runs a pending
    handler before it switches: none is lost to a race here."""
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is ignore:
            signal.signal(s, signal.SIG_IGN)


_main = os.path.abspath(getattr(sys.modules.get("__main__"), "__file__", None) or "")
if os.path.dirname(_main) == os.path.dirname(os.path.abspath(__file__)):
    for _s in takeable():
        signal.signal(_s, quit_while_starting)
