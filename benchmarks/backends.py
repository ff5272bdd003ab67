"""SQLite against PostgreSQL: throughput of flat tasks with 1, 8 and 32 worker processes.

    eval "$(scripts/postgres-up.sh)"                  # a throw-away server on this machine
    python benchmarks/backends.py                     # full run (about 7 minutes)
    python benchmarks/backends.py --quick             # smoke run for CI (about a minute)
    python benchmarks/backends.py --compare-upstream  # + laufband 0.2.1 on SQLite (+2 min)
    python benchmarks/backends.py --postgres URL --repeat 5 --json out.json
    python benchmarks/backends.py --backends postgres --only 'x(8|32)'   # PostgreSQL only
    git worktree add /tmp/base <commit>                                   # before/after:
    python benchmarks/backends.py --backends postgres --against /tmp/base
    python benchmarks/delay_proxy.py 54330 127.0.0.1:54329 0.0001 &   # across a network:
    python benchmarks/backends.py --postgres postgresql+psycopg://postgres@127.0.0.1:54330/postgres

The server: --postgres URL, else $LAUFBAND_TEST_POSTGRES (postgresql+psycopg://...; the
user must be allowed to CREATE DATABASE). Without either the script says how to start
one and exits 2.

Each cell is a scenario of benchmarks/run.py, run by run.py's machinery: real worker
processes (benchmarks/worker.py) build the graph, construct their worker (registering
the graph), wait for a common start signal, run their loop and record every task they
ran; the driver checks from those records that every task ran exactly once (attempt 1),
and exits 1 if not. Backends:

    SQLite      a file in a fresh temporary directory, the default rollback journal
                (journal_mode="delete") and flufl.lock file lock
    PostgreSQL  a fresh database on the server per run (dropped afterwards); writers
                take turns on the server's advisory lock

Tasks: flat (no dependencies), either trivial (no body work: 10,000 tasks for 1 worker,
20,000 for 8 and 32) or 10 ms each (time.sleep(0.01): 500, 2,000, 4,000), always
batch_size="auto". --quick: a tenth of the tasks, and 16 workers instead of 32 (starting
32 interpreters four times takes most of a minute on 2 cores). Rows run in rounds (each
round runs every cell once, SQLite and PostgreSQL back to back) so that a change of the
machine's load falls on all cells alike; a cell shows the median of its --repeat runs.

--against DIR also runs every PostgreSQL cell with the laufband of DIR (a checkout of
another commit; its workers get PYTHONPATH=DIR), in the same rounds, so a change is
measured against its base on the same load: columns "PG DIR" and "PG/DIR".

Columns:
    tasks/s     tasks / wall s, all workers together; wall = start signal until the last
                worker's loop ended (every completion recorded)
    setup s     launch of the processes until all are ready (interpreter start, imports,
                graph built and registered; for PostgreSQL: connecting, schema), slowest
    PG/SQLite   ratio of the two tasks/s
    xacts/task  PostgreSQL: transactions the server committed in the run's database per
                task (pg_stat_database; every statement of the lock's autocommit
                connection is one, snapshot reads too)
    0.2.1       laufband 0.2.1 (its cached virtualenv, as run.py --compare-upstream), on
                SQLite only: it cannot use PostgreSQL safely; one run per cell, 1 and 8
                workers (32 with --upstream-32: a cell then takes minutes). A run that
                reaches --upstream-deadline is closed and counted up to then.
    eff         10 ms tasks: tasks/s against the ideal, workers / 10 ms
    others      cores other processes of the machine used during the run; for
                PostgreSQL that includes the server (and this machine's other users)

Targets (issue): PostgreSQL at 32 workers at least its 8-worker figure, both kinds of
task; at least 1,000 tasks/s with 8 workers on flat trivial tasks. Reported, not
enforced: only a correctness violation makes the exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import tempfile
import time
import typing as t
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (benchmarks/run.py: scenarios, checks, tables)

#: kind -> (seconds per task, {workers: tasks}) for the full run and for --quick (16
#: workers, not 32: starting 32 interpreters four times takes most of a minute on 2 cores)
SIZES = {
    "trivial": (0.0, {1: 10_000, 8: 20_000, 32: 20_000}),
    "10 ms": (0.01, {1: 500, 8: 2_000, 32: 4_000}),
}
QUICK_SIZES = {
    "trivial": (0.0, {1: 1_000, 8: 2_000, 16: 2_000}),
    "10 ms": (0.01, {1: 50, 8: 200, 16: 400}),
}
BACKENDS = ("sqlite", "postgres")
AGAINST = "against"  # --against: PostgreSQL with the laufband of another checkout
UPSTREAM_WORKERS = (1, 8)  # 0.2.1 at more workers: see --upstream-32
PG_TARGET = 1000.0  # tasks/s, 8 workers, flat trivial, PostgreSQL


@dataclasses.dataclass
class Cell:
    kind: str
    workers: int
    tasks: int
    sleep: float

    def scenario(self) -> bench.Scenario:
        return bench.Scenario(f"flat {self.kind}", f"flat:{self.tasks}", self.workers,
                              sleep=self.sleep, deadline=300.0)


# ------------------------------------------------------------------ the server
class Server:
    """The PostgreSQL server: a fresh database per run, its statistics, the cleanup."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        parsed = sa.engine.make_url(url)
        if parsed.get_backend_name() != "postgresql":
            raise SystemExit(f"--postgres: not a PostgreSQL URL: {url}")
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.url = parsed
        self.shown = parsed.render_as_string(hide_password=True)
        self.made: list[str] = []

    def libpq(self, database: str | None = None) -> str:
        url = self.url.set(drivername="postgresql")
        if database:
            url = url.set(database=database)
        return url.render_as_string(hide_password=False)

    def laufband_url(self, database: str) -> str:
        return self.url.set(database=database).render_as_string(hide_password=False)

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.libpq(), autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def describe(self) -> dict:
        names = ("server_version", "max_connections", "shared_buffers", "fsync",
                 "synchronous_commit", "data_directory")
        out = {n: self.sql(f"SHOW {n}")[0][0] for n in names if n != "data_directory"}
        with contextlib.suppress(Exception):  # superusers only
            out["data_directory"] = self.sql("SHOW data_directory")[0][0]
        out["url"] = self.shown
        out["connections_in_use"] = self.sql("SELECT count(*) FROM pg_stat_activity "
                                             "WHERE backend_type = 'client backend'")[0][0]
        out["round_trip_ms"] = self.round_trip_ms()
        return out

    def round_trip_ms(self, n: int = 200) -> float:
        """A statement's round trip to the server (the median of ``n``), in ms."""
        import psycopg

        with psycopg.connect(self.libpq(), autocommit=True, connect_timeout=10) as conn:
            times = []
            for _ in range(n):
                start = time.perf_counter()
                conn.execute("SELECT 1")
                times.append(time.perf_counter() - start)
        return sorted(times)[n // 2] * 1000

    def create(self) -> str:
        name = f"lb_bench_{uuid.uuid4().hex[:12]}"
        self.sql(f'CREATE DATABASE "{name}"')
        self.made.append(name)
        return name

    def stats(self, name: str) -> dict:
        """The run's database as the server saw it, once its sessions are gone (a
        session reports its statistics as it exits)."""
        by = time.monotonic() + 5
        while time.monotonic() < by and self.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,))[0][0]:
            time.sleep(0.05)
        time.sleep(0.2)
        rows = self.sql("SELECT xact_commit, xact_rollback, pg_database_size(datname) "
                        "FROM pg_stat_database WHERE datname = %s", (name,))
        if not rows:
            return {}
        commits, rollbacks, size = rows[0]
        return {"xact_commit": commits, "xact_rollback": rollbacks, "db_mb": size / 2**20}

    def drop(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.made.remove(name)

    def drop_all(self) -> None:
        for name in list(self.made):
            with contextlib.suppress(Exception):
                self.drop(name)


# -------------------------------------------------------------------- one cell
class Context(bench.Context):
    """run.py's context; its progress lines and failures name the backend (run_once
    labels them [current] or [upstream])."""

    backend = ""

    def say(self, text: str) -> None:
        tag = f"[{self.backend}]"
        super().say(text.replace("[current] ", tag.ljust(10)).replace("[current]", tag))


def run_cell(ctx: Context, server: Server, cell: Cell, backend: str) -> bench.Result:
    sc = cell.scenario()
    ctx.backend = backend
    known = len(ctx.failures)
    against = ctx.args.against if backend == AGAINST else None
    if backend == "sqlite":
        res = bench.run_once(ctx, sc, "current")
    else:
        name = server.create()
        os.environ["BENCH_DB_URL"] = server.laufband_url(name)  # worker.py's --db
        if against:
            os.environ["PYTHONPATH"] = against  # its laufband before this checkout's
        try:
            res = bench.run_once(ctx, sc, "current")
        finally:
            os.environ.pop("BENCH_DB_URL", None)
            if against:
                os.environ.pop("PYTHONPATH", None)
            try:
                stats = server.stats(name)
            finally:
                server.drop(name)
        res.db_mb = stats.get("db_mb", 0.0)
        res.timer_calls["pg_xact_commit"] = stats.get("xact_commit", 0)
        res.timer_calls["pg_xact_rollback"] = stats.get("xact_rollback", 0)
    ctx.failures[known:] = [f.replace("[current]", f"[{backend}]")
                            for f in ctx.failures[known:]]
    want = "sqlite" if backend == "sqlite" else "postgresql+psycopg"
    used = {info.get("db_scheme") for info in res.workers_info}
    home = str(Path(against or HERE.parent).resolve())
    where = {str(Path(info.get("laufband_file", home)).resolve().parent.parent)
             for info in res.workers_info}
    problem = ""
    if used != {want}:
        problem = f"workers used {sorted(map(str, used))}, not {want}"
    elif where != {home}:
        problem = f"workers imported laufband from {sorted(where)}, not {home}"
    if problem:
        res.problems.append(problem)
        res.ok = False
        ctx.failures.append(f"{sc.name} x{sc.workers} [{backend}]: {problem}")
    return res


def median(runs: list[bench.Result]) -> bench.Result:
    """The run with the median throughput; every run's problems count (as run.py)."""
    chosen = sorted(runs, key=lambda r: r.tasks_per_s)[len(runs) // 2]
    chosen.repeats = [r.tasks_per_s for r in runs]
    for r in runs:
        if r is not chosen and r.problems:
            chosen.ok = False
            chosen.problems += r.problems
    return chosen


# ---------------------------------------------------------------------- report
def cells(quick: bool, scale: float = 1.0) -> list[Cell]:
    sizes = QUICK_SIZES if quick else SIZES
    return [Cell(kind, w, max(1, round(n * scale)), sleep)
            for kind, (sleep, counts) in sizes.items() for w, n in counts.items()]


def rate(r: bench.Result | None) -> str:
    if r is None:
        return "-"
    text = bench.f1(r.tasks_per_s, 0)
    if len(r.repeats) > 1:
        text += f" ({min(r.repeats):,.0f}-{max(r.repeats):,.0f})"
    return text + ("" if r.ok else " FAILED")


def cell_notes(got: dict[str, bench.Result]) -> str:
    """What went wrong (0.2.1 running into its deadline is reported, not a failure)."""
    parts = []
    for backend, short in (("sqlite", "SQLite"), ("postgres", "PG"), ("upstream", "0.2.1")):
        r = got.get(backend)
        if r is not None and r.problems:
            parts.append(f"{short}: {'; '.join(r.problems[:1])}")
    return "; ".join(parts)


def both(got: dict[str, bench.Result], what: t.Callable[[bench.Result], str]) -> str:
    return " / ".join(what(got[b]) if b in got else "-" for b in BACKENDS)


def main_table(rows_in: list[tuple[Cell, dict[str, bench.Result]]], upstream: bool,
               against: str = "") -> str:
    rows = []
    for cell, got in rows_in:
        lite, pg, old = got.get("sqlite"), got.get("postgres"), got.get("upstream")
        ratio = (f"{pg.tasks_per_s / lite.tasks_per_s:.2f}"
                 if lite and pg and lite.tasks_per_s else "-")
        xacts = (f"{pg.timer_calls.get('pg_xact_commit', 0) / pg.tasks:.2f}"
                 if pg and pg.tasks else "-")
        row = [f"flat {cell.kind}", cell.workers, f"{cell.tasks:,}", rate(lite),
               bench.f1(lite.setup_s if lite else None), rate(pg),
               bench.f1(pg.setup_s if pg else None), ratio, xacts]
        if against:
            base = got.get(AGAINST)
            row += [rate(base), f"{pg.tasks_per_s / base.tasks_per_s:.2f}"
                    if pg and base and base.tasks_per_s else "-"]
        if upstream:
            row += [rate(old) if old else "skipped", bench.f1(old.setup_s if old else None)]
        eff = (both(got, lambda r: f"{100 * (r.efficiency or 0):.0f} %") if cell.sleep
               else "-")
        rows.append([*row, eff, both(got, lambda r: f"{r.other_cpu:.1f}"), cell_notes(got)])
    headers = ["tasks", "workers", "n", "SQLite tasks/s", "setup s", "PostgreSQL tasks/s",
               "setup s", "PG/SQLite", "PG xacts/task"]
    if against:
        headers += [f"PG {against} tasks/s", f"PG/{against}"]
    if upstream:
        headers += [f"{bench.UPSTREAM} tasks/s (SQLite)", "setup s"]
    return bench.table([*headers, "eff SQLite / PG", "others SQLite / PG", "notes"], rows,
                       "Throughput, batch_size='auto' (median of the runs; the range in "
                       "brackets). eff: tasks/s against workers / 10 ms. others: cores "
                       "other processes used meanwhile (for PostgreSQL, the server's too)")


def targets(rows_in: list[tuple[Cell, dict[str, bench.Result]]], quick: bool
            ) -> list[list[str]]:
    def pg(kind: str, workers: int) -> bench.Result | None:
        return next((got.get("postgres") for cell, got in rows_in
                     if cell.kind == kind and cell.workers == workers), None)

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    out = []
    most = max((cell.workers for cell, _ in rows_in), default=0)
    for kind in SIZES:
        a, b = pg(kind, 8), pg(kind, most)
        if a and b and most > 8:
            out.append([f"PostgreSQL, flat {kind}: {most} workers >= 8 workers",
                        f"{b.tasks_per_s:,.0f} / {a.tasks_per_s:,.0f} tasks/s",
                        yes(b.tasks_per_s >= a.tasks_per_s)])
    a = pg("trivial", 8)
    if a:
        out.append([f"PostgreSQL, flat trivial, 8 workers >= {PG_TARGET:,.0f} tasks/s",
                    f"{a.tasks_per_s:,.0f} tasks/s", yes(a.tasks_per_s >= PG_TARGET)])
    if quick:
        out = [[f"{t} (quick sizes)", m, ok] for t, m, ok in out]
    return out


def header(info: dict, args: argparse.Namespace, pg: dict) -> str:
    text = bench.header(info, args).replace("# laufband benchmark",
                                            "# laufband backends benchmark", 1)
    where = f", data in {pg['data_directory']}" if "data_directory" in pg else ""
    return (f"{text}\n- PostgreSQL {pg['server_version']} at {pg['url']}{where}: "
            f"max_connections {pg['max_connections']}, shared_buffers "
            f"{pg['shared_buffers']}, fsync {pg['fsync']}, synchronous_commit "
            f"{pg['synchronous_commit']}; {pg['connections_in_use']} client connections "
            f"open at the start; a round trip (SELECT 1) {pg['round_trip_ms']:.2f} ms\n"
            f"- {args.repeat} run(s) per cell, in rounds; batch_size='auto'")


# ------------------------------------------------------------------------ main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--postgres", default=os.environ.get("LAUFBAND_TEST_POSTGRES", ""),
                   metavar="URL", help="the server (default: $LAUFBAND_TEST_POSTGRES)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, one run each (CI smoke run, under a minute)")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs of each cell, the median is shown (default 3; 1 with --quick)")
    p.add_argument("--compare-upstream", action="store_true",
                   help=f"also laufband {bench.UPSTREAM} on SQLite (own cached virtualenv), "
                   "one run per cell, 1 and 8 workers")
    p.add_argument("--upstream-32", action="store_true",
                   help=f"with --compare-upstream: {bench.UPSTREAM} at 32 (16) workers too")
    p.add_argument("--upstream-deadline", type=float, default=0.0,
                   help=f"seconds a {bench.UPSTREAM} cell may run before it is closed and "
                   "counted (default 30, 15 with --quick)")
    p.add_argument("--only", default="", help="cells whose 'kind xWORKERS' matches this "
                   "regex, e.g. 'trivial x(8|32)'")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated, of: sqlite, postgres (default both)")
    p.add_argument("--against", default="", metavar="DIR",
                   help="also run every PostgreSQL cell with the laufband of DIR (a "
                   "checkout of another commit), in the same rounds")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="where the SQLite scenario directories are made (the disk under test)")
    p.add_argument("--keep", action="store_true", help="keep the SQLite scenario directories")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every cell's task count (e.g. 5: longer runs, in which "
                   "the workers' fixed costs of start and end weigh less)")
    p.add_argument("--json", help="write every measurement to this file")
    args = p.parse_args()
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.scale <= 0:
        p.error(f"--scale {args.scale}: must be above 0")
    args.backends = tuple(b for b in BACKENDS if b in args.backends.split(","))
    if args.against:
        if not (Path(args.against) / "laufband" / "__init__.py").exists():
            p.error(f"--against {args.against}: no laufband package in it")
        args.against = str(Path(args.against).resolve())
    if not args.postgres:
        print("backends.py needs a PostgreSQL server: pass --postgres URL, or start the "
              "throw-away one and export its URL with\n\n"
              '    eval "$(scripts/postgres-up.sh)"\n', file=sys.stderr)
        return 2

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)  # so that workers and databases go
    server = Server(args.postgres)
    try:
        return run(args, server)
    except KeyboardInterrupt:
        print("\ninterrupted; worker processes were stopped", file=sys.stderr)
        return 130
    finally:
        server.drop_all()


def run(args: argparse.Namespace, server: Server) -> int:
    try:
        pg_info = server.describe()
    except Exception as exc:
        print(f"cannot reach PostgreSQL at {server.shown}: {str(exc).strip()}\n"
              'start the throw-away server with: eval "$(scripts/postgres-up.sh)"',
              file=sys.stderr)
        return 2
    ctx = Context(args)
    started = time.monotonic()
    info = bench.machine()
    info["filesystem"] = bench.filesystem(ctx.workdir)
    if args.compare_upstream:
        ctx.python["upstream"] = bench.upstream_python(ctx)
    only = re.compile(args.only) if args.only else None
    todo = [c for c in cells(args.quick, args.scale)
            if only is None or only.search(f"{c.kind} x{c.workers}")]
    whole = bench.CpuMeter()
    print(header(info, args, pg_info))

    runs: dict[tuple[int, str], list[bench.Result]] = {}
    for round_ in range(args.repeat):
        ctx.say(f"round {round_ + 1} of {args.repeat}")
        for i, cell in enumerate(todo):
            # alternate which backend goes first, so that neither always follows the other
            backends = (*args.backends, AGAINST) if args.against else args.backends
            order = backends if (i + round_) % 2 == 0 else backends[::-1]
            for backend in order:
                runs.setdefault((i, backend), []).append(run_cell(ctx, server, cell, backend))
    skipped_32 = False
    most = max((c.workers for c in todo), default=0)
    if args.compare_upstream:
        ctx.say(f"laufband {bench.UPSTREAM} (SQLite)")
        for i, cell in enumerate(todo):
            if cell.workers not in UPSTREAM_WORKERS and not args.upstream_32:
                skipped_32 = True
                continue
            runs[(i, "upstream")] = [bench.run_once(ctx, cell.scenario(), "upstream")]

    rows = [(cell, {b: median(runs[(i, b)]) for b in (*BACKENDS, AGAINST, "upstream")
                    if (i, b) in runs}) for i, cell in enumerate(todo)]
    print(main_table(rows, args.compare_upstream,
                     Path(args.against).name if args.against else ""))
    if skipped_32:
        print(f"\n{bench.UPSTREAM} at {most} workers skipped (so many processes contend for "
              "its file lock that a cell takes the whole deadline; --upstream-32 runs them).")
    checks = targets(rows, args.quick)
    if checks:
        print(bench.table(["target", "measured", "met"], checks, "Targets"))
    elapsed = time.monotonic() - started
    info["others_cores"] = whole.others()
    after = bench.machine()
    bench.print_footer(ctx, info, after, elapsed,
                       others=" (the PostgreSQL server counts as one)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": info, "postgres": pg_info, "quick": args.quick,
            "repeat": args.repeat, "elapsed_s": elapsed, "targets": checks,
            "failures": ctx.failures,
            "cells": [{"cell": dataclasses.asdict(cell),
                       "median": {b: r.to_json() for b, r in got.items()},
                       "runs": {b: [r.tasks_per_s for r in runs[(i, b)]] for b in got}}
                      for i, (cell, got) in enumerate(rows)],
        }, indent=1, default=str))
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    sys.exit(main())
