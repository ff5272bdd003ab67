"""Worker rows: registering, heartbeats, declaring silent workers dead (and ending their
attempts), the states a worker takes, and when a waiting worker may leave.

A worker is ``idle`` (online, not in a loop), ``busy`` (in a loop), ``offline`` (gone
cleanly) or ``dead`` (declared so by a peer). Claims are reaped by their holder's
heartbeat whatever its row says: a worker declared dead that woke up and claimed again
before its own heartbeat revived it is reaped like any other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from laufband.errors import WorkerIdentityError
from laufband.states import ALIVE, TaskState, WorkerState
from laufband.store import attempts, runtimes
from laufband.store.ledger import Ledger, in_list
from laufband.store.model import Me, WorkerInfo

log = logging.getLogger(__name__)

SQL = {
    "row": "SELECT state, hostname, pid, heartbeat, heartbeat_timeout FROM workers"
           " WHERE id = :worker",
    "insert": "INSERT INTO workers (id, state, hostname, pid, labels, heartbeat,"
              " heartbeat_timeout, started_at, stopped_at, leave_as, max_failed, max_killed,"
              " slurm, allocation_end) VALUES (:worker, 'idle', :hostname, :pid, :labels,"
              " :now, :timeout, :now, NULL, NULL, :max_failed, :max_killed, :slurm,"
              " :allocation_end)",
    "reuse": "UPDATE workers SET state = 'idle', hostname = :hostname, pid = :pid,"
             " labels = :labels, heartbeat = :now, heartbeat_timeout = :timeout,"
             " started_at = :now, stopped_at = NULL, leave_as = NULL,"
             " max_failed = :max_failed, max_killed = :max_killed, slurm = :slurm,"
             " allocation_end = :allocation_end WHERE id = :worker",
    "last_beat": "SELECT heartbeat FROM workers WHERE id = :worker",
    "beat": "UPDATE workers SET heartbeat = :now WHERE id = :worker RETURNING state",
    "revive": "UPDATE workers SET state = 'busy', stopped_at = NULL, heartbeat = :now"
              " WHERE id = :worker AND state = 'dead'",
    # Holders of live attempts are judged whatever their state; idle/busy ones always.
    "find_dead": "SELECT id FROM workers WHERE heartbeat + heartbeat_timeout < :now"
                 " AND id != :me AND (state IN ('idle', 'busy') OR EXISTS (SELECT 1 FROM"
                 " attempts WHERE attempts.worker = workers.id AND attempts.ended_at IS NULL))",
    "mark_dead": "UPDATE workers SET state = 'dead', stopped_at = :now, leave_as = NULL"
                 " WHERE id = :worker",
    "busy": "UPDATE workers SET state = 'busy', leave_as = NULL"
            " WHERE id = :worker AND state = 'idle'",
    "threads": "UPDATE workers SET threads = :threads WHERE id = :worker",
    "threads_of": "SELECT threads FROM workers WHERE id = :worker",
    "wait": "UPDATE workers SET leave_as = :leave WHERE id = :worker AND state = 'busy'",
    "left_as": "SELECT state, leave_as FROM workers WHERE id = :worker",
    # Also over 'dead': a worker that was declared dead while paused and now leaves
    # cleanly is alive, and says so.
    "leave": "UPDATE workers SET state = :state, stopped_at = :stopped, leave_as = NULL"
             " WHERE id = :worker",
    "reqsets": "SELECT id, labels FROM reqsets",
    "any_live": "SELECT 1 FROM attempts WHERE ended_at IS NULL LIMIT 1",
    "live_labels": "SELECT DISTINCT labels FROM workers WHERE state IN ('idle', 'busy')"
                   " AND id != :me",
    "newest_generation": "SELECT max(generation) FROM graphs",
    # For a worker of an older graph generation: its own tasks are those of its
    # generations (it may not claim newer ones; _done_for_older).
    "mine_waiting": "SELECT 1 FROM tasks WHERE state IN ('pending', 'running')"
                    " AND reqset IN ({mine}) AND generation <= :generation LIMIT 1",
    # ... a ready task of its generations that another live worker may run,
    "old_ready": "SELECT 1 FROM tasks WHERE state = 'ready' AND reqset IN ({live})"
                 " AND generation <= :generation LIMIT 1",
    # ... a ready task it may not claim: newer, or of a set it may not run;
    "unclaimable_ready": "SELECT 1 FROM tasks WHERE state = 'ready' AND (generation >"
                         " :generation OR reqset NOT IN ({mine})) LIMIT 1",
    # ... a shared task that runs while it stays ready (a slot free): the counters count
    # it ready, not running (review33 F1). From the live attempts (an index), not the
    # ready tasks (all of them when none runs: 14 ms at 100,000, review34 L1).
    "shared_running": "SELECT 1 FROM attempts a JOIN tasks t ON t.pk = a.task"
                      " WHERE a.ended_at IS NULL AND t.state = 'ready' LIMIT 1",
}


def register(led: Ledger, info: WorkerInfo, is_gone: Callable[[str, int], bool]) -> None:
    """Add (or reuse) this worker's row; refuse an identifier a live worker uses. A
    previous holder of the identifier that is not alive any more (a requeued job, a
    crashed earlier run) has its live attempts ended first."""
    row = led.all(SQL["row"], {"worker": info.id})
    if row:
        state, hostname, pid, beat, timeout = row[0]
        age = led.now - beat
        if state in ALIVE and age <= timeout and not is_gone(hostname, pid):
            raise WorkerIdentityError(
                f"Worker with id {info.id!r} already exists with status {state!r}: a live "
                f"worker uses this identifier (pid {pid} on {hostname}, last heartbeat "
                f"{age:.0f} s ago). Give each worker a unique identifier (or unset "
                "LAUFBAND_IDENTIFIER); an identifier becomes free when its worker exits "
                "or is declared dead."
            )
        if state in ALIVE or attempts.live_claims(led, info.id):
            how = "ended without going offline" if state in ALIVE else f"was {state}"
            declare_dead(led, info.id, info.max_killed,
                         f"the previous worker with this identifier (pid {pid} on "
                         f"{hostname}) {how}; a new one took the identifier over")
    led.run(SQL["reuse" if row else "insert"], {
        "worker": info.id, "hostname": info.hostname, "pid": info.pid,
        "labels": json.dumps(sorted(info.labels)), "now": led.now,
        "timeout": info.heartbeat_timeout, "max_failed": info.max_failed,
        "max_killed": info.max_killed,
        "slurm": json.dumps(info.slurm, sort_keys=True) if info.slurm else None,
        "allocation_end": info.allocation_end})


def declare_dead(led: Ledger, worker: str, budget: int, why: str) -> None:
    led.run(SQL["mark_dead"], {"worker": worker, "now": led.now})
    threads = led.scalar(SQL["threads_of"], {"worker": worker}) or 1
    attempts.end_all_of_dead(led, worker, budget, why, threads)


def heartbeat(led: Ledger, worker: str, budget: int, stalled_after: float) -> bool:
    """Refresh our heartbeat and reap dead workers. False if we had been declared dead.

    If our own previous beat is older than ``stalled_after`` seconds, we were stalled
    ourselves (waiting for a lock whose holder died, a file system hang, a suspended
    job), and so, likely, were the others: this beat judges nobody, and the next one,
    an interval later, does, once the live ones have beaten again. Both stamps come
    from our own clock, so clock skew plays no part here.
    """
    last = led.scalar(SQL["last_beat"], {"worker": worker})
    state = led.scalar(SQL["beat"], {"now": led.now, "worker": worker})
    if state == WorkerState.DEAD:
        led.run(SQL["revive"], {"worker": worker, "now": led.now})
    if last is not None and led.now - last > stalled_after:
        log.info("worker %s could not beat for %.0f s; not judging others this time",
                 worker, led.now - last)
    else:
        reap(led, worker, budget)
        attempts.time_out(led, worker)  # not after a stall: nobody could record meanwhile
    return state != WorkerState.DEAD


def reap(led: Ledger, me: str, budget: int) -> None:
    for (dead,) in led.all(SQL["find_dead"], {"now": led.now, "me": me}):
        age = led.now - led.scalar(SQL["last_beat"], {"worker": dead})
        log.warning("worker %s missed its heartbeat; declaring it dead", dead)
        declare_dead(led, dead, budget,
                     f"worker {dead} was declared dead by {me}: no heartbeat for {age:.0f} s")


def ensure_alive(led: Ledger, worker: str) -> None:
    """With a claim: a worker that was declared dead (paused past its timeout, now
    running again) renews its heartbeat in the same transaction, so that its new
    claims are reaped like anyone's if it dies again. (On a server the claim's own
    statement does it: claiming.SQL["claim_and_add"].)"""
    if led.run(SQL["revive"], {"worker": worker, "now": led.now}):
        revived(worker)


def revived(worker: str) -> None:
    log.warning("worker %s had been declared dead (paused longer than its heartbeat "
                "timeout?); it is back and claims again", worker)


def set_state(led: Ledger, worker: str, state: WorkerState) -> None:
    """Set a worker's state, unless it was declared dead; offline stamps the stop."""
    stopped = led.now if state == WorkerState.OFFLINE else None
    led.run(SQL["leave"], {"state": state.value, "stopped": stopped, "worker": worker})
    led.wake = True  # what the live workers can run changed (Counts.can_change)


def start_loop(led: Ledger, me: Me) -> None:
    """Mark the worker busy, with how many tasks it runs at once (a dead worker's
    running attempts are charged: see attempts.end_all_of_dead)."""
    led.run(SQL["busy"], {"worker": me.id})
    led.run(SQL["threads"], {"worker": me.id, "threads": me.threads})


def wait(led: Ledger, worker: str, leave: WorkerState) -> None:
    """Store the state this waiting worker takes when the workflow is finished."""
    led.run(SQL["wait"], {"leave": leave.value, "worker": worker})


def released(led: Ledger, worker: str, leave: WorkerState) -> bool:
    """Did the transaction that finished the workflow set this waiting worker's state to
    ``leave`` (ledger.SQL["release_waiters"])?"""
    row = led.all(SQL["left_as"], {"worker": worker})
    return bool(row) and row[0] == (leave.value, None)


def done_for(led: Ledger, me: Me) -> bool:
    """Can nothing this worker could run become claimable any more? (For a worker whose
    allocation ends: nothing it could finish in time; runtimes.in_reach.)"""
    mine = runtimes.in_reach(led, me)
    capped = [r for r in mine if r in me.needs]
    if capped and led.counts.n([TaskState.READY], capped) and led.all(SQL["any_live"]):
        # Ready tasks wait for resources that running attempts hold (a shared task
        # holds them while it is still 'ready': look at the attempts, not the counts).
        return False
    if me.generation < (led.scalar(SQL["newest_generation"]) or 0):
        return _done_for_older(led, me, mine)
    if led.counts.can_change(mine, lambda: _live_reqsets(led, me.id)):
        me.stranded_since = None
        return False
    return not _waits_for_labels(led, me, mine)


def _waits_for_labels(led: Ledger, me: Me, mine: list[int]) -> bool:
    """Nothing runs, and no live worker can run what this worker's pending tasks wait
    for: its labels are nobody's now. Wait ``me.label_wait`` seconds for a worker that
    has them before leaving (the job arrays of a pipeline's stages start in any order).
    A worker that comes in time resets the wait; one that leaves later starts it again.
    Called when ``Counts.can_change`` found no ready task a live worker can run."""
    counts = led.counts
    if not counts.n([TaskState.PENDING], mine):
        me.stranded_since = None
        return False
    # Only labels nobody has: a ready task of this worker's own sets that it cannot
    # claim in its time left (runtimes.in_reach) is no reason to wait (it leaves short
    # of time). Every other ready task needs labels no live worker has (can_change).
    if not counts.n([TaskState.READY], [r for r in counts.rows if r not in me.reqset_ids]):
        me.stranded_since = None
        return False
    return _stranded(led, me)


def _stranded(led: Ledger, me: Me) -> bool:
    """Does the wait for a worker that can run what this worker's pending tasks wait
    for go on? It started at the first look; ``me.label_wait`` seconds long."""
    if me.stranded_since is None:
        me.stranded_since = led.now
    return led.now - me.stranded_since < me.label_wait


def _done_for_older(led: Ledger, me: Me, mine: list[int]) -> bool:
    """done_for for a worker of an older generation. Its own tasks are those of its
    generations (it may not claim newer ones): with none of them pending or running it
    leaves at once, as it does not wait for newer work it cannot run. It waits while a
    task of any generation runs (Counts.can_change's rule; a shared task that runs may
    stay ready), and while another live worker may run a ready task of its generations
    (the counters span every generation, so its own tasks are asked of the tasks
    table: rare, only such a worker about to leave).

    Else its pending tasks may wait for a ready task of a newer generation: a changed
    task gets the new generation while its dependents keep theirs. A live worker may
    be about to run it (registered but not claimed yet, between loops, after a failed
    attempt), or nobody may (no live worker has its labels, or only workers of older
    generations do, which may not claim it: the workers' generations are not stored).
    It cannot tell which, so it waits ``label_wait`` for such a task to be claimed
    (review32 F1, F2), then leaves: not for ever, as two older workers would wait for
    each other. A live worker that comes with the labels of such a task, or the last
    one that leaves, restarts the wait (so two older workers wait at most about twice
    ``label_wait``)."""
    if not _any_task(led, "mine_waiting", mine, me.generation):
        me.stranded_since = None
        return True
    if led.counts.n([TaskState.RUNNING]) or led.all(SQL["shared_running"]):
        me.stranded_since = None
        return False
    live = sorted(_live_reqsets(led, me.id))
    if _any_task(led, "old_ready", live, me.generation):
        me.stranded_since = None
        return False
    # Nothing runs, so its own tasks wait pending. For a ready task it may not claim
    # (newer, or needing labels it lacks)? Ready tasks of its own sets and generations
    # it would have claimed, unless they do not fit its time left: it leaves short of
    # time (runtimes.in_reach), as a worker of the newest graph does.
    if not _any_task(led, "unclaimable_ready", me.reqset_ids, me.generation):
        me.stranded_since = None
        return True
    # A live worker with the labels of such a task came (it may be of the newer
    # generation, and claim it), or the last one left: the wait starts afresh, as
    # label_wait's does when a worker with the labels comes or leaves.
    taker = bool(led.counts.n([TaskState.READY], live))
    if taker != me.taker_seen:
        me.stranded_since = None
    me.taker_seen = taker
    return not _stranded(led, me)


def _any_task(led: Ledger, query: str, reqsets: list[int], generation: int) -> bool:
    """Does SQL[query] find a task, with ``reqsets`` as its ``{mine}`` or ``{live}``
    list? False for an empty list."""
    if not reqsets:
        return False
    marks, params = in_list(reqsets)
    sql = SQL[query].format(mine=marks, live=marks)
    return bool(led.all(sql, {**params, "generation": generation}))


def leave_if_done(led: Ledger, me: Me, leave: WorkerState | None) -> bool:
    """Set the worker's state to ``leave`` if nothing it could run can become claimable
    any more; True if it did."""
    if leave is None or not done_for(led, me):
        return False
    set_state(led, me.id, leave)
    return True


def _live_reqsets(led: Ledger, exclude: str) -> set[int]:
    """Requirement sets that some live worker other than ``exclude`` can run."""
    live = [frozenset(json.loads(raw))
            for (raw,) in led.all(SQL["live_labels"], {"me": exclude})]
    return {rid for rid, raw in led.all(SQL["reqsets"])
            if any(set(json.loads(raw)) <= have for have in live)}


def reqsets_for(led: Ledger, labels: frozenset[str]) -> dict[int, int]:
    """Requirement sets a worker with ``labels`` may run, most specific first: id ->
    the number of labels they need."""
    usable = [(len(req), rid) for rid, raw in led.all(SQL["reqsets"])
              if (req := set(json.loads(raw))) <= labels]
    return {rid: n for n, rid in sorted(usable, key=lambda x: (-x[0], x[1]))}


def final_failures(led: Ledger) -> int:
    """Tasks that failed or were killed for good and that no live worker's budget lets
    run again (failure_policy="stop" stops for these only)."""
    return led.final_failures()
