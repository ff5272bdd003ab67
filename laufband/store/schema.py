"""Tables, indexes, and the schema version: creating a database, upgrading an older one,
refusing one that this laufband cannot read.

Bump ``SCHEMA_VERSION`` on any change of layout or meaning, and add a migration below
when the old layout can be upgraded in place.
"""

from __future__ import annotations

import json
import logging
import typing as t

import sqlalchemy as sa
from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.engine import Connection

from laufband.errors import SchemaVersionError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5

metadata = MetaData()

meta = Table(
    "laufband_meta",
    metadata,
    Column("key", String, primary_key=True),
    Column("value", String, nullable=False),
)

# One row per task. ``state`` is the single source of truth (see states.py);
# ``waiting_on`` counts unfinished dependencies, so a completion makes its dependents
# ready with one indexed update instead of re-checking every dependency.
tasks = Table(
    "tasks",
    metadata,
    Column("pk", Integer, primary_key=True, autoincrement=False),
    Column("id", String, nullable=False, unique=True),
    Column("state", String, nullable=False),
    Column("reqset", Integer, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("spec_hash", String, nullable=False),
    Column("fingerprint", String),
    Column("waiting_on", Integer, nullable=False),
    Column("max_parallel", Integer, nullable=False),
    Column("running", Integer, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("kills", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
    # What a human recognises the task by, where the id does not say (Laufband: the
    # item's repr), for error messages and displays (version 3).
    Column("label", String),
    # Fingerprints (version 3): 1 = run again after the attempt that runs now (its
    # inputs changed meanwhile), 2 = remove after it (gone from the graph).
    Column("dirty", Integer, nullable=False, server_default="0"),
    # 1 while the task runs again because it was invalidated (cleared on completion).
    Column("invalidated", Integer, nullable=False, server_default="0"),
    # Scheduling (version 4): higher priority first; with depth_first, deeper first
    # (0 for every task otherwise); seconds an attempt may run (NULL: no limit).
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("depth", Integer, nullable=False, server_default="0"),
    Column("timeout", Float),
    # Seconds an attempt is expected to take (version 5; NULL: estimated from completed
    # attempts of its requirement set): a worker whose allocation ends sooner skips it.
    Column("runtime", Float),
)
# The claim: "first ready task of requirement set r, by priority, depth and graph
# order" is one seek in this index.
Index("ix_tasks_claim", tasks.c.state, tasks.c.reqset, tasks.c.priority.desc(),
      tasks.c.depth.desc(), tasks.c.pk)

# Tasks that run again because they were invalidated (version 4): status counts them
# without reading every task.
Index("ix_tasks_invalidated", tasks.c.invalidated, sqlite_where=tasks.c.invalidated == 1,
      postgresql_where=tasks.c.invalidated == 1)

# Dependency edges by integer key; the primary key (dep, task) finds dependents, and
# the index on task a task's dependencies (fingerprints: a task whose dependencies
# change, a task invalidated behind a failed one).
edges = Table(
    "edges",
    metadata,
    Column("dep", Integer, primary_key=True),
    Column("task", Integer, primary_key=True),
)
Index("ix_edges_task", edges.c.task)

# Distinct requirement sets: labels (sorted JSON list) and the resources a task holds
# while it runs (sorted JSON object; version 4). Workers match their labels against
# this small table once, then claim by integer id; a claim checks the resources of a
# set against the limits.
reqsets = Table(
    "reqsets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("labels", String, nullable=False),
    Column("resources", String, nullable=False, server_default="{}"),
    sa.UniqueConstraint("labels", "resources"),
)



def reqset_key(task: t.Any) -> tuple[str, str]:
    """What a requirement set stores for a Task: the labels a worker needs (sorted JSON
    list) and the resources the task holds while it runs (sorted JSON object)."""
    return (json.dumps(sorted(task.requirements)),
            json.dumps(dict(sorted(task.resources.items()))))


# Global caps (version 4): running tasks never hold more of a resource than this.
limits = Table(
    "limits",
    metadata,
    Column("name", String, primary_key=True),
    Column("capacity", Integer, nullable=False),
    Column("set_at", Float, nullable=False),
    Column("set_by", String, nullable=False),
)

# Number of tasks per (requirement set, state), kept in step with every transition, so
# progress, has_more_jobs and the waiting loop never count rows.
counts = Table(
    "counts",
    metadata,
    Column("reqset", Integer, primary_key=True),
    Column("state", String, primary_key=True),
    Column("n", Integer, nullable=False),
)

# Every attempt (version 3; version 2 kept only live ones, as ``claims``). A live
# attempt has ``ended_at IS NULL``: a write for an attempt must find it live and end it
# in the same statement (fencing). Ended ones say how and why (error, traceback).
attempts = Table(
    "attempts",
    metadata,
    Column("task", Integer, primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("worker", String, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("outcome", String),
    Column("error", Text),
    Column("traceback", Text),
    Column("fingerprint", String),  # the task's fingerprint when this attempt began
    # Version 4: the task's result (JSON) from the attempt that completed it, and when
    # the attempt times out (the task's timeout; NULL: never).
    Column("result", Text),
    Column("deadline", Float),
)
# Live attempts by worker (tiny: a few per live worker). Queries must say
# ``ended_at IS NULL`` for SQLite to use it.
Index("ix_attempts_live", attempts.c.worker,
      sqlite_where=attempts.c.ended_at.is_(None),
      postgresql_where=attempts.c.ended_at.is_(None))
# Attempts by when they ended (version 4): throughput and recent runtimes for status
# displays read the newest ones, never all of them.
Index("ix_attempts_ended", attempts.c.ended_at)

workers = Table(
    "workers",
    metadata,
    Column("id", String, primary_key=True),
    Column("state", String, nullable=False),
    Column("hostname", String, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("labels", String, nullable=False),
    Column("heartbeat", Float, nullable=False),
    Column("heartbeat_timeout", Float, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("stopped_at", Float),
    # Set while the worker waits for others (its loop found nothing to claim, but running
    # tasks may still unblock some): the state it takes when the workflow is finished.
    # The transaction that finishes the workflow sets it for every waiting worker, so the
    # end of a run costs one write, not one per worker (version 2).
    Column("leave_as", String),
    # The worker's retry budgets: failure_policy="stop" counts only tasks that no live
    # worker's budget lets run again (version 3).
    Column("max_failed", Integer, nullable=False, server_default="0"),
    Column("max_killed", Integer, nullable=False, server_default="0"),
    # Tasks it runs at once (worker.map's threads; version 4): when it dies, that many
    # of its live attempts are charged to the kill budget.
    Column("threads", Integer, nullable=False, server_default="1"),
    # Attempts it completed (version 4), for displays: counted, never recounted.
    Column("completed", Integer, nullable=False, server_default="0"),
    # Inside a SLURM job (version 4): job id, array job and task ids, node (JSON).
    Column("slurm", String),
    # When its allocation ends, epoch seconds (version 5; NULL: no limit known).
    Column("allocation_end", Float),
)
Index("ix_workers_state", workers.c.state)

# Append-only history of every state change: who, when, which attempt, and why.
events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task", Integer),
    Column("attempt", Integer),
    Column("event", String, nullable=False),
    Column("state", String),
    Column("worker", String),
    Column("at", Float, nullable=False),
    Column("detail", Text),
)
Index("ix_events_task", events.c.task)

# Each registered graph (identified by its digest) and the generation that added its
# tasks; a worker only claims tasks of generations its graph contains.
graphs = Table(
    "graphs",
    metadata,
    Column("generation", Integer, primary_key=True, autoincrement=False),
    Column("digest", String, nullable=False, unique=True),
    Column("n_tasks", Integer, nullable=False),
    Column("registered_at", Float, nullable=False),
    Column("worker", String, nullable=False),
)


def stored_version(conn: Connection) -> str | None:
    """The schema version of the database, or None if it has no laufband schema."""
    if not sa.inspect(conn).has_table(meta.name):
        return None
    return conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).scalar()


def ensure(conn: Connection, url: str, now: float) -> None:
    """Create the schema in an empty database, upgrade an older one in place, or refuse
    one that this laufband cannot use (in the caller's write transaction)."""
    version = stored_version(conn)
    if version is None:
        _create(conn, url, now)
        return
    if version in _MIGRATIONS:
        _refuse_if_old_workers_run(conn, url, version, now)
        original = version
        while version in _MIGRATIONS:
            version = _MIGRATIONS[version](conn)
        _set_version(conn)
        log.warning("laufband: upgraded the database %s from schema version %s to %s",
                    url, original, SCHEMA_VERSION)
        return
    check_readable(version, url)


def check_readable(version: str | None, url: str, tables: list[str] | None = None) -> None:
    """Refuse a database this version cannot read as it is (read-only users never
    upgrade: they tell the user how)."""
    if version is None and tables:
        raise SchemaVersionError(_foreign(url, tables))
    if version is None:
        raise SchemaVersionError(
            f"The database {url} has no laufband tables. Is it the right file? "
            "(A worker creates them on its first start.)")
    if version in _MIGRATIONS:
        raise SchemaVersionError(
            f"The database {url} uses laufband schema version {version}; this laufband "
            f"uses version {SCHEMA_VERSION}. The first worker of this version upgrades it "
            "in place when it starts (read-only commands do not). To look at it now, use "
            "the laufband version that wrote it.")
    if version != str(SCHEMA_VERSION):
        raise SchemaVersionError(
            f"The database {url} was written by a laufband with schema version "
            f"{version}; this laufband uses version {SCHEMA_VERSION}. Finish the "
            "workflow with the laufband version that started it, or use a new db file.")


def _create(conn: Connection, url: str, now: float) -> None:
    names = sa.inspect(conn).get_table_names()
    if names:
        raise SchemaVersionError(_foreign(url, names))
    metadata.create_all(conn)
    conn.execute(meta.insert(), [
        {"key": "schema_version", "value": str(SCHEMA_VERSION)},
        {"key": "created_at", "value": repr(now)},
    ])
    _set_version(conn)


def _foreign(url: str, tables: list[str]) -> str:
    old = "workflows" in tables and "task_statuses" in tables
    who = "laufband 0.2.x" if old else "another program (or laufband 0.2.x)"
    return (f"The database {url} holds tables {sorted(tables)[:5]} but no laufband schema: "
            f"it was written by {who}. This laufband cannot take over such a workflow: "
            "finish it with the laufband that started it, or start it anew with a new db "
            "file (or move this one aside).")


def _set_version(conn: Connection) -> None:
    conn.execute(meta.update().where(meta.c.key == "schema_version")
                 .values(value=str(SCHEMA_VERSION)))
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _refuse_if_old_workers_run(conn: Connection, url: str, version: str, now: float) -> None:
    """Version 2 -> 3 replaces the claims table: a worker of version 1 or 2 still
    running would fail at its next claim. Refuse until they are gone."""
    live = conn.execute(sa.text(
        "SELECT count(*) FROM workers WHERE state IN ('idle', 'busy')"
        " AND heartbeat + heartbeat_timeout >= :now"), {"now": now}).scalar()
    if live:
        raise SchemaVersionError(
            f"The database {url} uses laufband schema version {version}, and {live} "
            "worker(s) of that older laufband are still running on it. Let them finish "
            "(or stop them), then start the workers of this version: the first one "
            f"upgrades the database to version {SCHEMA_VERSION}.")


def _from_1(conn: Connection) -> str:
    """Version 1 -> 2 added ``workers.leave_as`` (nullable)."""
    # PostgreSQL: workers on other hosts do not share our lock file and may migrate at
    # the same time; SQLite's is taken (BEGIN IMMEDIATE under the file lock).
    exists = " IF NOT EXISTS" if conn.dialect.name == "postgresql" else ""
    conn.exec_driver_sql(f"ALTER TABLE workers ADD COLUMN{exists} leave_as VARCHAR")
    return "2"


def _from_2(conn: Connection) -> str:
    """Version 2 -> 3: every attempt is kept (``attempts`` replaces ``claims``, whose
    rows become the live attempts), tasks get a label and the marks fingerprints use,
    workers their retry budgets, and the counts a state 'removed'."""
    attempts.create(conn)
    conn.exec_driver_sql("INSERT INTO attempts (task, attempt, worker, started_at)"
                         " SELECT task, attempt, worker, started_at FROM claims")
    conn.exec_driver_sql("DROP TABLE claims")
    conn.exec_driver_sql("ALTER TABLE tasks ADD COLUMN label VARCHAR")
    for column in ("dirty", "invalidated"):
        conn.exec_driver_sql(
            f"ALTER TABLE tasks ADD COLUMN {column} INTEGER DEFAULT '0' NOT NULL")
    conn.exec_driver_sql("INSERT INTO counts (reqset, state, n)"
                         " SELECT id, 'removed', 0 FROM reqsets")
    for column in ("max_failed", "max_killed"):
        conn.exec_driver_sql(
            f"ALTER TABLE workers ADD COLUMN {column} INTEGER DEFAULT '0' NOT NULL")
    return "3"


def _from_3(conn: Connection) -> str:
    """Version 3 -> 4: scheduling (priorities, depth, timeouts, resources and limits)
    and task results. The claim index gains priority and depth; requirement sets gain
    resources (the small table is rebuilt: its unique constraint changes)."""
    conn.exec_driver_sql("DROP INDEX ix_tasks_claim")
    for column in ("priority", "depth"):
        conn.exec_driver_sql(
            f"ALTER TABLE tasks ADD COLUMN {column} INTEGER DEFAULT '0' NOT NULL")
    conn.exec_driver_sql("ALTER TABLE tasks ADD COLUMN timeout FLOAT")
    for index in tasks.indexes:
        if index.name in ("ix_tasks_claim", "ix_tasks_invalidated"):
            index.create(conn)
    rows = conn.exec_driver_sql("SELECT id, labels FROM reqsets").fetchall()
    conn.exec_driver_sql("DROP TABLE reqsets")
    reqsets.create(conn)
    if rows:
        conn.execute(reqsets.insert(), [{"id": i, "labels": labels, "resources": "{}"}
                                        for i, labels in rows])
    limits.create(conn)
    conn.exec_driver_sql("INSERT INTO counts (reqset, state, n)"
                         " SELECT id, 'cancelled', 0 FROM reqsets")
    for index in attempts.indexes:
        if index.name == "ix_attempts_ended":  # made by _from_2 already, from version 2
            index.create(conn, checkfirst=True)
    conn.exec_driver_sql("ALTER TABLE workers ADD COLUMN threads INTEGER DEFAULT '1' NOT NULL")
    conn.exec_driver_sql("ALTER TABLE workers ADD COLUMN completed INTEGER DEFAULT '0' NOT NULL")
    conn.exec_driver_sql("ALTER TABLE workers ADD COLUMN slurm VARCHAR")
    conn.exec_driver_sql("UPDATE workers SET completed = (SELECT count(*) FROM attempts a"
                         " WHERE a.worker = workers.id AND a.outcome = 'completed')")
    have = {c["name"] for c in sa.inspect(conn).get_columns("attempts")}
    for column, kind in (("result", "TEXT"), ("deadline", "FLOAT")):
        if column not in have:  # from version 2, _from_2 created the table as it is now
            conn.exec_driver_sql(f"ALTER TABLE attempts ADD COLUMN {column} {kind}")
    return "4"


def _from_4(conn: Connection) -> str:
    """Version 4 -> 5: walltime awareness: a task's declared runtime, a worker's
    allocation end (both nullable: none declared, no limit known)."""
    exists = " IF NOT EXISTS" if conn.dialect.name == "postgresql" else ""
    conn.exec_driver_sql(f"ALTER TABLE tasks ADD COLUMN{exists} runtime FLOAT")
    conn.exec_driver_sql(f"ALTER TABLE workers ADD COLUMN{exists} allocation_end FLOAT")
    return "5"


_MIGRATIONS = {"1": _from_1, "2": _from_2, "3": _from_3, "4": _from_4}
