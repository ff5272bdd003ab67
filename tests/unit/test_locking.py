"""The database lock's fast backoff."""

from __future__ import annotations

import time

from laufband.locking import FastLock, _fast_sleep


def test_backoff_survives_long_waits():
    """Thousands of tries (tens of seconds waiting for a dead holder's lock to expire)
    must neither overflow the exponential backoff nor make its sleeps long."""
    lock = FastLock("x.lock")
    lock._laufband_tries = 5000
    started = time.monotonic()
    for _ in range(10):
        _fast_sleep(lock)
    assert time.monotonic() - started < 1.0
