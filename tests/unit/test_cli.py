"""The `laufband` command against databases written by real (in-process) workers."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import backends
import pytest
from helpers import beat, make, rows, states

from laufband import Task, cli
from laufband.clock import FakeClock

pytestmark = pytest.mark.backends


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--db", backends.current.url("g.sqlite"), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def failed_run():
    """a -> b -> c, and d; b raises (caught by pytest, so the loop records where it
    was left, not the exception), so c is blocked."""
    worker = make([Task("a"), Task("b", dependencies={"a"}), Task("c", dependencies={"b"}),
                   Task("d")], batch_size=1)
    with pytest.raises(ZeroDivisionError):
        for task in worker:
            if task.id == "b":
                1 / 0  # noqa: B018
    return worker


def test_status_json_is_stable_and_counts_every_state(capsys):
    failed_run()
    code, out, _ = run(capsys, "status", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"cancelled", "total", "counts", "percent", "invalidated",
                         "throughput_per_min", "eta_s", "runtimes_s", "workers", "running",
                         "failures", "starved"}
    assert data["cancelled"] is None
    assert data["total"] == 4
    assert data["counts"] == {"completed": 2, "failed": 1, "blocked": 1}  # a, d; b; c
    assert data["percent"]["completed"] == 50.0
    assert [g["examples"] for g in data["failures"]] == [["b"]]
    assert set(data["throughput_per_min"]) == {"1m", "5m", "15m"}


def test_status_names_tasks_no_live_worker_can_run(capsys):
    worker = make([Task("a", requirements={"gpu"}), Task("b")])
    assert [t.id for t in worker] == ["b"]
    make([Task("a", requirements={"gpu"}), Task("b")], name="idle")  # online, no gpu
    code, out, _ = run(capsys, "status")
    assert code == 0
    assert "waiting for a worker with labels {gpu}: 1 task(s); no live worker has them" \
        in out
    assert all(len(line) <= 80 for line in out.splitlines())


def test_workers_json_and_table(capsys):
    clock = FakeClock()
    worker = make([Task("a"), Task("b")], clock=clock, batch_size=1)
    it = iter(worker)
    next(it)
    clock.advance(5)
    code, out, _ = run(capsys, "workers", "--json")
    [w] = json.loads(out)
    assert w["id"] == "w" and w["state"] == "busy" and w["running"][0]["task"] == "a"
    assert set(w) == {"id", "state", "host", "pid", "labels", "heartbeat_age_s",
                      "heartbeat_expired", "threads", "completed", "slurm", "allocation_end",
                      "allocation_left_s", "running"}
    list(it)
    code, out, _ = run(capsys, "workers")
    assert code == 0 and out.splitlines()[0] == "labels -: 1 worker(s) (1 offline)"
    assert json.loads(run(capsys, "workers", "--json")[1])[0]["completed"] == 2


def test_tasks_filters_and_bad_values(capsys):
    failed_run()
    code, out, _ = run(capsys, "tasks", "--state", "failed", "--json")
    [b] = json.loads(out)
    assert b["id"] == "b" and b["attempts"] == 1 and "left the loop" in b["last_error"]
    # graph order: the roots a and d first (dependencies before dependents)
    assert [r["id"] for r in json.loads(run(capsys, "tasks", "--limit", "2", "--json")[1])] \
        == ["a", "d"]
    code, _, err = run(capsys, "tasks", "--state", "done")
    assert code == 2 and "is not a task state" in err
    code, _, err = run(capsys, "tasks", "--limit", "0")
    assert code == 2 and "--limit 0" in err


def test_tasks_by_label(capsys):
    list(make([Task("a", requirements={"gpu"}), Task("b")], labels={"gpu"}))
    data = json.loads(run(capsys, "tasks", "--label", "gpu", "--json")[1])
    assert [r["id"] for r in data] == ["a"]


def test_explain_shows_waits_labels_attempts_and_errors(capsys):
    failed_run()
    code, out, _ = run(capsys, "explain", "c")
    assert code == 0
    assert "task 'c': blocked" in out and "waits for 1 dependencies: 'b' (failed)" in out
    code, out, _ = run(capsys, "explain", "b")
    assert "attempt 1 on w: failed" in out
    assert "the loop body raised an exception or left the loop" in out
    data = json.loads(run(capsys, "explain", "b", "--json")[1])
    assert data["attempt_list"][0]["outcome"] == "failed"
    assert data["dependents"] == 1
    code, _, err = run(capsys, "explain", "nope")
    assert code == 2 and "No task 'nope'" in err


def test_retry_a_failed_task_then_a_rerun_completes_the_workflow(capsys):
    failed_run()
    code, out, err = run(capsys, "retry", "--failed")  # stdin is not a terminal
    assert code == 1 and "add --yes" in err
    assert states()["b"] == "failed"
    code, out, _ = run(capsys, "retry", "--failed", "--yes")
    assert code == 0 and "will run 1 task(s) again (1 failed): 'b'" in out
    assert "1 blocked task(s) below them" in out
    assert states() == {"a": "completed", "b": "ready", "c": "pending", "d": "completed"}
    assert rows("SELECT failures FROM tasks WHERE id = 'b'") == [(0,)]
    # a worker with the default budget (0) runs it: the budget started again
    assert sorted(t.id for t in make([Task("a"), Task("b", dependencies={"a"}),
                                      Task("c", dependencies={"b"}), Task("d")],
                                     name="again")) == ["b", "c"]
    assert set(states().values()) == {"completed"}


def test_retry_a_blocked_task_retries_what_blocks_it_and_a_killed_one(capsys):
    graph = [Task("a"), Task("b", dependencies={"a"})]
    clock = FakeClock()
    dying = make(graph, name="dying", clock=clock, max_killed_retries=0, batch_size=1,
                 heartbeat_timeout=10, heartbeat_interval=1)
    held = iter(dying)
    next(held)  # holds a, then "dies" (its heartbeat stops)
    dying._session.heartbeat.stop()
    clock.advance(100)
    reaper = make(graph, name="reaper", clock=clock, max_killed_retries=0)
    beat(reaper)
    assert states() == {"a": "killed", "b": "blocked"}
    code, out, _ = run(capsys, "retry", "b", "--yes")
    assert code == 0 and "(1 killed): 'a'" in out
    assert states() == {"a": "ready", "b": "pending"}
    assert rows("SELECT kills FROM tasks WHERE id = 'a'") == [(0,)]
    del held


@pytest.mark.parametrize("argv, message", [
    (["retry"], "retry what?"),
    (["retry", "zz", "--yes"], "No task 'zz'"),
    (["retry", "a", "--yes"], "is completed: only failed, killed or blocked"),
])
def test_retry_refuses_what_it_cannot_do(capsys, argv, message):
    failed_run()
    before = states()
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err
    assert states() == before


@pytest.mark.sqlite_only
def test_version_help_and_default_database(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("laufband 0.")
    list(make([Task("a")], db="graphband.sqlite"))
    monkeypatch.delenv("LAUFBAND_DB", raising=False)
    assert cli.main(["status"]) == 0
    assert "using graphband.sqlite" in capsys.readouterr().err
    list(make([Task("a")], db="laufband.sqlite", name="x"))
    assert cli.main(["status"]) == 2
    assert "Both graphband.sqlite and laufband.sqlite" in capsys.readouterr().err


@pytest.mark.sqlite_only
def test_read_only_commands_work_on_a_read_only_file_and_never_write(capsys):
    failed_run()
    os.chmod("g.sqlite", 0o444)
    before = Path("g.sqlite").read_bytes()
    try:
        for argv in (["status"], ["workers"], ["tasks"], ["explain", "b"], ["results"],
                     ["limits"], ["status", "--json"]):
            code, _, err = run(capsys, *argv)
            assert code == 0, (argv, err)
    finally:
        os.chmod("g.sqlite", 0o644)
    assert Path("g.sqlite").read_bytes() == before


@pytest.mark.sqlite_only
def test_not_a_laufband_database(capsys):
    sqlite3.connect("g.sqlite").execute("CREATE TABLE x (y)")
    code, _, err = run(capsys, "status")
    assert code == 2 and "no laufband schema" in err


def test_cancel_then_a_new_worker_leaves_at_once_and_resume_brings_it_back(capsys):
    graph = [Task("a"), Task("b", dependencies={"a"}), Task("c")]
    make(graph)  # registers the graph: all waiting or ready
    code, out, _ = run(capsys, "cancel", "--drain-timeout", "0")
    assert code == 0
    assert "3 task(s) that had not started are cancelled; 0 running" in out
    assert states() == dict.fromkeys("abc", "cancelled")
    late = make(graph, name="late")
    with pytest.raises(SystemExit) as exc:
        list(late)
    assert exc.value.code == 75
    assert "the workflow was cancelled by laufband cancel" in capsys.readouterr().err
    data = json.loads(run(capsys, "status", "--json")[1])
    assert data["cancelled"]["by"].startswith("laufband cancel")
    code, out, _ = run(capsys, "resume")
    assert code == 0 and "3 cancelled task(s) may run again" in out
    assert states() == {"a": "ready", "b": "pending", "c": "ready"}
    assert sorted(t.id for t in make(graph, name="after")) == ["a", "b", "c"]


def test_cancel_abandons_what_still_runs_after_the_drain(capsys):
    graph = [Task("a"), Task("b")]
    worker = make(graph, batch_size=1)
    it = iter(worker)
    assert next(it).id == "a"  # running in the loop body
    code, out, _ = run(capsys, "cancel", "--drain-timeout", "0")
    assert code == cli.ABANDONED_EXIT
    assert "1 running at the cancel: 0 finished within the drain, 1 abandoned" in out
    assert states() == {"a": "cancelled", "b": "cancelled"}
    with pytest.raises(SystemExit) as exc:
        next(it)  # the body ends: its completion is rejected, and the loop leaves
    assert exc.value.code == 75
    assert rows("SELECT outcome FROM attempts") == [("cancelled",)]
    assert states() == {"a": "cancelled", "b": "cancelled"}


def test_cancel_refuses_a_bad_drain_timeout(capsys):
    make([Task("a")])
    for bad in ("-1", "nan", "inf"):
        code, _, err = run(capsys, "cancel", "--drain-timeout", bad)
        assert code == 2 and "--drain-timeout" in err
    assert states() == {"a": "ready"}


def test_watch_draws_frames_and_refuses_a_bad_interval(capsys):
    failed_run()
    code, out, _ = run(capsys, "watch", "--count", "2", "--interval", "0.01")
    assert code == 0
    assert "2/4 completed" in out and "q or Ctrl-C quits" in out
    assert "left the loop" in out  # the latest failure (pytest caught the exception)
    code, _, err = run(capsys, "watch", "--interval", "0")
    assert code == 2 and "--interval" in err


def test_workers_show_the_slurm_job_they_run_in(capsys, monkeypatch):
    for var, value in (("SLURM_JOB_ID", "1235"), ("SLURM_ARRAY_JOB_ID", "1230"),
                       ("SLURM_ARRAY_TASK_ID", "5"), ("SLURMD_NODENAME", "node7")):
        monkeypatch.setenv(var, value)
    list(make([Task("a")]))
    [w] = json.loads(run(capsys, "workers", "--json")[1])
    assert w["slurm"] == {"job": "1235", "array_job": "1230", "array_task": "5",
                          "node": "node7"}
    assert "(1230_5)" in run(capsys, "workers")[1]


def test_report_writes_a_self_contained_page_and_refuses_other_formats(capsys):
    failed_run()
    code, out, _ = run(capsys, "report", "--output", "out/r.html")
    assert code == 0 and out.strip() == "wrote out/r.html"
    page = Path("out/r.html").read_text()
    assert all(tid in page for tid in ("a", "b", "d")) and "<svg" in page
    assert "http://" not in page.replace("http://www.w3.org", "")  # nothing fetched
    code, _, err = run(capsys, "report", "--output", "r.pdf")
    assert code == 2 and ".html, .png, .svg" in err


def test_a_resume_during_the_drain_is_not_undone_by_the_waiting_cancel():
    worker = make([Task("a"), Task("b")], batch_size=1)
    it = iter(worker)
    next(it)
    store = cli.writable_store(backends.current.url("g.sqlite"))
    flag, stopped, running = store.cancel(60.0, "op")
    assert (stopped, running) == (1, 1)
    store.resume("op")
    assert store.abandon("op", flag) is None  # the cancel's own abandon does nothing
    assert states() == {"a": "running", "b": "ready"}
    assert [t.id for t in it] == ["b"]  # the loop goes on
    assert states() == {"a": "completed", "b": "completed"}


def test_a_workers_own_cancelled_finish_after_a_resume_hands_the_task_back():
    from laufband.states import Event
    from laufband.store import Finish, Want

    worker = make([Task("a")])
    claim = worker._store.step(worker._me, [], Want(1, start=True)).claims[0]
    store = cli.writable_store(backends.current.url("g.sqlite"))
    store.cancel(0.0, "op")
    store.resume("op")
    worker._store.step(worker._me, [Finish(claim, Event.CANCELLED, "drain over")], Want(0))
    assert rows("SELECT outcome FROM attempts") == [("preempted",)]
    assert states() == {"a": "ready"}


def test_a_batch_stops_between_its_tasks_when_the_workflow_is_cancelled(capsys):
    worker = make([Task(f"t{i}") for i in range(5)], batch_size=5)
    it = iter(worker)
    assert next(it).id == "t0"  # the batch holds all five
    cli.writable_store(backends.current.url("g.sqlite")).cancel(60.0, "op")
    with pytest.raises(SystemExit) as exc:
        next(it)  # t0 is recorded; t1..t4 are handed back, not started
    assert exc.value.code == 75
    assert rows("SELECT outcome, count(*) FROM attempts GROUP BY outcome"
                " ORDER BY outcome") == [("completed", 1), ("preempted", 4)]


def test_tasks_a_rerun_adds_under_a_cancel_are_cancelled_too():
    list(make([Task("a")], name="first"))
    cli.writable_store(backends.current.url("g.sqlite")).cancel(0.0, "op")
    with pytest.raises(SystemExit):
        list(make([Task("a"), Task("b")], name="second"))
    assert states() == {"a": "completed", "b": "cancelled"}
