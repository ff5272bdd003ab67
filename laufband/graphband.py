"""The worker: ``Graphband`` (its public surface) and ``_Loop`` (one pass of
``for task in worker``: claim, yield, finish, wait; one way out).

Each process that runs ``for task in Graphband(tasks()):`` is one worker. Workers share
nothing but the database; every claim and completion is one short transaction of the
store (store/), the worker's presence and signals are its session (session.py), and
waiting is waiting.py. This module only decides what to ask the store next.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import typing as t
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext

from flufl.lock import AlreadyLockedError, Lock
from tqdm import tqdm

from laufband import config, waiting, walltime
from laufband.batching import Batcher
from laufband.clock import Clock, SystemClock
from laufband.errors import ConfigError, LaufbandError, ResultError, TaskFailedError
from laufband.locking import DatabaseLock, FastLock
from laufband.prefetch import MAX_HOLD, Prefetch
from laufband.session import (
    Session,
    drained,
    drains_raised,
    signals_received,
    user_frame,
    where,
)
from laufband.signals import (
    Cancelled,
    Drained,
    Preempted,
    announce_cancel,
    announce_drain,
    announce_stop,
    stop_signals,
)
from laufband.states import UNFINISHED, Event, WorkerState
from laufband.store import (
    Claim,
    Counts,
    Failure,
    Finish,
    Me,
    StepResult,
    Store,
    Want,
    sqlite_path,
)
from laufband.store.connection import absolute_url
from laufband.store.resources import check_tasks
from laufband.store.schema import reqset_key
from laufband.task import GraphSpec, Task, read_graph, validate
from laufband.threads import Summary, ThreadedRun, encode_result

log = logging.getLogger(__name__)

T = t.TypeVar("T")

#: Between the tasks of a batch, a loop looks for a cancel at most this often (seconds).
CANCEL_CHECK = 1.0


class Graphband(t.Generic[T]):
    """Iterate over the tasks of a DAG together with every other worker of the workflow.

    Each task is yielded by exactly one worker (per attempt), only after all its
    dependencies completed. The loop waits while another live worker runs a task that
    could make work for this one, and ends when nothing more can become claimable.
    """

    default_db = "graphband.sqlite"

    def __init__(
        self,
        tasks: Iterable[Task[T]],
        *,
        lock: Lock | str | None = None,
        db_lock: Lock | None = None,
        db: str | None = None,
        identifier: str | Callable[[], str] | None = None,
        failure_policy: t.Literal["continue", "stop"] | None = None,
        heartbeat_timeout: float | None = None,
        heartbeat_interval: float | None = None,
        max_killed_retries: int | None = None,
        max_failed_retries: int | None = None,
        disabled: bool | None = None,
        tqdm_kwargs: dict[str, t.Any] | None = None,
        labels: Iterable[str] | None = None,
        journal_mode: str | None = None,
        batch_size: int | t.Literal["auto"] | None = None,
        enable_fingerprints: bool | None = None,
        invalidate_downstream: bool | None = None,
        limits: t.Mapping[str, int] | None = None,
        depth_first: bool | None = None,
        max_result_size: int | None = None,
        walltime_margin: float | None = None,
        label_wait: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = config.resolve(
            db=db, default_db=self.default_db, identifier=identifier,
            failure_policy=failure_policy, heartbeat_timeout=heartbeat_timeout,
            heartbeat_interval=heartbeat_interval, max_killed_retries=max_killed_retries,
            max_failed_retries=max_failed_retries, disabled=disabled, labels=labels,
            journal_mode=journal_mode, batch_size=batch_size,
            enable_fingerprints=enable_fingerprints,
            invalidate_downstream=invalidate_downstream, limits=limits,
            depth_first=depth_first, max_result_size=max_result_size,
            walltime_margin=walltime_margin, label_wait=label_wait,
        )
        self._tasks_input = tasks
        self.tqdm_kwargs = dict(tqdm_kwargs or {})
        self._clock = clock or SystemClock()
        self._bar: tqdm | None = None
        self._last_counts: Counts | None = None
        self._label_wait_said = False
        self._closing = False
        self._cancelled: t.Any = None  # the workflow's cancel, once a step saw it
        self._loop: _Loop | ThreadedRun | None = None
        self._context_managed = False
        if self.settings.disabled:
            self.lock = (FastLock(lock) if isinstance(lock, str)
                         else lock if lock is not None else nullcontext())
            self.db_lock = db_lock if db_lock is not None else nullcontext()
            return
        self._open(lock, db_lock)

    # ------------------------------------------------------------------ set-up
    def _read_graph(self) -> GraphSpec:
        """The graph as this worker yields it (Laufband adds its items' identity)."""
        return read_graph(self._tasks_input, fingerprints=self.settings.enable_fingerprints,
                          depth_first=self.settings.depth_first)

    def _open(self, lock: Lock | str | None, db_lock: Lock | None) -> None:
        s = self.settings
        spec = self._read_graph()
        path = sqlite_path(absolute_url(s.db))
        if path is None or not os.path.exists(path):
            # A new workflow: check the graph, and its resources against the limits
            # given here (the only ones there are yet), before creating any file.
            _ = spec.order
            if path is not None:
                check_tasks((task for task in spec.by_id.values() if task.resources),
                            dict(s.limits), path)
        # The user's lock is separate from the database lock, so that user critical
        # sections never block claims; the heartbeat keeps it alive while held.
        given = lock if isinstance(lock, Lock) else None
        user_lock = given if given is not None else FastLock(
            lock if isinstance(lock, str) else user_lock_file(path),
            lifetime=max(2 * s.heartbeat_interval, s.lock_lifetime))
        # Ours is shared by this process's threads too (worker.map); a Lock passed in is
        # exposed as it is.
        self.lock = given if given is not None else ThreadSharedLock(user_lock)
        self._db_lock = Store.writers_lock(s.db, s.lock_lifetime, db_lock)
        self._store = Store(s.db, self._db_lock, self._clock, s.journal_mode)
        if self._store.generation_of(spec) is None:
            # Not registered yet (a new or a changed graph): check it before going online.
            # If it is, a worker that checked it registered it: joining a big graph skips
            # the ordering (about half of reading it: SCALING_ANALYSIS.md, 'Measurements
            # behind the code').
            _ = spec.order
        # Inside a SLURM job: when its allocation ends (read once; None: no limit).
        end = walltime.allocation_end()
        self._session = Session(self._store, s, user_lock, end)
        self.db_lock = _UserDbLock(self._db_lock, self._session)
        if s.limits:
            self.stored_limits = self._store.declare_limits(dict(s.limits), s.identifier)
            self._report_kept_limits()
        self._session.go_online()
        # Not a method of self: the finaliser must not keep the worker alive.
        self._finalizer = weakref.finalize(self, self._session.at_exit)
        # Register now, so a worker started before a rerun added tasks keeps claiming
        # only the generation of the graph it has data for.
        generation = self._store.register_graph(spec, s.identifier, s.invalidate_downstream)
        self._by_id = spec.by_id
        self._me = Me(s.identifier, [], generation, s.max_failed_retries,
                      s.max_killed_retries, s.failure_policy == "stop",
                      deadline=None if end is None else end - s.walltime_margin,
                      label_wait=s.label_wait)
        self._session.heartbeat.me = self._me  # it reads the runtime estimates
        self._known_reqsets: set[int] = set()
        self._refresh_reqsets()
        self._batcher = Batcher(None if s.batch_size == "auto" else int(s.batch_size))
        self._prefetch = Prefetch(self._clock, self._db_lock)
        # tqdm makes its (multiprocessing) write lock at the first bar: imports and a
        # semaphore, which would otherwise delay the first claim of every worker.
        tqdm.get_lock()

    def _refresh_reqsets(self) -> None:
        self._store.reqsets_for(self._me, self.settings.labels)
        self._known_reqsets = set(self._store.counts().rows)

    def _report_kept_limits(self) -> None:
        """A limit already stored (set by the first worker, or changed with `laufband
        limits`) wins over this worker's argument: say so where they differ."""
        for name, capacity in self.settings.limits.items():
            if self.stored_limits.get(name) != capacity:
                log.warning("laufband: the workflow's limit %s=%s is used, not %s=%s as "
                            "given here (change it with `laufband limits %s=N`)", name,
                            self.stored_limits.get(name), name, capacity, name)

    # ---------------------------------------------------------- public surface
    @property
    def identifier(self) -> str:
        """Unique identifier of this worker."""
        return self.settings.identifier

    @property
    def labels(self) -> frozenset[str]:
        """Labels of this worker; it runs tasks whose requirements are a subset."""
        return self.settings.labels

    @property
    def db(self) -> str:
        """The database URL."""
        return self.settings.db

    @property
    def disabled(self) -> bool:
        return self.settings.disabled

    @property
    def failure_policy(self) -> str:
        return self.settings.failure_policy

    @property
    def attempt(self) -> int | None:
        """Attempt number of the task being processed (1 for its first run); key side
        effects by (task id, attempt) to make them safe against re-execution."""
        loop = self._loop
        return loop.current.attempt if loop is not None and loop.current else None

    def set_result(self, value: t.Any) -> None:
        """Store ``value`` (JSON-serialisable, at most ``max_result_size`` bytes as JSON)
        as the result of the task this thread runs, kept with the attempt that completes
        it. ResultError if it cannot be stored (raised here, in the task: left uncaught,
        the task fails)."""
        loop = self._loop
        current = loop.current if loop is not None and not loop.finished else None
        if current is None:
            raise ResultError("set_result() is for the task being run: call it inside "
                              "the loop body (or the function given to map)")
        loop.set_result(value)  # type: ignore[union-attr]

    def result(self, task_id: str) -> t.Any:
        """The result of a completed task (None if it stored none), e.g. of a dependency.
        ResultError if the task has not completed (or does not exist)."""
        with self._session.library_call():
            state, raw = self._store.result(task_id)
        if state != "completed":
            raise ResultError(
                f"task {task_id!r} is {state}, not completed: it has no result"
                + (" (is it a dependency of the task that asks?)" if state != "unknown"
                   else " (no task has this id in the workflow)"))
        return None if raw is None else json.loads(raw)

    def results(self) -> dict[str, t.Any]:
        """The results of every completed task of this worker's graph, in the order of
        the tasks given to it (None for a task that stored none)."""
        with self._session.library_call():
            stored = dict(self._store.results())
        return {tid: None if stored[tid] is None else json.loads(stored[tid])
                for tid in self._by_id if tid in stored}

    def map(self, fn: Callable[[t.Any], t.Any], *, threads: int = 1) -> Summary:
        """Run ``fn`` on the tasks (what ``for`` would yield) with up to ``threads`` at
        once in this process, each task its own claim; returns when this worker's part
        is done (as the loop ends). ``fn``'s return value is the task's result (JSON).
        An exception fails that task only. See laufband/threads.py for timeouts and
        stopping."""
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be an integer >= 1, got {threads!r}.")
        if not callable(fn):
            raise ConfigError(f"map() needs a function to call on each task, got {fn!r}.")
        if self.settings.disabled:
            summary = Summary()
            for item in self._iterate_locally():
                fn(item)
                summary.completed += 1
            return summary
        self._start_run()
        run = self._loop = ThreadedRun(self, fn, threads)
        self._session.track(run.end_at_exit)
        self._session.loop_active = True
        return run.run()

    @property
    def iterator(self) -> tqdm:
        """The tqdm progress bar of the current (or last) iteration."""
        if self._bar is None:
            raise ValueError("Iterator not initialized. Call __iter__() first.")
        return self._bar

    def __len__(self) -> int:
        """Number of tasks of the input (TypeError for generators, as with len())."""
        return len(self._tasks_input)  # type: ignore[arg-type]

    @property
    def has_more_jobs(self) -> bool:
        """True while a task this worker could run (now or later) is not finished."""
        if self.settings.disabled:
            return False
        with self._session.library_call():
            counts = self._store.counts()
            self._see_reqsets(counts)
        return counts.n(UNFINISHED, self._me.reqset_ids) > 0

    def close(self) -> None:
        """Stop after the current task (which counts as completed); outside a loop,
        go offline now. (From another thread too: while a loop exists, it only asks
        the loop to stop.)"""
        self._closing = True
        if self.settings.disabled:
            return
        loop = self._loop
        if loop is None or loop.finished:
            with self._session.library_call():
                self._go_offline()

    def __enter__(self) -> Graphband[T]:
        self._context_managed = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._context_managed = False
        if not self.settings.disabled:
            # A stop signal meanwhile waits for the hand-back, then raises.
            with self._session.library_call():
                self._go_offline()

    def _go_offline(self) -> None:
        loop = self._loop
        if loop is not None and not loop.end_now(
                "its worker went offline while the loop was suspended"):
            # The loop runs on another thread: it stops after its current task, and
            # its end takes the worker offline (it is not context managed any more).
            self._closing = True
            loop.wait_finished()
        self._prefetch.shutdown()
        self._session.go_offline()

    def __iter__(self) -> Iterator[T]:
        if self.settings.disabled:
            return self._iterate_locally()
        return self._iterate()

    def _item(self, task: Task[T]) -> t.Any:
        """What the loop yields for a task (Laufband yields ``task.data``)."""
        return task

    def _leave_as(self) -> WorkerState:
        """The state this worker takes when its loop ends."""
        return WorkerState.IDLE if self._context_managed else WorkerState.OFFLINE

    # -------------------------------------------------------------- iteration
    def _iterate_locally(self) -> Iterator[t.Any]:
        self._closing = False
        order = validate(self._tasks_input).order
        self._bar = tqdm(total=len(order), **self.tqdm_kwargs)
        with self._bar:
            for task in order:
                yield self._item(task)
                self._bar.update()
                if self._closing:
                    return

    def _start_run(self) -> None:
        """Before a loop or a map: one at a time, and none after a stop signal."""
        if self._loop is not None and self._loop.ended:
            self._loop.wait_finished()  # its end may still be recording on a thread
        if self._loop is not None and not self._loop.finished:
            raise RuntimeError(f"worker {self.identifier} already runs a loop; a worker "
                               "runs one loop at a time (start another worker instead)")
        if self._session.signal is not None:
            # A stop signal came while no loop could act on it (e.g. during the end of
            # the last one after a break): this worker runs no more loops.
            raise Preempted(self._session.signal)
        if self._session.drain is not None:  # so does one that drained
            raise drained(self._session.drain)
        self._closing = False
        self._cancelled = None  # a step tells again if the workflow is still cancelled
        self._me.stranded_since = None  # each run waits label_wait afresh
        self._label_wait_said = False  # ... and says so
        self._session.go_online()
        self._bar = tqdm(total=0, **self.tqdm_kwargs)

    def _iterate(self) -> Iterator[t.Any]:
        self._start_run()
        self._me.threads = 1
        loop = self._loop = _Loop(self)
        self._session.track(loop.end_at_exit)
        self._session.loop_active = True
        with stop_signals(self._session.on_signal):
            yield from loop.run()

    # ------------------------------------------------------------- counters
    def _see_reqsets(self, counts: Counts) -> None:
        if not self._known_reqsets.issuperset(counts.rows):
            self._refresh_reqsets()  # another worker added tasks with new requirements

    def _record_end(self, finishes: list[Finish], left: bool,
                    exc: BaseException | None) -> None:
        """The end of a loop or a map, in one transaction: record ``finishes`` and set
        the worker's state (unless the store set it already: ``left``); going offline
        stops the heartbeat, even if the record failed."""
        offline = self._leave_as() == WorkerState.OFFLINE
        state = None if left else self._leave_as()
        try:
            if finishes or state is not None:
                self._store.leave(self._me.id, finishes, state)
        except LaufbandError as err:
            if exc is None:
                raise
            # On the way out of another error (often the database went bad): report
            # this one, raise that one. What we hold comes back when we are declared
            # dead (the heartbeat stops below).
            log.error("could not record the end of worker %s's loop: %s", self._me.id, err)
        finally:
            self._store.stop_listening(close=True)  # a map listens with free slots
            if offline:
                self._prefetch.shutdown()
                self._session.went_offline()

    # ------------------------------------------------------------- walltime
    def _draining(self) -> bool:
        """Does this worker drain (stop claiming, leave once what runs is done)? Also
        starts the drain when its deadline (allocation end - walltime_margin) passed."""
        session, deadline = self._session, self._me.deadline
        if session.drain is None and deadline is not None and self._clock.now() >= deadline:
            margin = self.settings.walltime_margin
            session.start_drain(f"its allocation ends in "
                                f"{walltime.duration(deadline + margin - self._clock.now())} "
                                f"(walltime_margin={margin:g} s)")
        return session.drain is not None

    def _fits(self, task_id: str, started: float) -> bool:
        """Is the task started at ``started`` (epoch seconds) expected to end before this
        worker's deadline? Yes without a deadline or a runtime (declared, else the
        estimate): let it run, the stop signal at the time limit still hands it back.
        Reads memory only (the signal handler asks)."""
        me = self._me
        if me.deadline is None:
            return True
        task = self._by_id[task_id]
        runtime = task.runtime
        if runtime is None:
            reqset = me.reqset_keys.get(reqset_key(task))
            runtime = None if reqset is None else me.estimates.get(reqset)
        return runtime is None or started + runtime <= me.deadline

    def _short_of_time(self) -> str:
        left = (self._me.deadline or 0.0) - self._clock.now()
        return (f"what is left to run needs more time than its allocation has "
                f"({walltime.duration(left + self.settings.walltime_margin)} left, "
                f"walltime_margin={self.settings.walltime_margin:g} s)")

    def _observe(self, result: StepResult) -> None:
        """Update the progress bar, note a cancel or a leave for want of time, and
        enforce the failure policy."""
        # Every step and poll says whether the workflow is cancelled now: a resume
        # during the drain lets a worker that has not left yet go on.
        self._cancelled = result.cancelled
        if result.short_of_time:
            self._session.start_drain(self._short_of_time())
        counts = result.counts
        self._last_counts = counts
        self._see_reqsets(counts)
        self._note_labels_missing(result)
        bar = self._bar
        if bar is not None:
            bar.total = counts.total
            done = counts.n(["completed"])
            if done != bar.n:
                bar.update(done - bar.n)
        if result.final_failures:
            names = self._store.failed_tasks(limit=5)
            raise TaskFailedError(
                f"{result.final_failures} task(s) of this workflow failed for good "
                f"({', '.join(map(repr, names))}) and failure_policy='stop': this worker "
                "stops. Fix the cause and rerun with max_failed_retries (or "
                "max_killed_retries, e.g. LAUFBAND_MAX_FAILED_RETRIES) at least the number "
                "of times those tasks failed (were killed): a worker whose own budget "
                "allows another attempt runs them again, and their dependents after them. "
                "Completed tasks are kept."
            )

    def _note_labels_missing(self, result: StepResult) -> None:
        """Say once when this worker starts to wait for a worker with the labels that
        what its pending tasks wait for needs, and if it leaves them behind."""
        me, pending = self._me, result.counts.n(["pending"], self._me.reqset_ids)
        waiting = me.stranded_since is not None and pending > 0
        if waiting and not self._label_wait_said and not result.left:
            log.warning("worker %s: %d task(s) it could run wait for tasks that need "
                        "labels no live worker has (or, for a worker of an older "
                        "version of the graph, tasks the newer version changed); it "
                        "waits up to %g s for a worker to take them (label_wait), then "
                        "leaves. `laufband status` names the labels.", me.id, pending,
                        me.label_wait)
        self._label_wait_said = waiting
        if result.left and waiting and not result.short_of_time:
            log.warning("worker %s leaves: no worker took what its %d pending task(s) "
                        "wait for within label_wait (%g s). They stay pending: start "
                        "workers with the labels it needs (`laufband status` names "
                        "them), or, if this worker runs an older version of a changed "
                        "graph, workers of the new version, and they run.", me.id,
                        pending, me.label_wait)


def user_lock_file(db_path: str | None) -> str:
    """Where ``worker.lock`` lives by default: next to a SQLite database; for a server
    (PostgreSQL), next to the script, the one file workers on every node share as
    surely as a database file (their working folders may differ). ``lock="path"``
    puts it elsewhere."""
    if db_path is not None:
        return f"{db_path}.user.lock"
    script = sys.argv[0] if sys.argv and os.path.isfile(sys.argv[0]) else ""
    folder = os.path.dirname(os.path.abspath(script)) if script else os.getcwd()
    return os.path.join(folder, "laufband.user.lock")


class ThreadSharedLock:
    """``worker.lock``: the file lock shared by all workers, also shared by the threads
    of this process (a flufl Lock is held by a process: a second thread taking it
    would fail). Everything else is the flufl Lock's."""

    def __init__(self, lock: Lock) -> None:
        self._lock = lock
        self._threads = threading.Lock()
        self._owner: int | None = None

    def __enter__(self) -> ThreadSharedLock:
        if self._owner == threading.get_ident():
            # As flufl says for a nested acquisition (waiting would wait for ourselves).
            raise AlreadyLockedError("We already had the lock")
        self._threads.acquire()
        self._owner = threading.get_ident()
        try:
            self._lock.__enter__()
        except BaseException:
            self._owner = None
            self._threads.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._lock.__exit__(*exc)
        finally:
            self._owner = None
            self._threads.release()

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._lock, name)


class _UserDbLock:
    """``worker.db_lock``: the database lock as user code holds it (re-entrant; the
    worker's own threads wait while the loop body holds it; a stop signal that arrives
    while it is being taken or released is acted on once that is done)."""

    def __init__(self, lock: DatabaseLock, session: Session) -> None:
        self._lock = lock
        self._session = session

    @property
    def lockfile(self) -> str:
        return self._lock.lockfile

    @property
    def is_locked(self) -> bool:
        return self._lock.is_locked

    def __enter__(self) -> _UserDbLock:
        # No raise on the way out of the acquisition: `with` would not release it.
        with self._session.library_call(raise_pending=False):
            self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._session.library_call():
            self._lock.release()


class _Loop:
    """One pass of a worker's loop. Every way out (the end of the work, close(), break,
    an exception in the loop body or in laufband, a stop signal, the worker going
    offline while the loop is suspended, interpreter exit) goes through ``end``, once."""

    def __init__(self, worker: Graphband) -> None:
        self.w = worker
        self.store: Store = worker._store
        self.session: Session = worker._session
        self.me: Me = worker._me
        self.clock: Clock = worker._clock
        self.batcher: Batcher = worker._batcher
        self.prefetch: Prefetch = worker._prefetch
        self.queue: deque[Claim] = deque()
        self.done: list[Finish] = []
        self.current: Claim | None = None
        self.result: str | None = None  # set_result() of the current task (JSON)
        self.started = False  # the first step marks the worker busy
        self.left = False  # the store set this worker's state as the loop ended
        self.suspended = False  # the generator waits at its yield (user code runs)
        self.ended = False  # end() has begun
        self.finished = False  # end() is done
        self._finished = threading.Event()  # ... for other threads to wait on
        self._guard = threading.RLock()  # one end(), also from other threads
        self._signals_before = signals_received()
        self._drains_before = drains_raised()
        self._body_started = 0.0  # when the current task's body began (epoch seconds)
        self._cancel_check_at = 0.0  # _cancelled_meanwhile
        self._cancel_mark: tuple[int, ...] | None = None

    # ------------------------------------------------------------- the loop
    def run(self) -> Iterator[t.Any]:
        self.session.follow(self._current_fits)
        try:
            while (claim := self._next()) is not None:
                self._body_started = self.clock.now()
                self.current = claim
                started = self.clock.monotonic()
                self.session.enter_user_code()
                self.suspended = True
                yield self.w._item(self.w._by_id[claim.id])
                with self._guard:  # an end_now() on another thread finishes first
                    self.suspended = False
                self.session.leave_user_code()
                if self.ended:
                    return  # ended while suspended (the worker went offline)
                self.current = None
                self.batcher.observe_task(self.clock.monotonic() - started)
                result, self.result = self.result, None
                self.done.append(Finish(claim, Event.COMPLETED, result=result))
        except BaseException as exc:
            self.suspended = False
            self.session.leave_user_code()
            self.end(exc)
            raise
        self.end(None)

    def _stopping(self) -> bool:
        return (self.w._closing or self.session.signal is not None
                or self.w._cancelled is not None or self.w._draining())

    def _current_fits(self) -> bool:
        """Does the running task fit in the time left (see Graphband._fits)?"""
        claim = self.current
        return claim is None or self.w._fits(claim.id, self._body_started)

    def set_result(self, value: t.Any) -> None:
        self.result = encode_result(value, self.w.settings.max_result_size)

    def _cancelled_meanwhile(self) -> bool:
        """Between the tasks of a batch (no step runs): was the workflow cancelled? At
        most once a second, and only if the database changed (a stat)."""
        now = self.clock.monotonic()
        if now < self._cancel_check_at:
            return False
        self._cancel_check_at = now + CANCEL_CHECK
        mark = self.store.change_mark()
        if mark is not None and mark == self._cancel_mark:
            return False
        self._cancel_mark = mark
        self.w._cancelled = self.store.cancelled()
        return self.w._cancelled is not None

    def _next(self) -> Claim | None:
        """The next task to run, or None when the loop is over."""
        fresh = not self.queue  # a step now tells whether the workflow is cancelled
        if self._stopping() or (not self.queue and not self._refill()):
            return None
        if self._stopping() or (not fresh and self._cancelled_meanwhile()):
            return None  # asked to stop: what we claimed goes back
        claim = self.queue.popleft()
        if not self.queue:
            self._step_ahead()
        return claim

    def _refill(self) -> bool:
        """Record finished attempts and claim more; wait if others may unblock work.
        False when this worker's loop is over."""
        settled = self.prefetch.settle()
        if settled.error is not None:
            self.done[:0] = settled.unrecorded  # recorded on the way out
            raise settled.error
        self.done[:0] = settled.unrecorded  # a step ahead that was called off
        if settled.result is not None:
            self.batcher.observe_prefetch(bool(settled.result.claims))
            self.queue.extend(settled.result.claims)
            self.w._observe(settled.result)
            if self.queue:
                return True
        while not self._stopping():
            want = Want(self.batcher.size(), self.batcher.free(), start=not self.started,
                        leave=self.w._leave_as())
            result = self._step(self._take_done(), want)
            self.started = True
            self.queue.extend(result.claims)
            self.w._observe(result)
            if result.claims:
                return True
            if result.left or not waiting.wait_for_work(
                    self.store, self.me, self.clock, self.w._leave_as(), self._stopping,
                    self._observe_waiting):
                self.left = True
                return False
        return False

    def _observe_waiting(self, result: StepResult) -> None:
        self.left |= result.left
        self.w._observe(result)

    def _take_done(self) -> list[Finish]:
        done, self.done = self.done, []
        return done

    def _step(self, finishes: list[Finish], want: Want,
              cancel: Callable[[], bool] | None = None) -> StepResult:
        """Record ``finishes`` and claim (also run on the step thread)."""
        started = self.clock.monotonic()
        result = self.store.step(self.me, finishes, want, cancel)
        self.batcher.observe_step(self.clock.monotonic() - started)
        return result

    # ----------------------------------------------------------- step ahead
    def _step_ahead(self) -> None:
        """Start the next step in the background while the last claimed task runs
        (prefetch.py), if tasks are short enough for that to pay."""
        if self._stopping() or not self.batcher.prefetch() or self._nothing_ahead():
            return
        if self.store.lock is not None and self.store.lock.held_here():
            return  # user code holds worker.db_lock around the loop: the step would wait
        finishes = self._take_done()
        if not self.prefetch.start(self._step_ahead_of_task, finishes, self._give_back):
            self.done[:0] = finishes  # no thread to run it: the loop steps itself

    def _nothing_ahead(self) -> bool:
        """No task this worker may run is ready or pending (the tail of a run): a step
        ahead would claim nothing (a failed task made ready again is claimed by a step
        alone), and the loop's own step after the task records the whole batch, a
        transaction less per worker at the end of every run."""
        counts = self.w._last_counts
        return counts is not None and not counts.n(["ready", "pending"], self.me.reqset_ids)

    def _step_ahead_of_task(self, finishes: list[Finish], cancel: Callable[[], bool]
                            ) -> StepResult:
        return self._step(finishes, Want(self.batcher.size(), self.batcher.free(),
                                         ahead=True), cancel)

    def _give_back(self, ahead: StepResult, cancel: Callable[[], bool]) -> StepResult:
        """Return the tasks a step ahead claimed: the task before them runs too long."""
        detail = f"claimed ahead, but the task before it ran longer than {MAX_HOLD} s"
        back = self.store.step(self.me, [Finish(c, Event.PREEMPTED, detail)
                                         for c in ahead.claims], Want(0), cancel)
        return StepResult([], back.counts)

    # -------------------------------------------------------------- the end
    def end_now(self, why: str) -> bool:
        """End a loop that is suspended (its generator waits while user code runs): its
        task goes back. True once the loop has ended (here, or on another thread: then
        waited for); False if it runs on another thread right now."""
        with self._guard:
            if not self.ended:
                if not self.suspended:
                    return False
                self.end(None, why=why)
        self.wait_finished()
        return True

    def wait_finished(self) -> None:
        self._finished.wait()

    def end_at_exit(self) -> None:
        """The interpreter exits with this loop suspended: its task goes back. (One
        that runs on a thread that is still alive is not waited for: the process ends;
        going offline hands back what it holds.)"""
        with self._guard:
            if not self.ended and self.suspended:
                self.end(None, why="the process exited while the loop was suspended")

    def end(self, exc: BaseException | None, why: str | None = None) -> None:
        """The one way out: record what finished, settle how the current task ended,
        hand back everything else, and set the worker's state, in one transaction;
        then report a stop signal (and raise it, if nothing else is raised)."""
        with self._guard:
            if self.ended:
                return
            self.ended = True
            current = self._current_outcome(exc, self._signal_during_loop(), why)
            if self.store.db.in_transaction_here():
                # Collected by a garbage collection inside a transaction of this thread:
                # recording now would wait for that very transaction. A thread does it.
                threading.Thread(target=self._end_later, args=(current,),
                                 name="laufband-end").start()
                return
            try:
                self._end(current, exc, why)
            finally:
                self._finish()

    def _signal_during_loop(self) -> int | None:
        """This worker's stop signal, or one another loop of the process got while
        this one ran."""
        count, last = signals_received()
        if self.session.signal is not None:
            return self.session.signal
        return last if count != self._signals_before[0] else None

    def _end_later(self, current: Finish | None) -> None:
        with self._guard:
            try:
                self._end(current, GeneratorExit(), "collected")
            except Exception as err:  # nobody to raise it to
                log.error("could not record the end of worker %s's loop: %s", self.me.id, err)
            finally:
                self._finish()

    def _finish(self) -> None:
        self.session.follow(None)
        self.finished = True
        self.session.loop_active = False
        self._finished.set()

    def _end(self, current: Finish | None, exc: BaseException | None,
             why: str | None) -> None:
        finishes = self._settle() + self._take_done() + ([current] if current else [])
        detail = "claimed in a batch but not started"
        finishes += [Finish(c, Event.PREEMPTED, detail) for c in self.queue]
        self.queue.clear()
        self._record(finishes, exc)
        if self.w._bar is not None:
            self.w._bar.close()
        drain = self.session.drain
        if exc is None and why is None and drain is None:
            self._hint_failures()
        # Read again: a signal may have come while we recorded (it raises no earlier).
        signum = self.session.signal
        handed = current.claim.id if current and current.outcome == Event.PREEMPTED \
            else None
        if signum is not None:
            self._announce(signum, handed)
            if exc is None and why is None:
                raise Preempted(signum)
        elif drain is not None and why is None:
            announce_drain(drain, self.me.id, f"task {handed!r} was handed back to other "
                                              "workers; " if handed else "")
            if exc is None:
                raise drained(drain)
        if self.w._cancelled is not None and exc is None and why is None:
            announce_cancel(self.w._cancelled, self.me.id)
            raise Cancelled(self.w._cancelled.by)

    def _current_outcome(self, exc: BaseException | None, signum: int | None,
                         why: str | None) -> Finish | None:
        claim, self.current = self.current, None
        if claim is None:
            return None
        if signum is not None:
            return Finish(claim, Event.PREEMPTED, f"{signal.Signals(signum).name} received")
        if why is not None:
            return Finish(claim, Event.PREEMPTED, why)
        if (self.session.hand_back or isinstance(exc, Drained)
                or drains_raised() != self._drains_before):
            # The drain found that it would not finish in the time left, or it was
            # claimed but not started, or a loop in its body drained: no retry used.
            return Finish(claim, Event.PREEMPTED, self._drain_detail())
        frame = user_frame()
        self.session.expect_error(claim, frame)
        error = (f"the loop body raised an exception or left the loop (break) at "
                 f"{where(frame)}" if isinstance(exc, GeneratorExit) or exc is None
                 else f"{type(exc).__name__}: {exc}")
        return Finish(claim, Event.FAILED, error, self.w.settings.max_failed_retries,
                      Failure(error))

    def _drain_detail(self) -> str:
        drain = self.session.drain
        if drain is None:
            return "a loop in its body drained (its worker's time is up)"
        if self.session.hand_back:
            return f"{drain}: not expected to finish in the time left"
        return f"{drain}: claimed, not started"

    def _settle(self) -> list[Finish]:
        """The step in flight: its unrecorded finishes, and its claims handed back."""
        settled = self.prefetch.settle()
        if settled.error is not None:
            log.error("laufband: a background claim+finish step failed (%s); recording "
                      "its finishes again", settled.error)
        claims = settled.result.claims if settled.result is not None else []
        return settled.unrecorded + [
            Finish(c, Event.PREEMPTED, "claimed ahead, not started") for c in claims]

    def _record(self, finishes: list[Finish], exc: BaseException | None) -> None:
        self.w._record_end(finishes, self.left, exc)

    def _hint_failures(self) -> None:
        """A loop that ends with tasks failed for good says so, and how to rerun them
        (a rerun with the same budget would end at once, silently)."""
        counts = self.w._last_counts
        failed = counts.n(["failed", "killed"]) if counts is not None else 0
        if failed:
            blocked = counts.n(["blocked"])  # type: ignore[union-attr]
            log.warning(
                "laufband: %d task(s) of this workflow failed or were killed for good%s "
                "(`laufband status` shows why). After fixing the cause, rerun with "
                "max_failed_retries / max_killed_retries (LAUFBAND_MAX_FAILED_RETRIES) at "
                "least the number of times they failed: they run again, and then what "
                "waits for them.", failed, f", {blocked} more wait behind them" if blocked
                else "")

    def _announce(self, signum: int, task: str | None) -> None:
        announce_stop(signum, self.me.id,
                      f"task {task!r} was handed back to other workers; " if task else "")
