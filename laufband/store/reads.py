"""Read models: what ``laufband status`` and ``Monitor`` show. Plain rows and dicts, read
in one short snapshot each; nothing here writes.
"""

from __future__ import annotations

import dataclasses
import json
import typing as t

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from laufband.store.ledger import Ledger, in_list
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
    running: dict[str, list[tuple[str, float]]] = {}
    for worker, task_id, started in conn.execute(sa.text(
            "SELECT a.worker, t.id, a.started_at FROM attempts a JOIN tasks t"
            " ON t.pk = a.task WHERE a.ended_at IS NULL ORDER BY a.started_at")):
        running.setdefault(worker, []).append((task_id, started))
    for row in rows:
        row["labels"] = frozenset(json.loads(row["labels"]))
        row["slurm"] = json.loads(row["slurm"]) if row.get("slurm") else None
        row["running"] = [tid for tid, _ in running.get(row["id"], [])]
        row["running_since"] = [at for _, at in running.get(row["id"], [])]
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
          limit: int | None = None, label: str | None = None) -> list[TaskRow]:
    """Tasks in graph order; ``state``: only those in it; ``worker``: only those it
    ever ran an attempt of; ``label``: only those that need it."""
    where: list[str] = []
    params: dict[str, t.Any] = {}
    if label is not None:
        where.append("t.reqset IN (SELECT id FROM reqsets WHERE labels LIKE :label)")
        params["label"] = f"%{json.dumps(label)}%"
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


def completed_since(conn: Connection, since: float) -> int:
    """Attempts that completed at or after ``since`` (by the ended_at index)."""
    return int(conn.execute(sa.text(
        "SELECT count(*) FROM attempts WHERE ended_at >= :since AND outcome = 'completed'"),
        {"since": since}).scalar() or 0)


def recent_runtimes(conn: Connection, n: int) -> list[float]:
    """Runtimes of the ``n`` attempts that completed last (newest first)."""
    return [r for (r,) in conn.execute(sa.text(
        "SELECT ended_at - started_at FROM attempts WHERE ended_at IS NOT NULL"
        " AND outcome = 'completed' ORDER BY ended_at DESC LIMIT :n"), {"n": n})]


def reqsets(conn: Connection) -> dict[int, tuple[frozenset[str], dict[str, int]]]:
    """Requirement sets: id -> (labels, resources)."""
    return {rid: (frozenset(json.loads(labels)), json.loads(res)) for rid, labels, res in
            conn.execute(sa.text("SELECT id, labels, resources FROM reqsets"))}


@dataclasses.dataclass(frozen=True)
class AttemptRow:
    attempt: int
    worker: str
    started_at: float
    ended_at: float | None
    outcome: str | None  # None while it runs
    error: str | None
    traceback: str | None


@dataclasses.dataclass(frozen=True)
class Explained:
    """Everything ``laufband explain`` says about one task."""

    task: TaskRow
    waiting_for: list[tuple[str, str]]  # (dependency, its state) not completed yet
    dependents: int
    attempts: list[AttemptRow]
    history: list[tuple[float, str, str | None, str | None, str | None]]
    why: list[str]


def explain(conn: Connection, task_id: str) -> Explained | None:
    """One task: its row, the dependencies it waits for, every attempt, its history."""
    pk = conn.execute(sa.text("SELECT pk FROM tasks WHERE id = :id"), {"id": task_id}).scalar()
    if pk is None:
        return None
    values = list(conn.execute(sa.text(_TASKS + " WHERE t.pk = :pk"), {"pk": pk}).one())
    values[5] = frozenset(json.loads(values[5]))
    waiting = [tuple(r) for r in conn.execute(sa.text(
        "SELECT d.id, d.state FROM edges e JOIN tasks d ON d.pk = e.dep"
        " WHERE e.task = :pk AND d.state != 'completed' ORDER BY d.pk"), {"pk": pk})]
    dependents = int(conn.execute(sa.text("SELECT count(*) FROM edges WHERE dep = :pk"),
                                  {"pk": pk}).scalar() or 0)
    attempts = [AttemptRow(*r) for r in conn.execute(sa.text(
        "SELECT attempt, worker, started_at, ended_at, outcome, error, traceback"
        " FROM attempts WHERE task = :pk ORDER BY attempt"), {"pk": pk})]
    history = [tuple(r) for r in conn.execute(sa.text(
        "SELECT at, event, state, worker, detail FROM events WHERE task = :pk"
        " ORDER BY id"), {"pk": pk})]
    return Explained(TaskRow(*values), waiting, dependents, attempts, history,  # type: ignore[arg-type]
                     why(conn, task_id))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    counts: Counts
    workers: list[dict[str, t.Any]]
    running: list[dict[str, t.Any]]
    failures: list[FailureGroup]
    reqsets: dict[int, tuple[frozenset[str], dict[str, int]]]
    invalidated: int
    completed_within: dict[float, int]  # window (s) -> completions in it
    runtimes: list[float]  # of the last completed attempts, newest first


def snapshot(conn: Connection, now: float, windows: tuple[float, ...], n_runtimes: int
             ) -> Snapshot:
    return Snapshot(
        counts=counts(conn), workers=workers(conn), running=running(conn),
        failures=failure_groups(conn), reqsets=reqsets(conn), invalidated=invalidated(conn),
        completed_within={w: completed_since(conn, now - w) for w in windows},
        runtimes=recent_runtimes(conn, n_runtimes))


@dataclasses.dataclass(frozen=True)
class RetryPlan:
    pks: list[int]
    ids: list[str]  # the failed or killed tasks that run again
    states: dict[str, int]  # how many of them are failed, killed
    blocked: int  # blocked tasks below them (wait for them again)


def retry_plan(led: Ledger, ids: list[str], states: list[str]) -> RetryPlan:
    """The failed or killed tasks ``retry`` runs again: those named (a blocked one
    names what blocks it), those in ``states`` ('failed', 'killed'; 'blocked': what
    blocks the blocked tasks). LaufbandError for an unknown id or one that is not
    failed, killed or blocked."""
    from laufband.errors import LaufbandError
    from laufband.store import attempts

    chosen: set[int] = set()
    blocked: list[int] = []
    for task_id in ids:
        row = led.all("SELECT pk, state FROM tasks WHERE id = :id", {"id": task_id})
        if not row:
            raise LaufbandError(f"No task {task_id!r} in this workflow.")
        pk, state = row[0]
        if state in ("failed", "killed"):
            chosen.add(pk)
        elif state == "blocked":
            blocked.append(pk)
        else:
            raise LaufbandError(f"Task {task_id!r} is {state}: only failed, killed or "
                                "blocked tasks are retried.")
    for state in ("failed", "killed"):
        if state in states:
            chosen.update(pk for (pk,) in led.all(
                "SELECT pk FROM tasks WHERE state = :s", {"s": state}))
    if "blocked" in states:
        blocked += [pk for (pk,) in led.all("SELECT pk FROM tasks WHERE state = 'blocked'")]
    if blocked:
        chosen.update(attempts.failed_above(led, blocked))
    pks = sorted(chosen)
    rows = []
    for start in range(0, len(pks), 5000):
        marks, params = in_list(pks[start:start + 5000])
        rows += led.all(f"SELECT id, state FROM tasks WHERE pk IN ({marks})", params)
    below = len(attempts.walk(led, "blocked_below", pks)) if pks else 0
    by_state: dict[str, int] = {}
    for _, state in rows:
        by_state[state] = by_state.get(state, 0) + 1
    return RetryPlan(pks, [tid for tid, _ in rows], by_state, below)
