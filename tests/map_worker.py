"""A worker process for the concurrency tests: runs ``worker.map(fn, threads=N)`` (or,
with --mode loop, the plain ``for`` loop) over a named graph and appends one JSON line per
task it ran to its own --out file (wall-clock stamps, so intervals of different
processes on one host can be compared).

    python tests/map_worker.py --db sqlite:///x.sqlite --graph flat:60 --out w1.jsonl \
        --threads 4 --sleep 0.05 --cap 3 --fail t3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

from graphs import build

from laufband import Graphband


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--graph", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", choices=("map", "loop"), default="map",
                   help="map: worker.map(fn, threads=N); loop: the plain for loop")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--cap", type=int, default=0,
                   help='limits={"res": N}; every task holds {"res": 1}')
    p.add_argument("--fail", default="", help="comma-separated task ids to raise in")
    p.add_argument("--die", default="",
                   help="comma-separated task ids whose body SIGKILLs its own process")
    p.add_argument("--hold", default="",
                   help="comma-separated task ids whose body drops started/<id>@<attempt>"
                        " next to --out and waits until the file 'release' exists there")
    args = p.parse_args()

    fail = {x for x in args.fail.split(",") if x}
    die = {x for x in args.die.split(",") if x}
    hold = {x for x in args.hold.split(",") if x}
    folder = os.path.dirname(os.path.abspath(args.out))
    out = open(args.out, "a", buffering=1)  # noqa: SIM115 - line-buffered for the test
    lock = threading.Lock()  # one line at a time from the task threads
    tasks = build(args.graph)
    extra = {}
    if args.cap:
        tasks = [dataclasses.replace(t, resources={"res": 1}) for t in tasks]
        extra["limits"] = {"res": args.cap}
    worker = Graphband(tasks, db=args.db, tqdm_kwargs={"disable": True}, **extra)

    def write(record: dict) -> None:
        with lock:
            out.write(json.dumps(record) + "\n")

    def body(task) -> str:
        start = time.time()
        base = {"worker": worker.identifier, "pid": os.getpid(),
                "thread": threading.current_thread().name, "attempt": worker.attempt}
        if task.id in fail:
            write({"failing": task.id, "at": start, **base})
            raise RuntimeError(f"task {task.id} failed on purpose")
        if task.id in die:  # what the OOM killer or a crash in C code does
            os.kill(os.getpid(), signal.SIGKILL)
        if task.id in hold:
            wait_for_release(folder, f"{task.id}@{worker.attempt}@{os.getpid()}")
        if args.sleep:
            time.sleep(args.sleep)
        write({"id": task.id, "start": start, "end": time.time(), **base})
        return f"{task.id} by {worker.identifier}"

    summary = None
    if args.mode == "loop":
        for task in worker:
            worker.set_result(body(task))  # as map stores what fn returns
    else:
        summary = dataclasses.asdict(worker.map(body, threads=args.threads))
    # Run (conftest) files lines with "exit" as exits, with "failing" as failures.
    write({"exit": worker.identifier, "at": time.time(), "summary": summary})
    return 0


def wait_for_release(folder: str, marker: str, deadline: float = 120.0) -> None:
    os.makedirs(os.path.join(folder, "started"), exist_ok=True)
    open(os.path.join(folder, "started", marker), "w").close()
    end = time.monotonic() + deadline
    while not os.path.exists(os.path.join(folder, "release")):
        if time.monotonic() > end:
            raise TimeoutError("map_worker: held task waited too long")
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
