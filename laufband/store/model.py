"""The values that cross the store's boundary: what a worker asks for and what it gets."""

from __future__ import annotations

import dataclasses
import typing as t
from collections.abc import Callable, Sequence

from laufband.states import Event, TaskState, WorkerState

S = TaskState


@dataclasses.dataclass(frozen=True)
class Claim:
    """One attempt at one task, held by one worker. ``attempt`` fences later writes."""

    pk: int
    id: str
    attempt: int


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why an attempt did not complete: what the attempt's row keeps for humans."""

    error: str  # one line, e.g. "ZeroDivisionError: division by zero"
    traceback: str | None = None


@dataclasses.dataclass(frozen=True)
class Finish:
    """How an attempt ended: ``completed``, ``failed``, ``killed`` or ``preempted``."""

    claim: Claim
    outcome: Event
    detail: str | None = None
    #: Attempts of this outcome the task may use beyond the first (failed: the worker's
    #: max_failed_retries; killed: the declaring worker's max_killed_retries).
    budget: int = 0
    failure: Failure | None = None
    #: A completed task's result, as JSON (stored with the attempt).
    result: str | None = None


@dataclasses.dataclass
class Me:
    """The worker a store call acts for (owned by its loop; one step at a time)."""

    id: str
    reqset_ids: list[int]
    generation: int
    max_failed: int = 0
    max_killed: int = 0
    stop_on_failure: bool = False
    #: failed + killed tasks when this worker last looked for ones its budget revives.
    seen_failures: int = -1
    #: Requirement sets whose tasks hold resources: id -> resources (resources.py).
    needs: dict[int, dict[str, int]] = dataclasses.field(default_factory=dict)
    #: Tasks this worker runs at once (worker.map's threads; 1 for the loop).
    threads: int = 1
    #: Requirement sets -> how many labels they need (more: claimed first among equals).
    specific: dict[int, int] = dataclasses.field(default_factory=dict)
    #: When this worker must be done (its allocation's end minus walltime_margin, epoch
    #: seconds; None: no limit): it claims only tasks expected to end before it.
    deadline: float | None = None
    #: Runtime estimates per requirement set (store/runtimes.py), refreshed by steps and
    #: heartbeats of a worker with a deadline; when, and the sets' ids by their keys.
    estimates: dict[int, float] = dataclasses.field(default_factory=dict)
    estimated_at: float = float("-inf")
    reqset_keys: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    #: Seconds this worker waits for a live worker with the labels that what its pending
    #: tasks wait for needs (workers.done_for), and since when it does (store clock).
    label_wait: float = 0.0
    stranded_since: float | None = None
    #: A worker of an older generation: did its last look see a live worker with the
    #: labels of a newer ready task it waits for? (A change restarts the wait.)
    taker_seen: bool = False


@dataclasses.dataclass(frozen=True)
class Want:
    """What a step should claim besides recording finishes."""

    limit: int  # at most this many tasks (0: claim nothing)
    #: Tasks that run within one transaction's time: the fair-share cap never goes below.
    free: int = 1
    #: A step ahead (prefetch.py): claim only while ready tasks >= live workers.
    ahead: bool = False
    #: The first step of a loop: mark the worker busy.
    start: bool = False
    #: If nothing was claimed and nothing this worker could run can become claimable,
    #: set the worker's state to this (its loop ends), in the same transaction.
    leave: WorkerState | None = None


@dataclasses.dataclass
class Counts:
    """Tasks per (requirement set, state): the whole workflow's progress in one read."""

    rows: dict[int, dict[str, int]]

    def n(self, states: Sequence[str], reqset_ids: Sequence[int] | None = None) -> int:
        ids = self.rows.keys() if reqset_ids is None else reqset_ids
        return sum(self.rows.get(r, {}).get(s, 0) for r in ids for s in states)

    @property
    def total(self) -> int:
        return sum(sum(by_state.values()) for by_state in self.rows.values())

    def by_state(self) -> dict[str, int]:
        return {state.value: self.n([state]) for state in TaskState}

    def can_change(self, mine: Sequence[int], live_reqsets: Callable[[], set[int]]) -> bool:
        """Could a task of requirement sets ``mine`` still become claimable? From the
        counters, plus (rarely, lazily) the requirement sets live workers can run."""
        if self.n([S.PENDING, S.RUNNING], mine) == 0:
            return False  # nothing of ours is waiting, and nothing of ours can come back
        if self.n([S.RUNNING]) > 0:
            return True  # a running task may complete (unblocking ours) or be retried
        if self.n([S.PENDING], mine) == 0:
            return False
        # Our pending tasks may wait on ready tasks that another live worker will run.
        return self.n([S.READY], list(live_reqsets())) > 0


@dataclasses.dataclass
class StepResult:
    claims: list[Claim]
    counts: Counts
    #: The worker left (was marked ``leave``): nothing it could run can become claimable.
    left: bool = False
    #: A task this worker may claim is ready (waiting: a poll found one).
    claimable: bool = False
    #: Tasks failed or killed for good under the budgets of every live worker
    #: (computed for ``stop_on_failure`` only).
    final_failures: int = 0
    #: The workflow was cancelled (`laufband cancel`): claim nothing more, leave.
    cancelled: t.Any = None
    #: The worker left although tasks it could run are unfinished: they need more time
    #: than its allocation has left (they stay for workers with more time).
    short_of_time: bool = False


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    id: str
    hostname: str
    pid: int
    labels: frozenset[str]
    heartbeat_timeout: float
    max_failed: int = 0
    max_killed: int = 0
    #: Inside a SLURM job: job, array job and task ids, node (from its environment).
    slurm: dict[str, str] | None = None
    #: When its allocation ends (epoch seconds; None: no limit known).
    allocation_end: float | None = None
