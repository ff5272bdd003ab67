"""The `laufband` command against real worker processes: cancel with a drain, retry of
a failed and of a killed task, explain of a real exception, and read-only commands
while workers run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import backends
import pytest
from conftest import peek, query, wait_until
from graphs import build

pytestmark = [pytest.mark.processes, pytest.mark.backends]

MAP_WORKER = Path(__file__).parent.parent / "map_worker.py"


def laufband(folder: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    db = backends.current.url(folder / "graph.sqlite")
    return subprocess.run([sys.executable, "-m", "laufband.cli", "--db", db, *argv],
                          capture_output=True, text=True, timeout=timeout, cwd=folder)


def live(db: Path) -> int:
    rows = peek(db, "SELECT count(*) FROM attempts WHERE ended_at IS NULL")
    return rows[0][0] if rows else 0


def test_cancel_lets_running_tasks_finish_within_the_drain(workers):
    """3 plain-loop workers run 1 s tasks; a cancel with a 20 s drain: the 3 running
    tasks finish and are recorded (the workers' own records say so), the rest is
    cancelled, the workers exit 75, the command exits 0."""
    db = workers.folder / "graph.sqlite"
    workers.start("flat:30", 3, sleep=1.0)
    wait_until(lambda: live(db) == 3, timeout=60, what="3 tasks running")
    running = {tid for (tid,) in query(db, "SELECT t.id FROM attempts a JOIN tasks t"
                                           " ON t.pk = a.task WHERE a.ended_at IS NULL")}
    out = laufband(workers.folder, "cancel", "--drain-timeout", "20")
    assert out.returncode == 0, out.stderr
    assert "3 running at the cancel: 3 finished within the drain, 0 abandoned" in out.stdout
    run = workers.wait(timeout=60)
    assert run.returncodes == [75] * 3
    assert all("the workflow was cancelled by laufband cancel" in e for e in run.stderr)
    recorded = {r["id"] for r in run.records}
    assert running <= recorded  # each finished its body ...
    state = dict(query(db, "SELECT id, state FROM tasks"))
    assert {tid for tid, s in state.items() if s == "completed"} == recorded  # ... recorded
    assert set(state.values()) == {"completed", "cancelled"}
    assert query(db, "SELECT count(*) FROM attempts WHERE outcome = 'cancelled'") == [(0,)]
    # a worker started now leaves at once and says why; resume, and the rest runs
    [late] = workers.start("flat:30")
    assert late.wait(timeout=60) == 75
    assert "cancelled" in workers.stderr_of(late)
    assert laufband(workers.folder, "resume").returncode == 0
    workers.start("flat:30", 2)
    run = workers.wait(timeout=60)
    assert run.returncodes[-2:] == [0, 0]
    assert set(dict(query(db, "SELECT id, state FROM tasks")).values()) == {"completed"}


def test_cancel_abandons_tasks_still_running_after_the_drain(workers):
    """Thread workers whose tasks take 30 s: after a 1 s drain their attempts are
    recorded cancelled, the workers leave (exit 75) without waiting for the threads,
    and the command exits 3."""
    db = workers.folder / "graph.sqlite"
    workers.start("flat:10", 2, script=MAP_WORKER, threads=2, sleep=30)
    wait_until(lambda: live(db) == 4, timeout=60, what="4 tasks running")
    out = laufband(workers.folder, "cancel", "--drain-timeout", "1")
    assert out.returncode == 3, out.stderr
    assert "4 running at the cancel: 0 finished within the drain, 4 abandoned" in out.stdout
    run = workers.wait(timeout=30)
    assert run.returncodes == [75, 75]
    assert run.records == []  # no task body finished
    assert query(db, "SELECT count(*) FROM attempts WHERE outcome = 'cancelled'") == [(4,)]
    assert set(dict(query(db, "SELECT id, state FROM tasks")).values()) == {"cancelled"}


def test_explain_shows_the_real_exception_and_retry_runs_it_again(workers):
    db = workers.folder / "graph.sqlite"
    workers.start("chain:4", fail="c1")
    run = workers.wait()
    assert run.returncodes == [1]
    out = laufband(workers.folder, "explain", "c1")
    assert out.returncode == 0, out.stderr
    assert "RuntimeError: task c1 failed on purpose" in out.stdout
    assert "| Traceback (most recent call last):" in out.stdout
    data = json.loads(laufband(workers.folder, "explain", "c2", "--json").stdout)
    assert data["state"] == "blocked" and data["waiting_for"] == [
        {"task": "c1", "state": "failed"}]
    out = laufband(workers.folder, "retry", "--failed", "--yes")
    assert out.returncode == 0 and "(1 failed): 'c1'" in out.stdout
    workers.start("chain:4")
    run = workers.wait()
    assert run.returncodes[-1] == 0
    assert set(dict(query(db, "SELECT id, state FROM tasks")).values()) == {"completed"}


def test_retry_of_a_killed_task(workers):
    """A worker SIGKILLed with max_killed_retries=0 everywhere: its task is killed for
    good once a peer reaps it; retry gives it a fresh budget and a rerun completes."""
    db = workers.folder / "graph.sqlite"
    env = {"LAUFBAND_HEARTBEAT_INTERVAL": "0.3", "LAUFBAND_HEARTBEAT_TIMEOUT": "1",
           "LAUFBAND_MAX_KILLED_RETRIES": "0"}
    [victim] = workers.start("flat:3", env=env, sleep=30)
    wait_until(lambda: live(db) == 1, timeout=60, what="the victim runs a task")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    workers.start("flat:3", env=env)
    wait_until(lambda: peek(db, "SELECT count(*) FROM tasks WHERE state = 'killed'")
               == [(1,)], timeout=60, what="the task killed for good")
    run = workers.wait()
    assert run.returncodes == [-signal.SIGKILL, 0]
    out = laufband(workers.folder, "retry", "--killed", "--yes")
    assert out.returncode == 0 and "(1 killed)" in out.stdout
    workers.start("flat:3", env=env)
    workers.wait()
    assert set(dict(query(db, "SELECT id, state FROM tasks")).values()) == {"completed"}


def test_read_only_commands_while_workers_run(workers):
    db = workers.folder / "graph.sqlite"
    workers.start("layered:5x20", 3, sleep=0.02)
    wait_until(lambda: live(db) >= 1, timeout=60, what="workers running")
    for argv in (["status"], ["status", "--json"], ["workers", "--json"], ["tasks"],
                 ["explain", build("layered:5x20")[-1].id]):
        out = laufband(workers.folder, *argv)
        assert out.returncode == 0, (argv, out.stderr)
    assert workers.wait().returncodes == [0, 0, 0]


def exit_code(proc: subprocess.Popen, leader: int, timeout: float = 30) -> int:
    """Wait for ``proc`` to exit while reading what it writes to the terminal: a frame
    drawn before it read the key could fill the pty's buffer and block it in a write."""
    import os
    import select
    import time

    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if select.select([leader], [], [], 0.1)[0]:
            os.read(leader, 65536)
    return proc.wait(timeout=1)


def test_watch_shows_the_run_and_quits_on_q(workers):
    """In a real terminal (a pty): frames with progress and workers; q quits at once
    and the terminal gets its mode back."""
    import os
    import pty
    import select
    import termios
    import time

    db = workers.folder / "graph.sqlite"
    workers.start("flat:200", 2, sleep=0.02)
    wait_until(lambda: live(db) >= 1, timeout=60, what="workers running")
    leader, follower = pty.openpty()
    before = termios.tcgetattr(follower)
    url = backends.current.url(db)
    proc = subprocess.Popen([sys.executable, "-m", "laufband.cli", "--db", url, "watch",
                             "--interval", "0.2"], stdin=follower, stdout=follower,
                            stderr=follower, cwd=workers.folder)
    try:
        seen = b""
        end = time.monotonic() + 30
        while b"q or Ctrl-C quits" not in seen and time.monotonic() < end:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 65536)
        assert b"completed" in seen and b"worker" in seen, seen[-2000:]
        os.write(leader, b"q")
        assert exit_code(proc, leader) == 0
        assert termios.tcgetattr(follower)[3] == before[3]  # local modes restored
        # SIGTERM (or a closed terminal: SIGHUP) quits the same way
        while select.select([leader], [], [], 0.3)[0]:  # what the first one left
            os.read(leader, 65536)
        proc = subprocess.Popen([sys.executable, "-m", "laufband.cli", "--db", url,
                                 "watch", "--interval", "0.2"], stdin=follower,
                                stdout=follower, stderr=follower, cwd=workers.folder)
        seen = b""
        while b"q or Ctrl-C quits" not in seen and time.monotonic() < end + 30:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 65536)
        proc.send_signal(signal.SIGTERM)
        assert exit_code(proc, leader) == 0
        assert termios.tcgetattr(follower)[3] == before[3]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
        os.close(follower)
    workers.wait()


def test_status_into_a_closed_pipe_is_a_success(workers):
    """`set -o pipefail; laufband status | head -2` must not fail: rich would exit 1."""
    workers.start("flat:5")
    workers.wait()
    url = backends.current.url(workers.folder / "graph.sqlite")
    for n in (1, 2):
        out = subprocess.run(
            ["bash", "-c", f"set -o pipefail; '{sys.executable}' -m laufband.cli --db "
                           f"'{url}' status | head -{n}"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (n, out.stderr)
        assert len(out.stdout.splitlines()) == n
