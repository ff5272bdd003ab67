"""A worker process for the fault-injection tests (tests/integration/test_faults.py).

Runs one Graphband loop and records, for every task body it runs, one side-effect file
``<effects>/done/<task>@<attempt>`` created with O_EXCL: a second commit of the same
(task, attempt) cannot go unnoticed (it leaves ``<task>@<attempt>.DOUBLE.<pid>``).
At the start of a body it drops ``<effects>/started/<task>@<attempt>@<pid>`` so a test
can wait until a worker really is inside a task.

Fault hooks (each optional):
  --hold IDS            the bodies of these tasks (comma-separated) wait until the file
                        <effects>/release exists
  --hang-in-write N     the N-th write transaction hangs after its writes, holding the
                        database lock and SQLite's write lock (marker: hanging.<pid>)
  --stall-after-step N  the N-th claim/finish step returns only once a stop signal has
                        arrived (marker: stepped.<pid>): "a signal during a store call"

Settings (heartbeat, retries, batch size, lock lifetime) come from LAUFBAND_* variables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from graphs import build

from laufband import Graphband
from laufband.store import ledger

DEADLINE = 120.0  # no hook waits longer than this (a test that forgot to release)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--graph", required=True)
    p.add_argument("--out", required=True, help="JSON lines: one record per task body")
    p.add_argument("--effects", required=True)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--hold", default="")
    p.add_argument("--hang-in-write", type=int, default=0)
    p.add_argument("--stall-after-step", type=int, default=0)
    p.add_argument("--db-lock", default="", help="put the database lock file here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")

    hold = {x for x in args.hold.split(",") if x}
    effects = Path(args.effects)
    for sub in ("done", "started"):
        (effects / sub).mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    if args.hang_in_write:
        hang_in_write(args.hang_in_write, effects / f"hanging.{pid}")

    kwargs = {}
    if args.db_lock:
        from laufband.locking import FastLock

        lifetime = float(os.environ.get("LAUFBAND_LOCK_LIFETIME", 10))
        kwargs["db_lock"] = FastLock(args.db_lock, lifetime=lifetime)
    worker = Graphband(build(args.graph), db=args.db, tqdm_kwargs={"disable": True}, **kwargs)
    if args.stall_after_step:
        stall_after_step(worker, args.stall_after_step, effects / f"stepped.{pid}")

    out = open(args.out, "a", buffering=1)  # noqa: SIM115 - line-buffered for the test
    for task in worker:
        start = time.monotonic_ns()
        key = f"{task.id}@{worker.attempt}"
        (effects / "started" / f"{key}@{pid}").touch()
        if task.id in hold:
            wait_for(lambda: (effects / "release").exists())
        if args.sleep:
            time.sleep(args.sleep)
        try:  # the user's side effect, keyed by (task, attempt)
            fd = os.open(effects / "done" / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            (effects / "done" / f"{key}.DOUBLE.{pid}").touch()
        else:
            os.write(fd, str(pid).encode())
            os.close(fd)
        out.write(json.dumps({"id": task.id, "attempt": worker.attempt, "start": start,
                              "end": time.monotonic_ns(), "worker": worker.identifier,
                              "pid": pid}) + "\n")
    out.write(json.dumps({"exit": worker.identifier, "at": time.monotonic_ns()}) + "\n")
    return 0


def wait_for(condition) -> None:
    end = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("fault_worker: hook waited too long")
        time.sleep(0.01)


def hang_in_write(n: int, marker: Path) -> None:
    """The n-th write transaction stops after its writes, before its commit: after
    its history and counts, or before them in a step beside others on a server,
    which sends them with its commit (ledger.Ledger._flush_beside)."""
    original = ledger.Ledger.flush
    calls = 0

    def flush(self):
        nonlocal calls
        hit = False
        if threading.current_thread() is threading.main_thread():  # not heartbeats
            calls += 1
            hit = calls == n
        if hit and self.beside:
            hang()
        original(self)
        if hit:
            hang()

    def hang():
        marker.touch()
        time.sleep(DEADLINE)  # until the test kills us

    ledger.Ledger.flush = flush


def stall_after_step(worker: Graphband, n: int, marker: Path) -> None:
    """The n-th step returns (with its claims) only after a stop signal arrived."""
    store = worker._store
    original = store.step
    calls = 0

    def step(*a, **kw):
        nonlocal calls
        result = original(*a, **kw)
        calls += 1
        if calls == n:
            marker.touch()
            wait_for(lambda: worker._session.signal is not None)
        return result

    store.step = step


if __name__ == "__main__":
    sys.exit(main())
