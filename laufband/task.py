"""The ``Task`` users yield, and the validation of a whole graph before anything is written."""

from __future__ import annotations

import dataclasses
import hashlib
import typing as t
from collections.abc import Iterable

from laufband.errors import GraphError

T = t.TypeVar("T")


def _string_set(value: object, field: str, task_id: object) -> frozenset[str]:
    if type(value) is frozenset:
        items = value  # the common case (and the default): no copy
    elif isinstance(value, str | bytes) or not isinstance(value, Iterable):
        # A bare string is iterable too: {"g","p","u"} is never what the user meant.
        raise GraphError(
            f"Task {task_id!r}: {field} must be an iterable of strings (e.g. {{'a', 'b'}}), "
            f"got {type(value).__name__} {value!r}."
        )
    else:
        items = frozenset(value)
    for item in items:
        if type(item) is not str or not item:
            raise GraphError(
                f"Task {task_id!r}: every entry of {field} must be a non-empty string, "
                f"got {item!r}."
            )
    return items


@dataclasses.dataclass(frozen=True)
class Task(t.Generic[T]):
    """One unit of work.

    ``dependencies`` and ``requirements`` accept any iterable of strings (for example
    ``graph.predecessors(node)``) and are stored as frozensets. A worker runs a task only
    if ``requirements`` is a subset of its labels, and only after every dependency
    completed. ``max_parallel_workers > 1`` lets that many workers run the task at once
    (for tasks that parallelise internally); the first completion completes it.
    ``fingerprint`` is stored with the task.
    """

    id: str
    data: T | None = None
    dependencies: frozenset[str] = dataclasses.field(default_factory=frozenset)
    requirements: frozenset[str] = dataclasses.field(default_factory=frozenset)
    info: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    max_parallel_workers: int = 1
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise GraphError(
                f"Task ids must be non-empty strings, got {type(self.id).__name__} {self.id!r}."
                " Convert it with str() if it is a number."
            )
        deps = _string_set(self.dependencies, "dependencies", self.id)
        object.__setattr__(self, "dependencies", deps)
        reqs = _string_set(self.requirements, "requirements", self.id)
        object.__setattr__(self, "requirements", reqs)
        mpw = self.max_parallel_workers
        if isinstance(mpw, bool) or not isinstance(mpw, int) or mpw < 1:
            raise GraphError(
                f"Task {self.id!r}: max_parallel_workers must be an integer >= 1, got {mpw!r}."
            )
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise GraphError(
                f"Task {self.id!r}: fingerprint must be a string or None, "
                f"got {type(self.fingerprint).__name__}."
            )
        if self.id in deps:
            raise GraphError(f"Task {self.id!r} depends on itself.")


def spec_hash(task: Task) -> str:
    """What two workers must agree on for the same task id (data and info are local)."""
    text = "\0".join((task.id, "\x1f".join(sorted(task.dependencies)),
                      "\x1f".join(sorted(task.requirements)), str(task.max_parallel_workers)))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclasses.dataclass
class GraphSpec:
    """A validated graph: tasks in a topological order, with their hashes."""

    order: list[Task]
    hashes: list[str]
    digest: str

    @property
    def by_id(self) -> dict[str, Task]:
        return {task.id: task for task in self.order}


def validate(tasks: Iterable[Task]) -> GraphSpec:
    """Read all tasks, check the graph and order it, or raise GraphError naming the task."""
    by_id: dict[str, Task] = {}
    for task in tasks:
        if not isinstance(task, Task):
            raise GraphError(
                f"Graphband expects an iterable of laufband.Task, got {type(task).__name__} "
                f"{task!r}. Use Laufband(items) for a flat list of items."
            )
        if task.id in by_id:
            raise GraphError(
                f"Duplicate task id {task.id!r}: every task needs a unique id."
            )
        by_id[task.id] = task
    for task in by_id.values():
        for dep in task.dependencies:
            if dep not in by_id:
                raise GraphError(
                    f"Task {task.id!r} depends on {dep!r}, which is not in the graph. "
                    "Yield every task the graph needs from the same iterable."
                )
    order = _topological_order(by_id)
    hashes = [spec_hash(task) for task in order]
    total = sum(int(h, 16) for h in hashes) % (1 << 128)
    return GraphSpec(order=order, hashes=hashes, digest=f"{total:032x}:{len(order)}")


def _topological_order(by_id: dict[str, Task]) -> list[Task]:
    """Kahn's algorithm, keeping the user's order among tasks that are ready together."""
    waiting = {tid: len(task.dependencies) for tid, task in by_id.items()}
    dependents: dict[str, list[str]] = {}
    for task in by_id.values():
        for dep in task.dependencies:
            dependents.setdefault(dep, []).append(task.id)
    order = [task for tid, task in by_id.items() if waiting[tid] == 0]
    for task in order:  # the list grows while we walk it
        for child in dependents.get(task.id, ()):
            left = waiting[child] - 1
            waiting[child] = left
            if not left:
                order.append(by_id[child])
    if len(order) < len(by_id):
        raise GraphError(_describe_cycle(by_id, waiting))
    return order


def _describe_cycle(by_id: dict[str, Task], waiting: dict[str, int]) -> str:
    import networkx as nx

    stuck = [tid for tid, n in waiting.items() if n > 0]
    g = nx.DiGraph((dep, tid) for tid in stuck for dep in by_id[tid].dependencies)
    cycle = [edge[0] for edge in nx.find_cycle(g)]
    path = " -> ".join(repr(x) for x in [*cycle, cycle[0]])
    return (
        f"The dependencies contain a cycle: {path} ({len(stuck)} tasks cannot ever run). "
        "Remove one of these dependencies."
    )
