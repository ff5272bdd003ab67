"""Stop signals: SLURM's scancel and time limit (SIGTERM) and Ctrl-C (SIGINT) make a
worker hand its tasks back and exit at once; its warning signal (``--signal=B:USR1@120``)
makes it drain: stop claiming, finish the task it runs if that fits in the time left
(else hand it back), and exit with code 0.
"""

from __future__ import annotations

import signal
import sys
import threading
import typing as t
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
#: The signal that asks for a drain, not a stop (SLURM's warning before the time limit).
DRAIN_SIGNAL = signal.SIGUSR1


class Preempted(SystemExit):
    """Raised (from the signal handler) to end the process after the hand-back.

    A SystemExit, so it unwinds the user's loop body and ends the interpreter with
    exit code 128 + signal number (143 for SIGTERM, 130 for SIGINT) unless someone
    catches it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


#: The exit code of a worker whose workflow was cancelled (sysexits' EX_TEMPFAIL: it
#: may run again after `laufband resume`).
CANCELLED_EXIT = 75


class Cancelled(SystemExit):
    """Raised when a worker's loop ends because the workflow was cancelled (`laufband
    cancel`), after what it finished was recorded: the process exits with code 75
    unless someone catches it."""

    def __init__(self, by: str) -> None:
        super().__init__(CANCELLED_EXIT)
        self.by = by


class Drained(SystemExit):
    """Raised when a worker stopped claiming because its time is up (SIGUSR1, or its
    allocation ends within walltime_margin, or everything left is too long for it),
    after what it ran was recorded and what it held handed back: the process exits
    with code 0 (the job did its part; others go on with the rest), unless someone
    catches it. Code after the loop, which may assume all work is done, does not run.
    """

    def __init__(self, why: str) -> None:
        super().__init__(0)
        self.why = why


def announce_drain(why: str, worker: str, what: str) -> None:
    """Why a worker leaves before the work is done (on a line of its own: the progress
    bar was closed first); ``what``: what became of its tasks, e.g. "task 'x' was
    handed back to other workers; "."""
    print(f"laufband: {why}: {what}worker {worker} stops claiming and exits (exit code 0); "
          "workers with more time run the rest.", file=sys.stderr, flush=True)


def announce_stop(signum: int, worker: str, what: str) -> None:
    """What a worker does on a stop signal (on a line of its own: the progress bar was
    closed first); ``what``: what it handed back, e.g. "task 'x' was handed back ...; "."""
    print(f"laufband: {signal.Signals(signum).name} received: {what}worker {worker} stops "
          f"(exit code {128 + signum}).", file=sys.stderr, flush=True)


def announce_cancel(cancel: t.Any, worker: str) -> None:
    """Why a worker leaves a cancelled workflow (on a line of its own: the progress
    bar was closed first)."""
    print(f"laufband: the workflow was cancelled by {cancel.by}: worker {worker} stops "
          f"(exit code {CANCELLED_EXIT}); `laufband resume` lets workers run it again.",
          file=sys.stderr, flush=True)


@contextmanager
def stop_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_signal(signum)`` on a stop signal while inside; restore the previous
    handlers afterwards. Outside the main thread Python cannot install handlers, so
    nothing is installed there (the embedding application owns signals then).

    A loop's generator may be closed on another thread (collected there), where the
    handlers cannot be restored: then ours stay until the next signal, which restores
    them in the main thread and passes that signal on to them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, t.Any] = {}
    active = True

    def restore() -> None:
        for signum, handler in previous.items():
            # None: a handler installed outside Python; the default is the best guess.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def handler(num: int, _frame: object) -> None:
        if active:
            on_signal(num)
        else:  # the loop is over: this signal was never ours
            restore()
            signal.raise_signal(num)

    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        active = False
        if threading.current_thread() is threading.main_thread():
            restore()
