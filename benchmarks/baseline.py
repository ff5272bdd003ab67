"""The physical limit: a bare claim+finish loop on plain sqlite3, no laufband around it.

One table of tasks with an index on (state, pk). Each transaction (BEGIN IMMEDIATE ..
COMMIT, rollback journal, SQLite's default synchronous=FULL, as laufband uses) marks the
previous claim(s) completed and claims the next ready task(s): exactly the work one
laufband step must do, without the bookkeeping. Optionally each transaction is wrapped
in a flufl.lock file lock (the NFS-safe protocol laufband uses), and several processes
can run the loop at once (they share the table, like workers).

    python benchmarks/baseline.py --db /tmp/x.sqlite --tasks 2000 [--batch 10]
        [--file-lock] [--processes 8] [--journal-mode delete]

Prints one JSON line: tasks, seconds, tasks_per_s, ms_per_txn, fsync_ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sqlite3
import sys
import time
from contextlib import nullcontext


def create(db: str, n: int, journal_mode: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode = {journal_mode}")
    conn.execute("CREATE TABLE tasks (pk INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,"
                 " state TEXT NOT NULL, worker TEXT, updated_at REAL)")
    conn.execute("CREATE INDEX ix_claim ON tasks (state, pk)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO tasks (pk, id, state) VALUES (?, ?, 'ready')",
                     ((i, f"t{i}") for i in range(n)))
    conn.execute("COMMIT")
    conn.close()


def loop(db: str, batch: int, file_lock: bool, journal_mode: str, name: str) -> int:
    """Claim+finish until nothing is ready; return the number of tasks this loop ran."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=60)
    conn.execute(f"PRAGMA journal_mode = {journal_mode}")
    tries = [0]
    if file_lock:
        from flufl.lock import Lock

        lock = Lock(f"{db}.lock")

        def backoff() -> None:
            # flufl's own backoff sleeps 10 ms - 2 s; use laufband's jittered one
            tries[0] += 1
            time.sleep(random.uniform(0, min(0.02, 0.0005 * 2 ** tries[0])))

        lock._sleep = backoff  # type: ignore[method-assign]
    else:
        lock = nullcontext()
    held: list[int] = []
    done = 0
    while True:
        tries[0] = 0
        with lock:
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            if held:
                conn.executemany(
                    "UPDATE tasks SET state = 'completed', updated_at = ? WHERE pk = ?",
                    ((now, pk) for pk in held))
            held = [pk for (pk,) in conn.execute(
                "SELECT pk FROM tasks WHERE state = 'ready' ORDER BY pk LIMIT ?", (batch,))]
            conn.executemany(
                "UPDATE tasks SET state = 'running', worker = ?, updated_at = ? WHERE pk = ?",
                ((name, now, pk) for pk in held))
            conn.execute("COMMIT")
        if not held:
            return done
        done += len(held)  # the "task": nothing


def fsync_ms(folder: str, n: int = 50) -> float:
    """Mean time of write(4 KiB)+fsync of a small file on this disk."""
    path = os.path.join(folder, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        t = time.perf_counter()
        for _ in range(n):
            os.pwrite(fd, b"x" * 4096, 0)
            os.fsync(fd)
        return (time.perf_counter() - t) / n * 1000
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True, help="path of a new SQLite file")
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--batch", type=int, default=1, help="tasks claimed per transaction")
    p.add_argument("--file-lock", action="store_true", help="flufl.lock around each txn")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--journal-mode", default="delete")
    args = p.parse_args()
    if os.path.exists(args.db):
        p.error(f"{args.db} exists; give a new file")
    create(args.db, args.tasks, args.journal_mode)
    t = time.perf_counter()
    loop_args = (args.db, args.batch, args.file_lock, args.journal_mode)
    if args.processes == 1:
        ran = loop(*loop_args, "p0")
    else:
        with multiprocessing.get_context("fork").Pool(args.processes) as pool:
            ran = sum(pool.starmap(loop, [(*loop_args, f"p{i}")
                                          for i in range(args.processes)]))
    seconds = time.perf_counter() - t
    if ran != args.tasks:
        print(f"baseline ran {ran} of {args.tasks} tasks", file=sys.stderr)
        return 1
    txns = -(-args.tasks // args.batch) + args.processes
    print(json.dumps({
        "tasks": ran, "seconds": seconds, "tasks_per_s": ran / seconds,
        "ms_per_txn": seconds / txns * 1000,
        "fsync_ms": fsync_ms(os.path.dirname(os.path.abspath(args.db))),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
