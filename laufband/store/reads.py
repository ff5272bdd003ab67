"""Read models: what ``laufband status`` and ``Monitor`` show. Plain rows and dicts, read
in one short snapshot each; nothing here writes.
"""

from __future__ import annotations

import dataclasses
import json
import typing as t

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from laufband.store.ledger import Ledger
from laufband.store.model import Counts


@dataclasses.dataclass(frozen=True)
class TaskRow:
    """One task as a monitor sees it."""

    id: str
    state: str
    attempts: int
    failures: int
    kills: int
    requirements: frozenset[str]
    max_parallel_workers: int
    label: str | None
    updated_at: float
    active: int  # live attempts
    worker: str | None  # of the latest attempt
    started_at: float | None  # of the latest attempt
    ended_at: float | None
    outcome: str | None
    error: str | None
    traceback: str | None
    runtime: float | None  # of the attempt that completed it


@dataclasses.dataclass(frozen=True)
class FailureGroup:
    """Tasks failed or killed for good whose last attempt ended with the same error."""

    error: str
    count: int
    examples: list[str]


def counts(conn: Connection) -> Counts:
    return Ledger(conn, 0.0).counts


def workers(conn: Connection) -> list[dict[str, t.Any]]:
    """Every worker row, newest first, with the ids of the tasks it runs now."""
    rows = [dict(r._mapping) for r in conn.execute(sa.text(
        "SELECT * FROM workers ORDER BY started_at DESC"))]
    running: dict[str, list[str]] = {}
    for worker, task_id in conn.execute(sa.text(
            "SELECT a.worker, t.id FROM attempts a JOIN tasks t ON t.pk = a.task"
            " WHERE a.ended_at IS NULL ORDER BY a.started_at")):
        running.setdefault(worker, []).append(task_id)
    for row in rows:
        row["labels"] = frozenset(json.loads(row["labels"]))
        row["running"] = running.get(row["id"], [])
    return rows


_TASKS = (
    "SELECT t.id, t.state, t.attempts, t.failures, t.kills, r.labels, t.max_parallel,"
    " t.label, t.updated_at,"
    " (SELECT count(*) FROM attempts l WHERE l.task = t.pk AND l.ended_at IS NULL),"
    " a.worker, a.started_at, a.ended_at, a.outcome, a.error, a.traceback,"
    " (SELECT c.ended_at - c.started_at FROM attempts c WHERE c.task = t.pk"
    "  AND c.outcome = 'completed' ORDER BY c.attempt LIMIT 1)"
    " FROM tasks t JOIN reqsets r ON r.id = t.reqset"
    " LEFT JOIN attempts a ON a.task = t.pk AND a.attempt = t.attempts"
)


def tasks(conn: Connection, state: str | None = None, worker: str | None = None,
          limit: int | None = None) -> list[TaskRow]:
    """Tasks in graph order; ``state``: only those in it; ``worker``: only those it
    ever ran an attempt of."""
    where, params = [], {}
    if state is not None:
        where.append("t.state = :state")
        params["state"] = state
    if worker is not None:
        where.append("EXISTS (SELECT 1 FROM attempts w WHERE w.task = t.pk"
                     " AND w.worker = :worker)")
        params["worker"] = worker
    sql = _TASKS + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY t.pk"
    if limit is not None:
        sql += " LIMIT :limit"
        params["limit"] = limit
    result = []
    for row in conn.execute(sa.text(sql), params):
        values = list(row)
        values[5] = frozenset(json.loads(values[5]))
        result.append(TaskRow(*values))
    return result


def running(conn: Connection) -> list[dict[str, t.Any]]:
    """Live attempts: task, attempt, worker, start time."""
    result = conn.execute(sa.text(
        "SELECT t.id, a.attempt, a.worker, a.started_at FROM attempts a"
        " JOIN tasks t ON t.pk = a.task WHERE a.ended_at IS NULL ORDER BY a.started_at"))
    return [dict(row._mapping) for row in result]


def failed_ids(conn: Connection, limit: int) -> list[str]:
    """Ids of some tasks that failed or were killed for good."""
    return list(conn.execute(sa.text(
        "SELECT id FROM tasks WHERE state IN ('failed', 'killed') ORDER BY pk LIMIT :n"),
        {"n": limit}).scalars())


def failure_groups(conn: Connection, examples: int = 3) -> list[FailureGroup]:
    """Tasks failed or killed for good, grouped by the error of their last attempt,
    largest group first."""
    groups: dict[str, list[str]] = {}
    for task_id, error in conn.execute(sa.text(
            "SELECT t.id, a.error FROM tasks t LEFT JOIN attempts a ON a.task = t.pk"
            " AND a.attempt = t.attempts WHERE t.state IN ('failed', 'killed')"
            " ORDER BY t.pk")):
        groups.setdefault(error or "(no error recorded)", []).append(task_id)
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    return [FailureGroup(error, len(ids), ids[:examples]) for error, ids in ordered]


def n_tasks(conn: Connection) -> int:
    return int(conn.execute(sa.text("SELECT count(*) FROM tasks")).scalar() or 0)


_WHY = ("SELECT e.event, e.detail FROM events e JOIN tasks t ON t.pk = e.task"
        " WHERE t.id = :id AND e.id > coalesce((SELECT max(c.id) FROM events c"
        " WHERE c.task = t.pk AND c.event = 'completed'), 0) ORDER BY e.id")


def why(conn: Connection, task_id: str) -> list[str]:
    """Why a task will run again, or runs again: what invalidated, changed or removed it
    since its last completion (empty if nothing did)."""
    reasons = []
    for event, detail in conn.execute(sa.text(_WHY), {"id": task_id}):
        if event in ("invalidated", "changed", "removed", "waits"):
            reasons.append(f"{event}: {detail}" if detail else event)
    return reasons


def invalidated(conn: Connection) -> int:
    """Tasks that run again because they were invalidated (until they complete)."""
    return int(conn.execute(sa.text(
        "SELECT count(*) FROM tasks WHERE invalidated = 1")).scalar() or 0)


# The result of a task: the latest completed attempt's (a task invalidated and run
# again has a newer one).
_RESULT = ("(SELECT a.result FROM attempts a WHERE a.task = t.pk AND a.outcome = 'completed'"
           " ORDER BY a.attempt DESC LIMIT 1)")


def results(conn: Connection) -> list[tuple[str, str | None]]:
    """(id, result JSON) of every completed task, in graph order."""
    return [tuple(r) for r in conn.execute(sa.text(
        f"SELECT t.id, {_RESULT} FROM tasks t WHERE t.state = 'completed' ORDER BY t.pk"))]


def result(conn: Connection, task_id: str) -> tuple[str, str | None]:
    """(state, result JSON) of one task; ('unknown', None) if there is no such task."""
    row = conn.execute(sa.text(f"SELECT t.state, {_RESULT} FROM tasks t WHERE t.id = :id"),
                       {"id": task_id}).first()
    return (row[0], row[1]) if row else ("unknown", None)
