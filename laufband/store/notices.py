"""How a waiting worker learns, on PostgreSQL, that another worker committed: the
server's form of watching the SQLite file (``Database.change_mark``).

Write transactions notify the channel ``laufband``; the server delivers the notice to
the listeners of the same database when, and only if, the transaction commits. Most
do so in their first statement (the one that takes the writers' lock: advisory.py). A
worker's step, the transaction that runs thousands of times in a run, notifies only
if what it changed may let a waiting worker claim a task or leave
(``ledger.Ledger.wakes``), in the statement that writes its counts: at the end of a run,
when most workers wait and each step ends attempts while others still run, a notice at
every commit woke every waiting worker to read, 31 reads per commit with 32 workers,
on the cores the committing workers needed (SCALING_ANALYSIS.md). A worker
listens only while it waits, on a connection of its own (opened at its first wait, kept
for the next ones until its loop ends), and counts what arrived: a look is one
non-blocking check of that connection's socket, no round trip. The count is the change
mark, so waiting.py reads the counters only after a commit, as it does on SQLite,
instead of polling the server with a backoff (up to 250 ms late when the last task
ended).

Not listening between waits keeps the server from sending notices to every worker at
every commit, and their backlog from growing while a long task runs. Starting to listen
counts as a change (a commit meanwhile was not heard). A lost connection is opened
again at the next look; while that fails, there is no mark (None) and waiters poll.
Waiters read POLL_MAX after their last read even without a notice: a transaction of a
process that holds the session lock (``worker.db_lock``) notifies nobody.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import typing as t

from laufband.store.connection import server_connect

log = logging.getLogger(__name__)

CHANNEL = "laufband"
#: Part of the statement that takes the writers' lock (advisory.py).
NOTIFY = f"pg_notify('{CHANNEL}', '')"
SQL = {"listen": f"LISTEN {CHANNEL}", "unlisten": f"UNLISTEN {CHANNEL}"}


class Notices:
    """The commits this process heard of while it listened, by count."""

    def __init__(self, url: str) -> None:
        self._connect = server_connect(url)
        self._conn: t.Any = None
        self._listening = False
        self._heard = 0
        self._guard = threading.Lock()  # the loop's and the map's threads both look

    def mark(self) -> tuple[int] | None:
        """Listen (if not yet) and return a number that changes when a worker committed
        since the last look (None: the server cannot be listened to now)."""
        with self._guard:
            try:
                conn = self._listen()
                # timeout=0: what has arrived, without waiting (psycopg >= 3.2).
                self._heard += sum(1 for _ in conn.notifies(timeout=0))
            except Exception as exc:  # psycopg.Error: this module imports no driver
                log.debug("laufband: listening for commits: %s", exc)
                self._close()
                return None
            return (self._heard,)

    def stop(self) -> None:
        """Stop listening (the connection stays open for the next wait)."""
        with self._guard:
            if not self._listening:
                return
            self._listening = False
            try:
                self._conn.execute(SQL["unlisten"])
            except Exception:
                self._close()

    def _listen(self) -> t.Any:
        if self._conn is None or self._conn.closed:
            conn = self._connect()
            conn.autocommit = True
            # Which process a session is (pg_stat_activity), as connection.py does.
            conn.execute(f"SET application_name = 'laufband notices pid {os.getpid()}'")
            self._conn, self._listening = conn, False
        if not self._listening:
            self._conn.execute(SQL["listen"])
            self._listening = True
            self._heard += 1  # commits while nobody listened: a change
        return self._conn

    def close(self) -> None:
        """Close the connection (the next look opens a new one)."""
        with self._guard:
            self._close()

    def _close(self) -> None:
        conn, self._conn, self._listening = self._conn, None, False
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
