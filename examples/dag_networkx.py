"""A DAG built with networkx, run by however many copies of this script you start.

    python examples/dag_networkx.py & python examples/dag_networkx.py & wait
    laufband --db sqlite:///examples/out/dag.sqlite status

Each node's predecessors become its dependencies; node attributes become task data.
"""

from __future__ import annotations

import time
from pathlib import Path

import networkx as nx

from laufband import Graphband, Task

OUT = Path(__file__).resolve().parent / "out"


def build_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for i in range(20):
        g.add_node(f"download/{i}", url=f"https://example.org/{i}")
        g.add_edge(f"download/{i}", f"clean/{i}")
        g.add_edge(f"clean/{i}", "merge")
    g.add_edge("merge", "plot")
    return g


def main() -> None:
    OUT.mkdir(exist_ok=True)
    g = build_graph()
    tasks = (Task(node, data=g.nodes[node], dependencies=g.predecessors(node))
             for node in g.nodes)
    worker = Graphband(tasks, db=f"sqlite:///{OUT / 'dag.sqlite'}")
    for task in worker:
        time.sleep(0.05)  # the real work goes here
        # worker.lock: a critical section shared by all workers
        with worker.lock, open(OUT / "dag.log", "a") as log:
            log.write(f"{task.id} by {worker.identifier}\n")


if __name__ == "__main__":
    main()
