"""SQLite's lock taken whole, one connection per transaction (LAUFBAND_SQLITE_LOCKING,
connection.SQLITE_LOCKING): chosen on network file systems, and as safe as SQLite's
usual protocol. "Another process" below is a real one: POSIX locks of one process
never conflict with each other."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import assert_dependency_order, assert_exactly_once
from graphs import build
from helpers import make, rows, states, url

from laufband import ConfigError, DatabaseError, Graphband, Monitor, Task
from laufband.store import sqlite_lock
from laufband.store.sqlite_lock import file_system_type, foreign_hold, sqlite_locking

MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /home rw,relatime shared:9 - nfs4 srv:/home rw,vers=4.2
31 30 0:41 / /home/scratch\040space rw shared:10 - lustre 10.0.0.1@tcp:/scratch rw
32 22 0:42 / /tmp rw shared:11 - tmpfs tmpfs rw
33 32 0:43 / /tmp rw shared:12 - nfs srv:/tmp rw
garbage line without the separator
"""


@pytest.mark.parametrize(("path", "kind"), [
    ("/", "ext4"),
    ("/var/lib/x", "ext4"),
    ("/home", "nfs4"),
    ("/home/me/runs", "nfs4"),
    ("/homework", "ext4"),  # a prefix of the name is not inside the mount
    ("/home/scratch space/wf", "lustre"),  # \040 in mountinfo is a space
    ("/tmp/x", "nfs"),  # the last mount on a mount point is the one on top
])
def test_file_system_type_from_mountinfo(path, kind):
    assert file_system_type(path, MOUNTINFO) == kind


def test_file_system_type_of_this_folder():
    if not os.path.exists("/proc/self/mountinfo"):
        assert file_system_type(".") is None
    else:
        assert file_system_type(".") not in (None, "")


@pytest.mark.parametrize(("fs", "env", "journal", "expected"), [
    ("nfs4", {}, "delete", "exclusive"),
    ("lustre", {"LAUFBAND_SQLITE_LOCKING": "auto"}, "truncate", "exclusive"),
    ("ext4", {}, "delete", "normal"),
    (None, {}, "delete", "normal"),  # cannot tell: SQLite's usual protocol
    ("nfs4", {"LAUFBAND_SQLITE_LOCKING": "normal"}, "delete", "normal"),
    ("ext4", {"LAUFBAND_SQLITE_LOCKING": "exclusive"}, "delete", "exclusive"),
    ("nfs4", {}, "wal", "normal"),  # WAL keeps its own protocol (and is wrong on NFS)
    ("ext4", {"LAUFBAND_SQLITE_LOCKING": " Exclusive\n"}, "delete", "exclusive"),
])
def test_sqlite_locking_choice(monkeypatch, fs, env, journal, expected):
    monkeypatch.setattr(sqlite_lock, "file_system_type", lambda path, mountinfo=None: fs)
    assert sqlite_locking("/x/db.sqlite", journal, env) == expected


def test_bad_sqlite_locking_values_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match=r"LAUFBAND_SQLITE_LOCKING='nfs' is invalid.*"
                       r"auto, exclusive, normal"):
        sqlite_locking("db.sqlite", "delete", {"LAUFBAND_SQLITE_LOCKING": "nfs"})
    with pytest.raises(ConfigError, match="exclusive cannot be used with journal_mode='wal'"):
        sqlite_locking("db.sqlite", "wal", {"LAUFBAND_SQLITE_LOCKING": "exclusive"})
    with pytest.raises(ConfigError, match="LAUFBAND_SQLITE_LOCKING='' is invalid"):
        sqlite_locking("db.sqlite", "delete", {"LAUFBAND_SQLITE_LOCKING": ""})
    # ... and a worker stops with it before it makes any file
    monkeypatch.setenv("LAUFBAND_SQLITE_LOCKING", "exclusiv")
    with pytest.raises(ConfigError, match="LAUFBAND_SQLITE_LOCKING='exclusiv' is invalid"):
        make([Task("a")])
    assert not os.path.exists("g.sqlite")


# ------------------------------------------------------------- in another process
PROBE = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
try:
    conn.execute(sys.argv[2])
    conn.execute("ROLLBACK") if conn.in_transaction else None
    print("free")
except sqlite3.OperationalError as exc:
    print(exc)
"""


def others(statement: str = "BEGIN EXCLUSIVE", db: str = "g.sqlite") -> str:
    """What another process gets when it tries ``statement`` at once: 'free', or
    SQLite's error ('database is locked')."""
    return subprocess.run([sys.executable, "-c", PROBE, db, statement], check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()


@pytest.fixture
def exclusive(monkeypatch):
    monkeypatch.setenv("LAUFBAND_SQLITE_LOCKING", "exclusive")


def test_a_transaction_holds_the_whole_lock_from_its_first_statement(exclusive):
    """Not even a reader gets in while a worker's transaction is open, so a worker
    paused inside one (its file lock broken) still keeps the others out; at its end
    nothing is held (the lock went with the file's close)."""
    worker = make([Task("a"), Task("b")])
    db = worker._store.db
    assert db.locking == "exclusive"
    assert others() == "free"
    with db.transaction() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM tasks").all()
        assert others("SELECT count(*) FROM tasks") == "database is locked"
    assert others() == "free"
    with db.read() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM tasks").all()
        assert others("SELECT count(*) FROM tasks") == "database is locked"
    assert others() == "free"
    assert [t.id for t in worker] == ["a", "b"]
    assert others() == "free"
    assert states() == {"a": "completed", "b": "completed"}


@pytest.mark.parametrize("form", ["path", "mode=ro"])
def test_a_monitor_beside_a_worker_in_one_process_leaves_no_lock_behind(exclusive, form):
    """SQLite keeps the lock of unix-excl until the process's last connection to the
    file closes, and an unlock by a connection with SQLite's usual protocol in the same
    process lets it go under the others: a Monitor here opens the file as the workers do
    and holds no connection between its reads."""
    worker = make([Task(str(i)) for i in range(6)], name="A")
    db = worker._store.db
    # (a URL that asks for mode=ro too: the reader still opens the file as the worker)
    monitor = Monitor(db=db.url if form == "path" else
                      f"sqlite:///file:{os.path.abspath('g.sqlite')}?mode=ro&uri=true")
    for _ in range(2):
        assert monitor.status().total == 6
        with db.transaction() as conn:
            conn.exec_driver_sql("SELECT count(*) FROM tasks").all()
            # (a pooled usual connection's unlock would have dropped the process's lock)
            assert others("SELECT count(*) FROM tasks") == "database is locked"
        # (and one left open would keep it after the last connection of the workers)
        assert others() == "free"
    done = []
    for task in worker:
        done.append(task.id)
        assert monitor.status().total == 6
    assert sorted(done) == [str(i) for i in range(6)]
    assert others() == "free"


def test_a_reader_neither_writes_nor_makes_a_missing_file(exclusive):
    list(make([Task("a")]))
    from laufband.store import Store

    store = Store.open_read_only(url("g.sqlite"))
    assert store.db.locking == "exclusive"
    with pytest.raises(DatabaseError, match="readonly"), store.db.read() as conn:
        conn.exec_driver_sql("DELETE FROM tasks")
    assert states() == {"a": "completed"}
    with pytest.raises(DatabaseError, match="No database at"):
        Store.open_read_only(url("missing.sqlite"))
    assert not os.path.exists("missing.sqlite")


def test_a_database_deleted_under_a_worker_is_reported_not_made_again(exclusive):
    worker = make([Task("a"), Task("b")])
    it = iter(worker)
    next(it)
    os.remove("g.sqlite")
    with pytest.raises(DatabaseError, match="deleted or moved away"):
        next(it)
    assert not os.path.exists("g.sqlite")


def test_one_protocol_per_process_and_file(monkeypatch, caplog):
    """Two protocols in one process would let SQLite's lock go (an unlock by the usual
    protocol releases the process's lock): a second worker on the file follows the
    first's, and says so."""
    tasks = [Task(str(i)) for i in range(20)]
    a = make(tasks, name="A")
    monkeypatch.setenv("LAUFBAND_SQLITE_LOCKING", "exclusive")
    b = make(tasks, name="B")
    assert (a._store.db.locking, b._store.db.locking) == ("normal", "normal")
    assert "already used with SQLite's normal locking" in caplog.text
    assert make(tasks, name="C", db="other.sqlite")._store.db.locking == "exclusive"
    ran = [t.id for t in a] + [t.id for t in b]
    assert sorted(ran) == sorted(t.id for t in tasks)


def test_workers_of_both_protocols_share_a_file(workers):
    """Across processes the two protocols exclude each other (the lock bytes are
    SQLite's): workers that chose differently run one workflow exactly once."""
    workers.start("layered:4x40", 2, sleep=0.002, env={"LAUFBAND_SQLITE_LOCKING": "normal"})
    workers.start("layered:4x40", 2, sleep=0.002,
                  env={"LAUFBAND_SQLITE_LOCKING": "exclusive"})
    run = workers.wait()
    assert run.returncodes == [0, 0, 0, 0], run.stderr
    tasks = build("layered:4x40")
    assert_exactly_once(run, [t.id for t in tasks])
    assert_dependency_order(run, tasks)
    assert len({rec["worker"] for rec in run.records}) > 1


LOCKS = """1: POSIX  ADVISORY  WRITE {pid} {dev}:{ino} 1073741826 1073742335
2: FLOCK  ADVISORY  WRITE {pid} {dev}:{other} 0 EOF
3: POSIX  ADVISORY  READ  1 {dev}:{ino} 0 EOF
"""


def test_foreign_hold_reads_this_process_locks_on_the_file(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    mine = LOCKS.format(pid=os.getpid(), dev=dev, ino=st.st_ino, other=st.st_ino + 1)
    assert foreign_hold(str(path), mine)
    assert not foreign_hold(str(path), mine.splitlines()[1] + "\n" + mine.splitlines()[2])
    assert not foreign_hold(str(tmp_path / "missing"), mine)


def test_a_users_own_connection_in_a_worker_is_named(exclusive, caplog):
    """A sqlite3 connection of the user's code open in the worker's process keeps
    unix-excl's lock after the worker's transactions (the others could not write):
    the worker says so, once, with what to do."""
    import sqlite3

    worker = make([Task("a"), Task("b"), Task("c")])
    db = worker._store.db
    with db.transaction() as conn:
        conn.exec_driver_sql("SELECT 1").all()
    assert "another connection" not in caplog.text
    mine = sqlite3.connect("g.sqlite")
    try:
        db._next_foreign_look = 0.0
        with db.transaction() as conn:
            conn.exec_driver_sql("SELECT 1").all()
        assert others() == "database is locked"  # what the warning is about
    finally:
        mine.close()
    assert caplog.text.count("another connection to") == 1
    assert "LAUFBAND_SQLITE_LOCKING=normal" in caplog.text
    assert others() == "free"
    assert [t.id for t in worker] == ["a", "b", "c"]


def test_graphband_runs_with_the_default_of_this_disk():
    """Outside tests that set it, the default is ``auto``: this disk is local."""
    worker = Graphband([Task("a")], db="g.sqlite", tqdm_kwargs={"disable": True})
    assert worker._store.db.locking == ("exclusive" if file_system_type(".")
                                        in sqlite_lock.NETWORK_FILE_SYSTEMS else "normal")
    assert [t.id for t in worker] == ["a"]


def test_urls_of_the_file(exclusive, tmp_path):
    """The URL's own settings hold: a file: URI with its parameters, a path with
    characters a URI quotes, uri=true on a plain path; a URL that names its own VFS
    keeps SQLite's usual protocol with it."""
    folder = tmp_path / "with space #1 &x=1"
    folder.mkdir()
    for db in (f"sqlite:///{folder}/a.sqlite",
               f"sqlite:///{folder}/b.sqlite?uri=true",
               f"sqlite:///file:{tmp_path}/c.sqlite?cache=private&uri=true"):
        worker = Graphband([Task("a"), Task("b")], db=db, tqdm_kwargs={"disable": True})
        assert worker._store.db.locking == "exclusive"
        assert [t.id for t in worker] == ["a", "b"]
    assert sorted(p.name for p in folder.iterdir() if "lock" not in p.name
                  ) == ["a.sqlite", "b.sqlite"]
    assert (tmp_path / "c.sqlite").exists()
    worker = Graphband([Task("a")], db=f"sqlite:///file:{tmp_path}/d.sqlite?vfs=unix-none"
                       "&uri=true", tqdm_kwargs={"disable": True})
    assert worker._store.db.locking == "normal"


def test_a_wal_file_keeps_the_usual_protocol(exclusive, monkeypatch):
    """WAL has a protocol of its own (shared memory): a reader of a WAL file, and a
    worker that finds one (and turns it back to a rollback journal), use SQLite's."""
    monkeypatch.delenv("LAUFBAND_SQLITE_LOCKING")
    first = make([Task("a")], journal_mode="wal")
    list(first)
    first._store.db.engine.dispose()  # (its pooled connection would keep the WAL open)
    monkeypatch.setenv("LAUFBAND_SQLITE_LOCKING", "exclusive")
    from laufband.store import Store

    reader = Store.open_read_only(url("g.sqlite"))
    assert reader.db.locking == "normal"
    reader.db.engine.dispose()
    worker = make([Task("a"), Task("b")], name="B")
    assert worker._store.db.locking == "normal"
    assert [t.id for t in worker] == ["b"]
    assert rows("PRAGMA journal_mode") == [("delete",)]
    # (one protocol per process and file: a worker here stays with the first one)
    assert make([Task("a"), Task("b")], name="C")._store.db.locking == "normal"


def test_a_second_database_of_the_file_lets_no_lock_go(exclusive):
    """Choosing the protocol may read the file's header (is it WAL?), and closing any
    descriptor of the file lets go this process's lock on it: only the first Database
    of a file in a process reads it, before any connection to it."""
    from laufband.store.connection import Database

    worker = make([Task("a")])
    db = worker._store.db
    with db.transaction() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM tasks").all()
        other = Database(db.url, None, read_only=True)  # a Monitor's, a prune's...
        assert other.locking == "exclusive"
        assert others("SELECT count(*) FROM tasks") == "database is locked"
    assert others() == "free"


def test_wal_in_a_process_that_takes_the_lock_whole_is_refused(monkeypatch):
    """On a network file system (auto), a worker asking for WAL is refused where this
    process already takes the file's lock whole (one protocol per process and file)."""
    monkeypatch.setattr(sqlite_lock, "file_system_type", lambda path, mountinfo=None: "nfs")
    list(make([Task("a")]))
    with pytest.raises(ConfigError, match="journal_mode='wal' cannot be used.*"
                       "LAUFBAND_SQLITE_LOCKING=exclusive"):
        make([Task("a")], name="B", journal_mode="wal")
    assert rows("PRAGMA journal_mode") == [("delete",)]


def test_no_warning_for_laufbands_own_connections(exclusive, caplog):
    """A reader of laufband's with a lock file of its own (a worker's db_lock= put
    elsewhere) may hold a connection while a worker's transaction ends: not foreign."""
    from laufband.store.connection import Database

    worker = make([Task("a")])
    db = worker._store.db
    reader = Database(db.url, None, read_only=True)
    with reader.read() as held:
        held.exec_driver_sql("SELECT count(*) FROM tasks").all()
        assert others() == "database is locked"  # this process holds the lock: laufband's
        db._next_foreign_look = 0.0
        db._check_no_foreign_hold()  # what a worker's transaction runs at its end
    assert "another connection" not in caplog.text
    assert others() == "free"
