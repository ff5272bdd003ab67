"""Claiming: which ready tasks a worker takes, and how many.

A claim is one indexed lookup per requirement set of the worker that has ready tasks
(each in priority, depth and graph order; merged: higher priority first, then deeper,
then the most specific requirements, then graph order) and one UPDATE ... RETURNING for
the whole batch, never a scan of all tasks. Tasks that hold resources are taken only as
far as the limits leave room (resources.py). How many:
up to ``Want.limit``, but only this worker's fair share of the ready tasks (ready / live
workers) or ``Want.free`` if that is more; nothing once a task failed for good under
failure_policy="stop"; and a step ahead only while every live worker finds a task.

On PostgreSQL, steps run side by side (Store.step): a step whose attempts all
completed (most steps of a run: a batch ended, the next one claimed) takes the
writers' lock in shared mode, which excludes every other writer (reaping, registering,
cancelling, failures, resources) but not other such steps, and finds its tasks with
``FOR UPDATE SKIP LOCKED``: a task one claim found is skipped by the others, and the
UPDATE's guard would refuse it anyway. What else such steps write is row-locked in
one order: the tasks they completed are their own (a shared task's other attempts wait
for the row and then see it completed), the tasks waiting for them are locked in key
order before they are released (attempts.py: the step whose completion brings a task's
count of waits to zero makes it ready), each worker writes only its own row, and the
counts come last, every row in one order (ledger.py), re-read under the lock: from
there to its commit a step is alone with the counts, so what it decides from them
(the workflow is over, a waiting worker may act) sees every other step. What other
steps change meanwhile makes the counts a step read at its start stale only in the
safe direction for claiming: a claim may find fewer ready tasks than there are, never
take one that is not. Run alone instead: a step that records an attempt that did not
complete, makes failed tasks ready again, or claims nothing (after its completions
were recorded beside the others, whether it waits or leaves is decided alone); the
steps of a worker that may take tasks that hold resources (what the limits leave is a
sum over running attempts, which a claim beside another could not see change); and a
step the server rolled back to break a deadlock (completions of tasks that are
dependencies of each other's running tasks, after a rerun changed a graph). On SQLite
every transaction runs alone (the file lock).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from laufband.states import Event, TaskState
from laufband.store import resources, runtimes, workers
from laufband.store.ledger import Ledger
from laufband.store.model import Claim, Finish, Me, Want

S = TaskState
log = logging.getLogger(__name__)

SQL = {
    # Ready tasks of one requirement set, of a generation this worker's graph has, of
    # which it holds no live attempt (a shared task's second slot is someone else's);
    # not a shared task that waits again (a dependency was invalidated while one of its
    # attempts ran: it stays 'ready') nor one to be removed (fingerprints). Attempts
    # are looked up only for tasks that have live ones (``running``: a shared task):
    # as an anti-join, PostgreSQL without statistics (a graph just registered) walked
    # all of the worker's live attempts for every ready task it passed, most of a
    # server's time in a run of trivial tasks (SCALING_ANALYSIS.md).
    "find_ready": "SELECT pk, priority, depth, timeout IS NOT NULL FROM tasks"
                  " WHERE state = 'ready'"
                  " AND reqset = :reqset AND generation <= :generation AND waiting_on = 0"
                  " AND dirty != 2"
                  " AND (running = 0 OR NOT EXISTS (SELECT 1 FROM attempts"
                  " WHERE attempts.task = tasks.pk AND attempts.worker = :worker"
                  " AND attempts.ended_at IS NULL)) ORDER BY priority DESC, depth DESC, pk"
                  " LIMIT :limit",
    # {in_pks}: the batch (Ledger.in_pks; one statement claims the whole batch). The
    # guard (still ready, a slot free) as ``state || ''``, a term no index serves: with
    # a plain ``state = 'ready'`` SQLite prefers the state index to the batch's primary
    # keys (see ledger.SQL["move_many"] and the query-plan test).
    "claim": "UPDATE tasks SET attempts = attempts + 1, running = running + 1,"
             " state = CASE WHEN running + 1 >= max_parallel THEN 'running' ELSE 'ready' END,"
             " updated_at = :now WHERE pk {in_pks} AND state || '' = 'ready'"
             " AND running < max_parallel"
             " RETURNING pk, id, attempts, state, reqset, fingerprint, timeout",
    "add_attempt": "INSERT INTO attempts (task, attempt, worker, started_at, fingerprint,"
                   " deadline) VALUES (:task, :attempt, :worker, :now, :fingerprint,"
                   " :deadline)",
    "live_workers": "SELECT count(*) FROM workers WHERE state IN ('idle', 'busy')",
}
# A server's form of workers.ensure_alive, "claim" and "add_attempt" for each task it
# claimed: one statement, one round trip (the last column: 1 if the worker was revived).
SQL["claim_and_add"] = (
    "WITH r AS (" + workers.SQL["revive"] + " RETURNING 1), c AS (" + SQL["claim"] + "),"
    " a AS (INSERT INTO attempts (task, attempt, worker, started_at, fingerprint, deadline)"
    " SELECT pk, attempts, :worker, :now, fingerprint, :now + timeout FROM c)"
    " SELECT *, (SELECT count(*) FROM r) FROM c")
# For a worker whose allocation ends: only tasks that fit in its time (runtimes.py).
SQL["find_in_time"] = runtimes.in_time(SQL["find_ready"])
# A claim's forms on a server: the tasks it finds are locked, and skipped by the others.
LOCKING = {"find_ready": SQL["find_ready"] + " FOR UPDATE SKIP LOCKED",
           "find_in_time": runtimes.in_time(SQL["find_ready"],
                                            locking="FOR UPDATE OF t SKIP LOCKED")}


def how_many(led: Ledger, me: Me, want: Want) -> int:
    """The number of tasks this step may claim."""
    limit = want.limit
    if limit > 1 or want.ahead:
        live = max(1, led.scalar(SQL["live_workers"]))
        ready = led.counts.n([S.READY], me.reqset_ids)
        if want.ahead and ready < live:
            return 0  # a task claimed ahead would wait while another worker is free
        limit = min(limit, max(1, ready // live, want.free))
    return limit


def find(led: Ledger, me: Me, limit: int, ahead: bool = False, lock: bool = False
         ) -> list[int]:
    """Up to ``limit`` ready tasks this worker may claim: higher priority first, then
    deeper (depth-first workflows), then the most specific requirements, then graph
    order; tasks that hold resources only as far as the limits leave room.

    A task with a timeout starts its clock at the claim, so a loop (one task at a
    time) claims it alone and never ahead: in a batch it would wait for the others,
    and its completion is recorded only with the next step (worker.map starts every
    claim at once: no such rule).

    A worker whose allocation ends takes only tasks that fit in its time (runtimes.py).

    ``lock``: for a claim, on a server, lock what is found (see the module's notes)."""
    ready = [r for r in me.reqset_ids if led.counts.n([S.READY], [r])]
    time_left = runtimes.seconds_left(me, led.now)
    if not ready or (time_left is not None and time_left <= 0):
        return []
    sequential = me.threads <= 1
    timely = None if time_left is None else runtimes.Lookup(led, me, time_left, sequential)
    capped = [r for r in ready if r in me.needs]
    left = resources.free(led, me.needs, me.id) if capped else {}
    sql = LOCKING if lock and led.server else SQL
    found: list[tuple[int, int, int, int, int, int]] = []
    for reqset in ready:
        n = limit
        if reqset in me.needs:
            n = min(n, resources.fits(me.needs[reqset], left))
            if n <= 0:
                continue  # its resources are all held
        rank = -me.specific.get(reqset, 0)
        params = {"reqset": reqset, "generation": me.generation, "worker": me.id, "limit": n}
        rows = (led.all(sql["find_ready"], params) if timely is None
                else timely.ready(sql["find_in_time"], params))
        found += [(-prio, -depth, rank, pk, reqset, timed) for pk, prio, depth, timed in rows]
    if len(ready) > 1:
        found.sort()
    pks: list[int] = []
    for *_, pk, reqset, timed in found:
        if timed and sequential and (ahead or pks):
            break  # claimed alone, by a step of its own
        if timely is not None and not timely.take(pk, me.needs.get(reqset), left):
            continue  # in a loop, a batch runs one task after the other: too long
        need = me.needs.get(reqset)
        if need:
            if resources.fits(need, left) < 1:
                continue
            for name, amount in need.items():
                left[name] -= amount
        pks.append(pk)
        if len(pks) == limit or (timed and sequential):
            break
    return pks


def may_step_beside(me: Me, finishes: Sequence[Finish]) -> bool:
    """May this step run beside others' on a server (see the module's notes)? Not if
    an attempt it records did not complete, nor if a task this worker may claim holds
    resources."""
    return (all(f.outcome == Event.COMPLETED for f in finishes)
            and not any(r in me.needs for r in me.reqset_ids))


def claim(led: Ledger, me: Me, limit: int, ahead: bool = False,
          clock: Callable[[], float] | None = None) -> list[Claim]:
    """Claim up to ``limit`` tasks: a new attempt each, live in ``attempts``.

    ``clock``: a step beside others reads the time again after its find, for the claim
    and what it writes from then on: the find sees tasks that steps which committed
    after this one began made ready, whose ends and 'ready' events carry their own,
    later, start times (the history would show a task starting before its dependency
    ended)."""
    pks = find(led, me, limit, ahead, lock=True) if limit > 0 else []
    if not pks:
        return []
    if clock is not None:
        led.now = clock()
    marks, params = led.in_pks(pks)
    params.update(now=led.now, worker=me.id)
    if led.server:
        rows = led.all(SQL["claim_and_add"].format(in_pks=marks), params)
        if rows and rows[0][-1]:
            workers.revived(me.id)
    else:
        workers.ensure_alive(led, me.id)
        rows = led.all(SQL["claim"].format(in_pks=marks), params)
    by_pk = {row[0]: row[1:7] for row in rows}
    if len(by_pk) < len(pks):
        # Under the writers' lock nobody changes a task between find and claim; the
        # guard in the UPDATE keeps a task from being claimed twice should the lock
        # ever have been lost (a holder paused past its lifetime): claim the rest.
        log.warning("laufband: %d of %d tasks found ready were claimed by another "
                    "worker meanwhile (was the database lock lost?)",
                    len(pks) - len(by_pk), len(pks))
    result = []
    for pk in (pk for pk in pks if pk in by_pk):  # in the order found
        task_id, attempt, state, reqset, _fp, _timeout = by_pk[pk]
        led.record([(pk, reqset)], S.READY, state, Event.CLAIMED, me.id, attempt)
        result.append(Claim(pk, task_id, attempt))
    if not led.server:
        led.run(SQL["add_attempt"], [
            {"task": c.pk, "attempt": c.attempt, "worker": me.id, "now": led.now,
             "fingerprint": by_pk[c.pk][4],
             "deadline": None if by_pk[c.pk][5] is None else led.now + by_pk[c.pk][5]}
            for c in result])
    return result
