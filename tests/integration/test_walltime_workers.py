"""Walltime awareness with real worker processes: a worker whose allocation ends soon
(SLURM_JOB_END_TIME in its environment; the real SLURM daemons are tested elsewhere)
leaves a task declared longer than its time to a worker with more; SIGUSR1 drains a
worker (the loop and worker.map): a running task that fits finishes, one that does not
is handed back at once, and the worker exits with code 0 while others do the rest.

A task "does not fit" once the worker learns (at a heartbeat) that tasks of its kind
take longer than it has left: here another worker, in this process and on a clock of
its own, completes one in 2 h.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import FAST, FAULT_WORKER, Faults, assert_exactly_once, query, wait_until
from graphs import build

from laufband import Graphband
from laufband.clock import FakeClock

pytestmark = pytest.mark.processes

MAP_WORKER = Path(__file__).parent.parent / "map_worker.py"
#: Not inside a SLURM job (also when the tests run in one): no limit.
NO_SLURM = {"SLURM_JOB_END_TIME": "", "SLURM_JOB_ID": ""}


def ends_in(seconds: float, margin: float) -> dict[str, str]:
    return {"SLURM_JOB_END_TIME": str(int(time.time() + seconds)), "SLURM_JOB_ID": "",
            "LAUFBAND_WALLTIME_MARGIN": str(margin)}


def identifier_of(proc) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


def exited(proc, timeout: float = 30) -> int:
    wait_until(lambda: proc.poll() is not None, timeout=timeout, what=f"pid {proc.pid} exits")
    return proc.returncode


def events(db: Path, task: str) -> list[tuple[str, int, str]]:
    return query(db, "SELECT event, attempt, worker FROM events JOIN tasks"
                 " ON tasks.pk = events.task WHERE tasks.id = ? ORDER BY events.id", (task,))


def completions(db: Path) -> list[str]:
    return sorted(tid for (tid,) in query(db, "SELECT tasks.id FROM events JOIN tasks"
                                          " ON tasks.pk = events.task"
                                          " WHERE event = 'completed'"))


def learn_tasks_take_2_hours(db: Path, graph: str, monkeypatch) -> float:
    """Another worker (here, on a clock of its own) claims one ready task and completes
    it 2 h later by its clock: the estimate for tasks of that kind. Returns when (real
    time) that was recorded."""
    for var in NO_SLURM:
        monkeypatch.delenv(var, raising=False)
    clock = FakeClock(time.time())
    other = Graphband(build(graph), db=f"sqlite:///{db}", identifier="elsewhere", clock=clock,
                      tqdm_kwargs={"disable": True}, heartbeat_interval=3600,
                      heartbeat_timeout=7200, batch_size=1)
    for _ in other:
        clock.advance(7200)
        other.close()
    return time.time()


def beat_after(db: Path, worker: str, stamp: float) -> None:
    """Wait for a heartbeat of ``worker`` after ``stamp``: it read the estimates anew."""
    wait_until(lambda: query(db, "SELECT heartbeat FROM workers WHERE id = ?",
                             (worker,))[0][0] > stamp, timeout=30, what=f"a beat of {worker}")


def test_a_worker_whose_allocation_ends_soon_leaves_a_long_task_to_one_with_more_time(
        workers):
    db = workers.folder / "graph.sqlite"
    [a] = workers.start("timed", env=ends_in(120, margin=10))  # 110 s: not for 'long'
    assert exited(a, timeout=60) == 0, workers.stderr_of(a)
    a_id = identifier_of(a)
    assert events(db, "long") == []  # never claimed by A: still ready for others
    assert "needs more time than its allocation has" in workers.stderr_of(a)
    assert "exit code 0" in workers.stderr_of(a)
    assert query(db, "SELECT allocation_end IS NOT NULL FROM workers WHERE id = ?",
                 (a_id,)) == [(1,)]
    [b] = workers.start("timed", env=NO_SLURM)
    run = workers.wait(timeout=60)
    assert run.returncodes == [0, 0], run.stderr
    assert_exactly_once(run, [t.id for t in build("timed")])
    by_task = run.by_task()
    assert by_task["long"][0]["pid"] == b.pid
    assert {r["pid"] for tid, recs in by_task.items() if tid != "long" for r in recs} \
        == {a.pid}
    assert [e[0] for e in events(db, "long")] == ["claimed", "completed"]


def test_sigusr1_lets_the_loop_finish_a_task_that_fits_then_exits_0(workers):
    faults = Faults(workers, "flat:4", LAUFBAND_HEARTBEAT_TIMEOUT="60",
                    LAUFBAND_BATCH_SIZE="1", **NO_SLURM)
    [a] = faults.start(hold="t0")
    wait_until(lambda: faults.started("t0"), what="A inside t0")
    a.send_signal(signal.SIGUSR1)  # no limit known: t0 fits, it goes on
    faults.release()
    assert exited(a) == 0, workers.stderr_of(a)
    a_id = identifier_of(a)
    assert faults.events("t0") == [("claimed", 1, a_id), ("completed", 1, a_id)]
    faults.start()
    run = workers.wait(timeout=60)
    assert run.returncodes == [0, 0], run.stderr
    assert "laufband: SIGUSR1 received: worker" in run.stderr[0]
    assert "stops claiming and exits (exit code 0)" in run.stderr[0]
    assert "Traceback" not in run.stderr[0]
    for task in ("t1", "t2", "t3"):  # A claimed nothing after the signal
        assert a_id not in {w for *_, w in faults.events(task)}
    assert faults.worker_state(a_id) == "offline"
    faults.assert_consistent()


def test_sigusr1_hands_back_at_once_a_task_that_does_not_fit(workers, monkeypatch):
    faults = Faults(workers, "flat:3", LAUFBAND_BATCH_SIZE="1", **ends_in(3600, margin=60))
    [a] = faults.start(hold="t0")
    wait_until(lambda: faults.started("t0"), what="A inside t0")  # no estimate: no limit
    a_id = identifier_of(a)
    learned = learn_tasks_take_2_hours(faults.db, "flat:3", monkeypatch)  # it runs t1
    (faults.effects / "done" / "t1@1").touch()  # its side effect
    beat_after(faults.db, a_id, learned)
    a.send_signal(signal.SIGUSR1)  # t0 would take 2 h; A has 59 min
    wait_until(lambda: faults.events("t0")[1:] == [("preempted", 1, a_id)], timeout=10,
               interval=0.01, what="t0 handed back at once")
    assert exited(a) == 0, workers.stderr_of(a)
    assert "task 't0' was handed back to other workers" in workers.stderr_of(a)
    workers.start("flat:3", script=FAULT_WORKER, env={**FAST, **NO_SLURM},
                  effects=faults.effects)
    run = workers.wait(timeout=60)
    assert run.returncodes == [0, 0], run.stderr
    assert [e[:2] for e in faults.events("t0")] == [
        ("claimed", 1), ("preempted", 1), ("claimed", 2), ("completed", 2)]
    assert query(faults.db, "SELECT error FROM attempts WHERE task = 1 AND attempt = 1") \
        == [("SIGUSR1 received: not expected to finish in the time left",)]
    # No retry used, nothing killed.
    assert query(faults.db, "SELECT sum(failures), sum(kills) FROM tasks") == [(0, 0)]
    faults.assert_consistent()


def test_sigusr1_lets_map_finish_what_fits(workers):
    db = workers.folder / "graph.sqlite"
    [a] = workers.start("flat:4", script=MAP_WORKER, threads=2, hold="t0,t1", env=NO_SLURM)
    wait_until(lambda: len(list((workers.folder / "started").glob("*"))) == 2
               if (workers.folder / "started").exists() else False, what="A runs t0, t1")
    a.send_signal(signal.SIGUSR1)
    (workers.folder / "release").touch()
    assert exited(a) == 0, workers.stderr_of(a)
    workers.start("flat:4", script=MAP_WORKER, threads=2, env=NO_SLURM)
    run = workers.wait(timeout=60)
    assert run.returncodes == [0, 0], run.stderr
    assert "laufband: SIGUSR1 received: worker" in run.stderr[0]
    assert_exactly_once(run, [f"t{i}" for i in range(4)])
    by_task = run.by_task()
    assert {by_task[t][0]["pid"] for t in ("t0", "t1")} == {a.pid}
    assert completions(db) == ["t0", "t1", "t2", "t3"]


def test_sigusr1_makes_map_hand_back_at_once_what_does_not_fit(workers, monkeypatch):
    db = workers.folder / "graph.sqlite"
    [a] = workers.start("flat:4", script=MAP_WORKER, threads=2, hold="t0,t1",
                        env={**FAST, **ends_in(3600, margin=60)})
    wait_until(lambda: len(list((workers.folder / "started").glob("*"))) == 2
               if (workers.folder / "started").exists() else False, what="A runs t0, t1")
    a_id = identifier_of(a)
    learned = learn_tasks_take_2_hours(db, "flat:4", monkeypatch)  # it runs t2
    beat_after(db, a_id, learned)
    a.send_signal(signal.SIGUSR1)
    for task in ("t0", "t1"):
        wait_until(lambda task=task: events(db, task)[1:] == [("preempted", 1, a_id)],
                   timeout=10, interval=0.01, what=f"{task} handed back at once")
    assert exited(a) == 0, workers.stderr_of(a)  # its threads still wait: daemon threads
    assert "2 task(s) handed back to other workers" in workers.stderr_of(a)
    workers.start("flat:4", script=MAP_WORKER, threads=2, env=NO_SLURM)
    run = workers.wait(timeout=60)
    assert run.returncodes == [0, 0], run.stderr
    assert_exactly_once(run, ["t0", "t1", "t3"])  # t2: by the worker in this process
    assert completions(db) == ["t0", "t1", "t2", "t3"]
    assert query(db, "SELECT sum(failures), sum(kills) FROM tasks") == [(0, 0)]
