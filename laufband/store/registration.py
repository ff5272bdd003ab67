"""Adding a validated graph to the database, inside one write transaction.

One transaction keeps it atomic: a graph that contradicts the stored one is rejected
with nothing written. The lock is refreshed between chunks so that registering a
million tasks does not look like a dead lock holder.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from laufband.errors import ConfigError, GraphMismatchError
from laufband.locking import DatabaseLock
from laufband.states import TaskState
from laufband.store import cancelling, incremental, resources
from laufband.store.ledger import Ledger
from laufband.store.schema import counts, graphs, reqset_key, reqsets, tasks
from laufband.task import GraphSpec, Task, spec_hash

S = TaskState

#: Rows per INSERT batch (well below SQLite's variable limit).
CHUNK = 5000
#: Stored tasks compared per read (each holds the database lock briefly).
COMPARE_RANGE = 100_000

SQL = {
    "add_task": "INSERT INTO tasks (pk, id, state, reqset, generation, spec_hash, fingerprint,"
                " waiting_on, max_parallel, running, attempts, failures, kills, updated_at,"
                " label, priority, depth, timeout, runtime) VALUES (:pk, :id, :state, :reqset,"
                " :generation, :spec_hash, :fingerprint, :waiting_on, :max_parallel, 0, 0, 0,"
                " 0, :updated_at, :label, :priority, :depth, :timeout, :runtime)",
    "add_edge": "INSERT INTO edges (dep, task) VALUES (:dep, :task)",
    "bump": "UPDATE counts SET n = n + :delta WHERE reqset = :reqset AND state = :state",
    "claim_order": "SELECT value FROM laufband_meta WHERE key = 'claim_order'",
    "set_claim_order": "INSERT INTO laufband_meta (key, value) VALUES ('claim_order', :order)",
    "adopt": "UPDATE tasks SET spec_hash = :spec_hash, label = :label WHERE pk = :pk",
}


def generation_of(conn: Connection, digest: str, latest: bool = False) -> int | None:
    """The generation of the registered graph with this digest, if any (``latest``: only
    if it is the latest registration)."""
    generation = conn.execute(
        sa.select(sa.func.max(graphs.c.generation)).where(graphs.c.digest == digest)).scalar()
    if generation is not None and latest:
        newest = conn.execute(sa.select(sa.func.max(graphs.c.generation))).scalar()
        return generation if generation == newest else None
    return generation


class Registration:
    """With fingerprints enabled (``spec.fingerprints``), the graph may differ from the
    stored one: changed fingerprints and dependency sets, and tasks that are gone, are
    applied (incremental.py); otherwise any difference but added tasks is an error.

    Two phases: ``compare`` reads the stored tasks in ranges, each a short read (a
    million tasks take seconds to compare, and workers must not wait for that);
    ``apply`` is the one write transaction. What registrations change (specs,
    fingerprints, removals) comes with a new generation: ``apply`` refuses (None) if one
    happened since ``compare`` began, and the caller compares again."""

    def __init__(self, spec: GraphSpec, worker: str, url: str,
                 downstream: bool = True) -> None:
        self.spec, self.worker, self.url, self.downstream = spec, worker, url, downstream
        self.changes = incremental.Changes()
        self.matched = 0  # stored tasks of this graph
        self.seen: int | None = None  # the newest generation when compare began
        self._mismatched: list[incremental.Stored] = []
        self._missing: list[incremental.Stored] = []

    # ------------------------------------------------------------ compare (reads)
    def begin(self, led: Ledger) -> tuple[int, int]:
        """The newest generation, and the range of stored keys to compare."""
        self.seen = led.scalar("SELECT max(generation) FROM graphs")
        return int(led.scalar("SELECT coalesce(max(pk), 0) FROM tasks") or 0), COMPARE_RANGE

    def compare(self, led: Ledger, lo: int, hi: int) -> None:
        """Compare the stored tasks with keys ``lo``..``hi`` with the graph (raw tuples:
        a million in about a second; lookups by id cost more to prepare than to run)."""
        by_id, hashes, fps = self.spec.by_id, self.spec.hashes, self.spec.fingerprints
        changes = self.changes
        for values in led.all(incremental.STORED_SQL + " WHERE pk BETWEEN :lo AND :hi",
                              {"lo": lo, "hi": hi}):
            tid, _pk, stored_hash, state = values[:4]
            task = by_id.get(tid)
            if task is None:
                if state != "removed":
                    self._missing.append(incremental.Stored._make(values))
                continue
            self.matched += 1
            if state == "removed" and fps:
                changes.back.append(incremental.Stored._make(values))
            elif stored_hash != hashes[tid]:
                self._mismatched.append(incremental.Stored._make(values))
            elif fps and values[5] != task.fingerprint:
                changes.refingerprinted.append(incremental.Stored._make(values))
            if fps and values[10] == 2 and state != "removed" and stored_hash == hashes[tid]:
                changes.kept.append(incremental.Stored._make(values))  # back before it left

    def conclude(self, led: Ledger) -> None:
        """After comparing everything: raise for a graph that contradicts the stored one
        (without fingerprints, or changes fingerprints cannot make)."""
        if self.spec.fingerprints:
            self.changes.rewired = incremental.rewired(led, self._mismatched, self.spec,
                                                       self.url)
            self.changes.removed = self._missing
            return
        if self._mismatched:
            self._mismatched = [r for r in self._mismatched if not self._adoptable(r)]
        if self._mismatched:
            raise GraphMismatchError(self._mismatch(self._mismatched))
        if self._missing:
            raise GraphMismatchError(
                f"The database {self.url} holds {len(self._missing)} task(s) that this "
                "worker's graph lacks (e.g. "
                f"{', '.join(repr(r.id) for r in self._missing[:3])}). All workers must "
                "yield the same tasks (a rerun may add tasks, but not drop them; ids must "
                "stay the same: e.g. Laufband with and without key= gives other ids). To "
                "let tasks go, enable fingerprints; else start a new db (a new file; on "
                "PostgreSQL, a new database)."
            )

    # ------------------------------------------------------------ apply (writes)
    def apply(self, conn: Connection, now: float, lock: DatabaseLock | None) -> int | None:
        """Store the graph, in the caller's write transaction; None if another
        registration happened since ``begin`` (compare again)."""
        self.conn, self.now, self.lock = conn, now, lock
        # Bulk inserts use the ledger's raw executemany: SQLAlchemy's per-row parameter
        # handling cost more than SQLite itself here (SCALING_ANALYSIS.md, 'Measurements
        # behind the code').
        self.led = led = Ledger(conn, now)
        if led.scalar("SELECT max(generation) FROM graphs") != self.seen:
            return None
        self._check_claim_order()
        resources.check_tasks((task for task in self.spec.by_id.values() if task.resources),
                              resources.stored(led), self.url)
        if not self.spec.fingerprints:  # then only adoptable ones are left
            for row in self._mismatched:
                self._adopt(row)
        generation = (self.seen or 0) + 1
        if self.matched < len(self.spec.by_id):
            self._insert(self._new(), generation)
        if self.changes:
            incremental.refresh(led, self.changes)
            incremental.check_not_concurrent(led, self.changes, self.worker, self.url)
            incremental.apply(led, self.changes, self.spec, generation, self.worker,
                              self.downstream)
        # Back to an earlier version of the graph (fingerprints): it is the latest now.
        conn.execute(graphs.delete().where(graphs.c.digest == self.spec.digest))
        conn.execute(graphs.insert().values(
            generation=generation, digest=self.spec.digest, n_tasks=len(self.spec.by_id),
            registered_at=now, worker=self.worker))
        cancel = cancelling.flag(led)
        if cancel is not None:  # new (or rewired) tasks do not start under a cancel
            cancelling.sweep(led, cancel.by)
        led.flush()  # what the changes booked: counts and history
        return generation

    def _check_claim_order(self) -> None:
        """Depth-first or graph order is the workflow's (stored with its first tasks):
        a worker that asks for the other one gets an error, not another order."""
        led, wanted = self.led, "depth-first" if self.spec.depth_first else "graph"
        stored = led.scalar(SQL["claim_order"])
        if stored is None:
            # Tasks stored before schema 4 were claimed in graph order.
            stored = "graph" if led.scalar("SELECT 1 FROM tasks LIMIT 1") else wanted
            led.run(SQL["set_claim_order"], {"order": stored})
        if stored != wanted:
            raise ConfigError(
                f"The workflow in {self.url} claims ready tasks in {stored} order, and "
                f"this worker asks for depth_first={self.spec.depth_first}. The order "
                "belongs to the workflow: start every worker with the same depth_first "
                "(LAUFBAND_DEPTH_FIRST), or use a new db (a new file; on PostgreSQL, a "
                "new database).")

    def _new(self) -> list[tuple[Task, str]]:
        """The tasks to add, in graph order; ``existing`` (id -> (pk, state)) read now,
        in the write transaction: their states decide the new tasks' states."""
        self.existing = {tid: (pk, state) for tid, pk, state in
                         self.led.all("SELECT id, pk, state FROM tasks")}
        hashes = self.spec.hashes
        return [(task, hashes[task.id]) for task in self.spec.order
                if task.id not in self.existing]

    def _refresh(self) -> None:
        if self.lock is not None:
            self.lock.refresh()

    def _adoptable(self, row: t.Any) -> bool:
        """A task stored by a laufband before schema 3 has no label and a hash without
        the item's digest: it is taken over as it is now (the workflow goes on)."""
        return row.label is None and row.spec_hash == spec_hash(self.spec.by_id[row.id])

    def _adopt(self, row: t.Any) -> None:
        label = self.spec.labels.get(row.id) if self.spec.labels else None
        self.led.run(SQL["adopt"], {"pk": row.pk, "spec_hash": self.spec.hashes[row.id],
                                    "label": label})

    def _mismatch(self, rows: list[t.Any]) -> str:
        if self.spec.positional:
            row = min(rows, key=lambda r: int(r.id))
            now = (self.spec.labels or {}).get(row.id, "?")
            stored = row.label if row.label is not None else "(not recorded)"
            more = f" (and {len(rows) - 1} more position(s))" if len(rows) > 1 else ""
            return (
                f"Item {row.id} of the list differs from the item stored at position "
                f"{row.id} in {self.url}: stored {stored}, now {now}{more}. Laufband "
                "identifies items by their position, so inserting, removing or reordering "
                "items would run the wrong ones. Append new items at the end, pass key= "
                "(e.g. Laufband(items, key=str)) to identify items by what they are, or "
                "start a new db (a new file; on PostgreSQL, a new database)."
            )
        ids = ", ".join(repr(r.id) for r in rows[:3])
        return (
            f"{len(rows)} task(s) differ from the graph stored in {self.url} "
            f"(dependencies, requirements or max_parallel_workers), e.g. {ids}. All "
            "workers of a workflow must yield the same graph. To change dependencies "
            "between runs, enable fingerprints (enable_fingerprints=True); to change "
            "anything else, start a new db (a new file; on PostgreSQL, a new database)."
        )

    # ------------------------------------------------------------------ inserting
    def _insert(self, new: list[tuple[Task, str]], generation: int) -> None:
        next_pk = (self.conn.execute(sa.select(sa.func.max(tasks.c.pk))).scalar() or 0) + 1
        reqset_ids = self._reqset_ids({reqset_key(task) for task, _ in new})
        depth = self.spec.depths
        pk_of = {tid: pk for tid, (pk, _state) in self.existing.items()}
        state_of = {tid: state for tid, (_pk, state) in self.existing.items()}
        labels = self.spec.labels or {}
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
            reqset = reqset_ids[reqset_key(task)]
            added[(reqset, state)] = added.get((reqset, state), 0) + 1
            rows.append({
                "pk": pk, "id": task.id, "state": state.value, "reqset": reqset,
                "generation": generation, "spec_hash": h, "fingerprint": task.fingerprint,
                "waiting_on": waiting, "max_parallel": task.max_parallel_workers,
                "updated_at": self.now, "label": labels.get(task.id),
                "priority": task.priority, "depth": depth.get(task.id, 0) if depth else 0,
                "timeout": task.timeout, "runtime": task.runtime,
            })
            edge_rows.extend({"dep": pk_of[dep], "task": pk} for dep in task.dependencies)
            if len(rows) >= CHUNK:
                self._flush(rows, edge_rows)
        self._flush(rows, edge_rows)
        self.led.run(SQL["bump"], [{"reqset": reqset, "state": state, "delta": n}
                                   for (reqset, state), n in added.items()])

    def _flush(self, rows: list[dict], edge_rows: list[dict]) -> None:
        if rows:
            self.led.run(SQL["add_task"], rows)
        if edge_rows:
            self.led.run(SQL["add_edge"], edge_rows)
        rows.clear()
        edge_rows.clear()
        self._refresh()

    def _reqset_ids(self, needed: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        conn = self.conn
        known = {(labels, res): rid for rid, labels, res in conn.execute(
            sa.select(reqsets.c.id, reqsets.c.labels, reqsets.c.resources))}
        next_id = max(known.values(), default=-1) + 1
        for key in sorted(needed - known.keys()):
            conn.execute(reqsets.insert().values(id=next_id, labels=key[0],
                                                 resources=key[1]))
            conn.execute(counts.insert(), [
                {"reqset": next_id, "state": s.value, "n": 0} for s in TaskState
            ])
            known[key] = next_id
            next_id += 1
        return known
