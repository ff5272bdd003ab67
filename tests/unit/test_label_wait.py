"""label_wait: a worker whose pending tasks wait for tasks that need labels no live
worker has waits that long for such a worker before it leaves them (workers.done_for).
Store calls with a fake clock: what each rule decides, at exact times."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from graphs import build
from helpers import make, url

from laufband import Task
from laufband.clock import FakeClock
from laufband.states import Event, WorkerState
from laufband.store import Store
from laufband.store.model import Failure, Finish, Me, Want, WorkerInfo
from laufband.task import read_graph

pytestmark = pytest.mark.backends

OFF = WorkerState.OFFLINE


def clocked_store() -> tuple[FakeClock, Store]:
    """A store of the test's database on a fake clock of its own."""
    clock = FakeClock()
    return clock, Store(url(), Store.writers_lock(url(), 60), clock)


def worker(store: Store, name: str, labels: set[str], tasks, fingerprints: bool = False,
           **me) -> Me:
    store.register_worker(WorkerInfo(name, "h", 1, frozenset(labels), 60.0),
                          lambda host, pid: False)
    gen = store.register_graph(read_graph(tasks, fingerprints=fingerprints), name)
    who = Me(name, [], gen, **me)
    store.reqsets_for(who, frozenset(labels))
    return who


def test_a_worker_waits_label_wait_then_leaves():
    clock, store = clocked_store()
    gpu = worker(store, "G", {"gpu"}, build("stages:1"), label_wait=10.0)
    first = store.step(gpu, [], Want(limit=1, start=True, leave=OFF))
    assert (first.claims, first.left) == ([], False)  # waits for a cpu worker
    clock.advance(9.9)
    assert not store.poll(gpu, OFF).left
    clock.advance(0.2)
    assert store.poll(gpu, OFF).left


def test_work_that_came_makes_the_next_wait_start_afresh():
    """A cpu worker came and went between two looks of the waiting gpu worker (it never
    saw it live: its next look found a task to claim). Once the gpu worker ran that
    task and is stranded again, it waits label_wait from then, not from its first
    wait (review30 F1: it left at once)."""
    clock, store = clocked_store()
    tasks = build("stages:2")
    gpu = worker(store, "G", {"gpu"}, tasks, label_wait=10.0)
    assert not store.step(gpu, [], Want(limit=1, start=True, leave=OFF)).left
    clock.advance(8)
    cpu = worker(store, "C", {"cpu"}, tasks)
    [cpu0] = store.step(cpu, [], Want(limit=1, start=True)).claims
    store.leave("C", [Finish(cpu0, Event.COMPLETED)], OFF)  # it ran one task only
    assert store.poll(gpu, OFF).claimable
    [gpu0] = store.step(gpu, [], Want(limit=1)).claims
    clock.advance(1)
    after = store.step(gpu, [Finish(gpu0, Event.COMPLETED)], Want(limit=1, leave=OFF))
    assert (after.claims, after.left) == ([], False)  # gpu1 waits for cpu1: no cpu worker
    clock.advance(5)  # 14 s after the first wait, 5 s after this one began
    assert not store.poll(gpu, OFF).left
    clock.advance(5.1)
    assert store.poll(gpu, OFF).left


def test_a_worker_short_of_time_leaves_at_once_and_does_not_blame_labels():
    """What its pending task waits for is a task it has the labels for but no time
    (its allocation ends): it leaves short of time at once (review30 F2: it waited
    label_wait, as if labels were missing)."""
    clock, store = clocked_store()
    tasks = [Task("long", runtime=1000.0), Task("after", requirements={"x"},
                                                dependencies={"long"}, runtime=1.0)]
    me = worker(store, "W", {"x"}, tasks, label_wait=10.0, deadline=clock.now() + 240)
    result = store.step(me, [], Want(limit=1, start=True, leave=OFF))
    assert (result.claims, result.left, result.short_of_time) == ([], True, True)


def older_and_newer(graph: str | list[Task], changed: str
                    ) -> tuple[FakeClock, Store, Me, Me]:
    """A gpu worker G of ``graph`` (a name for graphs.build, or tasks) waits for a cpu
    worker; then a cpu worker C starts with ``changed``'s fingerprint changed (a rerun
    of the script): C's generation is newer, and so is ``changed``'s."""
    clock, store = clocked_store()
    tasks = build(graph) if isinstance(graph, str) else graph
    old = [dataclasses.replace(t, fingerprint="v1") for t in tasks]
    new = [dataclasses.replace(t, fingerprint="v2" if t.id == changed else "v1")
           for t in old]
    gpu = worker(store, "G", {"gpu"}, old, fingerprints=True, label_wait=30.0)
    assert not store.step(gpu, [], Want(limit=1, start=True, leave=OFF)).left
    clock.advance(1)  # C starts after G registered its graph (else: a mismatch)
    cpu = worker(store, "C", {"cpu"}, new, fingerprints=True)
    assert cpu.generation > gpu.generation
    return clock, store, gpu, cpu


@pytest.mark.parametrize("cpu_leaves_as", [OFF, WorkerState.IDLE])
def test_a_worker_of_an_older_graph_does_not_wait_for_newer_work(cpu_leaves_as):
    """Once nothing of its own generations waits it leaves at once, whether or not a
    live worker may run what the newer work waits for: what still waits is a task a
    newer graph changed, which it may not claim (review31 N2: it waited label_wait for
    it and blamed labels)."""
    _clock, store, gpu, cpu = older_and_newer("stages:2", "gpu1")
    [cpu0] = store.step(cpu, [], Want(limit=1, start=True)).claims
    store.leave("C", [Finish(cpu0, Event.COMPLETED)], cpu_leaves_as)  # cpu1 stays ready
    [gpu0] = store.step(gpu, [], Want(limit=1)).claims
    after = store.step(gpu, [Finish(gpu0, Event.COMPLETED)], Want(limit=1, leave=OFF))
    assert (after.claims, after.left) == ([], True)  # gpu1 is of generation 2
    assert gpu.stranded_since is None  # nor does it say it waited for labels


def test_a_worker_of_an_older_graph_waits_while_a_newer_one_may_run_its_upstream():
    """A rerun changed cpu0 (generation 2); gpu0 keeps the old generation. The newer
    cpu worker is live but has not claimed cpu0 yet: the older gpu worker, the only one
    that may run gpu0, waits label_wait for it (review32 F1: it left at once, and gpu0
    was stranded). Once cpu0 runs, it waits for it as for any running task."""
    clock, store, gpu, cpu = older_and_newer("stages:1", "cpu0")
    assert not store.poll(gpu, OFF).left
    clock.advance(29.9)
    assert not store.poll(gpu, OFF).left
    [cpu0] = store.step(cpu, [], Want(limit=1, start=True)).claims
    clock.advance(60)  # cpu0 runs long: no label wait any more
    assert not store.poll(gpu, OFF).left and gpu.stranded_since is None
    store.leave("C", [Finish(cpu0, Event.COMPLETED)], OFF)
    assert [c.id for c in store.step(gpu, [], Want(limit=1)).claims] == ["gpu0"]


def test_a_worker_of_an_older_graph_waits_label_wait_only():
    """It cannot tell whether a live worker may claim the newer task: here the newer
    worker stays live and never claims cpu0, and the older one leaves after
    label_wait."""
    clock, store, gpu, _cpu = older_and_newer("stages:1", "cpu0")
    assert not store.poll(gpu, OFF).left
    clock.advance(30.1)
    assert store.poll(gpu, OFF).left


def test_a_worker_of_an_older_graph_waits_while_its_shared_upstream_runs():
    """The changed cpu0 is shared: while the newer worker runs it, it stays ready (a
    slot is free) and the counters show nothing running. The older gpu worker waits for
    that attempt, however long it takes (review33 F1: it left after label_wait)."""
    shared = [Task("cpu0", requirements={"cpu"}, max_parallel_workers=2),
              Task("gpu0", requirements={"gpu"}, dependencies={"cpu0"})]
    clock, store, gpu, cpu = older_and_newer(shared, "cpu0")
    [cpu0] = store.step(cpu, [], Want(limit=1, start=True)).claims
    assert store.counts().n(["running"]) == 0
    assert not store.poll(gpu, OFF).left
    clock.advance(60)
    assert not store.poll(gpu, OFF).left
    store.leave("C", [Finish(cpu0, Event.COMPLETED)], OFF)
    assert [c.id for c in store.step(gpu, [], Want(limit=1)).claims] == ["gpu0"]


def test_the_older_wait_starts_over_when_the_worker_with_the_labels_leaves():
    """As label_wait's does (README 'Labels'): a cpu worker that comes restarts the
    older gpu worker's wait, and so does its leaving without claiming cpu0 (review33
    F2: the wait went on from its coming)."""
    clock, store, gpu, _cpu = older_and_newer("stages:1", "cpu0")
    assert not store.poll(gpu, OFF).left
    clock.advance(25)
    store.leave("C", [], OFF)
    assert not store.poll(gpu, OFF).left
    clock.advance(29.9)
    assert not store.poll(gpu, OFF).left
    clock.advance(0.2)
    assert store.poll(gpu, OFF).left


def test_two_workers_of_an_older_graph_do_not_wait_for_each_other():
    """A rerun changed g1, which needs gpu; its dependent g2 keeps the old generation.
    Only the two older gpu workers have gpu, and neither may claim the newer g1: each
    sees the other live with the labels, and neither waits for it for ever (review33:
    they did at de8691e)."""
    clock, store = clocked_store()
    old = [Task("g1", requirements={"gpu"}, fingerprint="v1"),
           Task("g2", requirements={"gpu"}, dependencies={"g1"}, fingerprint="v1")]
    new = [dataclasses.replace(old[0], fingerprint="v2"), old[1]]
    older = [worker(store, name, {"gpu"}, old, fingerprints=True, label_wait=30.0)
             for name in ("G1", "G2")]
    clock.advance(1)
    worker(store, "C", {"cpu"}, new, fingerprints=True)
    assert [store.poll(w, OFF).left for w in older] == [False, False]
    clock.advance(30.1)
    # G1 leaves; G2 saw it live with the labels and starts its wait over (as label_wait
    # does when a worker with the labels leaves), so it waits at most twice label_wait.
    assert [store.poll(w, OFF).left for w in older] == [True, False]
    clock.advance(30.1)
    assert store.poll(older[1], OFF).left


def test_a_worker_of_an_older_graph_waits_while_its_upstream_is_retried():
    """The newer worker's attempt at the changed cpu0 failed within its budget: cpu0 is
    ready again, and the older gpu worker waits for the retry (review32 F1)."""
    clock, store, gpu, cpu = older_and_newer("stages:1", "cpu0")
    cpu.max_failed = 1  # its attempts may fail once and run again
    [cpu0] = store.step(cpu, [], Want(limit=1, start=True)).claims
    failed = Finish(cpu0, Event.FAILED, budget=1, failure=Failure("boom", "traceback"))
    assert store.step(cpu, [failed], Want(limit=0)).claims == []
    assert not store.poll(gpu, OFF).left
    clock.advance(29.9)
    assert not store.poll(gpu, OFF).left
    [again] = store.step(cpu, [], Want(limit=1)).claims
    store.leave("C", [Finish(again, Event.COMPLETED)], OFF)
    assert [c.id for c in store.step(gpu, [], Want(limit=1)).claims] == ["gpu0"]


def test_a_worker_of_an_older_graph_waits_label_wait_for_its_upstream():
    """The newer cpu worker left without running the changed cpu0, which nobody live
    can run now: the older gpu worker waits label_wait for one, as a worker of the
    newest graph does, then leaves (review32 F2: it left at once)."""
    clock, store, gpu, _cpu = older_and_newer("stages:1", "cpu0")
    assert not store.poll(gpu, OFF).left  # C is live
    store.leave("C", [], OFF)
    assert not store.poll(gpu, OFF).left  # the wait starts
    assert gpu.stranded_since == clock.now()
    clock.advance(29.9)
    assert not store.poll(gpu, OFF).left
    clock.advance(0.2)
    assert store.poll(gpu, OFF).left


def test_a_worker_of_an_older_graph_waits_while_a_newer_one_runs_its_upstream():
    """A rerun changed cpu0: it has the new generation, gpu0 (unchanged) keeps the old
    one. While a newer worker runs cpu0, the older gpu worker waits for it, and then
    runs gpu0 (review31 N1: it left at once, and gpu0 stayed ready with nobody to run
    it)."""
    clock, store, gpu, cpu = older_and_newer("stages:1", "cpu0")
    [cpu0] = store.step(cpu, [], Want(limit=1, start=True)).claims
    clock.advance(60)  # long after label_wait: it waits for the running task itself
    assert not store.poll(gpu, OFF).left
    store.leave("C", [Finish(cpu0, Event.COMPLETED)], OFF)
    assert store.poll(gpu, OFF).claimable
    [gpu0] = store.step(gpu, [], Want(limit=1)).claims
    assert gpu0.id == "gpu0"


def test_each_loop_says_that_it_waits(caplog):
    """A second loop of the same worker waits again and says so again (review30 F3)."""
    w = make(build("stages:1"), name="g", labels={"gpu"}, label_wait=1.0)
    with caplog.at_level(logging.WARNING, logger="laufband"):
        assert list(w) == []
        assert list(w) == []
    said = [r.getMessage() for r in caplog.records]
    assert sum("waits up to 1 s for a worker" in m for m in said) == 2, said
    assert sum("within label_wait (1 s)" in m for m in said) == 2, said
