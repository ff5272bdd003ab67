"""Priorities, depth-first claims, resources with global limits, timeouts, task results
and thread workers (worker.map), in one process on a real SQLite file."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time

import pytest
from helpers import beat, flat_worker, history, make, rows, states, url

from laufband import ConfigError, GraphError, ResultError, Task
from laufband.clock import FakeClock, SystemClock

pytestmark = pytest.mark.backends


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("resources, what", [
    ({"api": 0}, "amount of 'api' must be an integer >= 1"), ({"api": -1}, "integer >= 1"),
    ({"api": 1.5}, "integer >= 1"), ({"api": True}, "integer >= 1"),
    ({"": 1}, "non-empty strings"), ({3: 1}, "non-empty strings"), ({"a=b": 1}, "without '='"),
    ([("api", 1)], "must be a mapping"), ("api", "must be a mapping"),
])
def test_invalid_resources_are_refused(resources, what):
    with pytest.raises(GraphError, match=what):
        Task("a", resources=resources)


@pytest.mark.parametrize("priority", [1.5, "1", True, None, 2**63])
def test_invalid_priority_is_refused(priority):
    with pytest.raises(GraphError, match="priority must be an integer"):
        Task("a", priority=priority)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "5", True])
def test_invalid_timeout_is_refused(timeout):
    with pytest.raises(GraphError, match="timeout must be a number of seconds > 0"):
        Task("a", timeout=timeout)


@pytest.mark.parametrize("limits, what", [
    ({"api": 0}, "limit of 'api' must be an integer >= 1"), ({"api": -2}, "integer >= 1"),
    ({"api": 2.0}, "integer >= 1"),
    ({"api": "8"}, "integer >= 1"), ({"api": False}, "integer >= 1"),
    ({"": 1}, "non-empty string"), ({"a=b": 1}, "without '='"), ([("api", 1)], "a mapping"),
])
def test_invalid_limits_are_refused(limits, what):
    with pytest.raises(ConfigError, match=what):
        make([Task("a")], limits=limits)
    assert not os.path.exists("g.sqlite")  # checked before anything is written


def test_a_resource_without_a_limit_is_refused_before_anything_runs():
    with pytest.raises(GraphError, match="holds resource 'gpu', which has no limit.*"
                                         r"limits=\{'gpu': 4\}"):
        make([Task("a", resources={"gpu": 1})], limits={"api": 2})
    assert not os.path.exists("g.sqlite")  # a new workflow: nothing written


@pytest.mark.sqlite_only
def test_a_task_that_needs_more_than_the_limit_is_refused():
    with pytest.raises(GraphError, match="needs 3 of resource 'api', more than its limit 2"):
        make([Task("a", resources={"api": 3})], limits={"api": 2})
    assert not os.path.exists("g.sqlite")
    list(make([Task("b")]))  # an existing workflow: checked against the stored limits
    with pytest.raises(GraphError, match="holds resource 'api', which has no limit"):
        make([Task("b"), Task("a", resources={"api": 3})], name="B")
    assert rows("SELECT id FROM tasks") == [("b",)]


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_invalid_thread_counts_are_refused(threads):
    worker = make([Task("a")])
    with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
        worker.map(lambda task: None, threads=threads)
    assert states() == {"a": "ready"}


def test_invalid_max_result_size_is_refused(monkeypatch):
    with pytest.raises(ConfigError, match="max_result_size=0 is invalid"):
        make([Task("a")], max_result_size=0)
    monkeypatch.setenv("LAUFBAND_MAX_RESULT_SIZE", "big")
    with pytest.raises(ConfigError, match="LAUFBAND_MAX_RESULT_SIZE='big' is invalid"):
        make([Task("a")])


# --------------------------------------------------------------- priorities


def test_higher_priority_runs_first_and_ties_keep_graph_order():
    tasks = [Task("a"), Task("b", priority=5), Task("c", priority=-1), Task("d", priority=5),
             Task("e")]
    assert [t.id for t in make(tasks, batch_size=1)] == ["b", "d", "a", "e", "c"]


def test_priority_wins_over_requirement_specificity_and_counts_across_sets():
    tasks = [Task("gpu-low", requirements={"gpu"}), Task("plain-high", priority=3),
             Task("gpu-high", requirements={"gpu"}, priority=3)]
    order = [t.id for t in make(tasks, labels={"gpu"}, batch_size=1)]
    # priority first; among equals the more specific requirements first
    assert order == ["gpu-high", "plain-high", "gpu-low"]


def pipeline(n: int) -> list[Task]:
    """Two stages yielded stage by stage: resolve_i, then fetch_i after it."""
    return ([Task(f"resolve{i}") for i in range(n)]
            + [Task(f"fetch{i}", dependencies={f"resolve{i}"}) for i in range(n)])


def test_graph_order_runs_the_first_stage_first():
    order = [t.id for t in make(pipeline(3), batch_size=1)]
    assert order == ["resolve0", "resolve1", "resolve2", "fetch0", "fetch1", "fetch2"]


def test_depth_first_interleaves_the_stages():
    order = [t.id for t in make(pipeline(3), batch_size=1, depth_first=True)]
    assert order == ["resolve0", "fetch0", "resolve1", "fetch1", "resolve2", "fetch2"]
    assert rows("SELECT id, depth FROM tasks WHERE id IN ('resolve0', 'fetch0')"
                " ORDER BY id") == [("fetch0", 1), ("resolve0", 0)]


def test_depth_first_from_the_environment_and_workers_must_agree(monkeypatch):
    monkeypatch.setenv("LAUFBAND_DEPTH_FIRST", "1")
    first = make(pipeline(2), name="A")
    assert first.settings.depth_first
    monkeypatch.delenv("LAUFBAND_DEPTH_FIRST")
    with pytest.raises(ConfigError, match="claims ready tasks in depth-first order.*"
                                          "depth_first=False"):
        make(pipeline(2), name="B")


def test_a_changed_priority_is_another_graph():
    list(make([Task("a"), Task("b")]))
    with pytest.raises(GraphError, match="differ from the graph stored"):
        make([Task("a"), Task("b", priority=2)], name="B")


# ---------------------------------------------------------------- resources


def test_a_capped_resource_is_not_claimed_while_held_and_other_work_goes_on():
    tasks = [Task("up1", resources={"api": 1}), Task("up2", resources={"api": 1}),
             Task("local")]
    a = make(tasks, name="A", limits={"api": 1}, batch_size=1)
    b = make(tasks, name="B", batch_size=1)
    it = iter(a)
    assert next(it).id == "up1"  # A holds the only "api"
    it_b = iter(b)
    assert next(it_b).id == "local"  # up2 is ready, but the cap is full
    assert rows("SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(2,)]
    assert next(it).id == "up2"  # up1 completed: its "api" is free again
    b.close()  # one process runs both loops: B must not wait for A's up2
    assert list(it_b) == [] and list(it) == []
    assert set(states().values()) == {"completed"}


def test_a_failed_attempt_releases_its_resources():
    tasks = [Task("up1", resources={"api": 2}), Task("up2", resources={"api": 1})]
    worker = make(tasks, limits={"api": 2}, batch_size=1)
    with pytest.raises(RuntimeError):
        for task in worker:
            raise RuntimeError(task.id)
    assert [t.id for t in make(tasks, name="B", batch_size=1)] == ["up2"]


def test_stored_limits_win_over_a_later_worker_and_it_says_so(caplog):
    make([Task("a", resources={"api": 1})], name="A", limits={"api": 2})
    make([Task("a", resources={"api": 1})], name="B", limits={"api": 5})
    assert rows("SELECT name, capacity, set_by FROM limits") == [("api", 2, "A")]
    assert "the workflow's limit api=2 is used, not api=5" in caplog.text


def test_laufband_limits_shows_and_changes_the_limits(capsys):
    from laufband import cli

    make([Task("a", resources={"api": 2}), Task("b")], limits={"api": 4})
    assert cli.main(["--db", url(), "limits"]) == 0
    assert "api" in capsys.readouterr().out
    assert cli.main(["--db", url(), "limits", "api=3", "disk=1"]) == 0
    assert rows("SELECT name, capacity FROM limits ORDER BY name") == [("api", 3), ("disk", 1)]
    assert cli.main(["--db", url(), "limits", "api=1"]) == 2  # a needs 2
    assert "need more than that" in capsys.readouterr().err
    for bad in ("api=0", "api=-1", "api=x", "api", "=3"):
        assert cli.main(["--db", url(), "limits", bad]) == 2, bad
    assert rows("SELECT name, capacity FROM limits ORDER BY name") == [("api", 3), ("disk", 1)]


def test_a_lowered_limit_holds_for_new_claims():
    tasks = [Task(f"u{i}", resources={"api": 1}) for i in range(3)]
    a = make(tasks, name="A", limits={"api": 3}, batch_size=1)
    it = iter(a)
    assert next(it).id == "u0"
    a._store.set_limits({"api": 1}, "test")
    b = make(tasks, name="B", batch_size=1)
    assert b._store.step(b._me, [], _want()).claims == []  # A holds the one left
    assert next(it).id == "u1"


def _want():
    from laufband.store import Want

    return Want(1)


# ------------------------------------------------------------------ results


def test_results_round_trip_in_graph_order_not_completion_order():
    tasks = [Task("a", data=1), Task("b", data=2, priority=1), Task("c", data=3,
                                                                   dependencies={"a"})]
    worker = make(tasks, batch_size=1)
    for task in worker:
        if task.id == "c":
            assert worker.result("a") == {"n": 1}  # a dependency's result
        worker.set_result({"n": task.data})
    assert list(worker.results().items()) == [("a", {"n": 1}), ("b", {"n": 2}),
                                              ("c", {"n": 3})]
    assert [t for t, _ in worker._store.results()] == ["a", "b", "c"]


def test_result_of_an_unfinished_or_unknown_task_is_an_error():
    worker = make([Task("a"), Task("b", dependencies={"a"})], batch_size=1)
    with pytest.raises(ResultError, match="'b' is pending, not completed"):
        worker.result("b")
    with pytest.raises(ResultError, match="no task has this id"):
        worker.result("zz")
    with pytest.raises(ResultError, match="inside the loop body"):
        worker.set_result(1)


def test_an_oversize_or_non_json_result_fails_the_task_clearly():
    worker = make([Task("a"), Task("b"), Task("c")], max_result_size=100, batch_size=1)
    with pytest.raises(ResultError, match="more than max_result_size=100"):
        for _task in worker:
            worker.set_result("x" * 200)
    summary = make([Task("a"), Task("b"), Task("c")], name="B", max_result_size=100).map(
        lambda task: {"b": object()} if task.id == "b" else "ok")
    assert (summary.completed, summary.failed) == (1, 1)  # a had failed in the loop
    assert states() == {"a": "failed", "b": "failed", "c": "completed"}
    error = rows("SELECT error FROM attempts a JOIN tasks t ON t.pk = a.task"
                 " WHERE t.id = 'b'")[0][0]
    assert "ResultError: the task's result is not JSON-serialisable" in error


# ------------------------------------------------------------------- threads


def test_map_runs_tasks_on_threads_at_once_and_isolates_failures():
    barrier = threading.Barrier(4, timeout=10)
    seen = []

    def fn(task):
        seen.append(threading.current_thread().name)
        if task.data < 4:
            barrier.wait()  # only passes if 4 tasks run at the same time
        if task.id == "t5":
            raise ValueError("bad input")
        return task.data * 10

    worker = make([Task(f"t{i}", data=i) for i in range(12)])
    summary = worker.map(fn, threads=4)
    assert (summary.completed, summary.failed, summary.handed_back) == (11, 1, 0)
    assert states()["t5"] == "failed" and list(states().values()).count("completed") == 11
    assert worker.results()["t3"] == 30 and "t5" not in worker.results()
    error, trace = rows("SELECT error, traceback FROM attempts WHERE outcome = 'failed'")[0]
    assert error == "ValueError: bad input" and "raise ValueError" in trace
    assert len(set(seen)) == 12  # a thread per task
    assert rows("SELECT state FROM workers") == [("offline",)]


def test_map_over_a_dag_respects_dependencies_and_can_read_results():
    tasks = [Task("a", data=1), Task("b", data=2, dependencies={"a"}),
             Task("c", data=3, dependencies={"a", "b"})]
    worker = make(tasks)

    def fn(task):
        return task.data + sum(worker.result(d) for d in sorted(task.dependencies))

    worker.map(fn, threads=3)
    assert worker.results() == {"a": 1, "b": 3, "c": 7}


def test_map_with_a_cap_never_holds_more_than_the_limit():
    running, peak, lock = [0], [0], threading.Lock()

    def fn(task):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    tasks = [Task(f"t{i}", resources={"api": 1}) for i in range(12)]
    make(tasks, limits={"api": 2}).map(fn, threads=6)
    assert peak[0] == 2
    assert set(states().values()) == {"completed"}


def test_map_times_out_a_task_releases_it_and_discards_its_late_result():
    release = threading.Event()

    def fn(task):
        if task.id == "slow":
            release.wait(10)
            return "late"
        return "ok"

    worker = make([Task("slow", timeout=0.2), Task("quick")], clock=SystemClock())
    summary = worker.map(fn, threads=2)
    release.set()
    assert (summary.completed, summary.failed) == (1, 1)
    assert states() == {"slow": "failed", "quick": "completed"}
    error = rows("SELECT error FROM attempts a JOIN tasks t ON t.pk = a.task"
                 " WHERE t.id = 'slow'")[0][0]
    assert error == "TimeoutError: task 'slow' ran longer than its timeout of 0.2 s"
    assert worker.results() == {"quick": "ok"}


def test_the_heartbeat_times_out_an_attempt_of_a_plain_loop():
    clock = FakeClock()
    worker = make([Task("a", timeout=30), Task("b")], clock=clock, batch_size=1)
    it = iter(worker)
    assert next(it).id == "a"
    assert rows("SELECT deadline - started_at FROM attempts") == [(30.0,)]
    clock.advance(31)
    beat(worker)  # any worker's heartbeat records overdue attempts failed
    assert states()["a"] == "failed"
    assert next(it).id == "b"  # a's completion is rejected (fenced), b runs
    assert list(it) == []
    assert [e for e, *_ in history("a")][-1] == "fenced"


def test_close_from_a_task_stops_claiming_and_lets_running_tasks_finish():
    worker = make([Task(f"t{i}") for i in range(20)])
    started = []

    def fn(task):
        started.append(task.id)
        if task.id == "t0":
            worker.close()
        time.sleep(0.05)

    summary = worker.map(fn, threads=2)
    assert summary.completed == len(started) and summary.handed_back == 0
    assert len(started) < 20
    assert list(states().values()).count("completed") == len(started)
    assert rows("SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]


def test_flat_list_map_gets_items_and_disabled_runs_locally():
    assert flat_worker(["x", "y"]).map(str.upper, threads=2).completed == 2
    assert rows("SELECT result FROM attempts ORDER BY task", "g.sqlite") == [
        ('"X"',), ('"Y"',)]
    seen = []
    summary = make([Task("a"), Task("b")], db="none.sqlite", disabled=True).map(seen.append)
    assert summary.completed == 2 and [t.id for t in seen] == ["a", "b"]


# ---------------------------------------------------------------- migration


@pytest.mark.sqlite_only
def test_a_schema_3_database_is_upgraded_and_goes_on():
    data = os.path.join(os.path.dirname(__file__), "..", "data", "schema3.sqlite")
    shutil.copy(data, "g.sqlite")
    graph = [Task("a", fingerprint="a1"), Task("b", dependencies={"a"}), Task("c"),
             Task("d", dependencies={"c"}, requirements={"gpu"}), Task("e"), Task("f")]
    clock = FakeClock(1_700_100_000.0)
    b = make(graph, name="B", clock=clock, max_failed_retries=1, labels={"gpu"},
             enable_fingerprints=True)
    beat(b)
    assert sorted(t.id for t in b) == ["b", "c", "d", "e", "f"]
    assert set(states().values()) == {"completed"}
    conn = sqlite3.connect("g.sqlite")
    try:
        assert conn.execute("SELECT labels, resources FROM reqsets ORDER BY id").fetchall() \
            == [("[]", "{}"), ('["gpu"]', "{}")]
    finally:
        conn.close()
    from laufband.store.schema import SCHEMA_VERSION

    assert json.loads(rows("SELECT value FROM laufband_meta WHERE key = 'schema_version'")
                      [0][0]) == SCHEMA_VERSION
    from test_database import schema_of

    list(make([Task("x")], db="fresh.sqlite"))
    assert schema_of("g.sqlite") == schema_of("fresh.sqlite")  # migrated == fresh


@pytest.mark.sqlite_only
def test_claim_lookup_and_cap_reads_use_their_indexes():
    """The ordered claim lookup is one seek in ix_tasks_claim (no sort of the ready
    tasks), and what running tasks hold is read from the live attempts only."""
    from laufband.store.attempts import SQL as ATTEMPTS
    from laufband.store.claiming import SQL as CLAIMING
    from laufband.store.resources import SQL as RESOURCES

    list(make([Task(str(i), priority=i % 3, resources={"api": 1} if i % 2 else {})
               for i in range(50)], limits={"api": 2}))
    conn = sqlite3.connect("g.sqlite")
    params = {"reqset": 0, "generation": 1, "worker": "w", "limit": 3, "now": 0.0, "me": "w"}
    try:
        plans = {name: [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
                 for name, sql in (("find", CLAIMING["find_ready"]),
                                   ("held", RESOURCES["held"]),
                                   ("overdue", ATTEMPTS["overdue"]))}
    finally:
        conn.close()
    assert plans["find"][0].startswith("SEARCH tasks USING INDEX ix_tasks_claim"), plans
    assert not any("ORDER BY" in line for line in plans["find"]), plans
    for name in ("held", "overdue"):  # the live attempts only, by either index
        assert plans[name][0] in ("SCAN a USING INDEX ix_attempts_live",
                                  "SEARCH a USING INDEX ix_attempts_ended (ended_at=?)"), plans


def test_a_capped_resource_is_shared_among_the_workers_that_compete_for_it():
    """A worker whose capped task ends does not take the freed slot again while another
    worker that competes for the resource holds less than its share (limit / workers
    competing, rounded up); a worker alone takes the whole limit."""
    from laufband.states import Event, WorkerState
    from laufband.store import Finish, Want

    tasks = [Task(f"u{i}", resources={"api": 1}) for i in range(6)]
    a = make(tasks, name="A", limits={"api": 2})
    b = make(tasks, name="B")
    first = a._store.step(a._me, [], Want(2, 2, start=True)).claims
    assert len(first) == 2  # alone: the whole limit
    # B finds everything held and waits (as its loop would: it says how it leaves).
    waiting = Want(2, 2, start=True, leave=WorkerState.OFFLINE)
    assert b._store.step(b._me, [], waiting).claims == []
    again = a._store.step(a._me, [Finish(first[0], Event.COMPLETED)], Want(2, 2)).claims
    assert again == []  # A holds 1 = its share now that B competes
    assert len(b._store.step(b._me, [], Want(2, 2)).claims) == 1
    assert rows("SELECT worker, count(*) FROM attempts WHERE ended_at IS NULL"
                " GROUP BY worker ORDER BY worker") == [("A", 1), ("B", 1)]


def test_worker_lock_is_shared_by_the_threads_of_map():
    worker = make([Task(f"t{i}") for i in range(8)])
    inside, most = [0], [0]

    def fn(task):
        with worker.lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.01)
            inside[0] -= 1

    assert worker.map(fn, threads=4).completed == 8
    assert most[0] == 1
    assert not worker.lock.is_locked


def test_a_task_needing_more_than_a_workers_share_still_runs():
    """Limit 3 shared by 3 competing workers is 1 each; a task that needs 2 must still
    be claimable (a share is never below what one task needs)."""
    from laufband.states import WorkerState
    from laufband.store import Want

    tasks = [Task("long"), Task("big", resources={"api": 2}), Task("x", resources={"api": 1})]
    d = make(tasks, name="D", limits={"api": 3})
    assert [cl.id for cl in d._store.step(d._me, [], Want(1, start=True)).claims] == ["long"]
    a, b, c = (make(tasks, name=n) for n in "ABC")
    for w in (b, c):  # two others wait for work ("long" runs), so they compete for api
        w._store.step(w._me, [], Want(0, start=True, leave=WorkerState.OFFLINE))
    assert rows("SELECT id FROM workers WHERE leave_as IS NOT NULL ORDER BY id") == [
        ("B",), ("C",)]
    waiting = Want(1, 1, start=True, leave=WorkerState.OFFLINE)
    assert [cl.id for cl in a._store.step(a._me, [], waiting).claims] == ["big"]


def test_a_loop_claims_a_task_with_a_timeout_alone_and_never_ahead():
    """Its clock starts at the claim: in a batch it would wait for the others, and its
    completion would be recorded only with the next step (found by review: finished
    tasks were timed out and their completions fenced)."""
    from laufband.store import Want

    tasks = [Task("a"), Task("t1", timeout=5), Task("b"), Task("t2", timeout=5)]
    w = make(tasks, batch_size=4)
    first = w._store.step(w._me, [], Want(4, 4, start=True)).claims
    assert [c.id for c in first] == ["a"]  # stops before the task with a timeout
    assert w._store.step(w._me, [], Want(4, 4, ahead=True)).claims == []  # not ahead
    assert [c.id for c in w._store.step(w._me, [], Want(4, 4)).claims] == ["t1"]  # alone
    w._me.threads = 4  # worker.map starts every claim at once: no such rule
    assert [c.id for c in w._store.step(w._me, [], Want(4, 4)).claims] == ["b", "t2"]


def test_a_peer_times_out_another_workers_attempt_only_a_heartbeat_timeout_late():
    """Deadlines are stamped by the claiming node's clock: another node (whose clock
    may differ) waits a heartbeat timeout longer."""
    clock = FakeClock()
    a = make([Task("slow", timeout=10)], name="A", clock=clock, heartbeat_timeout=60,
             heartbeat_interval=1)
    it = iter(a)
    assert next(it).id == "slow"
    clock.advance(30)
    b = make([Task("slow", timeout=10)], name="B", clock=clock)
    beat(b)  # 20 s past the deadline by this clock: not yet for another worker's
    assert states() == {"slow": "running"}
    beat(a)  # by its own clock
    assert states() == {"slow": "failed"}


def test_a_shared_capped_task_keeps_a_worker_that_waits_for_its_resource():
    """A shared task holds its resource while it is still 'ready' (free slots): a
    worker whose capped task waits for that resource must not leave."""
    from laufband.states import WorkerState
    from laufband.store import Want

    tasks = [Task("S", resources={"api": 1}, max_parallel_workers=2, priority=10),
             Task("T", resources={"api": 1}, requirements={"b"})]
    a = make(tasks, name="A", limits={"api": 1})
    b = make(tasks, name="B", labels={"b"})
    assert [c.id for c in a._store.step(a._me, [], Want(1, start=True)).claims] == ["S"]
    result = b._store.step(b._me, [], Want(1, start=True, leave=WorkerState.OFFLINE))
    assert result.claims == [] and not result.left


def test_failure_policy_stop_under_map_lets_running_tasks_finish_then_raises():
    from laufband import TaskFailedError

    gate = threading.Event()

    def fn(task):
        if task.id == "bad":
            gate.set()
            raise ValueError("bad")
        assert gate.wait(10)
        time.sleep(0.05)  # still running when the failure is seen
        return "ok"

    worker = make([Task("slow"), Task("bad")], failure_policy="stop", clock=SystemClock())
    with pytest.raises(TaskFailedError):
        worker.map(fn, threads=2)
    assert states() == {"slow": "completed", "bad": "failed"}
    assert rows("SELECT count(*) FROM attempts WHERE outcome = 'preempted'") == [(0,)]


def test_taking_worker_lock_twice_on_one_thread_raises_as_flufl_does():
    from flufl.lock import AlreadyLockedError

    worker = make([Task("a")])
    with worker.lock, pytest.raises(AlreadyLockedError):
        worker.lock.__enter__()
    assert not worker.lock.is_locked


def test_a_worker_declared_dead_that_is_back_gets_its_fair_share_of_a_limit():
    """A worker declared dead (paused past its timeout) is revived by the claim of its
    next step, after the find: its share of a limit still counts it among the workers
    that compete (review25: it took the whole limit for that step)."""
    from laufband.states import WorkerState
    from laufband.store import Want, workers

    tasks = [Task(f"u{i}", resources={"api": 1}) for i in range(6)]
    a = make(tasks, name="A", limits={"api": 2})
    b = make(tasks, name="B")
    assert len(a._store.step(a._me, [], Want(2, 2, start=True)).claims) == 2
    # B finds the limit held and waits for capped work: it competes.
    assert b._store.step(b._me, [], Want(2, 2, start=True, leave=WorkerState.OFFLINE)
                         ).claims == []
    with a._store._ledger() as led:  # what a peer's heartbeat does to a silent worker
        workers.declare_dead(led, "A", 5, "made by the test")
    assert rows("SELECT state FROM workers WHERE id = 'A'") == [("dead",)]
    back = a._store.step(a._me, [], Want(2, 2)).claims
    assert len(back) == 1, "two workers compete for a limit of 2: a share of 1 each"
    assert rows("SELECT state FROM workers WHERE id = 'A'") == [("busy",)]
    a.close()
    b.close()
