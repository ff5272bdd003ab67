"""``worker.map(fn, threads=N)``: one worker process runs up to N tasks at once, each on a
thread of its own, for I/O-bound work.

Each running task is its own claim (its own attempt, fenced like any other). The task
threads only run ``fn``; the calling thread (the coordinator) does everything else:
every claim and every record is one ``Store.step`` of its own, as in the plain loop, so
the database sees one worker with several live attempts. An exception in ``fn`` fails
that task only (failure isolation).

Timeouts: a thread cannot be stopped from outside in Python. When a task runs past its
``Task.timeout``, its attempt is recorded failed at once (its resources are released,
and the task is retried within ``max_failed_retries``); the thread runs on to its end,
and whatever it returns then is discarded (the attempt is no longer current). Its slot
is free at once: the number of *live attempts* stays at most ``threads``.

Stopping: ``close()`` (from ``fn`` or elsewhere) stops the claiming, and the running
tasks finish and are recorded. A stop signal hands every running task back at once
(no retry used) and raises ``Preempted``; their threads are daemon threads, so they do
not keep the process alive, and what they do later is fenced. A drain (SIGUSR1, the
allocation about to end) stops the claiming and lets the running tasks that fit in the
time left finish; then it hands back those that would not (their threads still run, so
not before: see ``_hand_back_late``) and raises ``Drained``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import traceback
import typing as t
from collections.abc import Callable

from laufband import waiting
from laufband.errors import ResultError, TaskFailedError
from laufband.session import drained
from laufband.signals import (
    Cancelled,
    Preempted,
    announce_cancel,
    announce_drain,
    announce_stop,
    stop_signals,
)
from laufband.states import Event, WorkerState
from laufband.store import Claim, Failure, Finish, StepResult, Want

if t.TYPE_CHECKING:
    from laufband.graphband import Graphband

log = logging.getLogger(__name__)

#: With free slots and tasks running, look for newly ready tasks this often (a stat of
#: the database file on SQLite; a read of the counters only when it changed).
WATCH = 0.02


def encode_result(value: t.Any, limit: int) -> str | None:
    """A task's result as stored: JSON, at most ``limit`` bytes (ResultError if not)."""
    if value is None:
        return None
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ResultError(
            f"the task's result is not JSON-serialisable ({exc}): return plain data "
            "(numbers, strings, lists, dicts), e.g. the path of a file you wrote") from None
    size = len(text.encode())
    if size > limit:
        raise ResultError(
            f"the task's result is {size} bytes of JSON, more than max_result_size={limit}: "
            "results are for small values that dependents read; write big data to a "
            "file and return its path (or raise max_result_size)")
    return text


@dataclasses.dataclass
class Summary:
    """What ``map`` did in this worker: attempts that completed, failed (or timed out),
    and were handed back."""

    completed: int = 0
    failed: int = 0
    handed_back: int = 0


@dataclasses.dataclass
class _Running:
    claim: Claim
    thread: threading.Thread
    deadline: float | None  # monotonic
    started: float  # epoch seconds (clock.now()): does it fit in the time left?


class ThreadedRun:
    """One ``map`` call: the coordinator's loop and its one way out (``_end``)."""

    def __init__(self, worker: Graphband, fn: Callable[[t.Any], t.Any], threads: int) -> None:
        self.w = worker
        self.fn = fn
        self.threads = threads
        self.store = worker._store
        self.session = worker._session
        self.me = worker._me
        self.clock = worker._clock
        self.summary = Summary()
        self.running: dict[tuple[int, int], _Running] = {}
        self.finished_q: queue.SimpleQueue[tuple[Claim, Finish]] = queue.SimpleQueue()
        self.pending: list[Finish] = []  # to record with the next step
        self.local = threading.local()  # the claim a task thread runs (worker.attempt)
        self.ended = False
        self.finished = False
        self._finished = threading.Event()
        self.left = False  # the store set this worker's state
        self.failure: TaskFailedError | None = None  # failure_policy="stop" (_observe)
        self._step_began = 0.0  # when the step that claimed the running tasks began
        self._mark: tuple[int, ...] | None = None  # the database file when last read
        self._read_at = float("-inf")
        self.me.threads = threads

    # ------------------------------------------------- Graphband's loop protocol
    @property
    def current(self) -> Claim | None:
        return getattr(self.local, "claim", None)

    def end_now(self, why: str) -> bool:
        """Never suspended: it runs on its caller's thread (False until finished)."""
        return self.finished

    def wait_finished(self) -> None:
        self._finished.wait()

    def end_at_exit(self) -> None:
        """The interpreter exits while map runs on another (daemon) thread: its running
        tasks are handed back and the worker goes offline, now (the coordinator and the
        task threads stop with the process)."""
        if self.ended:
            return
        self.ended = True
        try:
            self.store.leave(self.me.id, [], WorkerState.OFFLINE)
        finally:
            self.session.went_offline()
            self.finished = True
            self.session.loop_active = False
            self._finished.set()

    # ----------------------------------------------------------- the run
    def run(self) -> Summary:
        with stop_signals(self.session.on_signal):
            try:
                self._coordinate()
            except BaseException as exc:
                self._end(exc)
                raise
            self._end(None)
        if self.failure is not None:
            raise self.failure
        return self.summary

    def _stopping(self) -> bool:
        return (self.w._closing or self.session.signal is not None
                or self.w._cancelled is not None or self.failure is not None
                or self.w._draining())

    def _observe(self, result: StepResult) -> None:
        """The worker's bookkeeping; a task failed for good under failure_policy="stop"
        stops the claiming like close(): the running tasks finish and are recorded
        (handing them back while their threads still run would let another worker run
        them at the same time), then ``run`` raises it."""
        try:
            self.w._observe(result)
        except TaskFailedError as exc:
            self.failure = exc

    def _drain_over(self) -> bool:
        """Cancelled, and the drain timeout passed: what runs is recorded cancelled."""
        cancel = self.w._cancelled
        if cancel is None or self.clock.now() < cancel.deadline:
            return False
        for running in self.running.values():
            self.pending.append(Finish(running.claim, Event.CANCELLED,
                                       f"still running when the drain of the cancel by "
                                       f"{cancel.by} timed out"))
        self.summary.handed_back += len(self.running)
        self.running.clear()
        return True

    def _coordinate(self) -> None:
        first, may_claim = True, True
        while True:
            self._collect(block_until=None)
            self._time_out()
            if self.session.signal is not None or self._drain_over():
                return  # what still runs is handed back (recorded) by _end
            if self.w._draining() and self._hand_back_late():
                return  # _end records them and raises Drained: the process exits
            stopping = self._stopping()
            free = 0 if stopping else self.threads - len(self.running)
            if first or self.pending or (free and may_claim):
                leave = self.w._leave_as() if not self.running and not stopping else None
                result = self._step(Want(free, free, start=first, leave=leave))
                first = False
                self._start(result.claims)
                self._observe(result)
                if result.left:
                    self.left = True
                    return
                may_claim = len(result.claims) == free and free > 0
            if not self.running:
                if stopping:
                    return
                if may_claim:
                    continue
                if not waiting.wait_for_work(self.store, self.me, self.clock,
                                             self.w._leave_as(), self._stopping,
                                             self._observe_waiting):
                    self.left = True
                    return
                may_claim = True
                continue
            may_claim = self._wait(free and not stopping) or may_claim

    def _observe_waiting(self, result: StepResult) -> None:
        self.left |= result.left
        self._observe(result)

    def _step(self, want: Want) -> StepResult:
        # Deadlines count from before the step: the stored ones start at the claim.
        self._step_began = self.clock.monotonic()
        finishes, self.pending = self.pending, []
        try:
            return self.store.step(self.me, finishes, want)
        except BaseException:
            self.pending[:0] = finishes  # recorded on the way out
            raise

    def _wait(self, watch: bool) -> bool:
        """Wait for a task thread to finish, a deadline, or a change of the database:
        with free slots (``watch``) one that may have made a task ready, in any case a
        cancel (read when the change mark moved, or without one; with free slots also
        POLL_MAX after the last read). True if a task this worker may claim is ready."""
        deadlines = [r.deadline for r in self.running.values() if r.deadline is not None]
        until = min(deadlines) if deadlines else None
        step = WATCH if watch else 0.25  # also how soon a stop signal is seen
        if until is not None:
            step = max(0.0, min(step, until - self.clock.monotonic()))
        if self._collect(block_until=step):
            return False
        # Read only when the database changed since the last read (the file; on a
        # server, the commits heard of), or, with free slots, POLL_MAX after it (a change
        # the mark may not show: NFS attribute caching, a commit that notified nobody);
        # the mark is kept across waits, so a commit between two of them is not missed.
        # Without free slots, only for a cancel, at most once a second.
        now = self.clock.monotonic()
        if not watch and now < self._read_at + 1.0:
            return False
        mark = self.store.change_mark(listen=watch)
        if mark is not None and mark == self._mark and (
                not watch or now < self._read_at + waiting.POLL_MAX):
            return False
        self._mark, self._read_at = mark, now
        result = self.store.poll(self.me)
        self._observe(result)
        return watch and result.claimable

    # ------------------------------------------------------ task threads
    def _start(self, claims: list[Claim]) -> None:
        for claim in claims:
            task = self.w._by_id[claim.id]
            deadline = (self._step_began + task.timeout
                        if task.timeout is not None else None)
            thread = threading.Thread(target=self._run_task, args=(claim, task),
                                      name=f"laufband-task-{claim.id}", daemon=True)
            # Registered before it starts: a failure to start hands it back in _end.
            self.running[(claim.pk, claim.attempt)] = _Running(claim, thread, deadline,
                                                               self.clock.now())
            thread.start()

    def _run_task(self, claim: Claim, task: t.Any) -> None:
        self.local.claim = claim
        self.local.result = None
        try:
            value = self.fn(self.w._item(task))
            if value is None:
                value = self.local.result
            finish = Finish(claim, Event.COMPLETED,
                            result=encode_result(value, self.w.settings.max_result_size))
        except BaseException as exc:  # one task's failure is its own (isolation)
            error = traceback.format_exception_only(exc)[-1].strip()
            finish = Finish(claim, Event.FAILED, error, self.w.settings.max_failed_retries,
                            Failure(error, "".join(traceback.format_exception(exc))))
        finally:
            self.local.claim = None
        self.finished_q.put((claim, finish))

    def set_result(self, value: t.Any) -> None:
        """``worker.set_result`` from a task thread (used if ``fn`` returns None)."""
        encode_result(value, self.w.settings.max_result_size)
        self.local.result = value

    def _collect(self, block_until: float | None) -> bool:
        """Move finished attempts to ``pending``; with ``block_until``, wait up to that
        many seconds for the first. True if any finished."""
        got = False
        while True:
            try:
                if block_until is not None and not got:
                    claim, finish = self.finished_q.get(timeout=block_until)
                else:
                    claim, finish = self.finished_q.get_nowait()
            except queue.Empty:
                return got
            got = True
            running = self.running.pop((claim.pk, claim.attempt), None)
            if running is None:
                continue  # timed out earlier: its attempt was recorded failed then
            self.pending.append(finish)
            if finish.outcome == Event.COMPLETED:
                self.summary.completed += 1
            else:
                self.summary.failed += 1

    def _hand_back_late(self) -> bool:
        """Draining: once none of the running tasks is expected to finish in the time
        left, they all go back (no retry used) and map ends: True. Not while a task
        that fits still runs: a thread cannot be stopped, so a task handed back while
        the process lives on would run here and at another worker at once; the process
        exits (``Drained``) right after the record, and the daemon threads with it."""
        if not self.running or any(self.w._fits(r.claim.id, r.started)
                                   for r in self.running.values()):
            return False
        for running in self.running.values():
            self.pending.append(Finish(running.claim, Event.PREEMPTED,
                                       f"{self.session.drain}: not expected to finish "
                                       "in the time left"))
        self.summary.handed_back += len(self.running)
        self.running.clear()
        return True

    def _time_out(self) -> None:
        now = self.clock.monotonic()
        for key, running in list(self.running.items()):
            if running.deadline is not None and now >= running.deadline:
                del self.running[key]
                task = self.w._by_id[running.claim.id]
                error = (f"TimeoutError: task {running.claim.id!r} ran longer than its "
                         f"timeout of {task.timeout:g} s")
                self.pending.append(Finish(
                    running.claim, Event.FAILED, error, self.w.settings.max_failed_retries,
                    Failure(error, f"{error}; its thread {running.thread.name} was still "
                                   "running (Python cannot stop a thread): what it returns "
                                   "is discarded")))
                self.summary.failed += 1
                log.warning("laufband: %s; its thread runs on, and its result will be "
                            "discarded", error)

    # -------------------------------------------------------------- the end
    def _end(self, exc: BaseException | None) -> None:
        """Record what finished, hand back what still runs, set the worker's state."""
        if self.ended:
            return  # the process is exiting: end_at_exit did it
        self.ended = True
        try:
            self._collect(block_until=None)
            signum, drain = self.session.signal, self.session.drain
            why = (f"worker stopped ({type(exc).__name__})" if exc is not None
                   else "stop signal received" if signum is not None
                   else drain if drain is not None else "worker stopped")
            back = [Finish(r.claim, Event.PREEMPTED, why) for r in self.running.values()]
            self.summary.handed_back += len(back)
            self.running.clear()
            finishes, self.pending = self.pending + back, []
            self.w._record_end(finishes, self.left, exc)
            if self.w._bar is not None:
                self.w._bar.close()
            signum = self.session.signal  # again: one may have come while we recorded
            if signum is not None:
                announce_stop(signum, self.me.id, f"{len(back)} running task(s) handed "
                                                  "back to other workers; ")
                if exc is None:
                    raise Preempted(signum)
            elif drain is not None:
                handed = self.summary.handed_back
                announce_drain(drain, self.me.id, f"{handed} task(s) handed back to other "
                                                  "workers; " if handed else "")
                if exc is None:
                    raise drained(drain)
            cancel = self.w._cancelled
            if cancel is not None and exc is None:
                announce_cancel(cancel, self.me.id)
                raise Cancelled(cancel.by)
        finally:
            self.finished = True
            self.session.loop_active = False
            self._finished.set()
