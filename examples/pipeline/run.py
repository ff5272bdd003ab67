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
from pathlib import Path

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "out" / "pipeline")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    script = [sys.executable, str(HERE / "pipeline.py"), "--out", str(args.out)]
    db = str(args.out / "pipeline.sqlite")
    # The families start together, in no order: a download worker that registers before
    # any resolve worker waits for one (label_wait), as job arrays on a cluster do.
    procs = [subprocess.Popen([*script, "--stage", "download", "--threads", "4"])
             for _ in range(3)]
    procs += [subprocess.Popen([*script, "--stage", "resolve"]) for _ in range(2)]
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
