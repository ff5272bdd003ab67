"""The connection: URLs and paths, the engine, transactions under the database lock, and
the translation of driver errors into laufband's own.
"""

from __future__ import annotations

import logging
import os
import re
import select
import sqlite3
import threading
import time
import typing as t
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from laufband.errors import ConfigError, DatabaseError
from laufband.locking import DEFAULT_TIMEOUT, DatabaseLock
from laufband.store.sqlite_lock import (
    counted_connection,
    foreign_hold,
    is_wal_file,
    laufband_open,
    one_protocol,
    sqlite_locking,
    sqlite_uri,
)

log = logging.getLogger(__name__)

if t.TYPE_CHECKING:
    from laufband.store.notices import Notices

#: How long SQLite waits for its own file lock. Our file lock serialises workers, so
#: SQLite's lock is only ever contended by a holder whose file lock was broken while it
#: lived on (paused inside a transaction), by a read-only monitor, or by another program.
BUSY_TIMEOUT_MS = 60_000
#: PostgreSQL: a worker's transaction idle for this long (the worker hangs) is ended by
#: the server. Until then other workers wait for its row locks (SQLite: until it wakes).
HUNG_TRANSACTION_S = 60


def database_url(value: str, name: str = "db") -> str:
    """A database URL from a URL or a plain path (``runs/wf.sqlite`` is a SQLite file)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a database URL or a file path, got {value!r}.")
    # A path becomes a URL with its characters escaped: pasted into one, "run?1.sqlite"
    # was the file "run" (the rest a query) and "50%25.sqlite" the file "50%.sqlite".
    url = value if "://" in value else sa.engine.URL.create(
        "sqlite", database=value).render_as_string(hide_password=False)
    try:
        parsed = sa.engine.make_url(url)
        parsed.get_dialect()
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ValueError) as exc:
        raise ConfigError(
            f"{name}={display_url(value)!r} is neither a file path nor a database URL "
            f"SQLAlchemy understands ({exc}). Use a path such as runs/wf.sqlite, or a URL "
            "such as sqlite:///runs/wf.sqlite."
        ) from None
    if parsed.get_backend_name() != "sqlite":
        try:  # a missing driver otherwise surfaces deep inside the first connection
            parsed.get_dialect().import_dbapi()
        except ImportError as exc:
            raise ConfigError(
                f"{name}={display_url(value)!r} needs the database driver "
                f"{parsed.get_driver_name()!r}, which is not installed ({exc}). For "
                "PostgreSQL install psycopg 3 (pip install 'laufband[postgres]') and use "
                "a postgresql+psycopg:// URL."
            ) from None
    return url


def absolute_url(url: str) -> str:
    """A SQLite URL with a relative path made absolute (now: a worker whose loop body
    changes the current folder, or a worker going offline later, must keep using the
    same file)."""
    parsed = sa.engine.make_url(url)
    db = parsed.database
    if (parsed.get_backend_name() != "sqlite" or not db or db == ":memory:"
            or db.startswith("file:") or os.path.isabs(db)):
        return url
    return parsed.set(database=os.path.abspath(db)).render_as_string(hide_password=False)


#: Query parameters of a URL that carry a secret (libpq's and psycopg's names).
SECRET_PARAMETERS = ("password", "sslpassword", "passfile")
_USERINFO = re.compile(r"((?://|^)[^/:@]*:)[^/@]*@")
_SECRET_QUERY = re.compile(rf"(?i)\b({'|'.join(SECRET_PARAMETERS)})=[^&]*")


def display_url(url: str) -> str:
    """The URL with its password masked, for messages and logs: the one after the user
    name and any in the query (``?password=...``); a string that does not parse as a
    URL is masked the same way, by pattern."""
    try:
        shown = sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: mask by pattern
        shown = _USERINFO.sub(r"\1***@", url)
    return _SECRET_QUERY.sub(r"\1=***", shown)


def has_secret(url: str) -> bool:
    """Does ``url`` hold a password (after the user name or in its query)?"""
    try:
        if sa.engine.make_url(url).password is not None:
            return True
    except Exception:
        if _USERINFO.search(url):
            return True
    return bool(_SECRET_QUERY.search(url))


def sqlite_path(url: str) -> str | None:
    """The file behind a sqlite URL, or None for other databases and :memory:."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.database.startswith("file:") and parsed.query.get("uri") == "true":
        # A URI filename, e.g. sqlite:///file:x.sqlite?mode=ro&uri=true
        return urllib.parse.urlparse(parsed.database).path or None
    return parsed.database


#: libpq settings of every connection to a server, unless the URL sets them: a server
#: or network that is gone must end in an error, not in a call that blocks for the
#: operating system's two hours of TCP keepalive (a worker waiting for the writers'
#: lock would hang its heartbeat with it). A lost server is noticed after about 60 s.
NETWORK_TIMEOUTS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30,
                    "keepalives_interval": 10, "keepalives_count": 3,
                    "tcp_user_timeout": 60_000}


def network_timeouts(url: str) -> dict[str, int]:
    """NETWORK_TIMEOUTS less what ``url``'s query sets itself."""
    given = sa.engine.make_url(url).query
    return {k: v for k, v in NETWORK_TIMEOUTS.items() if k not in given}


def server_connect(url: str) -> Callable[[], t.Any]:
    """A function that opens a new DBAPI connection to the server at ``url``, outside
    any pool (the advisory lock's own connection). Without a password in the URL, the
    driver (libpq) takes it from PGPASSWORD or ~/.pgpass."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    kwargs = {**network_timeouts(url), **kwargs}
    return lambda: engine.dialect.connect(*args, **kwargs)


def _alive(dbapi_conn: t.Any) -> bool:
    return not (dbapi_conn.closed or dbapi_conn.broken)


def _readable(dbapi_conn: t.Any) -> bool:
    """Has an idle connection something to read (a message of the server, or EOF)?"""
    fd = dbapi_conn.fileno()
    if not hasattr(select, "poll"):  # Windows (select() takes no descriptor >= 1024)
        return bool(select.select([fd], [], [], 0)[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def read_only_reason(path: str) -> str:
    """Why ``path`` cannot be written, for error messages."""
    try:
        if os.statvfs(path or ".").f_flag & os.ST_RDONLY:
            return "is on a read-only file system"
    except OSError:
        pass
    return "is read-only for this worker (file permissions, or mode=ro in the URL)"


_here = threading.local()


class _GoneBeforeStart(Exception):
    """The first statement of a transaction found its connection gone (Database._begin)."""


#: PostgreSQL's error code for a transaction it rolled back to break a deadlock.
DEADLOCK = "40P01"


class Conflict(DatabaseError):
    """The server rolled this transaction back to break a deadlock with another
    (steps beside each other can meet one in rare graphs: Store.step runs it again
    alone)."""


class Database:
    """An engine plus the lock that serialises its writers (None: a read-only user that
    cannot create the lock file reads under SQLite's own locks only)."""

    def __init__(self, url: str, lock: DatabaseLock | None, journal_mode: str = "delete",
                 read_only: bool = False) -> None:
        url = absolute_url(url)
        self.url = url
        self.lock = lock
        self.path = sqlite_path(url)
        self.sqlite = sa.engine.make_url(url).get_backend_name() == "sqlite"
        self.shown = self.path or display_url(url)  # for messages: a path, or no password
        self.opened = False  # the schema was read or made once (the file exists)
        # The files a commit writes: the database (rollback journal) or its -wal file.
        self._files = (self.path, f"{self.path}-wal") if self.path else ()
        self._notices: Notices | None = None  # a server's change mark, at first use
        # SQLite's own lock: "exclusive" or "normal" (SQLITE_LOCKING); None on a server.
        self.locking = self._choose_locking(journal_mode) if self.path is not None else None
        self._foreign_said, self._next_foreign_look = False, 0.0  # _check_no_foreign_hold
        if read_only:
            self._check_readable()
        else:
            self._check_writable()
        self.engine = self._make_engine(journal_mode, read_only)

    def _choose_locking(self, journal_mode: str) -> str:
        path = self.path
        assert path is not None

        def first(wanted: str) -> str:  # the first Database of this file in the process
            if wanted == "exclusive" and ("vfs" in sqlite_uri(self.url)[1]
                                          or is_wal_file(path)):
                return "normal"  # the URL's own VFS; a WAL file keeps WAL's protocol
            return wanted

        chosen = one_protocol(path, sqlite_locking(path, journal_mode), first)
        if chosen == "exclusive" and journal_mode == "wal":
            raise ConfigError(
                f"journal_mode='wal' cannot be used for {path}: this process already uses "
                "it with SQLite's lock taken whole (LAUFBAND_SQLITE_LOCKING=exclusive, the "
                "default on a network file system, where WAL is unsafe). Use "
                "journal_mode='delete'.")
        return chosen

    # ---------------------------------------------------------------- checks
    def _check_readable(self) -> None:
        if self.path is not None and not os.path.exists(self.path):
            raise DatabaseError(
                f"No database at {self.path}: no worker has run with it yet. Check the "
                "path, or the folder you are in.")

    def _check_writable(self) -> None:
        path = self.path
        if path is None:
            return
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise DatabaseError(
                f"The folder {folder} of the database {path} does not exist. "
                f"Create it (mkdir -p {folder}) or point db= at an existing folder."
            )
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise DatabaseError(
                f"The database {path} {read_only_reason(path)}. Workers must write to it: "
                "fix that, or use a copy. (Read-only access is enough for `laufband "
                "status` and Monitor.)"
            )
        if not os.access(folder, os.W_OK):
            raise DatabaseError(
                f"The folder {folder} of the database {path} {read_only_reason(folder)}. "
                "Workers create their lock file and SQLite its journal next to the "
                "database: make the folder writable or point db= elsewhere."
            )

    def _make_engine(self, journal_mode: str, read_only: bool) -> Engine:
        url = self.url
        if read_only and self.path is not None:
            url = f"sqlite:///file:{urllib.parse.quote(os.path.abspath(self.path))}" \
                  "?mode=ro&uri=true"
        if not self.sqlite:
            return self._make_server_engine(url, read_only)
        query_only = False
        if self.locking == "exclusive":
            engine, query_only = self._exclusive_engine(read_only)
        else:
            engine = sa.create_engine(url)

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # pragma: no branch
            # We issue BEGIN ourselves: pysqlite's implicit transactions start too late
            # to take the write lock up front (see SQLAlchemy's pysqlite notes).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if query_only:
                cur.execute("PRAGMA query_only = 1")
            elif not read_only:
                cur.execute(f"PRAGMA journal_mode = {journal_mode}")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn):
            conn.exec_driver_sql(conn.get_execution_options().get("laufband_begin",
                                                                  "BEGIN IMMEDIATE"))

        return engine

    def _exclusive_engine(self, read_only: bool) -> tuple[Engine, bool]:
        """Connections through SQLite's ``unix-excl`` VFS, one per transaction or read
        (SQLITE_LOCKING), and whether they must be made read-only by a pragma.

        Its lock is the process's: SQLite keeps it until the last connection of this
        process to the file closes, and a connection with SQLite's usual protocol in
        the same process would let it go under the others (an unlock by one releases
        the process's lock). So no connection stays open in a pool, and a reader here
        (Monitor, status) opens the file as the writers do where it may write to it,
        read-only by ``PRAGMA query_only``; one that may not runs in another process
        (it cannot be a worker), where the two protocols exclude each other."""
        assert self.path is not None
        uri, given = sqlite_uri(self.url)  # with the URL's own settings (mode=ro...)
        sep = "&" if "?" in uri else "?"
        if read_only and not os.access(self.path, os.W_OK):
            # It may not take a writer's lock: SQLite's usual protocol, read-only, in a
            # process that cannot be a worker's.
            if "mode" not in given:
                uri, given = f"{uri}{sep}mode=ro", {**given, "mode": ["ro"]}
            query_only = False
        else:
            if read_only and given.get("mode") == ["ro"]:
                # One protocol in this process even where the URL says mode=ro: the
                # reader opens the file as the writers do, read-only by query_only.
                uri = re.sub(r"([?&])mode=ro(?=&|$)", r"\1mode=rw", uri)
            uri, query_only = f"{uri}{sep}vfs=unix-excl", read_only
            sep = "&"

        def connect() -> sqlite3.Connection:
            # mode=rw once the file was opened, and for readers: a file deleted under
            # the workers is reported (explain), not made again empty at the next step.
            mode = "rw" if read_only or self.opened else "rwc"
            return sqlite3.connect(uri if "mode" in given else f"{uri}{sep}mode={mode}",
                                   uri=True, check_same_thread=False, factory=counted)

        counted = counted_connection(self.path)

        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool, creator=connect)
        return engine, query_only

    def _make_server_engine(self, url: str, read_only: bool) -> Engine:
        """PostgreSQL (a server): writers are serialised by the advisory lock
        (advisory.py), readers see one snapshot (REPEATABLE READ) and take no lock."""
        engine = sa.create_engine(url, connect_args=network_timeouts(url))

        @sa.event.listens_for(engine, "checkout")
        def _on_checkout(dbapi_conn, _record, _proxy):  # pragma: no branch
            # What pool_pre_ping does, without its round trip at every checkout (one in
            # every step and read): a server that ended an idle connection (a restart,
            # idle_session_timeout, pg_terminate_backend) said so on it, or closed it,
            # so only a connection with something to read is pinged. A ping that fails
            # makes the pool open a new connection.
            if not _alive(dbapi_conn):
                raise sa_exc.DisconnectionError("the server ended the connection")
            if _readable(dbapi_conn):
                try:
                    engine.dialect.do_ping(dbapi_conn)
                except Exception as exc:  # psycopg.OperationalError, or its closed state
                    raise sa_exc.DisconnectionError(str(exc)) from exc

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # pragma: no branch
            with dbapi_conn.cursor() as cur:
                # A worker that hangs inside a transaction (SIGSTOP, a lost node) would
                # hold its row locks for ever: the server ends it, and rolls it back,
                # after HUNG_TRANSACTION_S (a legitimate transaction never idles so long
                # between its statements).
                cur.execute("SET idle_in_transaction_session_timeout = "
                            f"{HUNG_TRANSACTION_S * 1000}")
                # A write transaction waits this long for the writers' lock
                # (advisory.py), as the lock's own connection does; then it is stuck.
                cur.execute(f"SET lock_timeout = {int(DEFAULT_TIMEOUT * 1000)}")
                # Which process a session is (pg_stat_activity), for operators and tests.
                cur.execute(f"SET application_name = 'laufband pid {os.getpid()}'")
            dbapi_conn.commit()

        if read_only:
            return engine.execution_options(postgresql_readonly=True)
        return engine

    # ---------------------------------------------------------- transactions
    @contextmanager
    def transaction(self, cancel: Callable[[], bool] | None = None, shared: bool = False,
                    notify: bool = True) -> Iterator[Connection]:
        """A write transaction under the database lock. If it raises, nothing was
        committed (the lock's release cannot fail after a commit: see locking.py).
        ``shared``: a step that on a server runs beside other such steps (claiming.py).
        ``notify``: on a server, tell the waiting workers of the commit (False: the
        transaction decides itself whether to, ledger.py)."""
        lock = self.lock
        # On a server, the lock may be the transaction's own first statement.
        take = lock.transaction_turn(cancel, shared, notify) if lock is not None else None
        _here.depth = getattr(_here, "depth", 0) + 1
        try:
            with self.translate_errors(), self._begin(take) as conn:
                yield conn
        finally:
            _here.depth -= 1
            try:
                if self.locking == "exclusive" and _here.depth == 0:
                    self._check_no_foreign_hold()
            finally:
                if lock is not None:
                    lock.release()

    def _check_no_foreign_hold(self) -> None:
        """In exclusive locking, with our connection closed and the database lock still
        ours (no other transaction of this process open): is SQLite's lock still held
        by this process? Then a connection not of laufband's (a user's sqlite3
        connection) keeps it, and the other workers wait for ever. Said once; looked at
        at most once a second (/proc/locks)."""
        now = time.monotonic()
        assert self.path is not None
        if (self._foreign_said or now < self._next_foreign_look
                or laufband_open(self.path)):  # (another thread's: a Monitor's...)
            return
        self._next_foreign_look = now + 1.0
        if foreign_hold(self.path):
            self._foreign_said = True
            log.warning(
                "laufband: another connection to %s is open in this process (one not "
                "of laufband's: your code's or a library's sqlite3 connection). With "
                "SQLite's lock taken whole (LAUFBAND_SQLITE_LOCKING=exclusive, the "
                "default on a network file system) it keeps that lock while it is "
                "open, so the other workers cannot read or write. Close it after use "
                "and read the workflow through laufband.Monitor, or set "
                "LAUFBAND_SQLITE_LOCKING=normal for these workers.", self.path)

    @contextmanager
    def _begin(self, take: str | None) -> Iterator[Connection]:
        """``engine.begin()`` and, on a server, the statement that takes the lock
        (``take``), on a new connection once more if that first statement finds its
        connection gone: the server ended it (a restart, ``pg_terminate_backend``)
        just before, too recently for the checkout to tell (``_on_checkout``), and
        nothing of the transaction ran yet."""
        for last in (take is None, True):
            try:
                with self.engine.begin() as conn:
                    if take is not None:
                        try:
                            conn.exec_driver_sql(take)
                        except sa_exc.DBAPIError as exc:
                            if last or not exc.connection_invalidated:
                                raise
                            raise _GoneBeforeStart from exc
                    yield conn
                return
            except _GoneBeforeStart:
                continue

    def refresh_statistics(self) -> None:
        """On a server: the planner's statistics of the tables a registration filled.
        Without them (the server's own ANALYZE comes a minute or more later) it planned
        the step's updates by primary key as scans of all tasks. A statement of its
        own after the commit: it blocks no reader or writer. Best effort: a table
        another session holds (a VACUUM, an index being built) is skipped, not waited
        for; that, a role that does not own the tables (both warnings of the server)
        and an error are logged, not raised (the registration committed; the server's
        autovacuum analyzes the tables later anyway)."""
        if self.sqlite:
            return
        skipped: list[str] = []  # the server's warnings (a skipped table, no owner)

        def notice(diag: t.Any) -> None:  # the diagnostic is valid during the call only
            skipped.append(diag.message_primary)

        try:
            with self.translate_errors(), self.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                driver = conn.connection.driver_connection
                driver.add_notice_handler(notice)
                try:
                    conn.exec_driver_sql("ANALYZE (SKIP_LOCKED) tasks, edges, attempts")
                finally:
                    driver.remove_notice_handler(notice)
        except DatabaseError as err:
            log.warning("laufband: could not update the server's statistics of the "
                        "workflow's tables (the first steps may be slower): %s", err)
        for message in skipped:
            log.warning("laufband: updating the server's statistics of the workflow's "
                        "tables: %s (the first steps may be slower until the server's "
                        "autovacuum analyzes them)", message)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only snapshot; callers keep it to a statement or two. On SQLite under
        the database lock (consistent reads on NFS); a server's snapshot needs none."""
        with (self._locked(None) if self.sqlite else nullcontext(), self._inside(),
              self.translate_errors(), self.engine.connect() as conn):
            if self.sqlite:
                conn.execution_options(laufband_begin="BEGIN")
            else:
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @contextmanager
    def _inside(self) -> Iterator[None]:
        _here.depth = getattr(_here, "depth", 0) + 1
        try:
            yield
        finally:
            _here.depth -= 1

    @staticmethod
    def in_transaction_here() -> bool:
        """Is this thread inside a transaction or read of any laufband database?"""
        return getattr(_here, "depth", 0) > 0

    @contextmanager
    def _locked(self, cancel: Callable[[], bool] | None) -> Iterator[None]:
        if self.lock is None:
            yield
            return
        self.lock.acquire(cancel)
        try:
            yield
        finally:
            self.lock.release()

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        try:
            yield
        except (sa_exc.DBAPIError, sqlite3.Error, *_server_errors(self.engine)) as exc:
            # The driver's own errors: the hot path runs on the raw driver connection
            # (ledger.py).
            # "from None": the user gets our explanation, which quotes the driver's
            # message, instead of a traceback through SQLAlchemy (the original stays
            # reachable as __context__ for debugging).
            raise self.explain(exc) from None

    def explain(self, exc: Exception) -> DatabaseError:
        orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
        text = str(orig)
        if getattr(orig, "sqlstate", None) == DEADLOCK:
            return Conflict(f"{text} (on {self.shown}; the transaction was rolled back)")
        path = self.path
        where = path or self.shown
        if path is not None and not self.opened and not os.path.exists(path):
            return DatabaseError(
                f"The database {where} does not exist and cannot be created (a read-only "
                f"URL, mode=ro, opens existing files only). Check the path. ({text})")
        if path is not None and (getattr(orig, "sqlite_errorname", "") == "SQLITE_READONLY_DBMOVED"
                                 or not os.path.exists(path)):
            # SQLite refuses to write to a file that was unlinked or renamed under it
            # (it reports "readonly database", which would send users to chmod).
            return DatabaseError(
                f"The database {where} was deleted or moved away while this worker was "
                "using it. Stop all workers; restore the file, or move it aside and start "
                f"again (its finished tasks will run again). ({text})")
        return explain_text(text, where, _hints(path) if self.sqlite else SERVER_HINTS)

    def vacuum(self) -> None:
        """Rebuild the file without its free pages, under the database lock (VACUUM
        cannot run inside a transaction)."""
        with self._locked(None), self.translate_errors():
            raw = self.engine.raw_connection()  # no BEGIN of ours (see _make_engine)
            try:
                if not self.sqlite:
                    raw.driver_connection.autocommit = True  # VACUUM needs it there too
                raw.driver_connection.execute("VACUUM")
            finally:
                if not self.sqlite:
                    # Not back into the pool in autocommit: the next transaction on it
                    # would commit statement by statement, and a rollback undo nothing.
                    raw.invalidate()
                raw.close()

    # --------------------------------------------------------------- watching
    def stop_listening(self, close: bool = False) -> None:
        """Stop listening for commits (notices.py), if this worker listens; ``close``:
        close the connection too (the end of a loop), else keep it for the next wait."""
        if self._notices is not None:
            if close:
                self._notices.close()
            else:
                self._notices.stop()

    def change_mark(self, listen: bool = False) -> tuple[int, ...] | None:
        """A cheap fingerprint of the database files (size, mtime), taken without any
        lock: when it changes, somebody committed. A hint for waiting workers only: a
        commit within the file system's timestamp granularity, or hidden by NFS
        attribute caching, may not show. On a server, with ``listen`` (a waiting
        worker): the commits heard of (notices.py); without, it stops listening. None
        where it cannot tell (:memory:, a server without ``listen`` or not reachable)."""
        if not self.sqlite:
            if not listen:
                self.stop_listening()  # not waiting (any more)
                return None
            if self._notices is None:
                from laufband.store.notices import Notices  # it needs this module

                self._notices = Notices(self.url)
            return self._notices.mark()
        if not self._files:
            return None
        mark: list[int] = []
        for path in self._files:
            try:
                st = os.stat(path)
            except OSError:
                mark += (-1, -1)
            else:
                mark += (st.st_size, st.st_mtime_ns)
        return tuple(mark)


def _server_errors(engine: Engine) -> tuple[type[Exception], ...]:
    """The errors of a server's driver (psycopg.Error), which the Ledger's statements
    raise as they are; none for SQLite (sqlite3.Error is named where caught)."""
    if engine.dialect.name == "sqlite":
        return ()
    return (engine.dialect.loaded_dbapi.Error,)


def explain_text(text: str, where: str, hints: dict[str, str]) -> DatabaseError:
    """A DatabaseError for the driver's message ``text``, with what to do if known."""
    for needle, hint in hints.items():
        if needle in text:
            return DatabaseError(f"The database {where} {hint}. ({text.strip()})")
    return DatabaseError(f"Database error on {where}: {text.strip()}")


_OTHER_ROLE = ("holds laufband tables this role may not use (another role created them): "
               "connect as that role, give the workflow a database of its own (createdb "
               "-O ROLE NAME), or have the owner GRANT SELECT, INSERT, UPDATE, DELETE ON "
               "ALL TABLES IN SCHEMA public TO ROLE and GRANT USAGE ON ALL SEQUENCES IN "
               "SCHEMA public TO ROLE")
#: PostgreSQL's messages (libpq's and the server's) and what to do about them.
SERVER_HINTS = {
    "password authentication failed": "rejected the password (from the URL, "
    "PGPASSWORD or ~/.pgpass): check it, and keep it in ~/.pgpass "
    "(host:port:database:user:password, mode 600) or PGPASSWORD rather than in the URL",
    "no password supplied": "asks for a password and none was given: put it in "
    "~/.pgpass (host:port:database:user:password, mode 600) or PGPASSWORD",
    "FATAL:  database": "does not exist on the server: create it (createdb NAME) or fix "
    "the URL",
    "FATAL:  role": "names a role (user) the server does not know: fix the URL",
    "Connection refused": "is not reachable: is the server running, and are host and "
    "port right?",
    "could not translate host name": "names a host that cannot be resolved: fix the URL",
    "terminating connection due to idle": "ended this worker's connection because it "
    f"hung inside a transaction (paused, or its node lost the network) for more than "
    f"{HUNG_TRANSACTION_S} s, and rolled it back; its tasks are handed to other workers",
    "permission denied for schema": "does not let this role create laufband's tables: "
    "give it a database of its own (createdb -O ROLE NAME) or GRANT CREATE ON SCHEMA "
    "public TO ROLE",
    "permission denied for table": _OTHER_ROLE,
    "permission denied for sequence": _OTHER_ROLE,
    "canceling statement due to lock timeout": "kept a lock for longer than "
    f"{DEFAULT_TIMEOUT:.0f} s (the writers' advisory lock, or a row lock): a worker "
    "holds it and does not let go. Find it with `laufband workers` or pg_stat_activity "
    "and stop it",
    "too many clients": "has no free connection: raise max_connections on the server "
    "(each worker holds two or three), or run fewer workers",
}


def _hints(path: str | None) -> dict[str, str]:
    return {
        "readonly database": f"{read_only_reason(path or '')}: make it writable or use "
        "a copy",
        "file is not a database": "is not a laufband SQLite database or is corrupt: "
        "move it aside and start again, or point db= elsewhere",
        "malformed": "is corrupt: move it aside and start again (finished work in it "
        "is lost; results your tasks wrote elsewhere are not)",
        "unable to open": "cannot be opened: check that its folder exists and is "
        "writable",
        "disk is full": "cannot grow: the disk is full; free space and rerun",
        "disk I/O error": "could not be read or written (disk I/O error): check the "
        "file system; on NFS, check the mount",
        "no such table": "lacks laufband's tables: was it deleted or replaced while "
        "workers ran? Move it aside and start again",
        "no such column": "lacks columns this laufband needs: was it replaced by an "
        "older laufband's database while workers ran? Move it aside and start again",
        "database is locked": "stayed locked by another process for longer than "
        f"{BUSY_TIMEOUT_MS // 1000} s: most likely a worker paused (SIGSTOP, swapping, "
        "an NFS hang) in the middle of a write, or another program holding a "
        "transaction open. Resume or kill that process, then rerun",
    }
