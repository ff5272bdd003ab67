"""``Laufband``: a Graphband over a flat list, yielding the items themselves.

An item is identified by its position in the list, and its content is part of the
graph: a rerun whose list has an item inserted, removed or changed before the end
would otherwise run the wrong items, so it is refused with an error that names the
position, the stored item and the new one. ``key=`` identifies items by what they are
instead (then the list may be reordered and grow anywhere).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import reprlib
import typing as t
from collections.abc import Callable, Hashable, Iterable, Iterator

from laufband.errors import GraphError
from laufband.graphband import Graphband
from laufband.task import GraphSpec, Task, read_graph

T = t.TypeVar("T")

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60


class _Items(t.Generic[T]):
    """The items as tasks: id = position (or ``key(item)``); sized if the items are."""

    def __init__(self, items: Iterable[T], key: Callable[[T], Hashable] | None) -> None:
        self.items = items
        self.key = key

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Task[T]]:
        if self.key is None:
            for index, item in enumerate(self.items):
                yield Task(id=str(index), data=item)
            return
        seen: dict[str, int] = {}
        for index, item in enumerate(self.items):
            task_id = str(self.key(item))
            if task_id in seen:
                raise GraphError(
                    f"key= gives items {seen[task_id]} and {index} the same key "
                    f"{task_id!r} ({_repr.repr(item)}): each item needs a key of its own.")
            seen[task_id] = index
            yield Task(id=task_id, data=item)


class Laufband(Graphband[T]):
    """Process a flat list of items with many workers, each item exactly once.

    >>> for item in Laufband(range(100)):   # in every worker process
    ...     process(item)

    ``key``: identify an item by ``str(key(item))`` instead of its position.
    """

    default_db = "laufband.sqlite"

    def __init__(self, data: Iterable[T], *, key: Callable[[T], Hashable] | None = None,
                 **kwargs: t.Any) -> None:
        self._key = key
        super().__init__(_Items(data, key), **kwargs)

    def _read_graph(self) -> GraphSpec:
        options = {"fingerprints": self.settings.enable_fingerprints,
                   "depth_first": self.settings.depth_first}
        if self._key is not None:
            spec = read_graph(self._tasks_input, **options)
        else:
            spec = read_graph(self._tasks_input, identity=lambda task: item_digest(task.data),
                              **options)
            spec.positional = True
        spec.labels = {tid: _repr.repr(task.data) for tid, task in spec.by_id.items()}
        return spec

    def _item(self, task: Task[T]) -> T:
        return task.data  # type: ignore[return-value]


def item_digest(item: object) -> str:
    """A digest of an item's content that every worker process computes the same way
    (not ``hash()``, which is salted per process, nor the repr of a set)."""
    h = hashlib.blake2b(digest_size=12)
    _feed(h, item)
    return h.hexdigest()


def _feed(h: t.Any, obj: object) -> None:
    kind = type(obj)
    if kind is str:
        data = obj.encode("utf-8", "surrogatepass")  # type: ignore[attr-defined]
        h.update(b"s%d:" % len(data))
        h.update(data)
    elif obj is None or kind in (int, float, bool, complex):
        h.update(f"{kind.__name__}:{obj!r};".encode())
    elif kind in (bytes, bytearray):
        h.update(b"b%d:" % len(obj))  # type: ignore[arg-type]
        h.update(obj)  # type: ignore[arg-type]
    elif isinstance(obj, list | tuple):
        h.update(b"(" if isinstance(obj, tuple) else b"[")
        for x in obj:
            _feed(h, x)
        h.update(b")")
    elif isinstance(obj, dict):
        h.update(b"{")
        for key, value in sorted(((item_digest(k), v) for k, v in obj.items()),
                                 key=lambda kv: kv[0]):
            h.update(key.encode())
            _feed(h, value)
        h.update(b"}")
    elif isinstance(obj, set | frozenset):
        h.update(b"<")
        for digest in sorted(item_digest(x) for x in obj):
            h.update(digest.encode())
        h.update(b">")
    elif isinstance(obj, os.PathLike):
        _feed(h, os.fspath(obj))
    else:
        _feed_object(h, obj)


def _feed_object(h: t.Any, obj: object) -> None:
    kind = type(obj)
    h.update(f"{kind.__module__}.{kind.__qualname__}:".encode())
    if dataclasses.is_dataclass(obj):
        _feed(h, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    elif hasattr(obj, "tobytes") and hasattr(obj, "shape"):  # numpy arrays and alike
        _feed(h, (str(getattr(obj, "dtype", "")), tuple(obj.shape), obj.tobytes()))
    elif kind.__repr__ is not object.__repr__:
        _feed(h, repr(obj))
    elif hasattr(obj, "__dict__"):
        _feed(h, vars(obj))  # a plain object: the repr would hold its address
    else:
        slots = [s for c in kind.__mro__ for s in getattr(c, "__slots__", ())]
        _feed(h, {s: getattr(obj, s, None) for s in slots})
