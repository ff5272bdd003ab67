"""The worker loop in one process, on a real SQLite file."""

from __future__ import annotations

import io
import os

import pytest
from flufl.lock import Lock
from helpers import flat_worker, history, make, rows, states

from laufband import Graphband, Laufband, Task, TaskFailedError
from laufband.clock import FakeClock

pytestmark = pytest.mark.backends



def test_flat_list_yields_items_including_none_with_index_ids():
    items = ["a", None, {"x": 1}, None]
    assert list(flat_worker(items)) == items
    assert states() == {"0": "completed", "1": "completed", "2": "completed",
                        "3": "completed"}
    assert rows("SELECT id, label FROM tasks ORDER BY pk") == [
        ("0", "'a'"), ("1", "None"), ("2", "{'x': 1}"), ("3", "None")]


def test_default_db_files():
    assert list(Laufband([1, 2], tqdm_kwargs={"disable": True})) == [1, 2]
    assert os.path.exists("laufband.sqlite")
    assert [t.id for t in Graphband([Task("a")], tqdm_kwargs={"disable": True})] == ["a"]
    assert os.path.exists("graphband.sqlite")


def test_len_for_sized_input_and_typeerror_for_generators():
    assert len(flat_worker([1, 2, 3])) == 3
    gen_worker = flat_worker(x for x in [1, 2, 3])
    with pytest.raises(TypeError):
        len(gen_worker)
    assert list(gen_worker) == [1, 2, 3]


def test_dependencies_respected_in_one_worker():
    tasks = [Task("c", dependencies={"a", "b"}), Task("b", dependencies={"a"}), Task("a")]
    assert [t.id for t in make(tasks)] == ["a", "b", "c"]


def test_break_marks_task_failed():
    worker = flat_worker(range(5))
    for item in worker:
        if item == 2:
            break
    s = states()
    assert s["2"] == "failed" and s["0"] == s["1"] == "completed"
    assert s["3"] == "ready"
    assert history("2")[-1][:2] == ("failed", "failed")


def test_exception_marks_task_failed_and_propagates():
    worker = flat_worker(range(3))
    with pytest.raises(ZeroDivisionError):
        for item in worker:
            if item == 1:
                1 / 0  # noqa: B018
    assert states()["1"] == "failed"


def test_close_completes_current_task_and_stops():
    worker = flat_worker(range(5))
    seen = []
    for item in worker:
        seen.append(item)
        if item == 1:
            worker.close()
    assert seen == [0, 1]
    assert states() == {"0": "completed", "1": "completed", "2": "ready", "3": "ready",
                        "4": "ready"}
    assert rows("SELECT state FROM workers") == [("offline",)]


def test_failed_retries_run_task_again():
    attempts = []
    worker = flat_worker(["x"], max_failed_retries=2)
    for _ in range(3):
        for item in worker:
            attempts.append(item)
            if len(attempts) < 3:
                raise_in_loop = True
                break
        else:
            raise_in_loop = False
        if not raise_in_loop:
            break
    assert attempts == ["x", "x", "x"]
    assert states() == {"0": "completed"}
    assert [e for e, *_ in history("0")] == ["claimed", "failed"] * 2 + ["claimed", "completed"]


def test_failure_beyond_retries_blocks_descendants_and_ends_loop():
    tasks = [Task("a"), Task("b", dependencies={"a"}), Task("c", dependencies={"b"}),
             Task("d")]
    worker = make(tasks)
    for task in worker:
        if task.id == "a":
            break
    assert [t.id for t in worker] == ["d"]
    assert states() == {"a": "failed", "b": "blocked", "c": "blocked", "d": "completed"}
    assert not worker.has_more_jobs


def test_failure_policy_stop_raises_in_other_workers():
    a = make([Task("a"), Task("b")], name="A")
    with pytest.raises(RuntimeError):
        for _task in a:
            raise RuntimeError("boom")
    b = make([Task("a"), Task("b")], name="B", failure_policy="stop")
    with pytest.raises(TaskFailedError, match="'a'"):
        list(b)
    assert states()["b"] == "ready"  # b stopped before claiming anything


def test_rerun_after_everything_finished_does_nothing():
    assert list(flat_worker(range(3), name="first")) == [0, 1, 2]
    before = rows("SELECT count(*) FROM events")
    assert list(flat_worker(range(3), name="second")) == []
    assert rows("SELECT count(*) FROM events") == before


def test_sequential_workers_in_one_process_share_the_work():
    a = flat_worker(range(4), name="A")
    for item in a:
        if item == 1:
            a.close()
    b = flat_worker(range(4), name="B")
    assert list(b) == [2, 3]


def test_same_default_identifier_reusable_after_clean_exit():
    first = Graphband([Task("a")], tqdm_kwargs={"disable": True})
    assert [t.id for t in first] == ["a"]
    second = Graphband([Task("a"), Task("b")], tqdm_kwargs={"disable": True})
    assert [t.id for t in second] == ["b"]
    assert first.identifier == second.identifier


def test_live_identifier_is_refused():
    alive = make([Task("a")], name="same")
    with pytest.raises(ValueError, match="'same'.*live worker"):
        make([Task("a")], name="same")
    assert alive.identifier == "same"


def test_labels_subset_matching():
    tasks = [Task("plain"), Task("gpu", requirements={"gpu"}),
             Task("both", requirements={"gpu", "big"})]
    assert [t.id for t in make(tasks, name="cpu")] == ["plain"]
    assert sorted(t.id for t in make(tasks, name="g", labels={"gpu", "big", "x"})) == [
        "both", "gpu"]


@pytest.mark.sqlite_only
def test_user_locks_are_exposed_as_given():
    lock, db_lock = Lock("user.lock"), Lock("db.lock")
    worker = make([Task("a")], lock=lock, db_lock=db_lock)
    assert worker.lock is lock  # as given
    # The database lock is taken through laufband's re-entrant wrapper around it.
    assert worker._db_lock.file_lock is db_lock
    assert worker.db_lock.lockfile == db_lock.lockfile
    for _task in worker:
        with worker.lock:
            pass
    with worker.db_lock:
        pass  # user code may hold it as a context manager
    assert states() == {"a": "completed"}


def test_disabled_iterates_locally_without_files(monkeypatch):
    monkeypatch.setenv("LAUFBAND_DISABLED", "1")
    tasks = [Task("b", dependencies={"a"}), Task("a")]
    worker = Graphband(tasks, tqdm_kwargs={"disable": True})
    assert [t.id for t in worker] == ["a", "b"]
    assert os.listdir(".") == []
    assert not worker.has_more_jobs
    with worker.lock:
        pass


def test_has_more_jobs_counts_only_runnable_unfinished_tasks():
    tasks = [Task("a"), Task("g", requirements={"gpu"})]
    worker = make(tasks)
    assert worker.has_more_jobs
    assert [t.id for t in worker] == ["a"]
    assert not worker.has_more_jobs  # "g" needs a label this worker lacks


def test_progress_bar_shows_global_progress():
    a = flat_worker(range(10), name="A")
    for item in a:
        if item == 5:
            a.close()
    b = make(range(10), name="B", cls=Laufband)
    b.tqdm_kwargs = {"file": io.StringIO()}  # a real bar (a disabled one counts nothing)
    it = iter(b)
    next(it)
    assert b.iterator.total == 10
    assert b.iterator.n == 6  # completed by A, seen by B
    list(it)
    assert b.iterator.n == 10


def test_iterator_before_iteration_raises():
    with pytest.raises(ValueError, match="Iterator not initialized"):
        _ = flat_worker([1]).iterator


def test_context_manager_marks_offline_on_exit():
    with flat_worker([1, 2]) as worker:
        assert list(worker) == [1, 2]
        assert rows("SELECT state FROM workers") == [("idle",)]
    assert rows("SELECT state FROM workers") == [("offline",)]


def test_shared_task_completes_once_and_releases_sibling():
    clock = FakeClock()
    tasks = [Task("wide", max_parallel_workers=2)]
    a = make(tasks, name="A", clock=clock)
    b = make(tasks, name="B", clock=clock)
    ia, ib = iter(a), iter(b)
    assert next(ia).id == "wide"
    assert next(ib).id == "wide"  # second slot
    assert list(ia) == []  # A completes it
    assert list(ib) == []  # B's attempt is released, not a second completion
    events = [e for e, *_ in history("wide")]
    assert events.count("completed") == 1 and "released" in events


def test_dynamic_graph_rerun_adds_tasks():
    assert [t.id for t in make([Task("a")], name="A")] == ["a"]
    more = [Task("a"), Task("b", dependencies={"a"})]
    assert [t.id for t in make(more, name="B")] == ["b"]
    assert states() == {"a": "completed", "b": "completed"}


def test_a_claim_never_takes_a_task_that_is_no_longer_ready(monkeypatch, caplog):
    """Under the writers' lock nothing changes between finding a ready task and claiming
    it; should that ever fail (a lock lost by a paused holder), the claim's own guard
    keeps the task from being claimed a second time and nothing is booked for it."""
    from laufband.store import claiming

    a = make([Task("x"), Task("y")], name="A", batch_size=1)
    it = iter(a)
    assert next(it).id == "x"
    [(pk,)] = rows("SELECT pk FROM tasks WHERE id = 'x'")
    real, calls = claiming.find, []

    def stale(led, me, limit, ahead=False, lock=False):  # B's find before A claimed x
        calls.append(me.id)
        return [pk] if len(calls) == 1 else real(led, me, limit, ahead, lock)

    monkeypatch.setattr(claiming, "find", stale)
    b = make([Task("x"), Task("y")], name="B", batch_size=1)
    with caplog.at_level("WARNING"):
        itb = iter(b)
        assert next(itb).id == "y"  # x runs at A: B would wait for it, so stop here
        itb.close()
    assert "1 of 1 tasks found ready were claimed by another worker" in caplog.text
    assert rows("SELECT attempts, running, state FROM tasks WHERE id = 'x'") == [
        (1, 1, "running")]
    assert rows(f"SELECT worker FROM attempts WHERE task = {pk}") == [("A",)]
    it.close()
