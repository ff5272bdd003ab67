"""Tables and indexes. Only ``store.py`` uses them.

Bump ``SCHEMA_VERSION`` on any change of layout and meaning; a database of another
version is refused with a clear error instead of being misread.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

SCHEMA_VERSION = 2

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
)
# The claim: "first ready task of requirement set r" is one seek in this index.
Index("ix_tasks_claim", tasks.c.state, tasks.c.reqset, tasks.c.pk)

# Dependency edges by integer key; the primary key (dep, task) finds dependents.
edges = Table(
    "edges",
    metadata,
    Column("dep", Integer, primary_key=True),
    Column("task", Integer, primary_key=True),
)
Index("ix_edges_task", edges.c.task)

# Distinct requirement sets (sorted JSON list). Workers match their labels against this
# small table once, then claim by integer id.
reqsets = Table(
    "reqsets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("labels", String, nullable=False, unique=True),
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

# Live attempts. A write for an attempt must find its row here (fencing).
claims = Table(
    "claims",
    metadata,
    Column("task", Integer, primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("worker", String, nullable=False),
    Column("started_at", Float, nullable=False),
)
Index("ix_claims_worker", claims.c.worker)

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
