"""The database lock: flufl.lock (NFS-safe hard-link protocol) with a fast backoff,
made re-entrant and shared by the threads of one process.

flufl.lock sleeps a random 10 ms - 2 s between tries (``Lock._sleep``), so under
contention every collision costs about a second (8 workers crawl: see
SCALING_ANALYSIS.md, 'Measurements behind the code'). We retry with full jitter,
growing from half a millisecond up to about as long as this process's own recent holds
of the lock last: a short hold (a local disk) is retried often, a long one (NFS, where
every retry is a network round trip) less often.

There is exactly one lock per worker process and database (``DatabaseLock``): the
loop, the heartbeat thread, the step thread and user code (``worker.db_lock``) all take
it, re-entrantly, in one order (the thread lock, then the file). A thread of ours that
waits for it can be cancelled (a heartbeat being stopped, a step ahead being settled by
a thread that holds the lock), so nobody ever waits for a thread that waits for a lock
the waiter holds.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta

from flufl.lock import AlreadyLockedError, Lock, LockState, TimeOutError
from flufl.lock._lockfile import CLOCK_SLOP

from laufband.errors import DatabaseError, LockTimeoutError

log = logging.getLogger(__name__)

#: Seconds a lock may be held before another worker may break it. Transactions last
#: milliseconds; long operations (registering a huge graph) refresh it as they go.
DEFAULT_LIFETIME = 10.0
#: Extra grace before breaking a lock whose holder looks gone. It must cover the clock
#: skew between the nodes sharing the file system (the lock file's mtime is written by
#: the holder's clock and read against the breaker's).
DEFAULT_SLOP = 5.0
#: How long one acquisition may take before we report a stuck lock.
DEFAULT_TIMEOUT = 600.0
#: A thread of ours waiting for another of ours looks at its cancel flag this often.
_WAIT_SLICE = 0.05

_BACKOFF_BASE = 0.0005
#: Bounds of the backoff cap, which follows the smoothed hold time (``DatabaseLock``).
BACKOFF_CAP_MIN, BACKOFF_CAP_MAX = 0.001, 0.1
_BACKOFF_CAP = 0.02  # until a hold was measured


_local = threading.local()


def in_lock_code() -> bool:
    """Is the calling thread inside DatabaseLock's own bookkeeping? (A signal handler
    must not raise there: the lock would be left half taken.)"""
    return getattr(_local, "depth", 0) > 0


#: Called (on the releasing thread) after a thread let go of every database lock it
#: held: where a stop signal deferred by ``in_lock_code`` may be raised (session.py).
#: Weak references to bound methods: a collected owner's hook is dropped.
after_release: list[weakref.WeakMethod] = []


def _released_all() -> None:
    if getattr(_local, "held", 0):
        return
    for ref in list(after_release):
        hook = ref()
        if hook is None:
            after_release.remove(ref)
        else:
            hook()


class Cancelled(Exception):
    """A wait for the database lock was called off (see ``DatabaseLock.acquire``)."""


def _fast_sleep(lock: Lock) -> None:
    # The exponent is capped: 2**tries overflows a float after ~1000 tries (about ten
    # seconds of waiting, e.g. for a dead holder's lock to expire).
    tries = min(getattr(lock, "_laufband_tries", 0), 16)
    lock._laufband_tries = tries + 1
    cap = getattr(lock, "_laufband_cap", _BACKOFF_CAP)
    time.sleep(random.uniform(0, min(cap, _BACKOFF_BASE * 2**tries)))


class FastLock(Lock):
    """A flufl Lock with a bounded, jittered backoff and a configurable breaking slop."""

    def __init__(self, lockfile: str, lifetime: float = DEFAULT_LIFETIME) -> None:
        super().__init__(lockfile, lifetime=timedelta(seconds=lifetime))
        self._slop = timedelta(seconds=DEFAULT_SLOP)

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
    return lock


class DatabaseLock:
    """Serialises database writes across processes (the file lock) and threads.

    Re-entrant within a thread: only the outermost hold touches the file. This is also
    ``worker.db_lock``: user code may hold it in the loop body (and call
    ``worker.has_more_jobs`` inside), and the worker's own threads then wait for it.

    The file lock's lifetime is short, so that the lock of a killed holder is broken
    soon. While this process holds it, its lifetime is refreshed every
    ``refresh_interval`` (a third of it) by the heartbeat thread, or by a thread of ours
    waiting for it: a slow legitimate hold is never broken, and a dead or stopped
    (SIGSTOP) process, whose threads all stand still, refreshes nothing.
    """

    def __init__(self, lock: Lock) -> None:
        self.file_lock = lock
        self._turns = threading.RLock()
        self._depth = 0
        self._owner: int | None = None
        self.refresh_interval = max(0.1, lock.lifetime.total_seconds() / 3)
        self._acquired_at = 0.0
        self._hold: float | None = None

    @property
    def lockfile(self) -> str:
        return self.file_lock.lockfile

    @property
    def is_locked(self) -> bool:
        """Does this process hold the lock (any thread)?"""
        return self._depth > 0

    def held_here(self) -> bool:
        """Does the calling thread hold the lock?"""
        return self._owner == threading.get_ident()

    def acquire(self, cancel: Callable[[], bool] | None = None) -> None:
        """Take the lock; with ``cancel``, a wait for another thread of ours ends with
        ``Cancelled`` as soon as ``cancel()`` is true (checked every 50 ms)."""
        # Plain counting, not a context manager: this runs for every transaction.
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            self._acquire(cancel)
        finally:
            _local.depth -= 1

    def _acquire(self, cancel: Callable[[], bool] | None) -> None:
        if cancel is not None and cancel():
            raise Cancelled
        waited = time.monotonic()
        while not self._turns.acquire(timeout=_WAIT_SLICE):
            if cancel is not None and cancel():
                raise Cancelled
            if time.monotonic() - waited >= self.refresh_interval:
                self.refresh()  # another thread of ours holds it: keep it alive for it
                waited = time.monotonic()
        if cancel is not None and cancel():
            # Called off while we waited for the thread that called it off (it held the
            # lock): do not start a transaction for a worker that has moved on.
            self._turns.release()
            raise Cancelled
        if self._depth == 0:
            try:
                self._acquire_file()
            except BaseException:
                self._turns.release()
                raise
            self._acquired_at = time.monotonic()
            self._owner = threading.get_ident()
            _local.held = getattr(_local, "held", 0) + 1
        self._depth += 1

    def release(self) -> None:
        """Let go of one hold. Never raises: a lock file that cannot be removed is
        reported and expires after its lifetime (a transaction that committed must not
        look failed because of it)."""
        if not self.held_here():
            raise RuntimeError("laufband: the database lock was released by a thread that "
                               "does not hold it")
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            self._release()
        finally:
            _local.depth -= 1
        if after_release:
            _released_all()

    def _release(self) -> None:
        try:
            if self._depth == 1:
                self._observe_hold(time.monotonic() - self._acquired_at)
                self._release_file()
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                _local.held -= 1
            self._turns.release()

    def __enter__(self) -> DatabaseLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

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
        self.file_lock._laufband_tries = 0
        try:
            self.file_lock.lock(timeout=timedelta(seconds=DEFAULT_TIMEOUT))
        except AlreadyLockedError:
            # The lock file still names us: our last release could not remove it (see
            # release). No other thread of ours holds it (we hold _turns): it is ours.
            self.file_lock.refresh(unconditionally=True)
        except TimeOutError:
            raise LockTimeoutError(
                f"Could not acquire the database lock {self.lockfile} within "
                f"{DEFAULT_TIMEOUT:.0f} s. Another worker holds it; if no worker is running, "
                "delete the lock file."
            ) from None
        except OSError as exc:
            # Not writable (permissions, a read-only mount), disk or quota full, ...:
            # flufl writes a claim file next to the lock file before anything else.
            raise explain_os_error(exc, "create the lock file", self.lockfile) from None

    def _release_file(self) -> None:
        # unconditionally: if our lock was broken (we were paused past its lifetime) the
        # database's own fencing rejects our stale writes; releasing must not crash.
        try:
            self.file_lock.unlock(unconditionally=True)
        except OSError as exc:
            log.error("laufband: %s", explain_os_error(exc, "remove the lock file",
                                                       self.lockfile))

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


_LOCKS: weakref.WeakValueDictionary[tuple[int, str], DatabaseLock] = (
    weakref.WeakValueDictionary())
_LOCKS_GUARD = threading.Lock()


def database_lock(file_lock: Lock) -> DatabaseLock:
    """The one DatabaseLock of this process for ``file_lock``'s file (the first lock
    object given for a file is used). Two workers in one process then share it, so a
    thread that holds it for one worker re-enters it for the other instead of waiting
    for itself. Keyed by pid too: a forked child must not inherit a parent's lock."""
    key = (os.getpid(), os.path.abspath(file_lock.lockfile))
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = DatabaseLock(file_lock)
        return lock


def explain_os_error(exc: OSError, action: str, path: str) -> DatabaseError:
    """A DatabaseError that says why ``action`` on ``path`` failed and what to do."""
    folder = os.path.dirname(os.path.abspath(path))
    hint = {
        errno.ENOSPC: "the disk is full; free space and rerun",
        errno.EDQUOT: "the disk quota is exhausted; free space and rerun",
        errno.EROFS: f"{folder} is on a read-only file system",
        errno.EACCES: f"the folder {folder} is not writable for this user",
        errno.EPERM: f"the folder {folder} is not writable for this user",
    }.get(exc.errno or 0, "check the file system; on NFS, check the mount")
    return DatabaseError(
        f"Cannot {action} {path} ({exc.strerror or exc}): {hint}. "
        "Workers need write access and some free space next to the database.")
