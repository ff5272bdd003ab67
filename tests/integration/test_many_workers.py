"""Real worker processes over one SQLite file: exactly once, in dependency order."""

from __future__ import annotations

import pytest
from conftest import (
    assert_dependency_order,
    assert_exactly_once,
    peek,
    query,
    wait_until,
    waiting_workers,
)
from graphs import build

from laufband.batching import MAX_DEFERRAL

pytestmark = [pytest.mark.processes, pytest.mark.backends, pytest.mark.nfs_locking]


def complete_graph(workers, graph: str, n: int, env: dict | None = None, **options):
    """Run ``n`` workers over ``graph``: all exit 0 on their own, every task ran exactly
    once, each after its dependencies finished."""
    tasks = build(graph)
    workers.start(graph, n, env=env, **options)
    run = workers.wait()
    assert run.returncodes == [0] * n, run.stderr
    assert_exactly_once(run, [t.id for t in tasks])
    assert_dependency_order(run, tasks)
    assert len(run.exits) == n  # every worker left its loop on its own
    assert query(workers.folder / "graph.sqlite",  # ... and is marked so
                 "SELECT state, leave_as, stopped_at IS NOT NULL FROM workers") == [
        ("offline", None, 1)] * n
    return run


def test_flat_2000_tasks_8_workers_each_exactly_once(workers):
    # 5 ms tasks: 10 s for one worker alone, so the others, which start later on a busy
    # machine, find work (trivial tasks in batches of up to 256: the first one could
    # finish all 2,000 before the second one began)
    run = complete_graph(workers, "flat:2000", 8, sleep=0.005)
    assert len({r["worker"] for r in run.records}) > 1  # the work was actually shared


def test_the_last_completion_releases_the_waiting_workers(workers):
    """Workers that ran out of tasks wait while others run the last ones; the
    transaction of the last completion marks them offline (the end of a run costs one
    write, not one per worker). 9 tasks on 4 workers: at least three wait at the end,
    and the released ones carry that transaction's timestamp, not one of their own."""
    complete_graph(workers, "flat:9", 4, sleep=0.3)
    stops = [at for (at,) in query(workers.folder / "graph.sqlite",
                                   "SELECT stopped_at FROM workers")]
    assert len(set(stops)) < len(stops), stops


def test_layered_dag_1000_tasks_8_workers_in_dependency_order(workers):
    complete_graph(workers, "layered:10x100", 8)


def test_wide_fan_in_dag_of_trivial_tasks_8_workers(workers):
    """Trivial tasks in batches, 12 dependencies each: on PostgreSQL steps run side by
    side, completing dependencies of the same tasks at the same time. The step whose
    completion brings a task's waits to zero makes it ready, once; the counts match."""
    complete_graph(workers, "layered:8x60x12", 8)
    db = workers.folder / "graph.sqlite"
    assert query(db, "SELECT task FROM events WHERE event = 'ready'"
                     " GROUP BY task HAVING count(*) > 1") == []
    assert query(db, "SELECT state, sum(n) FROM counts WHERE n != 0 GROUP BY state") == [
        ("completed", 480)]


def test_history_stamps_follow_dependency_order(workers):
    """Tasks one at a time, 2 ms each, 10 dependencies each: no attempt's recorded
    start precedes a dependency's recorded end, and no 'claimed' event its 'ready'
    event (on PostgreSQL a step beside others may claim a task that a step begun after
    it made ready: its claim must carry a time read after it found the task)."""
    complete_graph(workers, "layered:6x40x10", 8, env={"LAUFBAND_BATCH_SIZE": "1"},
                   sleep=0.002)
    db = workers.folder / "graph.sqlite"
    assert query(db, "SELECT count(*) FROM edges e JOIN attempts t ON t.task = e.task"
                     " JOIN attempts d ON d.task = e.dep WHERE d.outcome = 'completed'"
                     " AND t.started_at < d.ended_at") == [(0,)]
    assert query(db, "SELECT count(*) FROM events r JOIN events c ON c.task = r.task"
                     " WHERE r.event = 'ready' AND c.event = 'claimed' AND c.at < r.at") == [
        (0,)]


@pytest.mark.sqlite_only
def test_layered_dag_with_short_tasks_in_wal_mode(workers):
    """WAL: commits change the -wal file, not the database, which waiting workers watch
    too; 5 ms tasks make the workers step ahead (claim while a task runs)."""
    complete_graph(workers, "layered:6x20", 4, env={"LAUFBAND_JOURNAL_MODE": "wal"},
                   sleep=0.005)
    assert query(workers.folder / "graph.sqlite", "PRAGMA journal_mode") == [("wal",)]


def test_chain_of_50_with_4_workers_completes(workers):
    """Workers wait for each other instead of leaving while the chain is unfinished."""
    complete_graph(workers, "chain:50", 4)


def test_labels_route_tasks_and_unrunnable_tasks_do_not_hang(workers):
    tasks = build("labelled")
    # after_tpu waits for a tpu task no worker can run: every worker waits label_wait
    # for a tpu worker, then leaves it pending and says so.
    env = {"LAUFBAND_LABEL_WAIT": "1"}
    workers.start("labelled", 2, labels="cpu", env=env)
    # A worker cannot know about workers that have not started yet: let the cpu workers
    # register so the gpu workers know someone will run the cpu tasks they wait for.
    db = workers.folder / "graph.sqlite"
    wait_until(lambda: len(peek(db, "SELECT id FROM workers") or []) == 2,
               what="cpu workers")
    workers.start("labelled", 2, labels="gpu", env=env)
    run = workers.wait()
    assert run.returncodes == [0] * 4, run.stderr
    assert all("within label_wait (1 s)" in err for err in run.stderr), run.stderr
    assert query(db, "SELECT state FROM tasks WHERE id = 'after_tpu'") == [("pending",)]
    runnable = [t.id for t in tasks if t.id not in ("tpu", "after_tpu")]
    assert_exactly_once(run, runnable)
    assert_dependency_order(run, [t for t in tasks if t.id in runnable])
    for rec in run.records:
        kind = rec["id"].rstrip("0123456789")
        if kind in ("cpu", "gpu"):
            assert rec["labels"] == [kind], rec


def test_a_later_stage_started_first_waits_for_the_earlier_stage(workers):
    """The job arrays of a pipeline's stages start in the scheduler's order: gpu
    workers that start while no cpu worker lives wait (label_wait) instead of leaving
    at once with nothing done, and run the gpu tasks once cpu workers came."""
    tasks = build("stages:20")
    db = workers.folder / "graph.sqlite"
    workers.start("stages:20", 2, labels="gpu", sleep=0.01)
    # Both gpu workers wait (a waiting worker's row names the state it leaves in)...
    wait_until(lambda: waiting_workers(db) == 2, what="gpu workers waiting")
    # ... and are still there once the cpu workers register, long after their first look.
    workers.start("stages:20", 2, labels="cpu", sleep=0.01)
    run = workers.wait()
    assert run.returncodes == [0] * 4, run.stderr
    assert_exactly_once(run, [t.id for t in tasks])
    assert_dependency_order(run, tasks)
    gpu = [r for r in run.records if r["id"].startswith("gpu")]
    assert {tuple(r["labels"]) for r in gpu} == {("gpu",)}
    assert sum("labels no live worker has" in err for err in run.stderr[:2]) == 2, run.stderr


def test_a_stage_nobody_starts_is_left_after_label_wait(workers):
    """No cpu worker ever comes: the gpu worker waits label_wait, then leaves (exit 0)
    with the gpu tasks pending, and says why."""
    workers.start("stages:3", 1, labels="gpu", env={"LAUFBAND_LABEL_WAIT": "2"})
    run = workers.wait()
    assert run.returncodes == [0], run.stderr
    assert run.records == []
    [err] = run.stderr
    assert "waits up to 2 s for a worker" in err and "within label_wait (2 s)" in err
    db = workers.folder / "graph.sqlite"
    assert query(db, "SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state") == [
        ("pending", 3), ("ready", 3)]
    [(started, stopped)] = query(db, "SELECT started_at, stopped_at FROM workers")
    assert stopped - started >= 2.0


def test_shared_task_runs_on_max_parallel_workers_at_once(workers):
    # Each runner of "wide" waits until 3 runners arrived: it only passes if 3 workers
    # really hold the task at the same time.
    workers.start("shared", 3, barrier="wide", barrier_size=3)
    run = workers.wait(timeout=90)
    assert run.returncodes == [0] * 3, run.stderr
    wide = run.by_task()["wide"]
    assert len({r["pid"] for r in wide}) == 3
    others = {k: v for k, v in run.by_task().items() if k != "wide"}
    assert all(len(v) == 1 for v in others.values()) and len(others) == 5


def test_failure_policy_stop_stops_every_worker(workers):
    # t3 raises in whichever worker gets it; the other workers must stop with a clear
    # error instead of finishing the remaining (slow) tasks.
    workers.start("flat:400", 3, fail="t3", sleep=0.02, failure_policy="stop")
    run = workers.wait()
    assert all(code != 0 for code in run.returncodes), run.returncodes
    assert sum("TaskFailedError" in err for err in run.stderr) == 2, run.stderr
    assert sum("failed on purpose" in err for err in run.stderr) == 1
    [failing] = run.failures
    # The others stop at their next step: what they started after t3 failed is at most
    # the rest of a batch (MAX_DEFERRAL of 20 ms tasks) and one claimed ahead, each.
    per_batch = int(MAX_DEFERRAL / 0.02) + 2
    later: dict[str, int] = {}
    for rec in run.records:
        if rec["start"] > failing["at"]:
            later[rec["worker"]] = later.get(rec["worker"], 0) + 1
    assert all(n <= per_batch for n in later.values()), later
    assert len(run.records) <= 3 + 2 * per_batch + len([r for r in run.records
                                                        if r["start"] < failing["at"]])
    assert len(run.records) < 200  # most of the 400 tasks never ran


def test_failure_policy_continue_lets_others_finish(workers):
    workers.start("flat:60", 3, fail="t3")
    run = workers.wait()
    assert sorted(code != 0 for code in run.returncodes) == [False, False, True]
    assert_exactly_once(run, [f"t{i}" for i in range(60) if i != 3])
