"""laufband 0.2.1's public names and behaviour: scripts written for it keep working."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import make, rows

from laufband import Graphband, Laufband, Monitor, Task, WorkerIdentityError
from laufband.clock import FakeClock


def test_the_names_of_0_2_1_import():
    from laufband import GraphTraversalProtocol, Monitor, SizedGraphTraversalProtocol  # noqa

    import laufband

    for name in ("Laufband", "Graphband", "GraphTraversalProtocol", "Task", "Monitor"):
        assert name in laufband.__all__


def test_a_class_following_the_protocol_is_a_graph():
    from laufband import SizedGraphTraversalProtocol

    class Graph(SizedGraphTraversalProtocol):
        def __iter__(self):
            yield Task("A")
            yield Task("B", dependencies={"A"})

        def __len__(self):
            return 2

    worker = Graphband(Graph(), tqdm_kwargs={"disable": True})
    assert len(worker) == 2
    assert [t.id for t in worker] == ["A", "B"]


def test_a_duplicate_worker_gets_0_2_1s_words_and_a_value_error():
    alive = make([Task("a")], name="same")
    with pytest.raises(ValueError, match="Worker with id 'same' already exists with "
                                         "status 'idle'") as info:
        make([Task("a")], name="same")
    assert isinstance(info.value, WorkerIdentityError)
    assert alive.identifier == "same"


def run_a_small_workflow(clock):
    graph = [Task("a"), Task("b", dependencies={"a"}), Task("c"), Task("bad")]
    first = make(graph, name="first", clock=clock, batch_size=1)
    for task in first:
        if task.id == "bad":
            break
    second = make(graph, name="second", clock=clock, batch_size=1)
    held = iter(second)
    return held, next(held)  # second runs "b" now (or the task left)


def test_monitor_methods_of_0_2_1():
    clock = FakeClock()
    held, running = run_a_small_workflow(clock)
    before = Path("g.sqlite").read_bytes()
    monitor = Monitor(db="g.sqlite", clock=clock)  # a plain path; a URL works too
    assert Monitor(db="sqlite:///g.sqlite").get_workflow().total_tasks == 4

    workflow = monitor.get_workflow()
    assert (workflow.id, workflow.total_tasks) == ("main", 4)
    assert workflow.counts["completed"] == 2 and workflow.counts["failed"] == 1

    workers = {w.id: w for w in monitor.get_workers()}
    assert workers["first"].status == "offline"
    assert workers["second"].status == "busy"
    assert workers["second"].running_tasks == (running.id,)
    assert not workers["second"].heartbeat_expired
    assert workers["first"].runtime.total_seconds() >= 0

    tasks = {t.id: t for t in monitor.get_tasks()}
    assert [t.id for t in monitor.get_tasks()] == ["a", "c", "bad", "b"]  # graph order
    assert tasks["a"].completed and tasks["a"].runtime >= 0
    assert tasks["a"].current_status.status == "completed"
    assert tasks["a"].current_status.worker_id == "first"
    assert tasks[running.id].active_workers == 1 and not tasks[running.id].completed
    assert tasks[running.id].runtime == -1
    assert tasks["bad"].status == "failed" and tasks["bad"].failed_retries == 1
    assert "left the loop (break)" in tasks["bad"].last_error
    assert tasks["bad"].last_traceback is None  # the break never reached the interpreter
    with pytest.raises(ValueError, match="'done' is not a task state; use one of pending"):
        monitor.get_tasks(state="done")
    assert [t.id for t in monitor.get_tasks(state="failed")] == ["bad"]
    by_first = monitor.get_tasks(worker=workers["first"])
    assert sorted(t.id for t in by_first) == ["a", "bad", "c"]
    assert [t.id for t in monitor.get_tasks(worker="second")] == [running.id]
    assert Path("g.sqlite").read_bytes() == before  # reading wrote nothing
    held.close()


def test_monitor_of_a_missing_database_says_so():
    from laufband import DatabaseError

    with pytest.raises(DatabaseError, match="No database at .*nothing.sqlite"):
        Monitor(db="nothing.sqlite")
    assert not os.path.exists("nothing.sqlite")


def test_laufband_0_2_style_loop_over_has_more_jobs():
    worker = Laufband(list(range(5)), tqdm_kwargs={"disable": True})
    seen = []
    while worker.has_more_jobs:
        seen.extend(worker)
    assert seen == [0, 1, 2, 3, 4]
    assert rows("SELECT state FROM workers", "laufband.sqlite") == [("offline",)]
