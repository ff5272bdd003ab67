"""Everything SQL: opening the database, the schema check, and every transaction.

The iterator, heartbeat and CLI call the verb-named methods below; nothing else in
laufband builds a query. Every task state change is booked by ``_Unit.record`` (counts
and history, checked against the state machine in states.py), and every write for an
attempt first removes that attempt's claim row, so a stale worker's late write is
rejected (fenced) instead of landing on a task that moved on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import typing as t
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from laufband.clock import Clock
from laufband.errors import (
    DatabaseError,
    GraphMismatchError,
    SchemaVersionError,
    WorkerIdentityError,
)
from laufband.locking import DatabaseLock
from laufband.schema import (
    SCHEMA_VERSION,
    claims,
    counts,
    graphs,
    meta,
    metadata,
    reqsets,
    tasks,
    workers,
)
from laufband.states import (
    ALIVE,
    UNFINISHED,
    Event,
    TaskState,
    WorkerState,
    check_transition,
)
from laufband.task import GraphSpec, Task

log = logging.getLogger(__name__)

#: Rows per INSERT batch / ids per IN (...) list (well below SQLite's variable limit).
CHUNK = 5000
#: How long SQLite waits for its own file lock. Our file lock serialises workers, so
#: SQLite's lock is only ever contended by a holder whose file lock was broken while it
#: lived on (paused inside a transaction) or by another program.
BUSY_TIMEOUT_MS = 60_000

S = TaskState


@dataclasses.dataclass(frozen=True)
class Claim:
    """One attempt at one task, held by one worker. ``attempt`` fences later writes."""

    pk: int
    id: str
    attempt: int


@dataclasses.dataclass(frozen=True)
class Finish:
    """How an attempt ended: ``completed``, ``failed`` or ``preempted``."""

    claim: Claim
    outcome: Event
    detail: str | None = None
    retries: int = 0  # failures allowed beyond the first attempt


@dataclasses.dataclass
class Counts:
    """Tasks per (requirement set, state): the whole workflow's progress in one read."""

    rows: dict[int, dict[str, int]]

    def n(self, states: Sequence[str], reqset_ids: Sequence[int] | None = None) -> int:
        ids = self.rows.keys() if reqset_ids is None else reqset_ids
        return sum(self.rows.get(r, {}).get(s, 0) for r in ids for s in states)

    @property
    def total(self) -> int:
        return sum(sum(by_state.values()) for by_state in self.rows.values())

    def by_state(self) -> dict[str, int]:
        return {state.value: self.n([state]) for state in TaskState}

    def can_change(self, mine: Sequence[int], live_reqsets: Callable[[], set[int]]) -> bool:
        """Could a task of requirement sets ``mine`` still become claimable? From the
        counters, plus (rarely, lazily) the requirement sets live workers can run."""
        if self.n([S.PENDING, S.RUNNING], mine) == 0:
            return False  # nothing of ours is waiting, and nothing of ours can come back
        if self.n([S.RUNNING]) > 0:
            return True  # a running task may complete (unblocking ours) or be retried
        if self.n([S.PENDING], mine) == 0:
            return False
        # Our pending tasks may wait on ready tasks that another live worker will run.
        return self.n([S.READY], list(live_reqsets())) > 0


@dataclasses.dataclass
class StepResult:
    claims: list[Claim]
    counts: Counts
    fenced: bool = False
    #: The worker left (was marked ``leave``): nothing it could run can become claimable.
    left: bool = False


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    id: str
    hostname: str
    pid: int
    labels: frozenset[str]
    heartbeat_timeout: float


def _read_only_reason(path: str) -> str:
    """Why ``path`` cannot be written, for error messages."""
    try:
        if os.statvfs(path or ".").f_flag & os.ST_RDONLY:
            return "is on a read-only file system"
    except OSError:
        pass
    return "is read-only for this worker (file permissions, or mode=ro in the URL)"


def sqlite_path(url: str) -> str | None:
    """The file behind a sqlite URL, or None for other databases and :memory:."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.database.startswith("file:") and parsed.query.get("uri") == "true":
        # A URI filename, e.g. sqlite:///file:x.sqlite?mode=ro&uri=true
        return urllib.parse.urlparse(parsed.database).path or None
    return parsed.database


class Store:
    """The database of one workflow, shared by all its workers."""

    def __init__(self, url: str, lock: DatabaseLock, clock: Clock,
                 journal_mode: str = "delete") -> None:
        self.url = url
        self.clock = clock
        self.lock = lock
        path = sqlite_path(url)
        # The files a commit writes: the database (rollback journal) or its -wal file.
        self._files = (path, f"{path}-wal") if path else ()
        self._check_path()
        self.engine = self._make_engine(journal_mode)
        self._open()

    # ----------------------------------------------------------------- connection
    def _check_path(self) -> None:
        path = sqlite_path(self.url)
        if path is None:
            return
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise DatabaseError(
                f"The folder {folder} of the database {path} does not exist. "
                f"Create it (mkdir -p {folder}) or point db= at an existing folder."
            )
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise DatabaseError(
                f"The database {path} {_read_only_reason(path)}. Workers must write to it: "
                "fix that, or use a copy."
            )
        if not os.access(folder, os.W_OK):
            raise DatabaseError(
                f"The folder {folder} of the database {path} {_read_only_reason(folder)}. "
                "Workers create their lock file and SQLite its journal next to the "
                "database: make the folder writable or point db= elsewhere."
            )

    def _make_engine(self, journal_mode: str) -> Engine:
        engine = sa.create_engine(self.url)
        if engine.dialect.name != "sqlite":
            return engine

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # pragma: no branch
            # We issue BEGIN ourselves: pysqlite's implicit transactions start too late
            # to take the write lock up front (see SQLAlchemy's pysqlite notes).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cur.execute(f"PRAGMA journal_mode = {journal_mode}")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn):
            conn.exec_driver_sql(conn.get_execution_options().get("laufband_begin",
                                                                  "BEGIN IMMEDIATE"))

        return engine

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction under the database lock."""
        with self.lock, self._translate_errors(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only snapshot; callers keep it to a statement or two."""
        with self.lock, self._translate_errors(), self.engine.connect() as conn:
            conn.execution_options(laufband_begin="BEGIN")
            with conn.begin():
                yield conn

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except (sa_exc.DBAPIError, sqlite3.Error) as exc:
            # sqlite3.Error: the hot path runs on the raw driver connection (_Unit).
            # "from None": the user gets our explanation, which quotes the driver's
            # message, instead of a traceback through SQLAlchemy (the original stays
            # reachable as __context__ for debugging).
            raise self._explain(exc) from None

    def _explain(self, exc: sa_exc.DBAPIError | sqlite3.Error) -> DatabaseError:
        orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
        text = str(orig)
        path = sqlite_path(self.url)
        where = path or self.url
        if path is not None and (getattr(orig, "sqlite_errorname", "") == "SQLITE_READONLY_DBMOVED"
                                 or not os.path.exists(path)):
            # SQLite refuses to write to a file that was unlinked or renamed under it
            # (it reports "readonly database", which would send users to chmod).
            return DatabaseError(
                f"The database {where} was deleted or moved away while this worker was "
                "using it. Stop all workers; restore the file, or move it aside and start "
                f"again (its finished tasks will run again). ({text})")
        hints = {
            "readonly database": f"{_read_only_reason(path or '')}: make it writable or use "
            "a copy",
            "file is not a database": "is not a laufband SQLite database or is corrupt: "
            "move it aside and start again, or point db= elsewhere",
            "malformed": "is corrupt: move it aside and start again (finished work in it "
            "is lost; results your tasks wrote elsewhere are not)",
            "unable to open": "cannot be opened: check that its folder exists and is "
            "writable",
            "disk is full": "cannot grow: the disk is full; free space and rerun",
            "disk I/O error": "could not be read or written (disk I/O error): check the "
            "file system; on NFS, check the mount",
            "no such table": "lacks laufband's tables: was it deleted or replaced while "
            "workers ran? Move it aside and start again",
            "database is locked": "stayed locked by another process for longer than "
            f"{BUSY_TIMEOUT_MS // 1000} s: most likely a worker paused (SIGSTOP, swapping, "
            "an NFS hang) in the middle of a write, or another program holding a "
            "transaction open. Resume or kill that process, then rerun",
        }
        for needle, hint in hints.items():
            if needle in text:
                return DatabaseError(f"The database {where} {hint}. ({text})")
        return DatabaseError(f"Database error on {where}: {text}")

    # -------------------------------------------------------------------- schema
    def _open(self) -> None:
        with self.transaction() as conn:
            if not sa.inspect(conn).has_table(meta.name):
                self._create(conn)
                return
            stored = conn.execute(
                sa.select(meta.c.value).where(meta.c.key == "schema_version")
            ).scalar()
            if stored == "1":
                _migrate_from_1(conn)
                stored = str(SCHEMA_VERSION)
        if stored != str(SCHEMA_VERSION):
            raise SchemaVersionError(
                f"The database {self.url} was written by a laufband with schema version "
                f"{stored}; this laufband uses version {SCHEMA_VERSION}. Finish the "
                "workflow with the laufband version that started it, or use a new db file."
            )

    def _create(self, conn: Connection) -> None:
        names = sa.inspect(conn).get_table_names()
        if names:
            raise SchemaVersionError(
                f"The database {self.url} holds tables {sorted(names)[:5]} but no laufband "
                "schema (written by laufband 0.2.x or another program). Use a new db file "
                "or move this one aside."
            )
        metadata.create_all(conn)
        conn.execute(meta.insert(), [
            {"key": "schema_version", "value": str(SCHEMA_VERSION)},
            {"key": "created_at", "value": repr(self.clock.now())},
        ])
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ------------------------------------------------------------ state machine
    @contextmanager
    def _unit(self) -> Iterator[_Unit]:
        """A write transaction that books state changes and flushes them at its end."""
        with self.transaction() as conn:
            unit = _Unit(conn, self.clock.now())
            yield unit
            unit.flush()

    # ----------------------------------------------------------------- reading
    def change_mark(self) -> tuple[int, ...] | None:
        """A cheap fingerprint of the database files (size, mtime), taken without any
        lock: when it changes, somebody committed. None where it cannot tell (not
        SQLite). A hint for waiting workers only: a commit within the file system's
        timestamp granularity, or hidden by NFS attribute caching, may not show."""
        if not self._files:
            return None
        mark: list[int] = []
        for path in self._files:
            try:
                st = os.stat(path)
            except OSError:
                mark += (-1, -1)
            else:
                mark += (st.st_size, st.st_mtime_ns)
        return tuple(mark)

    def counts(self) -> Counts:
        with self.read() as conn:
            return _Unit(conn, 0.0).counts

    def reqsets_for(self, labels: frozenset[str]) -> list[int]:
        """Requirement sets a worker with ``labels`` may run, most specific first."""
        with self.read() as conn:
            rows = conn.execute(sa.select(reqsets.c.id, reqsets.c.labels)).all()
        usable = [(len(req), rid) for rid, raw in rows if (req := set(json.loads(raw))) <= labels]
        return [rid for _, rid in sorted(usable, key=lambda x: (-x[0], x[1]))]

    def reqsets_of_live_workers(self, exclude: str) -> set[int]:
        """Requirement sets that some live worker other than ``exclude`` can run."""
        with self.read() as conn:
            return _Unit(conn, 0.0).reqsets_of_live_workers(exclude)

    def workers(self) -> list[dict[str, t.Any]]:
        """Every worker row, newest first (for status displays)."""
        with self.read() as conn:
            result = conn.execute(sa.select(workers).order_by(workers.c.started_at.desc()))
            return [dict(row._mapping) for row in result]

    def running(self) -> list[dict[str, t.Any]]:
        """Live attempts: task, attempt, worker, start time."""
        with self.read() as conn:
            result = conn.execute(
                sa.select(tasks.c.id, claims.c.attempt, claims.c.worker, claims.c.started_at)
                .join(tasks, tasks.c.pk == claims.c.task).order_by(claims.c.started_at))
            return [dict(row._mapping) for row in result]

    def failed_tasks(self, limit: int) -> list[str]:
        """Ids of some tasks that failed or were killed for good."""
        with self.read() as conn:
            return list(conn.execute(
                sa.select(tasks.c.id).where(tasks.c.state.in_([S.FAILED.value, S.KILLED.value]))
                .order_by(tasks.c.pk).limit(limit)
            ).scalars())

    # ------------------------------------------------------------------ workers
    def register_worker(self, info: WorkerInfo, is_gone: Callable[[str, int], bool],
                        max_killed_retries: int) -> None:
        """Add (or revive) this worker's row; refuse an identifier a live worker uses."""
        with self._unit() as unit:
            conn, now = unit.conn, unit.now
            row = conn.execute(sa.select(workers).where(workers.c.id == info.id)).first()
            if row is not None and row.state in ALIVE:
                age = now - row.heartbeat
                if age <= row.heartbeat_timeout and not is_gone(row.hostname, row.pid):
                    raise WorkerIdentityError(
                        f"Worker identifier {info.id!r} is in use by a live worker (state "
                        f"{row.state!r}, pid {row.pid} on {row.hostname}, last heartbeat "
                        f"{age:.0f} s ago). Give each worker a unique identifier (or unset "
                        "LAUFBAND_IDENTIFIER); a worker's identifier becomes free when it "
                        "exits or is declared dead."
                    )
                unit.declare_dead(info.id, max_killed_retries)
            values = {
                "state": WorkerState.IDLE.value, "hostname": info.hostname, "pid": info.pid,
                "labels": json.dumps(sorted(info.labels)), "heartbeat": now,
                "heartbeat_timeout": info.heartbeat_timeout, "started_at": now,
                "stopped_at": None, "leave_as": None,
            }
            if row is None:
                conn.execute(workers.insert().values(id=info.id, **values))
            else:
                conn.execute(workers.update().where(workers.c.id == info.id).values(**values))

    def set_worker_state(self, worker: str, state: WorkerState) -> None:
        """Set a worker's state (not if it was declared dead). Going offline returns the
        tasks it still holds to ready, no retry used: normally there are none, but a loop
        that ended with an error may have left some, and nobody else would return them
        (only live workers are checked for missed heartbeats)."""
        with self._unit() as unit:
            unit.set_state(worker, state)
            if state == WorkerState.OFFLINE:
                for claim in unit.claims_of(worker):
                    unit.end_attempt(worker, Finish(claim, Event.PREEMPTED,
                                                    f"worker {worker} went offline holding it"))

    def heartbeat(self, worker: str, max_killed_retries: int, stalled_after: float) -> bool:
        """Refresh our heartbeat and reap dead workers. False if we had been declared dead.

        If our own previous beat is older than ``stalled_after`` seconds, we were
        stalled ourselves (waiting for a lock whose holder died, a file system hang, a
        suspended job), and so, likely, were the others: this beat judges nobody, and
        the next one, an interval later, does, once the live ones have beaten again.
        Both stamps come from our own clock, so clock skew plays no part here.
        """
        with self._unit() as unit:
            last = unit.scalar(_SQL["last_beat"], {"worker": worker})
            state = unit.scalar(_SQL["beat"], {"now": unit.now, "worker": worker})
            if state == WorkerState.DEAD:
                unit.run(_SQL["revive"], {"worker": worker})
            if last is not None and unit.now - last > stalled_after:
                log.info("worker %s could not beat for %.0f s; not judging others this time",
                         worker, unit.now - last)
            else:
                for (dead,) in unit.all(_SQL["find_dead"], {"now": unit.now, "me": worker}):
                    log.warning("worker %s missed its heartbeat; declaring it dead", dead)
                    unit.declare_dead(dead, max_killed_retries)
        return state != WorkerState.DEAD

    # ------------------------------------------------------------------- graph
    def generation_of(self, digest: str) -> int | None:
        """The generation of the registered graph with this digest, if any."""
        with self.read() as conn:
            return self._generation_of(conn, digest)

    def register_graph(self, spec: GraphSpec, worker: str) -> int:
        """Store the graph (idempotently); return the generation this worker may claim."""
        generation = self.generation_of(spec.digest)
        if generation is not None:
            return generation
        with self.transaction() as conn:
            generation = self._generation_of(conn, spec.digest)
            if generation is None:
                generation = _Registration(self, conn, spec, worker).run()
        return generation

    @staticmethod
    def _generation_of(conn: Connection, digest: str) -> int | None:
        return conn.execute(
            sa.select(graphs.c.generation).where(graphs.c.digest == digest)
        ).scalar()

    # ----------------------------------------------------------- claim / finish
    def step(self, worker: str, finishes: Sequence[Finish], reqset_ids: Sequence[int],
             generation: int, limit: int, stop_on_failure: bool = False,
             free: int = 1, busy: bool = False,
             leave: WorkerState | None = None, ahead: bool = False) -> StepResult:
        """End attempts and claim up to ``limit`` tasks, in one transaction.

        More than one task is claimed only up to this worker's fair share of the ready
        tasks (ready / live workers), or ``free`` tasks (those that run within one
        transaction's time) if that is more. With ``stop_on_failure`` nothing is claimed once
        any task failed for good. ``busy`` marks the worker busy (its loop started), and
        ``leave`` sets the worker's state to it if nothing was claimed and nothing it could
        run can become claimable (its loop ends), in the same transaction: at the start
        and at the end of a run every worker needs the lock at once, and one transaction
        each instead of two shortens both. ``ahead`` (a step while this worker's last task
        still runs, prefetch.py) claims only while there are at least as many ready tasks
        as live workers: a task claimed ahead waits for the current one to end, which
        near the end of a run would keep it from a worker that is free now.
        """
        with self._unit() as unit:
            if busy:
                unit.run(_SQL["busy"], {"worker": worker})
            # Completions as one batch (end_completed); the rest one by one.
            completed = [f.claim for f in finishes if f.outcome == Event.COMPLETED]
            fenced = not unit.end_completed(worker, completed)
            for finish in finishes:
                if finish.outcome != Event.COMPLETED:
                    fenced |= not unit.end_attempt(worker, finish)
            if stop_on_failure and unit.counts.n([S.FAILED, S.KILLED]):
                limit = 0
            if limit > 1 or ahead:
                live = max(1, unit.scalar(_SQL["live_workers"], {}))
                ready = unit.counts.n([S.READY], reqset_ids)
                scarce = ahead and ready < live
                limit = 0 if scarce else min(limit, max(1, ready // live, free))
            claimed = unit.claim(worker, reqset_ids, generation, limit)
            left = not claimed and unit.leave_if_done(worker, reqset_ids, leave)
            if not (claimed or left) and leave is not None:
                unit.run(_SQL["wait"], {"leave": leave.value, "worker": worker})
        return StepResult(claimed, unit.counts, fenced, left)

    def poll(self, worker: str, reqset_ids: Sequence[int], unclaimable: int = 0,
             leave: WorkerState | None = None) -> StepResult:
        """The counters, for a waiting worker; with ``leave`` as in ``step``, unless more
        than ``unclaimable`` tasks of ``reqset_ids`` are ready (a task came back).

        A read; it writes only when the worker leaves and the transaction that finished
        the workflow did not already set its state (``release_waiters``)."""
        with self.read() as conn:
            unit = _Unit(conn, 0.0)
            if leave is not None and unit.released(worker, leave):
                return StepResult([], unit.counts, left=True)
            if (unit.counts.n([S.READY], reqset_ids) > unclaimable
                    or not unit.done_for(worker, reqset_ids, leave)):
                return StepResult([], unit.counts)
        with self._unit() as unit:
            left = (unit.counts.n([S.READY], reqset_ids) <= unclaimable
                    and unit.leave_if_done(worker, reqset_ids, leave))
        return StepResult([], unit.counts, left=left)


# The hot path's SQL. Plain statements with named parameters: on SQLite they run on the
# raw sqlite3 connection (measured: 4 us per statement, against 44 us through
# SQLAlchemy's execute), elsewhere through sqlalchemy.text().
_SQL = {
    "counts": "SELECT reqset, state, n FROM counts",
    "bump": "UPDATE counts SET n = n + :delta WHERE reqset = :reqset AND state = :state",
    "event": "INSERT INTO events (task, attempt, event, state, worker, at, detail)"
             " VALUES (:task, :attempt, :event, :state, :worker, :at, :detail)",
    "move": "UPDATE tasks SET state = :new, updated_at = :now"
            " WHERE pk = :pk AND state = :old RETURNING reqset",
    "count_kill": "UPDATE tasks SET kills = kills + 1 WHERE pk = :pk",
    "count_failure": "UPDATE tasks SET failures = failures + 1 WHERE pk = :pk",
    "drop_claim": "DELETE FROM claims WHERE task = :pk AND attempt = :attempt"
                  " AND worker = :worker",
    "end_attempt": "UPDATE tasks SET running = running - 1 WHERE pk = :pk"
                   " RETURNING state, running, failures, kills",
    # {pks}: ":p0, :p1, ..." (see _in_list). Each statement handles a whole batch.
    "drop_claims": "DELETE FROM claims WHERE worker = :worker AND (task, attempt) IN"
                   " (VALUES {pairs}) RETURNING task",
    "end_attempts": "UPDATE tasks SET running = running - 1 WHERE pk IN ({pks})"
                    " RETURNING pk, state",
    # Only pk in the WHERE: with a condition on state as well, SQLite (no statistics)
    # prefers the state index from ~10 pks on and scans every running/ready task
    # (measured: 16 ms instead of 1 ms per batch at 100k tasks).
    "complete": "UPDATE tasks SET state = 'completed', updated_at = :now WHERE pk IN ({pks})"
                " RETURNING pk, reqset",
    # Decrement every dependent once per completed dependency; those at zero become ready.
    "release_dependents":
        "UPDATE tasks SET waiting_on = waiting_on - d.n,"
        " state = CASE WHEN waiting_on = d.n AND state = 'pending' THEN 'ready' ELSE state END"
        " FROM (SELECT task, count(*) AS n FROM edges WHERE dep IN ({pks}) GROUP BY task) AS d"
        " WHERE tasks.pk = d.task RETURNING tasks.pk, tasks.reqset, tasks.state",
    "block_descendants":
        "WITH RECURSIVE down(pk) AS ("
        " SELECT task FROM edges WHERE dep = :pk"
        " UNION SELECT edges.task FROM edges JOIN down ON edges.dep = down.pk)"
        " UPDATE tasks SET state = 'blocked', updated_at = :now"
        " WHERE pk IN (SELECT pk FROM down) AND state = 'pending'"
        " RETURNING pk, reqset",
    "find_ready": "SELECT pk FROM tasks WHERE state = 'ready' AND reqset = :reqset"
                  " AND generation <= :generation AND NOT EXISTS (SELECT 1 FROM claims"
                  " WHERE claims.task = tasks.pk AND claims.worker = :worker)"
                  " ORDER BY pk LIMIT :limit",
    # {pks}: ":p0, :p1, ..." for the batch (one statement claims the whole batch).
    "claim": "UPDATE tasks SET attempts = attempts + 1, running = running + 1,"
             " state = CASE WHEN running + 1 >= max_parallel THEN 'running' ELSE 'ready' END,"
             " updated_at = :now WHERE pk IN ({pks}) RETURNING pk, id, attempts, state, reqset",
    "add_claim": "INSERT INTO claims (task, attempt, worker, started_at)"
                 " VALUES (:task, :attempt, :worker, :now)",
    "claims_of": "SELECT claims.task, claims.attempt, tasks.id FROM claims"
                 " JOIN tasks ON tasks.pk = claims.task WHERE claims.worker = :worker"
                 " ORDER BY claims.task",
    "last_beat": "SELECT heartbeat FROM workers WHERE id = :worker",
    "beat": "UPDATE workers SET heartbeat = :now WHERE id = :worker RETURNING state",
    "busy": "UPDATE workers SET state = 'busy', leave_as = NULL"
            " WHERE id = :worker AND state = 'idle'",
    "wait": "UPDATE workers SET leave_as = :leave WHERE id = :worker AND state = 'busy'",
    "left_as": "SELECT state, leave_as FROM workers WHERE id = :worker",
    # Run by the transaction after which no task is unfinished (see schema.py). Not a
    # worker that holds a claim: it waited once, but now runs an attempt of a shared task
    # that a sibling attempt completed.
    "release_waiters": "UPDATE workers SET state = leave_as, leave_as = NULL, stopped_at ="
                       " CASE WHEN leave_as = 'offline' THEN :now ELSE stopped_at END"
                       " WHERE state = 'busy' AND leave_as IS NOT NULL AND NOT EXISTS"
                       " (SELECT 1 FROM claims WHERE claims.worker = workers.id)",
    "leave": "UPDATE workers SET state = :state, stopped_at = :stopped, leave_as = NULL"
             " WHERE id = :worker"
             " AND state != 'dead'",
    "reqsets": "SELECT id, labels FROM reqsets",
    "live_labels": "SELECT DISTINCT labels FROM workers WHERE state IN ('idle', 'busy')"
                   " AND id != :me",
    "revive": "UPDATE workers SET state = 'busy', stopped_at = NULL WHERE id = :worker",
    "find_dead": "SELECT id FROM workers WHERE state IN ('idle', 'busy')"
                 " AND heartbeat + heartbeat_timeout < :now AND id != :me",
    "add_task": "INSERT INTO tasks (pk, id, state, reqset, generation, spec_hash, fingerprint,"
                " waiting_on, max_parallel, running, attempts, failures, kills, updated_at)"
                " VALUES (:pk, :id, :state, :reqset, :generation, :spec_hash, :fingerprint,"
                " :waiting_on, :max_parallel, 0, 0, 0, 0, :updated_at)",
    "add_edge": "INSERT INTO edges (dep, task) VALUES (:dep, :task)",
    "live_workers": "SELECT count(*) FROM workers WHERE state IN ('idle', 'busy')",
    "mark_dead": "UPDATE workers SET state = 'dead', stopped_at = :now WHERE id = :worker",
}


def _migrate_from_1(conn: Connection) -> None:
    """Version 1 -> 2 adds ``workers.leave_as`` (nullable). Workers of version 1 still
    running never set it and leave by their own transaction, as they always did."""
    # PostgreSQL: workers on other hosts do not share our lock file and may migrate at
    # the same time; SQLite's is taken (BEGIN IMMEDIATE under the file lock).
    exists = " IF NOT EXISTS" if conn.dialect.name == "postgresql" else ""
    conn.exec_driver_sql(f"ALTER TABLE workers ADD COLUMN{exists} leave_as VARCHAR")
    conn.execute(meta.update().where(meta.c.key == "schema_version")
                 .values(value=str(SCHEMA_VERSION)))
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _in_list(values: Sequence[t.Any]) -> tuple[str, dict[str, t.Any]]:
    """Placeholders ``:p0, :p1, ...`` and their parameters, for ``IN ({pks})``."""
    return (", ".join(f":p{i}" for i in range(len(values))),
            {f"p{i}": v for i, v in enumerate(values)})


class _Unit:
    """One transaction's work: runs the hot-path SQL and books every state change.

    Count changes and history rows are collected and written once at the end
    (``flush``), so a claim+finish costs a handful of statements. ``record`` is the one
    place a state change is booked; it checks the transition against states.py.
    """

    def __init__(self, conn: Connection, now: float) -> None:
        self.conn = conn
        self.now = now
        self._raw = conn.connection.driver_connection if conn.dialect.name == "sqlite" else None
        self._deltas: dict[tuple[int, str], int] = {}
        self._events: list[dict[str, t.Any]] = []
        rows: dict[int, dict[str, int]] = {}
        for reqset, state, n in self.all(_SQL["counts"]):
            rows.setdefault(reqset, {})[state] = n
        self.counts = Counts(rows)

    # -- execution
    def all(self, sql: str, params: dict[str, t.Any] | None = None) -> list[tuple]:
        if self._raw is not None:
            return self._raw.execute(sql, params or {}).fetchall()
        return [tuple(r) for r in self.conn.execute(sa.text(sql), params or {})]

    def scalar(self, sql: str, params: dict[str, t.Any]) -> t.Any:
        rows = self.all(sql, params)
        return rows[0][0] if rows else None

    def run(self, sql: str, params: dict[str, t.Any] | list[dict[str, t.Any]]) -> int:
        if self._raw is not None:
            if isinstance(params, list):
                return self._raw.executemany(sql, params).rowcount
            return self._raw.execute(sql, params).rowcount
        return self.conn.execute(sa.text(sql), params).rowcount

    # -- booking
    def record(self, moved: Sequence[tuple[int, int]], old: str, new: str, event: Event,
               worker: str | None, attempt: int | None = None, detail: str | None = None) -> None:
        """Book ``moved`` (pk, reqset) from ``old`` to ``new``: counts and history."""
        if old != new:
            check_transition(TaskState(old), TaskState(new))
            rows = self.counts.rows
            for _pk, reqset in moved:
                for state, delta in ((old, -1), (new, 1)):
                    key = (reqset, state)
                    self._deltas[key] = self._deltas.get(key, 0) + delta
                    by_state = rows.setdefault(reqset, {})
                    by_state[state] = by_state.get(state, 0) + delta
        self.note([pk for pk, _ in moved], event, new, worker, attempt, detail)

    def note(self, pks: Sequence[int], event: Event, state: str | None, worker: str | None,
             attempt: int | None = None, detail: str | None = None) -> None:
        """Append history rows; ``state`` is None for events that change no state."""
        self._events.extend(
            {"task": pk, "attempt": attempt, "event": event.value, "state": state,
             "worker": worker, "at": self.now, "detail": detail}
            for pk in pks
        )

    def flush(self) -> None:
        bumps = [{"reqset": r, "state": s, "delta": d} for (r, s), d in self._deltas.items() if d]
        if bumps:
            self.run(_SQL["bump"], bumps)
            if not self.counts.n(UNFINISHED):
                self.run(_SQL["release_waiters"], {"now": self.now})
        if self._events:
            self.run(_SQL["event"], self._events)
        self._deltas.clear()
        self._events.clear()

    def move(self, pk: int, old: str, new: str, event: Event, worker: str | None,
             attempt: int | None = None, detail: str | None = None) -> None:
        reqset = self.scalar(_SQL["move"], {"pk": pk, "old": old, "new": new, "now": self.now})
        if reqset is None:
            raise AssertionError(f"task pk {pk} was not in state {old!r}")
        self.record([(pk, reqset)], old, new, event, worker, attempt, detail)

    # -- workers
    def reqsets_of_live_workers(self, exclude: str) -> set[int]:
        live = [frozenset(json.loads(raw))
                for (raw,) in self.all(_SQL["live_labels"], {"me": exclude})]
        return {rid for rid, raw in self.all(_SQL["reqsets"])
                if any(set(json.loads(raw)) <= have for have in live)}

    def leave_if_done(self, worker: str, reqset_ids: Sequence[int],
                      leave: WorkerState | None) -> bool:
        """Set the worker's state to ``leave`` if nothing it could run can become
        claimable any more; True if it did."""
        if not self.done_for(worker, reqset_ids, leave):
            return False
        self.set_state(worker, leave)
        return True

    def done_for(self, worker: str, reqset_ids: Sequence[int],
                 leave: WorkerState | None) -> bool:
        """May the worker leave (``leave`` given): can nothing it could run become
        claimable any more?"""
        return leave is not None and not self.counts.can_change(
            reqset_ids, lambda: self.reqsets_of_live_workers(worker))

    def released(self, worker: str, leave: WorkerState) -> bool:
        """Did the transaction that finished the workflow set this waiting worker's
        state to ``leave`` (release_waiters)?"""
        row = self.all(_SQL["left_as"], {"worker": worker})
        return bool(row) and row[0] == (leave.value, None)

    def set_state(self, worker: str, state: WorkerState) -> None:
        """Set a worker's state, unless it was declared dead; offline stamps the stop."""
        stopped = self.now if state == WorkerState.OFFLINE else None
        self.run(_SQL["leave"], {"state": state.value, "stopped": stopped, "worker": worker})

    # -- claiming
    def claim(self, worker: str, reqset_ids: Sequence[int], generation: int,
              limit: int) -> list[Claim]:
        pks: list[int] = []
        for reqset in reqset_ids:
            if len(pks) >= limit:
                break
            if self.counts.n([S.READY], [reqset]) == 0:
                continue
            pks += [pk for (pk,) in self.all(_SQL["find_ready"], {
                "reqset": reqset, "generation": generation, "worker": worker,
                "limit": limit - len(pks)})]
        if not pks:
            return []
        marks, params = _in_list(pks)
        sql = _SQL["claim"].format(pks=marks)
        by_pk = {row[0]: row[1:] for row in self.all(sql, {**params, "now": self.now})}
        result = []
        for pk in pks:  # in the order found: most specific requirements first, then pk
            task_id, attempt, state, reqset = by_pk[pk]
            self.record([(pk, reqset)], S.READY, state, Event.CLAIMED, worker, attempt)
            result.append(Claim(pk, task_id, attempt))
        self.run(_SQL["add_claim"], [{"task": c.pk, "attempt": c.attempt, "worker": worker,
                                      "now": self.now} for c in result])
        return result

    # -- ending attempts
    def end_attempt(self, worker: str, finish: Finish) -> bool:
        """Apply how an attempt ended. False if the attempt was no longer current."""
        if finish.outcome == Event.COMPLETED:
            return self.end_completed(worker, [finish.claim])  # the one completion path
        claim = finish.claim
        if not self.run(_SQL["drop_claim"], {"pk": claim.pk, "attempt": claim.attempt,
                                             "worker": worker}):
            self._fence(worker, claim, finish.outcome)
            return False
        state, running, failures, kills = self.all(_SQL["end_attempt"], {"pk": claim.pk})[0]
        outcome = finish.outcome
        if outcome == Event.FAILED:
            self.run(_SQL["count_failure"], {"pk": claim.pk})
        elif outcome == Event.KILLED:
            self.run(_SQL["count_kill"], {"pk": claim.pk})
        if state == S.COMPLETED:
            # A sibling attempt of a shared task completed it already.
            self.note([claim.pk], Event.RELEASED, None, worker, claim.attempt, finish.detail)
        elif outcome == Event.PREEMPTED or running > 0:
            # Preemption costs no retry; a shared task whose other attempts still run
            # just frees a slot.
            self.move(claim.pk, state, S.READY, outcome, worker, claim.attempt, finish.detail)
        else:
            used = failures + 1 if outcome == Event.FAILED else kills + 1
            final = S.READY if used <= finish.retries else (
                S.FAILED if outcome == Event.FAILED else S.KILLED)
            self.move(claim.pk, state, final, outcome, worker, claim.attempt, finish.detail)
            if final != S.READY:
                self.block_descendants(claim, worker)
        return True

    def _fence(self, worker: str, claim: Claim, outcome: Event) -> None:
        log.warning("task %r attempt %d: %s by %s was rejected; this attempt is no longer "
                    "current (its worker was declared dead and the task moved on)",
                    claim.id, claim.attempt, outcome.value, worker)
        self.note([claim.pk], Event.FENCED, None, worker, claim.attempt,
                  f"late {outcome.value} rejected")

    def end_completed(self, worker: str, claims: Sequence[Claim]) -> bool:
        """End attempts that completed, a whole batch in four statements. False if any
        was no longer current (fenced)."""
        if not claims:
            return True
        pairs = {f"t{i}": c.pk for i, c in enumerate(claims)}
        pairs.update({f"a{i}": c.attempt for i, c in enumerate(claims)})
        values = ", ".join(f"(:t{i}, :a{i})" for i in range(len(claims)))
        current = {pk for (pk,) in self.all(_SQL["drop_claims"].format(pairs=values),
                                            {**pairs, "worker": worker})}
        for claim in claims:
            if claim.pk not in current:
                self._fence(worker, claim, Event.COMPLETED)
        live = [c for c in claims if c.pk in current]
        if live:
            marks, params = _in_list([c.pk for c in live])
            state_of = dict(self.all(_SQL["end_attempts"].format(pks=marks), params))
            self._complete(worker, [(c, state_of[c.pk]) for c in live])
        return len(live) == len(claims)

    def _complete(self, worker: str, ended: Sequence[tuple[Claim, str]]) -> None:
        """Mark completed the tasks whose attempts ``ended`` (claim, task state after
        the attempt ended), and release their dependents."""
        done = []
        for claim, state in ended:
            if state == S.COMPLETED:  # a sibling attempt of a shared task completed it
                self.note([claim.pk], Event.RELEASED, None, worker, claim.attempt)
            else:
                done.append((claim, state))
        if not done:
            return
        marks, params = _in_list([c.pk for c, _ in done])
        reqset_of = dict(self.all(_SQL["complete"].format(pks=marks),
                                  {**params, "now": self.now}))
        for claim, state in done:
            self.record([(claim.pk, reqset_of[claim.pk])], state, S.COMPLETED,
                        Event.COMPLETED, worker, claim.attempt)
        rows = self.all(_SQL["release_dependents"].format(pks=marks), params)
        ready = [(pk, reqset) for pk, reqset, state in rows if state == S.READY]
        if ready:
            detail = (f"dependency {done[0][0].id!r} completed" if len(done) == 1 else
                      f"its last dependencies completed (in a batch of {len(done)})")
            self.record(ready, S.PENDING, S.READY, Event.READY, worker, detail=detail)

    def block_descendants(self, claim: Claim, worker: str) -> None:
        blocked = self.all(_SQL["block_descendants"], {"pk": claim.pk, "now": self.now})
        if blocked:
            self.record(blocked, S.PENDING, S.BLOCKED, Event.BLOCKED, worker,
                        detail=f"dependency {claim.id!r} did not complete")

    def claims_of(self, worker: str) -> list[Claim]:
        return [Claim(pk, task_id, attempt)
                for pk, attempt, task_id in self.all(_SQL["claims_of"], {"worker": worker})]

    def declare_dead(self, worker: str, max_killed_retries: int) -> None:
        """Mark ``worker`` dead and end its attempts.

        A worker runs one task at a time; more claims mean a batch, whose other tasks
        were finished-but-unrecorded or not started. We cannot tell which one was
        running, so one attempt (the first of the batch) is charged to the kill budget,
        as without batching, and the others go back to ready free of charge. One dead
        worker thus never kills more tasks for good than an unbatched one would.
        """
        self.run(_SQL["mark_dead"], {"worker": worker, "now": self.now})
        for i, claim in enumerate(self.claims_of(worker)):
            if i == 0:
                finish = Finish(claim, Event.KILLED, f"worker {worker} missed its heartbeat",
                                max_killed_retries)
            else:
                finish = Finish(claim, Event.PREEMPTED, f"worker {worker} missed its "
                                "heartbeat; claimed in the same batch (no retry used)")
            self.end_attempt(worker, finish)


class _Registration:
    """Adds a validated graph to the database inside one write transaction.

    One transaction keeps it atomic: a graph that contradicts the stored one is rejected
    with nothing written. The lock is refreshed between chunks so that registering a
    million tasks does not look like a dead lock holder.
    """

    def __init__(self, store: Store, conn: Connection, spec: GraphSpec, worker: str) -> None:
        self.store, self.conn, self.spec, self.worker = store, conn, spec, worker
        # Bulk inserts use _Unit's raw executemany: SQLAlchemy's per-row parameter
        # handling cost more than SQLite itself here (profiled: 9 of 16 s for 200k tasks).
        self.unit = _Unit(conn, store.clock.now())
        self.existing: dict[str, t.Any] = {}

    def run(self) -> int:
        conn = self.conn
        stored = conn.execute(sa.select(sa.func.count()).select_from(tasks)).scalar_one()
        if stored:
            self._check_against_stored(stored)
        generation = (conn.execute(sa.select(sa.func.max(graphs.c.generation))).scalar() or 0) + 1
        hashes = self.spec.hashes
        new = [(task, hashes[task.id]) for task in self.spec.order
               if task.id not in self.existing]
        self._insert(new, generation)
        conn.execute(graphs.insert().values(
            generation=generation, digest=self.spec.digest, n_tasks=len(self.spec.by_id),
            registered_at=self.store.clock.now(), worker=self.worker))
        return generation

    def _check_against_stored(self, stored: int) -> None:
        ids, hashes = list(self.spec.hashes), self.spec.hashes
        mismatched: list[str] = []
        for start in range(0, len(ids), CHUNK):
            chunk = {tid: hashes[tid] for tid in ids[start:start + CHUNK]}
            rows = self.conn.execute(
                sa.select(tasks.c.id, tasks.c.pk, tasks.c.spec_hash, tasks.c.state)
                .where(tasks.c.id.in_(list(chunk)))
            ).all()
            for row in rows:
                self.existing[row.id] = row
                if row.spec_hash != chunk[row.id]:
                    mismatched.append(row.id)
            self.store.lock.refresh()
        if mismatched:
            raise GraphMismatchError(
                f"{len(mismatched)} task(s) differ from the graph stored in "
                f"{self.store.url} (dependencies, requirements or max_parallel_workers), "
                f"e.g. {', '.join(map(repr, mismatched[:3]))}. All workers of a workflow "
                "must yield the same graph; to change it, start a new db file."
            )
        if len(self.existing) < stored:
            raise GraphMismatchError(
                f"The database {self.store.url} holds {stored - len(self.existing)} task(s) "
                "that this worker's graph lacks. All workers must yield the same tasks (a "
                "rerun may add tasks, but not drop them); to change the graph, start a new "
                "db file."
            )

    def _insert(self, new: list[tuple[Task, str]], generation: int) -> None:
        conn, store = self.conn, self.store
        next_pk = (conn.execute(sa.select(sa.func.max(tasks.c.pk))).scalar() or 0) + 1
        reqset_ids = self._reqset_ids({task.requirements for task, _ in new})
        pk_of = {tid: row.pk for tid, row in self.existing.items()}
        state_of = {tid: row.state for tid, row in self.existing.items()}
        now = store.clock.now()
        rows, edge_rows = [], []
        added: dict[tuple[int, str], int] = {}
        for task, h in new:
            pk = next_pk
            next_pk += 1
            pk_of[task.id] = pk
            dep_states = [state_of[dep] for dep in task.dependencies]
            waiting = sum(1 for s in dep_states if s != S.COMPLETED)
            if any(s in (S.FAILED, S.KILLED, S.BLOCKED) for s in dep_states):
                state = S.BLOCKED
            else:
                state = S.PENDING if waiting else S.READY
            state_of[task.id] = state
            reqset = reqset_ids[task.requirements]
            added[(reqset, state)] = added.get((reqset, state), 0) + 1
            rows.append({
                "pk": pk, "id": task.id, "state": state.value, "reqset": reqset,
                "generation": generation, "spec_hash": h, "fingerprint": task.fingerprint,
                "waiting_on": waiting, "max_parallel": task.max_parallel_workers,
                "updated_at": now,
            })
            edge_rows.extend({"dep": pk_of[dep], "task": pk} for dep in task.dependencies)
            if len(rows) >= CHUNK:
                self._flush(rows, edge_rows)
        self._flush(rows, edge_rows)
        self.unit.run(_SQL["bump"], [{"reqset": reqset, "state": state, "delta": n}
                                     for (reqset, state), n in added.items()])

    def _flush(self, rows: list[dict], edge_rows: list[dict]) -> None:
        if rows:
            self.unit.run(_SQL["add_task"], rows)
        if edge_rows:
            self.unit.run(_SQL["add_edge"], edge_rows)
        rows.clear()
        edge_rows.clear()
        self.store.lock.refresh()

    def _reqset_ids(self, needed: set[frozenset[str]]) -> dict[frozenset[str], int]:
        conn = self.conn
        known = {frozenset(json.loads(raw)): rid
                 for rid, raw in conn.execute(sa.select(reqsets.c.id, reqsets.c.labels))}
        next_id = max(known.values(), default=-1) + 1
        for req in sorted(needed - known.keys(), key=sorted):
            conn.execute(reqsets.insert().values(id=next_id, labels=json.dumps(sorted(req))))
            conn.execute(counts.insert(), [
                {"reqset": next_id, "state": s.value, "n": 0} for s in TaskState
            ])
            known[req] = next_id
            next_id += 1
        return known
