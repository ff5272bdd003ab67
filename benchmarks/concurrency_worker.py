"""One worker process of benchmarks/concurrency.py (started by it; not meant to be run by
hand).

It builds a flat graph of ``--tasks`` tasks (``t0``, ``t1``, ...; each holding
``--resource`` 1 if given), constructs its worker (which registers the graph), signals
that it is ready, waits for the driver's start signal, runs them with the plain loop
(``--threads 0``) or ``worker.map(fn, threads=N)``, and writes one JSON file: each task
it ran (id, start, end, attempt, thread; time.monotonic_ns, the same clock in every
process of the machine), the loop's start and end, its CPU time and peak RSS.

``--impl upstream`` runs laufband 0.2.1's API (started with the interpreter of its own
virtualenv): the plain loop only, no resources.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

from record import write_record  # benchmarks/record.py, next to this file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("current", "upstream"), default="current")
    p.add_argument("--db", required=True, help="database URL")
    p.add_argument("--tasks", type=int, required=True)
    p.add_argument("--sleep", type=float, default=0.05, help="seconds each task sleeps")
    p.add_argument("--threads", type=int, default=0, help="0: the plain loop; N: map")
    p.add_argument("--resource", default="", help="each task holds 1 of it")
    p.add_argument("--limit", type=int, default=0, help="the resource's global limit")
    p.add_argument("--go", required=True, help="start the loop when this file exists")
    p.add_argument("--out", required=True, help="JSON file to write at exit")
    args = p.parse_args()
    if args.impl == "upstream" and (args.threads or args.resource):
        p.error("laufband 0.2.1 has neither threads nor resources")

    info: dict = {"pid": os.getpid(), "impl": args.impl}
    t = time.monotonic()
    import laufband
    from laufband import Graphband, Task

    info["import_s"] = time.monotonic() - t
    info["version"] = getattr(laufband, "__version__", "?")
    info["file"] = laufband.__file__
    extra = {"resources": {args.resource: 1}} if args.resource else {}
    tasks = [Task(id=f"t{i}", **extra) for i in range(args.tasks)]
    kwargs: dict = {"db": args.db, "tqdm_kwargs": {"disable": True}}
    if args.resource:
        kwargs["limits"] = {args.resource: args.limit}
    t = time.monotonic()
    worker = Graphband(tasks, **kwargs)
    info["construct_s"] = time.monotonic() - t

    out = Path(args.out)
    out.with_suffix(".ready").touch()
    go = Path(args.go)
    while not go.exists():
        time.sleep(0.001)

    records: list[list] = []
    clock = time.monotonic_ns

    def body(task) -> None:
        start = clock()
        time.sleep(args.sleep)
        # list.append is atomic: map's task threads share this list
        records.append([task.id, start, clock(), getattr(worker, "attempt", -1),
                        threading.get_ident()])

    info["loop_start_ns"] = clock()
    if args.threads:
        summary = worker.map(body, threads=args.threads)
        info["summary"] = [summary.completed, summary.failed, summary.handed_back]
    else:
        for task in worker:
            body(task)
    info["loop_end_ns"] = clock()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    info["cpu_s"] = usage.ru_utime + usage.ru_stime
    info["maxrss_mb"] = usage.ru_maxrss / 1024
    info["tasks"] = records
    write_record(out, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
