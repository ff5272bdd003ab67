"""The incremental run, with real worker processes: change the fingerprint of one task
in the middle of a DAG and rerun; exactly that task and everything below it run again,
in dependency order, and nothing else does."""

from __future__ import annotations

import networkx as nx
import pytest
from conftest import assert_exactly_once, query
from graphs import build

pytestmark = pytest.mark.processes

GRAPH = "layered:6x10"


def below(task_id: str) -> set[str]:
    g = nx.DiGraph((dep, t.id) for t in build(GRAPH) for dep in t.dependencies)
    return {task_id} | nx.descendants(g, task_id)


def run(workers, n: int, fingerprints: str, downstream: int = 1):
    start = len(workers.procs)
    workers.start(GRAPH, n, fingerprints=fingerprints, downstream=downstream)
    result = workers.wait()
    assert result.returncodes[start:] == [0] * n, result.stderr
    ran = [r for r in result.records
           if r["pid"] in {p.pid for p in workers.procs[start:]}]
    return result, ran


@pytest.mark.parametrize("downstream", [1, 0], ids=["downstream", "only-the-task"])
def test_changing_one_fingerprint_reruns_exactly_it_and_what_is_below(workers, downstream):
    tasks = build(GRAPH)
    first, _ = run(workers, 4, "v1")
    assert_exactly_once(first, [t.id for t in tasks])
    changed = "L2_4"
    expected = below(changed) if downstream else {changed}
    assert 1 < len(below(changed)) < len(tasks)  # a subtree, not everything
    _, ran = run(workers, 4, f"v1,{changed}=v2", downstream)
    assert sorted(r["id"] for r in ran) == sorted(expected)  # each once, nothing else
    body = {r["id"]: r for r in ran}  # dependency order, from the workers' records
    for task in tasks:
        for dep in task.dependencies & body.keys() if task.id in body else ():
            assert body[dep]["end"] < body[task.id]["start"], (task.id, dep)
    assert query(workers.folder / "graph.sqlite",
                 "SELECT DISTINCT state FROM tasks") == [("completed",)]
    _, again = run(workers, 2, f"v1,{changed}=v2", downstream)
    assert again == []  # nothing changed since


def test_pruning_while_workers_run(workers):
    """Pruning is short transactions: workers running meanwhile complete the workflow,
    exactly once, and the bookkeeping stays consistent."""
    from conftest import peek, wait_until

    from laufband import prune

    tasks = build("layered:4x25")
    workers.start("layered:4x25", 3, sleep=0.02, fingerprints="v1")
    db = workers.folder / "graph.sqlite"
    wait_until(lambda: (peek(db, "SELECT count(*) FROM tasks WHERE state = 'completed'")
                        or [(0,)])[0][0] > 0, what="the first completion")
    pruned_while_running = 0
    while any(p.poll() is None for p in workers.procs):
        pruned_while_running += 1
        prune(str(db), keep=1)
    result = workers.wait()
    assert result.returncodes == [0, 0, 0], result.stderr
    assert pruned_while_running > 0
    assert_exactly_once(result, [t.id for t in tasks])
    assert query(db, "SELECT DISTINCT state FROM tasks") == [("completed",)]
    counted = dict(query(db, "SELECT state, sum(n) FROM counts GROUP BY state HAVING sum(n) > 0"))
    assert counted == {"completed": len(tasks)}
    assert query(db, "SELECT max(n) FROM (SELECT count(*) AS n FROM events GROUP BY task)"
                 ) <= [(3,)]
