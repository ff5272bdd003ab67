"""Real worker processes running tasks concurrently: global resource caps across
processes and thread workers (``worker.map(fn, threads=N)``), failure isolation within
a threaded worker, threaded and plain workers over one DAG, and a threaded worker
SIGKILLed while it holds several live attempts.

Workers are tests/map_worker.py: one JSON line per task body with wall-clock start and
end (time.time(): one host, so stamps of different processes compare), the worker, its
pid and thread, and the attempt.
"""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import pytest
from conftest import assert_dependency_order, assert_exactly_once, peek, query, wait_until
from graphs import build

pytestmark = [pytest.mark.processes, pytest.mark.nfs_locking]

MAP_WORKER = Path(__file__).parent.parent / "map_worker.py"


def start(workers, graph: str, n: int = 1, **options):
    return workers.start(graph, n, script=MAP_WORKER, **options)


def db_of(workers) -> Path:
    return workers.folder / "graph.sqlite"


def identifier_of(proc) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


def max_overlap(records: list[dict]) -> int:
    """The largest number of task bodies running at one instant: a sweep over the
    sorted start/end events, an end before a start at equal times (a body that ended
    when another began did not overlap it)."""
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    running = most = 0
    for _, delta in events:
        running += delta
        most = max(most, running)
    return most


def test_max_overlap_sweep():
    recs = [{"start": 0, "end": 2}, {"start": 1, "end": 3}, {"start": 2, "end": 4},
            {"start": 3, "end": 4}]
    assert max_overlap(recs) == 2  # touching intervals do not overlap
    assert max_overlap([{"start": 0, "end": 5}] * 3) == 3
    assert max_overlap([]) == 0


def assert_all_completed_once(db: Path, ids) -> None:
    """In the database: every task completed by its first and only attempt, whose
    stored result is what the body returned; nothing left live."""
    assert dict(query(db, "SELECT id, state FROM tasks")) == dict.fromkeys(ids, "completed")
    assert query(db, "SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]
    rows = query(db, "SELECT t.id, a.attempt, a.outcome, a.worker, a.result FROM attempts a"
                     " JOIN tasks t ON t.pk = a.task")
    assert sorted(r[0] for r in rows) == sorted(ids), "one attempt per task"
    for tid, attempt, outcome, worker, result in rows:
        assert (attempt, outcome) == (1, "completed"), (tid, attempt, outcome)
        assert json.loads(result) == f"{tid} by {worker}"


def run_capped(workers, n: int, threads: int, cap: int, tasks: int = 60, **options):
    graph = f"flat:{tasks}"
    ids = [t.id for t in build(graph)]
    start(workers, graph, n, threads=threads, cap=cap, sleep=0.05, **options)
    run = workers.wait(timeout=90)
    assert run.returncodes == [0] * n, run.stderr
    assert len(run.exits) == n
    assert_exactly_once(run, ids)
    assert_all_completed_once(db_of(workers), ids)
    # Every recorded attempt is the one the database completed (no stale body).
    assert {r["attempt"] for r in run.records} == {1}
    overlap = max_overlap(run.records)
    assert overlap <= cap, f"{overlap} tasks holding 'res' ran at once; its limit is {cap}"
    # The cap is used, not only respected: with many more slots than the limit and
    # 50 ms tasks, it should reach the cap; >= 2 (not == cap) because on a loaded
    # 2-core machine the workers start one by one and a claim transaction, its commit
    # and the next claim may occasionally not interleave with a third body.
    assert overlap >= 2, f"never more than {overlap} task(s) at once: the cap went unused"
    # The limit is the workflow's, stored once.
    assert query(db_of(workers), "SELECT name, capacity FROM limits") == [("res", cap)]
    return run, overlap


@pytest.mark.parametrize("mode", ["map", "loop"])
def test_cap_holds_across_8_single_thread_processes(workers, mode):
    """8 processes (map with threads=1, or the plain for loop, which claims in batches
    and a step ahead) over 60 tasks that each hold {"res": 1}, limit 3: never more than
    3 bodies at once, whoever runs them."""
    run, _ = run_capped(workers, n=8, threads=1, cap=3, mode=mode)
    assert len({r["pid"] for r in run.records}) >= 2  # the work was shared


def test_cap_holds_across_processes_and_threads(workers):
    """3 processes with 4 threads each (12 slots) over the same tasks, limit 3: the cap
    counts the live attempts of every thread of every process."""
    run_capped(workers, n=3, threads=4, cap=3)


def test_one_process_runs_tasks_on_threads_and_a_failure_fails_that_task_only(workers):
    """threads=8 in one process over 40 tasks of 50 ms: at some instant at least 4 run
    at once (the threads are concurrent); the task that raises is 'failed', every other
    task 'completed', and the process exits 0."""
    ids = [t.id for t in build("flat:40")]
    start(workers, "flat:40", threads=8, sleep=0.05, fail="t7")
    run = workers.wait(timeout=60)
    assert run.returncodes == [0], run.stderr
    assert_exactly_once(run, [i for i in ids if i != "t7"])
    assert [f["failing"] for f in run.failures] == ["t7"]
    assert len({r["pid"] for r in run.records}) == 1
    assert all(r["thread"] == f"laufband-task-{r['id']}" for r in run.records)
    assert max_overlap(run.records) >= 4, "the threads did not run tasks concurrently"
    db = db_of(workers)
    states = dict(query(db, "SELECT id, state FROM tasks"))
    assert states == {i: "failed" if i == "t7" else "completed" for i in ids}
    [(outcome, error)] = query(db, "SELECT a.outcome, a.error FROM attempts a JOIN tasks t"
                                   " ON t.pk = a.task WHERE t.id = 't7'")
    assert outcome == "failed" and "failed on purpose" in error
    assert query(db, "SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]
    [exit_rec] = run.exits
    assert exit_rec["summary"] == {"completed": 39, "failed": 1, "handed_back": 0}


def test_threaded_and_single_thread_workers_share_a_dag_in_dependency_order(workers):
    """Two processes with threads=4, one with map(threads=1) and one plain for loop over
    a 5-layer DAG: every task once, each after its dependencies ended."""
    graph = "layered:5x20"
    tasks = build(graph)
    start(workers, graph, 2, threads=4, sleep=0.02)
    start(workers, graph, threads=1, sleep=0.02)
    start(workers, graph, mode="loop", sleep=0.02)
    run = workers.wait(timeout=90)
    assert run.returncodes == [0] * 4, run.stderr
    assert len(run.exits) == 4
    assert_exactly_once(run, [t.id for t in tasks])
    assert_dependency_order(run, tasks)
    assert_all_completed_once(db_of(workers), [t.id for t in tasks])
    by_pid = {r["pid"] for r in run.records}
    assert len(by_pid) >= 2, "the work was not shared"
    assert max_overlap(run.records) >= 2


def test_sigkill_of_a_threaded_worker_hands_its_running_tasks_to_the_others(workers):
    """A worker with 4 threads is SIGKILLed while it holds >= 3 live attempts. The other
    two (map with threads=1, and a plain loop) declare it dead after its heartbeat
    timeout; all its live attempts are ended; every task completes exactly once (by
    the attempts table: the killed process could not write records of its own)."""
    graph = "flat:40"
    ids = [t.id for t in build(graph)]
    db = db_of(workers)
    env = {"LAUFBAND_HEARTBEAT_INTERVAL": "0.5", "LAUFBAND_HEARTBEAT_TIMEOUT": "2"}
    [victim] = workers.start(graph, script=MAP_WORKER, env=env, threads=4, sleep=0.3)
    others = workers.start(graph, script=MAP_WORKER, env=env, threads=1, sleep=0.3)
    others += workers.start(graph, script=MAP_WORKER, env=env, mode="loop", sleep=0.3)
    victim_id = identifier_of(victim)

    def victim_live() -> int:
        rows = peek(db, "SELECT count(*) FROM attempts WHERE ended_at IS NULL"
                        " AND worker = ?", (victim_id,))
        return rows[0][0] if rows else 0

    wait_until(lambda: victim_live() >= 3, timeout=60, interval=0.01,
               what="the threaded worker holding >= 3 live attempts")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # What it held when it died (it may have claimed more after the read above).
    held = victim_live()
    assert held >= 3
    run = workers.wait(timeout=90)
    assert run.returncodes == [-signal.SIGKILL, 0, 0], run.stderr

    assert dict(query(db, "SELECT id, state FROM tasks")) == dict.fromkeys(ids, "completed")
    completions = query(db, "SELECT t.id, a.attempt, a.worker FROM attempts a JOIN tasks t"
                            " ON t.pk = a.task WHERE a.outcome = 'completed'")
    assert sorted(tid for tid, _, _ in completions) == sorted(ids), "one completion each"
    latest = dict(query(db, "SELECT id, attempts FROM tasks"))
    assert all(attempt == latest[tid] for tid, attempt, _ in completions)
    assert query(db, "SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]
    assert query(db, "SELECT state FROM workers WHERE id = ?", (victim_id,)) == [("dead",)]
    # Its live attempts were ended by its death: one charged as killed, the others
    # handed back; each of those tasks ran again and completed.
    ended = query(db, "SELECT t.id, a.outcome FROM attempts a JOIN tasks t ON t.pk = a.task"
                      " WHERE a.worker = ? AND a.outcome != 'completed'", (victim_id,))
    assert len(ended) == held, ended
    # All of them ran (threads=4, at most 4 live attempts): each is charged a kill.
    assert sorted(outcome for _, outcome in ended) == ["killed"] * held
    redone = {tid: worker for tid, _, worker in completions if tid in dict(ended)}
    assert victim_id not in redone.values()
    # The survivors' own records: none ran a task twice, and each completion they made
    # is a body they recorded (same task, attempt and worker).
    survivors = [r for r in run.records if r["pid"] != victim.pid]
    assert len({r["id"] for r in survivors}) == len(survivors)
    recorded = {(r["id"], r["attempt"], r["worker"]) for r in survivors}
    mine = {c for c in completions if c[2] != victim_id}
    assert mine <= recorded, sorted(mine - recorded)[:5]
    # ... and so is each completion the killed worker made before it died.
    theirs = {c for c in completions if c[2] == victim_id}
    assert theirs <= {(r["id"], r["attempt"], r["worker"]) for r in run.records}


def test_a_task_that_kills_its_threaded_worker_is_charged_for_it(workers):
    """A worker in ``map(threads=N)`` runs every claim it holds, so when it dies each of
    its live attempts is charged to the kill budget (a plain loop charges only the
    earliest: the rest of its batch was not running). Here t1 SIGKILLs its own process
    (what the OOM killer or a crash in C code does) while t0 runs beside it: t1 uses
    up its budget (max_killed_retries=1: two deaths) and is killed for good, and the
    workflow stops restarting it. (t0, which cannot be told apart, is charged too.)"""
    env = {"LAUFBAND_HEARTBEAT_INTERVAL": "0.3", "LAUFBAND_HEARTBEAT_TIMEOUT": "1",
           "LAUFBAND_MAX_KILLED_RETRIES": "1"}
    db = db_of(workers)
    for _ in range(2):  # the next worker reaps the previous one, then claims t0 and t1
        [proc] = workers.start("flat:2", script=MAP_WORKER, env=env, threads=2, sleep=30,
                               die="t1")
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, workers.stderr_of(proc)
    # The third worker reaps the second and finds nothing left it may run.
    [proc] = workers.start("flat:2", script=MAP_WORKER, env=env, threads=2, sleep=30,
                           die="t1")
    proc.wait(timeout=60)
    assert proc.returncode == 0, workers.stderr_of(proc)
    outcomes = query(db, "SELECT t.id, a.attempt, a.outcome FROM attempts a JOIN tasks t"
                         " ON t.pk = a.task WHERE a.outcome IS NOT NULL"
                         " ORDER BY a.attempt, t.id")
    assert len(outcomes) == 4, outcomes  # t0 and t1 ended in each of the first two
    kills = dict(query(db, "SELECT id, kills FROM tasks"))
    states = dict(query(db, "SELECT id, state FROM tasks"))
    assert kills == {"t0": 2, "t1": 2}, (kills, outcomes)
    assert states == {"t0": "killed", "t1": "killed"}, (states, outcomes)
    assert sorted(o for *_, o in outcomes) == ["killed"] * 4


def test_sigterm_of_a_threaded_worker_hands_its_running_tasks_back_at_once(workers):
    """SIGTERM while 4 threads run: the worker stops claiming, records what finished,
    hands its running tasks back (preempted: no retry used) and exits 143; another
    worker takes them at once (no heartbeat timeout: the default 60 s here) and the
    workflow completes, each task exactly once."""
    graph = "flat:24"
    ids = [t.id for t in build(graph)]
    db = db_of(workers)
    [victim] = workers.start(graph, script=MAP_WORKER, threads=4, sleep=1.0)
    victim_id = identifier_of(victim)

    def victim_live() -> int:
        rows = peek(db, "SELECT count(*) FROM attempts WHERE ended_at IS NULL"
                        " AND worker = ?", (victim_id,))
        return rows[0][0] if rows else 0

    wait_until(lambda: victim_live() == 4, timeout=60, what="4 tasks running on threads")
    victim.send_signal(signal.SIGTERM)
    assert victim.wait(timeout=30) == 128 + signal.SIGTERM, workers.stderr_of(victim)
    assert "laufband: SIGTERM received: " in workers.stderr_of(victim)
    assert victim_live() == 0  # nothing stranded: handed back on its way out
    handed = query(db, "SELECT count(*) FROM attempts WHERE worker = ?"
                       " AND outcome = 'preempted'", (victim_id,))[0][0]
    assert handed >= 1
    assert query(db, "SELECT state FROM workers WHERE id = ?", (victim_id,)) == [
        ("offline",)]
    workers.start(graph, script=MAP_WORKER, threads=4, sleep=0.01)
    run = workers.wait(timeout=60)
    assert run.returncodes[1:] == [0]
    assert dict(query(db, "SELECT id, state FROM tasks")) == dict.fromkeys(ids, "completed")
    done = query(db, "SELECT t.id FROM attempts a JOIN tasks t ON t.pk = a.task"
                     " WHERE a.outcome = 'completed'")
    assert sorted(tid for (tid,) in done) == sorted(ids)  # each exactly once
    assert query(db, "SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]
    assert query(db, "SELECT sum(kills) + sum(failures) FROM tasks") == [(0,)]
