"""The database lock on PostgreSQL: a session advisory lock, not a file.

Workers on different nodes and in different folders share no lock file, so on
PostgreSQL the lock that serialises writers is ``pg_advisory_lock`` on a connection of
its own, held around each write transaction exactly as the file lock is on SQLite (and
as ``worker.db_lock``). Why serialise at all when PostgreSQL has row locks: every
transaction books state changes in the ``counts`` rows, sums held resources and
applies the waiting rules; they must see one order of the transactions before them,
which the lock gives for the price of two round trips on a local network.

A write transaction does not take it on that connection: it runs
``pg_advisory_xact_lock`` as its first statement (``transaction_turn``), and its commit
or rollback releases it, which saves the two round trips to the lock's connection per
transaction. Only holds outside a transaction (``worker.db_lock``, VACUUM) use the
session lock; the two kinds exclude each other on the server, and a transaction of a
thread that holds the session lock takes nothing more. Why the statement stands alone:
its snapshot (READ COMMITTED takes one per statement) would predate the lock. A step
whose attempts all completed takes it in shared mode (``pg_advisory_xact_lock_shared``):
such steps run side by side, and every other writer waits for them and they for it
(claiming.py). The exclusive statement also notifies the waiting workers
(notices.py), except in a worker's step, which notifies only when its changes concern
them (ledger.py).

How a holder that stops is noticed: a killed process closes its connection and the
server drops its lock at once. A process that hangs (SIGSTOP, a node that lost the
network) holds an idle lock connection: the server ends it after the lock's lifetime
(``idle_session_timeout``), which releases the lock. While this process holds the
lock legitimately for long (registering a huge graph), the heartbeat thread calls
``refresh`` every third of that, which keeps the connection from looking idle. The
hung holder's own transaction is ended by ``idle_in_transaction_session_timeout``
(connection.py) and rolled back; its later writes are fenced like any stale worker's.
A transaction that holds the lock by ``pg_advisory_xact_lock`` is ended the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import typing as t
import weakref

from laufband.errors import LockTimeoutError
from laufband.locking import DEFAULT_LIFETIME, DEFAULT_TIMEOUT, DatabaseLock
from laufband.store.connection import SERVER_HINTS, display_url, explain_text, server_connect
from laufband.store.notices import NOTIFY

log = logging.getLogger(__name__)

#: The advisory lock key (advisory locks are per database): "laufband" as an int64.
KEY = int.from_bytes(b"laufband", "big") & 0x7FFF_FFFF_FFFF_FFFF

SQL = {
    "lock": "SELECT pg_advisory_lock(%s)",
    "unlock": "SELECT pg_advisory_unlock(%s)",
    # The first statement of a write transaction (a constant: the driver prepares it),
    # which also tells the waiting workers of its commit (notices.py; a rollback tells
    # nobody) without a round trip of its own.
    "xact_lock": f"SELECT pg_advisory_xact_lock({KEY}), {NOTIFY}",
    # ... of a step: it notifies only if what it changed may concern a waiting worker
    # (ledger.py; most steps of a run end attempts and claim, which concerns none).
    "xact_lock_quiet": f"SELECT pg_advisory_xact_lock({KEY})",
    # ... of a step beside others (claiming.py): such steps run side by side, each
    # alone against every other writer. Like "xact_lock_quiet", it leaves notifying to
    # the step (ledger.py), which does so only when it concerns a waiting worker: a
    # notifying commit takes the server's one lock for notifying commits (through its
    # WAL flush), which puts side-by-side commits back in a row.
    "xact_lock_shared": f"SELECT pg_advisory_xact_lock_shared({KEY})",
}

_deferring = threading.local()  # transaction_turn: the server's lock is the transaction's


class AdvisoryLock(DatabaseLock):
    """``DatabaseLock`` whose cross-process part is ``pg_advisory_lock(KEY)``: the
    threads of this process still take turns on ``_turns`` first (re-entrant, with
    the same cancel rules); only the outermost hold talks to the server."""

    def __init__(self, url: str, lifetime: float = DEFAULT_LIFETIME) -> None:
        # Not DatabaseLock.__init__: there is no flufl Lock behind this one.
        self._connect = server_connect(url)
        self._shown = display_url(url)
        self._lifetime = lifetime
        self._conn: t.Any = None
        self._conn_guard = threading.Lock()  # the heartbeat refreshes from its thread
        self._turns = threading.RLock()
        self._depth = 0
        self._owner: int | None = None
        self.refresh_interval = max(0.1, lifetime / 3)
        self._acquired_at = 0.0
        self._hold: float | None = None
        self._in_xact = False  # the outermost hold is a transaction's own server lock

    @property
    def lockfile(self) -> str:
        """What the lock is, for messages (there is no file)."""
        return f"the advisory lock of {self._shown}"

    def _server(self) -> t.Any:
        """The lock connection, made anew if the server ended it (idle, restarted)."""
        if self._conn is None or self._conn.closed:
            conn = self._connect()
            conn.autocommit = True
            ms = int(self._lifetime * 1000)
            with conn.cursor() as cur:
                # Waiting longer than DEFAULT_TIMEOUT is a stuck lock (reported below);
                # idle longer than the lifetime while holding it is a hung holder.
                cur.execute(f"SET lock_timeout = {int(DEFAULT_TIMEOUT * 1000)}")
                cur.execute(f"SET idle_session_timeout = {ms}")
                cur.execute(f"SET application_name = 'laufband lock pid {os.getpid()}'")
            self._conn = conn
        return self._conn

    def transaction_turn(self, cancel: t.Callable[[], bool] | None = None,
                         shared: bool = False, notify: bool = True) -> str | None:
        """This process's turn for one write transaction, and the statement that takes
        the server's lock in it (None: this thread holds the session lock already).
        ``shared``: a claim (claiming.py: claims take the lock in shared mode), which
        notifies nobody; ``notify``: an exclusive turn notifies the waiting workers in
        the same statement (False: the transaction decides, ledger.py)."""
        _deferring.on = True
        try:
            self.acquire(cancel)
        finally:
            _deferring.on = False
        if not (self._in_xact and self._depth == 1):
            return None
        if shared:
            return SQL["xact_lock_shared"]
        return SQL["xact_lock" if notify else "xact_lock_quiet"]

    def _acquire_file(self) -> None:
        if getattr(_deferring, "on", False):
            self._in_xact = True  # taken by the transaction (transaction_turn)
            return
        with self._conn_guard:
            for tried in range(2):
                try:
                    self._server().execute(SQL["lock"], (KEY,))
                    return
                except Exception as exc:  # psycopg.Error: this module imports no driver
                    closed = self._conn is not None and self._conn.closed
                    if closed and tried == 0:
                        continue  # the server ended an idle connection: one new one
                    raise self._explain(exc) from None

    def _explain(self, exc: Exception) -> Exception:
        if type(exc).__name__ == "LockNotAvailable":
            return LockTimeoutError(
                f"Could not acquire {self.lockfile} within {DEFAULT_TIMEOUT:.0f} s: a "
                "worker holds it and does not let go. Find it with `laufband workers` or "
                "pg_locks (locktype 'advisory') and stop it.")
        return explain_text(str(exc), self._shown, SERVER_HINTS)

    def _release_file(self) -> None:
        # Never raises (see DatabaseLock.release): if the connection is gone, so is the
        # lock, which the server dropped with it.
        if self._in_xact:
            self._in_xact = False  # the transaction's commit or rollback released it
            return
        with self._conn_guard:
            try:
                self._conn.execute(SQL["unlock"], (KEY,))
            except Exception as exc:
                log.warning("laufband: releasing %s: %s (the server dropped it with the "
                            "connection)", self.lockfile, exc)
                self._close()

    def _observe_hold(self, seconds: float) -> None:
        """The server queues waiters: no backoff to tune."""

    def refresh(self) -> None:
        """Keep the lock connection from looking idle while a long hold lasts."""
        if not self._depth or self._in_xact:
            return  # not held, or held by a transaction (its own connection is busy)
        # Not blocking: the guard is held for the whole wait of an acquisition, and a
        # hold may have ended and another thread of ours begun waiting since we looked;
        # the heartbeat thread that calls this must not wait with it.
        if not self._conn_guard.acquire(blocking=False):
            return
        try:
            if self._conn is not None and not self._conn.closed:
                self._conn.execute("SELECT 1")
        except Exception:
            pass  # left to the next acquisition
        finally:
            self._conn_guard.release()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        """Close the lock connection (the lock is not held)."""
        with self._conn_guard:
            self._close()


_LOCKS: weakref.WeakValueDictionary[tuple[int, str], AdvisoryLock] = (
    weakref.WeakValueDictionary())
_LOCKS_GUARD = threading.Lock()


def advisory_lock(url: str, lifetime: float = DEFAULT_LIFETIME) -> AdvisoryLock:
    """The one AdvisoryLock of this process for the database at ``url``: two workers of
    one process must share it, or a thread holding it for one would wait on the server
    for itself through the other (see locking.database_lock)."""
    key = (os.getpid(), url)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = AdvisoryLock(url, lifetime)
        return lock
