"""Batched claiming: adaptive size, fair share, and hand-back of unstarted claims."""

from __future__ import annotations

from helpers import flat_worker, history, live, make, rows, states
from test_heartbeat import outlive

from laufband import Task
from laufband.batching import MAX_BATCH, Batcher
from laufband.clock import FakeClock


def test_auto_batch_starts_at_one_and_grows_only_for_short_tasks():
    b = Batcher(None)
    assert b.size() == 1
    b.observe_step(0.002)
    b.observe_task(0.00001)  # tasks 200x shorter than a transaction
    assert b.size() == MAX_BATCH
    slow = Batcher(None)
    slow.observe_step(0.002)
    slow.observe_task(0.5)  # long tasks: one claim per transaction
    assert slow.size() == 1


def test_batch_keeps_deferred_work_short():
    b = Batcher(None)
    b.observe_step(1.0)  # very slow transactions (say, a bad NFS)
    b.observe_task(0.05)
    assert b.size() == 5  # 5 x 50 ms = MAX_DEFERRAL, not 4 * 1.0 / 0.05 = 80


def test_fixed_batch_size():
    assert Batcher(10).size() == 10


def test_claim_takes_at_most_a_fair_share_of_ready_tasks():
    others = [flat_worker(range(40), name=f"idle{i}") for i in range(3)]  # 4 live workers
    worker = flat_worker(range(40), name="greedy", batch_size=64)
    it = iter(worker)
    next(it)
    claimed = live("greedy")
    assert claimed == 10  # 40 ready / 4 live workers
    # The others are live (they count for the share) and hold nothing.
    assert rows("SELECT count(*) FROM workers WHERE state IN ('idle', 'busy')") == [(4,)]
    assert [live(w.identifier) for w in others] == [0, 0, 0]
    assert rows("SELECT count(*) FROM tasks WHERE state = 'ready'") == [(30,)]


def test_close_mid_batch_records_completed_and_returns_unstarted():
    worker = flat_worker(range(20), batch_size=8)
    seen = []
    for item in worker:
        seen.append(item)
        if item == 2:
            worker.close()
    assert seen == [0, 1, 2]
    s = states()
    assert [s[str(i)] for i in range(3)] == ["completed"] * 3
    assert all(s[str(i)] == "ready" for i in range(3, 20))
    assert rows("SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]
    assert rows("SELECT count(*) FROM events WHERE event = 'preempted'") == [(5,)]


def test_exception_mid_batch_fails_only_the_current_task():
    worker = flat_worker(range(20), batch_size=8)
    try:
        for item in worker:
            if item == 3:
                raise KeyError(item)
    except KeyError:
        pass
    s = states()
    assert [s[str(i)] for i in range(5)] == ["completed"] * 3 + ["failed", "ready"]
    assert rows("SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]


def test_free_batch_is_what_runs_within_one_transaction():
    b = Batcher(None)
    assert b.free() == 1  # nothing observed yet
    b.observe_step(0.003)
    b.observe_task(0.0005)
    assert b.free() == 6
    b.observe_task(10.0)
    assert Batcher(None).free() == 1 and b.free() == 1


def test_fair_share_never_drops_below_the_free_batch():
    others = [flat_worker(range(40), name=f"idle{i}") for i in range(7)]  # 8 live workers
    worker = flat_worker(range(40), name="fast", batch_size=64)
    worker._batcher.observe_step(0.004)
    worker._batcher.observe_task(0.0002)  # 20 tasks fit in one transaction's time
    it = iter(worker)
    next(it)
    claimed = live("fast")
    assert claimed == 20  # not 40 // 8 = 5
    assert rows("SELECT count(*) FROM workers WHERE state IN ('idle', 'busy')") == [(8,)]
    assert sum(live(w.identifier) for w in others) == 0


def test_dependent_of_two_tasks_completed_in_one_step_is_released_once():
    tasks = [Task("a"), Task("b"), Task("c", dependencies={"a", "b"})]
    worker = make(tasks, batch_size=2)
    it = iter(worker)
    assert {next(it).id, next(it).id} == {"a", "b"}  # one claim of two
    assert states()["c"] == "pending"
    assert next(it).id == "c"  # both completions recorded in one step released it
    assert rows("SELECT waiting_on FROM tasks WHERE id = 'c'") == [(0,)]
    assert [e for e, *_ in history("c")].count("ready") == 1
    assert list(it) == []


def test_completions_of_a_batch_taken_away_are_all_fenced():
    clock = FakeClock()
    tasks = [Task(str(i)) for i in range(3)]
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30,
          "max_killed_retries": 1}
    a = make(tasks, name="A", batch_size=3, **kw)
    it = iter(a)
    assert next(it).id == "0"  # A holds the batch 0, 1, 2 (alone: all of it) and pauses
    assert rows("SELECT count(*) FROM attempts WHERE ended_at IS NULL AND worker = 'A'") == [(3,)]
    b = make(tasks, name="B", **kw)
    outlive(clock, b)  # B declares A dead: the batch goes back to ready
    assert sorted(t.id for t in b) == ["0", "1", "2"]  # B redoes all three
    assert [t.id for t in it] == ["1", "2"]  # A wakes up and runs the rest of its batch
    # A's three late completions, recorded in one step, are all rejected.
    assert rows("SELECT count(*) FROM events WHERE event = 'fenced' AND worker = 'A'") == [(3,)]
    assert set(states().values()) == {"completed"}
    assert rows("SELECT count(*) FROM events WHERE event = 'completed' AND worker = 'A'") == [(0,)]
