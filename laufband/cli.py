"""The ``laufband`` command: look at a workflow's database from any shell.

Only parses arguments and renders what the store's read API returns. It opens the
database read-only: it never writes or upgrades it, and works on a read-only copy.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
import typing as t

from laufband.clock import SystemClock
from laufband.errors import ConfigError, LaufbandError
from laufband.locking import FastLock, database_lock
from laufband.maintenance import prune
from laufband.states import TaskState
from laufband.store import Store, database_url, sqlite_path
from laufband.store.connection import absolute_url

DEFAULT_FILES = ("graphband.sqlite", "laufband.sqlite")


def open_store(db: str) -> Store:
    """The workflow database ``db`` (a path or a URL), opened read-only."""
    return Store.open_read_only(database_url(db, "--db"))


def default_db() -> str:
    """$LAUFBAND_DB, else the one workflow database in the current folder."""
    if os.environ.get("LAUFBAND_DB"):
        return os.environ["LAUFBAND_DB"]
    found = [name for name in DEFAULT_FILES if os.path.exists(name)]
    if len(found) > 1:
        raise LaufbandError(f"Both {' and '.join(found)} are here: say which with --db.")
    if not found:
        raise LaufbandError(f"No workflow database here ({' or '.join(DEFAULT_FILES)}): "
                            "run from the folder of your workers, or pass --db PATH.")
    return found[0]


def status(store: Store, out: t.TextIO | None = None) -> None:
    out = out or sys.stdout
    counts = store.counts()
    total = counts.total
    done = counts.n([TaskState.COMPLETED])
    pct = 100.0 * done / total if total else 100.0
    print(f"tasks: {done}/{total} completed ({pct:.1f} %)", file=out)
    for state in TaskState:
        n = counts.n([state])
        if n:
            note = "  (not in the graph any more)" if state == TaskState.REMOVED else ""
            print(f"  {state.value:<10} {n:>9}{note}", file=out)
    rerun = store.invalidated()
    if rerun:
        print(f"  of which {rerun} run again: invalidated (fingerprints)", file=out)
    workers = store.workers()
    by_state: dict[str, int] = {}
    for w in workers:
        by_state[w["state"]] = by_state.get(w["state"], 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items()))
    print(f"workers: {len(workers)} ({summary or 'none'})", file=out)
    now = time.time()
    for attempt in store.running()[:20]:
        print(f"  running {attempt['id']!r} (attempt {attempt['attempt']}) on "
              f"{attempt['worker']} for {max(0.0, now - attempt['started_at']):.0f} s",
              file=out)
    groups = store.failure_groups()
    if groups:
        print("failed or killed for good, by error:", file=out)
        for group in groups[:10]:
            examples = ", ".join(map(repr, group.examples))
            more = ", ..." if group.count > len(group.examples) else ""
            print(f"  {group.count:>6} x {group.error}  ({examples}{more})", file=out)


def workers_table(store: Store, out: t.TextIO | None = None) -> None:
    """Workers grouped by their labels (a family: the workers of one stage or kind),
    each with what it runs now."""
    out = out or sys.stdout
    now = time.time()
    families: dict[str, list[dict]] = {}
    for w in store.workers():
        families.setdefault(",".join(sorted(w["labels"])) or "-", []).append(w)
    for labels, members in sorted(families.items()):
        states: dict[str, int] = {}
        for w in members:
            states[w["state"]] = states.get(w["state"], 0) + 1
        summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        print(f"labels {labels}: {len(members)} worker(s) ({summary})", file=out)
        print(f"  {'worker':<30} {'state':<8} {'host':<20} {'pid':>7} {'heartbeat':>10}  "
              "running", file=out)
        for w in members:
            running = w["running"]
            doing = (", ".join(map(repr, running[:3])) + (f" +{len(running) - 3}"
                     if len(running) > 3 else "")) if running else "-"
            print(f"  {w['id']:<30} {w['state']:<8} {w['hostname']:<20} {w['pid']:>7} "
                  f"{max(0.0, now - w['heartbeat']):>8.0f} s  {doing}", file=out)


def results(store: Store, as_json: bool, out: t.TextIO | None = None) -> None:
    """Results in graph order; --json: one object (its keys keep that order)."""
    out = out or sys.stdout
    rows = store.results()
    if as_json:
        body = ", ".join(f"{json.dumps(tid)}: {raw if raw is not None else 'null'}"
                         for tid, raw in rows)
        print("{" + body + "}", file=out)
        return
    for tid, raw in rows:
        print(f"{tid}\t{raw if raw is not None else ''}", file=out)


def limits_table(store: Store, out: t.TextIO | None = None) -> None:
    out = out or sys.stdout
    usage = store.limits()
    if not usage:
        print("no limits (tasks declare resources, workers limits={...})", file=out)
        return
    print(f"{'resource':<20} {'limit':>7} {'held':>7}", file=out)
    for name, (capacity, held) in usage.items():
        print(f"{name:<20} {capacity:>7} {held:>7}", file=out)


def parse_limits(pairs: list[str]) -> dict[str, int]:
    """NAME=N arguments as limits (ConfigError for anything else)."""
    from laufband.store.resources import check_limits

    parsed: dict[str, t.Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            parsed[name] = int(value) if sep else None
        except ValueError:
            parsed[name] = value
        if not sep:
            raise ConfigError(f"{pair!r}: write NAME=N, e.g. api=4")
    return check_limits(parsed, "laufband limits")


def set_limits(db: str, pairs: list[str]) -> None:
    """Change limits: a write, under the workflow's database lock."""
    limits = parse_limits(pairs)
    path = sqlite_path(absolute_url(database_url(db, "--db")))
    if path is not None and not os.path.exists(path):
        raise LaufbandError(f"No workflow database at {path}.")
    lock = database_lock(FastLock(f"{path}.lock")) if path is not None else None
    store = Store(database_url(db, "--db"), lock, SystemClock())
    now = store.set_limits(limits, f"laufband limits ({getpass.getuser()})")
    print("limits: " + ", ".join(f"{k}={v}" for k, v in now.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="laufband", description=__doc__.splitlines()[0])
    db_help = ("database path or URL (default: $LAUFBAND_DB, or graphband.sqlite / "
               "laufband.sqlite in this folder)")
    parser.add_argument("--db", help=db_help)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, text in (("status", "progress by state, workers, running and failed tasks"),
                       ("workers", "every worker with its state and last heartbeat"),
                       ("prune", "delete old history (safe while workers run)"),
                       ("limits", "show the global resource limits, or set them: "
                                  "laufband limits api=4"),
                       ("results", "every completed task's result, in graph order")):
        # --db after the command too (then it wins)
        commands[name] = sub.add_parser(name, help=text)
        commands[name].add_argument("--db", default=argparse.SUPPRESS, help=db_help)
    commands["prune"].add_argument("--keep", type=int, default=10, help="history rows to "
                                   "keep per task, newest first (default 10)")
    commands["prune"].add_argument("--vacuum", action="store_true",
                                   help="then shrink the file (workers wait meanwhile)")
    commands["limits"].add_argument("set", nargs="*", metavar="NAME=N",
                                    help="new limits (running tasks keep what they hold)")
    commands["results"].add_argument("--json", action="store_true",
                                     help="one JSON object: task id -> result")
    args = parser.parse_args(argv)
    try:
        db = args.db or default_db()
        if args.command == "prune":
            pruned = prune(db, keep=args.keep, vacuum=args.vacuum)
            print(f"deleted {pruned.events} history rows and {pruned.attempts} attempts")
            return 0
        if args.command == "limits" and args.set:
            set_limits(db, args.set)
            return 0
        store = open_store(db)
        if args.command == "results":
            results(store, as_json=args.json)
            return 0
        {"status": status, "workers": workers_table, "limits": limits_table}[
            args.command](store)
    except LaufbandError as exc:
        print(f"laufband: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `laufband status | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
