"""Waiting for other workers: polls are reads, and the transaction that finishes the
workflow releases the waiting workers (driven through the store, one process)."""

from __future__ import annotations

import pytest
from helpers import beat, make, rows

from laufband import Task
from laufband.states import Event, WorkerState
from laufband.store import Finish, Want

pytestmark = pytest.mark.backends


OFFLINE, IDLE = WorkerState.OFFLINE, WorkerState.IDLE


def commits() -> bytes:
    """SQLite's file change counter (header bytes 24-27): every commit bumps it."""
    with open("g.sqlite", "rb") as f:
        return f.read(28)[24:]


def worker_row(name: str) -> tuple:
    return rows(f"SELECT state, leave_as, stopped_at IS NOT NULL FROM workers"
                f" WHERE id = '{name}'")[0]


@pytest.fixture
def two():
    """Workers A and B online over the same graph (not iterating: the test steps)."""
    graph = [Task("x"), Task("y", dependencies=["x"])]
    a, b = make(graph, name="A"), make(graph, name="B")
    yield {"A": a, "B": b}
    a.close()
    b.close()


def step(worker, finishes, limit, **want):
    """One store step of ``worker`` (busy= of old: start=)."""
    if "busy" in want:
        want["start"] = want.pop("busy")
    return worker._store.step(worker._me, list(finishes), Want(limit, **want))


def poll(worker, leave):
    return worker._store.poll(worker._me, leave)


@pytest.mark.parametrize("leave", [OFFLINE, IDLE])
@pytest.mark.sqlite_only  # counts SQLite's commits in the file header
def test_last_completion_releases_a_waiting_worker(two, leave):
    w = two
    [x] = step(w["A"], [], 1, busy=True, leave=OFFLINE).claims
    wait = step(w["B"], [], 1, busy=True, leave=leave)
    assert (wait.claims, wait.left) == ([], False)  # y waits for x: B waits
    assert worker_row("B") == ("busy", leave.value, 0)
    # A completes x and claims y in the same step: B keeps waiting
    [y] = step(w["A"], [Finish(x, Event.COMPLETED)], 1, leave=OFFLINE).claims
    assert worker_row("B") == ("busy", leave.value, 0)
    before = commits()
    assert not poll(w["B"], leave).left
    assert commits() == before  # a poll that stays writes nothing
    done = step(w["A"], [Finish(y, Event.COMPLETED)], 1, leave=OFFLINE)
    assert done.left
    assert worker_row("B") == (leave.value, None, leave == OFFLINE)
    before = commits()
    assert poll(w["B"], leave).left
    assert commits() == before  # B leaves without a transaction of its own


def test_a_worker_that_did_not_wait_is_not_released(two):
    w = two
    [x] = step(w["A"], [], 1, busy=True, leave=OFFLINE).claims
    step(w["B"], [], 0, busy=True)  # B looked (a step ahead), not waiting
    [y] = step(w["A"], [Finish(x, Event.COMPLETED)], 1, leave=OFFLINE).claims
    step(w["A"], [Finish(y, Event.COMPLETED)], 1, leave=OFFLINE)
    assert worker_row("A") == ("offline", None, 1)
    assert worker_row("B") == ("busy", None, 0)  # still in its loop: it leaves by itself
    assert poll(w["B"], OFFLINE).left
    assert worker_row("B") == ("offline", None, 1)


def test_a_worker_released_as_idle_starts_its_next_loop_unmarked(two):
    """Context managed: released as idle; its next loop finds nothing to run and ends
    at once, leaving the row idle and unmarked."""
    w = two
    [x] = step(w["A"], [], 1, busy=True, leave=OFFLINE).claims
    step(w["B"], [], 1, busy=True, leave=IDLE)
    [y] = step(w["A"], [Finish(x, Event.COMPLETED)], 1, leave=OFFLINE).claims
    step(w["A"], [Finish(y, Event.COMPLETED)], 1, leave=OFFLINE)
    assert worker_row("B") == ("idle", None, 0)
    again = step(w["B"], [], 1, busy=True, leave=IDLE)
    assert again.left  # nothing left to run: its new loop ends at once
    assert worker_row("B") == ("idle", None, 0)


def test_a_step_ahead_claims_only_while_every_live_worker_finds_a_task():
    """A task claimed ahead waits for the current one to end: with fewer ready tasks
    than live workers it would be held back from a worker that is free now."""
    graph = [Task("x"), Task("y", dependencies=["x"])]
    a, b = make(graph, name="A"), make(graph, name="B")
    w = {"A": a, "B": b}
    # two live workers, one ready task
    assert step(w["A"], [], 1, busy=True, ahead=True).claims == []
    [x] = step(w["A"], [], 1).claims
    b.close()  # now one live worker: x's completion makes y ready, and A may take it
    [y] = step(w["A"], [Finish(x, Event.COMPLETED)], 1, ahead=True).claims
    assert y.id == "y"
    a.close()


def test_a_worker_running_an_attempt_is_not_released():
    """B waited once, then took the second slot of a shared task. A's attempt completes
    the task, after which nothing is unfinished: B, still running its attempt, must stay
    busy with its claim (an offline worker's claims are never reaped)."""
    graph = [Task("x"), Task("s", dependencies=["x"], max_parallel_workers=2)]
    a, b = make(graph, name="A"), make(graph, name="B")
    w = {"A": a, "B": b}
    [x] = step(w["A"], [], 1, busy=True, leave=OFFLINE).claims
    assert not step(w["B"], [], 1, busy=True, leave=OFFLINE).left  # waits
    [sa] = step(w["A"], [Finish(x, Event.COMPLETED)], 1, leave=OFFLINE).claims
    [sb] = step(w["B"], [], 1, leave=OFFLINE).claims
    assert step(w["A"], [Finish(sa, Event.COMPLETED)], 1, leave=OFFLINE).left
    assert worker_row("B")[0] == "busy"
    assert rows("SELECT worker FROM attempts WHERE ended_at IS NULL") == [("B",)]
    # B's attempt ends (released: its sibling completed the task); then B leaves
    assert step(w["B"], [Finish(sb, Event.COMPLETED)], 1, leave=OFFLINE).left
    assert worker_row("B") == ("offline", None, 1)
    assert rows("SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]
    a.close()
    b.close()


def test_a_waiting_worker_of_an_older_graph_sees_a_task_it_may_claim():
    """OLD's graph is {a, b(a)}; NEW's adds c. OLD waited while c (not its generation)
    was ready. NEW claims c and a's completion makes b ready: the number of ready tasks
    is what OLD saw when it began to wait, so the old comparison with that number did
    not see b, and OLD left when c completed although b was ready for it."""
    g1 = [Task("a"), Task("b", dependencies=["a"])]
    old, holder = make(g1, name="OLD"), make(g1, name="H")
    new = make([*g1, Task("c")], name="NEW")
    w = {"OLD": old, "H": holder, "NEW": new}
    [a] = step(w["H"], [], 1, start=True).claims
    waits = step(w["OLD"], [], 1, start=True, leave=OFFLINE)
    assert (waits.claims, waits.left) == ([], False)  # c is ready, but not OLD's
    [c] = step(w["NEW"], [], 1, start=True).claims
    step(w["H"], [Finish(a, Event.COMPLETED)], 0)  # b ready
    seen = poll(w["OLD"], OFFLINE)
    assert seen.claimable and not seen.left
    step(w["NEW"], [Finish(c, Event.COMPLETED)], 0)
    seen = poll(w["OLD"], OFFLINE)
    assert seen.claimable and not seen.left
    assert [t.id for t in old] == ["b"]
    for worker in w.values():
        worker.close()


def test_workers_of_an_older_generation_leave_when_only_newer_tasks_remain():
    """U1 and U2 run graph {x, y}; a rerun (V) added R and D(R) and went away. Neither
    U may claim them: when x and y are done, both leave (before, each counted the newer
    ready task as one the other could run, and both waited forever)."""
    g1 = [Task("x"), Task("y")]
    u1, u2 = make(g1, name="U1"), make(g1, name="U2")
    make([*g1, Task("R"), Task("D", dependencies=["R"])], name="V").close()
    w = {"U1": u1, "U2": u2}
    [x] = step(w["U1"], [], 1, start=True, leave=OFFLINE).claims
    [y] = step(w["U2"], [], 1, start=True, leave=OFFLINE).claims
    # y runs: if it failed, U1 could run it again, so U1 waits.
    assert not step(w["U1"], [Finish(x, Event.COMPLETED)], 1, leave=OFFLINE).left
    assert step(w["U2"], [Finish(y, Event.COMPLETED)], 1, leave=OFFLINE).left
    assert poll(w["U1"], OFFLINE).left
    assert worker_row("U1")[0] == worker_row("U2")[0] == "offline"
    assert rows("SELECT id, state FROM tasks WHERE generation = 2") == [
        ("R", "ready"), ("D", "pending")]


def test_a_waiting_worker_whose_budget_runs_the_last_task_again_is_not_released():
    """X dies holding T; SMALL (no kill budget) reaps it, so T is killed for good under
    SMALL's budget, and no task is unfinished. BIG, waiting, would run T again: the
    transaction must not release it (before, it did, and T stayed killed)."""
    from laufband.clock import FakeClock

    clock = FakeClock()
    graph = [Task("T")]
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30}
    x = iter(make(graph, name="X", max_killed_retries=0, **kw))
    assert next(x).id == "T"
    big = make(graph, name="BIG", max_killed_retries=3, **kw)
    small = make(graph, name="SMALL", max_killed_retries=0, **kw)
    w = {"BIG": big, "SMALL": small}
    assert not step(w["BIG"], [], 1, start=True, leave=OFFLINE).left  # waits for T
    assert not step(w["SMALL"], [], 1, start=True, leave=OFFLINE).left
    for _ in range(2):  # 31 s in which BIG and SMALL beat and X does not
        clock.advance(20 if _ == 0 else 11)
        beat(small)  # the second declares X dead: T killed for good for SMALL
        beat(big)
    assert rows("SELECT state FROM tasks") == [("killed",)]
    assert worker_row("BIG")[0] == "busy"  # not released
    assert poll(w["BIG"], OFFLINE).claimable
    assert [t.id for t in big] == ["T"]
    assert rows("SELECT state FROM tasks") == [("completed",)]


def test_a_waiting_worker_declared_dead_leaves_offline():
    """B waited, was paused past its timeout (declared dead), and resumes after the
    workflow ended: it leaves, and its row says offline (before: dead, or busy)."""
    from test_heartbeat import outlive

    from laufband.clock import FakeClock

    clock = FakeClock()
    graph = [Task("a"), Task("b", dependencies=["a"])]
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30}
    a, b = make(graph, name="A", **kw), make(graph, name="B", **kw)
    w = {"A": a, "B": b}
    [ta] = step(w["A"], [], 1, start=True, leave=OFFLINE).claims
    assert not step(w["B"], [], 1, start=True, leave=OFFLINE).left
    outlive(clock, a)  # B (paused) is declared dead
    assert worker_row("B")[0] == "dead"
    [tb] = step(w["A"], [Finish(ta, Event.COMPLETED)], 1, leave=OFFLINE).claims
    assert step(w["A"], [Finish(tb, Event.COMPLETED)], 1, leave=OFFLINE).left
    assert poll(w["B"], OFFLINE).left  # B resumes
    assert worker_row("B") == ("offline", None, 1)


def test_a_dead_workers_kill_is_charged_to_its_earliest_claim():
    """A holds z (claimed first: it runs) and y (claimed later, ahead of it, with a
    lower key). A dies: z is the kill, y goes back free (before, the lowest key was
    charged: a task that never started was killed, the one that killed the worker not)."""
    from laufband.clock import FakeClock

    clock = FakeClock()
    graph = [Task("x"), Task("y"), Task("z", dependencies=["x"])]
    kw = {"clock": clock, "heartbeat_interval": 10, "heartbeat_timeout": 30,
          "max_killed_retries": 0}
    a, b, c = (make(graph, name=n, **kw) for n in "ABC")
    w = {"A": a, "B": b, "C": c}
    [x] = step(w["B"], [], 1, start=True).claims
    [y] = step(w["C"], [], 1, start=True).claims
    step(w["B"], [Finish(x, Event.COMPLETED)], 0)
    clock.advance(1)
    [z] = step(w["A"], [], 1, start=True).claims
    clock.advance(1)
    step(w["C"], [Finish(y, Event.PREEMPTED)], 0)
    [y2] = step(w["A"], [], 1, ahead=False).claims
    assert (z.id, y2.id) == ("z", "y") and y2.pk < z.pk
    for _ in range(2):  # A goes silent
        clock.advance(20 if _ == 0 else 11)
        beat(b)
        beat(c)
    assert dict(rows("SELECT id, state FROM tasks")) == {
        "x": "completed", "y": "ready", "z": "killed"}


R, P = 1, 2  # two requirement sets


@pytest.mark.parametrize("counts, moves, wakes", [
    # Claims concern no waiting worker.
    ({R: {"ready": 3}}, [("ready", "running")], False),
    # Steady state at the end of the ready tasks: one attempt ends, the last ready
    # task is claimed; others still run.
    ({R: {"ready": 1, "running": 2}}, [("running", "completed"), ("ready", "running")],
     False),
    # The tail of a run: an attempt ends, others still run, nothing is ready.
    ({R: {"running": 2, "completed": 5}}, [("running", "completed")], False),
    # ... but the last running task anywhere ends ...
    ({R: {"running": 1}}, [("running", "completed")], True),
    # ... or the last unfinished task of a requirement set (others run elsewhere).
    ({R: {"running": 1}, P: {"running": 1}}, [("running", "completed")], True),
    # A task becomes ready, or an attempt ends while tasks are ready (it may have
    # held the resources they wait for, or a shared task's slot).
    ({R: {"pending": 1, "running": 1}}, [("pending", "ready")], True),
    ({R: {"running": 2}, P: {"ready": 3}}, [("running", "completed")], True),
    # A task leaves the usual path.
    ({R: {"running": 2}}, [("running", "failed")], True),
    ({R: {"running": 2, "pending": 1}}, [("pending", "blocked")], True),
])
def test_a_step_wakes_the_waiting_workers_only_when_it_concerns_them(counts, moves, wakes):
    """Ledger.wakes: on a server, a worker's step notifies the waiting workers only if
    what it changed may let one of them claim a task or leave (the moves are booked in
    requirement set R)."""
    from laufband.store.ledger import Ledger
    from laufband.store.model import Counts

    worker = make([Task("a")])
    with worker._store.db.read() as conn:
        led = Ledger(conn, 0.0)
        led.counts = Counts({r: dict(by_state) for r, by_state in counts.items()})
        for i, (old, new) in enumerate(moves):
            led.record([(100 + i, R)], old, new, Event.CLAIMED, "A")
        assert led.wakes() is wakes
        led.wake = True  # a worker left: what the live workers can run changed
        assert led.wakes()
    worker.close()


def test_an_ended_attempt_of_a_shared_task_wakes_while_tasks_are_ready():
    """An attempt of a shared task with a free slot ends: the task stays 'ready', the
    counts do not move, but the attempt's resources and slot are free (a waiting
    worker capped by them may claim now). In the tail (nothing ready) it wakes nobody."""
    from laufband.store.ledger import Ledger
    from laufband.store.model import Counts

    worker = make([Task("a")])
    with worker._store.db.read() as conn:
        for counts, wakes in (({R: {"ready": 1, "running": 1}}, True),
                              ({R: {"running": 2}}, False)):
            led = Ledger(conn, 0.0)
            led.counts = Counts(counts)
            assert not led.wakes()
            led.ended = True  # as attempts.py sets it
            assert led.wakes() is wakes
    worker.close()
