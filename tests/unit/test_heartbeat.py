"""Dead workers are found by heartbeat age (injected clock) and their attempts fenced."""

from __future__ import annotations

import sqlite3

import pytest
from helpers import beat, history, live, make, rows, states

from laufband import Task
from laufband.clock import FakeClock

pytestmark = pytest.mark.backends



def two_workers(clock, **kw):
    """A and B over a -> b; a task whose worker dies is killed for good unless the test
    gives max_killed_retries (the default, 2, is tested on its own)."""
    kw.setdefault("max_killed_retries", 0)
    tasks = [Task("a"), Task("b", dependencies={"a"})]
    a = make(tasks, name="A", clock=clock, heartbeat_interval=10, heartbeat_timeout=30, **kw)
    b = make(tasks, name="B", clock=clock, heartbeat_interval=10, heartbeat_timeout=30, **kw)
    return a, b


def outlive(clock, live):
    """Let 31 s pass (past the 30 s timeout) while ``live`` beats as a live worker does,
    so its last beat declares the silent ones dead."""
    clock.advance(20)
    beat(live)
    clock.advance(11)
    beat(live)


def test_silent_worker_is_declared_dead_and_its_task_killed():
    clock = FakeClock()
    a, b = two_workers(clock)
    it = iter(a)
    assert next(it).id == "a"
    clock.advance(20)
    beat(b)
    assert states()["a"] == "running"  # 20 s < timeout: still alive
    clock.advance(15)
    beat(b)
    assert dict(rows("SELECT id, state FROM workers"))["A"] == "dead"
    assert states() == {"a": "killed", "b": "blocked"}
    assert history("a")[-1][:3] == ("killed", "killed", "A")


def test_killed_task_is_retried_and_late_completion_is_fenced():
    clock = FakeClock()
    a, b = two_workers(clock, max_killed_retries=1)
    it_a = iter(a)
    assert next(it_a).id == "a"  # A pauses here (think SIGSTOP)
    outlive(clock, b)  # B declares A dead: "a" goes back to ready (1 retry)
    assert states()["a"] == "ready"
    assert [t.id for t in b] == ["a", "b"]  # B redoes it, then its dependent
    # A wakes up and reports completion of its stale attempt: rejected, recorded.
    assert list(it_a) == []
    events = history("a")
    assert [e for e, *_ in events] == ["claimed", "killed", "claimed", "completed", "fenced"]
    assert [e[3] for e in events] == [1, 1, 2, 2, 1]
    assert rows("SELECT count(*) FROM events WHERE event = 'completed'") == [(2,)]  # a, b


def test_a_stale_attempt_recorded_with_the_live_one_of_its_task_is_fenced():
    """W runs x; paused past its timeout, it is declared dead (x killed, ready again);
    back, it claims x again while its first attempt still runs, and one step records
    both completions: the stale attempt is fenced, x is completed once, the counts
    stay in step (review22: the attempt number was dropped, x was completed twice and
    'running' counted -1)."""
    from helpers import url

    from laufband.states import Event
    from laufband.store import Store
    from laufband.store.model import Finish, Me, Want, WorkerInfo
    from laufband.task import read_graph

    clock = FakeClock()
    store = Store(url(), Store.writers_lock(url(), 60), clock)
    gen = None
    for name in ("W", "P"):
        store.register_worker(WorkerInfo(name, "h", 1, frozenset(), 10.0, max_killed=1),
                              lambda host, pid: False)
        gen = gen or store.register_graph(read_graph([Task("x"), Task("z")]), name)
    me = Me("W", [], gen, max_killed=1)
    store.reqsets_for(me, frozenset())
    [first] = store.step(me, [], Want(limit=1, start=True)).claims
    clock.advance(31)
    store.heartbeat("P", budget=1, stalled_after=100.0)  # P declares W dead
    assert states()["x"] == "ready"
    [again] = store.step(me, [], Want(limit=1)).claims
    assert (again.id, again.attempt) == ("x", 2)
    store.step(me, [Finish(first, Event.COMPLETED), Finish(again, Event.COMPLETED)],
               Want(limit=0))
    assert [(*e[:2], e[3]) for e in history("x")] == [
        ("claimed", "running", 1), ("killed", "ready", 1), ("claimed", "running", 2),
        ("fenced", None, 1), ("completed", "completed", 2)]
    assert rows("SELECT completed FROM workers WHERE id = 'W'") == [(1,)]
    counted = {s: n for s, n in rows("SELECT state, sum(n) FROM counts GROUP BY state") if n}
    assert counted == dict(rows("SELECT state, count(*) FROM tasks GROUP BY state"))


def test_dead_worker_id_can_be_reused_at_once():
    clock = FakeClock()
    a, _b = two_workers(clock)
    paused = iter(a)
    assert next(paused).id == "a"
    clock.advance(31)
    again = make([Task("a"), Task("b", dependencies={"a"})], name="A", clock=clock,
                 max_killed_retries=0)
    assert again.identifier == "A"
    assert states()["a"] == "killed"  # the old incarnation's attempt was ended


def test_worker_that_was_declared_dead_revives_on_its_next_beat():
    clock = FakeClock()
    a, b = two_workers(clock)
    outlive(clock, b)
    assert dict(rows("SELECT id, state FROM workers"))["A"] == "dead"
    beat(a)
    assert dict(rows("SELECT id, state FROM workers"))["A"] == "busy"


def test_worker_that_was_stalled_itself_judges_nobody_on_that_beat():
    """Everyone stalled (a dead lock holder, a file system hang): the first beat after
    it must not declare the others dead; they get one interval to beat again."""
    clock = FakeClock()
    a, b = two_workers(clock)
    it = iter(a)
    assert next(it).id == "a"
    clock.advance(100)  # nobody could beat for 100 s (timeout 30 s)
    beat(b)
    assert dict(rows("SELECT id, state FROM workers"))["A"] == "busy"
    beat(a)
    clock.advance(10)
    beat(b)
    assert dict(rows("SELECT id, state FROM workers"))["A"] == "busy"
    assert states()["a"] == "running"
    assert [t.id for t in it] == ["b"]


def test_stall_delays_detection_of_a_dead_worker_by_one_beat():
    clock = FakeClock()
    a, b = two_workers(clock)
    paused = iter(a)
    assert next(paused).id == "a"
    clock.advance(100)
    beat(b)  # B was stalled: judges nobody
    assert dict(rows("SELECT id, state FROM workers"))["A"] == "busy"
    clock.advance(10)
    beat(b)  # A did not beat in the meantime: dead
    assert dict(rows("SELECT id, state FROM workers"))["A"] == "dead"
    assert states()["a"] == "killed"


def test_clock_skew_of_a_few_seconds_is_tolerated():
    """Stamps are compared across hosts: A's clock runs 5 s behind B's. With a timeout
    large compared with the skew (30 s here, 60 s by default), A stays alive."""
    a_clock, b_clock = FakeClock(1_000_000.0 - 5), FakeClock(1_000_000.0)
    tasks = [Task("a"), Task("b", dependencies={"a"})]
    a = make(tasks, name="A", clock=a_clock, heartbeat_interval=10, heartbeat_timeout=30)
    b = make(tasks, name="B", clock=b_clock, heartbeat_interval=10, heartbeat_timeout=30)
    it = iter(a)
    assert next(it).id == "a"
    for _ in range(6):  # a minute of regular beats
        for clock in (a_clock, b_clock):
            clock.advance(10)
        beat(a)
        beat(b)
    assert dict(rows("SELECT id, state FROM workers"))["A"] == "busy"
    assert states()["a"] == "running"


def test_dead_worker_with_a_batch_is_charged_one_kill():
    clock = FakeClock()
    tasks = [Task(f"t{i}") for i in range(8)]
    opts = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30,
            "max_killed_retries": 0}
    a = make(tasks, name="A", batch_size=4, **opts)
    b = make(tasks, name="B", **opts)
    it = iter(a)
    assert next(it).id == "t0"  # A holds a batch of 4 claims (fair share: 8 / 2)
    assert rows("SELECT count(*) FROM attempts WHERE ended_at IS NULL AND worker = 'A'") == [(4,)]
    outlive(clock, b)  # A is dead (max_killed_retries=0)
    s = states()
    assert s["t0"] == "killed"  # the first of the batch is charged
    assert [s[f"t{i}"] for i in range(1, 4)] == ["ready"] * 3  # the rest go back free
    assert [e for e, *_ in history("t1")] == ["claimed", "preempted"]
    assert sorted(t.id for t in b) == [f"t{i}" for i in range(1, 8)]


def test_a_worker_declared_dead_beats_before_it_claims_again():
    """A was paused past its timeout and declared dead; it wakes up and its loop steps
    before its heartbeat thread revives it. It may claim, but only after renewing its
    heartbeat in that transaction, so if it dies now its new claim is reaped (the old
    code left the claim with a row marked dead, which nobody reaped: a hang)."""
    clock = FakeClock()
    tasks = [Task(f"t{i}") for i in range(3)]
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30,
          "batch_size": 1}
    a, b = make(tasks, name="A", **kw), make(tasks, name="B", **kw)
    it = iter(a)
    assert next(it).id == "t0"  # A pauses inside t0
    outlive(clock, b)
    assert dict(rows("SELECT id, state FROM workers"))["A"] == "dead"
    assert next(it).id == "t0"  # A wakes: t0 attempt 1 is fenced; it claims t0 again
    assert rows("SELECT state, heartbeat FROM workers WHERE id = 'A'") == [
        ("busy", clock.now())]
    assert live("A") == 1
    outlive(clock, b)  # A dies for good
    assert live("A") == 0
    assert sorted(t.id for t in b) == ["t0", "t1", "t2"]
    assert set(states().values()) == {"completed"}


@pytest.mark.parametrize("state", ["dead", "offline"])
@pytest.mark.sqlite_only
def test_claims_are_reaped_whatever_their_holders_row_says(state):
    clock = FakeClock()
    tasks = [Task("t0"), Task("t1")]
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30,
          "batch_size": 1}
    a, b = make(tasks, name="A", **kw), make(tasks, name="B", **kw)
    it = iter(a)
    assert next(it).id == "t0"
    conn = sqlite3.connect("g.sqlite")  # what older versions could leave behind
    conn.execute(f"UPDATE workers SET state = '{state}' WHERE id = 'A'")
    conn.commit()
    conn.close()
    outlive(clock, b)
    assert live("A") == 0
    assert rows("SELECT outcome FROM attempts WHERE worker = 'A'") == [("killed",)]
    assert sorted(t.id for t in b) == ["t0", "t1"]
