"""The database lock: flufl.lock (NFS-safe hard-link protocol) with a fast backoff.

flufl.lock sleeps a random 10 ms - 2 s between tries (``Lock._sleep``), so under
contention every collision costs about a second (measured: 8 workers crawl). Our
subclass retries with full jitter, growing from half a millisecond up to about as long
as this process's own recent holds of the lock last: a lock held for 2 ms (a local
disk) is retried every millisecond or so, one held for 50 ms (NFS, where every retry
is a network round trip) every few tens of milliseconds. Sleeping much longer than a
hold leaves the lock idle between transactions; much shorter only adds file operations.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable
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
#: Bounds of the backoff cap, which follows the smoothed hold time (``DatabaseLock``).
BACKOFF_CAP_MIN, BACKOFF_CAP_MAX = 0.001, 0.1
_BACKOFF_CAP = 0.02  # until a hold was measured


def _fast_sleep(lock: Lock) -> None:
    # The exponent is capped: 2**tries overflows a float after ~1000 tries (about ten
    # seconds of waiting, e.g. for a dead holder's lock to expire).
    tries = min(getattr(lock, "_laufband_tries", 0), 16)
    lock._laufband_tries = tries + 1
    cap = getattr(lock, "_laufband_cap", _BACKOFF_CAP)
    time.sleep(random.uniform(0, min(cap, _BACKOFF_BASE * 2**tries)))


class _ThreadTurns:
    """Makes the threads of one process take turns on a flufl Lock: a flufl Lock is
    one claim per object, so a second thread's lock() would raise AlreadyLockedError
    instead of waiting. That matters for ``worker.db_lock``, which user code may hold
    in the loop body while the worker's own threads (heartbeat, step ahead) need it."""

    def __init__(self) -> None:
        self._rlock = threading.RLock()

    def lock(self, acquire: Callable[[], None]) -> None:
        self._rlock.acquire()
        try:
            acquire()
        except BaseException:
            self._rlock.release()
            raise

    def unlock(self, release: Callable[[], None]) -> None:
        try:
            release()
        finally:
            if self.owned_here():
                self._rlock.release()

    def owned_here(self) -> bool:
        return self._rlock._is_owned()  # type: ignore[attr-defined]


class FastLock(Lock):
    """A flufl Lock with a bounded, jittered backoff, a configurable breaking slop,
    and threads that take turns (``_ThreadTurns``)."""

    def __init__(self, lockfile: str, lifetime: float = DEFAULT_LIFETIME,
                 slop: float = DEFAULT_SLOP) -> None:
        super().__init__(lockfile, lifetime=timedelta(seconds=lifetime))
        self._slop = timedelta(seconds=slop)
        self.turns = _ThreadTurns()

    def lock(self, timeout=None) -> None:
        self._laufband_tries = 0
        self.turns.lock(lambda: super(FastLock, self).lock(timeout))

    def unlock(self, *, unconditionally: bool = False) -> None:
        self.turns.unlock(lambda: super(FastLock, self).unlock(unconditionally=unconditionally))

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
    """Give a user-supplied flufl Lock our backoff and thread turns (only its instance
    is changed)."""
    if not isinstance(lock, FastLock):
        lock._sleep = lambda: _fast_sleep(lock)  # type: ignore[method-assign]
        original_lock, original_unlock = lock.lock, lock.unlock
        lock.turns = _ThreadTurns()  # type: ignore[attr-defined]

        def fast_lock(timeout=None):
            lock._laufband_tries = 0
            lock.turns.lock(lambda: original_lock(timeout))

        def unlock(*, unconditionally: bool = False):
            lock.turns.unlock(lambda: original_unlock(unconditionally=unconditionally))

        lock.lock = fast_lock  # type: ignore[method-assign]
        lock.unlock = unlock  # type: ignore[method-assign]
    return lock


class DatabaseLock:
    """Serialises database writes across processes (file lock) and threads (RLock).

    Re-entrant within a thread: only the outermost ``with`` touches the file.

    The file lock's lifetime is short, so that the lock of a killed holder is broken
    soon. While this process is alive and holds it, the lifetime is refreshed every
    ``refresh_interval`` (a third of it) by the heartbeat thread, or by a thread of
    ours waiting for it: a slow legitimate transaction is never broken, and a dead or
    stopped (SIGSTOP) process, whose threads all stand still, refreshes nothing.
    """

    def __init__(self, lock: Lock, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.file_lock = lock
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._timeout = timeout
        self.refresh_interval = max(0.1, lock.lifetime.total_seconds() / 3)
        self._acquired_at = 0.0
        self._hold: float | None = None
        self._owner: int | None = None

    def held_here(self) -> bool:
        """Does the calling thread hold the lock (here, or as ``worker.db_lock``)?"""
        turns = getattr(self.file_lock, "turns", None)
        return self._owner == threading.get_ident() or (
            turns is not None and turns.owned_here())

    def __enter__(self) -> DatabaseLock:
        while not self._thread_lock.acquire(timeout=self.refresh_interval):
            self.refresh()  # another thread of ours holds it: keep it alive for it
        if self._depth == 0:
            try:
                self._acquire_file()
            except BaseException:
                self._thread_lock.release()
                raise
            self._acquired_at = time.monotonic()
            self._owner = threading.get_ident()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0:
                self._owner = None
                self._observe_hold(time.monotonic() - self._acquired_at)
                self._release_file()
        finally:
            self._thread_lock.release()

    def _observe_hold(self, seconds: float) -> None:
        """Retry the lock about as often as it changes hands (see the module doc). Our
        own holds stand in for everyone's: all workers run the same transactions."""
        # Clamped first: one long hold (registering a big graph) must not slow the
        # retries of the next few dozen short transactions.
        seconds = min(seconds, BACKOFF_CAP_MAX)
        hold = seconds if self._hold is None else 0.8 * self._hold + 0.2 * seconds
        self._hold = hold
        self.file_lock._laufband_cap = min(BACKOFF_CAP_MAX, max(BACKOFF_CAP_MIN, hold))

    def _acquire_file(self) -> None:
        try:
            self.file_lock.lock(timeout=timedelta(seconds=self._timeout))
        except TimeOutError:
            raise LockTimeoutError(
                f"Could not acquire the database lock {self.file_lock.lockfile} within "
                f"{self._timeout:.0f} s. Another worker holds it; if no worker is running, "
                "delete the lock file."
            ) from None
        except OSError as exc:
            # Not writable (permissions, a read-only mount), disk or quota full, ...:
            # flufl writes a claim file next to the lock file before anything else.
            raise self._explain(exc, "create the lock file") from None

    def _release_file(self) -> None:
        # unconditionally: if our lock was broken (we were paused past its lifetime) the
        # database's own fencing rejects our stale writes; releasing must not crash.
        try:
            self.file_lock.unlock(unconditionally=True)
        except OSError as exc:
            raise self._explain(exc, "release the lock file") from None

    def _explain(self, exc: OSError, action: str) -> DatabaseError:
        folder = os.path.dirname(os.path.abspath(self.file_lock.lockfile))
        hint = {
            errno.ENOSPC: "the disk is full; free space and rerun",
            errno.EDQUOT: "the disk quota is exhausted; free space and rerun",
            errno.EROFS: f"{folder} is on a read-only file system",
            errno.EACCES: f"the folder {folder} is not writable for this user",
            errno.EPERM: f"the folder {folder} is not writable for this user",
        }.get(exc.errno or 0, "check the file system; on NFS, check the mount")
        return DatabaseError(
            f"Cannot {action} {self.file_lock.lockfile} ({exc.strerror or exc}): {hint}. "
            "Workers need write access and some free space next to the database.")

    def refresh(self) -> None:
        """Extend the lifetime while we hold the lock (from any thread of ours).

        Only a lock file that still names us is touched: a lock another worker broke
        and took is not ours to extend. Errors are left to the next acquisition."""
        if not self._depth:
            return
        try:
            if self.file_lock.state in (LockState.ours, LockState.ours_expired):
                self.file_lock.refresh(unconditionally=True)
        except OSError:
            pass
