"""Fault injection with real processes and real signals: SIGKILL at random instants,
SIGSTOP past the heartbeat timeout, stop signals mid-task and mid-store-call, and a
worker killed inside a write transaction while it holds the database lock.

Workers are tests/fault_worker.py: every task body leaves one side-effect file per
(task, attempt), created with O_EXCL, so a double commit of one attempt is caught.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import sqlite3
import time
from pathlib import Path

import backends
import pytest
from conftest import Faults, peek, query, wait_until
from graphs import build

pytestmark = [pytest.mark.processes, pytest.mark.backends, pytest.mark.nfs_locking]


def identifier_of(proc) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


def completed(faults) -> int:
    return faults.state_counts().get("completed", 0)


def test_torture_sigkill_random_workers(workers):
    """8 workers over a 500-task DAG; a driver SIGKILLs a random worker after every 5 to
    15 completions and starts a replacement. Everything completes once per attempt,
    nothing twice, in dependency order (from what the workers recorded)."""
    # Batches of 4: a killed worker holds several claims, all of which must come back.
    faults = Faults(workers, "layered:5x100", LAUFBAND_MAX_KILLED_RETRIES="1000",
                    LAUFBAND_LOCK_LIFETIME="1", LAUFBAND_BATCH_SIZE="4")
    live = faults.start(8, sleep=0.04)
    rng = random.Random(4)
    kills = 0
    wait_until(lambda: completed(faults) > 0, what="first completion")
    while kills < 25 and completed(faults) < 500:
        target = min(500, completed(faults) + rng.randint(5, 15))
        wait_until(lambda n=target: completed(faults) >= n, what=f"{target} completions")
        running = [p for p in live if p.poll() is None]
        if not running:
            break
        kill_and_replace(faults, live, rng.choice(running), sleep=0.04)
        kills += 1
    run = workers.wait(timeout=150)
    assert kills >= 10, f"the workflow finished after only {kills} kills: too few to test"
    assert_killed_and_consistent(faults, run, kills)
    # A dead worker's batch: one attempt charged as killed, the rest handed back free.
    deaths = query(faults.db, "SELECT sum(CASE WHEN event = 'killed' THEN 1 ELSE 0 END),"
                   " count(*) FROM events WHERE event IN ('killed', 'preempted')"
                   " GROUP BY worker, at")
    assert all(killed == 1 for killed, _ in deaths), deaths
    assert any(n > 1 for _, n in deaths), "no dead worker held several claims: batches untested"
    # Dependency order, from the workers' own records (one host: monotonic_ns agree):
    # the body of each task's completing attempt started after the bodies of the
    # completing attempts of its dependencies ended.
    latest = dict(query(faults.db, "SELECT id, attempts FROM tasks"))
    body = {tid: next(r for r in recs if r["attempt"] == latest[tid])
            for tid, recs in run.by_task().items()}
    for task in build(faults.graph):
        for dep in task.dependencies:
            assert body[dep]["end"] <= body[task.id]["start"], (task.id, dep)
    # One attempt at a time (max_parallel_workers=1): two bodies of a task overlapped
    # only if the earlier attempt's worker had been declared dead (killed) meanwhile.
    killed = set(query(faults.db, "SELECT tasks.id, events.attempt FROM events JOIN tasks"
                       " ON tasks.pk = events.task WHERE event = 'killed'"))
    for tid, recs in run.by_task().items():
        recs.sort(key=lambda r: r["attempt"])
        for i, first in enumerate(recs):
            for later in recs[i + 1:]:
                if later["start"] < first["end"]:
                    assert (tid, first["attempt"]) in killed, (first, later)


def test_one_kill_9_with_the_default_settings_does_not_block_the_workflow(workers):
    """Three workers, default retry budgets; the one running the head of a chain is
    SIGKILLed. Its task runs again once it is declared dead, and everything completes
    (before, the default budget of 0 left it killed and everything downstream blocked)."""
    faults = Faults(workers, "chain:20")
    [a] = faults.start(hold="c0")
    wait_until(lambda: faults.started("c0"), what="A inside c0")
    a.send_signal(signal.SIGKILL)
    a.wait()
    # Only now: A polls for the release file, and must not finish c0 before the kill.
    faults.release()  # for the attempt that redoes c0
    others = faults.start(2)
    run = workers.wait(timeout=60)
    assert run.returncodes == [-signal.SIGKILL, 0, 0], run.stderr
    assert all(p.returncode == 0 for p in others)
    assert query(faults.db, "SELECT attempts, kills FROM tasks WHERE id = 'c0'") == [(2, 1)]
    faults.assert_consistent()


def test_paused_past_the_timeout_resumed_and_killed_at_once_strands_nothing(workers):
    """A worker is stopped until declared dead, resumed, and killed a few ms later:
    perhaps after its loop claimed again, perhaps before. Repeated with a fresh worker
    each time: the workflow completes, no claim stays with a dead worker, every worker
    ends (before, a claim made while the row said dead was never reaped: a hang)."""
    # Each round charges a kill, perhaps to the same task: budgets are not the point here.
    faults = Faults(workers, "layered:4x50", LAUFBAND_LOCK_LIFETIME="1",
                    LAUFBAND_MAX_KILLED_RETRIES="100")
    live = faults.start(3, sleep=0.2)
    rng = random.Random(7)
    rounds = 0
    while rounds < 4 and completed(faults) < 150:
        victim = wait_until(lambda procs=live: holding_a_claim(faults, procs),
                            what="a worker at work")
        victim.send_signal(signal.SIGSTOP)
        if inside_a_transaction(faults.db, victim):
            # Paused inside SQLite's write lock, or a read's: nobody can commit until it
            # resumes (the README's "not covered" case; on PostgreSQL until the server
            # ends its transaction, after a minute). Let it go on, pause another moment.
            victim.send_signal(signal.SIGCONT)
            continue
        try:
            wait_until(lambda v=victim: faults.worker_state(identifier_of(v)) == "dead",
                       timeout=30, what="the stopped worker declared dead")
        finally:
            victim.send_signal(signal.SIGCONT)
        time.sleep(rng.uniform(0, 0.02))  # the instant of the kill, not a synchronisation
        kill_and_replace(faults, live, victim, sleep=0.2)
        rounds += 1
    run = workers.wait(timeout=150)
    assert rounds >= 3, f"only {rounds} rounds before the workflow ended"
    assert_killed_and_consistent(faults, run, rounds)


def kill_and_replace(faults, live: list, victim, sleep: float) -> None:
    """SIGKILL ``victim`` (one of ``live``) and start a fresh worker in its place."""
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    live.remove(victim)
    live += faults.start(1, sleep=sleep)


def assert_killed_and_consistent(faults, run, kills: int) -> None:
    """The victims died by SIGKILL; every other worker finished its loop normally; the
    workflow completed once per task with nothing left claimed."""
    assert run.returncodes.count(-signal.SIGKILL) == kills
    assert set(run.returncodes) == {0, -signal.SIGKILL}, run.stderr
    faults.assert_consistent()


def inside_a_transaction(db, proc) -> bool:
    """Does the (stopped) process ``proc`` hold one of SQLite's locks on ``db``: its
    write lock, or the shared lock of a read (a commit waits for every reader to let
    go)? (An exclusive lock taken and given back at once; a live holder lets go within
    the 2 s.) On PostgreSQL: does it have a transaction open (it holds row locks
    others wait for)?"""
    if not backends.current.sqlite:
        return query(db, "SELECT count(*) FROM pg_stat_activity WHERE application_name"
                     " = ? AND xact_start IS NOT NULL", (f"laufband pid {proc.pid}",)
                     ) != [(0,)]

    conn = sqlite3.connect(db, timeout=2, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        conn.close()


def holding_a_claim(faults, procs):
    """A running worker process that holds a live attempt, if any."""
    rows = peek(faults.db, "SELECT DISTINCT worker FROM attempts WHERE ended_at IS NULL")
    holders = {w for (w,) in rows or []}
    return next((p for p in procs if p.poll() is None and identifier_of(p) in holders), None)


def test_paused_worker_is_declared_dead_and_its_late_completion_fenced(workers):
    faults = Faults(workers, "flat:3", LAUFBAND_MAX_KILLED_RETRIES="1")
    [a] = faults.start(hold="t0")
    wait_until(lambda: faults.started("t0"), what="A inside t0")
    a_id = identifier_of(a)
    a.send_signal(signal.SIGSTOP)
    try:
        faults.start()  # B: declares A dead after its heartbeat timeout, redoes t0
        wait_until(lambda: ("completed", 2) in [e[:2] for e in faults.events("t0")],
                   timeout=30, what="t0 redone as attempt 2")
        assert faults.worker_state(a_id) == "dead"
        faults.release()
    finally:
        a.send_signal(signal.SIGCONT)
    run = workers.wait(timeout=60)
    assert run.returncodes == [0, 0], run.stderr
    # A finished the body of attempt 1 (its side effect exists) but its completion
    # was rejected and recorded as fenced; the task completed once, by attempt 2.
    b_id = next(e[2] for e in faults.events("t0") if e[:2] == ("claimed", 2))
    assert faults.events("t0") == [("claimed", 1, a_id), ("killed", 1, a_id),
                                   ("claimed", 2, b_id), ("completed", 2, b_id),
                                   ("fenced", 1, a_id)]
    assert "t0@1" in {p.name for p in (faults.effects / "done").iterdir()}
    assert "attempt 1: completed by" in run.stderr[0] and "no longer current" in run.stderr[0]
    faults.assert_consistent()


# SIGUSR1 drains instead of stopping at once: test_walltime_workers.py.
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stop_signal_mid_task_hands_it_back_at_once(workers, sig):
    # A heartbeat timeout of 60 s: a redo within seconds can only be the hand-back.
    # Batches of 3: A holds t0 and has claimed t1 and t2 with it; B gets t3.
    faults = Faults(workers, "flat:4", LAUFBAND_HEARTBEAT_TIMEOUT="60",
                    LAUFBAND_BATCH_SIZE="3")
    [a] = faults.start(hold="t0")
    wait_until(lambda: faults.started("t0"), what="A inside t0")
    [b] = faults.start()
    wait_until(lambda: ("completed", 1) in [e[:2] for e in faults.events("t3")],
               what="B done with t3 and waiting for A's tasks")
    a.send_signal(sig)
    # Within 10 s, far below the heartbeat timeout of 60 s: only a hand-back does it.
    wait_until(lambda: ("claimed", 2) in [e[:2] for e in faults.events("t0")], timeout=10,
               interval=0.01, what="t0 claimed again")
    run = workers.wait(timeout=30)
    # Documented exit code 128 + signal number; a clear message.
    assert run.returncodes == [128 + sig, 0], run.stderr
    assert f"{sig.name} received: task 't0' was handed back" in run.stderr[0]
    assert "Traceback" not in run.stderr[0]
    a_id = identifier_of(a)
    for task in ("t0", "t1", "t2"):  # the running task and the rest of A's batch
        assert faults.events(task)[:2] == [("claimed", 1, a_id), ("preempted", 1, a_id)]
    for task in ("t1", "t2"):  # never started by A; run once, as attempt 2, by B
        assert faults.started(task) == [f"{task}@2@{b.pid}"]
    assert faults.worker_state(a_id) == "offline"
    # Preemption used no retry budget (both are 0 here) and nothing was killed.
    assert query(faults.db, "SELECT sum(failures), sum(kills) FROM tasks") == [(0, 0)]
    assert b.returncode == 0
    faults.assert_consistent()


def test_stop_signal_during_a_store_call_starts_no_task(workers):
    """A signal that arrives while the worker is in its own claim step (not in user
    code) must not let it start the task it just claimed: hand it back and stop."""
    faults = Faults(workers, "flat:3", LAUFBAND_HEARTBEAT_TIMEOUT="60")
    [a] = faults.start(stall_after_step=1)
    wait_until(lambda: list(faults.effects.glob("stepped.*")), what="A inside its claim")
    a.send_signal(signal.SIGTERM)
    a.wait(timeout=30)
    assert a.returncode == 128 + signal.SIGTERM, workers.stderr_of(a)
    assert not faults.started("t0"), "A ran a task after SIGTERM"
    a_id = identifier_of(a)
    assert faults.events("t0") == [("claimed", 1, a_id), ("preempted", 1, a_id)]
    assert faults.worker_state(a_id) == "offline"
    faults.start()
    run = workers.wait(timeout=30)
    assert run.returncodes == [143, 0], run.stderr
    faults.assert_consistent()


def test_stop_signal_while_waiting_exits_promptly(workers):
    faults = Faults(workers, "flat:2", LAUFBAND_HEARTBEAT_TIMEOUT="60")
    faults.start(hold="t0")
    wait_until(lambda: faults.started("t0"), what="A inside t0")
    [b] = faults.start()
    wait_until(lambda: ("completed", 1) in [e[:2] for e in faults.events("t1")],
               what="B waiting for t0")
    b.send_signal(signal.SIGTERM)
    b.wait(timeout=10)
    assert b.returncode == 128 + signal.SIGTERM
    assert "SIGTERM received: worker" in workers.stderr_of(b)
    assert faults.worker_state(identifier_of(b)) == "offline"
    faults.release()
    assert workers.wait(timeout=30).returncodes == [0, 143]
    faults.assert_consistent()


def advisory_holders(faults) -> list[int]:
    """PostgreSQL: the server processes (pids) that hold laufband's advisory lock."""
    return [pid for (pid,) in query(faults.db, "SELECT pid FROM pg_locks WHERE"
                                    " locktype = 'advisory' AND granted AND database ="
                                    " (SELECT oid FROM pg_database"
                                    " WHERE datname = current_database())")]


def test_sigkill_inside_a_write_transaction_holding_the_lock(workers):
    """A dies in the middle of a write (after its statements, before COMMIT) holding
    the database lock: the journal undoes its writes and the others break the lock
    after its lifetime and finish the workflow. (PostgreSQL: the server rolls A's
    transaction back and drops its advisory lock as A's connections close.)"""
    faults = Faults(workers, "layered:3x20", LAUFBAND_MAX_KILLED_RETRIES="1",
                    LAUFBAND_LOCK_LIFETIME="1")
    others = faults.start(2, sleep=0.1)
    wait_until(lambda: faults.live_claims() > 0, what="the others at work")
    # A's 3rd loop transaction: registration, first claim, then a step that records
    # the completion of A's first task and claims more. It hangs before its COMMIT.
    [a] = faults.start(hang_in_write=3, sleep=0.1)
    wait_until(lambda: list(faults.effects.glob("hanging.*")), what="A inside its write")
    a_id = identifier_of(a)
    [first] = _records(workers, a)
    if backends.current.sqlite:
        assert Path(f"{faults.db}-journal").exists()  # the transaction is really open
    else:
        # Its transaction is open (idle for longer than any other worker's between two
        # statements), and holds the writers' lock: in shared mode (a step whose
        # attempt completed), beside the steps of the others.
        hung = "SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction'" \
               " AND state_change < now() - interval '1 second'" \
               " AND datname = current_database()"
        wait_until(lambda: len(query(faults.db, hung)) == 1, what="A's open transaction")
        [(pid,)] = query(faults.db, hung)
        assert pid in advisory_holders(faults)
    a.send_signal(signal.SIGKILL)
    a.wait()
    wait_until(lambda: completed(faults) == 60, timeout=60,
               what="the others finish the workflow")
    run = workers.wait(timeout=30)
    assert run.returncodes == [0, 0, -signal.SIGKILL], run.stderr
    if backends.current.sqlite:
        assert any("breaking" in err for err in run.stderr[:2]), "the dead lock was broken"
    # A's completion of its first task was rolled back with the rest of the
    # transaction: the task was redone by the others as attempt 2.
    # (A task of a later layer starts with the 'ready' event of whoever finished its
    # last dependency; A's claim is the first event of an attempt.)
    events = [e for e in faults.events(first["id"]) if e[0] != "ready"]
    assert events[0] == ("claimed", 1, a_id)
    assert ("completed", 1, a_id) not in events
    assert ("completed", 2) in [e[:2] for e in events]
    assert all(p.returncode == 0 for p in others)
    # The others waited for the lock longer (1 + 5 s) than their heartbeat timeout
    # (3 s), unable to beat: that must not make them declare each other dead.
    assert query(faults.db, "SELECT DISTINCT worker FROM events WHERE event IN"
                 " ('killed', 'fenced')") == [(a_id,)]
    assert [state for (state,) in query(faults.db, "SELECT state FROM workers")
            ].count("dead") == 1
    faults.assert_consistent()


def _records(workers, proc) -> list[dict]:
    out = workers.outs[workers.procs.index(proc)]
    return [json.loads(line) for line in out.read_text().splitlines()
            if "exit" not in json.loads(line)]


@pytest.mark.parametrize("interval", [10, 1], ids=["heartbeat-idle", "heartbeat-blocked"])
def test_live_worker_keeps_a_long_held_lock(workers, interval):
    """A legitimate hold longer than the lock lifetime (a slow file system, a huge
    transaction) is kept alive by the holder's heartbeat thread: nobody breaks it.
    With a 10 s interval the thread refreshes between beats; with 1 s it soon blocks in
    a beat, waiting for the lock, and refreshes while it waits.
    (Breaking a dead holder's lock: test_sigkill_inside_a_write_transaction...)"""
    lifetime = 1.0
    faults = Faults(workers, "flat:5", LAUFBAND_LOCK_LIFETIME=str(lifetime),
                    LAUFBAND_HEARTBEAT_INTERVAL=str(interval),
                    LAUFBAND_HEARTBEAT_TIMEOUT=str(3 * interval))
    [a] = faults.start(hang_in_write=2)
    wait_until(lambda: list(faults.effects.glob("hanging.*")), what="A inside its write")
    if not backends.current.sqlite:
        # The server ends a lock connection idle for longer than the lifetime unless
        # the holder's heartbeat thread refreshes it.
        [holder] = advisory_holders(faults)
        held = time.monotonic()
        [b] = faults.start()
        wait_until(lambda: time.monotonic() - held > lifetime + 5 + 1, timeout=30,
                   interval=0.1, what="a hold outlasting lifetime + 5 s")
        assert advisory_holders(faults) == [holder], "a live holder's lock was dropped"
        assert a.poll() is None and b.poll() is None, workers.stderr_of(b)  # B waits
        assert query(faults.db, "SELECT count(*) FROM workers") == [(1,)]  # B never got in
        return
    lockfile = Path(f"{faults.db}.lock")
    holder = lockfile.read_text()
    [b] = faults.start()
    # B breaks a lock whose expiry (the lock file's mtime: last refresh + lifetime) is
    # more than the slop (5 s) past. Wait until A refreshed it for longer than that.
    first = lockfile.stat().st_mtime
    wait_until(lambda: lockfile.stat().st_mtime >= first + lifetime + 5 + 1, timeout=30,
               interval=0.1, what="the holder's refreshes outlasting lifetime + slop")
    assert lockfile.read_text() == holder, "a live holder's lock was broken"
    assert a.poll() is None and b.poll() is None, workers.stderr_of(b)  # B waits
    assert "breaking" not in workers.stderr_of(b)
    if backends.current.kind == "sqlite-exclusive":
        # A holds SQLite's whole lock from its transaction's first statement: not even
        # a reader gets in (so neither did B).
        reader = sqlite3.connect(f"file:{faults.db}?mode=ro", uri=True, timeout=0)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                reader.execute("SELECT count(*) FROM workers").fetchall()
        finally:
            reader.close()
        return
    assert query(faults.db, "SELECT count(*) FROM workers") == [(1,)]  # B never got in
