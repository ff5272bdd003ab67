"""A two-stage pipeline run by two families of workers (one command: run.py).

Stage 1, "resolve": look up where each source is (here: make up a URL). Few workers
with the label ``resolve`` do it. Stage 2, "download": fetch it. More workers with the
label ``download``, each running 4 downloads at once on threads (``worker.map``), and
all of them together never more than ``limits={"remote": 3}`` at a time: the remote
server allows 3 connections. A download reads the URL its resolve step returned
(``worker.result``). Downloads start as soon as their source is resolved: the stages
stream.

    python examples/pipeline/pipeline.py --stage resolve  --out DIR   # one worker
    python examples/pipeline/pipeline.py --stage download --out DIR --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from laufband import Graphband, Task

N_SOURCES = int(os.environ.get("PIPELINE_SOURCES", "24"))
REMOTE_CONNECTIONS = 3


def tasks():
    """The workflow, yielded identically by every worker of both stages."""
    for i in range(N_SOURCES):
        yield Task(f"resolve/{i}", data={"source": f"dataset-{i}"}, requirements={"resolve"})
        yield Task(f"download/{i}", data={"source": f"dataset-{i}"},
                   dependencies={f"resolve/{i}"}, requirements={"download"},
                   resources={"remote": 1}, timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("resolve", "download"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    worker = Graphband(tasks(), db=str(args.out / "pipeline.sqlite"), labels={args.stage},
                       limits={"remote": REMOTE_CONNECTIONS},
                       tqdm_kwargs={"disable": True})
    log = open(args.out / f"{worker.identifier.replace(':', '_')}.jsonl", "a",  # noqa: SIM115
               buffering=1)

    def resolve(task: Task) -> str:
        time.sleep(random.uniform(0.02, 0.06))
        return f"https://data.example.org/{task.data['source']}.tar"

    def download(task: Task) -> dict:
        [dep] = task.dependencies
        url = worker.result(dep)  # what the resolve step returned
        start = time.time()
        time.sleep(random.uniform(0.1, 0.2))  # the transfer
        (args.out / "downloads").mkdir(exist_ok=True)
        path = args.out / "downloads" / f"{task.data['source']}.tar"
        path.write_text(url)
        log.write(json.dumps({"task": task.id, "start": start, "end": time.time()}) + "\n")
        return {"url": url, "path": str(path)}

    summary = worker.map(resolve if args.stage == "resolve" else download,
                         threads=args.threads)
    print(f"{args.stage} worker {worker.identifier}: {summary.completed} done, "
          f"{summary.failed} failed", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
