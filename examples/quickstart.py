"""Quickstart: 4 local worker processes run one DAG through one SQLite file.

    python examples/quickstart.py            # fresh run, 4 workers
    python examples/quickstart.py --workers 8

The DAG is a small simulation campaign: prepare 40 inputs, simulate each, analyse the
simulations in groups of 4, and write one report from all analyses. Every worker runs
the same `for task in Graphband(tasks()):` loop (here started by this script; on a
cluster by `sbatch --array`), and together they run each task exactly once, each after
its dependencies. The script ends with `laufband status` of the workflow.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from laufband import Graphband, Task
from laufband.cli import open_store, status

OUT = Path(__file__).resolve().parent / "out"
DB = f"sqlite:///{OUT / 'quickstart.sqlite'}"
N_INPUTS, GROUP = 40, 4


def tasks():
    """The workflow: yielded identically by every worker."""
    for i in range(N_INPUTS):
        yield Task(f"prepare/{i}", data={"seed": i})
        yield Task(f"simulate/{i}", data={"seed": i}, dependencies={f"prepare/{i}"})
    for g in range(N_INPUTS // GROUP):
        members = {f"simulate/{i}" for i in range(g * GROUP, (g + 1) * GROUP)}
        yield Task(f"analyse/{g}", data={"group": g}, dependencies=members)
    yield Task("report", dependencies={f"analyse/{g}" for g in range(N_INPUTS // GROUP)})


def run_task(task: Task) -> None:
    """Stand-in for real work: sleep a little, write a result file."""
    kind = task.id.split("/")[0]
    time.sleep({"prepare": 0.02, "simulate": 0.15, "analyse": 0.05, "report": 0.05}[kind]
               * random.uniform(0.5, 1.5))
    path = OUT / "results" / f"{task.id.replace('/', '_')}.json"
    path.write_text(json.dumps({"task": task.id, "data": task.data}))


def worker(index: int) -> None:
    band = Graphband(tasks(), db=DB, identifier=f"worker-{index}",
                     tqdm_kwargs={"position": index, "desc": f"worker {index}", "leave": True})
    for task in band:
        run_task(task)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return 0
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "results").mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i)])
             for i in range(args.workers)]
    codes = [p.wait() for p in procs]
    print("\n" * args.workers)
    print("$ laufband --db", DB, "status")
    status(open_store(DB))
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
