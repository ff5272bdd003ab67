"""Bad graphs are rejected with an error that names the task, before anything is written."""

from __future__ import annotations

import sqlite3

import networkx as nx
import pytest

from laufband import Graphband, GraphError, Task
from laufband import task as task_module
from laufband.task import validate


def quiet(tasks, **kw):
    return Graphband(tasks, tqdm_kwargs={"disable": True}, **kw)


@pytest.mark.parametrize("bad_id", [1, None, "", b"x", 2.5])
def test_ids_must_be_non_empty_strings(bad_id):
    with pytest.raises(GraphError, match="non-empty strings"):
        Task(id=bad_id)


def test_string_requirements_are_rejected_not_split_into_letters():
    with pytest.raises(GraphError, match="'gpu'.*iterable of strings|iterable of strings"):
        Task(id="a", requirements="gpu")


def test_requirements_must_be_strings():
    with pytest.raises(GraphError, match="requirements must be a non-empty string"):
        Task(id="a", requirements={1})


def test_dependencies_accept_any_iterable_and_are_frozen():
    g = nx.DiGraph([("a", "c"), ("b", "c")])
    task = Task(id="c", dependencies=g.predecessors("c"), requirements=["x"])
    assert task.dependencies == frozenset({"a", "b"})
    assert isinstance(task.requirements, frozenset)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_parallel_workers_must_be_positive_int(value):
    with pytest.raises(GraphError, match="max_parallel_workers"):
        Task(id="a", max_parallel_workers=value)


def test_duplicate_ids():
    with pytest.raises(GraphError, match="Duplicate task id 'a'"):
        validate([Task("a"), Task("b"), Task("a")])


def test_unknown_dependency_names_both_tasks():
    with pytest.raises(GraphError, match="Task 'b' depends on 'zzz', which is not in the graph"):
        validate([Task("a"), Task("b", dependencies={"zzz"})])


def test_cycle_is_named():
    tasks = [Task("a", dependencies={"c"}), Task("b", dependencies={"a"}),
             Task("c", dependencies={"b"}), Task("d")]
    with pytest.raises(GraphError, match="cycle") as info:
        validate(tasks)
    for name in ("'a'", "'b'", "'c'"):
        assert name in str(info.value)
    assert "'d'" not in str(info.value)


def test_self_dependency():
    with pytest.raises(GraphError, match="depends on itself"):
        Task("a", dependencies={"a"})


def test_items_must_be_tasks():
    with pytest.raises(GraphError, match="Use Laufband"):
        validate(["a", "b"])


def test_order_is_topological_and_keeps_user_order_among_roots():
    tasks = [Task("x", dependencies={"z"}), Task("z"), Task("y")]
    assert [t.id for t in validate(tasks).order] == ["z", "y", "x"]


def test_digest_ignores_order_and_data_but_not_dependencies():
    a = validate([Task("a", data=1), Task("b", dependencies={"a"})])
    b = validate([Task("b", dependencies={"a"}, data=2), Task("a")])
    c = validate([Task("a"), Task("b")])
    assert a.digest == b.digest != c.digest


@pytest.mark.parametrize("tasks", [
    [Task("a"), Task("a")],
    [Task("a", dependencies={"b"})],
    [Task("a", dependencies={"b"}), Task("b", dependencies={"a"})],
])
def test_rejected_graph_writes_nothing(tasks, tmp_path):
    with pytest.raises(GraphError):
        quiet(tasks, db=f"sqlite:///{tmp_path}/g.sqlite")
    assert list(tmp_path.iterdir()) == []  # rejected before any file was touched


def test_bad_graph_for_a_new_database_creates_no_files(tmp_path):
    cycle = [Task("a", dependencies={"b"}), Task("b", dependencies={"a"})]
    with pytest.raises(GraphError, match="cycle"):
        quiet(cycle, db=f"sqlite:///{tmp_path}/new.sqlite")
    assert list(tmp_path.iterdir()) == []


def test_bad_graph_against_an_existing_database_is_refused_before_going_online(tmp_path):
    db = f"sqlite:///{tmp_path}/g.sqlite"
    list(quiet([Task("a")], db=db))
    unknown = [Task("a"), Task("b", dependencies={"zzz"})]
    with pytest.raises(GraphError, match="'zzz', which is not in the graph"):
        quiet(unknown, db=db, identifier="second")
    conn = sqlite3.connect(tmp_path / "g.sqlite")
    try:
        assert conn.execute("SELECT id FROM workers").fetchall() != []
        assert conn.execute("SELECT count(*) FROM workers WHERE id = 'second'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (1,)
    finally:
        conn.close()


def test_a_joining_worker_does_not_order_a_registered_graph(tmp_path, monkeypatch):
    calls = []
    real = task_module._topological_order
    monkeypatch.setattr(task_module, "_topological_order",
                        lambda by_id: calls.append(len(by_id)) or real(by_id))
    db = f"sqlite:///{tmp_path}/g.sqlite"
    graph = [Task("a"), Task("b", dependencies={"a"}), Task("c", dependencies={"b"})]
    first = quiet(graph, db=db, identifier="first")
    assert calls == [3]  # the registering worker checked and ordered it
    second = quiet(list(reversed(graph)), db=db, identifier="second")
    assert calls == [3]  # same digest: already checked by the first
    assert [t.id for t in second] == ["a", "b", "c"]
    assert first.identifier == "first"
