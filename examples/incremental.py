"""An incremental workflow: preprocess -> train -> evaluate over a few parameter sets.
Rerun it after a change, and only what the change concerns runs again.

    python examples/incremental.py                 # first run: everything runs (4 workers)
    python examples/incremental.py                 # nothing changed: nothing runs
    python examples/incremental.py --lr small=0.05 # one parameter set changed: only its
                                                   # train and evaluate run again
    laufband --db examples/out/incremental.sqlite status

Each task's fingerprint covers what its result depends on: its parameters, the code
of its step (laufband.fingerprint(code=[...])) and, for preprocess, the input file's
contents. With enable_fingerprints=True, a completed task whose fingerprint changed
runs again, and so does everything downstream of it (invalidate_downstream, the
default). The script prints which tasks ran in each worker.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from laufband import Graphband, Task, fingerprint

OUT = Path(__file__).resolve().parent / "out"
DB = OUT / "incremental.sqlite"
DATA = OUT / "incremental-data.csv"
PARAMS = {"small": {"lr": 0.1, "layers": 2}, "medium": {"lr": 0.01, "layers": 4},
          "large": {"lr": 0.001, "layers": 8}}


def preprocess(data: Path) -> list[float]:
    return [float(x) for x in data.read_text().split(",")]


def train(values: list[float], lr: float, layers: int) -> float:
    return sum(values) * lr * layers


def evaluate(model: float) -> float:
    return round(model / 10, 4)


def tasks(params: dict[str, dict]):
    """preprocess (once) -> train/<name> -> evaluate/<name>, fingerprinted."""
    yield Task("preprocess", fingerprint=fingerprint(files=[DATA], code=[preprocess]))
    for name, p in params.items():
        yield Task(f"train/{name}", data=p, dependencies={"preprocess"},
                   fingerprint=fingerprint(p, code=[train]))
        yield Task(f"evaluate/{name}", data=name, dependencies={f"train/{name}"},
                   fingerprint=fingerprint(code=[evaluate]))


def run_task(task: Task) -> None:
    kind, _, name = task.id.partition("/")
    if kind == "preprocess":
        result = preprocess(DATA)
    elif kind == "train":
        values = json.loads((OUT / "preprocess.json").read_text())
        result = train(values, **task.data)
    else:
        result = evaluate(json.loads((OUT / f"train-{name}.json").read_text()))
    (OUT / f"{task.id.replace('/', '-')}.json").write_text(json.dumps(result))


def worker(index: int, params: dict[str, dict]) -> None:
    band = Graphband(tasks(params), db=str(DB), identifier=f"worker-{index}",
                     enable_fingerprints=True, tqdm_kwargs={"disable": True})
    ran = []
    for task in band:
        run_task(task)
        ran.append(task.id)
    print(f"worker {index} ran: {', '.join(ran) or 'nothing'}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE",
                        help="change the learning rate of one parameter set")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = {name: dict(p) for name, p in PARAMS.items()}
    for change in args.lr:
        name, _, value = change.partition("=")
        params[name]["lr"] = float(value)
    if args.worker is not None:
        worker(args.worker, params)
        return 0
    OUT.mkdir(exist_ok=True)
    if not DATA.exists():
        DATA.write_text(",".join(str(i) for i in range(100)))
    forwarded = [f"--lr={c}" for c in args.lr]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), *forwarded])
             for i in range(args.workers)]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main())
