"""The operator's commands on a big workflow database: prints markdown tables.

    python benchmarks/operations.py             # 1,000,010 tasks (a few minutes to build)
    python benchmarks/operations.py --quick     # 20,010 tasks (CI smoke run, < 30 s)
    python benchmarks/operations.py --keep      # keep the database; reuse it next time

1. The database, built with laufband's own API by real worker processes (each a
   SLURM-like array task: SLURM_* variables set, so `laufband workers` shows jobs):
   a DAG of 10 components, each a root and LAYERS layers of WIDTH tasks depending on 2
   tasks of the layer before (every tenth layer needs the label "gpu"), as
   benchmarks/incremental.py; 1,000,010 tasks (--quick: 20,010). Tasks run in graph
   order, layer after layer across the components. The target is 150,000 completions
   (--quick: 4,000), run with ``worker.map(fn, threads=N)`` (one attempt per task,
   results stored, errors with tracebacks; max_failed_retries=1):
     A  registers the graph, completes 70 % of the target, goes offline;
     K  completes 2 % and is SIGKILLed while running 8 tasks;
     B1 takes K's identifier over (a requeued job: K is declared dead, its 8 attempts
        are killed and run again), B2 and B3 run beside it; 12 % each, then offline;
     H  (heartbeat_timeout one day: looks alive, "a hung node") and D (no labels,
        timeout 20 s: it "just died", expired but not reaped) complete 2 % each and
        are SIGKILLed while running 8 tasks each; no worker is left to reap them.
   On the way, whichever worker meets them: one task of component 0's second layer
   fails twice (FileNotFoundError) and blocks most of that component; 2 tasks of
   component 1 (RuntimeError) and about 10 of each other component in the last layer
   reached (ValueError, 3 messages) fail twice; one task in 503 fails once (OSError)
   and completes on its retry.
   The processes are killed while all their task threads wait and the coordinator is
   idle, so no transaction is interrupted; a lock file left anyway is broken by a read.
   The database is cached under --workdir (``--keep``) with a sidecar JSON; it is
   rebuilt if its size, the schema version or BUILD_VERSION differs, or with
   ``--rebuild``. No SQL writes: the summary table reads the file with sqlite3.
2. The commands as an operator types them (the `laufband` script of this
   interpreter, on this checkout), each a process of its own (interpreter start and
   imports count), wall clock, one warm-up run and then the median of 5 (3 with
   --quick); compiled modules are cached (under --workdir) as for an installed
   package, whatever PYTHONDONTWRITEBYTECODE says: `laufband --db DB status` (target
   < 1 s), `status --json`, `workers`, `tasks --state failed --limit 20`,
   `explain <a task that failed>`.
3. In-process: one `laufband watch` refresh (``cli.watch_view(store)`` and rendering
   it, median of 10; target < 0.2 s), ``cli.status_data``, and the total of
   ``python -X importtime -c "import laufband.cli"`` with its largest packages (each
   its outermost import's cumulative time, so nested ones overlap: importlib.metadata
   is imported by tqdm, asyncio by sqlalchemy).

The throughput windows of `status` (completions in the last 1, 5, 15 minutes) are
empty on a database built more than 15 minutes ago (the first table says so).
Nothing here asserts a speed: targets are reported as met or not.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from laufband import Graphband, Task  # noqa: E402

COMPONENTS = 10
TARGETS = {"status": 1.0, "watch": 0.2}  # seconds
SIZES = {"full": (100, 1000, 150_000), "quick": (20, 100, 4_000)}  # layers, width, done
BUILD_VERSION = 1  # bump when the build below changes (cached databases are rebuilt)


# ---------------------------------------------------------------------- the graph
def graph(layers: int, width: int) -> list[Task]:
    """COMPONENTS components: c/root -> layers x width, 2 dependencies each; every
    tenth layer needs the label "gpu"."""
    gpu = frozenset({"gpu"})
    tasks = []
    for c in range(COMPONENTS):
        root = f"{c}/root"
        tasks.append(Task(root))
        previous = [root]
        for layer in range(layers):
            ids = [f"{c}/{layer}/{i}" for i in range(width)]
            needs = gpu if layer % 10 == 9 else frozenset()
            for i, tid in enumerate(ids):
                deps = {previous[i % len(previous)], previous[(i * 7 + 3) % len(previous)]}
                tasks.append(Task(tid, dependencies=deps, requirements=needs))
            previous = ids
    return tasks


def failure(task_id: str, attempt: int, layers: int, width: int, depth: int
            ) -> Exception | None:
    """The error a task's attempt raises, if any: a few kinds, as in a real workflow.
    Tasks run layer after layer across the components (graph order), so by the end of
    the build about ``depth`` layers are done: the failures are placed above that."""
    if task_id.endswith("root"):
        return None
    c, layer, i = map(int, task_id.split("/"))
    if c == 0 and layer == 1 and i == width // 2:  # blocks most of component 0
        return FileNotFoundError(2, "No such file or directory", f"/scratch/in/{task_id}.h5")
    if c == 1 and layer == depth - 2 and i in (width // 8, width // 2 + 6):
        return RuntimeError("solver did not converge after 500 iterations")
    if c >= 2 and layer == depth - 1 and i % 97 == 7:
        return ValueError(f"NaN in output column {i % 3}")
    if attempt == 1 and (layer * width + i) % 503 == 0:
        return OSError(5, "Input/output error")  # flaky: the retry completes
    return None


def done_depth(width: int, target: int) -> int:
    """About how many layers are done at the end of the build."""
    return target // (COMPONENTS * width)


def explained_task(width: int, target: int) -> str:
    """A task that failed for good (twice), with descendants blocked behind it."""
    return f"1/{done_depth(width, target) - 2}/{width // 8}"


# ------------------------------------------------------------ a worker process
def worker_main(args: argparse.Namespace) -> int:
    """One build phase (a process of its own): run ``args.count`` tasks with
    map(threads=args.threads), then go offline, or (``--park``) let every thread wait
    inside a task, say "parked" and wait to be SIGKILLed."""
    layers, width = args.layers, args.width
    worker = Graphband(graph(layers, width), db=args.db, identifier=args.identifier,
                       labels=args.labels.split(",") if args.labels else None,
                       max_failed_retries=1, heartbeat_timeout=args.timeout,
                       heartbeat_interval=min(30.0, args.timeout / 3),
                       tqdm_kwargs={"disable": True})
    lock = threading.Lock()
    done = [0, 0]  # completed, parked threads
    forever = threading.Event()

    def run(task: Task) -> dict:
        error = failure(task.id, worker.attempt or 1, layers, width,
                        done_depth(width, args.target))
        if error is not None:
            raise error
        with lock:
            if done[0] >= args.count:
                if not args.park:
                    worker.close()
                    return {"path": f"/scratch/out/{task.id}.h5"}
                done[1] += 1
                if done[1] == args.threads:
                    print("parked", flush=True)
                park = True
            else:
                done[0] += 1
                park = False
        if park:
            forever.wait()
        return {"path": f"/scratch/out/{task.id}.h5", "rows": len(task.id) * 1000}

    summary = worker.map(run, threads=args.threads)
    print(json.dumps({"completed": summary.completed, "failed": summary.failed}),
          flush=True)
    return 0


class Phase:
    """A build phase running in a process of its own."""

    def __init__(self, db: Path, sizes: tuple[int, int, int], name: str, count: int,
                 job: int, node: str, threads: int = 32, park: bool = False,
                 timeout: float = 60.0, labels: str = "gpu", identifier: str | None = None
                 ) -> None:
        self.name, self.park = name, park
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_JOB_ID": str(5000 + job),
               "SLURM_ARRAY_JOB_ID": "5000", "SLURM_ARRAY_TASK_ID": str(job),
               "SLURMD_NODENAME": node}
        cmd = [sys.executable, __file__, "--worker", "--db", str(db),
               "--layers", str(sizes[0]), "--width", str(sizes[1]),
               "--target", str(sizes[2]),
               "--identifier", identifier or f"{node}:5000_{job}",
               "--count", str(count), "--threads", str(threads), "--timeout", str(timeout),
               "--labels", labels] + (["--park"] if park else [])
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)

    def wait(self) -> None:
        """Until it ended (or, parked, until it is parked; then SIGKILL it)."""
        assert self.proc.stdout is not None
        if self.park:
            line = self.proc.stdout.readline()
            if line.strip() != "parked":
                self.proc.wait()
                raise SystemExit(f"build phase {self.name} did not park: {line!r}")
            time.sleep(0.2)  # the coordinator waits for its threads now
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            return
        self.proc.communicate()
        if self.proc.returncode != 0:
            raise SystemExit(f"build phase {self.name} failed ({self.proc.returncode})")


def build(db: Path, sizes: tuple[int, int, int]) -> float:
    target = sizes[2]
    started = time.perf_counter()

    def run(*phases: Phase) -> None:
        for p in phases:
            p.wait()
        print(f"  {', '.join(p.name for p in phases)} done after "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    geo = sizes
    print(f"building {db} ...", file=sys.stderr, flush=True)
    run(Phase(db, geo, "A (registers)", int(0.70 * target), 1, "node01"))
    run(Phase(db, geo, "K (killed)", int(0.02 * target), 2, "node02", threads=8, park=True))
    # B1 takes K's identifier over: a requeued array task.
    run(Phase(db, geo, "B1", int(0.12 * target), 2, "node02"),
        Phase(db, geo, "B2", int(0.12 * target), 3, "node03"),
        Phase(db, geo, "B3", int(0.12 * target), 4, "node04"))
    run(Phase(db, geo, "H (hung)", int(0.02 * target), 5, "node05", threads=8, park=True,
              timeout=86400.0),
        Phase(db, geo, "D (just died)", int(0.02 * target), 6, "node06", threads=8,
              park=True, timeout=20.0, labels=""))
    lockfile = Path(f"{db}.lock")
    if lockfile.exists():  # a kill during a heartbeat: the next reader breaks it
        print("  a lock file was left: waiting for it to expire", file=sys.stderr)
        from laufband.cli import open_store

        open_store(str(db)).counts()
    return time.perf_counter() - started


def schema_version() -> int:
    from laufband.store import schema

    return schema.SCHEMA_VERSION


def prepare(workdir: Path, sizes: tuple[int, int, int], keep: bool, rebuild: bool
            ) -> tuple[Path, dict]:
    layers, width, target = sizes
    n = COMPONENTS * (layers * width + 1)
    db = workdir / f"operations-{n}.sqlite"
    sidecar = Path(f"{db}.json")
    wanted = {"tasks": n, "target": target, "schema": schema_version(),
              "build": BUILD_VERSION}
    if keep and not rebuild and db.exists() and sidecar.exists():
        meta = json.loads(sidecar.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            meta["reused"] = True
            return db, meta
    for old in workdir.glob(f"{db.name}*"):
        old.unlink()
    build_s = build(db, sizes)
    meta = {**wanted, "built_at": time.time(), "build_s": build_s,
            "commit": git("rev-parse", "--short", "HEAD"), "reused": False}
    sidecar.write_text(json.dumps(meta))
    return db, meta


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


# ------------------------------------------------------------------ the database
def describe(db: Path, meta: dict) -> list[tuple[str, str]]:
    """What is in the database (read with plain sqlite3, read-only)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        q = conn.execute
        states = dict(q("SELECT state, sum(n) FROM counts GROUP BY state").fetchall())
        outcomes = dict(q("SELECT coalesce(outcome, 'running'), count(*) FROM attempts"
                          " GROUP BY 1").fetchall())
        workers = q("SELECT state, count(*) FROM workers GROUP BY state").fetchall()
        events = q("SELECT count(*) FROM events").fetchone()[0]
        last = q("SELECT max(ended_at) FROM attempts").fetchone()[0] or 0.0
        recent = q("SELECT count(*) FROM attempts WHERE ended_at >= ?",
                   (time.time() - 900,)).fetchone()[0]
    finally:
        conn.close()
    total = sum(states.values())
    built = (f"reused (built {(time.time() - meta['built_at']) / 60:.0f} min ago at "
             f"{meta['commit']}, in {meta['build_s']:.0f} s)" if meta["reused"]
             else f"{meta['build_s']:.0f} s")
    size = sum(p.stat().st_size for p in db.parent.glob(f"{db.name}*")
               if not p.name.endswith(".json"))
    return [
        ("tasks", f"{total:,}"),
        ("by state", ", ".join(f"{s} {n:,}" for s, n in sorted(states.items()) if n)),
        ("attempts", ", ".join(f"{o} {n:,}" for o, n in sorted(outcomes.items()))),
        ("workers", ", ".join(f"{s} {n}" for s, n in sorted(workers))),
        ("history rows (events)", f"{events:,}"),
        ("file size", f"{size / 1e6:,.0f} MB"),
        ("attempts ended in the last 15 min (status windows)",
         f"{recent:,} (last ended {max(0.0, time.time() - last) / 60:.0f} min ago)"),
        ("build", built),
    ]


# ------------------------------------------------------------------ measurements
def laufband_command() -> list[str]:
    """The `laufband` console script of this interpreter (as an operator runs it), or
    the module if the checkout is not installed."""
    script = Path(sys.executable).parent / "laufband"
    return [str(script)] if script.exists() else [sys.executable, "-m", "laufband.cli"]


def measuring_env(folder: Path) -> dict[str, str]:
    """This checkout, with compiled modules cached as for an installed package (in
    ``folder``: PYTHONDONTWRITEBYTECODE would compile laufband at every start)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PYTHONPYCACHEPREFIX": str(folder / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("LAUFBAND_DB", None)
    return env


def time_command(argv: list[str], runs: int, env: dict[str, str]
                 ) -> tuple[list[float], str]:
    times, out = [], ""
    for i in range(runs + 1):  # the first is a warm-up (page cache, .pyc)
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr}")
        out = done.stdout
        if i:
            times.append(elapsed)
    return times, out


def in_process(db: Path, repeat: int) -> dict[str, list[float]]:
    from rich.console import Console

    from laufband import cli

    times: dict[str, list[float]] = {"open": [], "status_data": [], "watch_view": [],
                                     "watch": []}
    started = time.perf_counter()
    store = cli.open_store(str(db))
    times["open"].append(time.perf_counter() - started)
    cli.watch_view(store)  # warm-up
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    for _ in range(repeat):
        started = time.perf_counter()
        cli.status_data(store)
        times["status_data"].append(time.perf_counter() - started)
        started = time.perf_counter()
        view = cli.watch_view(store)
        built = time.perf_counter()
        console.print(view)
        times["watch_view"].append(built - started)
        times["watch"].append(time.perf_counter() - started)
    return times


def import_time(env: dict[str, str]) -> tuple[float, list[tuple[str, float]]]:
    """Total of -X importtime for `import laufband.cli` (seconds), and what each
    package costs: its outermost import's cumulative time (laufband: its own modules'
    self time), largest first."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import laufband.cli"],
                          env=env, capture_output=True, text=True, check=True)
    total, packages = 0, {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative, name = line[len("import time:"):].split("|")
        total += int(self_us)
        package = name.strip().split(".")[0]
        if package == "laufband":
            packages[package] = packages.get(package, 0) + int(self_us)
        else:
            packages[package] = max(packages.get(package, 0), int(cumulative))
    ranked = sorted(packages.items(), key=lambda kv: -kv[1])
    return total / 1e6, [(name, us / 1e6) for name, us in ranked[:8]]


def table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: int = 1) -> str:
    """A markdown table; columns from ``right`` on are right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).rjust(w) if i >= right else str(c).ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))
                                 ) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i >= right else "-")
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def spread(times: list[float]) -> tuple[str, str]:
    return ms(statistics.median(times)), f"{ms(min(times))} - {ms(max(times))}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20,010 tasks (CI smoke run)")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="where the database is built (default: the temp directory)")
    p.add_argument("--keep", action="store_true",
                   help="keep the database and reuse it next time (if still valid)")
    p.add_argument("--rebuild", action="store_true", help="with --keep: build it anew")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name, kind in (("db", str), ("layers", int), ("width", int), ("identifier", str),
                       ("count", int), ("target", int), ("threads", int), ("timeout", float),
                       ("labels", str)):
        p.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
    p.add_argument("--park", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)

    sizes = SIZES["quick" if args.quick else "full"]
    _, width, target = sizes
    runs = 3 if args.quick else 5
    folder = Path(args.workdir) / "laufband-operations"
    folder.mkdir(parents=True, exist_ok=True)
    db, meta = prepare(folder, sizes, args.keep, args.rebuild)
    try:
        print(f"## The database ({git('rev-parse', '--short', 'HEAD')})\n")
        print(table(("", "value"), describe(db, meta), right=2) + "\n")

        laufband = laufband_command()
        env = measuring_env(folder)
        task = explained_task(width, target)
        commands = [
            ("status", ["status"], TARGETS["status"]),
            ("status --json", ["status", "--json"], None),
            ("workers", ["workers"], None),
            ("tasks --state failed --limit 20",
             ["tasks", "--state", "failed", "--limit", "20"], None),
            (f"explain {task}", ["explain", task], None),
        ]
        rows, met = [], []
        for name, argv, target in commands:
            times, _ = time_command([*laufband, "--db", str(db), *argv], runs, env)
            median, low_high = spread(times)
            ok = None if target is None else statistics.median(times) < target
            rows.append((f"laufband --db DB {name}", median, low_high,
                         "-" if target is None else f"< {ms(target)}",
                         "-" if ok is None else ("yes" if ok else "NO")))
            if ok is not None:
                met.append((f"`laufband status` < {ms(target)}", ok))  # type: ignore[operator]
        baseline, _ = time_command([sys.executable, "-c", "pass"], runs, env)
        rows.append(("(python -c pass: interpreter start)", *spread(baseline), "-", "-"))
        print(f"## Commands: whole process, wall clock (median of {runs})\n")
        print(table(("command", "median", "range", "target", "met"), rows) + "\n")

        repeat = 10
        inner = in_process(db, repeat)
        total, largest = import_time(env)
        watch_ok = statistics.median(inner["watch"]) < TARGETS["watch"]
        met.append((f"`laufband watch` refresh < {ms(TARGETS['watch'])}", watch_ok))
        rows = [
            ("open_store (engine, schema check)", ms(inner["open"][0]), "-", "-", "-"),
            ("cli.status_data(store)", *spread(inner["status_data"]), "-", "-"),
            ("cli.watch_view(store): building the frame", *spread(inner["watch_view"]),
             "-", "-"),
            ("watch refresh: watch_view + rendering it", *spread(inner["watch"]),
             f"< {ms(TARGETS['watch'])}", "yes" if watch_ok else "NO"),
            ("-X importtime: import laufband.cli, total", ms(total), "-", "-", "-"),
        ]
        rows += [(f"... {name}" + (" (own modules)" if name == "laufband" else " (cumul.)"),
                  ms(cumulative), "-", "-", "-") for name, cumulative in largest]
        print(f"## In-process (median of {repeat})\n")
        print(table(("measurement", "median", "range", "target", "met"), rows) + "\n")
        print("## Targets\n")
        for name, ok in met:
            print(f"- {name}: {'met' if ok else 'MISSED'}")
    finally:
        if not args.keep:
            for path in folder.glob(f"{db.name}*"):
                path.unlink()
            shutil.rmtree(folder / "pycache", ignore_errors=True)
            if not any(folder.iterdir()):
                folder.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
