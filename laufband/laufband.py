"""``Laufband``: a Graphband over a flat list, yielding the items themselves."""

from __future__ import annotations

import typing as t
from collections.abc import Iterable, Iterator

from laufband.graphband import Graphband
from laufband.task import Task

T = t.TypeVar("T")


class _Items(t.Generic[T]):
    """The items as tasks with their index as id; sized if the items are."""

    def __init__(self, items: Iterable[T]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Task[T]]:
        for index, item in enumerate(self.items):
            yield Task(id=str(index), data=item)


class Laufband(Graphband[T]):
    """Process a flat list of items with many workers, each item exactly once.

    >>> for item in Laufband(range(100)):   # in every worker process
    ...     process(item)
    """

    default_db = "sqlite:///laufband.sqlite"

    def __init__(self, data: Iterable[T], **kwargs: t.Any) -> None:
        super().__init__(_Items(data), **kwargs)

    def _item(self, task: Task[T]) -> T:
        return task.data  # type: ignore[return-value]
