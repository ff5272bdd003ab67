"""One worker of benchmarks/slurm.py, run as a SLURM array task (not meant to be run by
hand).

It records wall-clock stamps (time.time(): the driver and the job run on one machine)
of its own start, after ``import laufband``, after constructing the worker (which
registers the graph), and at the start of its first task; runs a flat graph of
``--tasks`` tasks that sleep ``--sleep`` s each; and writes one JSON file with the
stamps and the ids of the tasks it ran. ``--impl upstream`` is laufband 0.2.1 (started
with the interpreter of its own virtualenv): the same API for a flat graph.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before any import that takes time

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from record import write_record  # noqa: E402  (benchmarks/record.py, next to this file)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True, help="database URL")
    p.add_argument("--tasks", type=int, required=True)
    p.add_argument("--sleep", type=float, default=0.02)
    p.add_argument("--out", required=True, help="JSON file to write at exit")
    args = p.parse_args()

    info: dict = {"pid": os.getpid(), "started": STARTED}
    import laufband
    from laufband import Graphband, Task

    info["imported"] = time.time()
    info["version"] = getattr(laufband, "__version__", "?")
    info["file"] = laufband.__file__
    worker = Graphband([Task(id=f"t{i}") for i in range(args.tasks)], db=args.db,
                       tqdm_kwargs={"disable": True})
    info["constructed"] = time.time()
    info["first_task"] = None
    ran = []
    for task in worker:
        if info["first_task"] is None:
            info["first_task"] = time.time()
        time.sleep(args.sleep)
        ran.append(task.id)
    info["loop_end"] = time.time()
    info["tasks"] = ran
    write_record(args.out, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
