"""Invalidation: completed work whose inputs changed runs again, and (by default) so does
everything downstream of it. Set-based: one walk over the stored edges, then updates by
primary key in chunks, all in the caller's transaction.

A task that is running when it is invalidated finishes its attempt; its ``dirty`` mark
makes the end of that attempt put it back to waiting instead of completing it (see
attempts.SQL["complete"]).
"""

from __future__ import annotations

import dataclasses
import typing as t

from laufband.errors import GraphMismatchError
from laufband.states import Event, TaskState
from laufband.store import attempts
from laufband.store.ledger import Ledger, in_list
from laufband.store.model import Claim
from laufband.store.schema import reqset_key
from laufband.task import GraphSpec

S = TaskState
CHUNK = 5000

# The tasks to invalidate and those of them that were completed, in temporary tables
# (per connection): every step below is then one statement over all of them, whatever
# their number (measured: IN lists of thousands of keys cost more to prepare than to run).
SQL = {
    "make_sets": ["CREATE TEMP TABLE IF NOT EXISTS laufband_set (pk INTEGER PRIMARY KEY)",
                  "CREATE TEMP TABLE IF NOT EXISTS laufband_done (pk INTEGER PRIMARY KEY)",
                  "DELETE FROM laufband_set", "DELETE FROM laufband_done"],
    "add_root": "INSERT INTO laufband_set (pk) VALUES (:pk)",
    "add_done": "INSERT INTO laufband_done (pk) VALUES (:pk)",
    # Every descendant, whatever its state (CROSS JOIN: walk the edges by key).
    "below": "WITH RECURSIVE down(pk) AS (SELECT pk FROM laufband_set"
             " UNION SELECT e.task FROM down CROSS JOIN edges e WHERE e.dep = down.pk)"
             # WHERE true: SQLite's parser needs it to tell ON CONFLICT from a join's ON.
             " INSERT INTO laufband_set (pk) SELECT pk FROM down WHERE true"
             " ON CONFLICT DO NOTHING",
    "states": "SELECT t.pk, t.state, t.running, t.reqset, t.id FROM laufband_set s"
              " CROSS JOIN tasks t WHERE t.pk = s.pk",
    "ready_below": "SELECT DISTINCT t.pk FROM laufband_done d CROSS JOIN edges e"
                   " CROSS JOIN tasks t WHERE e.dep = d.pk AND t.pk = e.task"
                   " AND t.state = 'ready' AND t.running = 0",
    # The dependents of tasks that are no longer completed wait for them again.
    "wait_again": "UPDATE tasks SET waiting_on = waiting_on + d.n, state = CASE"
                  " WHEN state = 'ready' AND running = 0 THEN 'pending' ELSE state END"
                  " FROM (SELECT e.task, count(*) AS n FROM laufband_done x CROSS JOIN edges e"
                  " WHERE e.dep = x.pk GROUP BY e.task) AS d WHERE tasks.pk = d.task",
    "rerun": "UPDATE tasks SET state = CASE WHEN waiting_on = 0 THEN 'ready' ELSE 'pending'"
             " END, invalidated = 1, updated_at = :now"
             " WHERE pk IN (SELECT pk FROM laufband_done) RETURNING pk, reqset, state",
    "mark_dirty": "UPDATE tasks SET dirty = 1 WHERE pk IN (SELECT pk FROM laufband_set)"
                  " AND running > 0 AND dirty = 0",
    # Of the tasks to run again, those behind a dependency that will not complete.
    "behind_failure": "SELECT DISTINCT d.pk, x.id FROM laufband_done d CROSS JOIN edges e"
                      " CROSS JOIN tasks t CROSS JOIN tasks x WHERE e.task = d.pk"
                      " AND t.pk = e.dep AND x.pk = d.pk AND x.state = 'pending'"
                      " AND t.state IN ('failed', 'killed', 'blocked', 'removed')",
}


def invalidate(led: Ledger, roots: dict[int, str], downstream: bool, worker: str) -> int:
    """Invalidate ``roots`` (pk -> why) and, with ``downstream``, all their descendants.
    Completed ones run again (ready or pending); running ones run again after their
    attempt. Returns how many tasks will run again."""
    if not roots:
        return 0
    for statement in SQL["make_sets"]:
        led.run(statement, {})
    led.run(SQL["add_root"], [{"pk": pk} for pk in roots])
    if downstream:
        led.run(SQL["below"], {})  # one walk over the stored edges
    rows = {pk: rest for pk, *rest in led.all(SQL["states"])}
    names = [rows[pk][3] for pk in list(roots)[:3] if pk in rows]
    upstream = (f"upstream task {names[0]!r} was invalidated" if len(roots) == 1 else
                f"upstream tasks {', '.join(map(repr, names))}"
                f"{' and more' if len(roots) > 3 else ''} were invalidated")
    done = [pk for pk, (state, _r, _q, _i) in rows.items() if state == S.COMPLETED]
    busy = [pk for pk, (_s, running, _q, _i) in rows.items() if running > 0]
    led.run(SQL["mark_dirty"], {})
    led.note(busy, Event.INVALIDATED, None, worker,
             detail="runs again after the attempt that runs now")
    led.run(SQL["add_done"], [{"pk": pk} for pk in done])
    ready = {pk for (pk,) in led.all(SQL["ready_below"])}
    led.run(SQL["wait_again"], {})
    waiting = [(pk, rows[pk][2]) if pk in rows else (pk, _reqset(led, pk)) for pk in ready]
    if waiting:
        led.record(waiting, S.READY, S.PENDING, Event.WAITS, worker,
                   detail="a dependency was invalidated")
    by_state: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for pk, reqset, new in led.all(SQL["rerun"], {"now": led.now}):
        by_state.setdefault((new, roots.get(pk, upstream)), []).append((pk, reqset))
    for (new, why), moved in by_state.items():
        led.record(moved, S.COMPLETED, new, Event.INVALIDATED, worker, detail=why)
    for pk, task_id in led.all(SQL["behind_failure"]):
        if led.scalar("SELECT state FROM tasks WHERE pk = :pk", {"pk": pk}) == S.PENDING:
            led.move(pk, S.PENDING, S.BLOCKED, Event.BLOCKED, worker,
                     detail="a dependency did not complete")
            attempts.block_descendants(led, Claim(pk, task_id, 0), worker)
    return len(done) + len(busy)


def _reqset(led: Ledger, pk: int) -> int:
    return led.scalar("SELECT reqset FROM tasks WHERE pk = :pk", {"pk": pk})


# ---------------------------------------------------------------- graphs that evolve
class Stored(t.NamedTuple):
    """A stored task, as registration compares it with the graph."""

    id: str
    pk: int
    spec_hash: str
    state: str
    label: str | None
    fingerprint: str | None
    reqset: int
    max_parallel: int
    generation: int
    running: int
    dirty: int
    priority: int
    timeout: float | None
    runtime: float | None  # version 5


STORED_SQL = ("SELECT id, pk, spec_hash, state, label, fingerprint, reqset, max_parallel,"
              " generation, running, dirty, priority, timeout, runtime FROM tasks")

EVOLVE_SQL = {
    "reqset_keys": "SELECT id, labels, resources FROM reqsets",
    "changed_by": "SELECT g.generation, g.worker, g.registered_at FROM graphs g"
                  " WHERE g.generation IN ({pks})",
    "me": "SELECT started_at FROM workers WHERE id = :worker",
    "live": "SELECT id FROM workers WHERE state IN ('idle', 'busy')"
            " AND heartbeat + heartbeat_timeout >= :now",
    "set_fingerprint": "UPDATE tasks SET fingerprint = :fp, generation = :generation"
                       " WHERE pk = :pk",
    # dirty 2 (to be removed after its attempt) no more: it is back in the graph.
    "rewire": "UPDATE tasks SET spec_hash = :spec_hash, fingerprint = :fp, label = :label,"
              " generation = :generation, dirty = CASE WHEN dirty = 2 THEN 0 ELSE dirty END"
              " WHERE pk = :pk",
    "keep": "UPDATE tasks SET dirty = 0 WHERE pk = :pk AND dirty = 2",
    "drop_edges": "DELETE FROM edges WHERE task = :pk",
    "add_edge": "INSERT INTO edges (dep, task) VALUES (:dep, :task)",
    "count_waiting": "UPDATE tasks SET waiting_on = (SELECT count(*) FROM edges e"
                     " CROSS JOIN tasks d WHERE e.task = tasks.pk AND d.pk = e.dep"
                     " AND d.state != 'completed') WHERE pk = :pk"
                     " RETURNING waiting_on",
    "dep_states": "SELECT d.state FROM edges e CROSS JOIN tasks d"
                  " WHERE e.task = :pk AND d.pk = e.dep",
    "pk_of": "SELECT id, pk FROM tasks WHERE id IN ({pks})",
    "remove_later": "UPDATE tasks SET dirty = 2 WHERE pk = :pk",
}


@dataclasses.dataclass
class Changes:
    """What a graph changes in the stored one (fingerprints enabled)."""

    refingerprinted: list = dataclasses.field(default_factory=list)
    rewired: list = dataclasses.field(default_factory=list)  # (row, why)
    removed: list = dataclasses.field(default_factory=list)
    back: list = dataclasses.field(default_factory=list)  # removed before, back now
    kept: list = dataclasses.field(default_factory=list)  # to be removed, back now

    def __bool__(self) -> bool:
        return bool(self.refingerprinted or self.rewired or self.removed or self.back
                    or self.kept)

    def rows(self) -> list:
        return [*self.refingerprinted, *(r for r, _ in self.rewired), *self.removed,
                *self.back, *self.kept]


def rewired(led: Ledger, mismatched: list, spec: GraphSpec, url: str) -> list:
    """Of the tasks whose stored structure differs: those whose dependencies changed (or,
    for Laufband, whose item changed), with why. A change of requirements or
    max_parallel_workers is an error: that is another task."""
    if not mismatched:
        return []
    keys = {rid: (labels, res) for rid, labels, res in led.all(EVOLVE_SQL["reqset_keys"])}
    # The spec hash covers the dependencies, requirements, resources, priority, timeout,
    # runtime, max_parallel_workers and (Laufband) the item: the same requirements,
    # resources, priority, timeout, runtime and max_parallel_workers leave the rest.
    why = "its item changed" if spec.identity is not None else "its dependencies changed"
    result, other = [], []
    for row in mismatched:
        task = spec.by_id[row.id]
        if (keys[row.reqset] != reqset_key(task)
                or row.max_parallel != task.max_parallel_workers
                or row.priority != task.priority or row.timeout != task.timeout
                or row.runtime != task.runtime):
            other.append(row.id)
        else:
            result.append((row, why))
    if other:
        raise GraphMismatchError(
            f"{len(other)} task(s) have other requirements, resources, priority, timeout, "
            f"runtime or max_parallel_workers than in {url}, e.g. "
            f"{', '.join(map(repr, other[:3]))}: fingerprints let fingerprints and "
            "dependencies change between runs, not these. Give such a task a new id, or "
            "start a new db (a new file; on PostgreSQL, a new database).")
    return result


def refresh(led: Ledger, changes: Changes) -> None:
    """The states of the changed tasks now (compare read them earlier; workers may have
    moved them since)."""
    for name in ("refingerprinted", "removed", "back", "kept"):
        rows = getattr(changes, name)
        if rows:
            now = _current(led, [row.pk for row in rows])
            setattr(changes, name, [row._replace(state=now[row.pk][0],
                                                 running=now[row.pk][1])
                                    for row in rows if row.pk in now])
    if changes.rewired:
        now = _current(led, [row.pk for row, _ in changes.rewired])
        changes.rewired = [(row._replace(state=now[row.pk][0], running=now[row.pk][1]), why)
                           for row, why in changes.rewired if row.pk in now]


def _current(led: Ledger, pks: list[int]) -> dict[int, tuple[str, int]]:
    found: dict[int, tuple[str, int]] = {}
    for i in range(0, len(pks), CHUNK):
        marks, params = in_list(pks[i:i + CHUNK])
        for pk, state, running in led.all(
                f"SELECT pk, state, running FROM tasks WHERE pk IN ({marks})", params):
            found[pk] = (state, running)
    return found


def check_not_concurrent(led: Ledger, changes: Changes, worker: str, url: str) -> None:
    """Two workers that yield different graphs at the same time get an error: a change
    to a task that a live worker registered after this worker started is refused (one
    started after that registration supersedes it: a rerun)."""
    gens = sorted({row.generation for row in changes.rows()})
    started = led.scalar(EVOLVE_SQL["me"], {"worker": worker})
    if not gens or started is None:
        return
    live = {w for (w,) in led.all(EVOLVE_SQL["live"], {"now": led.now})} - {worker}
    marks, params = in_list(gens)
    for _gen, other, at in led.all(EVOLVE_SQL["changed_by"].format(pks=marks), params):
        if other in live and at >= started:
            raise GraphMismatchError(
                f"Worker {other!r} registered another version of this graph in {url} "
                f"while this worker was starting: its fingerprints or dependencies "
                "differ from this worker's. Workers that run at the same time must yield "
                "the same graph (is a fingerprint computed from something that differs "
                "between processes, such as a time, a random number or a set's order?). "
                "A rerun after those workers ended may change the graph.")


def apply(led: Ledger, changes: Changes, spec: GraphSpec, generation: int, worker: str,
          downstream: bool) -> None:
    """Store the changes (new fingerprints and edges, removed tasks), then invalidate
    the completed (or running) tasks they concern, and by default what is below them."""
    roots: dict[int, str] = {}
    for row in changes.refingerprinted:
        fp = spec.by_id[row.id].fingerprint
        led.run(EVOLVE_SQL["set_fingerprint"], {"fp": fp, "generation": generation,
                                                "pk": row.pk})
        if row.state == S.COMPLETED or row.running:
            roots[row.pk] = f"fingerprint changed {row.fingerprint} -> {fp}"
    for row in changes.kept:  # its removal had not taken effect yet: it simply stays
        led.run(EVOLVE_SQL["keep"], {"pk": row.pk})
        led.note([row.pk], Event.CHANGED, None, worker, detail="back in the graph")
    # In graph order: a task's dependencies are rewired (or back) before it.
    position = {task.id: i for i, task in enumerate(spec.order)}
    rewire = [*changes.rewired, *((row, "it is back in the graph") for row in changes.back)]
    for row, why in sorted(rewire, key=lambda item: position[item[0].id]):
        if _rewire(led, row, spec, generation, worker, why):
            roots[row.pk] = why
    for row in changes.removed:
        _remove(led, row, worker)
    invalidate(led, roots, downstream, worker)


def _rewire(led: Ledger, row: t.Any, spec: GraphSpec, generation: int, worker: str,
            why: str) -> bool:
    """New edges and spec for a stored task; True if it must be invalidated (it is
    completed or running), else its state follows its new dependencies."""
    task = spec.by_id[row.id]
    led.run(EVOLVE_SQL["rewire"], {
        "spec_hash": spec.hashes[row.id], "fp": task.fingerprint, "generation": generation,
        "label": (spec.labels or {}).get(row.id), "pk": row.pk})
    led.run(EVOLVE_SQL["drop_edges"], {"pk": row.pk})
    if task.dependencies:
        marks, params = in_list(sorted(task.dependencies))
        pk_of = dict(led.all(EVOLVE_SQL["pk_of"].format(pks=marks), params))
        led.run(EVOLVE_SQL["add_edge"], [{"dep": pk_of[dep], "task": row.pk}
                                         for dep in task.dependencies])
    waiting = led.scalar(EVOLVE_SQL["count_waiting"], {"pk": row.pk})
    if row.state == S.COMPLETED or row.running:
        return True
    dep_states = {s for (s,) in led.all(EVOLVE_SQL["dep_states"], {"pk": row.pk})}
    if dep_states & {S.FAILED, S.KILLED, S.BLOCKED, S.REMOVED}:
        new = S.BLOCKED
    else:
        new = S.READY if waiting == 0 else S.PENDING
    if new != row.state and row.state not in (S.FAILED, S.KILLED):
        led.move(row.pk, row.state, new, Event.CHANGED, worker, detail=why)
        if new == S.BLOCKED:  # what waits for it can never run either, now
            attempts.block_descendants(led, Claim(row.pk, row.id, 0), worker)
        elif row.state == S.BLOCKED:  # what it blocked may run (if nothing else blocks)
            attempts.unblock_below(led, [row.pk], worker)
    else:
        led.note([row.pk], Event.CHANGED, None, worker, detail=why)
    return False


def _remove(led: Ledger, row: t.Any, worker: str) -> None:
    why = "it is not in the graph any more"
    if row.state == S.REMOVED:
        return  # its attempt ended meanwhile, and removed it
    if row.running:  # the attempt that runs ends first; then the task is removed
        led.run(EVOLVE_SQL["remove_later"], {"pk": row.pk})
        led.note([row.pk], Event.REMOVED, None, worker, detail=f"{why} (after its attempt)")
    else:
        led.move(row.pk, row.state, S.REMOVED, Event.REMOVED, worker, detail=why)
