"""Task as an object: generic, slotted (small), picklable, frozen, sharing its empty sets."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from laufband import Task


def full_task() -> Task[list[int]]:
    return Task(id="c", data=[1, 2], dependencies={"a", "b"}, requirements=["gpu"],
                info={"k": "v"}, max_parallel_workers=2, fingerprint="f1")


def test_task_is_generic_and_subscripted_construction_works():
    # typing sets __orig_class__ on the instance after __init__; a frozen slotted
    # dataclass must refuse that with an AttributeError (not a TypeError) or this fails.
    task = Task[int](id="a", data=1)
    assert task.data == 1
    assert Task[int].__origin__ is Task


def test_task_has_slots_and_no_instance_dict():
    task = Task("a")
    assert not hasattr(task, "__dict__")
    assert set(Task.__slots__) == {f.name for f in dataclasses.fields(Task)}


def test_empty_sets_are_one_shared_object():
    a, b = Task("a"), Task("b", dependencies=(), requirements=[])
    c = Task("c", dependencies=frozenset(), requirements=iter(()))
    assert a.dependencies is b.dependencies is c.dependencies
    assert a.requirements is b.requirements is c.requirements is a.dependencies
    assert a.dependencies == frozenset()


def test_a_given_frozenset_is_kept_not_copied():
    deps = frozenset({"a", "b"})
    assert Task("c", dependencies=deps).dependencies is deps


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_round_trip_is_equal(protocol):
    for task in (Task("a"), Task[int](id="b", data=3), full_task()):
        again = pickle.loads(pickle.dumps(task, protocol=protocol))
        assert again == task
        assert again is not task
        assert type(again) is Task


def test_replace_revalidates_and_keeps_other_fields():
    task = full_task()
    other = dataclasses.replace(task, id="d")
    assert other.id == "d"
    assert (other.data, other.dependencies, other.info) == (task.data, task.dependencies,
                                                             task.info)
    assert dataclasses.replace(task, dependencies=()).dependencies is Task("x").dependencies


def test_equality_compares_fields():
    assert full_task() == full_task()
    assert Task("a", data=1) != Task("a", data=2)
    assert Task("a", dependencies=["b"]) == Task("a", dependencies=frozenset({"b"}))


@pytest.mark.parametrize("name", ["id", "dependencies", "not_a_field"])
def test_task_is_frozen(name):
    task = Task("a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(task, name, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(task, name)


def test_a_subclass_may_add_attributes_but_not_change_fields():
    class Mine(Task):
        pass

    task = Mine("a")
    task.note = "ok"
    assert task.note == "ok"
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.id = "b"
