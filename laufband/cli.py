"""The ``laufband`` command: look at a workflow's database from any shell.

Only parses arguments and renders what the store's read API returns.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from laufband.clock import SystemClock
from laufband.errors import LaufbandError
from laufband.locking import DatabaseLock, FastLock
from laufband.states import TaskState
from laufband.store import Store, sqlite_path


def open_store(db: str) -> Store:
    path = sqlite_path(db)
    if path is not None and not os.path.exists(path):
        raise LaufbandError(f"No database at {path}: no worker has run here yet (or use --db).")
    return Store(db, DatabaseLock(FastLock(f"{path or 'laufband'}.lock")), SystemClock())


def status(store: Store, out=sys.stdout) -> None:
    counts = store.counts()
    total = counts.total
    done = counts.n([TaskState.COMPLETED])
    pct = 100.0 * done / total if total else 100.0
    print(f"tasks: {done}/{total} completed ({pct:.1f} %)", file=out)
    for state in TaskState:
        n = counts.n([state])
        if n:
            print(f"  {state.value:<10} {n:>9}", file=out)
    workers = store.workers()
    by_state: dict[str, int] = {}
    for w in workers:
        by_state[w["state"]] = by_state.get(w["state"], 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items()))
    print(f"workers: {len(workers)} ({summary or 'none'})", file=out)
    now = time.time()
    for attempt in store.running()[:20]:
        print(f"  running {attempt['id']!r} (attempt {attempt['attempt']}) on "
              f"{attempt['worker']} for {now - attempt['started_at']:.0f} s", file=out)
    failed = store.failed_tasks(limit=10)
    if failed:
        print(f"failed or killed for good: {', '.join(map(repr, failed))}", file=out)


def workers_table(store: Store, out=sys.stdout) -> None:
    now = time.time()
    print(f"{'worker':<30} {'state':<8} {'host':<20} {'pid':>7} {'heartbeat':>10}  labels",
          file=out)
    for w in store.workers():
        print(f"{w['id']:<30} {w['state']:<8} {w['hostname']:<20} {w['pid']:>7} "
              f"{now - w['heartbeat']:>8.0f} s  {w['labels']}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="laufband", description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=os.environ.get("LAUFBAND_DB", "sqlite:///graphband.sqlite"),
                        help="database URL (default: $LAUFBAND_DB or sqlite:///graphband.sqlite)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="progress by state, workers, running and failed tasks")
    sub.add_parser("workers", help="every worker with its state and last heartbeat")
    args = parser.parse_args(argv)
    try:
        store = open_store(args.db)
        {"status": status, "workers": workers_table}[args.command](store)
    except LaufbandError as exc:
        print(f"laufband: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
