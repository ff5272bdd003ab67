"""The ``Task`` users yield, and the validation of a whole graph before anything is written."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import typing as t
from collections.abc import Callable, Iterable, Iterator

from laufband.errors import GraphError

T = t.TypeVar("T")

# One shared empty set for every task without dependencies/requirements. CPython has no
# empty-frozenset singleton, and an empty frozenset costs ~200 bytes: with a million
# tasks the two per-task empties were a large share of the graph's memory.
_EMPTY: frozenset[str] = frozenset()


def _string_set(value: object, field: str, task_id: object) -> frozenset[str]:
    if type(value) is frozenset:
        if not value:
            return _EMPTY  # also replaces a caller's own frozenset() with the shared one
        items = value  # no copy
    elif isinstance(value, str | bytes) or not isinstance(value, Iterable):
        # A bare string is iterable too: {"g","p","u"} is never what the user meant.
        raise GraphError(
            f"Task {task_id!r}: {field} must be an iterable of strings (e.g. {{'a', 'b'}}), "
            f"got {type(value).__name__} {value!r}."
        )
    else:
        items = frozenset(value)
        if not items:
            return _EMPTY
    for item in items:
        if type(item) is not str or not item:
            raise GraphError(
                f"Task {task_id!r}: every entry of {field} must be a non-empty string, "
                f"got {item!r}."
            )
    return items


# slots=True: no per-instance __dict__ (a large part of a Task's size). It builds a new
# class, so methods here must not use zero-argument super() (the cell would hold the old
# class); Tasks cannot be weakly referenced (add weakref_slot=True if that is ever
# needed). See also _frozen_setattr below.
@dataclasses.dataclass(frozen=True, slots=True)
class Task(t.Generic[T]):
    """One unit of work.

    ``dependencies`` and ``requirements`` accept any iterable of strings (for example
    ``graph.predecessors(node)``) and are stored as frozensets. A worker runs a task only
    if ``requirements`` is a subset of its labels, and only after every dependency
    completed. ``max_parallel_workers > 1`` lets that many workers run the task at once
    (for tasks that parallelise internally); the first completion completes it.
    ``fingerprint`` is stored with the task.

    Scheduling (part of the graph, like the requirements: every worker must yield the
    same): ``resources`` the task holds while it runs, e.g. ``{"api": 1}``, counted
    against the workflow's ``limits``; ``priority``: among ready tasks, higher runs
    first (ties in graph order); ``timeout``: seconds after which an attempt that still
    runs is recorded failed and its resources released; ``runtime``: the seconds an
    attempt is expected to take (a worker whose allocation ends sooner leaves the task
    to one with more time; without it, an estimate learned from completed attempts of
    tasks with the same requirements and resources is used).
    """

    id: str
    data: T | None = None
    dependencies: frozenset[str] = _EMPTY
    requirements: frozenset[str] = _EMPTY
    info: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    max_parallel_workers: int = 1
    fingerprint: str | None = None
    resources: t.Mapping[str, int] = dataclasses.field(default_factory=dict)
    priority: int = 0
    timeout: float | None = None
    runtime: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise GraphError(
                f"Task ids must be non-empty strings, got {type(self.id).__name__} {self.id!r}."
                + (" Convert it with str() if it is a number." if not isinstance(self.id, str)
                   else " Give the task a name.")
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
        object.__setattr__(self, "resources", _resources(self.resources, self.id))
        prio = self.priority
        if isinstance(prio, bool) or not isinstance(prio, int) or abs(prio) >= 2**62:
            raise GraphError(
                f"Task {self.id!r}: priority must be an integer (higher runs first), "
                f"got {prio!r}.")
        if not _seconds(self.timeout):
            raise GraphError(
                f"Task {self.id!r}: timeout must be a number of seconds > 0 (or None for "
                f"no limit), got {self.timeout!r}.")
        if not _seconds(self.runtime):
            raise GraphError(
                f"Task {self.id!r}: runtime must be a number of seconds > 0, the time an "
                f"attempt is expected to take (or None: estimated from completed attempts), "
                f"got {self.runtime!r}.")


def _seconds(value: object) -> bool:
    """None, or a finite number > 0 (not a bool)."""
    return value is None or (not isinstance(value, bool) and isinstance(value, int | float)
                             and math.isfinite(value) and value > 0)


def _resources(value: object, task_id: str) -> t.Mapping[str, int]:
    """A task's resources as a plain dict of name -> amount >= 1 (the shared empty one
    for none)."""
    amounts = named_amounts(value, f"Task {task_id!r}", "resources", "amount",
                            "{'api': 1}", GraphError)
    return amounts or _NO_RESOURCES


def named_amounts(value: object, where: str, what: str, unit: str, example: str,
                  error: type[Exception]) -> dict[str, int]:
    """Resource name -> integer >= 1, never coerced: a task's resources, and limits.
    Names are what ``laufband limits NAME=N`` can name."""
    if not isinstance(value, t.Mapping):
        raise error(f"{where}: {what} must be a mapping of resource name to {unit}, e.g. "
                    f"{example}, got {type(value).__name__} {value!r}.")
    for name, amount in value.items():
        if type(name) is not str or not name or "=" in name or "," in name:
            raise error(f"{where}: resource names must be non-empty strings without '=' "
                        f"or ',', got {name!r}.")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
            raise error(f"{where}: the {unit} of {name!r} must be an integer >= 1, got "
                        f"{amount!r}.")
    return dict(value)


class _NoResources(dict):
    """The one shared empty ``resources`` (a dict per task would cost a million tasks
    64 MB); read-only, and unpickled as itself."""

    def _read_only(self, *args: object, **kwargs: object) -> t.NoReturn:
        raise TypeError("Task.resources is read-only")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = _read_only
    __ior__ = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> str:
        return "_NO_RESOURCES"


_NO_RESOURCES: t.Mapping[str, int] = _NoResources()


_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Task))
_FIELD_SET = frozenset(_FIELDS)


# The __setattr__/__delattr__ that dataclass(frozen=True, slots=True) generates check
# `type(self) is cls` and call `super(cls, self)` with cls = the class *before* slots
# were added (CPython gh-105936/gh-116669; seen in 3.11.7, 3.12.1, 3.13.0). So assigning any
# non-field attribute raises TypeError instead of FrozenInstanceError, and that breaks
# `Task[int](...)`: typing sets `__orig_class__` on the instance and only tolerates
# AttributeError. These replacements keep the semantics of the non-slotted version.
def _frozen_setattr(self: Task, name: str, value: object) -> None:
    if type(self) is Task or name in _FIELD_SET:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
    super(Task, self).__setattr__(name, value)


def _frozen_delattr(self: Task, name: str) -> None:
    if type(self) is Task or name in _FIELD_SET:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
    super(Task, self).__delattr__(name)


Task.__setattr__ = _frozen_setattr  # type: ignore[method-assign, assignment]
Task.__delattr__ = _frozen_delattr  # type: ignore[method-assign, assignment]


class GraphTraversalProtocol(t.Protocol[T]):
    """What ``Graphband`` iterates over: anything that yields ``Task`` objects (a list, a
    generator function's result, a class with ``__iter__``), as in laufband 0.2.x.

    >>> def tasks():
    ...     for node in nx.topological_sort(g):
    ...         yield Task(id=node, dependencies=set(g.predecessors(node)))
    """

    def __iter__(self) -> Iterator[Task[T]]: ...


class SizedGraphTraversalProtocol(GraphTraversalProtocol[T], t.Protocol[T]):
    """A ``GraphTraversalProtocol`` that also has ``__len__`` (then ``len(worker)``
    works)."""

    def __len__(self) -> int: ...


def spec_hash(task: Task, extra: str = "") -> str:
    """What two workers must agree on for the same task id (data and info are local;
    ``extra``: what else identifies it, e.g. the digest of a Laufband item)."""
    deps, reqs = task.dependencies, task.requirements
    deps_text = _SEP.join(sorted(deps)) if deps else ""
    reqs_text = _SEP.join(sorted(reqs)) if reqs else ""
    text = f"{task.id}\0{deps_text}\0{reqs_text}\0{task.max_parallel_workers}"
    if (task.resources or task.priority or task.timeout is not None
            or task.runtime is not None):
        text = f"{text}\0{scheduling(task)}"  # only when set: older hashes stay valid
    if extra:  # without: the hash of schema 2, so a workflow goes on after an upgrade
        text = f"{text}\0{extra}"
    return _blake2b(text.encode(), digest_size=16).hexdigest()


def scheduling(task: Task) -> str:
    """A task's resources, priority, timeout and runtime as one canonical string (the
    runtime only when declared: hashes of schema 4 stay valid)."""
    res = ",".join(f"{k}={v}" for k, v in sorted(task.resources.items()))
    text = f"r:{res}\0p:{task.priority}\0t:{task.timeout!r}"
    return text if task.runtime is None else f"{text}\0rt:{float(task.runtime)!r}"


_SEP = "\x1f"
_blake2b = hashlib.blake2b


@dataclasses.dataclass
class GraphSpec:
    """A graph read from the user's tasks: indexed by id and hashed. ``order`` checks
    the dependencies and orders them (the expensive part, done on first use).
    ``labels``: what a human recognises a task by where its id does not say (Laufband:
    the item), stored with the task; ``positional``: ids are list positions (Laufband
    without ``key=``), which changes how a mismatch with the stored graph is reported."""

    by_id: dict[str, Task]
    digest: str
    labels: dict[str, str] | None = None
    positional: bool = False
    fingerprints: bool = False
    identity: Callable[[Task], str] | None = None
    #: The spec hashes, when the digest was made of them (no fingerprints).
    known_hashes: dict[str, str] | None = None
    #: Ready tasks are claimed deepest first (stored with the tasks: ``depths``).
    depth_first: bool = False

    @functools.cached_property
    def depths(self) -> dict[str, int]:
        """With ``depth_first``: every task's depth (the longest chain of dependencies
        above it), else empty (every task's depth is stored as 0)."""
        if not self.depth_first:
            return {}
        depth: dict[str, int] = {}
        for task in self.order:
            deps = task.dependencies
            depth[task.id] = 1 + max(depth[d] for d in deps) if deps else 0
        return depth

    @functools.cached_property
    def hashes(self) -> dict[str, str]:
        """Every task's spec hash: what is stored and compared with the stored graph
        (only a worker that registers needs it when fingerprints made the digest)."""
        if self.known_hashes is not None:
            return self.known_hashes
        identity = self.identity
        return {tid: spec_hash(task, identity(task) if identity else "")
                for tid, task in self.by_id.items()}

    @functools.cached_property
    def order(self) -> list[Task]:
        """The tasks in a topological order; GraphError for an unknown dependency or a
        cycle. Only a worker that registers the graph (or runs it locally) needs this:
        the others find its digest registered by a worker that checked it."""
        for task in self.by_id.values():
            for dep in task.dependencies:
                if dep not in self.by_id:
                    raise GraphError(
                        f"Task {task.id!r} depends on {dep!r}, which is not in the graph. "
                        "Yield every task the graph needs from the same iterable."
                    )
        return _topological_order(self.by_id)


def read_graph(tasks: t.Any, identity: Callable[[Task], str] | None = None,
               fingerprints: bool = False, depth_first: bool = False) -> GraphSpec:
    """Read all tasks (type and unique ids checked) and hash them; no graph checks yet.
    ``tasks``: an iterable of Task, or an ``nx.DiGraph``. ``identity(task)``: more that
    workers must agree on for a task (see spec_hash). ``fingerprints``: the graph's
    digest covers the tasks' fingerprints too (a changed one is a changed graph)."""
    by_id: dict[str, Task] = {}
    for task in graph_tasks(tasks):
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
    hashes, digest = _digest(by_id, identity, fingerprints)
    if depth_first:  # another claim order is another registration of the graph
        digest += ":depth"
    return GraphSpec(by_id=by_id, digest=digest, fingerprints=fingerprints,
                     identity=identity, known_hashes=hashes, depth_first=depth_first)


def _digest(by_id: dict[str, Task], identity: Callable[[Task], str] | None,
            fingerprints: bool) -> tuple[dict[str, str] | None, str]:
    """The graph's digest: the sum of a hash per task, order-independent so that workers
    reading the tasks in different orders agree; and those hashes if they are the spec
    hashes. With ``fingerprints``, each task's hash covers its fingerprint too, so the
    spec hashes are made later, if this worker registers (one hash a task: this is
    most of the time a worker joining a registered graph of a million tasks takes)."""
    hashes: dict[str, str] | None = None if fingerprints else {}
    total = 0
    for tid, task in by_id.items():
        extra = identity(task) if identity is not None else ""
        if fingerprints:
            h = spec_hash(task, f"{extra}\0fp:{task.fingerprint}")
        else:
            h = spec_hash(task, extra)
            hashes[tid] = h  # type: ignore[index]
        total += int(h, 16)
    suffix = ":fp" if fingerprints else ""
    return hashes, f"{total % (1 << 128):032x}:{len(by_id)}{suffix}"


#: Node attributes of an nx.DiGraph that fill Task fields; the others go to Task.info.
NODE_FIELDS = ("data", "requirements", "fingerprint", "max_parallel_workers", "resources",
               "priority", "timeout", "runtime")


def graph_tasks(source: t.Any) -> Iterable[Task]:
    """The tasks of ``source``: an iterable of Task as it is, or an ``nx.DiGraph`` (a
    node is a task id, its attributes fill the Task's fields, an edge u -> v makes u a
    dependency of v)."""
    kind = type(source)
    if not kind.__module__.startswith("networkx"):
        return source
    import networkx as nx

    if not isinstance(source, nx.DiGraph):
        raise GraphError(
            f"Graphband takes a directed graph, got a networkx {kind.__name__}. Use an "
            "nx.DiGraph whose edges point from a task to the tasks that depend on it.")
    return _from_networkx(source)


def _from_networkx(graph: t.Any) -> Iterator[Task]:
    for node, attrs in graph.nodes(data=True):
        if type(node) is not str or not node:
            raise GraphError(
                f"Node {node!r} ({type(node).__name__}) of the graph: task ids must be "
                "non-empty strings. Relabel the graph first, e.g. "
                "graph = nx.relabel_nodes(graph, str).")
        fields = {key: attrs[key] for key in NODE_FIELDS if key in attrs}
        info = {key: value for key, value in attrs.items() if key not in NODE_FIELDS}
        yield Task(node, dependencies=graph.predecessors(node), info=info, **fields)


def validate(tasks: Iterable[Task]) -> GraphSpec:
    """Read all tasks, check the graph and order it, or raise GraphError naming the task."""
    spec = read_graph(tasks)
    _ = spec.order
    return spec


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
