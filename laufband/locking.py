"""The database lock: flufl.lock's NFS-safe hard-link protocol in fewer file-server
round trips, with a fast backoff, made re-entrant and shared by the threads of one
process.

On NFS every open, close, link, unlink and utime of the lock file is a round trip to
the server. flufl.lock spends 7 of them (plus 3 utimes and a stat) on an uncontended
acquire + release: it writes a new claim file each time, touches it twice, and reads
the lock file back before removing it; and each failed try of a waiting worker is a
link, two stats and an open/read/close. ``FastLock`` keeps the protocol (a lock file is a
hard link to the holder's claim file, whose content names it and whose mtime is its
expiry; a lock past its expiry plus a slop is broken), so it interoperates with stock
flufl locks on the same file, but:

- the claim file is written once per process and kept (removed at exit);
- its expiry is re-stamped only when less than ``_RESTAMP`` of the lifetime is left
  (the heartbeat thread refreshes it every third of the lifetime while we hold it);
- a failed try is one link; the lock file is looked at (one stat: is it ours after all?
  has it expired?) only every ``_LOOK_EVERY`` of waiting;
- the release is a stat (is the lock file still our claim file?) and an unlink while
  the stamp we wrote has not passed by our clocks: nobody may break a lock before its
  stamp plus the slop (which covers clock skew). Only a hold that outlived its stamp
  (the process was paused) checks first that the lock file still names us, as flufl
  does;
- an expired lock is broken by moving it aside and checking it is the one seen expired
  (``_break_expired``): flufl's break deletes whatever lock file is there by then,
  which may be the new lock of a waiter that broke it first.

So an uncontended acquire + release costs 3 round trips (link, stat, unlink) instead
of 7.
flufl.lock also sleeps a random 10 ms - 2 s between tries, so under contention every
collision costs about a second (SCALING_ANALYSIS.md, 'Measurements behind the code').
We retry with full jitter, up to ``_SPREAD`` times as long as this process's own
recent holds of the lock last: a short hold (a local disk) is retried often, a long one
(NFS, where every try is a round trip) less often (SCALING_ANALYSIS.md, 'NFS').

There is exactly one lock per worker process and database (``DatabaseLock``): the
loop, the heartbeat thread, the step thread and user code (``worker.db_lock``) all take
it, re-entrantly, in one order (the thread lock, then the file). A thread of ours that
waits for it can be cancelled (a heartbeat being stopped, a step ahead being settled by
a thread that holds the lock), so nobody ever waits for a thread that waits for a lock
the waiter holds.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta

from flufl.lock import AlreadyLockedError, Lock, LockState, NotLockedError, TimeOutError
from flufl.lock._lockfile import CLOCK_SLOP, ERRORS

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

#: Bounds of the backoff cap: the smoothed hold time times the spread (``DatabaseLock``).
BACKOFF_CAP_MIN, BACKOFF_CAP_MAX = 0.001, 0.75
_BACKOFF_CAP = 0.02  # until a hold was measured
#: Longest hold that counts at full length in the smoothed hold time.
_HOLD_MAX = 0.25
#: Backoff cap / hold time. Each failed try is a link (a round trip on NFS); W waiters
#: fail about 2 W / spread times per hold in all, and the lock waits about a
#: spread / (2 W) hold for the next try after a release. 3: with 8 workers about 6
#: failed tries per transaction (flufl: over 15, each 5 file operations), a few per
#: cent of throughput (SCALING_ANALYSIS.md, 'NFS').
_SPREAD = 3.0
#: A waiting FastLock looks at the lock file (is it ours, has it expired?) after this
#: share of the lifetime of waiting, and at least once a second.
_LOOK_EVERY = 0.25
#: Re-stamp our claim file's expiry before linking when less than this share of the
#: lifetime is left (the heartbeat refreshes it every third of it while we hold it).
_RESTAMP = 0.9


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
    # Full jitter, growing from an eighth of the cap: the first tries after a short
    # hold come soon. The exponent is capped: 2**tries overflows a float after ~1000
    # tries (about ten seconds of waiting, e.g. for a dead holder's lock to expire).
    tries = getattr(lock, "_laufband_tries", 0)
    lock._laufband_tries = tries + 1
    cap = getattr(lock, "_laufband_cap", _BACKOFF_CAP)
    time.sleep(random.uniform(0, min(cap, cap / 8 * 2 ** min(tries, 16))))


def _seconds(interval: timedelta | float | None) -> float | None:
    return interval.total_seconds() if isinstance(interval, timedelta) else interval


def _remove_claim(path: str, pid: int) -> None:
    """At exit (or when its lock is collected): remove our claim file, in the process
    that wrote it only (a forked child inherits the finaliser)."""
    if os.getpid() == pid:
        with contextlib.suppress(OSError):
            os.unlink(path)


class FastLock(Lock):
    """A flufl Lock with fewer file-server round trips (see the module doc), a bounded
    jittered backoff and a configurable breaking slop.

    Its lock and claim files are flufl's, so it excludes stock flufl Locks on the same
    file and they can break each other's expired locks. Differences a caller may see:
    the claim file stays while the process lives (flufl removes it at each unlock), and
    the expiry is stamped with sub-second precision."""

    def __init__(self, lockfile: str, lifetime: float = DEFAULT_LIFETIME) -> None:
        super().__init__(lockfile, lifetime=timedelta(seconds=lifetime))
        self._slop = timedelta(seconds=DEFAULT_SLOP)
        self._claim_pid = 0  # the process our claim file was written by (0: none yet)
        self._claim_id: tuple[int, int] | None = None  # its (st_dev, st_ino)
        # The expiry our claim file's mtime holds, by the wall clock and by ours.
        self._stamp = (0.0, 0.0)
        # Until when (wall, monotonic) the lock file is surely ours: set when our link
        # succeeded or a refresh found it ours, to the stamp it then carried.
        self._ours_until = (0.0, 0.0)

    def _sleep(self) -> None:
        _fast_sleep(self)

    @property
    def _releasetime(self) -> int | datetime:
        # flufl adds a fixed 10 s CLOCK_SLOP to the expiry; make it ours.
        release = super()._releasetime
        if release == -1:
            return release
        return release - CLOCK_SLOP + self._slop

    # ----------------------------------------------------------- the claim file
    def _claim(self) -> None:
        """Write our claim file, once per process (and again if it was removed: by a
        worker that broke our expired lock, or by hand)."""
        pid = os.getpid()
        if self._claim_pid != pid:
            self._set_claimfile()  # its name holds the pid: a forked child needs its own
            self._claim_id = None
        if self._claim_id is not None:
            return
        self._write()
        self._touch()
        st = os.stat(self._claimfile)
        self._claim_id = (st.st_dev, st.st_ino)
        if self._claim_pid != pid:
            self._claim_pid = pid
            weakref.finalize(self, _remove_claim, self._claimfile, pid)

    def _touch(self, filename: str | None = None) -> None:
        """Stamp an expiry of now + lifetime on our claim file (or ``filename``), as
        flufl does, but to the sub-second (flufl truncates to the second)."""
        life = self.lifetime.total_seconds()
        wall, mono = time.time() + life, time.monotonic() + life
        try:
            os.utime(filename or self._claimfile, (wall, wall))
        except OSError as error:
            if error.errno not in ERRORS:
                raise
            return
        if filename is None:
            self._stamp = (wall, mono)

    # --------------------------------------------------------- lock and unlock
    def lock(self, timeout: timedelta | float | None = None) -> None:
        """Acquire the lock (as flufl's ``Lock.lock``: ``TimeOutError`` after
        ``timeout``, ``AlreadyLockedError`` if the lock file already names us)."""
        limit = _seconds(self._default_timeout if timeout is None else timeout)
        started = time.monotonic()
        deadline = None if limit is None else started + limit
        life = self.lifetime.total_seconds()
        look_every = min(1.0, _LOOK_EVERY * life)
        next_look = started + look_every
        self._ours_until = (0.0, 0.0)
        self._laufband_tries = 0
        self._claim()
        while True:
            # Before every try, not once: a waiter that waited out a dead holder's
            # lifetime would otherwise link a stamp already past, and the next waiter
            # that looks would break its new lock at once (two holders).
            if self._stamp[0] - time.time() < _RESTAMP * life:
                self._touch()
            try:
                os.link(self._claimfile, self._lockfile)
            except FileExistsError:
                pass  # held; perhaps by us (a lost reply, a release that failed): look
            except OSError as error:
                if error.errno not in ERRORS:
                    raise
                # Our claim file is gone: write it again (a missing folder fails there).
                self._claim_id = None
                self._claim()
            else:
                self._ours_until = self._stamp
                return
            now = time.monotonic()
            if now >= next_look:
                next_look = now + look_every
                if self._look():
                    continue
            if deadline is not None and now > deadline:
                raise TimeOutError("Could not acquire the lock")
            self._sleep()

    def _look(self) -> bool:
        """One stat of the lock file: raise AlreadyLockedError if it is ours; break it
        if it expired. True if it is worth trying again at once."""
        try:
            st = os.stat(self._lockfile)
        except OSError as error:
            if error.errno not in ERRORS:
                raise
            return True  # released meanwhile
        if (st.st_dev, st.st_ino) == self._claim_id and self._read() == self._claimfile:
            raise AlreadyLockedError("We already had the lock")
        if time.time() > st.st_mtime + self._slop.total_seconds():
            log.warning("laufband: the lock %s expired %.0f s ago (its holder died or "
                        "hung): breaking it", self._lockfile, time.time() - st.st_mtime)
            self._break_expired(st)
            return True
        return False

    def _break_expired(self, seen: os.stat_result) -> None:
        """Break the lock file we saw expired (``seen``: its stat), never one that
        changed since: another waiter may have broken it and taken the lock in between
        (or its holder woke up and refreshed it), and deleting that would let two
        processes hold the lock. flufl's break reads and unlinks whatever lock file is
        there by then. So the lock file is moved aside (rename: atomic, also on NFS) and
        looked at there: the one we saw expired is removed with its holder's claim
        file; any other goes back at once."""
        aside = f"{self._claimfile}|breaking"
        try:
            os.rename(self._lockfile, aside)
        except OSError as error:
            if error.errno not in ERRORS:
                raise
            return  # gone: released, or broken by another waiter
        try:
            st = os.stat(aside)
            if (st.st_dev, st.st_ino, st.st_mtime) != (seen.st_dev, seen.st_ino,
                                                        seen.st_mtime):
                try:
                    os.link(aside, self._lockfile)  # a live lock: put it back
                except FileExistsError:
                    log.error("laufband: while breaking the expired lock %s another "
                              "worker's new lock was moved aside and could not be put "
                              "back: a third worker took the lock meanwhile",
                              self._lockfile)
                return
            with open(aside) as fp:
                winner = fp.read().strip()
            # Only a claim file of this lock (flufl names them "<lockfile>|host|pid|n").
            if winner.startswith(f"{self._lockfile}|"):
                with contextlib.suppress(OSError):
                    os.unlink(winner)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(aside)

    def _surely_ours(self) -> bool:
        wall, mono = self._ours_until
        return time.time() < wall and time.monotonic() < mono

    def unlock(self, *, unconditionally: bool = False) -> None:
        """Release the lock: a stat (is the lock file still our claim file?) and an
        unlink while the stamp of our hold has not passed; past it (we were paused:
        another worker may have broken the lock and taken it), only if the lock file
        also still names us. Keeps the claim file.

        The stat is a round trip on NFS, but without it a lock taken from us (a break
        that went wrong, see _break_expired, or a pause our clocks did not see) would
        be deleted under its new holder, and the next waiter would get in beside it."""
        ours = (self._same_file() if self._surely_ours()
                else self._is_locked_no_refresh())
        self._ours_until = (0.0, 0.0)
        if not ours:
            if not unconditionally:
                raise NotLockedError("Already unlocked")
            return
        try:
            os.unlink(self._lockfile)
        except OSError as error:
            if error.errno not in ERRORS:
                raise

    def _same_file(self) -> bool:
        """Is the lock file our claim file (one stat)?"""
        try:
            st = os.stat(self._lockfile)
        except OSError as error:
            if error.errno not in ERRORS:
                raise
            return False
        ours = (st.st_dev, st.st_ino) == self._claim_id
        if not ours:
            log.error("laufband: the lock %s was taken from us while we held it; "
                      "leaving it to its new holder", self._lockfile)
        return ours

    def refresh(self, lifetime: timedelta | float | None = None, *,
                unconditionally: bool = False) -> None:
        """Extend the lifetime if the lock is ours: stamp our claim file, then check
        that the lock file is still it (a stamp on a claim file that is no longer the
        lock file extends nothing)."""
        if lifetime is not None:
            self.lifetime = lifetime
        self._touch()
        if self._is_locked_no_refresh():
            self._ours_until = self._stamp
        else:
            self._ours_until = (0.0, 0.0)
            if not unconditionally:
                raise NotLockedError(f"{self!r}: {self._read()}")


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

    def transaction_turn(self, cancel: Callable[[], bool] | None = None,
                         shared: bool = False, notify: bool = True) -> str | None:
        """Take the lock for one write transaction (``acquire``). A lock that a
        transaction can take itself returns the statement that does so, to run first in
        it (store/advisory.py); None: held now. ``shared``: a step that a server lets run
        beside other such steps (a file lock has one mode: it is taken whole).
        ``notify``: the statement tells waiting workers of the commit (a server's;
        False: the transaction decides itself, ledger.py)."""
        self.acquire(cancel)
        return None

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
        seconds = min(seconds, _HOLD_MAX)
        hold = seconds if self._hold is None else 0.8 * self._hold + 0.2 * seconds
        self._hold = hold
        self.file_lock._laufband_cap = min(BACKOFF_CAP_MAX,
                                           max(BACKOFF_CAP_MIN, _SPREAD * hold))

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
        lock = self.file_lock
        try:
            if isinstance(lock, FastLock):
                lock.refresh(unconditionally=True)  # checks that it is ours after stamping
            elif lock.state in (LockState.ours, LockState.ours_expired):
                lock.refresh(unconditionally=True)
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
