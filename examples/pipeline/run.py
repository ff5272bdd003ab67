"""Run the staged pipeline with one command: 2 resolve workers and 3 download workers
(4 threads each) over one SQLite file, then show what happened.

    python examples/pipeline/run.py             # output in examples/out/pipeline/
    python examples/pipeline/run.py --out DIR

On a cluster the two families are two job arrays (``sbatch --array=0-1`` with
``--stage resolve``, ``--array=0-2`` with ``--stage download``) over one shared file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from laufband import DatabaseError, Monitor
from laufband.cli import limits_table, open_store, status, workers_table

HERE = Path(__file__).resolve().parent


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (an end before a start at the same time)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def wait_for_family(db: str, label: str, procs: list[subprocess.Popen],
                    timeout: float = 60.0) -> None:
    """Until a worker with ``label`` has registered (or one of ``procs`` ended). A
    download worker that starts before any resolve worker sees nobody who could resolve
    its sources, and leaves at once (a worker does not wait for tasks that need labels
    no live worker has): start the first stage's family first."""
    deadline = time.monotonic() + timeout
    while not any(p.poll() is not None for p in procs):
        try:
            if any(label in w.labels for w in Monitor(db=db).get_workers()):
                return
        except DatabaseError:
            pass  # no database yet
        if time.monotonic() > deadline:
            raise SystemExit(f"no {label} worker registered within {timeout:.0f} s")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "out" / "pipeline")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    script = [sys.executable, str(HERE / "pipeline.py"), "--out", str(args.out)]
    db = str(args.out / "pipeline.sqlite")
    procs = [subprocess.Popen([*script, "--stage", "resolve"]) for _ in range(2)]
    wait_for_family(db, "resolve", procs)
    procs += [subprocess.Popen([*script, "--stage", "download", "--threads", "4"])
              for _ in range(3)]
    codes = [p.wait() for p in procs]
    store = open_store(db)
    print(f"\n$ laufband --db {db} status")
    status(store)
    print(f"\n$ laufband --db {db} workers")
    workers_table(store)
    print(f"\n$ laufband --db {db} limits")
    limits_table(store)
    spans = [(r["start"], r["end"]) for log in args.out.glob("*.jsonl")
             for r in map(json.loads, log.read_text().splitlines())]
    print(f"\ndownloads: {len(spans)}, at most {max_overlap(spans)} at a time "
          "(limit remote=3)")
    first = next(iter(store.results()), None)
    if first:
        print(f"a result: {first[0]} -> {first[1]}")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
