"""The database lock: its file protocol (flufl's, in fewer round trips), its backoff,
and one lock per process and file."""

from __future__ import annotations

import builtins
import gc
import os
import time
from pathlib import Path

import pytest
from flufl.lock import AlreadyLockedError, Lock, NotLockedError, TimeOutError

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


# ------------------------------------------------------------- the file protocol
class _Calls:
    """Counts the file operations the lock makes (each is a round trip on NFS)."""

    def __init__(self, monkeypatch) -> None:
        self.seen: list[str] = []
        for name in ("link", "unlink", "utime", "stat"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(name, real))
        real_open = builtins.open
        monkeypatch.setattr(builtins, "open", self._wrap("open", real_open))

    def _wrap(self, name, real):
        def call(path, *args, **kwargs):
            if ".lock" in str(path):
                self.seen.append(name)
            return real(path, *args, **kwargs)
        return call

    def take(self) -> list[str]:
        seen, self.seen = self.seen, []
        return seen


def _claims(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if "|" in p.name]


def test_an_uncontended_hold_is_a_link_a_stat_and_an_unlink(tmp_path, monkeypatch):
    """flufl writes a claim file, touches it twice, and reads the lock file back before
    removing it (7 round trips on NFS); ours keeps its claim file and stamp, and checks
    with one stat that the lock file is still its own before it removes it."""
    lock = FastLock(str(tmp_path / "db.lock"))
    calls = _Calls(monkeypatch)
    lock.lock()
    assert "open" in calls.take()  # the claim file is written once
    assert os.path.samefile(tmp_path / "db.lock", lock.claimfile)  # flufl's protocol
    lock.unlock()
    assert calls.take()[-1:] == ["unlink"]
    assert not (tmp_path / "db.lock").exists() and len(_claims(tmp_path)) == 1
    calls.take()
    for _ in range(3):
        lock.lock()
        lock.unlock()
        assert calls.take() == ["link", "stat", "unlink"]


def test_the_stamp_is_renewed_before_it_runs_short(tmp_path):
    lock = FastLock(str(tmp_path / "db.lock"), lifetime=10)
    lock.lock()
    lock.unlock()
    stamp = os.stat(lock.claimfile).st_mtime
    lock._stamp = (time.time() + 8, time.monotonic() + 8)  # less than 90 % left
    lock.lock()
    assert os.stat(tmp_path / "db.lock").st_mtime >= stamp  # re-stamped: now + 10 s
    assert lock._stamp[0] > time.time() + 9.5
    lock.unlock()


def test_waiting_fails_with_one_link_per_try_and_breaks_an_expired_lock(tmp_path,
                                                                       monkeypatch):
    """Another process's lock (a stock flufl Lock: the protocols mix) whose stamp is
    past the slop is broken; until then a waiter only links, and looks (one stat) once
    in a while."""
    holder = Lock(str(tmp_path / "db.lock"), lifetime=10)
    holder.lock()
    waiter = FastLock(str(tmp_path / "db.lock"), lifetime=0.4)  # looks every 0.1 s
    waiter._laufband_cap = 0.01
    calls = _Calls(monkeypatch)
    with pytest.raises(TimeOutError):
        waiter.lock(timeout=0.35)
    seen = calls.take()
    assert seen.count("link") > 5 and seen.count("stat") <= 4 + 1  # + its claim file's
    # The holder died (nobody refreshes): its stamp is more than the slop (5 s) past.
    past = time.time() - 6
    os.utime(tmp_path / "db.lock", (past, past))
    waiter.lock(timeout=5)
    assert os.path.samefile(tmp_path / "db.lock", waiter.claimfile)
    assert not os.path.exists(holder.claimfile)  # the breaker removes the dead claim
    waiter.unlock()


def test_a_waiter_that_waited_out_a_dead_holder_links_a_fresh_stamp(tmp_path, monkeypatch):
    """A waiter stamps its claim file when it starts waiting; if it then waits out a
    dead holder's lifetime and slop, that stamp is past by the time it breaks the lock
    and links: its new lock would look expired to the next waiter, which would break it
    at once (two holders; the review's reproduction with processes). It stamps again
    before linking."""
    holder = FastLock(str(tmp_path / "db.lock"))
    holder.lock()
    waiter = FastLock(str(tmp_path / "db.lock"), lifetime=0.4)  # looks every 0.1 s

    def a_long_wait() -> None:  # as if 20 s went by: both stamps are long past
        past = time.time() - 20
        for path in (waiter.claimfile, tmp_path / "db.lock"):
            os.utime(path, (past, past))
        waiter._stamp = (past, time.monotonic() - 20)
        time.sleep(0.01)

    monkeypatch.setattr(waiter, "_sleep", a_long_wait)
    waiter.lock(timeout=5)  # breaks the dead holder's lock and takes it
    assert os.path.samefile(tmp_path / "db.lock", waiter.claimfile)
    assert os.stat(tmp_path / "db.lock").st_mtime > time.time(), "linked a stale stamp"
    waiter.unlock()


def test_a_hold_broken_while_paused_does_not_remove_the_new_holders_lock(tmp_path):
    """A holds; A is paused past its stamp + slop; B breaks the lock and takes it. A's
    release must leave B's lock alone, and A's next acquisition waits for B."""
    a = FastLock(str(tmp_path / "db.lock"))
    b = FastLock(str(tmp_path / "db.lock"))
    a.lock()
    a._ours_until = (time.time() - 1, time.monotonic() - 1)  # A's stamp has passed
    past = time.time() - 6
    os.utime(tmp_path / "db.lock", (past, past))
    b._laufband_cap = 0.001
    b.lock(timeout=5)  # breaks A's lock (and removes A's claim file)
    assert not os.path.exists(a.claimfile)
    a.unlock(unconditionally=True)
    assert os.path.samefile(tmp_path / "db.lock", b.claimfile), "A removed B's lock"
    with pytest.raises(NotLockedError):
        a.unlock()
    with pytest.raises(TimeOutError):
        a.lock(timeout=0.1)  # waits for B; its claim file is written again
    b.unlock()
    a.lock(timeout=5)
    assert os.path.samefile(tmp_path / "db.lock", a.claimfile)
    a.unlock()


def test_a_break_decided_on_a_stale_look_leaves_the_new_holders_lock(tmp_path):
    """B and A both saw a dead holder's lock expired; A broke it and took the lock
    before B got to break it. B's break must leave A's lock alone (flufl's would remove
    it: two holders), and A's release must not remove a lock that is not its own (else
    a third waiter gets in beside the second)."""
    lockfile = str(tmp_path / "db.lock")
    dead = Lock(lockfile, lifetime=10)
    dead.lock()
    past = time.time() - 6
    os.utime(lockfile, (past, past))
    a, b = FastLock(lockfile), FastLock(lockfile)
    seen_by_b = os.stat(lockfile)  # B's look: expired
    a._laufband_cap = 0.001
    a.lock(timeout=5)  # A breaks it and takes the lock
    assert os.path.samefile(lockfile, a.claimfile)
    b._claim()
    b._break_expired(seen_by_b)  # late: the lock file is A's by now
    assert os.path.samefile(lockfile, a.claimfile), "B broke A's live lock"
    assert os.path.exists(a.claimfile)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith("|breaking")] == []
    # Had it been taken from A anyway (by any path), A's release leaves the new lock.
    os.unlink(lockfile)
    os.link(b.claimfile, lockfile)
    a.unlock(unconditionally=True)
    assert os.path.samefile(lockfile, b.claimfile), "A removed B's lock"
    os.unlink(lockfile)


def test_a_refresh_renews_only_a_lock_that_is_still_ours(tmp_path):
    a = FastLock(str(tmp_path / "db.lock"))
    a.lock()
    a._ours_until = (0.0, 0.0)
    a.refresh()
    assert a._surely_ours()  # found ours: the release is one unlink again
    os.unlink(tmp_path / "db.lock")  # broken (by hand, here)
    b = FastLock(str(tmp_path / "db.lock"))
    b.lock()
    with pytest.raises(NotLockedError):
        a.refresh()
    assert not a._surely_ours()
    a.unlock(unconditionally=True)
    assert os.path.samefile(tmp_path / "db.lock", b.claimfile)
    b.unlock()


def test_a_lock_file_left_naming_us_is_taken_back(tmp_path):
    """A release that could not remove the lock file (an NFS error): the next
    acquisition finds it ours (flufl's AlreadyLockedError) and the DatabaseLock goes on."""
    file_lock = FastLock(str(tmp_path / "db.lock"), lifetime=0.4)
    file_lock.lock()
    file_lock._ours_until = (0.0, 0.0)  # as after a pause: no fast path
    with pytest.raises(AlreadyLockedError):
        file_lock.lock(timeout=5)
    lock = database_lock(file_lock)
    with lock:
        assert file_lock._surely_ours()
    assert not (tmp_path / "db.lock").exists()


def test_a_removed_claim_file_is_written_again(tmp_path):
    lock = FastLock(str(tmp_path / "db.lock"))
    lock.lock()
    lock.unlock()
    os.unlink(lock.claimfile)
    lock.lock(timeout=5)
    assert os.path.samefile(tmp_path / "db.lock", lock.claimfile)
    lock.unlock()


def test_the_claim_file_goes_with_the_lock(tmp_path):
    lock = FastLock(str(tmp_path / "db.lock"))
    lock.lock()
    lock.unlock()
    assert len(_claims(tmp_path)) == 1
    del lock
    gc.collect()
    assert _claims(tmp_path) == []
