"""Dead workers are found by heartbeat age (injected clock) and their attempts fenced."""

from __future__ import annotations

from helpers import history, make, rows, states

from laufband import Task
from laufband.clock import FakeClock


def two_workers(clock, **kw):
    tasks = [Task("a"), Task("b", dependencies={"a"})]
    a = make(tasks, name="A", clock=clock, heartbeat_interval=10, heartbeat_timeout=30, **kw)
    b = make(tasks, name="B", clock=clock, heartbeat_interval=10, heartbeat_timeout=30, **kw)
    return a, b


def test_silent_worker_is_declared_dead_and_its_task_killed():
    clock = FakeClock()
    a, b = two_workers(clock)
    it = iter(a)
    assert next(it).id == "a"
    clock.advance(20)
    b._heartbeat.beat()
    assert states()["a"] == "running"  # 20 s < timeout: still alive
    clock.advance(15)
    b._heartbeat.beat()
    assert dict(rows("SELECT id, state FROM workers"))["A"] == "dead"
    assert states() == {"a": "killed", "b": "blocked"}
    assert history("a")[-1][:3] == ("killed", "killed", "A")


def test_killed_task_is_retried_and_late_completion_is_fenced():
    clock = FakeClock()
    a, b = two_workers(clock, max_killed_retries=1)
    it_a = iter(a)
    assert next(it_a).id == "a"  # A pauses here (think SIGSTOP)
    clock.advance(31)
    b._heartbeat.beat()  # B declares A dead: "a" goes back to ready (1 retry)
    assert states()["a"] == "ready"
    assert [t.id for t in b] == ["a", "b"]  # B redoes it, then its dependent
    # A wakes up and reports completion of its stale attempt: rejected, recorded.
    assert list(it_a) == []
    events = history("a")
    assert [e for e, *_ in events] == ["claimed", "killed", "claimed", "completed", "fenced"]
    assert [e[3] for e in events] == [1, 1, 2, 2, 1]
    assert rows("SELECT count(*) FROM events WHERE event = 'completed'") == [(2,)]  # a, b


def test_dead_worker_id_can_be_reused_at_once():
    clock = FakeClock()
    a, _b = two_workers(clock)
    paused = iter(a)
    assert next(paused).id == "a"
    clock.advance(31)
    again = make([Task("a"), Task("b", dependencies={"a"})], name="A", clock=clock)
    assert again.identifier == "A"
    assert states()["a"] == "killed"  # the old incarnation's attempt was ended


def test_worker_that_was_declared_dead_revives_on_its_next_beat():
    clock = FakeClock()
    a, b = two_workers(clock)
    clock.advance(31)
    b._heartbeat.beat()
    assert dict(rows("SELECT id, state FROM workers"))["A"] == "dead"
    a._heartbeat.beat()
    assert dict(rows("SELECT id, state FROM workers"))["A"] == "busy"
