"""``Monitor``: read a workflow's database from Python, as laufband 0.2.x offered it.

    monitor = Monitor(db="graphband.sqlite")
    for task in monitor.get_tasks(state="failed"):
        print(task.id, task.failed_retries, task.last_error)

It only reads (never writes, never upgrades the database), works on a read-only file,
and returns plain frozen objects with the attributes 0.2.1's ORM entries had (``id``,
``status``, ``current_status.worker_id``, ``completed``, ``runtime``,
``active_workers``, ...) plus laufband's own (attempts, the last error). Built on the
store's read API, as ``laufband status`` is.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timedelta

from laufband.clock import Clock, SystemClock
from laufband.states import ALIVE, UNFINISHED, TaskState
from laufband.store import Store, database_url, reads
from laufband.store.reads import TaskRow
from laufband.store.timeline import AttemptSpan, Timeline


@dataclasses.dataclass(frozen=True)
class StatusEntry:
    """A task's current status and who set it (0.2.1's ``TaskStatusEntry``)."""

    status: str
    worker_id: str | None
    timestamp: datetime


@dataclasses.dataclass(frozen=True)
class TaskView:
    id: str
    status: str  # pending, ready, running, completed, failed, killed or blocked
    worker_id: str | None  # the worker of its latest attempt
    requirements: frozenset[str]
    max_parallel_workers: int
    attempts: int
    failed_retries: int  # attempts that failed (0.2.1 said -1 for none; this says 0)
    killed_retries: int  # attempts whose worker died
    active_workers: int  # attempts running now
    runtime: float  # seconds of the attempt that completed it; -1 if not completed
    last_error: str | None  # how its latest attempt ended, if not by completing
    last_traceback: str | None  # ... and the traceback, if the exception reached Python
    label: str | None  # Laufband: the item
    current_status: StatusEntry

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def worker_availability(self) -> bool:
        """Could another worker join it now (a slot free, not finished)?"""
        return self.status == "ready"


@dataclasses.dataclass(frozen=True)
class WorkerView:
    id: str
    status: str  # idle, busy, offline or dead
    hostname: str
    pid: int
    labels: frozenset[str]
    last_heartbeat: datetime
    heartbeat_timeout: float
    started_at: datetime
    stopped_at: datetime | None
    running_tasks: tuple[str, ...]
    heartbeat_expired: bool
    #: Inside a SLURM job: {"job", "array_job", "array_task", "node"} (those known).
    slurm: dict[str, str] | None = None
    #: When its allocation ends (None: no limit known).
    allocation_end: datetime | None = None

    @property
    def runtime(self) -> timedelta:
        end = self.stopped_at or (self.last_heartbeat if self.status == "dead"
                                  else datetime.now())
        return end - self.started_at


@dataclasses.dataclass(frozen=True)
class WorkflowView:
    id: str
    total_tasks: int
    counts: dict[str, int]  # tasks per state


def _when(stamp: float | None) -> datetime | None:
    return None if stamp is None else datetime.fromtimestamp(stamp)


class Monitor:
    """Read-only views of a workflow's database (``db``: a path or a URL). ``lock`` is
    accepted for 0.2.x compatibility and not needed: reads take the database lock
    themselves where they can."""

    def __init__(self, lock: object = None, db: str = "graphband.sqlite",
                 clock: Clock | None = None) -> None:
        self.lock = lock
        self.db = database_url(db)
        self._clock = clock or SystemClock()
        self._store = Store.open_read_only(self.db, self._clock)

    @classmethod
    def of(cls, store: Store, clock: Clock | None = None) -> Monitor:
        """A Monitor on a store that is open already (the CLI's)."""
        monitor = cls.__new__(cls)
        monitor.lock, monitor.db = None, store.url
        monitor._clock = clock or SystemClock()
        monitor._store = store
        return monitor

    def get_workers(self) -> list[WorkerView]:
        """Every worker, most recent heartbeat first."""
        now = self._clock.now()
        rows = sorted(self._store.workers(), key=lambda w: -w["heartbeat"])
        return [WorkerView(
            id=w["id"], status=w["state"], hostname=w["hostname"], pid=w["pid"],
            labels=w["labels"], last_heartbeat=_when(w["heartbeat"]),  # type: ignore[arg-type]
            heartbeat_timeout=w["heartbeat_timeout"],
            started_at=_when(w["started_at"]),  # type: ignore[arg-type]
            stopped_at=_when(w["stopped_at"]), running_tasks=tuple(w["running"]),
            heartbeat_expired=now - w["heartbeat"] > w["heartbeat_timeout"],
            slurm=w.get("slurm"), allocation_end=_when(w.get("allocation_end")),
        ) for w in rows]

    def get_tasks(self, state: str | None = None, worker: WorkerView | str | None = None,
                  label: str | None = None, limit: int | None = None) -> list[TaskView]:
        """Tasks in graph order; ``state``: only those in it; ``worker`` (a WorkerView
        or an id): only those it ran an attempt of; ``label``: only those needing it;
        ``limit``: at most that many."""
        worker_id = worker.id if isinstance(worker, WorkerView) else worker
        if state is not None and str(state) not in set(TaskState):
            raise ValueError(f"state={state!r} is not a task state; use one of "
                             f"{', '.join(TaskState)}.")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"limit={limit!r}: give an integer >= 1.")
        return [_task_view(row) for row in self._store.tasks(
            None if state is None else str(state), worker_id, limit, label)]

    def status(self) -> StatusView:
        """The whole workflow at a glance (one short read): what `laufband status`
        shows."""
        now = self._clock.now()
        snap = self._store.snapshot(now)
        return _status_view(snap, now)

    def explain(self, task_id: str) -> Explained:
        """Why a task is in its state: what it waits for, who can run it, every attempt
        with its error and traceback, its history and what invalidated it. KeyError if
        there is no such task."""
        found = self._store.explain(task_id)
        if found is None:
            raise KeyError(f"no task {task_id!r} in {self._store.shown}")
        live = [w for w in self._store.workers() if w["state"] in ALIVE]
        needs = found.task.requirements
        return Explained(found, [w["id"] for w in live if needs <= w["labels"]])

    def why(self, task_id: str) -> list[str]:
        """Why a task runs (or will run) again: what invalidated, changed or removed it
        since it last completed, e.g. ["invalidated: fingerprint changed v1 -> v2"]."""
        return self._store.why(task_id)

    def get_workflow(self) -> WorkflowView:
        counts = self._store.counts()
        return WorkflowView("main", counts.total, counts.by_state())

    def timeline(self, buckets: int = 60, limit: int | None = None) -> Timeline:
        """A run as ``laufband report`` draws it (one short read): every attempt (at
        most ``limit``, the latest by start), the workers, completions per bucket of
        time (``buckets`` over the span of the attempts), counts per state, failures."""
        return self._store.timeline(buckets, limit)

    def get_attempts(self, limit: int | None = None) -> list[AttemptSpan]:
        """Every attempt by start (at most ``limit``, the latest): task, attempt,
        worker, started_at, ended_at (None while it runs), outcome, error."""
        return list(self._store.timeline(1, limit).attempts)


@dataclasses.dataclass(frozen=True)
class Explained:
    """``Monitor.explain``: the store's account of a task, and the live workers whose
    labels let them run it."""

    detail: reads.Explained
    runnable_by: list[str]

    @property
    def task(self) -> TaskRow:
        return self.detail.task


@dataclasses.dataclass(frozen=True)
class StatusView:
    """``Monitor.status``: progress, speed, workers, failures."""

    at: float
    counts: dict[str, int]
    total: int
    invalidated: int
    throughput: dict[float, float]  # window (s) -> completed tasks per minute
    eta_s: float | None  # at the throughput of the last 5 minutes
    runtimes: dict[str, float]  # of recent completed attempts: n, min, median, p90, max
    workers: dict[str, int]  # per state
    running: list[dict]  # live attempts: id, attempt, worker, started_at
    failures: list[reads.FailureGroup]
    starved: list[tuple[frozenset[str], int]]  # labels no live worker has: tasks waiting

    @property
    def done(self) -> int:
        return self.counts.get("completed", 0)


def _status_view(snap: reads.Snapshot, now: float) -> StatusView:
    counts = snap.counts.by_state()
    total = snap.counts.total
    per_min = {w: n * 60.0 / w for w, n in snap.completed_within.items()}
    left = sum(counts.get(s, 0) for s in UNFINISHED)
    rate = per_min.get(300.0, 0.0) / 60.0
    eta = left / rate if rate > 0 and left else (0.0 if not left else None)
    live_labels = [w["labels"] for w in snap.workers if w["state"] in ALIVE]
    starved = []
    for rid, (labels, _res) in sorted(snap.reqsets.items()):
        waiting = snap.counts.n([TaskState.READY, TaskState.PENDING], [rid])
        if waiting and not any(labels <= have for have in live_labels):
            starved.append((labels, waiting))
    workers: dict[str, int] = {}
    for w in snap.workers:
        workers[w["state"]] = workers.get(w["state"], 0) + 1
    return StatusView(now, counts, total, snap.invalidated, per_min, eta,
                      _runtime_stats(snap.runtimes), workers, snap.running, snap.failures,
                      starved)


def _runtime_stats(runtimes: list[float]) -> dict[str, float]:
    if not runtimes:
        return {}
    ordered = sorted(runtimes)
    n = len(ordered)
    return {"n": n, "min": ordered[0], "median": ordered[n // 2],
            "p90": ordered[min(n - 1, (9 * n) // 10)], "max": ordered[-1],
            "mean": sum(ordered) / n}


def _task_view(row: TaskRow) -> TaskView:
    ended = row.outcome is not None and row.outcome != "completed"
    stamp = row.updated_at or time.time()
    return TaskView(
        id=row.id, status=row.state, worker_id=row.worker, requirements=row.requirements,
        max_parallel_workers=row.max_parallel_workers, attempts=row.attempts,
        failed_retries=row.failures, killed_retries=row.kills, active_workers=row.active,
        runtime=row.runtime if row.runtime is not None else -1.0,
        last_error=row.error if ended else None,
        last_traceback=row.traceback if ended else None, label=row.label,
        current_status=StatusEntry(row.state, row.worker, _when(stamp)),  # type: ignore[arg-type]
    )
