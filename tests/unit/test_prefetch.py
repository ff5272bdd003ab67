"""Stepping ahead: the next claim+finish runs in the background while a short task runs."""

from __future__ import annotations

import concurrent.futures.thread
import os
import signal
import threading
import time

import pytest
from helpers import flat_worker, history, live, rows, states

from laufband.batching import MAX_PREFETCH_SKIP, Batcher
from laufband.clock import FakeClock
from laufband.errors import DatabaseError
from laufband.prefetch import Prefetch
from laufband.signals import Preempted
from laufband.store import Claim, Counts, StepResult


def claims_of(worker: str = "w") -> int:
    return live(worker)


def wait_for_claims(n: int, timeout: float = 10.0) -> None:
    """Until this worker holds at least ``n`` claims. (At least: the background step
    reads the fake clock while the loop body advances it, so it may see a slow step and
    claim a batch of two ahead.)"""
    deadline = time.monotonic() + timeout
    while claims_of() < n:
        assert time.monotonic() < deadline, f"{claims_of()} claims, expected {n}"
        time.sleep(0.005)


def test_next_task_is_claimed_while_a_short_task_runs():
    clock = FakeClock()
    worker = flat_worker(range(4), clock=clock)
    for item in worker:
        clock.advance(0.05)  # a 50 ms task
        if item == 0:
            assert claims_of() == 1  # nothing observed yet: no step ahead
        if item == 1:
            wait_for_claims(2)  # this task and the one claimed ahead
    assert set(states().values()) == {"completed"}
    assert claims_of() == 0


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def run_on_until(clock: FakeClock, done) -> None:
    """The current task runs on: advance the clock the step thread reads until done()
    (in steps: the thread sets its deadline only when its step returns)."""

    def overrun() -> bool:
        clock.advance(0.1)
        return done()

    wait_for(overrun)


def test_a_task_claimed_ahead_of_a_long_one_is_handed_back():
    """Task 1 looked short (task 0 was), so the worker claimed task 2 ahead while it
    ran; task 1 runs longer than MAX_HOLD, so task 2 goes back to ready (other workers
    may take it), and nothing more is claimed ahead of long tasks."""
    clock = FakeClock()
    worker = flat_worker(range(4), clock=clock)
    for item in worker:
        if item == 0:
            clock.advance(0.05)
            assert claims_of() == 1  # the first task: no step ahead
        elif item == 1:
            wait_for_claims(2)
            run_on_until(clock, lambda: claims_of() == 1)
            assert states()["2"] == "ready"
        else:
            clock.advance(1.0)
            # Tasks now look long: no step ahead was started at all.
            assert worker._prefetch._pending is None
            assert claims_of() == 1
    assert history("2") == [
        ("claimed", "running", "w", 1),
        ("preempted", "ready", "w", 1),
        ("claimed", "running", "w", 2),
        ("completed", "completed", "w", 2),
    ]
    assert rows("SELECT detail FROM events WHERE event = 'preempted'") == [
        ("claimed ahead, but the task before it ran longer than 0.25 s",)]


def test_fixed_batch_size_never_claims_ahead():
    clock = FakeClock()
    worker = flat_worker(range(3), clock=clock, batch_size=1)
    for _ in worker:
        clock.advance(0.05)
        assert claims_of() == 1


def stop_at_2_with_a_claim_ahead(stop) -> None:
    """Run 50 ms tasks over range(5); at item 2, once a task is claimed ahead, stop."""
    clock = FakeClock()
    worker = flat_worker(range(5), clock=clock)
    for item in worker:
        clock.advance(0.05)
        if item == 2:
            wait_for_claims(2)
            if stop(worker):
                break


def test_close_returns_the_task_claimed_ahead():
    stop_at_2_with_a_claim_ahead(lambda worker: worker.close())
    s = states()
    assert [s[str(i)] for i in range(5)] == ["completed"] * 3 + ["ready"] * 2
    assert claims_of() == 0
    assert history("3")[-1][:2] == ("preempted", "ready")
    assert rows("SELECT state FROM workers") == [("offline",)]


def test_break_fails_the_current_task_and_returns_the_one_claimed_ahead():
    stop_at_2_with_a_claim_ahead(lambda worker: True)
    s = states()
    assert [s[str(i)] for i in range(5)] == ["completed"] * 2 + ["failed", "ready", "ready"]
    assert claims_of() == 0


def test_a_failing_background_step_raises_in_the_loop():
    clock = FakeClock()
    worker = flat_worker(range(5), clock=clock)
    real_step = worker._store.step

    def step(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            raise DatabaseError("disk I/O error (injected)")
        return real_step(*args, **kwargs)

    worker._store.step = step
    ran = []
    with pytest.raises(DatabaseError, match="injected"):
        for item in worker:
            clock.advance(0.05)
            ran.append(item)
    assert ran == [0, 1]  # the error surfaced when the loop needed the next task
    assert rows("SELECT state FROM workers") == [("offline",)]
    # The completions the failed step carried were recorded on the way out, and the
    # task it was to claim ahead (it claimed nothing) is still ready: nothing is stuck.
    assert [states()[str(i)] for i in range(5)] == ["completed"] * 2 + ["ready"] * 3
    assert claims_of() == 0


def test_without_a_thread_pool_the_loop_steps_itself(monkeypatch):
    # At interpreter shutdown (a loop running in a non-main thread) the pool refuses work.
    monkeypatch.setattr(concurrent.futures.thread, "_shutdown", True)
    clock = FakeClock()
    worker = flat_worker(range(5), clock=clock)
    for _ in worker:
        clock.advance(0.05)
    assert set(states().values()) == {"completed"}


def test_leaving_a_with_block_returns_what_a_suspended_loop_holds():
    clock = FakeClock()
    with flat_worker(range(5), clock=clock) as worker:
        it = iter(worker)
        assert next(it) == 0
        clock.advance(0.05)
        assert next(it) == 1  # 0 done (recorded with this claim); 2 is claimed ahead
        wait_for_claims(2)
    # Offline: the step in flight was settled, its claim and the one of the suspended
    # loop went back to ready; nothing stays with the offline worker.
    assert rows("SELECT state FROM workers") == [("offline",)]
    assert claims_of() == 0
    assert [states()[str(i)] for i in range(5)] == ["completed"] + ["ready"] * 4
    it.close()  # the late end of task 1 is rejected (fenced), not recorded
    assert states()["1"] == "ready"


def test_steps_ahead_that_claim_nothing_back_off():
    b = Batcher(None)
    b.observe_step(0.002)
    b.observe_task(0.05)
    assert b.prefetch()
    pattern = []
    for _ in range(6):  # six misses in a row: skip 1, 2, 4, 8, 16, 16 chances
        b.observe_prefetch(False)
        skipped = 0
        while not b.prefetch():
            skipped += 1
        pattern.append(skipped)
    assert pattern == [1, 2, 4, 8, MAX_PREFETCH_SKIP, MAX_PREFETCH_SKIP]
    b.observe_prefetch(True)
    assert b.prefetch()


def step_thread_waits_for_the_lock(worker) -> threading.Event:
    """An event set when a thread other than the main one asks for the database lock
    (the step ahead, or a heartbeat)."""
    asked = threading.Event()
    lock = worker._db_lock
    acquire = lock.acquire

    def watched(cancel=None):
        if threading.current_thread() is not threading.main_thread():
            asked.set()
        acquire(cancel)

    lock.acquire = watched
    return asked


@pytest.mark.parametrize("own_lock", [False, True], ids=["default", "users-lock"])
def test_loop_body_may_hold_db_lock_while_the_worker_steps_ahead(own_lock):
    """worker.db_lock is the database's own lock: the step thread waits for the loop
    body to let go of it (a flufl Lock alone would raise AlreadyLockedError there). With
    a user's own flufl Lock as db_lock, the same."""
    from flufl.lock import Lock

    clock = FakeClock()
    kw = {"db_lock": Lock("mine.lock")} if own_lock else {}
    worker = flat_worker(range(8), clock=clock, **kw)
    asked = step_thread_waits_for_the_lock(worker)
    waited = 0
    for item in worker:
        clock.advance(0.05)
        with worker.db_lock:  # a critical section that also excludes claims
            if item >= 2 and worker._prefetch._pending is not None:
                # The step ahead asks for the lock while we hold it: it must wait.
                assert asked.wait(10)
                waited += 1
        asked.clear()
    assert waited >= 3
    assert set(states().values()) == {"completed"}


def test_has_more_jobs_inside_db_lock_with_a_heartbeat_and_a_step_ahead():
    """The old deadlock: the body held db_lock (the file) while the heartbeat or the
    step thread held the thread lock, and has_more_jobs asked for both in the other
    order; or, on its own, has_more_jobs raised AlreadyLockedError. One re-entrant lock
    now."""
    clock = FakeClock()
    worker = flat_worker(range(8), clock=clock)
    asked = step_thread_waits_for_the_lock(worker)
    beating = threading.Thread(target=worker._session.heartbeat.beat)
    for item in worker:
        clock.advance(0.05)
        with worker.db_lock:
            if item == 3:
                beating.start()  # a beat that must wait for the lock we hold
                assert asked.wait(10)
            assert worker.has_more_jobs
            with worker.db_lock:  # re-entrant
                assert worker.has_more_jobs
    beating.join(10)
    assert not beating.is_alive()
    assert set(states().values()) == {"completed"}
    assert not worker.has_more_jobs


def expires_later(lock, seconds: float) -> None:
    """Until the lock file's expiry (1 s resolution) moved ``seconds`` past its first
    value: somebody refreshes it while it is held."""
    first = lock.expiration
    wait_for(lambda: (lock.expiration - first).total_seconds() >= seconds, timeout=15)


def test_the_held_database_lock_is_kept_fresh_while_the_body_holds_it(monkeypatch):
    """Holding worker.db_lock longer than its lifetime: the heartbeat thread refreshes
    it (every third of the lifetime), so no other worker breaks it."""
    monkeypatch.setenv("LAUFBAND_LOCK_LIFETIME", "1")
    worker = flat_worker(range(2), clock=FakeClock())
    for _ in worker:
        with worker.db_lock:
            expires_later(worker._db_lock.file_lock, 2)
    assert set(states().values()) == {"completed"}


def test_the_heartbeat_keeps_the_users_lock_fresh():
    """worker.lock held in the loop body past its lifetime (2 x heartbeat_interval):
    each heartbeat refreshes it."""
    worker = flat_worker(range(2), clock=FakeClock(), heartbeat_interval=1,
                         heartbeat_timeout=3)
    for _ in worker:
        with worker.lock:
            expires_later(worker.lock, 2)
    assert set(states().values()) == {"completed"}


def test_stop_signal_in_the_body_with_a_task_claimed_ahead():
    """A real SIGTERM in the loop body: the handler raises there; on the way out the
    task and the one claimed ahead go back (no retry used), the worker goes offline."""
    clock = FakeClock()
    worker = flat_worker(range(5), clock=clock)
    with pytest.raises(Preempted) as info:
        for item in worker:
            clock.advance(0.05)
            if item == 2:
                wait_for_claims(2)
                os.kill(os.getpid(), signal.SIGTERM)
                raise AssertionError("the handler did not raise")  # pragma: no cover
    assert info.value.code == 143
    s = states()
    assert [s[str(i)] for i in range(5)] == ["completed"] * 2 + ["ready"] * 3
    assert claims_of() == 0
    assert [e for e, *_ in history("3")][-1] == "preempted"
    assert rows("SELECT failures, kills FROM tasks WHERE id = '2'") == [(0, 0)]
    assert rows("SELECT state FROM workers") == [("offline",)]


def test_stop_signal_while_the_body_holds_db_lock():
    """The signal raises inside the with block; leaving it releases the lock, then the
    loop hands back (the old handler handed back from inside the lock and deadlocked)."""
    clock = FakeClock()
    worker = flat_worker(range(5), clock=clock)
    with pytest.raises(Preempted):
        for item in worker:
            clock.advance(0.05)
            if item == 1:
                with worker.db_lock:
                    os.kill(os.getpid(), signal.SIGTERM)
    assert not worker._db_lock.is_locked
    assert claims_of() == 0
    assert [states()[str(i)] for i in range(2)] == ["completed", "ready"]


def test_stop_signal_during_has_more_jobs_is_raised_when_it_returns():
    """Inside a laufband call the handler only records the signal (raising there could
    leave the lock half taken); the call raises it on its way out."""
    clock = FakeClock()
    worker = flat_worker(range(5), clock=clock)
    counts = worker._store.counts
    returned = []

    def counts_with_a_signal():
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the read
        result = counts()
        returned.append(True)
        return result

    with pytest.raises(Preempted):
        for item in worker:
            clock.advance(0.05)
            if item == 1:
                worker._store.counts = counts_with_a_signal
                worker.has_more_jobs  # noqa: B018
                raise AssertionError("has_more_jobs did not raise")  # pragma: no cover
    assert returned == [True]  # the read finished before the signal was acted on
    assert not worker._db_lock.is_locked
    assert claims_of() == 0
    assert [states()[str(i)] for i in range(2)] == ["completed", "ready"]


def _claimed_ahead() -> StepResult:
    return StepResult([Claim(1, "a", 1)], Counts({}))


def test_a_step_that_waited_long_for_the_lock_does_not_hand_back_at_once():
    """The hold limit counts from the start of the task, but a step that itself took
    longer (waiting for the lock) leaves the task a moment to end first."""
    clock = FakeClock()
    prefetch = Prefetch(clock, None)
    deadlines = []
    holding = threading.Event()
    task_ends_by = prefetch._task_ends_by

    def watched(ended, deadline):
        deadlines.append(deadline)
        holding.set()
        return task_ends_by(ended, deadline)

    prefetch._task_ends_by = watched

    def slow_step(finishes, cancel):
        clock.advance(0.3)  # past MAX_HOLD while waiting for the lock
        return _claimed_ahead()

    def give_back(result, cancel):
        raise AssertionError("handed back although the task had not overrun")

    assert prefetch.start(slow_step, [], give_back)
    assert holding.wait(10)
    assert deadlines[0] > clock.monotonic()  # the task gets a moment, from now
    assert prefetch.settle().result.claims == [Claim(1, "a", 1)]  # the task ended
    prefetch.shutdown()


def test_a_give_back_that_fails_keeps_the_claims():
    clock = FakeClock()
    prefetch = Prefetch(clock, None)
    tried = threading.Event()

    def give_back(result, cancel):
        tried.set()
        raise RuntimeError("give-back failed (injected)")

    assert prefetch.start(lambda finishes, cancel: _claimed_ahead(), [], give_back)
    run_on_until(clock, tried.is_set)
    settled = prefetch.settle()
    assert settled.error is None
    assert settled.result.claims == [Claim(1, "a", 1)]  # they run when the task ends
    prefetch.shutdown()


def fail_next_unlock(worker, errno_=5) -> list[str]:
    """The next release of the database lock file fails once (after its commit)."""
    file_lock = worker._db_lock.file_lock
    unlock = file_lock.unlock
    failed = []

    def broken(*args, **kwargs):
        if not failed:
            failed.append("unlock")
            raise OSError(errno_, "injected: cannot remove the lock file")
        return unlock(*args, **kwargs)

    file_lock.unlock = broken
    return failed


def test_a_lock_release_that_fails_after_a_commit_does_not_undo_the_step(caplog):
    """The transaction committed; the lock file could not be removed. The step's result
    stands (before, the error made it look unrecorded), and the next transaction takes
    the lock file that still names us."""
    worker = flat_worker(range(3), clock=FakeClock(), batch_size=1)
    failed = fail_next_unlock(worker)
    assert list(worker) == [0, 1, 2]
    assert failed == ["unlock"]
    assert "Cannot remove the lock file" in caplog.text
    assert set(states().values()) == {"completed"}
    assert rows("SELECT count(*) FROM events WHERE event IN ('fenced', 'failed')") == [(0,)]


def test_a_give_back_whose_lock_release_fails_is_still_a_give_back():
    """The give-back committed (the task claimed ahead is ready for others again), then
    the lock release failed: the worker must not run that task as its own."""
    clock = FakeClock()
    worker = flat_worker(range(4), clock=clock)
    for item in worker:
        if item == 0:
            clock.advance(0.05)
        elif item == 1:
            wait_for_claims(2)
            failed = fail_next_unlock(worker)
            run_on_until(clock, lambda: claims_of() == 1)
            assert failed == ["unlock"]
        else:
            clock.advance(1.0)
    assert history("2") == [
        ("claimed", "running", "w", 1),
        ("preempted", "ready", "w", 1),
        ("claimed", "running", "w", 2),
        ("completed", "completed", "w", 2),
    ]
    assert rows("SELECT count(*) FROM events WHERE event = 'fenced'") == [(0,)]


@pytest.mark.parametrize("tail", ["flat", "a task still pending"])
def test_no_step_ahead_once_nothing_is_ready_or_pending(tail):
    """At the tail of a run (nothing this worker may run is ready or pending) a step
    ahead would claim nothing: the loop's own step after the last task records it all,
    a transaction less per worker. While a task is pending (its dependencies run), the
    worker still steps ahead: their completion may make it ready."""
    from helpers import make

    from laufband import Task

    clock = FakeClock()
    tasks = [Task(f"t{i}") for i in range(4)]
    if tail != "flat":
        tasks.append(Task("z", dependencies={t.id for t in tasks}))
    worker = make(tasks, clock=clock)
    steps: list[tuple[bool, int]] = []  # (ahead, tasks ready or pending before it)
    left = [0]
    real = worker._store.step

    def step(me, finishes, want, cancel=None):
        steps.append((want.ahead, left[0]))
        result = real(me, finishes, want, cancel)
        left[0] = result.counts.n(["ready", "pending"])
        return result

    worker._store.step = step
    for _task in worker:
        clock.advance(0.05)  # a 50 ms task
    assert set(states().values()) == {"completed"}
    ahead = [before for is_ahead, before in steps if is_ahead]
    assert ahead and all(ahead), steps  # stepped ahead, never with nothing left
    if tail != "flat":
        assert (True, 1) in steps, steps  # running the last t: z pending
