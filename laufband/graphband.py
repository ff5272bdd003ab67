"""The worker-side iterator: register the graph, claim, yield, finish, wait.

Each process that runs ``for task in Graphband(tasks()):`` is one worker. Workers share
nothing but the database; every claim and completion is one short transaction in
``store.py``, and this module only decides what to ask the store next.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import typing as t
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext

from flufl.lock import Lock
from tqdm import tqdm

from laufband import config
from laufband.batching import Batcher
from laufband.clock import Clock, SystemClock
from laufband.errors import LaufbandError, TaskFailedError
from laufband.heartbeat import Heartbeat
from laufband.locking import DEFAULT_LIFETIME, DatabaseLock, FastLock, speed_up
from laufband.prefetch import MAX_HOLD, Prefetch
from laufband.signals import Preempted, stop_signals
from laufband.states import UNFINISHED, Event, TaskState, WorkerState
from laufband.store import Claim, Counts, Finish, StepResult, Store, WorkerInfo, sqlite_path
from laufband.task import Task, read_graph, validate

log = logging.getLogger(__name__)

T = t.TypeVar("T")

#: Waiting for other workers polls the (tiny) counts table with this backoff, seconds.
POLL_MIN, POLL_MAX = 0.01, 0.25
#: On SQLite, a waiting worker looks at the database file this often (a stat, no lock).
WATCH_INTERVAL = 0.005
#: ... and reads the counters at most this often while they keep changing (every commit
#: changes the file: waiters reading at each one would crowd out the committing workers).
READ_GAP_MAX = 0.05


def _pid_gone(hostname: str, pid: int) -> bool:
    """True if ``pid`` on this host no longer exists (a crashed earlier incarnation)."""
    if hostname != socket.gethostname():
        return False  # cannot tell for other hosts; the heartbeat timeout decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _shutdown(store: Store, heartbeat: Heartbeat, worker: str) -> None:
    """Mark the worker offline when its object is collected or the interpreter exits."""
    if not heartbeat.running:
        return  # not online (the heartbeat runs exactly while the worker is online)
    heartbeat.stop()
    try:
        store.set_worker_state(worker, WorkerState.OFFLINE)
    except Exception as exc:  # at exit, report and move on
        log.warning("could not mark worker %s offline: %s", worker, exc)


class Graphband(t.Generic[T]):
    """Iterate over the tasks of a DAG together with every other worker of the workflow.

    Each task is yielded by exactly one worker (per attempt), only after all its
    dependencies completed. The loop waits while another live worker runs a task that
    could make work for this one, and ends when nothing more can become claimable.
    """

    default_db = "sqlite:///graphband.sqlite"

    def __init__(
        self,
        tasks: Iterable[Task[T]],
        *,
        lock: Lock | None = None,
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
        clock: Clock | None = None,
    ) -> None:
        self.settings = config.resolve(
            db=db, default_db=self.default_db, identifier=identifier,
            failure_policy=failure_policy, heartbeat_timeout=heartbeat_timeout,
            heartbeat_interval=heartbeat_interval, max_killed_retries=max_killed_retries,
            max_failed_retries=max_failed_retries, disabled=disabled, labels=labels,
            journal_mode=journal_mode, batch_size=batch_size,
        )
        self._tasks_input = tasks
        self.tqdm_kwargs = dict(tqdm_kwargs or {})
        self._clock = clock or SystemClock()
        self._by_id: dict[str, Task[T]] = {}
        self._generation = 0
        self._reqset_ids: list[int] = []
        self._known_reqsets: set[int] = set()
        self._bar: tqdm | None = None
        self._closing = False
        self._signal: int | None = None
        self._in_user_code = False
        self._current: Claim | None = None
        self._queue: deque[Claim] = deque()
        self._done: list[Finish] = []
        self._batcher = Batcher(None if self.settings.batch_size == "auto"
                                else self.settings.batch_size)
        self._prefetch = Prefetch("laufband-step", self._clock)
        self._iterating = False
        self._announce_busy = False
        self._left = False  # the store marked this worker idle/offline as its loop ended
        self._online = False
        self._context_managed = False
        if self.settings.disabled:
            self.lock = lock if lock is not None else nullcontext()
            self.db_lock = db_lock if db_lock is not None else nullcontext()
            return
        self._open(lock, db_lock)

    # ------------------------------------------------------------------ set-up
    def _open(self, lock: Lock | None, db_lock: Lock | None) -> None:
        s = self.settings
        spec = read_graph(self._tasks_input)
        path = sqlite_path(s.db)
        if path is None or not os.path.exists(path):
            _ = spec.order  # a new workflow: check the graph before creating any file
        base = path or "laufband"
        lifetime = float(os.environ.get("LAUFBAND_LOCK_LIFETIME", DEFAULT_LIFETIME))
        # The user's lock is separate from the database lock, so that user critical
        # sections never block claims; the heartbeat keeps it alive while held.
        self.lock = lock if lock is not None else FastLock(
            f"{base}.user.lock", lifetime=max(2 * s.heartbeat_interval, lifetime))
        self.db_lock = speed_up(db_lock) if db_lock is not None else FastLock(
            f"{base}.lock", lifetime=lifetime)
        self._store = Store(s.db, DatabaseLock(self.db_lock), self._clock, s.journal_mode)
        if self._store.generation_of(spec.digest) is None:
            # Not registered yet (a new or a changed graph): check it before going online.
            # If it is, a worker that checked it registered it: joining a big graph skips
            # the ordering (measured: about half of reading 1M tasks).
            _ = spec.order
        self._heartbeat = Heartbeat(self._store, s.identifier, s.heartbeat_interval,
                                    s.heartbeat_timeout, s.max_killed_retries, self.lock)
        self._go_online()
        self._finalizer = weakref.finalize(self, _shutdown, self._store, self._heartbeat,
                                           s.identifier)
        # Register now, so a worker started before a rerun added tasks keeps claiming
        # only the generation of the graph it has data for.
        self._generation = self._store.register_graph(spec, s.identifier)
        self._by_id = spec.by_id
        self._refresh_reqsets()
        # tqdm makes its (multiprocessing) write lock at the first bar: ~10 ms of imports
        # and a semaphore, which would otherwise delay the first claim of every worker.
        tqdm.get_lock()

    def _go_online(self) -> None:
        if self._online:
            return
        s = self.settings
        info = WorkerInfo(s.identifier, socket.gethostname(), os.getpid(), s.labels,
                          s.heartbeat_timeout)
        self._store.register_worker(info, _pid_gone, s.max_killed_retries)
        self._heartbeat.start()
        self._online = True

    def _go_offline(self, marked: bool = False) -> None:
        if not self._online:
            return
        self._online = False
        self._salvage()  # close() or __exit__ while a loop is suspended mid-iteration
        self._prefetch.shutdown()
        self._heartbeat.stop()
        if marked:
            return  # the database says so already
        try:
            self._store.set_worker_state(self.settings.identifier, WorkerState.OFFLINE)
        except LaufbandError as exc:
            # Often on the way out of an error (the database went bad): report it, but
            # let the error that ended the loop be the one the user sees. A worker not
            # marked offline is declared dead after its heartbeat timeout.
            log.error("could not mark worker %s offline: %s", self.identifier, exc)

    def _refresh_reqsets(self) -> None:
        self._reqset_ids = self._store.reqsets_for(self.settings.labels)
        self._known_reqsets = set(self._store.counts().rows)

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
        return self._current.attempt if self._current is not None else None

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
        counts = self._counts()
        return counts.n(UNFINISHED, self._reqset_ids) > 0

    def close(self) -> None:
        """Stop after the current task (which counts as completed)."""
        self._closing = True
        if not self._iterating and not self.settings.disabled:
            self._go_offline()

    def __enter__(self) -> Graphband[T]:
        self._context_managed = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._context_managed = False
        if not self.settings.disabled:
            self._go_offline()

    def __iter__(self) -> Iterator[T]:
        if self.settings.disabled:
            return self._iterate_locally()
        return self._iterate()

    def _item(self, task: Task[T]) -> t.Any:
        """What the loop yields for a task (Laufband yields ``task.data``)."""
        return task

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

    def _iterate(self) -> Iterator[t.Any]:
        self._closing = False
        self._signal = None
        self._left = False
        self._iterating = True
        self._go_online()
        try:
            self._announce_busy = True  # with the first step
            self._bar = tqdm(total=0, **self.tqdm_kwargs)
            with stop_signals(self._on_signal):
                yield from self._work()
            if self._signal is not None:
                self._stop_for_signal(None)
        finally:
            self._iterating = False
            if self._bar is not None:
                self._bar.close()
            self._end_iteration()

    def _work(self) -> Iterator[t.Any]:
        """Claim (in batches), yield, and record completions with the next claim."""
        self._queue.clear()
        self._done.clear()
        while self._queue or self._refill():
            claim = self._queue.popleft()
            if not self._queue:
                self._step_ahead()
            self._current = claim
            started = self._clock.monotonic()
            try:
                self._in_user_code = True  # from here a stop signal hands `claim` back
                if self._signal is not None:
                    # It arrived during the store call that claimed `claim` (which only
                    # set the flag): do not start the task, hand it back now.
                    self._on_signal(self._signal)
                yield self._item(self._by_id[claim.id])
            except BaseException:
                # break, an exception in the loop body, the generator being collected,
                # or a stop signal: the task did not complete.
                self._in_user_code = False
                self._abandon(claim)
                raise
            self._in_user_code = False
            self._batcher.observe_task(self._clock.monotonic() - started)
            self._current = None
            self._done.append(Finish(claim, Event.COMPLETED))
            if self._closing or self._signal is not None:
                self._hand_back()
                return

    def _refill(self) -> bool:
        """Record finished attempts and claim more; wait if others may unblock work.
        False when this worker's loop is over."""
        settled = self._prefetch.settle()
        if settled.error is not None:
            self._done[:0] = settled.unrecorded  # for the hand-back on the way out
            raise settled.error
        ahead = settled.result
        if ahead is not None:
            self._batcher.observe_prefetch(bool(ahead.claims))
            self._counted(ahead)
            if ahead.claims:
                self._queue.extend(ahead.claims)
                return True
        while True:
            if self._closing or self._signal is not None:
                self._hand_back()
                return False
            result = self._step(self._take_done(), leave=self._leave_as())
            counts = self._counted(result)
            if result.claims:
                self._queue.extend(result.claims)
                return True
            if result.left or not self._wait_for_work(counts):
                return False

    def _step_ahead(self) -> None:
        """Start the next step in the background while the last claimed task runs
        (prefetch.py), if tasks are short enough for that to pay."""
        if self._closing or self._signal is not None or not self._batcher.prefetch():
            return
        finishes = self._take_done()
        if not self._prefetch.start(self._step_ahead_of_task, finishes, self._give_back):
            self._done[:0] = finishes  # no thread to run it: the loop steps itself

    def _take_done(self) -> list[Finish]:
        done, self._done = self._done, []
        return done

    def _step_ahead_of_task(self, finishes: list[Finish]) -> StepResult:
        return self._step(finishes, ahead=True)

    def _give_back(self, ahead: StepResult) -> StepResult:
        """Return the tasks a step ahead claimed: the task before them runs too long
        (on the step thread, see prefetch.py)."""
        detail = f"claimed ahead, but the task before it ran longer than {MAX_HOLD} s"
        back = self._store.step(self.identifier,
                                [Finish(c, Event.PREEMPTED, detail) for c in ahead.claims],
                                self._reqset_ids, self._generation, 0)
        return StepResult([], back.counts, ahead.fenced or back.fenced)

    def _step(self, finishes: list[Finish], leave: WorkerState | None = None,
              ahead: bool = False) -> StepResult:
        """Record ``finishes`` and claim a batch (also run on the prefetch thread: the
        caller checks the result with ``_counted``)."""
        s, batcher = self.settings, self._batcher
        started = self._clock.monotonic()
        busy, self._announce_busy = self._announce_busy, False
        result = self._store.step(s.identifier, finishes, self._reqset_ids, self._generation,
                                  batcher.size(), stop_on_failure=s.failure_policy == "stop",
                                  free=batcher.free(), busy=busy, leave=leave, ahead=ahead)
        batcher.observe_step(self._clock.monotonic() - started)
        return result

    def _hand_back(self, current: Finish | None = None) -> None:
        """Record what finished, plus ``current``, and return unstarted claims."""
        detail = "claimed in a batch but not started"
        settled = self._prefetch.settle()
        if settled.error is not None:
            log.error("laufband: a background claim+finish step failed (%s); recording "
                      "its finishes again", settled.error)
        if settled.result is not None:
            self._queue.extend(settled.result.claims)
        finishes = settled.unrecorded + self._take_done() + ([current] if current else [])
        finishes += [Finish(c, Event.PREEMPTED, detail) for c in self._queue]
        self._queue.clear()
        if finishes:
            self._store.step(self.identifier, finishes, self._reqset_ids, self._generation, 0)

    def _abandon(self, claim: Claim) -> None:
        if self._current is None:
            return  # already handed back (stop signal)
        self._current = None
        failed = Finish(claim, Event.FAILED,
                        "the loop body raised, or the loop was left with break",
                        self.settings.max_failed_retries)
        try:
            self._hand_back(failed)
        except LaufbandError as exc:
            log.error("could not record the failure of task %r: %s", claim.id, exc)

    def _on_signal(self, signum: int) -> None:
        """A stop signal: hand everything back now and leave (see signals.py)."""
        name = signal.Signals(signum).name
        self._signal = signum
        if self._in_user_code and self._store.lock.held_here():
            # The loop body is inside a laufband read (has_more_jobs) or holds
            # worker.db_lock: handing back now could wait for a step that waits for
            # this very lock. The loop hands back when the current task returns.
            log.warning("laufband: %s received while the loop body holds the database "
                        "lock; stopping when the current task returns", name)
            return
        if not self._in_user_code:
            # Inside our own store call or waiting: the loop hands back at its next
            # check (within one poll interval), never inside a half-done transaction.
            log.warning("laufband: %s received; stopping after the current database step",
                        name)
            return
        # Clear the flag first: a second signal during the hand-back only sets _signal.
        self._in_user_code = False
        claim, self._current = self._current, None
        if claim is not None:
            self._hand_back(Finish(claim, Event.PREEMPTED, f"{name} received"))
        self._stop_for_signal(claim)

    def _stop_for_signal(self, claim: Claim | None) -> t.NoReturn:
        assert self._signal is not None
        name = signal.Signals(self._signal).name
        self._go_offline()
        what = f"task {claim.id!r} was handed back to other workers; " if claim else ""
        print(f"laufband: {name} received: {what}worker {self.identifier} stops "
              f"(exit code {128 + self._signal}).", file=sys.stderr)
        raise Preempted(self._signal)

    def _salvage(self) -> None:
        """Record what finished and return unstarted claims, if any are left (the loop
        ended with an error, or is suspended): never leave them with an offline worker."""
        try:
            self._hand_back()
        except LaufbandError as exc:
            log.error("could not return the tasks worker %s holds: %s (they go back when "
                      "it is marked offline)", self.identifier, exc)

    def _end_iteration(self) -> None:
        # `left`: a transaction marked us idle/offline already: the one that ended our
        # loop, or another worker's that finished the workflow (release_waiters).
        left, self._left = self._left, False
        if self._context_managed:
            self._salvage()  # after an error in a store call (_go_offline does it too)
            if left:
                return
            try:
                self._store.set_worker_state(self.identifier, WorkerState.IDLE)
            except LaufbandError as exc:
                log.error("could not mark worker %s idle: %s", self.identifier, exc)
        else:
            self._go_offline(marked=left)

    # ---------------------------------------------------------------- waiting
    def _wait_for_work(self, counts: Counts) -> bool:
        """Wait until a task may be claimable (True) or nothing can change (False; the
        worker's state was set in the transaction that found so, its own or the one that
        finished the workflow)."""
        # Ready tasks the empty claim saw are ones we cannot take (a newer graph's).
        unclaimable = counts.n([TaskState.READY], self._reqset_ids)
        delay = POLL_MIN
        mark = self._store.change_mark()
        read_at = self._clock.monotonic()
        while self._signal is None:
            if mark is None:
                self._clock.sleep(delay)
            else:
                # Watch the file (a stat: no lock, no write) and read the counters under
                # the lock once it changed and `delay` passed, or after POLL_MAX anyway.
                self._clock.sleep(WATCH_INTERVAL)
                seen = self._store.change_mark()
                since = self._clock.monotonic() - read_at
                if since < POLL_MAX and (seen == mark or since < delay):
                    continue
                mark, read_at = seen, self._clock.monotonic()
            result = self._store.poll(self.identifier, self._reqset_ids, unclaimable,
                                      self._leave_as())
            counts = self._counted(result)
            if result.left:
                return False
            if counts.n([TaskState.READY], self._reqset_ids) > unclaimable:
                return True
            delay = self._next_read_gap(delay, counts, watching=mark is not None)
        return True  # a stop signal: let _refill hand back and stop

    @staticmethod
    def _next_read_gap(delay: float, counts: Counts, watching: bool) -> float:
        """How long a waiting worker lets pass before it reads the counters again."""
        if not watching:
            return min(2 * delay, POLL_MAX)
        if counts.n([TaskState.PENDING, TaskState.READY]) == 0:
            # Only running tasks are left: each commit from now on is mostly one of them
            # ending (besides heartbeats and workers leaving), and the last one releases
            # this worker. Read soon after each, more often the fewer run.
            running = counts.n([TaskState.RUNNING])
            return min(READ_GAP_MAX, WATCH_INTERVAL * max(1, running))
        # Commits keep coming (a chain hands over every few ms): space the reads out,
        # or they crowd the lock that the committing workers need.
        return min(2 * delay, READ_GAP_MAX)

    def _leave_as(self) -> WorkerState:
        """The state this worker takes when its loop ends."""
        return WorkerState.IDLE if self._context_managed else WorkerState.OFFLINE

    def _counted(self, result: StepResult) -> Counts:
        """Take note of a store call's counters (progress, failure policy, new
        requirement sets) and of whether it marked this worker as gone."""
        self._left |= result.left
        self._observe(result.counts)
        return result.counts

    def _counts(self) -> Counts:
        counts = self._store.counts()
        self._see_reqsets(counts)
        return counts

    def _see_reqsets(self, counts: Counts) -> None:
        if not self._known_reqsets.issuperset(counts.rows):
            self._refresh_reqsets()  # another worker added tasks with new requirements

    def _observe(self, counts: Counts) -> None:
        """Update the progress bar and enforce the failure policy."""
        self._see_reqsets(counts)
        bar = self._bar
        if bar is not None:
            bar.total = counts.total
            done = counts.n([TaskState.COMPLETED])
            if done != bar.n:
                bar.update(done - bar.n)
        if self.settings.failure_policy == "stop":
            failed = counts.n([TaskState.FAILED, TaskState.KILLED])
            if failed:
                names = self._store.failed_tasks(limit=5)
                raise TaskFailedError(
                    f"{failed} task(s) of this workflow failed ({', '.join(map(repr, names))})"
                    " and failure_policy='stop': this worker stops. Fix the cause and rerun; "
                    "completed tasks are kept."
                )
