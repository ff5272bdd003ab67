"""Laufband over a flat list: items are identified by position, so a list that changed
before its end is refused with an error that says what changed; key= identifies items
by what they are."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import flat_worker, rows

from laufband import GraphError, GraphMismatchError
from laufband.laufband import item_digest

pytestmark = pytest.mark.backends


def snapshot() -> list:
    return rows("SELECT id, state, label FROM tasks ORDER BY pk")


def test_an_item_inserted_at_the_front_is_refused_with_what_changed():
    assert list(flat_worker(["a.txt", "b.txt"], name="first")) == ["a.txt", "b.txt"]
    before = snapshot()
    with pytest.raises(GraphMismatchError) as info:
        flat_worker(["new.txt", "a.txt", "b.txt"], name="second")
    message = str(info.value)
    assert "Item 0 of the list differs from the item stored at position 0" in message
    assert "stored 'a.txt', now 'new.txt' (and 1 more position(s))" in message
    assert "Append new items at the end, pass key=" in message
    assert snapshot() == before  # nothing was run or written


def test_a_changed_item_is_refused_and_appended_items_run():
    list(flat_worker([{"n": 1}, {"n": 2}], name="first"))
    with pytest.raises(GraphMismatchError, match=r"stored \{'n': 2\}, now \{'n': 3\}"):
        flat_worker([{"n": 1}, {"n": 3}], name="second")
    assert list(flat_worker([{"n": 1}, {"n": 2}, {"n": 3}], name="third")) == [{"n": 3}]


def test_dict_key_order_and_set_order_do_not_change_an_item():
    list(flat_worker([{"a": 1, "b": {3, 2, 1}}], name="first"))
    assert list(flat_worker([{"b": {1, 2, 3}, "a": 1}], name="second")) == []


def test_with_key_the_list_may_be_reordered_and_grow_anywhere():
    assert list(flat_worker(["a", "b"], name="first", key=str)) == ["a", "b"]
    assert list(flat_worker(["new", "b", "a"], name="second", key=str)) == ["new"]
    assert rows("SELECT id, label FROM tasks ORDER BY pk") == [
        ("a", "'a'"), ("b", "'b'"), ("new", "'new'")]


def test_duplicate_keys_are_refused():
    with pytest.raises(GraphError, match="items 0 and 2 the same key 'x'"):
        flat_worker(["x", "y", "x"], key=str)
    assert not os.path.exists("g.sqlite")


@dataclasses.dataclass
class Sample:
    name: str
    params: dict


class Plain:
    def __init__(self, value):
        self.value = value


DIGEST_OF = """
import dataclasses, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
sys.path.insert(0, {tests!r} + '/..')
from test_laufband_list import Plain, Sample
from laufband.laufband import item_digest

items = [{{"b": [1, 2], "a": {{"x", "y", "z"}}}}, Path("/data/x.h5"),
         Sample("s", {{"k": frozenset({{"p", "q"}})}}), Plain({{"r", "s"}}), 1.5, None]
print(",".join(item_digest(i) for i in items))
"""


def test_item_digests_agree_across_processes():
    """Every worker computes the same digest (str hashing is salted per process, and
    the repr of a set of strings differs with it)."""
    items = [{"b": [1, 2], "a": {"x", "y", "z"}}, Path("/data/x.h5"),
             Sample("s", {"k": frozenset({"p", "q"})}), Plain({"r", "s"}), 1.5, None]
    here = ",".join(item_digest(i) for i in items)
    code = DIGEST_OF.format(tests=os.path.dirname(__file__))
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        assert out.stdout.strip() == here
    assert item_digest(Plain(1)) != item_digest(Plain(2))
    assert item_digest([1]) != item_digest((1,)) != item_digest("1")
