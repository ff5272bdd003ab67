"""Everything SQL. ``Store`` is the one way in: each of its verbs is one transaction (or
one read), and nothing outside this package builds a query or knows the dialect.

    connection.py    URLs and paths, the engine, transactions, error translation
    schema.py        tables, the schema version, migrations
    ledger.py        one transaction's statements; books every task state change
    attempts.py      ending attempts, fencing, blocking and retrying
    claiming.py      which tasks a worker claims, and how many
    runtimes.py      what fits in the time of a worker whose allocation ends
    workers.py       worker rows: registering, heartbeats, reaping, leaving
    registration.py  adding a graph
    reads.py         read models for status displays and Monitor
    timeline.py      what a report draws: every attempt, completions over time
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from flufl.lock import Lock

from laufband.clock import Clock, SystemClock
from laufband.errors import ConfigError
from laufband.locking import (
    DEFAULT_LIFETIME,
    DatabaseLock,
    FastLock,
    database_lock,
    speed_up,
)
from laufband.states import TaskState, WorkerState
from laufband.store import (
    attempts,
    cancelling,
    claiming,
    pruning,
    reads,
    resources,
    runtimes,
    schema,
    timeline,
    workers,
)
from laufband.store.advisory import advisory_lock
from laufband.store.connection import (
    Conflict,
    Database,
    absolute_url,
    database_url,
    display_url,
    sqlite_path,
)
from laufband.store.ledger import Ledger
from laufband.store.model import (
    Claim,
    Counts,
    Failure,
    Finish,
    Me,
    StepResult,
    Want,
    WorkerInfo,
)
from laufband.store.registration import Registration, generation_of
from laufband.task import GraphSpec

__all__ = [
    "Claim", "Counts", "Failure", "Finish", "Me", "StepResult", "Store", "Want",
    "WorkerInfo", "database_url", "display_url", "sqlite_path",
]

S = TaskState
Cancel = Callable[[], bool] | None


class _Alone(enum.Enum):
    """A step beside others (Store.step) hands over to a step alone: all of it, or
    the rest after its completions."""
    REDO = "redo"
    REST = "rest"


class Store:
    """The database of one workflow, shared by all its workers."""

    def __init__(self, url: str, lock: DatabaseLock | None, clock: Clock,
                 journal_mode: str = "delete", read_only: bool = False) -> None:
        self.clock = clock
        self.db = Database(url, lock, journal_mode, read_only)
        if read_only:
            with self.db.read() as conn:
                schema.check_readable(schema.stored_version(conn), self.shown,
                                      sa.inspect(conn).get_table_names())
        else:
            with self.db.transaction() as conn:
                schema.ensure(conn, self.shown, clock.now())
        self.db.opened = True

    @classmethod
    def open_read_only(cls, url: str, clock: Clock | None = None) -> Store:
        """For looking only (status, Monitor): never writes, never upgrades, works on a
        read-only file or folder. (With SQLite's lock taken whole, connection.py, a
        reader that may write the file rolls back a transaction a killed worker left
        half-done, as SQLite's own readers do; the next worker would.) Takes the
        database lock for its reads where it can create the lock file (consistent reads
        on any file system), else reads under SQLite's own locks."""
        path = sqlite_path(absolute_url(url))
        lock = None  # a server's snapshot needs none (connection.Database.read)
        if path is not None and os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
            lock = database_lock(FastLock(f"{path}.lock"))
        return cls(url, lock, clock or SystemClock(), read_only=True)

    @classmethod
    def open_existing(cls, url: str) -> Store:
        """For a command that changes an existing workflow (retry, cancel, prune):
        under the writers' lock as workers take it; never creates or upgrades one."""
        cls.open_read_only(url)  # a clear error for a missing, foreign or older one
        return cls(url, cls.writers_lock(url, DEFAULT_LIFETIME), SystemClock())

    @staticmethod
    def writers_lock(url: str, lifetime: float, given: Lock | None = None) -> DatabaseLock:
        """The lock that serialises this database's writers (and is ``worker.db_lock``):
        for SQLite, the file lock ``<db>.lock`` next to it (or ``given``, a flufl Lock);
        for PostgreSQL, an advisory lock on the server (advisory.py)."""
        url = absolute_url(url)
        path = sqlite_path(url)
        if path is None and sa.engine.make_url(url).get_backend_name() == "sqlite":
            path = "laufband"  # an in-memory database: a lock file in this folder
        if path is not None:
            return database_lock(speed_up(given) if given is not None
                                 else FastLock(f"{path}.lock", lifetime=lifetime))
        if given is not None:
            raise ConfigError(
                f"db_lock= is a lock file for SQLite; on {display_url(url)} workers "
                "serialise with an advisory lock on the server. Leave db_lock out.")
        return advisory_lock(url, lifetime)

    @property
    def url(self) -> str:
        return self.db.url

    @property
    def shown(self) -> str:
        """The URL as it may be printed (password masked)."""
        return self.db.shown

    @property
    def lock(self) -> DatabaseLock | None:
        return self.db.lock

    def change_mark(self, listen: bool = False) -> tuple[int, ...] | None:
        """Changes when somebody committed (see Database.change_mark); ``listen``: for a
        waiting worker, on a server too (a connection of its own: notices.py)."""
        return self.db.change_mark(listen)

    def stop_listening(self, close: bool = False) -> None:
        """Stop listening for commits (a server's change mark, notices.py); ``close``:
        the end of a loop, close its connection too."""
        self.db.stop_listening(close)

    @contextmanager
    def _ledger(self, cancel: Cancel = None, beside: bool = False, step: bool = False
                ) -> Iterator[Ledger]:
        """A write transaction that books state changes and flushes them at its end
        (``beside``: a step beside other steps, claiming.py; ``step``: a worker's
        step, which on a server tells the waiting workers of its commit only if it
        concerns them, Ledger.wakes)."""
        with self.db.transaction(cancel, shared=beside, notify=not step) as conn:
            led = Ledger(conn, self.clock.now(), beside, tells=step)
            yield led
            led.flush()

    # ------------------------------------------------------------------ workers
    def register_worker(self, info: WorkerInfo, is_gone: Callable[[str, int], bool]) -> None:
        """Add (or take over) this worker's row; refuse an identifier a live worker uses."""
        with self._ledger() as led:
            workers.register(led, info, is_gone)

    def heartbeat(self, worker: str, budget: int, stalled_after: float,
                  cancel: Cancel = None, me: Me | None = None) -> bool:
        """Beat and reap dead workers (see workers.heartbeat). False if we had been
        declared dead. With ``me`` (a worker whose allocation ends), read its runtime
        estimates again too (they are in memory before the beat is visible)."""
        with self._ledger(cancel) as led:
            alive = workers.heartbeat(led, worker, budget, stalled_after)
            if me is not None:
                runtimes.refresh(led, me, force=True)
            return alive

    # -------------------------------------------------------------------- graph
    def generation_of(self, spec: GraphSpec) -> int | None:
        """The generation of the registered graph ``spec`` is, if any (with fingerprints:
        only the latest one counts, so going back to an earlier version of a graph
        applies that version again)."""
        with self.db.read() as conn:
            return generation_of(conn, spec.digest, spec.fingerprints)

    def register_graph(self, spec: GraphSpec, worker: str, downstream: bool = True) -> int:
        """Store the graph (idempotently); return the generation this worker may claim.
        With fingerprints (``spec.fingerprints``), changes are applied and what they
        concern invalidated (``downstream``: and everything below it)."""
        while True:
            generation = self.generation_of(spec)
            if generation is not None:
                return generation
            _ = spec.hashes, spec.order  # computed before any lock is taken
            registration = Registration(spec, worker, self.shown, downstream)
            with self.db.read() as conn:
                last, step = registration.begin(Ledger(conn, 0.0))
            for lo in range(1, last + 1, step):
                with self.db.read() as conn:
                    registration.compare(Ledger(conn, 0.0), lo, lo + step - 1)
            with self.db.read() as conn:
                registration.conclude(Ledger(conn, 0.0))
            applied = False
            with self.db.transaction() as conn:
                generation = generation_of(conn, spec.digest, spec.fingerprints)
                if generation is None:
                    generation = registration.apply(conn, self.clock.now(), self.lock)
                    applied = generation is not None
            if generation is not None:
                if applied:
                    self.db.refresh_statistics()
                return generation  # else another registration came first: again

    def reqsets_for(self, me: Me, labels: frozenset[str]) -> None:
        """Set the requirement sets a worker with ``labels`` may run (most specific
        first, with how many labels they need), and those whose tasks hold resources."""
        with self.db.read() as conn:
            led = Ledger(conn, 0.0)
            specific = workers.reqsets_for(led, labels)
            me.reqset_ids, me.specific = list(specific), specific
            me.needs = resources.resourced(led)

    # ------------------------------------------------------------------- limits
    def declare_limits(self, limits: dict[str, int], worker: str) -> dict[str, int]:
        """Store the limits the workflow does not have yet (the stored ones stay: see
        ``set_limits``); returns every stored limit."""
        with self._ledger() as led:
            return resources.declare(led, limits, worker)

    def set_limits(self, limits: dict[str, int], who: str) -> dict[str, int]:
        """Change limits (``laufband limits``); refused below what an unfinished task
        needs. Running tasks keep what they hold; new claims see the new limits."""
        with self._ledger() as led:
            return resources.change(led, limits, who)

    def limits(self) -> dict[str, tuple[int, int]]:
        """Every limit and what running tasks hold of it: name -> (capacity, held)."""
        with self.db.read() as conn:
            return resources.usage(Ledger(conn, 0.0))

    # --------------------------------------------------------------- the loop
    def step(self, me: Me, finishes: list[Finish], want: Want, cancel: Cancel = None
             ) -> StepResult:
        """Record how attempts ended and claim more, in one transaction (see Want).

        Also: a worker's own retry budget makes tasks that failed (or were killed) for
        good under a smaller one ready again (looked for when the number of such tasks
        changed), and with ``me.stop_on_failure`` nothing is claimed once a task failed
        for good under every live worker's budget.

        On a server, a step whose attempts all completed runs beside other workers'
        such steps (claiming.py). It runs alone instead when it would make failed tasks
        ready again, or when the server picked it as the victim of a deadlock (both
        times nothing of it was committed); when it claims nothing, its completions
        stay recorded and the rest (claim, wait or leave) runs alone. So a step can
        fail after it recorded ``finishes``: what it recorded is removed from that list
        (in place), and callers put back only what is left in it.
        """
        if not self.db.sqlite and claiming.may_step_beside(me, finishes):
            try:
                outcome = self._step(me, finishes, want, cancel, beside=True)
            except Conflict:
                outcome = _Alone.REDO  # rolled back by the server
            if isinstance(outcome, StepResult):
                return outcome
            if outcome is _Alone.REST:
                finishes.clear()  # recorded beside the others (the caller's list)
        result = self._step(me, finishes, want, cancel)
        assert isinstance(result, StepResult)
        return result

    def _step(self, me: Me, finishes: list[Finish], want: Want, cancel: Cancel,
              beside: bool = False) -> StepResult | _Alone:
        """``step`` in one transaction; ``beside``: or what has to run alone."""
        with self._ledger(cancel, beside, step=True) as led:
            runtimes.refresh(led, me)  # a worker whose allocation ends: now and then
            if beside and self._to_revive(led, me, force=want.start):
                return _Alone.REDO
            if want.start:
                workers.start_loop(led, me)
            attempts.end(led, me.id, cancelling.settle(led, finishes))
            stopped = cancelling.flag(led)
            if stopped is not None:  # `laufband cancel`: claim nothing, leave
                return StepResult([], led.counts, cancelled=stopped)
            self._revive(led, me, force=want.start)
            final = workers.final_failures(led) if me.stop_on_failure else 0
            limit = 0 if final else claiming.how_many(led, me, want)
            claimed = claiming.claim(led, me, limit, want.ahead,
                                     clock=self.clock.now if beside else None)
            if beside and not claimed and not want.ahead:
                # Whether to wait or leave is not a step beside others' to decide: the
                # tasks another claim holds locked look ready in our counts but are
                # not found (SKIP LOCKED), and what other steps complete meanwhile we
                # do not see, so we would leave while they are taken. (A step ahead
                # decides neither: its loop steps again after the task it runs.)
                return _Alone.REST
            if claimed:
                me.stranded_since = None  # it got work: a later wait starts afresh
            left = not claimed and not final and workers.leave_if_done(led, me, want.leave)
            if not (claimed or left) and want.leave is not None:
                workers.wait(led, me.id, want.leave)
            short = left and self._short_of_time(led, me)
            return StepResult(claimed, led.counts, left, final_failures=final,
                              short_of_time=short)

    @staticmethod
    def _short_of_time(led: Ledger, me: Me) -> bool:
        """This worker just left: was it only for want of time (unfinished tasks it
        could run, but not in the time its allocation has left)?"""
        if me.deadline is None:
            return False
        unlimited = dataclasses.replace(me, deadline=None)
        return bool(claiming.find(led, unlimited, 1)) or not workers.done_for(led, unlimited)

    @staticmethod
    def _to_revive(led: Ledger, me: Me, force: bool) -> bool:
        """Look for failed tasks this worker's budget makes ready again (when their
        number changed since it last looked)?"""
        failures = led.counts.n([S.FAILED, S.KILLED])
        return bool(failures) and (force or failures != me.seen_failures)

    def _revive(self, led: Ledger, me: Me, force: bool) -> None:
        if self._to_revive(led, me, force):
            attempts.revive(led, me)
        me.seen_failures = led.counts.n([S.FAILED, S.KILLED])

    def poll(self, me: Me, leave: WorkerState | None = None) -> StepResult:
        """For a waiting worker: the counters, whether it may claim a task now, and
        (with ``leave``) whether it leaves, as in ``step``.

        A read; it writes only when the worker leaves and the transaction that finished
        the workflow did not already set its state (ledger.SQL["release_waiters"])."""
        with self.db.read() as conn:
            led = Ledger(conn, self.clock.now())  # now: what fits in a worker's time
            stopped = cancelling.flag(led)
            if stopped is not None:
                return StepResult([], led.counts, cancelled=stopped)
            if leave is not None and workers.released(led, me.id, leave):
                return StepResult([], led.counts, left=True)
            final = workers.final_failures(led) if me.stop_on_failure else 0
            if final or self._claimable(led, me):
                if not final:
                    me.stranded_since = None  # work came: a later wait starts afresh
                return StepResult([], led.counts, claimable=not final, final_failures=final)
            if leave is None or not workers.done_for(led, me):
                return StepResult([], led.counts)
        with self._ledger() as led:
            claimable = self._claimable(led, me)
            left = not claimable and workers.leave_if_done(led, me, leave)
            short = left and self._short_of_time(led, me)
        return StepResult([], led.counts, left=left, claimable=claimable, short_of_time=short)

    @staticmethod
    def _claimable(led: Ledger, me: Me) -> bool:
        """Is a task ready that this worker may claim, or one its budget revives?"""
        if led.counts.n([S.READY], me.reqset_ids) and claiming.find(led, me, 1):
            return True
        failures = led.counts.n([S.FAILED, S.KILLED])
        return bool(failures and failures != me.seen_failures
                    and attempts.revivable(led, me))

    def leave(self, worker: str, finishes: list[Finish], state: WorkerState | None) -> None:
        """The end of a loop, in one transaction: record how its attempts ended, and set
        the worker's state (``None``: keep it). A worker never leaves holding a live
        attempt: any left is handed back (no retry used)."""
        with self._ledger() as led:
            attempts.end(led, worker, cancelling.settle(led, finishes))
            if state is not None:
                workers.set_state(led, worker, state)
                attempts.hand_back_all(led, worker, f"worker {worker} left holding it")

    def prune(self, keep: int, vacuum: bool = False) -> pruning.Pruned:
        """Delete old history (see pruning.py), a range of tasks per transaction; with
        ``vacuum``, give the freed space back to the file system (workers wait for it)."""
        result = pruning.Pruned()
        with self._ledger() as led:
            last = pruning.max_pk(led)
        step = pruning.TASKS_PER_TRANSACTION
        for lo in range(1, last + 1, step):
            with self._ledger() as led:
                pruning.prune_range(led, lo, lo + step - 1, keep, result)
        if vacuum:
            self.db.vacuum()
        return result

    def retry_plan(self, ids: list[str], states: list[str]) -> reads.RetryPlan:
        """What ``retry`` would do (a read): the failed or killed tasks it runs again
        (named ones, those in ``states``, and those upstream of blocked ones) and how
        many blocked tasks wait for them."""
        with self.db.read() as conn:
            return reads.retry_plan(Ledger(conn, 0.0), ids, states)

    def retry(self, ids: list[str], states: list[str], who: str) -> reads.RetryPlan:
        """Run failed or killed tasks again with a fresh retry budget, and unblock what
        waits for them (one transaction; the plan is made again inside it)."""
        with self._ledger() as led:
            plan = reads.retry_plan(led, ids, states)
            if plan.pks:
                attempts.retry(led, plan.pks, who)
            return plan

    # --------------------------------------------------------------- cancelling
    def cancel(self, drain: float, who: str) -> tuple[cancelling.Cancel, int, int]:
        """Cancel the workflow: workers stop claiming; tasks that never started are
        cancelled. Returns the flag, how many were cancelled, how many attempts run."""
        with self._ledger() as led:
            return cancelling.cancel(led, drain, who)

    def abandon(self, who: str, cancel: cancelling.Cancel) -> int | None:
        """After the drain of ``cancel``: what still runs is recorded cancelled. Returns
        how many; None if the workflow was resumed meanwhile (nothing done)."""
        with self._ledger() as led:
            return cancelling.abandon(led, who, cancel)

    def resume(self, who: str) -> int:
        """Undo a cancel: workers may claim again, cancelled tasks come back."""
        with self._ledger() as led:
            return cancelling.resume(led, who)

    def cancelled(self) -> cancelling.Cancel | None:
        with self.db.read() as conn:
            return cancelling.flag(Ledger(conn, 0.0))

    def live_attempts(self) -> int:
        with self.db.read() as conn:
            return len(Ledger(conn, 0.0).all(cancelling.SQL["live"]))

    def add_error(self, worker: str, claim: Claim, error: str, trace: str | None) -> None:
        """Complete the record of a failed attempt with its exception."""
        with self._ledger() as led:
            attempts.add_error(led, worker, claim, error, trace)

    # ------------------------------------------------------------------ reading
    def counts(self) -> Counts:
        with self.db.read() as conn:
            return reads.counts(conn)

    def workers(self) -> list[dict]:
        with self.db.read() as conn:
            return reads.workers(conn)

    def tasks(self, state: str | None = None, worker: str | None = None,
              limit: int | None = None, label: str | None = None) -> list[reads.TaskRow]:
        with self.db.read() as conn:
            return reads.tasks(conn, state, worker, limit, label)

    def snapshot(self, now: float, windows: tuple[float, ...] = (60.0, 300.0, 900.0),
                 runtimes: int = 1000) -> reads.Snapshot:
        """What `laufband status` shows, in one read: counts, workers, running attempts,
        failure groups, requirement sets, completions within each window (seconds
        before ``now``), and the runtimes of the last completed attempts."""
        with self.db.read() as conn:
            return reads.snapshot(conn, now, windows, runtimes)

    def explain(self, task_id: str) -> reads.Explained | None:
        with self.db.read() as conn:
            return reads.explain(conn, task_id)

    def running(self) -> list[dict]:
        with self.db.read() as conn:
            return reads.running(conn)

    def failed_tasks(self, limit: int) -> list[str]:
        with self.db.read() as conn:
            return reads.failed_ids(conn, limit)

    def failure_groups(self) -> list[reads.FailureGroup]:
        with self.db.read() as conn:
            return reads.failure_groups(conn)

    def results(self) -> list[tuple[str, str | None]]:
        """(task id, result JSON) of every completed task, in graph order."""
        with self.db.read() as conn:
            return reads.results(conn)

    def result(self, task_id: str) -> tuple[str, str | None]:
        """(state, result JSON of the attempt that completed it) of one task."""
        with self.db.read() as conn:
            return reads.result(conn, task_id)

    def why(self, task_id: str) -> list[str]:
        with self.db.read() as conn:
            return reads.why(conn, task_id)

    def invalidated(self) -> int:
        with self.db.read() as conn:
            return reads.invalidated(conn)

    # ------------------------------------------------------------------- report
    def timeline(self, buckets: int = 60, limit: int | None = None) -> timeline.Timeline:
        """What a report draws, in one read: every attempt (at most ``limit``, the
        latest), completions in ``buckets`` buckets, the workers, counts and failures."""
        with self.db.read() as conn:
            return timeline.read(conn, self.clock.now(), self.shown, buckets, limit)
