"""Adding a validated graph to the database, inside one write transaction.

One transaction keeps it atomic: a graph that contradicts the stored one is rejected
with nothing written. The lock is refreshed between chunks so that registering a
million tasks does not look like a dead lock holder.
"""

from __future__ import annotations

import json
import typing as t

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from laufband.errors import GraphMismatchError
from laufband.locking import DatabaseLock
from laufband.states import TaskState
from laufband.store import incremental
from laufband.store.ledger import Ledger
from laufband.store.schema import counts, graphs, reqsets, tasks
from laufband.task import GraphSpec, Task, spec_hash

S = TaskState

#: Rows per INSERT batch / ids per IN (...) list (well below SQLite's variable limit).
CHUNK = 5000

SQL = {
    "add_task": "INSERT INTO tasks (pk, id, state, reqset, generation, spec_hash, fingerprint,"
                " waiting_on, max_parallel, running, attempts, failures, kills, updated_at,"
                " label) VALUES (:pk, :id, :state, :reqset, :generation, :spec_hash,"
                " :fingerprint, :waiting_on, :max_parallel, 0, 0, 0, 0, :updated_at, :label)",
    "add_edge": "INSERT INTO edges (dep, task) VALUES (:dep, :task)",
    "bump": "UPDATE counts SET n = n + :delta WHERE reqset = :reqset AND state = :state",
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
    applied (incremental.py); otherwise any difference but added tasks is an error."""

    def __init__(self, conn: Connection, now: float, lock: DatabaseLock | None, url: str,
                 spec: GraphSpec, worker: str, downstream: bool = True) -> None:
        self.conn, self.now, self.lock, self.url = conn, now, lock, url
        self.spec, self.worker, self.downstream = spec, worker, downstream
        # Bulk inserts use the ledger's raw executemany: SQLAlchemy's per-row parameter
        # handling cost more than SQLite itself here (SCALING_ANALYSIS.md, 'Measurements
        # behind the code').
        self.led = Ledger(conn, now)
        self.existing: dict[str, t.Any] = {}
        self.changes = incremental.Changes()

    def run(self) -> int:
        conn = self.conn
        stored = conn.execute(sa.select(sa.func.count()).select_from(tasks)
                              .where(tasks.c.state != "removed")).scalar_one()
        if stored or self.spec.fingerprints:
            self._check_against_stored(stored)
        generation = (conn.execute(sa.select(sa.func.max(graphs.c.generation))).scalar() or 0) + 1
        hashes = self.spec.hashes
        new = [(task, hashes[task.id]) for task in self.spec.order
               if task.id not in self.existing]
        self._insert(new, generation)
        if self.changes:
            incremental.check_not_concurrent(self.led, self.changes, self.worker, self.url)
            incremental.apply(self.led, self.changes, self.spec, generation, self.worker,
                              self.downstream)
        # Back to an earlier version of the graph (fingerprints): it is the latest now.
        conn.execute(graphs.delete().where(graphs.c.digest == self.spec.digest))
        conn.execute(graphs.insert().values(
            generation=generation, digest=self.spec.digest, n_tasks=len(self.spec.by_id),
            registered_at=self.now, worker=self.worker))
        self.led.flush()  # what the changes booked: counts and history
        return generation

    def _refresh(self) -> None:
        if self.lock is not None:
            self.lock.refresh()

    # ----------------------------------------------------------- the stored graph
    def _check_against_stored(self, stored: int) -> None:
        ids, hashes = list(self.spec.hashes), self.spec.hashes
        mismatched: list[t.Any] = []
        for start in range(0, len(ids), CHUNK):
            chunk = {tid: hashes[tid] for tid in ids[start:start + CHUNK]}
            rows = self.conn.execute(
                sa.select(*incremental.STORED).where(tasks.c.id.in_(list(chunk)))
            ).all()
            for row in rows:
                self.existing[row.id] = row
                if row.state == "removed" and self.spec.fingerprints:
                    self.changes.back.append(row)
                elif row.spec_hash != chunk[row.id] and not self._adopt(row):
                    mismatched.append(row)
                elif (self.spec.fingerprints
                      and row.fingerprint != self.spec.by_id[row.id].fingerprint):
                    self.changes.refingerprinted.append(row)
            self._refresh()
        present = len(self.existing) - len(self.changes.back)
        if self.spec.fingerprints:
            self.changes.rewired = incremental.rewired(self.led, mismatched, self.spec,
                                                       self.url)
            if present < stored:
                self.changes.removed = incremental.gone(self.led, self.spec)
            return
        if mismatched:
            raise GraphMismatchError(self._mismatch(mismatched))
        if present < stored:
            raise GraphMismatchError(
                f"The database {self.url} holds {stored - len(self.existing)} task(s) "
                "that this worker's graph lacks. All workers must yield the same tasks (a "
                "rerun may add tasks, but not drop them; ids must stay the same: e.g. "
                "Laufband with and without key= gives other ids); to change the graph, "
                "start a new db file."
            )

    def _adopt(self, row: t.Any) -> bool:
        """A task stored by a laufband before schema 3 has no label and a hash without
        the item's digest: take it over as it is now (the workflow goes on)."""
        task = self.spec.by_id[row.id]
        if row.label is not None or row.spec_hash != spec_hash(task):
            return False
        label = self.spec.labels.get(row.id) if self.spec.labels else None
        self.led.run(SQL["adopt"], {"pk": row.pk, "spec_hash": self.spec.hashes[row.id],
                                    "label": label})
        return True

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
                "start a new db file."
            )
        ids = ", ".join(repr(r.id) for r in rows[:3])
        return (
            f"{len(rows)} task(s) differ from the graph stored in {self.url} "
            f"(dependencies, requirements or max_parallel_workers), e.g. {ids}. All "
            "workers of a workflow must yield the same graph. To change dependencies "
            "between runs, enable fingerprints (enable_fingerprints=True); to change "
            "anything else, start a new db file."
        )

    # ------------------------------------------------------------------ inserting
    def _insert(self, new: list[tuple[Task, str]], generation: int) -> None:
        next_pk = (self.conn.execute(sa.select(sa.func.max(tasks.c.pk))).scalar() or 0) + 1
        reqset_ids = self._reqset_ids({task.requirements for task, _ in new})
        pk_of = {tid: row.pk for tid, row in self.existing.items()}
        state_of = {tid: row.state for tid, row in self.existing.items()}
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
            reqset = reqset_ids[task.requirements]
            added[(reqset, state)] = added.get((reqset, state), 0) + 1
            rows.append({
                "pk": pk, "id": task.id, "state": state.value, "reqset": reqset,
                "generation": generation, "spec_hash": h, "fingerprint": task.fingerprint,
                "waiting_on": waiting, "max_parallel": task.max_parallel_workers,
                "updated_at": self.now, "label": labels.get(task.id),
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
