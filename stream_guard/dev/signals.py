"""SIGINT / SIGTERM / SIGHUP for the programs that own child processes (stack, demo, harnesses).

A shell starting a program in the background (``cmd &`` in a script) sets SIGINT to "ignored",
and Python's default for SIGTERM is to die without running ``finally`` blocks: either way the
broker, S3 server and tritonserver would outlive their owner. ``stop_on_signals`` installs
handlers that raise ``Interrupted`` in the main thread (so every ``finally`` runs), tells
waiting threads to give up (``STOPPING``), and stops every child ``dev.processes`` knows on
the way out. Signals that arrive during that last cleanup are ignored, so a second Ctrl-C
cannot leave half of the children running.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

from stream_guard.dev.processes import stop_all

__all__ = [
    "HANDLED",
    "Interrupted",
    "STOPPING",
    "stop_on_signals",
]

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOPPING = threading.Event()


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; unwinding stops every child process."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(self.signame)


@contextlib.contextmanager
def stop_on_signals(*, quiet: bool = False) -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise ``Interrupted``; at its end (however
    it ends) every child process still running is stopped."""
    cleaning = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if cleaning.is_set():
            if not quiet:
                print(f"{signal.Signals(signum).name}: already stopping", file=sys.stderr)
            return
        STOPPING.set()
        raise Interrupted(signum)

    previous = {}
    for sig in HANDLED:
        # nohup asked for SIGHUP to be ignored: respect it. SIGINT is taken back on purpose.
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        cleaning.set()
        try:
            stop_all()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            STOPPING.clear()
