"""The one state machine of tasks (and the small one of workers).

    pending ──(last dependency completed)──> ready ──(claim)──> running
    running ──> completed
    running ──> ready      (failure or kill with retries left, or preemption by a signal)
    running ──> failed | killed     (retries used up; descendants become blocked)
    pending ──> blocked    (an ancestor failed or was killed for good)
    failed | killed ──> ready   (a worker whose own retry budget allows another attempt:
                                 "fix and rerun"; its blocked descendants go back to pending)
    blocked ──> pending    (no ancestor is failed or killed for good any more)

``ready`` means *claimable*: a task with ``max_parallel_workers > 1`` stays ready while
it has free slots, and turns ``running`` only when all slots are taken.
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


#: Allowed transitions; ``Ledger.record`` (store/ledger.py) refuses anything else.
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.READY, TaskState.BLOCKED}),
    # ready -> completed/failed/killed: a shared task (max_parallel_workers > 1) with
    # free slots is still ready while one of its attempts ends.
    TaskState.READY: frozenset(
        {TaskState.RUNNING, TaskState.COMPLETED, TaskState.FAILED, TaskState.KILLED}
    ),
    TaskState.RUNNING: frozenset(
        {TaskState.COMPLETED, TaskState.READY, TaskState.FAILED, TaskState.KILLED}
    ),
    TaskState.COMPLETED: frozenset(),
    TaskState.FAILED: frozenset({TaskState.READY}),
    TaskState.KILLED: frozenset({TaskState.READY}),
    TaskState.BLOCKED: frozenset({TaskState.PENDING}),
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


class WorkerState(StrEnum):
    IDLE = "idle"
    BUSY = "busy"
    OFFLINE = "offline"
    DEAD = "dead"


ALIVE = (WorkerState.IDLE, WorkerState.BUSY)


def check_transition(old: TaskState, new: TaskState) -> None:
    if new not in TRANSITIONS[old]:
        raise AssertionError(f"illegal task transition {old} -> {new}")
