"""The worker script of run.sbatch: every array task runs it, and together they run
this DAG once: 64 simulations, 8 analyses of 8 simulations each, one report.

    cd examples/slurm && sbatch run.sbatch
    laufband --db workflow.sqlite status

Without SLURM: `python main.py & python main.py & wait` (the database is then
$LAUFBAND_DB, or graphband.sqlite in the current folder). SIM_SECONDS sets how long a
simulation takes (0.5 s).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from pathlib import Path

from laufband import Graphband, Task

N_SIMULATIONS, GROUP = 64, 8
SIM_SECONDS = float(os.environ.get("SIM_SECONDS", "0.5"))


def tasks():
    """The workflow: yielded identically by every worker."""
    for i in range(N_SIMULATIONS):
        yield Task(f"simulate/{i}", data={"seed": i})
    groups = range(N_SIMULATIONS // GROUP)
    for g in groups:
        members = {f"simulate/{i}" for i in range(g * GROUP, (g + 1) * GROUP)}
        yield Task(f"analyse/{g}", dependencies=members)
    yield Task("report", dependencies={f"analyse/{g}" for g in groups})


def main() -> None:
    worker = Graphband(tasks())
    for task in worker:
        kind = task.id.split("/")[0]
        if kind == "simulate":  # the real work goes here
            rng = random.Random(task.data["seed"])
            time.sleep(SIM_SECONDS * rng.uniform(0.5, 1.5))
            worker.set_result({"energy": rng.gauss(0, 1)})
        elif kind == "analyse":  # results of the dependencies, stored in the database
            energies = [worker.result(dep)["energy"] for dep in task.dependencies]
            worker.set_result({"mean": statistics.fmean(energies), "n": len(energies)})
        else:
            report = {dep: worker.result(dep) for dep in sorted(task.dependencies)}
            # A task may run again (its worker died): write a file of this attempt's
            # own, then rename it into place.
            tmp = Path(f"report.json.{worker.attempt}.tmp")
            tmp.write_text(json.dumps(report, indent=1))
            tmp.replace("report.json")


if __name__ == "__main__":
    main()
