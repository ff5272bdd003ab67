"""Ending attempts: completion (a whole batch in a few statements), failure, kill and
preemption; fencing of stale attempts; blocking the descendants of a task that failed
for good, and running it again when a worker's own budget allows ("fix and rerun").

Every write for an attempt first ends its live row in ``attempts`` (``ended_at IS
NULL``): if no live row matches, the attempt was no longer current (its worker was
declared dead and the task moved on) and the write is rejected and noted as fenced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from laufband.states import Event, TaskState
from laufband.store.ledger import Ledger, in_list
from laufband.store.model import Claim, Failure, Finish, Me

log = logging.getLogger(__name__)

S = TaskState

#: Longest stored error line and traceback (a traceback keeps its end, where it raised).
MAX_ERROR, MAX_TRACEBACK = 2_000, 16_000

# CROSS JOIN: SQLite then walks the edges first and looks each task up by its key
# (a plain JOIN let it start from all tasks of the state, a scan; see the query-plan
# test). PostgreSQL treats it as the inner join it is.
_DOWN = ("WITH RECURSIVE down(pk) AS ("
         " SELECT e.task FROM edges e CROSS JOIN tasks t"
         " WHERE e.dep IN ({pks}) AND t.pk = e.task AND t.state = '{state}'"
         " UNION SELECT e.task FROM down CROSS JOIN edges e CROSS JOIN tasks t"
         " WHERE e.dep = down.pk AND t.pk = e.task AND t.state = '{state}')"
         " SELECT pk FROM down")

SQL = {
    "end_one": "UPDATE attempts SET ended_at = :now, outcome = :outcome, error = :error,"
               " traceback = :traceback WHERE task = :pk AND attempt = :attempt"
               " AND worker = :worker AND ended_at IS NULL",
    "end_attempt": "UPDATE tasks SET running = running - 1 WHERE pk = :pk"
                   " RETURNING state, running, failures, kills, dirty, waiting_on,"
                   " max_parallel",
    "clear_dirty": "UPDATE tasks SET dirty = 0 WHERE pk = :pk",
    "count_done": "UPDATE workers SET completed = completed + :n WHERE id = :worker",
    "count_kill": "UPDATE tasks SET kills = kills + 1 WHERE pk = :pk",
    "count_failure": "UPDATE tasks SET failures = failures + 1 WHERE pk = :pk",
    # {pairs}, {in_pks}: Ledger.pairs_in, Ledger.in_pks. Each handles a whole batch.
    "end_completed": "UPDATE attempts SET ended_at = :now, outcome = 'completed'"
                     " WHERE ended_at IS NULL AND worker = :worker"
                     " AND {pairs} RETURNING task, attempt",
    # The states of the tasks whose attempts completed, {lock}ed in a step beside
    # others (in one order: two steps that complete attempts of the same shared tasks
    # wait for each other instead of deadlocking); then one UPDATE each ends the attempt
    # and completes the task, or only ends it (a sibling attempt completed the task).
    # Two updates of every row were a new row version and index entries each.
    "ended_states": "SELECT pk, state FROM tasks WHERE pk {in_pks} ORDER BY pk{lock}",
    "end_attempts": "UPDATE tasks SET running = running - 1 WHERE pk {in_pks}",
    # Only pk in the WHERE (see ledger.SQL["move_many"]). A task invalidated while the
    # attempt ran (dirty 1) waits or is ready to run again; one removed from the graph
    # meanwhile (dirty 2) is removed now. The mark stays while other attempts of a
    # shared task run (``running`` before this attempt ended: > 1): they began before
    # the change too.
    "complete": "UPDATE tasks SET running = running - 1, state = CASE WHEN dirty = 0"
                " THEN 'completed' WHEN dirty = 2 THEN 'removed' WHEN waiting_on = 0"
                " THEN 'ready' ELSE 'pending' END,"
                " invalidated = CASE WHEN dirty = 1 THEN 1 ELSE 0 END,"
                " dirty = CASE WHEN running > 1 THEN dirty ELSE 0 END,"
                " updated_at = :now WHERE pk {in_pks} RETURNING pk, reqset, state,"
                " EXISTS (SELECT 1 FROM edges WHERE edges.dep = tasks.pk)",
    # In a step beside others, before "release_dependents": the dependents in one
    # order, so that two steps that complete dependencies of the same tasks wait for
    # each other instead of deadlocking.
    "lock_dependents": "SELECT pk FROM tasks WHERE pk IN (SELECT task FROM edges"
                       " WHERE dep {in_pks}) ORDER BY pk FOR UPDATE",
    # Decrement every dependent once per completed dependency; those at zero become ready.
    "release_dependents":
        "UPDATE tasks SET waiting_on = waiting_on - d.n,"
        " state = CASE WHEN waiting_on = d.n AND state = 'pending' THEN 'ready' ELSE state END"
        " FROM (SELECT task, count(*) AS n FROM edges WHERE dep {in_pks} GROUP BY task) AS d"
        " WHERE tasks.pk = d.task RETURNING tasks.pk, tasks.reqset, tasks.state",
    # Descendants by walking the edges from the given tasks, through tasks of one state
    # (pending: to block them; blocked: to unblock them). Never a scan of that state.
    "pending_below": _DOWN.replace("{state}", "pending"),
    "blocked_below": _DOWN.replace("{state}", "blocked"),
    # Tasks a worker's own budget lets run again, of the requirement sets {reqsets} and
    # generations it may claim (by the state index: failed and killed tasks only).
    "revivable": "SELECT pk FROM tasks WHERE state = 'failed' AND reqset IN ({reqsets})"
                 " AND generation <= :generation AND failures <= :failed AND dirty != 2"
                 " UNION ALL SELECT pk FROM tasks WHERE state = 'killed'"
                 " AND reqset IN ({reqsets}) AND generation <= :generation"
                 " AND kills <= :killed AND dirty != 2",
    "failed_roots": "SELECT pk FROM tasks WHERE state IN ('failed', 'killed')",
    # Upstream of {pks} by the edges(task) index, to the tasks failed or killed for good.
    "failed_above": "WITH RECURSIVE up(pk) AS (SELECT dep FROM edges WHERE task IN ({pks})"
                    " UNION SELECT e.dep FROM up CROSS JOIN edges e WHERE e.task = up.pk)"
                    " SELECT t.pk FROM up CROSS JOIN tasks t WHERE t.pk = up.pk"
                    " AND t.state IN ('failed', 'killed')",
    "reset_budget": "UPDATE tasks SET failures = 0, kills = 0 WHERE pk IN ({pks})"
                    " AND state IN ('failed', 'killed')",
    "live_of": "SELECT a.task, a.attempt, t.id FROM attempts a JOIN tasks t ON t.pk = a.task"
               " WHERE a.worker = :worker AND a.ended_at IS NULL"
               " ORDER BY a.started_at, a.task",
    # Live attempts past their deadline (Task.timeout), with their worker's budget: by
    # the clock of the worker that claimed them for its own, and for another worker's
    # only a heartbeat timeout later (the clocks of two nodes may differ by as much).
    "overdue": "SELECT a.task, a.attempt, t.id, a.worker, a.deadline - a.started_at,"
               " coalesce(w.max_failed, 0) FROM attempts a CROSS JOIN tasks t"
               " LEFT JOIN workers w ON w.id = a.worker"
               " WHERE a.ended_at IS NULL AND t.pk = a.task AND (a.deadline < :now"
               " AND a.worker = :me OR a.deadline + coalesce(w.heartbeat_timeout, 0) < :now)",
    "set_result": "UPDATE attempts SET result = :result WHERE task = :pk"
                  " AND attempt = :attempt AND worker = :worker AND outcome = 'completed'",
    "add_error": "UPDATE attempts SET error = :error, traceback = :traceback"
                 " WHERE task = :pk AND attempt = :attempt AND worker = :worker"
                 " AND outcome = 'failed'",
}
# A server's form of "end_completed" then "count_done": one statement, one round trip.
SQL["end_and_count"] = (
    "WITH e AS (" + SQL["end_completed"] + "), w AS (UPDATE workers SET completed ="
    " completed + (SELECT count(*) FROM e) WHERE id = :worker AND EXISTS (SELECT 1 FROM e))"
    " SELECT task, attempt FROM e")


def end(led: Ledger, worker: str, finishes: Sequence[Finish]) -> None:
    """End attempts: completions as one batch, the rest one by one (a write for an
    attempt that is no longer current is rejected and noted as fenced)."""
    _end_completed(led, worker, [f.claim for f in finishes if f.outcome == Event.COMPLETED])
    results = [{"pk": f.claim.pk, "attempt": f.claim.attempt, "worker": worker,
                "result": f.result} for f in finishes
               if f.result is not None and f.outcome == Event.COMPLETED]
    if results:  # fenced ones match no row: their results are not kept
        led.run(SQL["set_result"], results)
    for finish in finishes:
        if finish.outcome != Event.COMPLETED:
            _end_other(led, worker, finish)


def _end_completed(led: Ledger, worker: str, claims: Sequence[Claim]) -> None:
    """End attempts that completed, a whole batch in a few statements (not one per task)."""
    if not claims:
        return
    pairs, params = led.pairs_in("task", "attempt", [(c.pk, c.attempt) for c in claims])
    # By (task, attempt), not by task: a worker declared dead, then back, can record
    # a stale attempt of a task together with its new one (the stale one is fenced).
    end = SQL["end_and_count" if led.server else "end_completed"]
    current = set(led.all(end.format(pairs=pairs),
                          {**params, "worker": worker, "now": led.now}))
    live = []
    for claim in claims:
        if (claim.pk, claim.attempt) in current:
            live.append(claim)
        else:
            _fence(led, worker, claim, Event.COMPLETED)
    if live:
        led.ended = True
        if not led.server:
            led.run(SQL["count_done"], {"worker": worker, "n": len(live)})
        marks, params = led.in_pks([c.pk for c in live])
        lock = " FOR NO KEY UPDATE" if led.beside else ""  # as an UPDATE locks a row
        state_of = dict(led.all(SQL["ended_states"].format(in_pks=marks, lock=lock),
                                params))
        _complete(led, worker, [(c, state_of[c.pk]) for c in live])


def _complete(led: Ledger, worker: str, ended: Sequence[tuple[Claim, str]]) -> None:
    """End the attempts that completed, ``ended`` (claim, its task's state); mark
    their tasks completed (a task that a sibling attempt of a shared task completed
    already is only released) and release their dependents."""
    done, released = [], []
    for claim, state in ended:
        (released if state == S.COMPLETED else done).append((claim, state))
    if released:
        marks, params = led.in_pks([c.pk for c, _ in released])
        led.run(SQL["end_attempts"].format(in_pks=marks), params)
        for claim, _ in released:
            led.note([claim.pk], Event.RELEASED, None, worker, claim.attempt)
    if not done:
        return
    marks, params = led.in_pks([c.pk for c, _ in done])
    after = {pk: (reqset, new, below) for pk, reqset, new, below in
             led.all(SQL["complete"].format(in_pks=marks), {**params, "now": led.now})}
    below = []  # completed tasks that have dependents (in a flat workflow none)
    for claim, state in done:
        reqset, new, has_dependents = after[claim.pk]
        if new == S.COMPLETED:
            led.record([(claim.pk, reqset)], state, new, Event.COMPLETED, worker,
                       claim.attempt)
            if has_dependents:
                below.append((claim, state))
        else:  # its inputs changed, or it left the graph, while it ran
            event = Event.REMOVED if new == S.REMOVED else Event.INVALIDATED
            led.record([(claim.pk, reqset)], state, new, event, worker, claim.attempt,
                       "changed while its attempt ran: the result of that attempt is "
                       "not kept")
    if len(below) < len(done):
        done = below
        if not done:
            return
        marks, params = led.in_pks([c.pk for c, _ in done])
    if led.beside:
        led.all(SQL["lock_dependents"].format(in_pks=marks), params)
    rows = led.all(SQL["release_dependents"].format(in_pks=marks), params)
    ready = [(pk, reqset) for pk, reqset, state in rows if state == S.READY]
    if ready:
        detail = (f"dependency {done[0][0].id!r} completed" if len(done) == 1 else
                  f"its last dependencies completed (in a batch of {len(done)})")
        led.record(ready, S.PENDING, S.READY, Event.READY, worker, detail=detail)


def _end_other(led: Ledger, worker: str, finish: Finish) -> None:
    """An attempt that failed, was killed or was preempted."""
    claim, outcome = finish.claim, finish.outcome
    error = finish.failure.error[:MAX_ERROR] if finish.failure else finish.detail
    trace = finish.failure.traceback if finish.failure else None
    if not led.run(SQL["end_one"], {
            "pk": claim.pk, "attempt": claim.attempt, "worker": worker, "now": led.now,
            "outcome": outcome.value, "error": error,
            "traceback": trace[-MAX_TRACEBACK:] if trace else None}):
        _fence(led, worker, claim, outcome)
        return
    led.ended = True
    state, running, failures, kills, dirty, waiting, width = led.all(
        SQL["end_attempt"], {"pk": claim.pk})[0]
    # Back to waiting if a dependency was invalidated while the attempt ran.
    again = S.READY if waiting == 0 else S.PENDING
    if outcome == Event.FAILED:
        led.run(SQL["count_failure"], {"pk": claim.pk})
    elif outcome == Event.KILLED:
        led.run(SQL["count_kill"], {"pk": claim.pk})
    detail = error if outcome != Event.PREEMPTED else finish.detail
    if state == S.COMPLETED:
        # A sibling attempt of a shared task completed it already.
        led.note([claim.pk], Event.RELEASED, None, worker, claim.attempt, detail)
    elif outcome == Event.CANCELLED:  # the drain of `laufband cancel` timed out
        if running > 0 or state == S.CANCELLED:
            led.note([claim.pk], outcome, None, worker, claim.attempt, detail)
        else:
            led.move(claim.pk, state, S.CANCELLED, outcome, worker, claim.attempt, detail)
    elif dirty == 2 and running == 0:  # left the graph while it ran
        led.move(claim.pk, state, S.REMOVED, outcome, worker, claim.attempt, detail)
        led.run(SQL["clear_dirty"], {"pk": claim.pk})
    elif running > 0:
        # A shared task whose other attempts still run just frees a slot: ready (not
        # claimable while it waits again: find_ready); a dirty mark stays for them.
        # Unless this attempt used up the budget, or one before it did (the task is
        # running with a slot free: held): then no attempt starts in the slot (the task
        # stays running) and the end of the last one decides (below). Were the slot
        # taken again, attempts that keep failing would always leave one running, and
        # the task would be retried for ever (review26, review27).
        held = state == S.RUNNING and running + 1 < width
        spent = held or (outcome != Event.PREEMPTED
                         and _used(outcome, failures, kills) > finish.budget)
        led.move(claim.pk, state, S.RUNNING if spent else S.READY, outcome, worker,
                 claim.attempt, detail)
    elif outcome == Event.PREEMPTED:  # costs no retry
        led.move(claim.pk, state, again, outcome, worker, claim.attempt, detail)
        if dirty == 1:  # the next attempt sees the new inputs anyway
            led.run(SQL["clear_dirty"], {"pk": claim.pk})
    else:
        used = _used(outcome, failures, kills)
        final = again if used <= finish.budget else (
            S.FAILED if outcome == Event.FAILED else S.KILLED)
        led.move(claim.pk, state, final, outcome, worker, claim.attempt, detail)
        if dirty:
            led.run(SQL["clear_dirty"], {"pk": claim.pk})
        if final not in (S.READY, S.PENDING):
            block_descendants(led, claim, worker)


def _used(outcome: Event, failures: int, kills: int) -> int:
    """The failures (or kills) of a task with the attempt that just ended badly, which
    its worker's budget allows up to ``Finish.budget``."""
    return failures + 1 if outcome == Event.FAILED else kills + 1


def _fence(led: Ledger, worker: str, claim: Claim, outcome: Event) -> None:
    log.warning("task %r attempt %d: %s by %s was rejected; this attempt is no longer "
                "current (it timed out, or its worker was declared dead, and the task "
                "moved on)",
                claim.id, claim.attempt, outcome.value, worker)
    led.note([claim.pk], Event.FENCED, None, worker, claim.attempt,
             f"late {outcome.value} rejected")


def block_descendants(led: Ledger, claim: Claim, worker: str) -> None:
    """Everything downstream of a task that failed for good waits for nothing now."""
    marks, params = in_list([claim.pk])
    blocked = [pk for (pk,) in led.all(SQL["pending_below"].format(pks=marks), params)]
    led.move_all(blocked, S.BLOCKED, Event.BLOCKED, worker,
                 detail=f"dependency {claim.id!r} did not complete")


def revive(led: Ledger, me: Me) -> int:
    """Make ready again the tasks that failed or were killed for good under a smaller
    budget than this worker's (0.2.1's rule: the claiming worker's own budget decides)
    and that it may claim, and unblock their descendants. Returns how many."""
    pks = _revivable(led, me, limit=None)
    if pks:
        run_again(led, pks, me.id, f"within this worker's budget (max_failed_retries="
                                   f"{me.max_failed}, max_killed_retries={me.max_killed})")
    return len(pks)


def run_again(led: Ledger, pks: list[int], who: str, detail: str) -> None:
    """Failed or killed tasks go back to ready (pending if a dependency was invalidated
    after they failed), and what they blocked waits for them again."""
    marks, params = in_list(pks)
    waiting = {pk for (pk,) in led.all(
        f"SELECT pk FROM tasks WHERE pk IN ({marks}) AND waiting_on > 0", params)}
    led.move_all([pk for pk in pks if pk not in waiting], S.READY, Event.RETRIED, who,
                 detail=detail)
    led.move_all(sorted(waiting), S.PENDING, Event.RETRIED, who, detail=detail)
    unblock_below(led, pks, who)


def failed_above(led: Ledger, pks: list[int]) -> list[int]:
    """The failed or killed tasks upstream of ``pks`` (what blocks them)."""
    return sorted(set(walk(led, "failed_above", pks)))


def retry(led: Ledger, pks: list[int], who: str) -> None:
    """``laufband retry``: failed or killed tasks get a fresh retry budget and run
    again; their blocked descendants wait for them again."""
    for start in range(0, len(pks), 5000):
        marks, params = in_list(pks[start:start + 5000])
        led.run(SQL["reset_budget"].format(pks=marks), params)
    run_again(led, pks, who, f"retried by {who}: its retry budget starts again")


def revivable(led: Ledger, me: Me) -> bool:
    """Is there a task that ``revive`` would make ready (a read)?"""
    return bool(_revivable(led, me, limit=1))


def _revivable(led: Ledger, me: Me, limit: int | None) -> list[int]:
    if (me.max_failed <= 0 and me.max_killed <= 0) or not me.reqset_ids:
        return []
    marks, params = in_list(me.reqset_ids)
    sql = SQL["revivable"].format(reqsets=marks) + (f" LIMIT {limit}" if limit else "")
    return [pk for (pk,) in led.all(sql, {**params, "generation": me.generation,
                                          "failed": me.max_failed, "killed": me.max_killed})]


def unblock_below(led: Ledger, revived: list[int], worker: str) -> None:
    """Blocked descendants of ``revived`` wait again, unless another task that failed
    for good is upstream of them too."""
    below = set(walk(led, "blocked_below", revived))
    if not below:
        return
    roots = [pk for (pk,) in led.all(SQL["failed_roots"])]
    below -= set(walk(led, "blocked_below", roots)) if roots else set()
    # Every unblocked task still waits for the task it was blocked by (or for one
    # unblocked with it): pending, never ready.
    led.move_all(sorted(below), S.PENDING, Event.UNBLOCKED, worker,
                 detail="the dependency that had failed runs again")


def walk(led: Ledger, name: str, start: list[int]) -> list[int]:
    found: list[int] = []
    for i in range(0, len(start), 5000):
        marks, params = in_list(start[i:i + 5000])
        found += [pk for (pk,) in led.all(SQL[name].format(pks=marks), params)]
    return found


def live_claims(led: Ledger, worker: str) -> list[Claim]:
    return [Claim(pk, task_id, attempt)
            for pk, attempt, task_id in led.all(SQL["live_of"], {"worker": worker})]


def hand_back_all(led: Ledger, worker: str, why: str) -> None:
    """Return every live attempt of ``worker`` to ready (no retry used)."""
    for claim in live_claims(led, worker):
        _end_other(led, worker, Finish(claim, Event.PREEMPTED, why))


def end_all_of_dead(led: Ledger, worker: str, budget: int, why: str,
                    threads: int = 1) -> None:
    """End the live attempts of a worker declared dead.

    A loop runs one task at a time; more claims mean a batch, whose other tasks were
    finished-but-unrecorded or not started, or a task claimed ahead. We cannot tell
    which one was running, so one attempt is charged to the kill budget, as without
    batching: the earliest claimed (the first of the batch, which runs first; not the
    one claimed ahead, later), and the others go back to ready free of charge. One dead
    worker thus never kills more tasks for good than an unbatched one would.

    ``worker.map(threads=N)`` runs every claim it holds (at most N): each of them is
    charged, since any of them may have killed the process (a task that keeps killing
    its worker must use up its budget even while it runs beside others).
    """
    for i, claim in enumerate(live_claims(led, worker)):
        if i < threads:
            _end_other(led, worker, Finish(claim, Event.KILLED, why, budget))
        else:
            _end_other(led, worker, Finish(
                claim, Event.PREEMPTED, f"{why}; claimed in the same batch (no retry used)"))


def time_out(led: Ledger, by: str) -> int:
    """Record failed every live attempt that ran past its task's timeout (whoever runs
    it: its resources are released now; what the attempt does later is fenced)."""
    overdue = led.all(SQL["overdue"], {"now": led.now, "me": by})
    for pk, attempt, task_id, worker, timeout, budget in overdue:
        error = f"TimeoutError: the attempt ran longer than its timeout of {timeout:g} s"
        _end_other(led, worker, Finish(
            Claim(pk, task_id, attempt), Event.FAILED, error, budget,
            Failure(error, f"recorded by worker {by}; the attempt of worker {worker} was "
                           "still running")))
    return len(overdue)


def add_error(led: Ledger, worker: str, claim: Claim, error: str, trace: str | None) -> None:
    """Complete the record of a failed attempt (the exception reached the interpreter
    after the loop had recorded the failure: see session.py)."""
    led.run(SQL["add_error"], {"pk": claim.pk, "attempt": claim.attempt, "worker": worker,
                               "error": error[:MAX_ERROR],
                               "traceback": trace[-MAX_TRACEBACK:] if trace else None})
