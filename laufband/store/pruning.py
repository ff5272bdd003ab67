"""Pruning history: the events and ended attempts a long-running workflow accumulates
(retries, reruns after changed fingerprints). Only rows nothing else needs go: per task,
the newest ``keep`` events and attempts stay, and always its live attempts, its latest
attempt (the last error) and its latest completed one (its fingerprint and runtime).
Tasks, edges, workers, graphs and counts are never touched, so no row that another
refers to is deleted. Short transactions, a range of tasks each: safe while workers run.
"""

from __future__ import annotations

import dataclasses

from laufband.store.ledger import Ledger

#: Tasks per pruning transaction (each holds the database lock briefly).
TASKS_PER_TRANSACTION = 2000

SQL = {
    "max_pk": "SELECT coalesce(max(pk), 0) FROM tasks",
    "events": "DELETE FROM events WHERE task BETWEEN :lo AND :hi AND id NOT IN"
              " (SELECT k.id FROM events k WHERE k.task = events.task"
              " ORDER BY k.id DESC LIMIT :keep)",
    "attempts": "DELETE FROM attempts WHERE task BETWEEN :lo AND :hi"
                " AND ended_at IS NOT NULL"
                " AND attempt != (SELECT t.attempts FROM tasks t WHERE t.pk = attempts.task)"
                " AND attempt != coalesce((SELECT max(c.attempt) FROM attempts c"
                " WHERE c.task = attempts.task AND c.outcome = 'completed'), 0)"
                " AND attempt NOT IN (SELECT k.attempt FROM attempts k"
                " WHERE k.task = attempts.task ORDER BY k.attempt DESC LIMIT :keep)",
}


@dataclasses.dataclass
class Pruned:
    events: int = 0
    attempts: int = 0


def max_pk(led: Ledger) -> int:
    return int(led.scalar(SQL["max_pk"]) or 0)


def prune_range(led: Ledger, lo: int, hi: int, keep: int, result: Pruned) -> None:
    """Prune the history of tasks ``lo``..``hi`` (primary keys)."""
    params = {"lo": lo, "hi": hi, "keep": keep}
    result.events += led.run(SQL["events"], params)
    result.attempts += led.run(SQL["attempts"], params)
