"""Graphs shared by the tests and the worker script they start (tests/worker.py)."""

from __future__ import annotations

import random

from laufband import Task


def flat(n: int) -> list[Task]:
    return [Task(id=f"t{i}", data=i) for i in range(n)]


def chain(n: int) -> list[Task]:
    return [Task(id=f"c{i}", data=i, dependencies={f"c{i - 1}"} if i else set())
            for i in range(n)]


def layered(layers: int, width: int, fan_in: int = 3, seed: int = 7) -> list[Task]:
    rng = random.Random(seed)
    tasks = []
    for layer in range(layers):
        for i in range(width):
            deps = set()
            if layer:
                deps = {f"L{layer - 1}_{j}" for j in rng.sample(range(width), fan_in)}
            tasks.append(Task(id=f"L{layer}_{i}", data=(layer, i), dependencies=deps))
    rng.shuffle(tasks)  # the user's order need not be topological
    return tasks


def labelled() -> list[Task]:
    """cpu tasks, gpu tasks that depend on them, and one task nobody can run."""
    tasks = [Task(id=f"cpu{i}", requirements={"cpu"}) for i in range(20)]
    tasks += [Task(id=f"gpu{i}", requirements={"gpu"}, dependencies={f"cpu{i}"})
              for i in range(20)]
    tasks.append(Task(id="tpu", requirements={"tpu"}))
    tasks.append(Task(id="after_tpu", dependencies={"tpu"}))
    tasks += [Task(id=f"any{i}") for i in range(10)]
    return tasks


def stages(n: int) -> list[Task]:
    """A two-stage pipeline: ``n`` cpu tasks, each followed by a gpu task (two worker
    families, as two job arrays)."""
    return [Task(id=f"cpu{i}", requirements={"cpu"}) for i in range(n)] + [
        Task(id=f"gpu{i}", requirements={"gpu"}, dependencies={f"cpu{i}"})
        for i in range(n)]


def shared() -> list[Task]:
    return [Task(id="wide", max_parallel_workers=3), *flat(5)]


def timed() -> list[Task]:
    """One task declared to take an hour, and short ones."""
    return [Task(id="long", runtime=3600), *(Task(id=f"s{i}", runtime=1) for i in range(5))]


def walltime(n: int, runtime: float) -> list[Task]:
    """For a job with a short time limit: ``n`` tasks declared to take ``runtime``
    seconds in two chains (s2 after s0, s3 after s1, ...), and "long", declared to take
    10 min, first in claim order (highest priority, no dependencies)."""
    return [Task(id="long", runtime=600, priority=1),
            *(Task(id=f"s{i}", runtime=runtime,
                   dependencies={f"s{i - 2}"} if i >= 2 else set()) for i in range(n))]


GRAPHS = {
    "flat": lambda n: flat(int(n)),
    "chain": lambda n: chain(int(n)),
    "layered": lambda spec: layered(*map(int, spec.split("x"))),
    "labelled": lambda _: labelled(),
    "stages": lambda n: stages(int(n)),
    "shared": lambda _: shared(),
    "timed": lambda _: timed(),
    "walltime": lambda spec: walltime(int(spec.split("x")[0]), float(spec.split("x")[1])),
}


def build(name: str) -> list[Task]:
    kind, _, arg = name.partition(":")
    return GRAPHS[kind](arg)
