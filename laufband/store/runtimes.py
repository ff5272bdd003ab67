"""What fits in a worker's time (walltime awareness): runtime estimates, the ready tasks
a worker whose allocation ends may still start, and the requirement sets it may still
wait for.

A task's runtime is the one it declares (``Task.runtime``), else the estimate of its
requirement set (labels and resources: tasks of one kind): the longest of the last
``SAMPLES`` completed attempts of that set, from claim to recorded completion, among
the last ``WINDOW`` completed attempts of the workflow. The longest, not a mean: a
worker must not start what it cannot finish, and one that leaves a task it could have
finished only costs the task a little wait for another worker. No estimate yet (nothing
of that kind completed lately): no limit for that task.

A worker with a deadline (``Me.deadline``: its allocation's end minus
``walltime_margin``) has ``deadline - now`` seconds left. It claims a task only if the
task's runtime fits in them; a loop runs a batch one task after the other, so a batch's
runtimes add up. It looks at the next ``LOOKAHEAD`` ready tasks of each requirement set
in claim order (the claim index), so a claim stays cheap when many of them are too long
for it: a task that fits behind that many that do not waits for a worker with more time.
It waits only for requirement sets with an unfinished task that fits (``in_reach``):
when everything left is too long for it, it leaves, and the tasks stay ready for others.
"""

from __future__ import annotations

from laufband.states import UNFINISHED
from laufband.store import resources
from laufband.store.ledger import Ledger
from laufband.store.model import Me

#: Completed attempts of one requirement set an estimate is the longest of.
SAMPLES = 20
#: Latest completed attempts of the workflow read for the estimates (the index on
#: ended_at reads the newest first; status displays read as many).
WINDOW = 1000
#: Ready (or, to decide whether to wait, unfinished) tasks per requirement set a worker
#: with a deadline looks at.
LOOKAHEAD = 1000
#: A worker's steps read the estimates again after this many seconds; its heartbeats
#: read them at every beat (about 1 ms, in the beat's transaction), so steps only do
#: before the first beat, or when beats fail.
TTL = 60.0

SQL = {
    # ix_attempts_ended, newest first; the task (for its requirement set) by key.
    "recent": "SELECT t.reqset, a.ended_at, a.ended_at - a.started_at FROM"
              " (SELECT task, started_at, ended_at FROM attempts WHERE outcome = 'completed'"
              " ORDER BY ended_at DESC LIMIT :window) a CROSS JOIN tasks t"
              " WHERE t.pk = a.task",
    "reqset_keys": "SELECT id, labels, resources FROM reqsets",
    # Unfinished tasks of a requirement set by the claim index (state, reqset): is one
    # of the first LOOKAHEAD short enough?
    "in_reach": "SELECT 1 FROM (SELECT runtime FROM tasks"
                " WHERE state IN ('pending', 'ready', 'running') AND reqset = :reqset"
                " AND generation <= :generation LIMIT :lookahead) u"
                " WHERE coalesce(runtime, :estimate, 0) <= :left LIMIT 1",
}


def in_time(find_ready: str, locking: str = "") -> str:
    """``find_ready`` (claiming.SQL: pk first, ``LIMIT :limit``) for a worker with a
    deadline: of its first ``:limit`` (LOOKAHEAD) rows, up to ``:take`` whose runtime
    (declared, else ``:estimate``; none: 0) is at most ``:left``, with that runtime.

    ``locking`` (a claim on a server: claiming.LOCKING): the rows are locked, and checked
    again once locked (a row another claim committed meanwhile is locked in its new
    version, against the outer conditions only: ``f``'s are not evaluated again)."""
    recheck = " AND t.state = 'ready' AND t.running < t.max_parallel" if locking else ""
    return ("SELECT f.*, coalesce(t.runtime, :estimate) FROM (" + find_ready + ") f"
            " CROSS JOIN tasks t WHERE t.pk = f.pk" + recheck
            + " AND coalesce(t.runtime, :estimate, 0) <= :left LIMIT :take"
            + (" " + locking if locking else ""))


def seconds_left(me: Me, now: float) -> float | None:
    """Seconds until this worker's deadline (None: no limit)."""
    return None if me.deadline is None else me.deadline - now


def refresh(led: Ledger, me: Me, force: bool = False) -> None:
    """Read the estimates again if they are older than TTL (``force``: now). Only for a
    worker with a deadline: the others never need them."""
    if me.deadline is None or (not force and led.now - me.estimated_at < TTL):
        return
    latest: dict[int, list[tuple[float, float]]] = {}
    for reqset, ended, took in led.all(SQL["recent"], {"window": WINDOW}):
        latest.setdefault(reqset, []).append((ended, took))
    estimates = {reqset: max(took for _, took in sorted(runs, reverse=True)[:SAMPLES])
                 for reqset, runs in latest.items()}
    keys = {(labels, res): rid for rid, labels, res in led.all(SQL["reqset_keys"])}
    # Replaced, never changed in place: the signal handler and other threads read them.
    me.estimates, me.reqset_keys, me.estimated_at = estimates, keys, led.now


class Lookup:
    """One claim's view of the time a worker with a deadline has left."""

    def __init__(self, led: Ledger, me: Me, left: float, sequential: bool) -> None:
        self.led = led
        self.me = me
        self.left = left
        self.sequential = sequential
        self.runtime: dict[int, float | None] = {}

    def ready(self, sql: str, params: dict) -> list[tuple]:
        """The rows of claiming.SQL["find_ready"] (``sql``: its in_time form) whose
        runtime fits in the time left."""
        rows = self.led.all(sql, {**params, "limit": LOOKAHEAD, "take": params["limit"],
                                  "estimate": self.me.estimates.get(params["reqset"]),
                                  "left": self.left})
        for row in rows:
            self.runtime[row[0]] = row[-1]
        return [tuple(row[:-1]) for row in rows]

    def take(self, pk: int, need: dict[str, int] | None, free: dict[str, int]) -> bool:
        """Claim ``pk`` too (it is claimed unless its resources, ``need``, are not
        ``free``)? In a loop (``sequential``) the tasks of a batch run one after the
        other: each one claimed takes its runtime from the time left."""
        if not self.sequential:
            return True
        runtime = self.runtime.get(pk) or 0.0
        if runtime > self.left:
            return False
        if not need or resources.fits(need, free) >= 1:
            self.left -= runtime
        return True


def in_reach(led: Ledger, me: Me) -> list[int]:
    """The requirement sets of ``me`` with an unfinished task it could finish in time
    (all of them without a deadline): the ones it waits for."""
    left = seconds_left(me, led.now)
    if left is None:
        return me.reqset_ids
    if left <= 0:
        return []
    return [r for r in me.reqset_ids if led.counts.n(UNFINISHED, [r]) and led.all(
        SQL["in_reach"], {"reqset": r, "generation": me.generation, "lookahead": LOOKAHEAD,
                          "estimate": me.estimates.get(r), "left": left})]
