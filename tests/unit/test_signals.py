"""Stop signals in one process (real signals, sent to ourselves): the task is handed
back, the exit code is 128 + signal number, and the previous handlers come back."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import pytest
from helpers import flat_worker, history, make, rows, states

from laufband import Task
from laufband.signals import STOP_SIGNALS, Preempted


def mine(signum, frame):  # a handler of "the application" that must survive our loop
    raise AssertionError("the application's handler must not run during the loop")


@pytest.fixture
def app_handlers():
    previous = {s: signal.signal(s, mine) for s in STOP_SIGNALS}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def test_signal_in_loop_body_hands_task_back_and_exits(app_handlers):
    worker = flat_worker(range(3), batch_size=3)  # one batch: "2" is claimed, not started
    seen = []
    with pytest.raises(Preempted) as info:
        for item in worker:
            seen.append(item)
            if item == 1:
                # SIGUSR1 drains instead (test_walltime.py)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # a long task; the handler interrupts it
    assert isinstance(info.value, SystemExit)
    assert info.value.code == 128 + signal.SIGTERM
    assert seen == [0, 1]
    assert states() == {"0": "completed", "1": "ready", "2": "ready"}
    assert history("1")[-1][:2] == ("preempted", "ready")
    assert [e for e, *_ in history("2")] == ["claimed", "preempted"]  # the batch's rest
    assert rows("SELECT failures, kills FROM tasks WHERE id = '1'") == [(0, 0)]
    assert rows("SELECT state FROM workers") == [("offline",)]
    assert all(signal.getsignal(s) is mine for s in STOP_SIGNALS)


def test_handlers_are_ours_only_during_the_loop(app_handlers):
    worker = flat_worker(range(2))
    during = []
    for _ in worker:
        during.append(signal.getsignal(signal.SIGTERM))
    assert all(handler is not mine for handler in during)
    assert all(signal.getsignal(s) is mine for s in STOP_SIGNALS)


def test_loop_in_a_thread_installs_no_handlers(app_handlers):
    result, errors = [], []

    def run():
        try:
            result.extend(flat_worker(range(3)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not errors and result == [0, 1, 2]
    assert all(signal.getsignal(s) is mine for s in STOP_SIGNALS)


def signal_inside_leave(worker, also=None):
    """Send SIGTERM to ourselves when the loop's end starts recording (``also``: run
    something else there first)."""
    leave = worker._store.leave

    def leave_with_a_signal(*args, **kwargs):
        if also is not None:
            also()
        os.kill(os.getpid(), signal.SIGTERM)
        return leave(*args, **kwargs)

    worker._store.leave = leave_with_a_signal


def test_a_signal_while_the_loop_ends_is_not_swallowed(app_handlers, capsys):
    """The loop's end had read the signal state before the signal came: it looks
    again after recording, so the worker still stops with 143 and says so."""
    worker = flat_worker(range(3), batch_size=1)
    seen = []
    with pytest.raises(Preempted) as info:
        for item in worker:
            seen.append(item)
            if item == 1:
                signal_inside_leave(worker)
                worker.close()  # the end records the completion of 1
    assert info.value.code == 143 and seen == [0, 1]
    assert states() == {"0": "completed", "1": "completed", "2": "ready"}
    assert "laufband: SIGTERM received: worker w stops" in capsys.readouterr().err


def test_a_signal_while_a_with_block_hands_back_a_suspended_loop(app_handlers):
    """Leaving the with block ends the suspended loop (its task goes back); a signal
    during that hand-back waits for it to finish, then raises."""
    with pytest.raises(Preempted), flat_worker(range(3), batch_size=1) as worker:
        loop = iter(worker)
        assert next(loop) == 0
        signal_inside_leave(worker)
    assert states() == {"0": "ready", "1": "ready", "2": "ready"}
    assert history("0")[-1][:2] == ("preempted", "ready")
    assert rows("SELECT state FROM workers") == [("offline",)]
    assert rows("SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]


def test_close_from_another_thread_while_the_loop_ends_loses_nothing():
    """close() from a watchdog thread while the loop records its last completion: it
    only asks the loop to stop (before, it went offline at once and handed the task
    back under the loop's feet: the completion was fenced and the task ran again)."""
    worker = flat_worker(range(3), batch_size=1)
    leave = worker._store.leave

    def leave_after_a_watchdog(*args, **kwargs):
        watchdog = threading.Thread(target=worker.close)
        watchdog.start()
        watchdog.join(10)
        assert not watchdog.is_alive()
        return leave(*args, **kwargs)

    for item in worker:
        if item == 1:
            worker._store.leave = leave_after_a_watchdog
            worker.close()
    assert states() == {"0": "completed", "1": "completed", "2": "ready"}
    assert rows("SELECT count(*) FROM events WHERE event = 'fenced'") == [(0,)]
    assert rows("SELECT state FROM workers") == [("offline",)]


def suspend_in_a_cycle(worker) -> object:
    """Start ``worker``'s loop, let it yield its first task, and keep it only in a
    reference cycle: the cyclic garbage collector closes it, at any allocation, on any
    thread. Returns the first item."""

    class Holder:
        pass

    holder = Holder()
    holder.me = holder
    holder.loop = iter(worker)
    return next(holder.loop)


def test_a_loop_collected_on_another_thread_leaves_the_signals_to_the_application():
    """A suspended loop in a reference cycle is collected by a garbage collection on
    another thread, where its handlers cannot be restored. The next stop signal goes
    to the application's handler all the same (and restores it)."""
    got = []
    previous = {s: signal.signal(s, lambda num, _f: got.append(num)) for s in STOP_SIGNALS}
    try:
        assert suspend_in_a_cycle(flat_worker(range(2))) == 0
        gc.disable()
        try:
            collector = threading.Thread(target=gc.collect)
            collector.start()
            collector.join(30)
        finally:
            gc.enable()
        assert states()["0"] != "running"  # the loop ended there
        os.kill(os.getpid(), signal.SIGTERM)
        assert got == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is not None
        os.kill(os.getpid(), signal.SIGTERM)
        assert got == [signal.SIGTERM, signal.SIGTERM]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_heartbeat_called_off_while_the_body_holds_db_lock_writes_nothing():
    """stop() does not wait for a beat that waits for the lock the caller holds; that
    beat must not run its transaction once the lock is free (the worker went offline;
    at exit it could be cut off mid-transaction)."""
    from laufband.clock import FakeClock

    clock = FakeClock()
    worker = flat_worker(range(2), clock=clock)
    assert list(worker) == [0, 1]
    stamp = rows("SELECT heartbeat FROM workers")
    clock.advance(5)
    asked = threading.Event()
    acquire = worker._db_lock.acquire

    def watched(cancel=None):
        if threading.current_thread() is not threading.main_thread():
            asked.set()
        acquire(cancel)

    worker._db_lock.acquire = watched
    stop = threading.Event()
    with worker.db_lock:
        beating = threading.Thread(target=worker._session.heartbeat.beat, args=(stop,))
        beating.start()
        assert asked.wait(10)  # the beat waits for the lock we hold
        stop.set()  # what Heartbeat.stop() does when its caller holds the lock
    beating.join(10)
    assert not beating.is_alive()
    assert rows("SELECT heartbeat FROM workers") == stamp


def test_a_signal_inside_the_lock_code_of_a_read_in_the_body_leaves_the_lock_sound():
    """The loop body reads through Monitor (the same database lock, no laufband call
    around it); a signal lands inside the lock's own bookkeeping. It must not raise
    there (the lock would stay half taken and hang the worker's threads): it raises as
    soon as the read let go of the lock (not only when the task returns)."""
    from laufband import Monitor

    worker = flat_worker(range(3), batch_size=1)
    lock = worker._db_lock
    take_file = lock._acquire_file
    monitor = Monitor(db="g.sqlite")
    read = []
    with pytest.raises(Preempted):
        for item in worker:
            if item == 1:
                def take_file_with_a_signal():
                    lock._acquire_file = take_file  # once
                    os.kill(os.getpid(), signal.SIGTERM)
                    take_file()
                    read.append("lock taken")

                lock._acquire_file = take_file_with_a_signal
                monitor.get_workflow()
                raise AssertionError("the read did not raise when it let go of the lock")
    assert read == ["lock taken"]  # the signal did not cut the acquisition short
    assert not lock.is_locked and lock._depth == 0
    assert states() == {"0": "completed", "1": "ready", "2": "ready"}
    assert rows("SELECT state FROM workers") == [("offline",)]


def test_a_signal_in_an_inner_loop_hands_the_outer_task_back_too(tmp_path):
    """Nested loops (datasets, then items): the inner loop's handler gets SIGTERM. The
    outer loop, whose body the Preempted left, hands its task back as well; it did not
    fail."""
    outer = make([Task("dataset1"), Task("dataset2")], name="outer", db="outer.sqlite")
    with pytest.raises(Preempted):
        for _dataset in outer:
            for item in flat_worker(range(3), name="inner", db="inner.sqlite"):
                if item == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
    assert states("outer.sqlite") == {"dataset1": "ready", "dataset2": "ready"}
    assert history("dataset1", "outer.sqlite")[-1][:2] == ("preempted", "ready")
    assert states("inner.sqlite") == {"0": "completed", "1": "ready", "2": "ready"}


def test_a_loop_collected_inside_a_transaction_of_its_thread_records_later():
    """A suspended loop in a reference cycle is collected in the middle of a
    transaction on the same thread (a heartbeat, say). Recording its end there would
    wait for that very transaction (a minute of SQLite's busy timeout, holding the lock
    every worker needs): a thread records it once the transaction is over."""
    worker = flat_worker(range(2))
    assert suspend_in_a_cycle(worker) == 0
    with worker._store.db.transaction():
        gc.collect()
    ender = next(t for t in threading.enumerate() if t.name == "laufband-end")
    ender.join(30)
    assert not ender.is_alive()
    assert states()["0"] == "failed"  # dropped mid-task, as a break
    assert rows("SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]


def test_leaving_the_with_block_while_the_loop_steps_on_another_thread():
    """The loop runs on a thread and is inside its claim step (not in the body) when
    the main thread leaves the with block: the loop stops there (what it claimed goes
    back), its end takes the worker offline, and the with block waits for that (before,
    the worker went offline under the running loop, which went on claiming without a
    heartbeat, and peers reaped every claim as a kill)."""
    worker = make([Task(f"t{i}") for i in range(4)], batch_size=1)
    stepping, release = threading.Event(), threading.Event()
    ran: list[str] = []
    step = worker._store.step

    def held_step(*args, **kwargs):
        if ran:  # the step after t0
            stepping.set()
            assert release.wait(30)
        return step(*args, **kwargs)

    worker._store.step = held_step
    with worker:
        thread = threading.Thread(target=lambda: ran.extend(t.id for t in worker))
        thread.start()
        assert stepping.wait(30)
        loop = worker._loop
        wait_finished = loop.wait_finished

        def release_then_wait():
            release.set()  # the with block now waits: let the step go on
            wait_finished()

        loop.wait_finished = release_then_wait
    thread.join(30)
    assert not thread.is_alive()
    assert ran == ["t0"]
    assert states() == {"t0": "completed", "t1": "ready", "t2": "ready", "t3": "ready"}
    assert rows("SELECT state FROM workers") == [("offline",)]
    assert rows("SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]
    assert rows("SELECT count(*) FROM events WHERE event IN ('killed', 'fenced')") == [(0,)]


def test_a_worker_collected_with_its_suspended_loop_inside_a_transaction():
    """The worker and its suspended loop are collected together, inside a transaction
    of this thread: the loop's end (on a thread of its own) records the completion of
    the task before, and takes the worker offline; the worker's finaliser must not go
    offline first (it would hand that completion back), and a new loop of another
    worker waits for nothing."""

    class Holder:
        pass

    holder = Holder()
    holder.me = holder
    holder.worker = flat_worker(range(3), batch_size=1)
    holder.loop = iter(holder.worker)
    assert next(holder.loop) == 0
    assert next(holder.loop) == 1  # 0 is done, recorded with 1's claim ... or not yet
    store = holder.worker._store
    del holder
    with store.db.transaction():
        gc.collect()
    for thread in [t for t in threading.enumerate() if t.name.startswith("laufband-")]:
        if thread.name in ("laufband-end", "laufband-offline"):
            thread.join(30)
    assert states()["0"] == "completed"
    assert rows("SELECT count(*) FROM events WHERE event = 'fenced'") == [(0,)]
    assert rows("SELECT state FROM workers") == [("offline",)]
    assert rows("SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]


def test_a_new_loop_waits_for_the_end_of_a_collected_one():
    """The last loop was collected inside a read and records its end on a thread: the
    next loop of the same worker waits for it instead of raising 'already runs a loop'."""
    worker = flat_worker(range(4), batch_size=1)
    assert suspend_in_a_cycle(worker) == 0
    with worker._store.db.read():
        gc.collect()
    assert list(worker) == [1, 2, 3]
    assert states()["0"] == "failed"  # dropped mid-task: as a break
