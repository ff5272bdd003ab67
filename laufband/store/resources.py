"""Global caps: the workflow's limits, what running tasks hold, and what is free.

A task holds its resources (its requirement set's ``resources``) for as long as one of
its attempts is live (``attempts.ended_at IS NULL``): what is held is summed over the
live attempts, so every way an attempt ends (completion, failure, a timeout, a dead
worker reaped, a hand-back) releases it, with no counter to keep in step. Live attempts
are few (one per running task), so the sum is a small read under the claim's lock.
"""

from __future__ import annotations

import json
import typing as t

from laufband.errors import ConfigError, GraphError
from laufband.states import TaskState
from laufband.store.ledger import Ledger
from laufband.task import named_amounts

SQL = {
    "limits": "SELECT name, capacity FROM limits ORDER BY name",
    "add_limit": "INSERT INTO limits (name, capacity, set_at, set_by)"
                 " VALUES (:name, :capacity, :now, :who)",
    "set_limit": "UPDATE limits SET capacity = :capacity, set_at = :now, set_by = :who"
                 " WHERE name = :name",
    "resourced": "SELECT id, resources FROM reqsets WHERE resources != '{}'",
    # Live attempts by requirement set (the partial index of live attempts), and how
    # many of them are the asking worker's.
    "held": "SELECT t.reqset, count(*), sum(CASE WHEN a.worker = :worker THEN 1 ELSE 0 END)"
            " FROM attempts a CROSS JOIN tasks t WHERE a.ended_at IS NULL AND t.pk = a.task"
            " GROUP BY t.reqset",
    "capped_labels": "SELECT id, labels, resources FROM reqsets WHERE resources != '{}'",
    # Busy workers that compete for capped work: this one, those waiting for work,
    # and those running a task that holds resources.
    # The asking worker whatever its row says: one declared dead that is back is
    # revived only by its claim (claiming.claim), after this.
    "competing": "SELECT labels FROM workers w WHERE id = :worker OR state = 'busy' AND"
                 " (leave_as IS NOT NULL OR EXISTS (SELECT 1 FROM attempts a"
                 " CROSS JOIN tasks t CROSS JOIN reqsets r WHERE a.worker = w.id"
                 " AND a.ended_at IS NULL AND t.pk = a.task AND r.id = t.reqset"
                 " AND r.resources != '{}'))",
    # Unfinished tasks of requirement sets {ids}, for changing a limit.
    "unfinished_of": "SELECT reqset, count(*) FROM tasks WHERE reqset IN ({ids})"
                     " AND state NOT IN ('completed', 'removed') GROUP BY reqset",
}


def check_limits(limits: t.Mapping[str, t.Any], origin: str) -> dict[str, int]:
    """Validated limits: resource name -> an integer >= 1 (never coerced)."""
    return named_amounts(limits, origin, "limits", "limit", "{'api': 8}", ConfigError)


def stored(led: Ledger) -> dict[str, int]:
    return dict(led.all(SQL["limits"]))


def declare(led: Ledger, limits: dict[str, int], who: str) -> dict[str, int]:
    """Store the limits the workflow does not have yet; those it has stay (they may
    have been changed with ``laufband limits`` since). Returns all stored limits."""
    have = stored(led)
    new = [{"name": name, "capacity": cap, "now": led.now, "who": who}
           for name, cap in limits.items() if name not in have]
    if new:
        led.run(SQL["add_limit"], new)
        have.update({row["name"]: row["capacity"] for row in new})
    return have


def change(led: Ledger, limits: dict[str, int], who: str) -> dict[str, int]:
    """Set limits (new names are added). Refused if an unfinished task needs more of a
    resource than its new limit: it could never run."""
    needs = resourced(led)
    ids = [rid for rid, need in needs.items()
           if any(limits.get(name, need[name]) < need[name] for name in need)]
    if ids:
        marks = ", ".join(str(i) for i in ids)
        blocked = led.all(SQL["unfinished_of"].format(ids=marks))
        if blocked:
            rid = blocked[0][0]
            raise ConfigError(
                f"{sum(n for _, n in blocked)} unfinished task(s) need more than that, e.g. "
                f"{json.dumps(needs[rid])}: they could never run. Give each resource at "
                "least what one task needs.")
    have = stored(led)
    for name, capacity in limits.items():
        row = {"name": name, "capacity": capacity, "now": led.now, "who": who}
        led.run(SQL["set_limit" if name in have else "add_limit"], row)
    return stored(led)


def resourced(led: Ledger) -> dict[int, dict[str, int]]:
    """Requirement sets whose tasks hold resources: id -> resources."""
    return {rid: json.loads(raw) for rid, raw in led.all(SQL["resourced"])}


def free(led: Ledger, needs: dict[int, dict[str, int]], worker: str = "") -> dict[str, int]:
    """What running tasks leave of each limit (may be below 0 after a limit was
    lowered while they ran). With ``worker``: no more than that worker's fair share
    of each limit (``shares``) minus what it holds itself."""
    limits = stored(led)
    left, mine = dict(limits), dict.fromkeys(limits, 0)
    # What every live attempt holds, by the requirement sets as they are now (a rerun
    # may have added some that this worker has not seen yet).
    held_by = resourced(led)
    for rid, n, own in led.all(SQL["held"], {"worker": worker}):
        for name, amount in held_by.get(rid, {}).items():
            left[name] = left.get(name, 0) - n * amount
            mine[name] = mine.get(name, 0) + (own or 0) * amount
    if worker:
        for name, share in shares(led, limits, worker).items():
            left[name] = min(left[name], share - mine[name])
    return left


def shares(led: Ledger, limits: dict[str, int], worker: str) -> dict[str, int]:
    """Each limit split among the workers that compete for it (rounded up): busy ones
    that can run tasks holding it and wait for work or run such a task. Without this,
    a worker whose slot came free takes it again in the same step, every time, and
    runs all the capped work while the others wait. A worker busy with other work does
    not count (its share would stay unused); a worker alone may hold the whole limit.
    A share is never below what one task needs (else such a task could never run)."""
    busy = [frozenset(json.loads(raw))
            for (raw,) in led.all(SQL["competing"], {"worker": worker})]
    users: dict[str, list[frozenset[str]]] = {}
    most: dict[str, int] = {}  # the most one task needs
    for rid, labels, res in led.all(SQL["capped_labels"]):
        for name, amount in json.loads(res).items():
            most[name] = max(most.get(name, 0), amount)
            if led.counts.n([TaskState.READY], [rid]):
                # Only ready work makes a worker compete: one waiting for later capped
                # work would otherwise halve the share of the one that can run it now.
                users.setdefault(name, []).append(frozenset(json.loads(labels)))
    result = {}
    for name, cap in limits.items():
        capable = sum(1 for have in busy if any(req <= have for req in users.get(name, ())))
        # (this worker always competes: it asks because it can run ready capped work)
        result[name] = max(-(-cap // max(1, capable)), min(most.get(name, 1), cap))
    return result


def fits(need: dict[str, int], left: dict[str, int]) -> int:
    """How many tasks needing ``need`` fit into ``left``."""
    return min(left.get(name, 0) // amount for name, amount in need.items())


def check_tasks(tasks: t.Iterable[t.Any], limits: dict[str, int], url: str) -> None:
    """Every task's resources must have a limit that is at least what it needs."""
    for task in tasks:
        for name, amount in task.resources.items():
            if name not in limits:
                raise GraphError(
                    f"Task {task.id!r} holds resource {name!r}, which has no limit in "
                    f"{url} (limits: {limits or 'none'}). Declare it, e.g. "
                    f"Graphband(..., limits={{{name!r}: 4}}), or set it with "
                    f"`laufband limits {name}=4`.")
            if amount > limits[name]:
                raise GraphError(
                    f"Task {task.id!r} needs {amount} of resource {name!r}, more than its "
                    f"limit {limits[name]}: it could never run. Lower what the task "
                    f"needs or raise the limit (`laufband limits {name}={amount}`).")


def usage(led: Ledger) -> dict[str, tuple[int, int]]:
    """Every limit with what running tasks hold of it now: name -> (capacity, held)."""
    limits = stored(led)
    left = free(led, resourced(led))
    return {name: (cap, cap - left.get(name, cap)) for name, cap in limits.items()}
