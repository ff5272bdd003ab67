"""A worker process for the integration tests: runs one Graphband loop over a named
graph and appends what it did to a JSON-lines file (one file per worker).

    python tests/worker.py --db sqlite:///x.sqlite --graph layered:10x100 --out w1.jsonl
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
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from graphs import build

from laufband import Graphband


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--graph", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--labels", default="")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--fail", default="", help="comma-separated task ids to raise in")
    p.add_argument("--barrier", default="", help="task id whose runners wait for each other")
    p.add_argument("--barrier-size", type=int, default=0)
    p.add_argument("--failure-policy", default="continue")
    p.add_argument("--fingerprints", default="",
                   help="enable fingerprints: 'v1' for every task, or 'v1,t3=v2,...'")
    p.add_argument("--downstream", type=int, default=1)
    p.add_argument("--runtime-sleep", type=float, default=0.0,
                   help="also sleep this times each task's declared runtime")
    p.add_argument("--signal-log", default="",
                   help="append each signal the process receives, with its time, here")
    args = p.parse_args()
    if args.signal_log:
        log_signals(args.signal_log)

    labels = {x for x in args.labels.split(",") if x}
    fail = {x for x in args.fail.split(",") if x}
    out = open(args.out, "a", buffering=1)  # noqa: SIM115 - line-buffered for the test
    tasks = build(args.graph)
    extra = {}
    if args.fingerprints:
        tasks = with_fingerprints(tasks, args.fingerprints)
        extra = {"enable_fingerprints": True, "invalidate_downstream": bool(args.downstream)}
    worker = Graphband(tasks, db=args.db, labels=labels, failure_policy=args.failure_policy,
                       tqdm_kwargs={"disable": True}, **extra)
    for task in worker:
        start, wall_start = time.monotonic_ns(), time.time()
        if task.id in fail:
            out.write(json.dumps({"failing": task.id, "at": start}) + "\n")
            raise RuntimeError(f"task {task.id} failed on purpose")
        if args.barrier and task.id == args.barrier:
            wait_for_peers(Path(args.out).parent / "barrier", args.barrier_size)
        if args.sleep:
            time.sleep(args.sleep)
        if args.runtime_sleep and task.runtime:
            time.sleep(args.runtime_sleep * task.runtime)
        out.write(json.dumps({"id": task.id, "start": start, "end": time.monotonic_ns(),
                              "wall_start": wall_start, "wall_end": time.time(),
                              "worker": worker.identifier, "pid": os.getpid(),
                              "labels": sorted(labels)}) + "\n")
    out.write(json.dumps({"exit": worker.identifier, "at": time.monotonic_ns()}) + "\n")
    return 0


def with_fingerprints(tasks, spec: str):
    """'v1,t3=v2': every task's fingerprint is v1, t3's is v2."""
    default, *overrides = spec.split(",")
    fps = dict(item.split("=") for item in overrides)
    return [dataclasses.replace(t, fingerprint=fps.get(t.id, default)) for t in tasks]


def log_signals(path: str) -> None:
    """Record when each signal arrives, whoever handles it (laufband's handlers come and
    go with its loop): the C-level handler writes the signal's number to the wakeup fd,
    and a thread of ours stamps it. Nothing is written from a handler."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)

    def stamp() -> None:
        with open(path, "a", buffering=1) as log:
            while byte := os.read(read, 1):
                name = signal.Signals(byte[0]).name
                log.write(json.dumps({"signal": name, "at": time.time()}) + "\n")

    threading.Thread(target=stamp, daemon=True).start()


def wait_for_peers(folder: Path, size: int, deadline: float = 60.0) -> None:
    """Proves concurrency: every runner of the task waits until `size` have arrived."""
    folder.mkdir(exist_ok=True)
    (folder / str(os.getpid())).touch()
    end = time.monotonic() + deadline
    while len(list(folder.iterdir())) < size:
        if time.monotonic() > end:
            raise TimeoutError(f"only {len(list(folder.iterdir()))} of {size} runners arrived")
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
