"""The physical limit on PostgreSQL: laufband's step, without laufband.

What flat trivial tasks can reach on this machine and server when N worker processes
run only the server side of laufband's step, with psycopg 3 and nothing else (no
SQLAlchemy, no waiting, no heartbeats, no listening, no prefetch): the PostgreSQL
counterpart of baseline.py. backends.py measures laufband itself; put the two side by
side (same machine, one after the other) to see what laufband adds, and how much of a
drop from 8 to 32 workers the machine itself makes.

Each process connects, waits for a common start, then loops over one transaction per
batch until it finds no ready task and has nothing left to record:

    complete the previous batch    UPDATE tasks (state, running), UPDATE attempts
    find ready tasks               SELECT ... ORDER BY priority, depth, pk LIMIT batch
                                   FOR UPDATE SKIP LOCKED (laufband's claim index)
    claim them                     UPDATE tasks + INSERT INTO attempts, one statement
    record, count, commit          one pipeline: INSERT INTO events with SELECT ... FROM
                                   counts ORDER BY ... FOR UPDATE, UPDATE counts, COMMIT

Variants (--variants):

    step          the above (every step locks the same counts rows to its commit)
    no-counts     the same without the counts (events inserted, then COMMIT)
    partitioned   no counts, and each process claims from its own share of the tasks
                  (no SKIP LOCKED contention: nothing shared but the server)

Wall = start until the last process ended; every task must be claimed exactly once
(checked from what the processes report; exit 1 if not). A cell shows the median of
--repeat runs, run in rounds (each round runs every cell once).

    python benchmarks/pg_baseline.py                       # 8 and 32 workers, 20,000 tasks
    python benchmarks/pg_baseline.py --workers 1,8,32 --tasks 100000 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from backends import Server  # noqa: E402
from run import table  # noqa: E402

VARIANTS = ("step", "no-counts", "partitioned")
STATES = ("pending", "ready", "running", "completed")


def create_schema(conn, tasks: int, shares: int) -> None:
    """laufband's tables as far as the step touches them, with their indexes."""
    for sql in (
        "CREATE TABLE tasks (pk serial PRIMARY KEY, id text UNIQUE NOT NULL,"
        " state text NOT NULL, reqset int NOT NULL, priority int NOT NULL DEFAULT 0,"
        " depth int NOT NULL DEFAULT 0, attempts int NOT NULL DEFAULT 0,"
        " running int NOT NULL DEFAULT 0, updated_at float8)",
        "CREATE INDEX ix_claim ON tasks (state, reqset, priority DESC, depth DESC, pk)",
        "CREATE TABLE attempts (task int NOT NULL, attempt int NOT NULL, worker text,"
        " started_at float8, ended_at float8, outcome text, PRIMARY KEY (task, attempt))",
        "CREATE INDEX ix_live ON attempts (worker, ended_at)",
        "CREATE TABLE events (id bigserial PRIMARY KEY, task int, attempt int, event text,"
        " state text, worker text, at float8)",
        "CREATE INDEX ix_events_task ON events (task)",
        "CREATE TABLE counts (reqset int, state text, n int, PRIMARY KEY (reqset, state))",
    ):
        conn.execute(sql)
    # A share is a requirement set: the partitioned variant claims from its own only.
    conn.execute("INSERT INTO tasks (id, state, reqset) SELECT 't' || g, 'ready', g %% %s"
                 " FROM generate_series(1, %s) g", (shares, tasks))
    conn.execute("INSERT INTO counts SELECT r, s, CASE WHEN s = 'ready' THEN"
                 " (SELECT count(*) FROM tasks WHERE reqset = r) ELSE 0 END"
                 " FROM generate_series(0, %s - 1) r, unnest(%s::text[]) s",
                 (shares, list(STATES)))
    conn.execute("VACUUM ANALYZE")


class Step:
    """One process's transactions (see the module's docstring)."""

    def __init__(self, conn, me: str, share: int | None, counts: bool, batch: int) -> None:
        self.conn, self.me, self.share, self.counts, self.batch = conn, me, share, counts, batch

    def run(self) -> list[int]:
        ran: list[int] = []
        prev: list[int] = []
        while True:
            now = time.time()
            if prev:
                self._complete(prev, now)
            found = self._claim(now)
            if not found and not prev:
                self.conn.rollback()
                return ran
            self._commit(prev, found, now)
            ran += found
            prev = found  # trivial tasks: the batch "ran"

    def _complete(self, pks: list[int], now: float) -> None:
        self.conn.execute("UPDATE tasks SET running = running - 1, state = 'completed',"
                          " updated_at = %s WHERE pk = ANY(%s)", (now, pks))
        self.conn.execute("UPDATE attempts SET ended_at = %s, outcome = 'completed'"
                          " WHERE worker = %s AND ended_at IS NULL", (now, self.me))

    def _claim(self, now: float) -> list[int]:
        where, params = ("reqset = %s", [self.share]) if self.share is not None else ("true", [])
        found = [r[0] for r in self.conn.execute(
            f"SELECT pk FROM tasks WHERE state = 'ready' AND {where}"
            " ORDER BY priority DESC, depth DESC, pk LIMIT %s FOR UPDATE SKIP LOCKED",
            (*params, self.batch))]
        if found:
            self.conn.execute(
                "WITH c AS (UPDATE tasks SET attempts = attempts + 1, running = running + 1,"
                " state = 'running', updated_at = %s WHERE pk = ANY(%s) RETURNING pk, attempts)"
                " INSERT INTO attempts (task, attempt, worker, started_at)"
                " SELECT pk, attempts, %s, %s FROM c", (now, found, self.me, now))
        return found

    def _commit(self, prev: list[int], found: list[int], now: float) -> None:
        events = ("INSERT INTO events (task, attempt, event, state, worker, at)"
                  " SELECT t, 1, e, e, %s, %s FROM unnest(%s::int[], %s::text[]) AS u(t, e)")
        params = (self.me, now, prev + found,
                  ["completed"] * len(prev) + ["claimed"] * len(found))
        if not self.counts:
            self.conn.execute(events, params)
            self.conn.commit()
            return
        with self.conn.pipeline():
            self.conn.execute(f"WITH ev AS ({events}) SELECT * FROM counts"
                              " ORDER BY reqset, state FOR UPDATE", params)
            self.conn.execute(
                "UPDATE counts SET n = n + d.delta FROM unnest(%s::text[], %s::int[])"
                " AS d(state, delta) WHERE counts.reqset = 0 AND counts.state = d.state",
                (["ready", "running", "completed"],
                 [-len(found), len(found) - len(prev), len(prev)]))
            self.conn.commit()


def worker(argv: list[str]) -> int:
    """One process: libpq URL, name, share (-1: none), counts (0/1), batch, go, out."""
    import psycopg

    url, me, share, counts, batch, go, out = argv
    conn = psycopg.connect(url)
    conn.execute("SELECT 1").fetchall()
    conn.commit()
    Path(out + ".ready").touch()
    while not os.path.exists(go):
        time.sleep(0.002)
    step = Step(conn, me, None if share == "-1" else int(share), counts == "1", int(batch))
    ran = step.run()
    end = time.monotonic_ns()
    conn.close()
    Path(out).write_text(f"{end} {' '.join(map(str, ran))}\n")
    return 0


def run_cell(server: Server, variant: str, workers: int, tasks: int, batch: int
             ) -> tuple[float, str]:
    """tasks/s of one run, and a problem ('' if every task was claimed exactly once)."""
    import psycopg

    name = server.create()
    try:
        with psycopg.connect(server.libpq(name), autocommit=True) as conn:
            create_schema(conn, tasks, workers if variant == "partitioned" else 1)
        with tempfile.TemporaryDirectory() as folder:
            go = os.path.join(folder, "go")
            outs = [os.path.join(folder, f"w{i}") for i in range(workers)]
            procs = [subprocess.Popen(
                [sys.executable, __file__, "--worker", server.libpq(name), f"w{i}",
                 str(i if variant == "partitioned" else -1), "0" if variant != "step" else "1",
                 str(batch), go, out]) for i, out in enumerate(outs)]
            try:
                while not all(os.path.exists(o + ".ready") for o in outs):
                    if any(p.poll() is not None for p in procs):
                        return 0.0, "a worker exited before the start"
                    time.sleep(0.01)
                start = time.monotonic_ns()
                Path(go).touch()
                for p in procs:
                    p.wait(timeout=600)
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                    p.wait()
            if any(p.returncode for p in procs) or not all(os.path.exists(o) for o in outs):
                return 0.0, "a worker failed"
            ends, ran = [], []
            for out in outs:
                end, *ids = Path(out).read_text().split()
                ends.append(int(end))
                ran += ids
    finally:
        server.drop(name)
    problem = "" if len(ran) == tasks == len(set(ran)) else (
        f"{len(ran)} claims of {len(set(ran))} distinct tasks, {tasks} expected")
    return tasks / ((max(ends) - start) / 1e9), problem


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--postgres", default=os.environ.get("LAUFBAND_TEST_POSTGRES", ""),
                   metavar="URL", help="the server (default: $LAUFBAND_TEST_POSTGRES)")
    p.add_argument("--workers", default="8,32", help="comma-separated (default 8,32)")
    p.add_argument("--tasks", type=int, default=20_000, help="flat tasks per run (20,000)")
    p.add_argument("--batch", type=int, default=256, help="tasks per claim (256, as "
                   "laufband's largest automatic batch)")
    p.add_argument("--repeat", type=int, default=3, help="runs per cell, in rounds (3)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of: {', '.join(VARIANTS)}")
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    try:
        sizes = [int(w) for w in args.workers.split(",")]
    except ValueError:
        p.error(f"--workers {args.workers}: comma-separated whole numbers, e.g. 8,32")
    if bad or not variants:
        p.error(f"--variants: unknown {bad or 'none given'}; choose from {', '.join(VARIANTS)}")
    if min(sizes) < 1 or args.tasks < 1 or args.batch < 1 or args.repeat < 1:
        p.error("--workers, --tasks, --batch and --repeat must be at least 1")
    if not args.postgres:
        print("pg_baseline.py needs a PostgreSQL server: pass --postgres URL, or start the "
              'throw-away one with\n\n    eval "$(scripts/postgres-up.sh)"\n', file=sys.stderr)
        return 2
    server = Server(args.postgres)
    cells = [(v, w) for v in variants for w in sizes]
    got: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    problems = []
    try:
        for r in range(args.repeat):
            print(f"round {r + 1} of {args.repeat}", flush=True)
            for variant, w in cells:
                rate, problem = run_cell(server, variant, w, args.tasks, args.batch)
                print(f"  {variant:<12} x{w:<3} {rate:9,.0f} tasks/s {problem or 'ok'}",
                      flush=True)
                got[(variant, w)].append(rate)
                if problem:
                    problems.append(f"{variant} x{w}: {problem}")
    finally:
        server.drop_all()
    rows = []
    for variant in variants:
        base = statistics.median(got[(variant, sizes[0])])
        for w in sizes:
            runs = got[(variant, w)]
            rows.append([variant, w, f"{statistics.median(runs):,.0f} ({min(runs):,.0f}-"
                         f"{max(runs):,.0f})", f"{statistics.median(runs) / base:.2f}"])
    print(table(["variant", "workers", "tasks/s, median (range)", f"/ x{sizes[0]}"], rows,
                f"PostgreSQL without laufband: {args.tasks:,} flat trivial tasks, batch "
                f"{args.batch}, {os.cpu_count()} cores, server {server.shown}"))
    for line in problems:
        print("PROBLEM:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
