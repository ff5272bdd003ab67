"""Stop signals in one process (real signals, sent to ourselves): the task is handed
back, the exit code is 128 + signal number, and the previous handlers come back."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from helpers import flat_worker, history, rows, states

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
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(30)  # a long task; the handler interrupts it
    assert isinstance(info.value, SystemExit)
    assert info.value.code == 128 + signal.SIGUSR1
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
