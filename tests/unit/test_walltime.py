"""Walltime awareness in one process: when a SLURM allocation ends (SLURM_JOB_END_TIME,
scontrol, squeue; read once), declared and estimated runtimes, claims that fit in the
time left, leaving when everything left is too long, the drain on SIGUSR1 or at the
margin (exit code 0), and the 4 -> 5 migration. Time is a FakeClock; SIGUSR1 is real."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from datetime import datetime

import pytest
from helpers import beat, flat_worker, history, make, rows, states, url

from laufband import (
    ConfigError,
    GraphError,
    GraphMismatchError,
    Monitor,
    Task,
    walltime,
)
from laufband.clock import FakeClock
from laufband.signals import Drained
from laufband.states import WorkerState
from laufband.store import Want, runtimes

# Claims, estimates and drains run on both backends; the allocation's end, the SQLite
# migration fixture and the query plans are marked sqlite_only where they read the file.
pytestmark = pytest.mark.backends

T0 = 1_000_000.0  # FakeClock's start
END = "SLURM_JOB_END_TIME"


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    """No SLURM job around the tests (CI may run inside one), nothing cached."""
    for var in (END, "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                "SLURMD_NODENAME"):
        monkeypatch.delenv(var, raising=False)
    walltime.forget()
    yield
    walltime.forget()


def limited(monkeypatch, seconds: float, *args, clock=None, **kw):
    """A worker whose allocation ends ``seconds`` after the clock's now (margin 60 s
    unless given)."""
    clock = clock or FakeClock()
    monkeypatch.setenv(END, str(int(clock.now() + seconds)))
    try:
        return make(*args, clock=clock, **kw)
    finally:
        monkeypatch.delenv(END)


def events(task_id: str) -> list[str]:
    return [e for e, *_ in history(task_id)]


# ------------------------------------------------------------ the allocation's end
class Commands:
    """A fake scontrol/squeue: answers by command name, counts calls."""

    def __init__(self, **answers: str | BaseException) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], timeout: float) -> str:
        self.calls.append(argv)
        assert 0 < timeout <= 10
        answer = self.answers.get(argv[0], FileNotFoundError(argv[0]))
        if isinstance(answer, BaseException):
            raise answer
        return answer


SCONTROL = ("JobId=1235 ArrayJobId=1230 ArrayTaskId=5 JobName=wf UserId=u(1) "
            "JobState=RUNNING RunTime=00:01:02 TimeLimit=02:00:00 "
            "StartTime=2026-11-30T18:01:02 EndTime=2026-11-30T20:01:02 Deadline=N/A\n")
LOCAL = datetime(2026, 11, 30, 20, 1, 2).timestamp()  # SLURM prints local time


def test_the_end_comes_from_slurm_job_end_time_without_asking_the_controller():
    run = Commands()
    assert walltime.allocation_end({END: "1764532862", "SLURM_JOB_ID": "7"}, run) == 1764532862
    assert run.calls == []


def test_outside_slurm_there_is_no_limit():
    run = Commands(scontrol=SCONTROL)
    assert walltime.allocation_end({}, run) is None
    assert run.calls == []


def test_scontrol_is_asked_once_per_job():
    run = Commands(scontrol=SCONTROL)
    env = {"SLURM_JOB_ID": "1235"}
    assert walltime.allocation_end(env, run) == LOCAL
    assert walltime.allocation_end(env, run) == LOCAL  # cached
    assert run.calls == [["scontrol", "show", "job", "-o", "1235"]]


@pytest.mark.parametrize("end", ["Unknown", "None", "N/A"])
def test_a_job_without_an_end_has_no_limit(end):
    run = Commands(scontrol=SCONTROL.replace("EndTime=2026-11-30T20:01:02", f"EndTime={end}"))
    assert walltime.allocation_end({"SLURM_JOB_ID": "1"}, run) is None
    assert [argv[0] for argv in run.calls] == ["scontrol"]  # an answer: no squeue


def test_squeue_when_scontrol_fails_and_no_limit_when_both_fail(caplog):
    failed = subprocess.CalledProcessError(1, "scontrol")
    run = Commands(scontrol=failed, squeue="2026-11-30T20:01:02\n")
    assert walltime.allocation_end({"SLURM_JOB_ID": "1"}, run) == LOCAL
    run = Commands(scontrol=subprocess.TimeoutExpired("scontrol", 5), squeue="garbage")
    with caplog.at_level(logging.WARNING, logger="laufband.walltime"):
        assert walltime.allocation_end({"SLURM_JOB_ID": "2"}, run) is None
        assert walltime.allocation_end({"SLURM_JOB_ID": "2"}, run) is None
    assert len(run.calls) == 2  # each asked once; the failure is cached too
    [record] = caplog.records  # logged once
    assert "could not read when SLURM job 2 ends" in record.message
    assert "assumes no time limit" in record.message


def test_a_bad_slurm_job_end_time_asks_the_controller(caplog):
    run = Commands(scontrol=SCONTROL)
    with caplog.at_level(logging.WARNING, logger="laufband.walltime"):
        assert walltime.allocation_end({END: "soon", "SLURM_JOB_ID": "3"}, run) == LOCAL
    assert "SLURM_JOB_END_TIME='soon' is not a time" in caplog.text


def test_scontrol_and_squeue_on_the_path_are_cut_off_after_the_timeout(
        tmp_path, monkeypatch):
    """The real subprocess path: a scontrol that hangs is given up on, squeue answers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("scontrol", "exec sleep 30"),
                       ("squeue", 'echo "2026-11-30T20:01:02"')):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(walltime, "QUERY_TIMEOUT", 0.3)
    started = time.monotonic()
    assert walltime.allocation_end({"SLURM_JOB_ID": "4"}) == LOCAL
    assert time.monotonic() - started < 10


def test_parse_end_time():
    assert walltime.parse_end_time("2026-11-30T20:01:02") == LOCAL
    assert walltime.parse_end_time("Unknown") is None
    with pytest.raises(ValueError, match="not a SLURM time"):
        walltime.parse_end_time("tomorrow")
    with pytest.raises(ValueError, match="no EndTime"):
        walltime.parse_scontrol("slurm_load_jobs error: Invalid job id specified")


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize("runtime", [0, -5, float("nan"), float("inf"), "60", True])
def test_invalid_runtime_is_refused(runtime):
    with pytest.raises(GraphError, match="runtime must be a number of seconds > 0"):
        Task("a", runtime=runtime)


def test_runtime_from_a_networkx_node():
    import networkx as nx

    g = nx.DiGraph()
    g.add_node("a", runtime=30)
    worker = make(g)
    assert worker._by_id["a"].runtime == 30
    assert rows("SELECT runtime FROM tasks") == [(30.0,)]


@pytest.mark.parametrize("value", [-1, float("nan"), "soon", True])
def test_invalid_walltime_margin_is_refused(value):
    with pytest.raises(ConfigError, match="walltime_margin"):
        make([Task("a")], walltime_margin=value)


def test_walltime_margin_from_the_environment(monkeypatch):
    monkeypatch.setenv("LAUFBAND_WALLTIME_MARGIN", "300")
    assert make([Task("a")]).settings.walltime_margin == 300
    monkeypatch.setenv("LAUFBAND_WALLTIME_MARGIN", "-3")
    with pytest.raises(ConfigError, match="LAUFBAND_WALLTIME_MARGIN='-3' is invalid"):
        make([Task("a")], name="other")


def test_another_runtime_is_another_graph():
    list(make([Task("a", runtime=10)]))
    with pytest.raises(GraphMismatchError):
        make([Task("a", runtime=20)], name="x")
    list(make([Task("a", runtime=10)], name="y", db="fp.sqlite", enable_fingerprints=True))
    with pytest.raises(GraphMismatchError, match="runtime"):
        make([Task("a", runtime=20)], name="z", db="fp.sqlite", enable_fingerprints=True)


# ----------------------------------------------------------------------- claims
def test_a_worker_skips_a_task_too_long_for_its_time_and_one_with_more_time_runs_it(
        monkeypatch, capsys):
    tasks = [Task("long", runtime=3600), Task("short", runtime=60), Task("free")]
    a = limited(monkeypatch, 1800, tasks, name="A")  # 1740 s before the margin
    seen = []
    with pytest.raises(Drained) as info:
        seen.extend(t.id for t in a)
    assert info.value.code == 0
    assert seen == ["short", "free"]
    assert states() == {"long": "ready", "short": "completed", "free": "completed"}
    assert events("long") == []  # never claimed: not failed, still ready
    err = capsys.readouterr().err
    assert "laufband: what is left to run needs more time than its allocation has" in err
    assert "worker A stops claiming and exits (exit code 0)" in err
    b = make(tasks, name="B")  # no limit
    assert [t.id for t in b] == ["long"]
    assert rows("SELECT id, allocation_end FROM workers ORDER BY id") == [
        ("A", T0 + 1800), ("B", None)]


def test_the_workers_allocation_end_is_shown(monkeypatch, capsys):
    from test_cli import run

    monkeypatch.setenv("SLURM_JOB_ID", "1235")
    a = limited(monkeypatch, 1800, [Task("a"), Task("b")], clock=FakeClock(time.time()),
                batch_size=1)
    it = iter(a)
    next(it)
    [w] = json.loads(run(capsys, "workers", "--json")[1])
    assert w["slurm"] == {"job": "1235"}
    assert w["allocation_end"] == pytest.approx(time.time() + 1800, abs=60)
    assert 1700 < w["allocation_left_s"] <= 1800
    assert " left " in run(capsys, "workers")[1].splitlines()[1]
    [view] = Monitor(db=url()).get_workers()
    assert view.slurm == {"job": "1235"}
    assert abs(view.allocation_end.timestamp() - w["allocation_end"]) < 1
    it.close()


def test_a_batch_in_a_loop_takes_only_what_fits_one_after_the_other(monkeypatch):
    tasks = [Task(f"t{i}", runtime=100) for i in range(5)]
    a = limited(monkeypatch, 310, tasks, name="A")  # 250 s: two of them, one by one
    claims = a._store.step(a._me, [], Want(5, 5, start=True)).claims
    assert [c.id for c in claims] == ["t0", "t1"]
    # worker.map runs them side by side: each one fits.
    m = limited(monkeypatch, 310, tasks, name="M")
    m._me.threads = 3
    assert len(m._store.step(m._me, [], Want(3, 3, start=True)).claims) == 3


def test_the_estimate_is_the_longest_recent_completion_of_its_kind(monkeypatch):
    """No runtime declared: a worker learns one from completed attempts of tasks with
    the same requirements and resources (claim to completion); none yet: no limit."""
    clock = FakeClock()
    tasks = [Task(f"sim{i}") for i in range(6)] + [Task("gpu", requirements={"gpu"})]
    v = make(tasks, name="V", clock=clock, batch_size=1)
    for n, _task in enumerate(v):
        clock.advance([100, 300][n])
        if n == 1:
            v.close()
    assert states()["sim1"] == "completed"
    a = limited(monkeypatch, 60 + 299, tasks, name="A", clock=clock, labels={"gpu"})
    seen = []
    with pytest.raises(Drained):
        seen.extend(t.id for t in a)
    assert seen == ["gpu"]  # no estimate for gpu tasks: no limit
    sims = a._me.reqset_keys[("[]", "{}")]
    assert a._me.estimates == {sims: 300.0}  # the longer of 100 s and 300 s
    assert states()["sim2"] == "ready"
    b = limited(monkeypatch, 60 + 300, tasks, name="B", clock=clock, batch_size=1)
    it = iter(b)
    assert next(it).id == "sim2"  # 300 s fit in 300 s
    it.close()


def test_estimates_are_read_again_after_a_while_and_at_every_beat(monkeypatch):
    clock = FakeClock()
    tasks = [Task(f"t{i}") for i in range(4)]
    a = limited(monkeypatch, 3600, tasks, name="A", clock=clock)
    a._store.step(a._me, [], Want(0, start=True))
    assert a._me.estimates == {} and a._me.estimated_at == T0
    long_estimate(tasks, 50)  # another worker completes one in 50 s
    a._store.step(a._me, [], Want(0))
    assert a._me.estimates == {}  # read 0 s ago
    beat(a)
    assert a._me.estimates == {0: 50.0}
    long_estimate(tasks, 70)
    clock.advance(runtimes.TTL)
    a._store.step(a._me, [], Want(0))
    assert a._me.estimates == {0: 70.0} and a._me.estimated_at == T0 + runtimes.TTL


# ------------------------------------------------------------ waiting and leaving
def test_a_worker_waits_for_work_it_could_finish_and_leaves_when_none_is_left(monkeypatch):
    """'long' is ready but too long for A; 'next' waits for 'first' (as long), which V
    runs. A waits while 'next' may fit (no runtime known), and leaves once it is known
    to be too long, although V still runs: the workflow is not over."""

    def graph(next_runtime):
        return [Task("first", runtime=3600),
                Task("next", dependencies={"first"}, runtime=next_runtime),
                Task("long", runtime=3600)]

    for db, next_runtime, leaves in (("wait.sqlite", None, False),
                                     ("leave.sqlite", 3600, True)):
        clock = FakeClock()
        v = make(graph(next_runtime), name="V", db=db, clock=clock, batch_size=1)
        it = iter(v)
        assert next(it).id == "first"
        a = limited(monkeypatch, 1800, graph(next_runtime), name="A", db=db, clock=clock)
        result = a._store.step(a._me, [], Want(1, start=True, leave=WorkerState.OFFLINE))
        assert result.claims == []
        assert result.left is leaves and result.short_of_time is leaves
        poll = a._store.poll(a._me, WorkerState.OFFLINE)
        assert poll.left is leaves
        assert rows("SELECT state FROM workers WHERE id = 'A'", db) == [
            ("offline" if leaves else "busy",)]
        assert states(db)["long"] == "ready"
        it.close()


def test_a_worker_past_its_deadline_claims_nothing(monkeypatch):
    clock = FakeClock()
    a = limited(monkeypatch, 30, [Task("a")], name="A", clock=clock)  # margin 60 > 30
    assert a._store.step(a._me, [], Want(1, start=True)).claims == []
    with pytest.raises(Drained) as info:
        list(a)
    assert info.value.code == 0
    assert states() == {"a": "ready"}


# --------------------------------------------------------------------- draining
def test_at_the_margin_the_loop_finishes_its_task_and_drains(monkeypatch, capsys):
    clock = FakeClock()
    a = limited(monkeypatch, 600, [Task(f"t{i}") for i in range(4)], name="A",
                clock=clock, batch_size=3)
    seen = []
    with pytest.raises(Drained) as info:
        for task in a:
            seen.append(task.id)
            clock.advance(550)  # now within the margin: no more tasks
    assert info.value.code == 0 and seen == ["t0"]
    assert states() == {"t0": "completed", "t1": "ready", "t2": "ready", "t3": "ready"}
    assert events("t1") == ["claimed", "preempted"]  # the rest of its batch
    assert rows("SELECT state FROM workers") == [("offline",)]
    err = capsys.readouterr().err
    assert "laufband: its allocation ends in 50 s (walltime_margin=60 s)" in err
    with pytest.raises(Drained):
        list(a)  # a worker that drained starts no further loop


def test_sigusr1_lets_a_task_that_fits_finish_then_exits_0(capsys):
    worker = flat_worker(range(3), batch_size=2)
    before = signal.getsignal(signal.SIGUSR1)
    seen = []
    with pytest.raises(Drained) as info:
        for item in worker:
            seen.append(item)
            os.kill(os.getpid(), signal.SIGUSR1)  # no limit known: it fits
            time.sleep(0.05)  # the task goes on
    assert info.value.code == 0 and seen == [0]
    assert states() == {"0": "completed", "1": "ready", "2": "ready"}
    assert rows("SELECT sum(failures), sum(kills) FROM tasks") == [(0, 0)]
    err = capsys.readouterr().err
    assert "laufband: SIGUSR1 received: worker w stops claiming and exits (exit code 0)" in err
    assert signal.getsignal(signal.SIGUSR1) is before  # restored


def test_a_drain_of_an_inner_loop_hands_the_outer_loops_task_back():
    """The outer loop's body runs another worker's loop, which drains (its task fits
    and completes): its Drained leaves the outer body, whose task goes back too."""
    outer = make([Task("o1"), Task("o2")], name="A", db="outer.sqlite", batch_size=1)
    with pytest.raises(Drained):
        for _ in outer:
            for _ in make([Task("i1"), Task("i2")], name="B", batch_size=1):
                os.kill(os.getpid(), signal.SIGUSR1)
    assert states() == {"i1": "completed", "i2": "ready"}
    assert states("outer.sqlite") == {"o1": "ready", "o2": "ready"}
    assert rows("SELECT outcome, error FROM attempts", "outer.sqlite") == [
        ("preempted", "a loop in its body drained (its worker's time is up)")]
    assert rows("SELECT state FROM workers", "outer.sqlite") == [("offline",)]


def long_estimate(tasks, seconds: float) -> None:
    """Another worker, on a clock of its own, completes one task after ``seconds``: the
    estimate of that kind of task."""
    clock = FakeClock(T0)
    v = make(tasks, name="V", clock=clock, batch_size=1)
    for _ in v:
        clock.advance(seconds)
        v.close()


def test_sigusr1_hands_back_at_once_a_task_that_no_longer_fits(monkeypatch, capsys):
    tasks = [Task(f"t{i}") for i in range(3)]
    a = limited(monkeypatch, 3600, tasks, name="A", batch_size=1)
    it = iter(a)
    assert next(it).id == "t0"  # no estimate yet: no limit
    long_estimate(tasks, 7200)  # meanwhile: tasks like it take 2 h
    beat(a)  # A learns it
    with pytest.raises(Drained):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(30)  # interrupted
    it.close()  # the user's for loop is left
    assert history("t0")[-1][:2] == ("preempted", "ready")
    assert rows("SELECT error FROM attempts WHERE task = 1") == [
        ("SIGUSR1 received: not expected to finish in the time left",)]
    assert rows("SELECT failures, kills FROM tasks WHERE id = 't0'") == [(0, 0)]
    assert rows("SELECT state FROM workers WHERE id = 'A'") == [("offline",)]
    assert "task 't0' was handed back to other workers" in capsys.readouterr().err


def test_map_drains_on_sigusr1_keeps_what_fits_and_hands_back_the_rest(monkeypatch):
    tasks = [Task("fits", runtime=60), Task("free"), Task("other")]
    worker = limited(monkeypatch, 3600, tasks, name="A", clock=FakeClock(time.time()))
    release, let_free_end = threading.Event(), threading.Event()
    started = threading.Barrier(3)
    seen = []

    def fn(task):
        started.wait(10)
        if task.id == "fits":
            release.wait(10)
        else:
            let_free_end.wait(30)  # handed back first: its result does not count
        return task.id

    def signal_later():
        started.wait(10)
        long_estimate(tasks, 7200)  # 'free' and 'other' are of a kind that takes 2 h
        beat(worker)
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not worker._draining() and time.monotonic() < deadline:
            time.sleep(0.01)
        # Not handed back while 'fits' runs: the process lives on, and so does the
        # thread of 'free' (another worker would run it at the same time).
        seen.append(events("free"))
        release.set()

    thread = threading.Thread(target=signal_later)
    thread.start()
    try:
        with pytest.raises(Drained):
            worker.map(fn, threads=2)
    finally:
        release.set()
        let_free_end.set()
        thread.join(30)
    # map ran 'fits' and 'free'; V ran 'other' meanwhile (2 h): 'free' goes back, once
    # 'fits' has ended.
    assert seen == [["claimed"]]
    assert states() == {"fits": "completed", "free": "ready", "other": "completed"}
    assert events("free") == ["claimed", "preempted"]
    assert rows("SELECT sum(failures), sum(kills) FROM tasks") == [(0, 0)]


# -------------------------------------------------------------------- migration
@pytest.mark.sqlite_only
def test_a_schema_4_database_is_upgraded_and_goes_on():
    """tests/data/schema4.sqlite (make_schema4.py): a completed, c failed (d blocked),
    e held by Z, who died; b and f ready. Version 5 adds tasks.runtime and
    workers.allocation_end, both empty."""
    from test_database import schema_of

    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "data", "schema4.sqlite"),
                "g.sqlite")
    graph = [Task("a", fingerprint="a1", priority=2),
             Task("b", dependencies={"a"}, timeout=600), Task("c", resources={"api": 1}),
             Task("d", dependencies={"c"}, requirements={"gpu"}), Task("e"), Task("f")]
    b = make(graph, name="B", clock=FakeClock(1_700_100_000.0), max_failed_retries=1,
             labels={"gpu"}, enable_fingerprints=True)
    assert rows("SELECT value FROM laufband_meta WHERE key = 'schema_version'") == [("5",)]
    assert rows("SELECT count(*) FROM tasks WHERE runtime IS NULL") == [(6,)]
    assert rows("SELECT id, allocation_end, slurm IS NOT NULL FROM workers ORDER BY id") == [
        ("A", None, 1), ("B", None, 0), ("Z", None, 0)]
    beat(b)
    assert sorted(t.id for t in b) == ["b", "c", "d", "e", "f"]
    assert set(states().values()) == {"completed"}
    assert rows("SELECT result FROM attempts WHERE task = 1") == [('{"done":"a"}',)]
    list(make([Task("x")], db="fresh.sqlite"))
    assert schema_of("g.sqlite") == schema_of("fresh.sqlite")


@pytest.mark.sqlite_only
def test_the_new_statements_use_their_indexes():
    from laufband.store.claiming import SQL as CLAIMING

    list(make([Task(str(i), priority=i % 3, runtime=10 if i % 2 else None)
               for i in range(50)]))
    conn = sqlite3.connect("g.sqlite")
    params = {"reqset": 0, "generation": 1, "worker": "w", "limit": 3, "take": 2,
              "estimate": 5.0, "left": 100.0, "lookahead": 1000, "window": 1000}
    try:
        plans = {name: " | ".join(r[3] for r in conn.execute(
            f"EXPLAIN QUERY PLAN {sql}", {k: v for k, v in params.items() if f":{k}" in sql}))
                 for name, sql in (("claim", CLAIMING["find_in_time"]),
                                   ("reach", runtimes.SQL["in_reach"]),
                                   ("recent", runtimes.SQL["recent"]))}
    finally:
        conn.close()
    assert "SEARCH tasks USING INDEX ix_tasks_claim (state=? AND reqset=?)" in plans["claim"]
    assert "SEARCH tasks USING INDEX ix_tasks_claim (state=? AND reqset=?)" in plans["reach"]
    assert "SCAN attempts USING INDEX ix_attempts_ended" in plans["recent"]
    for plan in plans.values():
        assert "TEMP B-TREE" not in plan, plans  # no sort of what was found
        assert "SCAN tasks" not in plan, plans
