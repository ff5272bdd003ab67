"""Fingerprints: what changed runs again, and (by default) everything downstream of it;
graphs whose dependencies change or lose tasks; networkx graphs; pruning history."""

from __future__ import annotations

import io
import os
import re

import networkx as nx
import pytest
from helpers import history, make, rows, states, url

from laufband import GraphError, GraphMismatchError, Monitor, Task, prune
from laufband.cli import open_store, status
from laufband.clock import FakeClock

pytestmark = pytest.mark.backends


#   a -> b -> c -> d        e (alone)
#        b -> x


def graph(**fingerprints: str | None) -> list[Task]:
    fp = {"a": "v1", "b": "v1", "c": "v1", "d": "v1", "e": "v1", "x": "v1", **fingerprints}
    return [Task("a", fingerprint=fp["a"]), Task("b", dependencies={"a"}, fingerprint=fp["b"]),
            Task("c", dependencies={"b"}, fingerprint=fp["c"]),
            Task("d", dependencies={"c"}, fingerprint=fp["d"]),
            Task("e", fingerprint=fp["e"]), Task("x", dependencies={"b"}, fingerprint=fp["x"])]


def run(tasks, name, **kw) -> list[str]:
    kw.setdefault("enable_fingerprints", True)
    return [t.id for t in make(tasks, name=name, **kw)]


def test_a_changed_fingerprint_reruns_the_task_and_everything_below_it():
    assert run(graph(), "first") == ["a", "e", "b", "c", "x", "d"]
    assert run(graph(), "again") == []  # nothing changed: nothing runs
    worker = make(graph(c="v2"), name="changed", enable_fingerprints=True)
    monitor = Monitor(db=url())
    assert monitor.why("c") == ["invalidated: fingerprint changed v1 -> v2"]
    assert monitor.why("d") == ["invalidated: upstream task 'c' was invalidated"]
    assert monitor.why("b") == []
    assert [t.id for t in worker] == ["c", "d"]  # in dependency order, nothing else
    assert set(states().values()) == {"completed"}
    assert [e for e, *_ in history("c")][-3:] == ["invalidated", "claimed", "completed"]
    assert rows("SELECT fingerprint FROM attempts WHERE task = (SELECT pk FROM tasks"
                " WHERE id = 'c') ORDER BY attempt") == [("v1",), ("v2",)]
    assert rows("SELECT count(*) FROM tasks WHERE invalidated = 1") == [(0,)]


def test_without_downstream_only_the_changed_task_runs_again():
    run(graph(), "first")
    assert run(graph(b="v2"), "changed", invalidate_downstream=False) == ["b"]
    assert set(states().values()) == {"completed"}


def test_two_successive_changes():
    run(graph(), "first")
    assert run(graph(d="v2"), "second") == ["d"]
    assert run(graph(d="v2", a="v2"), "third") == ["a", "b", "c", "x", "d"]
    assert run(graph(d="v2", a="v2"), "fourth") == []


def test_tasks_without_fingerprints_never_run_again_but_follow_their_upstream():
    plain = dict.fromkeys("abcdex")
    run(graph(**plain), "first")
    assert run(graph(**plain), "again") == []
    # a mixed graph: b gets a fingerprint (from None: a change), the rest have none
    assert run(graph(**{**plain, "b": "v1"}), "mixed") == ["b", "c", "x", "d"]


def test_with_fingerprints_disabled_a_changed_fingerprint_is_ignored():
    run(graph(), "first", enable_fingerprints=False)
    assert run(graph(c="v2"), "second", enable_fingerprints=False) == []


def test_the_environment_turns_fingerprints_on_and_downstream_off(monkeypatch):
    run(graph(), "first")
    monkeypatch.setenv("LAUFBAND_ENABLE_FINGERPRINTS", "1")
    monkeypatch.setenv("LAUFBAND_INVALIDATE_DOWNSTREAM", "0")
    assert [t.id for t in make(graph(b="v2"), name="env")] == ["b"]


def test_a_changed_dependency_set_reruns_the_task_and_stores_its_new_edges():
    run(graph(), "first")
    changed = graph()
    changed[3] = Task("d", dependencies={"e"}, fingerprint="v1")  # d now needs e, not c
    assert run(changed, "rewired") == ["d"]
    assert Monitor(db=url()).why("d") == []
    assert history("d")[-3][0] == "invalidated"
    assert rows("SELECT d.id FROM edges JOIN tasks d ON d.pk = edges.dep JOIN tasks t"
                " ON t.pk = edges.task WHERE t.id = 'd'") == [("e",)]


def test_without_fingerprints_a_changed_dependency_set_is_an_error():
    run(graph(), "first", enable_fingerprints=False)
    changed = graph()
    changed[3] = Task("d", dependencies={"e"}, fingerprint="v1")
    with pytest.raises(GraphMismatchError, match="enable fingerprints"):
        run(changed, "rewired", enable_fingerprints=False)


def test_other_requirements_are_another_task_even_with_fingerprints():
    run(graph(), "first")
    changed = graph()
    changed[4] = Task("e", requirements={"gpu"}, fingerprint="v1")
    with pytest.raises(GraphMismatchError, match="other requirements.*'e'"):
        run(changed, "second")


def test_a_task_removed_from_the_graph_is_kept_and_reported():
    run(graph(), "first")
    without_x = [t for t in graph() if t.id != "x"]
    assert run(without_x, "second") == []
    assert states()["x"] == "removed"
    out = io.StringIO()
    status(open_store(url()), out=out)
    assert re.search(r"removed +1 +16.7 % +not in the graph any more", out.getvalue())
    assert "tasks: 5/6 completed" in out.getvalue()  # still counted
    assert run(graph(), "back") == ["x"]  # back in the graph: it runs again
    assert set(states().values()) == {"completed"}


def test_a_fingerprint_change_while_a_dependent_runs():
    """A dependent that runs when its upstream task is invalidated finishes its attempt,
    which is not kept: it runs again after the upstream task."""
    clock = FakeClock()
    run(graph(), "first", clock=clock)
    running = make(graph(c="v2"), name="A", clock=clock, enable_fingerprints=True)
    loop = iter(running)
    assert next(loop).id == "c"  # A runs c (v2) ...
    # ... while the fingerprint of b changes (another run of the script)
    worker_b = make(graph(c="v2", b="v3"), name="B", clock=clock, enable_fingerprints=True)
    assert states()["c"] == "running" and states()["b"] == "ready"
    # A stops after c (else, once it finished c, it would wait for B, which may run b:
    # c keeps A's generation)
    running.close()
    assert [t.id for t in loop] == []  # A finishes c: not completed (it waits for b)
    assert states()["c"] == "pending"
    assert history("c")[-1][:2] == ("invalidated", "pending")
    assert [t.id for t in worker_b] == ["b", "c", "x", "d"]
    assert set(states().values()) == {"completed"}
    counted = dict(rows("SELECT state, sum(n) FROM counts GROUP BY state HAVING sum(n) > 0"))
    assert counted == dict(rows("SELECT state, count(*) FROM tasks GROUP BY state"))


def test_two_workers_that_yield_different_graphs_at_the_same_time():
    """B went online before A registered its version of the graph (B's clock says so);
    B's graph differs: B gets an error instead of undoing A's. A worker started after
    A's registration supersedes it (a rerun)."""
    run(graph(), "first")
    a = make(graph(c="v2"), name="A", clock=FakeClock(1_000_001.0), enable_fingerprints=True)
    with pytest.raises(GraphMismatchError, match="Worker 'A' registered another version"):
        make(graph(c="v3"), name="B", clock=FakeClock(1_000_000.0), enable_fingerprints=True)
    later = make(graph(c="v3"), name="C", clock=FakeClock(1_000_002.0),
                 enable_fingerprints=True)
    assert [t.id for t in later] == ["c", "d"]
    assert a.identifier == "A"  # alive all along


def test_a_networkx_graph_runs_like_the_task_list():
    g = nx.DiGraph()
    g.add_node("prepare", data={"n": 1}, fingerprint="v1", owner="me")
    g.add_node("train", requirements={"gpu"}, max_parallel_workers=2)
    g.add_edge("prepare", "train")
    g.add_edge("prepare", "report")
    tasks = list(make(g, name="w", labels={"gpu"}))
    assert [t.id for t in tasks] == ["prepare", "train", "report"]
    prepare, train, report = tasks
    assert prepare.data == {"n": 1} and prepare.fingerprint == "v1"
    assert prepare.info == {"owner": "me"}
    assert train.requirements == {"gpu"} and train.max_parallel_workers == 2
    assert report.dependencies == {"prepare"}
    assert len(make(g, name="v", labels={"gpu"})) == 3


@pytest.mark.parametrize("bad, message", [
    (nx.DiGraph([(1, 2)]), r"Node 1 \(int\).*nx.relabel_nodes\(graph, str\)"),
    (nx.Graph([("a", "b")]), "directed graph, got a networkx Graph"),
    (nx.DiGraph([("a", "b"), ("b", "a")]), "cycle"),
    (nx.DiGraph([("a", "a")]), "depends on itself"),
])
def test_bad_networkx_graphs_get_clear_errors(bad, message):
    with pytest.raises(GraphError, match=message):
        make(bad, name="w")
    assert not os.path.exists("g.sqlite")


@pytest.mark.sqlite_only
def test_pruning_keeps_the_workflow_and_shrinks_the_file():
    run(graph(), "first")
    for i in range(2, 40):  # a long history: c changes again and again
        run(graph(c=f"v{i}"), f"run{i}")
    before = os.path.getsize("g.sqlite")
    events = rows("SELECT count(*) FROM events")[0][0]
    pruned = prune("g.sqlite", keep=3, vacuum=True)
    assert pruned.events > 0 and pruned.attempts > 0
    assert rows("SELECT count(*) FROM events")[0][0] == events - pruned.events
    assert rows("SELECT max(n) FROM (SELECT count(*) AS n FROM events GROUP BY task)") == [
        (3,)]
    assert os.path.getsize("g.sqlite") < before
    # the latest and the completing attempt of every task stay (its last fingerprint)
    assert rows("SELECT fingerprint FROM attempts WHERE task = (SELECT pk FROM tasks"
                " WHERE id = 'c') AND outcome = 'completed'")[-1] == ("v39",)
    assert run(graph(c="v39"), "same") == []  # the next run behaves as without pruning
    assert run(graph(c="v40"), "changed") == ["c", "d"]


def test_prune_rejects_bad_values():
    from laufband import ConfigError

    run(graph(), "first")
    with pytest.raises(ConfigError, match="keep=0 is invalid"):
        prune("g.sqlite", keep=0)


def fp_worker(tasks, name, clock, **kw):
    """A worker with fingerprints, started a second after the one before (a rerun, not
    a worker starting at the same time)."""
    clock.advance(1)
    return make(tasks, name=name, clock=clock, enable_fingerprints=True, batch_size=1, **kw)


def test_a_task_removed_while_it_runs_and_back_before_its_attempt_ends_stays():
    clock = FakeClock()
    g = [Task("X", fingerprint="v1"), Task("D", dependencies={"X"}, fingerprint="v1")]
    runner = iter(fp_worker(g, "A", clock))
    assert next(runner).id == "X"
    fp_worker([Task("Y", fingerprint="v1")], "B", clock)  # X and D leave the graph
    assert rows("SELECT dirty FROM tasks WHERE id = 'X'") == [(2,)]
    back = fp_worker(g, "C", clock)  # back before X's attempt ended
    assert rows("SELECT dirty FROM tasks WHERE id = 'X'") == [(0,)]
    assert list(runner) == []  # X completes (its result is kept: X never left)
    assert [t.id for t in back] == ["D"]
    assert states() == {"X": "completed", "D": "completed", "Y": "removed"}


def test_a_failed_attempt_of_an_invalidated_task_waits_for_its_dependency():
    """B runs when its dependency A is invalidated; B fails with a retry left: it must
    wait for A again, not be ready while A has not run."""
    clock = FakeClock()
    g = [Task("A", fingerprint="v1"), Task("B", dependencies={"A"}, fingerprint="v1")]
    run(g, "first", clock=clock)
    run(g, "second", clock=clock)  # nothing
    runner = fp_worker([Task("A", fingerprint="v1"),
                        Task("B", dependencies={"A"}, fingerprint="v2")], "R", clock,
                       max_failed_retries=1)
    loop = iter(runner)
    assert next(loop).id == "B"
    changer = fp_worker([Task("A", fingerprint="v2"),
                         Task("B", dependencies={"A"}, fingerprint="v2")], "C", clock)
    loop.close()  # B's body fails (a retry is left)
    assert states() == {"A": "ready", "B": "pending"}
    assert [t.id for t in changer] == ["A", "B"]


def test_a_shared_task_to_be_removed_is_not_claimed():
    clock = FakeClock()
    g = [Task("S", max_parallel_workers=2, fingerprint="v1"), Task("T", fingerprint="v1")]
    runner = iter(fp_worker(g, "A", clock))
    assert next(runner).id == "S"  # one of two slots
    newer = fp_worker([Task("T", fingerprint="v1")], "B", clock)  # S leaves the graph
    assert [t.id for t in newer] == ["T"]  # not S (it has no data for it)
    assert list(runner) == []
    assert states() == {"S": "removed", "T": "completed"}


def test_stale_attempts_of_a_shared_task_do_not_complete_it_after_a_change():
    clock = FakeClock()
    v1 = [Task("S", max_parallel_workers=2, fingerprint="v1")]
    first, second = iter(fp_worker(v1, "A", clock)), iter(fp_worker(v1, "B", clock))
    assert next(first).id == next(second).id == "S"
    rerun = fp_worker([Task("S", max_parallel_workers=2, fingerprint="v2")], "C", clock)
    assert list(first) == [] and list(second) == []  # both began before the change
    assert states() == {"S": "ready"}
    assert [t.id for t in rerun] == ["S"]
    assert rows("SELECT fingerprint, outcome FROM attempts ORDER BY attempt") == [
        ("v1", "completed"), ("v1", "completed"), ("v2", "completed")]


@pytest.mark.parametrize("case", ["dependency-on-a-failure-dropped", "failure-added"])
def test_changed_dependencies_block_and_unblock_what_is_below(case):
    """A dependency set change that makes a task blocked (or no longer blocked) does the
    same for everything below it."""
    def g(b_deps):
        return [Task("F", fingerprint="v1"), Task("E", fingerprint="v1"),
                Task("B", dependencies=b_deps, fingerprint="v1"),
                Task("C", dependencies={"B"}, fingerprint="v1")]

    first = set() if case == "failure-added" else {"F"}
    worker = make(g(first), name="first", enable_fingerprints=True, batch_size=1)
    for task in worker:
        if task.id == "F":
            break  # F fails for good
    list(make(g(first), name="rest", enable_fingerprints=True))
    if case == "dependency-on-a-failure-dropped":
        assert states()["C"] == "blocked"
        assert run(g({"E"}), "changed") == ["B", "C"]
    else:
        assert states()["C"] == "completed"
        assert run(g({"F"}), "changed") == []
        assert states()["B"] == "blocked" and states()["C"] == "blocked"


def test_a_transaction_after_a_vacuum_is_still_one_transaction():
    """VACUUM runs outside a transaction (autocommit on PostgreSQL); the connection it
    used must not bring that to the next transaction, which would then commit
    statement by statement."""
    import sqlalchemy as sa

    from laufband.store import Store

    list(make([Task("a"), Task("b")], name="w"))
    store = Store.open_existing(url())
    store.prune(1, vacuum=True)
    with pytest.raises(RuntimeError), store.db.transaction() as conn:
        conn.execute(sa.text("UPDATE workers SET hostname = 'HALF-WRITTEN'"))
        raise RuntimeError("the transaction fails half-way")
    assert rows("SELECT hostname FROM workers") != [("HALF-WRITTEN",)]
