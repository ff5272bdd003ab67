"""Simulated NFS: file-server round trips per transaction, and what they cost.

    python benchmarks/nfs.py                  # full run, about 4 minutes
    python benchmarks/nfs.py --quick          # smoke run, under a minute
    python benchmarks/nfs.py --journal-mode truncate      # another journal mode
    python benchmarks/nfs.py --sqlite-locking normal      # SQLite's usual lock protocol
    python benchmarks/nfs.py --laufband /tmp/old          # measure another laufband tree
    python benchmarks/nfs.py --json nfs.json  # also write every measurement

The workers (benchmarks/worker.py, flat graphs of trivial tasks) run with
benchmarks/nfs_shim.c preloaded: every open/close, link/unlink/rename, fsync,
(f)truncate and fcntl lock of a file in the scenario directory waits the given latency,
as an NFS client waits for a server round trip ("round trips" below are these calls);
stat, utime and access are counted but not delayed (stat may be answered from the
client's attribute cache; utime is a SETATTR, a round trip on NFS, listed apart).
Calls are counted while the workers claim, per committed claim+finish transaction, for
the database (its file, journal and folder) and for the lock file (flufl.lock's lock
and claim files) apart.

1. Uncontended: one worker, batch_size=1. Calls per transaction by kind; the
   round trips on the critical path, measured: (ms per transaction at L ms - the same
   at 0 ms) / L.
2. The matrix: latency 0 / 1 / 5 ms x batch_size 1 / 10 / 50, --workers workers (4):
   tasks/s and round trips per transaction.
3. Contention: --contenders workers (8) at 5 ms, batch_size=1: lock-file calls per
   committed transaction, and how many of them the waiting workers made (all lock-file
   calls minus what the holders' acquisitions cost uncontended, from table 1).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (benchmarks/run.py: scenarios, shim, tables)
from run import DELAYED, Result, Scenario, f1, table  # noqa: E402

KINDS = ("db", "lock")
CATEGORIES = ("open", "close", "link", "unlink", "rename", "fsync", "truncate", "lock",
              "utime", "stat", "access")


def sized(ms: float, batch: int, workers: int, seconds: float, quick: bool) -> int:
    """Tasks for a cell of about ``seconds`` (a transaction costs ~30 round trips)."""
    est_txn_s = 0.004 + 0.030 * ms
    n = seconds * batch / est_txn_s * (1 if workers == 1 else 1.5)
    step = 10 if quick else 50
    return int(min(5000, max(step, n)) // step * step)


def scenario(name: str, ms: float, batch: int, workers: int, args: argparse.Namespace,
             seconds: float) -> Scenario:
    n = sized(ms, batch, workers, seconds, args.quick)
    return Scenario(name, f"flat:{n}", workers, batch=str(batch), journal=args.journal_mode,
                    delay_us=int(ms * 1000), delay_ops=args.delay_ops, kind="nfs",
                    instrument=True, deadline=300, repeat=args.repeat,
                    sqlite_locking=args.sqlite_locking)


# --------------------------------------------------------------------- arithmetic
def steps(r: Result) -> int:
    return max(r.timer_calls.get("step", 1), 1)


def acquisitions(r: Result) -> int:
    return max(sum(v for k, v in r.timer_calls.items() if k.startswith("lock_acquire")), 1)


def calls(r: Result, kind: str, cats: tuple[str, ...] = CATEGORIES) -> float:
    return sum(r.shim.get(f"{kind} {c}", [0])[0] for c in cats)


def per_txn(r: Result, kind: str, cats: tuple[str, ...] = DELAYED) -> float:
    return calls(r, kind, cats) / steps(r)


def ms_per_txn(r: Result) -> float:
    return 1000 * r.wall_s / steps(r)


def trips(r: Result, zero: Result | None) -> str:
    ms = (r.scenario.delay_us or 0) / 1000
    if zero is None or not ms:
        return "-"
    return f"{(ms_per_txn(r) - ms_per_txn(zero)) / ms:.1f}"


# ------------------------------------------------------------------------- tables
def uncontended_table(results: list[Result]) -> str:
    rows = []
    for r in results:
        for kind in KINDS:
            label = "database" if kind == "db" else "lock file"
            rows.append([f"{r.scenario.name}: {label}",
                         *(f"{r.shim.get(f'{kind} {c}', [0])[0] / steps(r):.2f}"
                           for c in CATEGORIES),
                         f"{per_txn(r, kind):.2f}"])
        rows.append([f"{r.scenario.name}: both", *("" for _ in CATEGORIES),
                     f"{per_txn(r, 'db') + per_txn(r, 'lock'):.2f}"])
    return table(["one worker, batch 1", *CATEGORIES, "round trips"], rows,
                 "Uncontended (1 worker, batch 1): calls per committed transaction; round "
                 f"trips = {', '.join(DELAYED)} (delayed by the shim); utime, stat and "
                 "access are not delayed")


def critical_table(results: list[Result]) -> str:
    zero = next((r for r in results if not r.scenario.delay_us), None)
    rows = [[r.scenario.name, f"{r.tasks:,}", f1(r.tasks_per_s, 1), f1(ms_per_txn(r), 2),
             trips(r, zero), f"{per_txn(r, 'db'):.1f}", f"{per_txn(r, 'lock'):.1f}",
             bench.notes(r)] for r in results]
    return table(["one worker, batch 1", "tasks", "tasks/s", "ms/txn",
                  "round trips on the critical path", "db round trips/txn",
                  "lock-file round trips/txn", "notes"], rows,
                 "Uncontended: round trips on the critical path = (ms/txn - ms/txn at "
                 "0 ms) / latency")


def matrix_table(results: list[Result]) -> str:
    zero = {r.scenario.batch: r for r in results if not r.scenario.delay_us}
    rows = []
    for r in results:
        rows.append([r.scenario.name, r.scenario.workers, f"{r.tasks:,}",
                     f1(r.tasks_per_s, 0), f"{r.tasks / steps(r):.1f}", f1(ms_per_txn(r), 1),
                     trips(r, zero.get(r.scenario.batch)),
                     f"{per_txn(r, 'db'):.1f}", f"{per_txn(r, 'lock'):.1f}",
                     f"{per_txn(r, 'db', ('utime',)) + per_txn(r, 'lock', ('utime',)):.1f}",
                     f"{per_txn(r, 'db', ('stat', 'access')):.1f}",
                     f"{per_txn(r, 'lock', ('stat', 'access')):.1f}",
                     bench.notes(r)])
    return table(["latency, batch", "workers", "tasks", "tasks/s", "tasks/txn", "ms/txn",
                  "latencies/txn", "db round trips/txn", "lock-file round trips/txn",
                  "utime/txn", "db stat/txn", "lock-file stat/txn", "notes"], rows,
                 "The matrix: per committed transaction, all workers; latencies/txn = "
                 "(ms/txn - the same at 0 ms) / latency: the round trips on the critical "
                 "path")


def contention_table(results: list[Result], alone: Result | None) -> str:
    rows = []
    # what one uncontended acquisition + release costs on the lock file
    own = calls(alone, "lock") / acquisitions(alone) if alone else None
    own_trips = calls(alone, "lock", DELAYED) / acquisitions(alone) if alone else None
    for r in results:
        n = steps(r)
        total, total_trips = calls(r, "lock") / n, calls(r, "lock", DELAYED) / n
        failed = (r.shim.get("lock link", [0])[0] - acquisitions(r)) / n
        waiting = (calls(r, "lock") - own * acquisitions(r)) / n if own is not None else None
        waiting_trips = ((calls(r, "lock", DELAYED) - own_trips * acquisitions(r)) / n
                         if own_trips is not None else None)
        rows.append([r.scenario.name, r.scenario.workers, f"{r.tasks:,}",
                     f1(r.tasks_per_s, 1), f1(ms_per_txn(r), 1),
                     f"{acquisitions(r) / n:.2f}", f"{total:.1f}", f"{total_trips:.1f}",
                     f1(waiting), f1(waiting_trips), f"{failed:.1f}",
                     f"{per_txn(r, 'db'):.1f}", bench.notes(r)])
    return table(["contention, batch 1", "workers", "tasks", "tasks/s", "ms/txn",
                  "lock acquisitions/txn", "lock-file calls/txn (all kinds)",
                  "lock-file round trips/txn", "by waiting workers: calls/txn",
                  "by waiting workers: round trips/txn", "failed link tries/txn",
                  "db round trips/txn", "notes"], rows,
                 "Contention: lock-file operations per committed transaction; 'by waiting "
                 "workers' = all minus what the acquisitions cost uncontended (table 1)")


# --------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--quick", action="store_true", help="small sizes, fewer cells (CI)")
    p.add_argument("--journal-mode", default="delete",
                   help="laufband's journal_mode for every cell (default delete)")
    p.add_argument("--sqlite-locking", default="exclusive", choices=("exclusive", "normal"),
                   help="LAUFBAND_SQLITE_LOCKING of the workers (default exclusive, what "
                   "'auto' picks on a real NFS mount; the shim's folder is a local disk)")
    p.add_argument("--workers", type=int, default=4, help="workers in the matrix (4)")
    p.add_argument("--contenders", type=int, default=8,
                   help="workers in the contention run (8)")
    p.add_argument("--seconds", type=float, default=8.0,
                   help="aimed length of one cell (default 8 s; --quick 2 s)")
    p.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is shown")
    p.add_argument("--delay-ops", default="",
                   help="categories the shim delays (NFSSIM_OPS; default its own: "
                   f"{','.join(DELAYED)})")
    p.add_argument("--laufband", default="",
                   help="measure the laufband package in this folder (put first on the "
                   "workers' PYTHONPATH), e.g. an export of an older commit")
    p.add_argument("--only", default="", help="tables to run: any of 1,2,3 (default all)")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="where the scenario directories are made")
    p.add_argument("--keep", action="store_true", help="keep the scenario directories")
    p.add_argument("--json", help="write every measurement to this file")
    args = p.parse_args()
    if args.quick and args.seconds == 8.0:
        args.seconds = 2.0
    if args.laufband:
        tree = str(Path(args.laufband).resolve())
        if not (Path(tree) / "laufband" / "__init__.py").exists():
            raise SystemExit(f"no laufband package in {tree}")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [tree, *filter(None, [os.environ.get("PYTHONPATH")])])

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; worker processes were stopped", file=sys.stderr)
        return 130


def measured_tree(args: argparse.Namespace, info: dict) -> str:
    if not args.laufband:
        dirty = " + uncommitted changes" if info["dirty"] else ""
        return f"this checkout, commit {info['commit']}{dirty}"
    r = subprocess.run(["git", "-C", args.laufband, "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    rev = r.stdout.strip() if r.returncode == 0 else "not a git checkout"
    return f"{args.laufband} ({rev})"


def run(args: argparse.Namespace) -> int:
    # run.py's Context wants its own options; give it what it reads
    ns = argparse.Namespace(workdir=args.workdir, keep=args.keep, quick=args.quick,
                            upstream_deadline=0.0)
    ctx = bench.Context(ns)
    started = time.monotonic()
    ctx.shim = bench.build_shim(ctx)
    if ctx.shim is None:
        return 1
    info = bench.machine()
    wanted = set(args.only.split(",")) if args.only else {"1", "2", "3"}
    print(f"# laufband on simulated NFS{' (quick)' if args.quick else ''}\n\n"
          f"- laufband measured: {measured_tree(args, info)}; {info['date']}\n"
          f"- {info['cores']} cores ({info['cpu']}), Python {info['python']}, "
          f"SQLite {info['sqlite']}, journal_mode={args.journal_mode}, "
          f"LAUFBAND_SQLITE_LOCKING={args.sqlite_locking}\n"
          f"- delayed: {args.delay_ops or ','.join(DELAYED)}")
    delays = (0, 1) if args.quick else (0, 1, 5)
    alone: list[Result] = []
    if "1" in wanted or "3" in wanted:
        ctx.say("1. uncontended: one worker, batch 1")
        alone = [bench.run_scenario(ctx, scenario(f"{ms} ms", ms, 1, 1, args, args.seconds))
                 for ms in delays]
    matrix: list[Result] = []
    if "2" in wanted:
        ctx.say(f"2. the matrix: {args.workers} workers")
        batches = (1, 10) if args.quick else (1, 10, 50)
        matrix = [bench.run_scenario(ctx, scenario(f"{ms} ms, batch {b}", ms, b,
                                                   args.workers, args, args.seconds))
                  for ms in delays for b in batches]
    contention: list[Result] = []
    if "3" in wanted:
        ms = 1 if args.quick else 5
        ctx.say(f"3. contention: {args.contenders} workers at {ms} ms")
        contention = [bench.run_scenario(ctx, scenario(
            f"{ms} ms, batch 1", ms, 1, args.contenders, args, 3 * args.seconds))]
    if alone:
        print(uncontended_table(alone))
        print(critical_table(alone))
    if matrix:
        print(matrix_table(matrix))
    if contention:
        print(contention_table(contention, alone[0] if alone else None))
    elapsed = time.monotonic() - started
    print(f"\nfinished in {elapsed:.0f} s; "
          + ("all correctness checks passed." if not ctx.failures else
             f"{len(ctx.failures)} FAILURE(S):"))
    for failure in ctx.failures:
        print(f"  - {failure}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": info, "args": vars(args), "elapsed_s": elapsed,
            "uncontended": [r.to_json() for r in alone],
            "matrix": [r.to_json() for r in matrix],
            "contention": [r.to_json() for r in contention],
            "failures": ctx.failures}, indent=1, default=str))
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    sys.exit(main())
