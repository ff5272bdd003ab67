"""The database lock: flufl.lock (NFS-safe hard-link protocol) with a fast backoff.

flufl.lock sleeps a random 10 ms - 2 s between tries (``Lock._sleep``), so under
contention every collision costs about a second (measured: 8 workers crawl). Our
subclass retries with full jitter capped at a few milliseconds instead. Transactions
under this lock last milliseconds, so a short cap costs a few extra file operations
and no throughput.
"""

from __future__ import annotations

import os
import random
import threading
import time
from datetime import datetime, timedelta

from flufl.lock import Lock, LockState, TimeOutError
from flufl.lock._lockfile import CLOCK_SLOP

from laufband.errors import DatabaseError, LockTimeoutError

#: Seconds a lock may be held before another worker may break it. Transactions last
#: milliseconds; long operations (registering a huge graph) refresh it as they go.
DEFAULT_LIFETIME = 10.0
#: Extra grace before breaking a lock whose holder looks gone. It must cover the clock
#: skew between the nodes sharing the file system (the lock file's mtime is written by
#: the holder's clock and read against the breaker's).
DEFAULT_SLOP = 5.0
#: How long one acquisition may take before we report a stuck lock.
DEFAULT_TIMEOUT = 600.0

_BACKOFF_BASE = 0.0005
_BACKOFF_CAP = 0.02


def _fast_sleep(lock: Lock) -> None:
    tries = getattr(lock, "_laufband_tries", 0)
    lock._laufband_tries = tries + 1
    time.sleep(random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**tries)))


class FastLock(Lock):
    """A flufl Lock with a bounded, jittered backoff and a configurable breaking slop."""

    def __init__(self, lockfile: str, lifetime: float = DEFAULT_LIFETIME,
                 slop: float = DEFAULT_SLOP) -> None:
        super().__init__(lockfile, lifetime=timedelta(seconds=lifetime))
        self._slop = timedelta(seconds=slop)

    def lock(self, timeout=None) -> None:
        self._laufband_tries = 0
        super().lock(timeout)

    def _sleep(self) -> None:
        _fast_sleep(self)

    @property
    def _releasetime(self) -> int | datetime:
        # flufl adds a fixed 10 s CLOCK_SLOP to the expiry; make it ours.
        release = super()._releasetime
        if release == -1:
            return release
        return release - CLOCK_SLOP + self._slop


def speed_up(lock: Lock) -> Lock:
    """Give a user-supplied flufl Lock our backoff (only its instance is changed)."""
    if not isinstance(lock, FastLock):
        lock._sleep = lambda: _fast_sleep(lock)  # type: ignore[method-assign]
        original = lock.lock

        def fast_lock(timeout=None):
            lock._laufband_tries = 0
            original(timeout)

        lock.lock = fast_lock  # type: ignore[method-assign]
    return lock


class DatabaseLock:
    """Serialises database writes across processes (file lock) and threads (RLock).

    Re-entrant within a thread: only the outermost ``with`` touches the file.
    """

    def __init__(self, lock: Lock, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.file_lock = lock
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._timeout = timeout

    def __enter__(self) -> DatabaseLock:
        self._thread_lock.acquire()
        if self._depth == 0:
            try:
                self._acquire_file()
            except BaseException:
                self._thread_lock.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0:
                self._release_file()
        finally:
            self._thread_lock.release()

    def _acquire_file(self) -> None:
        try:
            self.file_lock.lock(timeout=timedelta(seconds=self._timeout))
        except TimeOutError:
            raise LockTimeoutError(
                f"Could not acquire the database lock {self.file_lock.lockfile} within "
                f"{self._timeout:.0f} s. Another worker holds it; if no worker is running, "
                "delete the lock file."
            ) from None
        except PermissionError as exc:
            folder = os.path.dirname(os.path.abspath(self.file_lock.lockfile))
            raise DatabaseError(
                f"Cannot create the lock file {self.file_lock.lockfile}: the folder {folder} "
                "is not writable. laufband needs write access next to the database."
            ) from exc

    def _release_file(self) -> None:
        # unconditionally: if our lock was broken (we were paused past its lifetime) the
        # database's own fencing rejects our stale writes; releasing must not crash.
        self.file_lock.unlock(unconditionally=True)

    def refresh(self) -> None:
        """Extend the lifetime while we legitimately hold the lock (long operations)."""
        if self._depth and self.file_lock.state == LockState.ours:
            self.file_lock.refresh(unconditionally=True)
