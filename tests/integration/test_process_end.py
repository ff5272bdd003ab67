"""How a worker process ends: with an exception in the loop body (recorded with its type,
message and traceback), with a loop left suspended at interpreter exit, and with a stop
signal while its progress bar is drawn (the message on a line of its own)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import wait_until

pytestmark = pytest.mark.processes


def run_script(folder: Path, body: str, wait: bool = True) -> subprocess.Popen:
    script = folder / "main.py"
    script.write_text(textwrap.dedent(body))
    err = open(folder / "stderr.txt", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, str(script)], cwd=folder, stderr=err,
                            stdout=subprocess.DEVNULL)
    err.close()
    if wait:
        proc.wait(timeout=60)
    return proc


def read(db: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("where", ["main", "thread"])
def test_an_exception_in_the_loop_body_is_recorded_with_its_traceback(tmp_path, where):
    proc = run_script(tmp_path, f"""
        import threading
        from laufband import Laufband

        def main():
            for item in Laufband(["ok", "bad", "later"], tqdm_kwargs={{"disable": True}}):
                if item == "bad":
                    raise RuntimeError(f"cannot convert {{item!r}}")

        if "{where}" == "main":
            main()
        else:
            thread = threading.Thread(target=main)
            thread.start()
            thread.join()
    """)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "RuntimeError: cannot convert 'bad'" in stderr  # the usual traceback
    assert proc.returncode == (1 if where == "main" else 0)
    db = tmp_path / "laufband.sqlite"
    [(outcome, error, trace)] = read(db, "SELECT outcome, error, traceback FROM attempts"
                                         " WHERE task = 2")
    assert (outcome, error) == ("failed", "RuntimeError: cannot convert 'bad'")
    assert trace.startswith("Traceback (most recent call last):")
    assert 'raise RuntimeError(f"cannot convert {item!r}")' in trace
    assert read(db, "SELECT id, state FROM tasks ORDER BY pk") == [
        ("0", "completed"), ("1", "failed"), ("2", "ready")]
    assert read(db, "SELECT state FROM workers") == [("offline",)]
    from laufband import Monitor

    [task] = Monitor(db=str(db)).get_tasks(state="failed")
    assert (task.label, task.last_error) == ("'bad'", "RuntimeError: cannot convert 'bad'")
    assert task.last_traceback == trace


def test_a_loop_left_suspended_at_exit_hands_its_task_back_quietly(tmp_path):
    proc = run_script(tmp_path, """
        from laufband import Laufband

        worker = Laufband(["x", "y"], tqdm_kwargs={"disable": True})
        loop = iter(worker)
        print(next(loop))  # the script ends here, the loop suspended in "x"
    """)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, stderr
    assert "Exception ignored" not in stderr and "Traceback" not in stderr, stderr
    db = tmp_path / "laufband.sqlite"
    assert read(db, "SELECT id, state FROM tasks ORDER BY pk") == [("0", "ready"),
                                                                   ("1", "ready")]
    assert read(db, "SELECT detail FROM events WHERE event = 'preempted'") == [
        ("the process exited while the loop was suspended",)]
    assert read(db, "SELECT state FROM workers") == [("offline",)]
    assert read(db, "SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]


def test_the_stop_message_starts_a_line_of_its_own(tmp_path):
    """A drawn progress bar ends without a newline; the message must not be written
    onto it."""
    proc = run_script(tmp_path, """
        import time
        from pathlib import Path
        from laufband import Laufband

        for item in Laufband(range(3), tqdm_kwargs={"mininterval": 0}):
            Path("inside").touch()
            time.sleep(60)
    """, wait=False)
    try:
        wait_until(lambda: (tmp_path / "inside").exists(), what="the worker inside a task")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 143, stderr
    assert "0/3" in stderr  # the bar was drawn
    [line] = [line for line in stderr.split("\n") if "SIGTERM received" in line]
    assert line.startswith("laufband: SIGTERM received: task '0' was handed back"), stderr
