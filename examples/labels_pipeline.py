"""Route tasks by labels: CPU workers preprocess, GPU workers train on the results.

    python examples/labels_pipeline.py --labels cpu &
    python examples/labels_pipeline.py --labels cpu &
    python examples/labels_pipeline.py --labels gpu &
    wait

A task runs on a worker whose labels include all of the task's requirements. A GPU
worker waits while CPU workers produce what its tasks need, and every worker leaves its
loop once nothing more can become runnable for it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from laufband import Graphband, Task

OUT = Path(__file__).resolve().parent / "out"


def tasks():
    for i in range(12):
        yield Task(f"preprocess/{i}", requirements={"cpu"})
        yield Task(f"train/{i}", requirements={"gpu"}, dependencies={f"preprocess/{i}"})
    yield Task("summary", dependencies={f"train/{i}" for i in range(12)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", default="cpu", help="comma-separated, e.g. cpu,gpu")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    labels = set(args.labels.split(","))
    worker = Graphband(tasks(), db=f"sqlite:///{OUT / 'pipeline.sqlite'}", labels=labels,
                       tqdm_kwargs={"desc": args.labels})
    for task in worker:
        time.sleep(0.2 if task.id.startswith("train") else 0.05)


if __name__ == "__main__":
    main()
