"""One benchmark worker process (started by benchmarks/run.py; not meant to be run by hand).

It builds the graph, constructs the worker (which registers the graph), signals that it
is ready, waits for the driver's start signal so that all workers start claiming at the
same moment, runs its loop and writes one JSON file: what it ran (task id, start, end,
attempt, all time.monotonic_ns) and how it went (set-up times, loop end, peak RSS).

``--impl current`` runs the laufband importable by this interpreter (this checkout);
``--impl upstream`` runs laufband 0.2.1's API (started with the interpreter of its own
virtualenv), which makes one pass and skips tasks whose dependencies are not done, so for
DAGs it loops ``while worker.has_more_jobs`` until a deadline.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from array import array
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import graphs  # the benchmark's own module, next to this file
from record import write_record  # benchmarks/record.py, likewise


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Recorder:
    """Compact per-task records (a million entries must not inflate the RSS we report)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.start = array("q")
        self.end = array("q")
        self.attempt = array("i")

    def add(self, task_id: str, start: int, end: int, attempt: int | None) -> None:
        self.ids.append(task_id)
        self.start.append(start)
        self.end.append(end)
        self.attempt.append(-1 if attempt is None else attempt)

    def rows(self) -> list[list]:
        return [list(r) for r in zip(self.ids, self.start, self.end, self.attempt, strict=True)]


class Timers:
    """Wraps a few laufband internals to split a task's cost (``--instrument``).

    Lock acquisitions and releases are booked separately inside ``Store.step`` (the
    claim+finish transaction) and outside it (status reads while waiting, heartbeats).
    """

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.missing: list[str] = []
        self.in_step = False

    def wrap(self, owner: type, name: str, label: str, step: bool = False) -> None:
        original = getattr(owner, name, None)
        if original is None:
            self.missing.append(f"{owner.__name__}.{name}")
            return
        ns, calls, clock = self.ns, self.calls, time.perf_counter_ns

        def timed(*args, **kwargs):
            key = label
            if not step:
                key += "_in_step" if self.in_step else "_elsewhere"
            else:
                self.in_step = True
            t0 = clock()
            try:
                return original(*args, **kwargs)
            finally:
                ns[key] = ns.get(key, 0) + clock() - t0
                calls[key] = calls.get(key, 0) + 1
                if step:
                    self.in_step = False

        setattr(owner, name, timed)


def instrument() -> Timers:
    timers = Timers()
    try:
        from laufband import locking, store
    except ImportError as exc:  # laufband was reorganised: report, do not crash
        timers.missing.append(str(exc))
        return timers
    timers.wrap(store.Store, "step", "step", step=True)
    timers.wrap(locking.DatabaseLock, "_acquire_file", "lock_acquire")
    timers.wrap(locking.DatabaseLock, "_release_file", "lock_release")
    return timers


class ShimCounters:
    """Reads the NFS shim's counters (if it is preloaded), to count only the loop."""

    def __init__(self) -> None:
        import ctypes

        self.fn = getattr(ctypes.CDLL(None), "nfssim_counters", None)
        self.names: list[str] = []
        if self.fn is not None:
            layout = ctypes.CDLL(None).nfssim_layout
            layout.restype = ctypes.c_char_p
            self.names = layout().decode().split(",")
            self.buf = (ctypes.c_long * (3 * len(self.names)))()

    def read(self) -> dict[str, list[int]]:
        if self.fn is None:
            return {}
        self.fn(self.buf, len(self.buf))
        return {name: list(self.buf[3 * i:3 * i + 3]) for i, name in enumerate(self.names)}


def wait_for(path: Path, deadline: float) -> None:
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no start signal ({path}) from the driver")
        time.sleep(0.001)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("current", "upstream"), default="current")
    p.add_argument("--db", required=True, help="database URL")
    p.add_argument("--graph", required=True, help="graph spec, see graphs.py")
    p.add_argument("--out", required=True, help="JSON file to write at exit")
    p.add_argument("--go", required=True, help="start claiming when this file exists")
    p.add_argument("--identifier", default=None)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds each task sleeps")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--journal-mode", default="delete")
    p.add_argument("--max-tasks", type=int, default=0, help="close() after this many")
    p.add_argument("--deadline", type=float, default=300.0,
                   help="seconds after the start signal to give up (reported as timeout)")
    p.add_argument("--instrument", action="store_true", help="time laufband internals")
    args = p.parse_args()
    # backends.py runs run.py's scenarios on PostgreSQL: run.py passes a SQLite file as
    # --db, and this variable (set by backends.py only) replaces it.
    args.db = os.environ.get("BENCH_DB_URL") or args.db

    info: dict = {"pid": os.getpid(), "impl": args.impl, "timed_out": False,
                  "db_scheme": args.db.split(":", 1)[0]}
    t = time.monotonic()
    import laufband  # imported here to time it
    from laufband import Graphband, Task

    info["import_s"] = time.monotonic() - t
    info["version"] = getattr(laufband, "__version__", "?")
    info["laufband_file"] = laufband.__file__  # backends.py --against checks it
    info["rss_import_mb"] = current_rss_mb()
    timers = instrument() if args.instrument and args.impl == "current" else None

    t = time.monotonic()
    tasks = [Task(id=tid, dependencies=set(deps)) for tid, deps in graphs.build(args.graph)]
    info["build_s"] = time.monotonic() - t
    info["rss_tasks_mb"] = current_rss_mb()

    kwargs: dict = {"db": args.db, "tqdm_kwargs": {"disable": True}}
    if args.identifier:
        kwargs["identifier"] = args.identifier
    if args.impl == "current":
        batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
        kwargs.update(batch_size=batch, journal_mode=args.journal_mode)
    t = time.monotonic()
    worker = Graphband(tasks, **kwargs)
    info["construct_s"] = time.monotonic() - t
    info["rss_ready_mb"] = current_rss_mb()
    info["maxrss_ready_mb"] = maxrss_mb()

    out = Path(args.out)
    out.with_suffix(".ready").touch()
    shim = ShimCounters()
    wait_for(Path(args.go), time.monotonic() + 600)
    info["go_ns"] = time.monotonic_ns()
    shim_before = shim.read()
    deadline = time.monotonic() + args.deadline
    rec = Recorder()
    clock = time.monotonic_ns
    passes = 0
    if args.impl == "current":
        for task in worker:
            start = clock()
            if args.sleep:
                time.sleep(args.sleep)
            rec.add(task.id, start, clock(), worker.attempt)
            if (args.max_tasks and len(rec.ids) >= args.max_tasks) or (
                    time.monotonic() > deadline):
                info["timed_out"] = not args.max_tasks or len(rec.ids) < args.max_tasks
                worker.close()
        passes = 1
    else:
        # laufband 0.2.1: one pass skips tasks whose dependencies are not done yet.
        flat = args.graph.startswith("flat:")
        while passes == 0 or (not flat and worker.has_more_jobs):
            passes += 1
            ran = 0
            for task in worker:
                start = clock()
                if args.sleep:
                    time.sleep(args.sleep)
                rec.add(task.id, start, clock(), None)
                ran += 1
                if time.monotonic() > deadline:
                    info["timed_out"] = True
                    worker.close()
            if info["timed_out"] or time.monotonic() > deadline:
                info["timed_out"] = True
                break
            if not ran:
                time.sleep(0.01)
    info["loop_end_ns"] = time.monotonic_ns()
    shim_after = shim.read()
    info["shim_loop"] = {k: [a - b for a, b in zip(v, shim_before[k], strict=True)]
                         for k, v in shim_after.items()}
    info["passes"] = passes
    info["maxrss_mb"] = maxrss_mb()
    if timers is not None:
        info["timers_ns"] = timers.ns
        info["timer_calls"] = timers.calls
        info["timers_missing"] = timers.missing
    info["tasks"] = rec.rows()
    write_record(out, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
