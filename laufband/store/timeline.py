"""What a report of a run draws (``laufband report``, ``laufband.report``): every
attempt (who ran what, when, how it ended), completions over time, the workers, the
counts per state and the failures, read in one snapshot.

Each statement reads a table once (no query per row): 100,000 attempts are one scan
of ``attempts`` joined to ``tasks`` by primary key, and completions over time one
``GROUP BY`` over the same table. Errors are cut to ``ERROR_CHARS`` in SQL, so a
report never loads the long tracebacks (or results) attempts may hold.
"""

from __future__ import annotations

import dataclasses
import json

from sqlalchemy.engine import Connection

from laufband.states import ALIVE
from laufband.store import reads
from laufband.store.ledger import Ledger

#: Characters of an attempt's error a report reads (the full one: ``laufband explain``).
ERROR_CHARS = 500

SQL = {
    "n_attempts": "SELECT count(*) FROM attempts",
    # The latest ``:limit`` attempts by start (all of them with a limit of -1).
    "attempts": "SELECT t.id, a.attempt, a.worker, a.started_at, a.ended_at, a.outcome,"
                f" substr(a.error, 1, {ERROR_CHARS}) FROM attempts a CROSS JOIN tasks t"
                " WHERE t.pk = a.task ORDER BY a.started_at DESC, a.task DESC,"
                " a.attempt DESC LIMIT :limit",
    "workers": "SELECT id, hostname, pid, labels, state, started_at, stopped_at, heartbeat,"
               " completed, threads FROM workers ORDER BY started_at, id",
    # Completions per bucket of ``:width`` seconds from ``:t0``.
    "completions": "SELECT CAST((ended_at - :t0) / :width AS INTEGER) AS bucket, count(*)"
                   " FROM attempts WHERE outcome = 'completed' AND ended_at >= :t0"
                   " GROUP BY bucket ORDER BY bucket",
}


@dataclasses.dataclass(frozen=True, slots=True)
class AttemptSpan:
    """One attempt: a task claimed by a worker until it ended (tasks claimed in one
    batch share their stamps: claim and the record of their end)."""

    task: str
    attempt: int
    worker: str
    started_at: float
    ended_at: float | None  # None while it runs
    outcome: str | None  # completed, failed, killed, preempted, cancelled; None: running
    error: str | None  # the first ERROR_CHARS characters

    @property
    def state(self) -> str:
        """The outcome, or "running"."""
        return self.outcome or "running"

    @property
    def duration(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSpan:
    """One worker: where it ran and from when to when."""

    id: str
    hostname: str
    pid: int
    labels: frozenset[str]
    state: str  # idle, busy, offline, dead
    started_at: float
    stopped_at: float | None
    heartbeat: float
    completed: int
    threads: int

    @property
    def alive(self) -> bool:
        return self.state in ALIVE

    def last_seen(self, now: float) -> float:
        """Until when it is known to have run: its stop, now while alive, else (dead)
        its last heartbeat."""
        if self.stopped_at is not None:
            return self.stopped_at
        return now if self.alive else self.heartbeat


@dataclasses.dataclass(frozen=True)
class Timeline:
    """A run as a report draws it (``Store.timeline``), read at ``at``."""

    at: float
    database: str  # as it may be printed
    attempts: tuple[AttemptSpan, ...]  # by start
    total_attempts: int  # in the database (more than ``attempts`` if limited)
    workers: tuple[WorkerSpan, ...]  # by start
    start: float | None  # the first attempt's start (None: no attempt yet)
    end: float | None  # the last end (a running attempt: its worker's last_seen)
    bucket: float  # seconds per completions bucket
    completions: tuple[int, ...]  # completions per bucket, from ``start``
    counts: dict[str, int]  # tasks per state
    total: int  # tasks
    failures: tuple[reads.FailureGroup, ...]

    def end_of(self, attempt: AttemptSpan, seen: dict[str, float] | None = None) -> float:
        """Where to draw an attempt's end: its end, else (running) until its worker was
        last seen (``seen``: worker id -> last_seen, to avoid the lookup per attempt)."""
        if attempt.ended_at is not None:
            return attempt.ended_at
        if seen is None:
            seen = self.last_seen()
        return max(attempt.started_at, seen.get(attempt.worker, self.at))

    def last_seen(self) -> dict[str, float]:
        return {w.id: w.last_seen(self.at) for w in self.workers}


def read(conn: Connection, now: float, database: str, buckets: int = 60,
         limit: int | None = None) -> Timeline:
    """Everything a report draws, from one connection (one snapshot): at most ``limit``
    attempts (the latest by start; None: all), completions in ``buckets`` buckets
    over the time the attempts span."""
    led = Ledger(conn, now)
    total_attempts = int(led.scalar(SQL["n_attempts"]) or 0)
    rows = led.all(SQL["attempts"], {"limit": -1 if limit is None else limit})
    rows.reverse()
    attempts = tuple(AttemptSpan(*row) for row in rows)
    workers = tuple(
        WorkerSpan(wid, host, pid, frozenset(json.loads(labels)), state, started, stopped,
                   beat, completed or 0, threads or 1)
        for wid, host, pid, labels, state, started, stopped, beat, completed, threads
        in led.all(SQL["workers"]))
    start = end = None
    if attempts:
        seen = {w.id: w.last_seen(now) for w in workers}
        start = min(a.started_at for a in attempts)
        end = max(a.ended_at if a.ended_at is not None
                  else max(a.started_at, seen.get(a.worker, now)) for a in attempts)
    buckets = max(1, buckets)
    width = max((end - start) / buckets, 1e-3) if start is not None else 1.0
    completions = [0] * buckets
    if start is not None:
        for bucket, n in led.all(SQL["completions"], {"t0": start, "width": width}):
            completions[min(max(int(bucket), 0), buckets - 1)] += n
    counts = led.counts
    return Timeline(
        at=now, database=database, attempts=attempts, total_attempts=total_attempts,
        workers=workers, start=start, end=end, bucket=width,
        completions=tuple(completions), counts=counts.by_state(), total=counts.total,
        failures=tuple(reads.failure_groups(conn)))
