"""After something went wrong: fix and rerun (the claiming worker's own retry budget
decides), failure_policy="stop" counting only failures final for every live worker,
shared tasks whose attempts fail or are killed, and what is recorded about failures."""

from __future__ import annotations

import io

import pytest
from helpers import beat, history, live, make, rows, states, url
from test_heartbeat import outlive

from laufband import Task, TaskFailedError
from laufband.cli import open_store, status
from laufband.clock import FakeClock

pytestmark = pytest.mark.backends


CHAIN = [Task("a"), Task("b", dependencies={"a"}), Task("c", dependencies={"b"}), Task("d")]


def fail_at(worker, task_id: str) -> list[str]:
    """Run ``worker``'s loop, leaving it (break) at ``task_id``; the ids it ran."""
    ran = []
    for task in worker:
        ran.append(task.id)
        if task.id == task_id:
            break
    return ran


def test_fix_and_rerun_with_a_larger_budget_runs_the_failed_task_and_its_dependents(caplog):
    assert fail_at(make(CHAIN, name="first"), "a") == ["a"]
    list(make(CHAIN, name="first-again"))  # d; a stays failed under a budget of 0
    assert states() == {"a": "failed", "b": "blocked", "c": "blocked", "d": "completed"}
    with caplog.at_level("WARNING"):
        assert [t.id for t in make(CHAIN, name="zero")] == []  # the same budget: nothing
    assert "1 task(s) of this workflow failed or were killed for good, 2 more" in caplog.text
    assert "LAUFBAND_MAX_FAILED_RETRIES" in caplog.text
    # The fix is in; the rerun's own budget allows another attempt (0.2.1's rule).
    assert [t.id for t in make(CHAIN, name="fixed", max_failed_retries=1)] == ["a", "b", "c"]
    assert set(states().values()) == {"completed"}
    assert [e for e, *_ in history("a")] == [
        "claimed", "failed", "retried", "claimed", "completed"]
    assert [e for e, *_ in history("b")] == ["blocked", "unblocked", "ready", "claimed",
                                             "completed"]
    # It failed once and ran once more: failures are counted across reruns, so a task
    # that keeps failing stops after max_failed_retries + 1 attempts in all.
    assert rows("SELECT attempts, failures FROM tasks WHERE id = 'a'") == [(2, 1)]


def test_a_rerun_whose_budget_is_used_up_leaves_the_task_failed():
    fail_at(make(CHAIN, name="first"), "a")
    fail_at(make(CHAIN, name="second", max_failed_retries=1), "a")  # failures: 2
    assert [t.id for t in make(CHAIN, name="third", max_failed_retries=1)] == ["d"]
    assert states()["a"] == "failed"
    assert [t.id for t in make(CHAIN, name="fourth", max_failed_retries=2)] == [
        "a", "b", "c"]


def test_failure_policy_stop_rerun_raises_only_while_no_budget_allows_a_retry():
    fail_at(make(CHAIN, name="first"), "a")
    with pytest.raises(TaskFailedError, match=r"1 task\(s\).*'a'.*max_failed_retries"):
        list(make(CHAIN, name="same", failure_policy="stop"))
    fixed = make(CHAIN, name="fixed", failure_policy="stop", max_failed_retries=1)
    assert [t.id for t in fixed] == ["a", "d", "b", "c"]


def test_fix_and_rerun_after_a_kill():
    clock = FakeClock()
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30}
    a = make(CHAIN, name="A", max_killed_retries=0, **kw)
    b = make(CHAIN, name="B", max_killed_retries=0, **kw)
    it = iter(a)
    assert next(it).id == "a"  # A dies here (think OOM)
    outlive(clock, b)
    assert states()["a"] == "killed" and states()["b"] == "blocked"
    assert [t.id for t in b] == ["d"]
    assert [t.id for t in make(CHAIN, name="C", max_killed_retries=1, **kw)] == [
        "a", "b", "c"]
    assert rows("SELECT attempts, kills FROM tasks WHERE id = 'a'") == [(2, 1)]


def test_the_default_budget_redoes_the_task_of_a_dead_worker():
    """One crashed node must not block a workflow (max_killed_retries=2 by default)."""
    clock = FakeClock()
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30}
    a, b = make(CHAIN, name="A", **kw), make(CHAIN, name="B", **kw)
    it = iter(a)
    assert next(it).id == "a"
    outlive(clock, b)
    assert [t.id for t in b] == ["a", "d", "b", "c"]
    assert set(states().values()) == {"completed"}


def test_a_task_that_keeps_killing_its_worker_stops_after_three_attempts():
    clock = FakeClock()
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30}
    survivor = make([Task("oom")], name="S", **kw)
    paused = []  # the loops stay suspended (a closed one would record a failure)
    for n in range(3):
        paused.append(iter(make([Task("oom")], name=f"V{n}", **kw)))
        assert next(paused[-1]).id == "oom"
        outlive(clock, survivor)
    assert states() == {"oom": "killed"}
    assert rows("SELECT attempts, kills FROM tasks") == [(3, 3)]
    assert rows("SELECT error FROM attempts WHERE attempt = 3") == [
        ("worker V2 was declared dead by S: no heartbeat for 31 s",)]


def test_a_live_worker_with_a_larger_budget_retries_what_another_failed():
    """A (budget 0) fails t; B (budget 2) is running: B's next step makes t ready again
    and runs it. A, with failure_policy="stop", does not stop: t is not final for B."""
    clock = FakeClock()
    graph = [Task("t"), Task(f"u{0}"), Task("u1"), Task("after", dependencies={"t"})]
    a = make(graph, name="A", clock=clock, failure_policy="stop", batch_size=1)
    b = make(graph, name="B", clock=clock, max_failed_retries=2, batch_size=1)
    ia, ib = iter(a), iter(b)
    assert next(ia).id == "t"
    assert next(ib).id == "u0"
    ia.close()  # A left its loop in t (break): t failed under A's budget
    assert states()["t"] == "failed" and states()["after"] == "blocked"
    assert [t.id for t in ib] == ["t", "u1", "after"]
    assert set(states().values()) == {"completed"}
    a2 = make(graph, name="A2", clock=clock, failure_policy="stop")
    assert list(a2) == []  # nothing failed for good: no error


def test_failure_policy_stop_with_a_killed_task():
    clock = FakeClock()
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30,
          "max_killed_retries": 0}
    graph = [Task(f"t{i}") for i in range(4)]
    dying = iter(make(graph, name="D", **kw))
    assert next(dying).id == "t0"
    stopper = make(graph, name="S", failure_policy="stop", **kw)
    outlive(clock, stopper)  # t0 killed for good: nobody's budget allows a retry
    with pytest.raises(TaskFailedError, match="'t0'"):
        list(stopper)
    assert states()["t1"] == "ready"  # it stopped before claiming anything


@pytest.mark.parametrize("how", ["failed", "killed"])
def test_a_shared_tasks_attempt_ending_badly_frees_only_its_slot(how):
    """Two workers run a task with max_parallel_workers=2; one attempt fails (or its
    worker dies), which uses up the budget (0): no attempt starts in its slot. The
    other attempt goes on and completes the task."""
    clock = FakeClock()
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30,
          "max_killed_retries": 0}
    graph = [Task("wide", max_parallel_workers=2), Task("next", dependencies={"wide"})]
    a, b = make(graph, name="A", **kw), make(graph, name="B", **kw)
    ia, ib = iter(a), iter(b)
    assert next(ia).id == "wide" and next(ib).id == "wide"
    if how == "failed":
        ia.close()
    else:
        clock.advance(20)
        beat(b)
        clock.advance(11)
        beat(b)  # A is dead
    assert rows("SELECT state, running FROM tasks WHERE id = 'wide'") == [("running", 1)]
    assert rows("SELECT failures, kills FROM tasks WHERE id = 'wide'") == [
        (1, 0) if how == "failed" else (0, 1)]
    assert [t.id for t in ib] == ["next"]  # B completes wide, then runs next
    assert set(states().values()) == {"completed"}
    assert live() == 0


@pytest.mark.parametrize("budget", [0, 1])
def test_a_shared_task_that_keeps_failing_is_not_retried_past_the_budget(budget):
    """An attempt of a shared task fails while another runs: within the budget its
    slot is free for a retry (another worker takes it); past the budget no attempt
    starts in it, and the failure of the last one fails the task. (Review26: workers
    that kept taking the freed slot always left an attempt running, and a task that
    always failed was retried thousands of times; its workers never left.)"""
    graph = [Task("wide", max_parallel_workers=2), Task("next", dependencies={"wide"})]
    kw = {"max_failed_retries": budget}
    a, b = make(graph, name="A", **kw), make(graph, name="B", **kw)
    ia, ib = iter(a), iter(b)
    assert next(ia).id == "wide" and next(ib).id == "wide"
    ia.close()  # A's attempt fails
    if budget:
        assert states()["wide"] == "ready"
        ic = iter(make(graph, name="C", **kw))
        assert next(ic).id == "wide"  # the retry, in the free slot
        ic.close()  # fails: the budget is used up now
    assert rows("SELECT state, running FROM tasks WHERE id = 'wide'") == [("running", 1)]
    ib.close()  # the last attempt fails too
    assert states() == {"wide": "failed", "next": "blocked"}
    assert rows("SELECT failures FROM tasks WHERE id = 'wide'") == [(budget + 2,)]
    assert live() == 0


def test_a_held_slot_stays_held_when_another_attempt_ends_within_its_budget():
    """Three slots: A's failure used up the budget (0), so its slot is held. B's worker
    then dies, a kill within the kill budget (1): the slots stay held (no attempt starts
    past the failure budget; review27), and C's failure fails the task."""
    clock = FakeClock()
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30,
          "max_killed_retries": 1}
    graph = [Task("wide", max_parallel_workers=3), Task("next", dependencies={"wide"})]
    a, b, c = (make(graph, name=name, **kw) for name in "ABC")
    ia, ib, ic = iter(a), iter(b), iter(c)
    assert [next(it).id for it in (ia, ib, ic)] == ["wide"] * 3
    ia.close()  # A's attempt fails
    assert rows("SELECT state, running FROM tasks WHERE id = 'wide'") == [("running", 2)]
    clock.advance(20)
    beat(c)
    clock.advance(11)
    beat(c)  # B is dead: its attempt killed, within the kill budget
    assert rows("SELECT state, running, kills FROM tasks WHERE id = 'wide'") == [
        ("running", 1, 1)]
    ic.close()  # the last attempt fails
    assert states() == {"wide": "failed", "next": "blocked"}
    assert live() == 0


def test_both_attempts_of_a_shared_task_failing_fail_it():
    graph = [Task("wide", max_parallel_workers=2), Task("next", dependencies={"wide"})]
    a, b = make(graph, name="A"), make(graph, name="B")
    ia, ib = iter(a), iter(b)
    assert next(ia).id == "wide" and next(ib).id == "wide"
    ia.close()
    ib.close()
    assert states() == {"wide": "failed", "next": "blocked"}


def test_a_task_blocked_by_two_failures_waits_until_both_run_again():
    graph = [Task("x"), Task("y"), Task("z", dependencies={"x", "y"})]
    clock = FakeClock()
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30,
          "max_killed_retries": 0}
    fail_at(make(graph, name="F", **kw), "x")  # x failed
    dying = iter(make(graph, name="D", **kw))
    assert next(dying).id == "y"
    outlive(clock, make(graph, name="S", **kw))  # y killed
    assert states() == {"x": "failed", "y": "killed", "z": "blocked"}
    # A budget for failures only: x runs again, z stays blocked by y.
    assert [t.id for t in make(graph, name="R1", max_failed_retries=1, **kw)] == ["x"]
    assert states() == {"x": "completed", "y": "killed", "z": "blocked"}
    kw["max_killed_retries"] = 1
    assert [t.id for t in make(graph, name="R2", **kw)] == ["y", "z"]


def test_why_a_task_failed_is_recorded():
    """break (or an exception the loop body did not let reach the interpreter): where
    the loop was left. A killed attempt: who declared its worker dead, and why."""
    fail_at(make(CHAIN, name="first"), "a")
    [(outcome, error, trace)] = rows(
        "SELECT outcome, error, traceback FROM attempts WHERE worker = 'first'")
    assert outcome == "failed"
    assert error.startswith("the loop body raised an exception or left the loop (break) at ")
    assert "test_recovery.py:" in error and "in fail_at" in error
    assert trace is None  # only an exception that reaches the interpreter has one


def test_status_groups_failures_by_error():
    graph = [Task("x"), Task("y"), Task("z")]
    for name in ("x", "y", "z"):
        fail_at(make(graph, name=f"w{name}"), name)
    out = io.StringIO()
    status(open_store(url()), out=out)
    text = out.getvalue()
    assert "failed or killed for good, by error:" in text
    assert "     3 x the loop body raised an exception" in text  # one line, same place
    assert "in fail_at  ('x', 'y', 'z')" in text


def test_a_budget_revives_only_tasks_the_worker_may_run():
    """A worker without the labels a failed task needs cannot run it, so it does not
    make it ready (else it would stay ready with nobody to run it, and the next worker
    with the labels would run it although its own budget is 0)."""
    graph = [Task("T", requirements={"gpu"}), Task("D", dependencies={"T"})]
    fail_at(make(graph, name="gpu1", labels={"gpu"}), "T")
    assert list(make(graph, name="cpu", max_failed_retries=3)) == []
    assert states() == {"T": "failed", "D": "blocked"}
    assert list(make(graph, name="gpu2", labels={"gpu"})) == []
    assert states() == {"T": "failed", "D": "blocked"}
    assert [t.id for t in make(graph, name="gpu3", labels={"gpu"}, max_failed_retries=1)
            ] == ["T", "D"]


def test_failure_policy_stop_counts_only_budgets_of_workers_that_may_run_the_task():
    """An idle worker with a large budget but without the labels of the failed task
    cannot run it again: the failure is final, and a stop-policy worker stops."""
    graph = [Task("X", requirements={"gpu"}), Task("Y", requirements={"gpu"})]
    idle = make(graph, name="cpu", max_failed_retries=5)
    stopper = make(graph, name="gpu", labels={"gpu"}, failure_policy="stop", batch_size=1)
    with pytest.raises(RuntimeError, match="X fails"):
        for task in stopper:
            if task.id == "X":
                raise RuntimeError("X fails")
    with pytest.raises(TaskFailedError, match=r"1 task\(s\).*'X'"):
        list(make(graph, name="gpu2", labels={"gpu"}, failure_policy="stop"))
    assert states() == {"X": "failed", "Y": "ready"}
    assert idle.identifier == "cpu"


LOG_ONCE = """
import logging, sys
import laufband
if sys.argv[1] == "app":
    logging.getLogger("laufband").addHandler(logging.StreamHandler(sys.stdout))
logging.getLogger("laufband.store.workers").warning("worker Z missed its heartbeat")
"""


@pytest.mark.parametrize("setup", ["none", "app"])
def test_laufbands_warnings_are_printed_once(setup):
    """Without logging configured, laufband prints its warnings itself (through tqdm,
    so not onto a progress bar's line); with a handler of the application, only that
    handler gets them."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", LOG_ONCE, setup], capture_output=True,
                         text=True, check=True)
    text = out.stdout + out.stderr
    assert text.count("worker Z missed its heartbeat") == 1, text
    assert ("missed" in out.stdout) == (setup == "app")
