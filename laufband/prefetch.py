"""Run the next claim+finish transaction while the current task runs.

A step (record what finished, claim more) costs a few milliseconds, more on NFS and
more while other workers hold the lock. For tasks not much longer than that, a worker
that steps only between tasks spends a good share of its time waiting for the lock
(SCALING_ANALYSIS.md, 'Measurements behind the code'). So when the
worker starts the last task it holds, it hands the step to a background thread and the
transaction overlaps with the task. Only for short tasks (see ``Batcher.prefetch``): a
task claimed ahead waits, unavailable to other workers, until the current one ends, so
if the current task runs longer than ``MAX_HOLD`` after all (task lengths vary), the
thread hands the task claimed ahead back (``give_back``), so a task claimed ahead waits
behind a long one about that long, not the whole task (longer only if the give-back
fails: then it stays claimed and runs next).

The step thread only ever waits for the database lock. A thread that settles the step
while it holds that lock itself (user code holding ``worker.db_lock`` around the loop)
calls the step off instead of waiting for it: the step then recorded nothing, and its
finishes are returned as unrecorded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from laufband.batching import MAX_DEFERRAL
from laufband.clock import Clock
from laufband.locking import Cancelled, DatabaseLock
from laufband.store import Finish, StepResult

log = logging.getLogger(__name__)

#: Longest a task claimed ahead waits for the task before it (seconds).
MAX_HOLD = MAX_DEFERRAL
#: While holding, look at the (injectable) clock at least this often (seconds).
_LOOK = 0.05

#: step(finishes, cancel) and give_back(result, cancel); ``cancel()`` true: stop waiting
#: for the database lock (raise locking.Cancelled).
Step = Callable[[list[Finish], Callable[[], bool]], StepResult]
GiveBack = Callable[[StepResult, Callable[[], bool]], StepResult]


@dataclass
class _Pending:
    future: Future[StepResult | None] | None
    finishes: list[Finish]
    #: Set when the task that runs meanwhile ended (or the loop hands back).
    ended: threading.Event
    #: Set when the settling thread holds the database lock: stop waiting for it.
    cancel: threading.Event


@dataclass
class Settled:
    """What a step in flight came to: its result, or the error it raised and the
    finishes it was to record (the failed transaction recorded none of them)."""

    result: StepResult | None = None
    unrecorded: list[Finish] = field(default_factory=list)
    error: BaseException | None = None


class Prefetch:
    """At most one step in flight, on one background thread."""

    def __init__(self, clock: Clock, lock: DatabaseLock | None) -> None:
        self._clock = clock
        self._lock = lock
        self._executor: ThreadPoolExecutor | None = None
        self._pending: _Pending | None = None
        self._thread_ids: set[int] = set()

    def start(self, step: Step, finishes: list[Finish], give_back: GiveBack) -> bool:
        """Run ``step(finishes)`` in the background, and ``give_back`` its result if it
        claimed tasks and the current task is still running ``MAX_HOLD`` from now.
        False if that cannot be done (the interpreter is shutting down its thread
        pools): the caller steps itself."""
        assert self._pending is None, "one step in flight at a time"
        pending = _Pending(None, finishes, threading.Event(), threading.Event())
        deadline = self._clock.monotonic() + MAX_HOLD
        try:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="laufband-step")
            pending.future = self._executor.submit(self._run, step, give_back, pending,
                                                   deadline)
        except RuntimeError:
            return False
        self._pending = pending
        return True

    def _run(self, step: Step, give_back: GiveBack, pending: _Pending,
             deadline: float) -> StepResult | None:
        """The step, and maybe the give-back; None if the step was called off."""
        self._thread_ids.add(threading.get_ident())
        cancel = pending.cancel.is_set
        try:
            result = step(pending.finishes, cancel)
        except Cancelled:
            return None
        # A step that waited long for the lock leaves the task a moment to end before
        # what it claimed goes back (two transactions for nothing, else).
        deadline = max(deadline, self._clock.monotonic() + _LOOK)
        if not result.claims or self._task_ends_by(pending.ended, deadline):
            return result
        try:
            return give_back(result, cancel)
        except Exception as exc:  # not handed back: the claims run when the task ends
            if not isinstance(exc, Cancelled):
                log.error("laufband: could not hand back the task claimed ahead: %s", exc)
            return result

    def _task_ends_by(self, ended: threading.Event, deadline: float) -> bool:
        while not ended.wait(min(_LOOK, max(0.001, deadline - self._clock.monotonic()))):
            if self._clock.monotonic() >= deadline:
                return False
        return True

    def settle(self) -> Settled:
        """Wait for the step in flight (if any) and say how it ended."""
        pending, self._pending = self._pending, None
        if pending is None:
            return Settled()
        pending.ended.set()
        if self._lock is not None and self._lock.held_here():
            pending.cancel.set()  # it may be waiting for the lock we hold: call it off
        if threading.get_ident() in self._thread_ids:
            # Called on our own thread (a generator collected there): waiting for the
            # future would wait for ourselves. The worker's going offline returns the
            # claims it still holds.
            log.error("laufband: a worker loop was closed on its own step thread; its "
                      "step in flight is not waited for")
            return Settled()
        try:
            assert pending.future is not None
            result = pending.future.result()
        except Exception as exc:
            return Settled(unrecorded=pending.finishes, error=exc)
        if result is None:  # called off before it took the lock: it recorded nothing
            return Settled(unrecorded=pending.finishes)
        return Settled(result=result)

    def shutdown(self) -> None:
        """Stop the thread (after the step in flight, whose outcome the caller settled
        before: see graphband._Loop.end)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            # The caller settled the step in flight, so the idle thread ends by itself
            # (and is joined at exit): waiting for it to wake costs a scheduling round
            # under load. The executor's own thread cannot join itself.
            wait = self._pending is not None and threading.get_ident() not in self._thread_ids
            executor.shutdown(wait=wait)
