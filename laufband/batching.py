"""How many tasks to claim per transaction.

Every claim+finish is one write transaction (a few ms on a rollback journal, more on
NFS). For tasks much shorter than that, the transaction is the bottleneck, so the
worker claims several tasks at once and records their completions together with the
next claim. ``auto`` grows the batch only while tasks are short compared with the
transaction, and keeps one batch under ``MAX_DEFERRAL`` seconds of work so dependents
and progress are not held back for long. The claim itself caps the batch at this
worker's fair share of the ready tasks (store.py), but never below ``free()``, so no
worker starves the others and none falls back to one task per transaction.
"""

from __future__ import annotations

import math

MAX_BATCH = 256
#: Keep the user time of one batch (and so the delay of its recorded completions) short.
MAX_DEFERRAL = 0.25
#: Aim for the transaction to cost at most ~1/TARGET_RATIO of the time spent on tasks.
TARGET_RATIO = 4.0
_SMOOTHING = 0.3
MAX_PREFETCH_SKIP = 16


class Batcher:
    """Observes steps (on the prefetch thread, too) and tasks (on the loop's thread).
    Each observation is one float assignment, and a stale read only sizes one batch
    slightly differently, so no lock is needed."""

    def __init__(self, fixed: int | None) -> None:
        self.fixed = fixed
        self._step_seconds: float | None = None
        self._task_seconds: float | None = None
        self._prefetch_misses = 0
        self._skip_prefetch = 0

    def size(self) -> int:
        if self.fixed is not None:
            return self.fixed
        step, task = self._step_seconds, self._task_seconds
        if step is None or task is None:
            return 1
        task = max(task, 1e-6)
        wanted = math.ceil(TARGET_RATIO * step / task)
        return max(1, min(wanted, MAX_BATCH, int(MAX_DEFERRAL / task)))

    def free(self) -> int:
        """Tasks that run in less time than one observed transaction: claiming that many
        delays nobody, since another worker could not claim them sooner. The fair-share
        cap of a claim never goes below this (without it, 8 workers with few ready
        tasks fell back to one task per transaction: SCALING_ANALYSIS.md,
        'Measurements behind the code')."""
        step, task = self._step_seconds, self._task_seconds
        if step is None or task is None:
            return 1
        return max(1, min(MAX_BATCH, int(step / max(task, 1e-6))))

    def prefetch(self) -> bool:
        """Step in the background while the last claimed task runs (prefetch.py)?
        With ``auto`` only (a fixed size claims exactly that many at a time), and only
        for tasks short enough that the task claimed ahead is not held back from other
        workers for long (one claimed ahead of a task that runs long after all is handed
        back, see prefetch.py). Not during the first task: every worker steps then, and
        steps ahead as well delayed the first claims of the others (SCALING_ANALYSIS.md,
        'Measurements behind the code')."""
        task = self._task_seconds
        if self.fixed is not None or task is None or task > MAX_DEFERRAL:
            return False
        if self._skip_prefetch:
            self._skip_prefetch -= 1
            return False
        return True

    def observe_prefetch(self, claimed: bool) -> None:
        """A step ahead that claimed nothing (a chain: the next task waits for the
        current one) cost a transaction for nothing: after a miss, skip the next 1, 2,
        4, ... up to MAX_PREFETCH_SKIP chances to prefetch."""
        self._prefetch_misses = 0 if claimed else self._prefetch_misses + 1
        if self._prefetch_misses:
            self._skip_prefetch = min(2 ** (self._prefetch_misses - 1), MAX_PREFETCH_SKIP)

    def observe_step(self, seconds: float) -> None:
        self._step_seconds = _smooth(self._step_seconds, seconds)

    def observe_task(self, seconds: float) -> None:
        self._task_seconds = _smooth(self._task_seconds, seconds)


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else (1 - _SMOOTHING) * old + _SMOOTHING * new
