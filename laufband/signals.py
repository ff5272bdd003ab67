"""Stop signals: SLURM's scancel and time limit (SIGTERM), its warning signal
(``--signal=B:USR1@120``) and Ctrl-C (SIGINT) make a worker hand its tasks back and exit.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised (from the signal handler) to end the process after the hand-back.

    A SystemExit, so it unwinds the user's loop body and ends the interpreter with
    exit code 128 + signal number (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1)
    unless someone catches it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


@contextmanager
def stop_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_signal(signum)`` on a stop signal while inside; restore the previous
    handlers afterwards. Outside the main thread Python cannot install handlers, so
    nothing is installed there (the embedding application owns signals then)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, lambda num, _frame: on_signal(num))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
