"""The database lock: its fast backoff, and one lock per process and file."""

from __future__ import annotations

from laufband import locking
from laufband.locking import BACKOFF_CAP_MAX, FastLock, _fast_sleep, database_lock


def test_backoff_survives_long_waits(monkeypatch):
    """Thousands of tries (tens of seconds waiting for a dead holder's lock to expire)
    must neither overflow the exponential backoff nor make its sleeps long."""
    slept: list[float] = []
    monkeypatch.setattr(locking.time, "sleep", slept.append)
    lock = FastLock("x.lock")
    lock._laufband_tries = 5000
    for _ in range(100):
        _fast_sleep(lock)
    assert len(slept) == 100
    assert all(0 <= s <= BACKOFF_CAP_MAX for s in slept)


def test_one_database_lock_per_process_and_file():
    """Two workers of one process share the lock of a database, so a thread holding it
    for one re-enters it for the other instead of waiting for itself."""
    first = database_lock(FastLock("db.lock"))
    assert database_lock(FastLock("db.lock")) is first
    assert database_lock(FastLock("other.lock")) is not first
    with first, database_lock(FastLock("db.lock")):
        assert first.held_here() and first._depth == 2
    assert not first.is_locked
