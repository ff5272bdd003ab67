"""Benchmarks of incremental workflows (fingerprints): prints a table.

    python benchmarks/incremental.py            # 1,000,000 tasks; 1,000 files of 10 MB
    python benchmarks/incremental.py --quick    # 100,000 tasks; 100 files of 1 MB (CI)

1. Register a 1,000,000-task DAG with fingerprints on (and, for comparison, off). The
   DAG is 10 components of 100,001 tasks: a root, then 100 layers of 1,000 tasks, each
   depending on 2 tasks of the layer before (the first layer on the root).
2. Mark every task completed (one UPDATE, as if a run had finished), then rerun with
   the root of one component changed: registering that graph invalidates the root and
   its 100,000 descendants, in one write transaction (the comparison with the stored
   graph before it is a series of short reads). Reported: the new worker's
   construction, the write transaction, and the invalidation inside it.
3. A rerun in which nothing changed: constructing a worker (it finds its graph
   registered), against the same without fingerprints (joining a graph as before).
4. ``fingerprint(files=...)`` over 1,000 files of 10 MB: the first call reads them, the
   second (nothing changed) takes digests from the cache; and a third from a new
   process (the cache file).

Each scenario runs in a fresh temporary directory. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from laufband import Graphband, Task, fingerprint  # noqa: E402
from laufband.store import incremental  # noqa: E402
from laufband.store import registration as registration_module  # noqa: E402

COMPONENTS = 10


def dag(layers: int, width: int, changed: str | None = None) -> list[Task]:
    """COMPONENTS components: c/root -> layers x width, 2 dependencies each."""
    tasks = []
    for c in range(COMPONENTS):
        root = f"{c}/root"
        tasks.append(Task(root, fingerprint="v2" if root == changed else "v1"))
        previous = [root]
        for layer in range(layers):
            ids = [f"{c}/{layer}/{i}" for i in range(width)]
            for i, tid in enumerate(ids):
                deps = {previous[i % len(previous)], previous[(i * 7 + 3) % len(previous)]}
                tasks.append(Task(tid, dependencies=deps, fingerprint="v1"))
            previous = ids
    return tasks


def construct(tasks: list[Task], db: Path, name: str, **kw) -> float:
    started = time.perf_counter()
    worker = Graphband(tasks, db=str(db), identifier=name, tqdm_kwargs={"disable": True},
                       **kw)
    elapsed = time.perf_counter() - started
    worker.close()
    return elapsed


def complete_all(db: Path) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE tasks SET state = 'completed', waiting_on = 0")
        conn.execute("UPDATE counts SET n = CASE WHEN state = 'completed' THEN"
                     " (SELECT count(*) FROM tasks WHERE reqset = counts.reqset) ELSE 0 END")
    conn.close()


def timed(owner: object, name: str) -> list[float]:
    """Wrap ``owner.name`` to time its calls."""
    times: list[float] = []
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - started)

    setattr(owner, name, wrapper)
    return times


def registration(folder: Path, layers: int, width: int) -> list[tuple[str, str]]:
    n = COMPONENTS * (layers * width + 1)
    rows = []
    tasks = dag(layers, width)
    db_off, db_on = folder / "off.sqlite", folder / "on.sqlite"
    off = construct(tasks, db_off, "a")
    rows.append((f"register {n:,} tasks, fingerprints off", f"{off:.1f} s"))
    rows.append((f"register {n:,} tasks, fingerprints on",
                 f"{construct(tasks, db_on, 'a', enable_fingerprints=True):.1f} s"))
    rows.append(("join that graph, fingerprints off (as before)",
                 f"{construct(tasks, db_off, 'b'):.1f} s"))
    rows.append(("rerun, nothing changed, fingerprints on (joins)",
                 f"{construct(tasks, db_on, 'b', enable_fingerprints=True):.1f} s"))
    complete_all(db_on)
    changed = dag(layers, width, changed="0/root")
    invalidation = timed(incremental, "invalidate")
    transaction = timed(registration_module.Registration, "apply")
    elapsed = construct(changed, db_on, "c", enable_fingerprints=True)
    conn = sqlite3.connect(db_on)
    rerun = conn.execute("SELECT count(*) FROM tasks WHERE state != 'completed'").fetchone()[0]
    conn.close()
    rows.append((f"rerun with one root changed: new worker ({rerun:,} tasks invalidated)",
                 f"{elapsed:.1f} s"))
    rows.append(("... of which the write transaction (changes and invalidation)",
                 f"{sum(transaction):.2f} s"))
    rows.append(("... ... of which the invalidation", f"{sum(invalidation):.2f} s"))
    return rows


def files(folder: Path, count: int, mb: int) -> list[tuple[str, str]]:
    data = folder / "files"
    data.mkdir()
    block = os.urandom(1 << 20)
    paths = []
    for i in range(count):
        path = data / f"f{i}.bin"
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(block)
        paths.append(path)
    os.environ["LAUFBAND_FINGERPRINT_CACHE"] = str(folder / "cache.sqlite")
    time.sleep(2.1)  # files changed within 2 s are not cached (fingerprints.py)
    rows = []
    for label in ("first call (reads every file)", "second call, nothing changed"):
        started = time.perf_counter()
        fingerprint(files=paths)
        rows.append((f"fingerprint({count:,} files of {mb} MB): {label}",
                     f"{time.perf_counter() - started:.2f} s"))
    code = ("import sys, time; from pathlib import Path; from laufband import fingerprint; "
            "paths = sorted(Path(sys.argv[1]).iterdir()); t = time.perf_counter(); "
            "fingerprint(files=paths); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True,
                         text=True, check=True, env={**os.environ,
                                                     "PYTHONPATH": str(HERE.parent)})
    rows.append((f"fingerprint({count:,} files of {mb} MB): a new process (the cache file)",
                 f"{float(out.stdout):.2f} s"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (CI)")
    p.add_argument("--workdir", default=tempfile.gettempdir())
    args = p.parse_args()
    layers, width = (10, 1000) if args.quick else (100, 1000)
    count, mb = (100, 1) if args.quick else (1000, 10)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows += registration(Path(tmp), layers, width)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows += files(Path(tmp), count, mb)
    width_0 = max(len(r[0]) for r in rows)
    print(f"| {'measurement':<{width_0}} | {'time':>8} |")
    print(f"|{'-' * (width_0 + 2)}|{'-' * 9}:|")
    for name, value in rows:
        print(f"| {name:<{width_0}} | {value:>8} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
