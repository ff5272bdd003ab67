"""The one state machine of tasks (and the small one of workers).

    pending ──(last dependency completed)──> ready ──(claim)──> running
    running ──> completed
    running ──> ready      (failure or kill with retries left, or preemption by a signal)
    ready | running ──> running   (a shared task's attempt failed or was killed past the
                                   budget while others run: no attempt starts in its
                                   slot; the end of the last one decides)
    running ──> failed | killed     (retries used up; descendants become blocked)
    pending ──> blocked    (an ancestor failed or was killed for good)
    completed ──> ready | pending  (invalidated: its fingerprint or dependencies changed,
                                    or an upstream task's did; fingerprints enabled)
    ready ──> pending      (a dependency was invalidated)
    any but running ──> removed    (gone from the graph; running: when its attempt ends)
    removed ──> pending | ready    (back in the graph)
    failed | killed ──> ready   (a worker whose own retry budget allows another attempt:
                                 "fix and rerun"; its blocked descendants go back to pending)
    blocked ──> pending    (no ancestor is failed or killed for good any more)
    ready | pending ──> cancelled  (`laufband cancel`: never started)
    running ──> cancelled  (`laufband cancel`: still running when the drain timed out)
    cancelled ──> ready | pending  (`laufband resume`)
    cancelled ──> completed | failed | killed   (a shared task's attempt that still
                                                 runs ends)

``ready`` means *claimable*: a task with ``max_parallel_workers > 1`` stays ready while
it has free slots, and turns ``running`` when all slots are taken, or when an attempt
used up the retry budget while others still run (its slot is held until they end).
"""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    PENDING = "pending"
    READY = "ready"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    KILLED = "killed"
    BLOCKED = "blocked"
    REMOVED = "removed"  # not in the graph any more (fingerprints enabled)
    CANCELLED = "cancelled"  # `laufband cancel`: not run; `laufband resume` brings it back


#: Allowed transitions; ``Ledger.record`` (store/ledger.py) refuses anything else.
_S = TaskState
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    _S.PENDING: frozenset({_S.READY, _S.BLOCKED, _S.REMOVED, _S.CANCELLED}),
    # ready -> completed/failed/killed: a shared task (max_parallel_workers > 1) with
    # free slots is still ready while one of its attempts ends.
    _S.READY: frozenset({_S.RUNNING, _S.COMPLETED, _S.FAILED, _S.KILLED, _S.PENDING,
                         _S.BLOCKED, _S.REMOVED, _S.CANCELLED}),
    # running -> ready/pending/removed: the attempt ended, but the task was invalidated
    # or removed meanwhile (its ``dirty`` mark).
    _S.RUNNING: frozenset({_S.COMPLETED, _S.READY, _S.PENDING, _S.FAILED, _S.KILLED,
                           _S.REMOVED, _S.CANCELLED}),
    _S.COMPLETED: frozenset({_S.READY, _S.PENDING, _S.REMOVED}),
    _S.FAILED: frozenset({_S.READY, _S.REMOVED}),
    _S.KILLED: frozenset({_S.READY, _S.REMOVED}),
    _S.BLOCKED: frozenset({_S.PENDING, _S.READY, _S.REMOVED}),
    _S.REMOVED: frozenset({_S.PENDING, _S.READY, _S.BLOCKED}),
    _S.CANCELLED: frozenset({_S.READY, _S.PENDING, _S.BLOCKED, _S.REMOVED, _S.COMPLETED,
                             _S.FAILED, _S.KILLED}),
}

#: States in which a task still has work ahead of it.
UNFINISHED = (TaskState.PENDING, TaskState.READY, TaskState.RUNNING)


class Event(StrEnum):
    """What happened to an attempt; stored in the history beside the resulting state."""

    CLAIMED = "claimed"
    COMPLETED = "completed"
    RELEASED = "released"  # a sibling attempt of a shared task had already completed it
    FAILED = "failed"
    KILLED = "killed"
    PREEMPTED = "preempted"
    FENCED = "fenced"  # a late write from an attempt that was no longer current
    READY = "ready"
    BLOCKED = "blocked"
    RETRIED = "retried"  # failed/killed -> ready: a worker's own retry budget allows it
    UNBLOCKED = "unblocked"  # blocked -> pending: the ancestor that failed is retried
    INVALIDATED = "invalidated"  # runs again: what it depends on changed (the detail says)
    WAITS = "waits"  # ready -> pending: a dependency was invalidated
    CHANGED = "changed"  # its dependencies changed (a graph that evolves)
    REMOVED = "removed"  # gone from the graph (or back, with the state it then gets)
    CANCELLED = "cancelled"  # `laufband cancel` (an attempt: still running after the drain)
    RESUMED = "resumed"  # `laufband resume`: cancelled -> ready/pending


class WorkerState(StrEnum):
    IDLE = "idle"
    BUSY = "busy"
    OFFLINE = "offline"
    DEAD = "dead"


ALIVE = (WorkerState.IDLE, WorkerState.BUSY)


def check_transition(old: TaskState, new: TaskState) -> None:
    if new not in TRANSITIONS[old]:
        raise AssertionError(f"illegal task transition {old} -> {new}")
