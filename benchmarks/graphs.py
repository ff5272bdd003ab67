"""The benchmark graphs, as plain ``(id, dependencies)`` pairs.

No laufband import here: the worker turns the pairs into the ``Task`` class of whichever
laufband it runs with (this checkout, or upstream 0.2.1 in its own virtualenv), and the
driver uses the same pairs to check dependency order.

Specs (``kind:args``):
    flat:N          N independent tasks
    chain:N         c0 -> c1 -> ... -> c(N-1)
    layered:LxW     L layers of W tasks; each depends on 3 random tasks of the layer
                    before (seeded), listed in a shuffled (non-topological) order
    big:LxW         L layers of W tasks; each depends on 2 tasks of the layer before,
                    chosen arithmetically (cheap to generate at a million tasks)
"""

from __future__ import annotations

import random
from collections.abc import Iterator

Node = tuple[str, tuple[str, ...]]


def flat(n: int) -> Iterator[Node]:
    for i in range(n):
        yield f"t{i}", ()


def chain(n: int) -> Iterator[Node]:
    for i in range(n):
        yield f"c{i}", (f"c{i - 1}",) if i else ()


def layered(layers: int, width: int, fan_in: int = 3, seed: int = 7) -> Iterator[Node]:
    rng = random.Random(seed)
    nodes = []
    for layer in range(layers):
        for i in range(width):
            deps: tuple[str, ...] = ()
            if layer:
                deps = tuple(f"L{layer - 1}_{j}" for j in rng.sample(range(width), fan_in))
            nodes.append((f"L{layer}_{i}", deps))
    rng.shuffle(nodes)
    yield from nodes


def big(layers: int, width: int) -> Iterator[Node]:
    for layer in range(layers):
        for i in range(width):
            if layer == 0:
                yield f"B{layer}_{i}", ()
            else:
                j = (7 * i + 1) % width
                deps = (f"B{layer - 1}_{i}",) if j == i else (
                    f"B{layer - 1}_{i}", f"B{layer - 1}_{j}")
                yield f"B{layer}_{i}", deps


def _dims(arg: str) -> tuple[int, int]:
    a, b = arg.lower().split("x")
    return int(a), int(b)


def build(spec: str) -> Iterator[Node]:
    """The nodes of a graph spec such as ``flat:1000`` or ``layered:10x100``."""
    kind, _, arg = spec.partition(":")
    if kind == "flat":
        return flat(int(arg))
    if kind == "chain":
        return chain(int(arg))
    if kind == "layered":
        return layered(*_dims(arg))
    if kind == "big":
        return big(*_dims(arg))
    raise ValueError(f"unknown graph spec {spec!r} (flat:N, chain:N, layered:LxW, big:LxW)")


def size(spec: str) -> int:
    """Number of tasks of a graph spec, without building it."""
    kind, _, arg = spec.partition(":")
    if kind in ("flat", "chain"):
        return int(arg)
    layers, width = _dims(arg)
    return layers * width
