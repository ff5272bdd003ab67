"""Bad databases and contradicting graphs get clear errors, and nothing is lost."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time

import pytest
from helpers import beat, flat_worker, make, rows, states

from laufband import DatabaseError, Graphband, GraphMismatchError, SchemaVersionError, Task
from laufband.clock import FakeClock
from laufband.store.schema import SCHEMA_VERSION


def snapshot(db="g.sqlite"):
    return {t: rows(f"SELECT * FROM {t} ORDER BY 1", db)
            for t in ("tasks", "edges", "counts", "graphs", "reqsets", "attempts")}


@pytest.mark.nfs_locking
def test_missing_folder():
    with pytest.raises(DatabaseError, match="folder .*nope.* does not exist.*mkdir -p"):
        make([Task("a")], db="nope/g.sqlite")
    assert not os.path.exists("nope")


@pytest.mark.nfs_locking
def test_read_only_database():
    """SQLite's read-only mode: what a read-only file or mount looks like even to root
    (for whom chmod does not stop writes)."""
    list(make([Task("a")], name="A"))
    with pytest.raises(DatabaseError, match="read-only"):
        Graphband([Task("a"), Task("b")], db="sqlite:///file:g.sqlite?mode=ro&uri=true",
                  identifier="B", tqdm_kwargs={"disable": True})
    assert states() == {"a": "completed"}


@pytest.mark.nfs_locking
def test_corrupt_database():
    with open("g.sqlite", "wb") as f:
        f.write(b"this is not a database" * 100)
    with pytest.raises(DatabaseError, match="not a laufband SQLite database or is corrupt"):
        make([Task("a")])


@pytest.mark.nfs_locking
def test_database_of_another_schema_version():
    list(make([Task("a")], name="A"))
    conn = sqlite3.connect("g.sqlite")
    conn.execute("UPDATE laufband_meta SET value = '999' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaVersionError, match=f"schema version 999.*version {SCHEMA_VERSION}"):
        make([Task("a")], name="B")


@pytest.mark.nfs_locking
def test_database_of_laufband_0_2():
    conn = sqlite3.connect("g.sqlite")
    conn.execute("CREATE TABLE workflows (id TEXT PRIMARY KEY, total_tasks INTEGER)")
    conn.execute("CREATE TABLE task_statuses (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    before = snapshot_file("g.sqlite")
    with pytest.raises(SchemaVersionError, match="written by laufband 0.2.x.*new db file"):
        make([Task("a")])
    from laufband import Monitor  # reading it says the same, and writes nothing

    with pytest.raises(SchemaVersionError, match="written by laufband 0.2.x"):
        Monitor(db="g.sqlite")
    assert snapshot_file("g.sqlite") == before


@pytest.mark.nfs_locking
def test_a_read_only_url_to_a_missing_file_says_it_does_not_exist():
    with pytest.raises(DatabaseError, match="does not exist and cannot be created"):
        Graphband([Task("a")], db="sqlite:///file:none.sqlite?mode=ro&uri=true",
                  tqdm_kwargs={"disable": True})


@pytest.mark.nfs_locking
def test_contradicting_graph_is_rejected_and_database_unchanged():
    list(make([Task("a"), Task("b", dependencies={"a"}), Task("c")], name="A"))
    before = snapshot()
    with pytest.raises(GraphMismatchError, match="'b'"):
        list(make([Task("a"), Task("b"), Task("c"), Task("new")], name="B"))
    assert snapshot() == before


def test_graph_that_drops_tasks_is_rejected():
    list(make([Task("a"), Task("b")], name="A"))
    before = snapshot()
    with pytest.raises(GraphMismatchError, match="1 task.*lacks"):
        list(make([Task("a"), Task("c")], name="B"))
    assert snapshot() == before


def test_older_worker_claims_only_tasks_of_its_graph():
    old = make([Task("a"), Task("b")], name="old")
    newer = make([Task("a"), Task("b"), Task("c"), Task("d")], name="new")
    assert newer.has_more_jobs  # registers the larger graph (a new generation)
    assert [t.id for t in old] == ["a", "b"]  # never c or d: it has no data for them
    assert [t.id for t in newer] == ["c", "d"]
    assert states() == dict.fromkeys("abcd", "completed")


@pytest.mark.nfs_locking
def test_fresh_database_file_is_created_in_existing_folder():
    os.mkdir("sub")
    assert list(flat_worker([1], db="sub/x.sqlite")) == [1]
    assert os.path.exists("sub/x.sqlite")


def test_schema_of_fresh_database_has_version():
    list(make([Task("a")]))
    assert rows("PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert rows("PRAGMA journal_mode") == [("delete",)]


DATA = os.path.join(os.path.dirname(__file__), "..", "data")


def schema_of(db: str) -> dict:
    """Tables with their columns (name, type, not null, default, pk) and the indexes,
    independent of column order (ALTER TABLE appends)."""
    conn = sqlite3.connect(db)
    try:
        tables = [name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {
            "tables": {t: sorted(tuple(c[1:]) for c in conn.execute(f"PRAGMA table_info({t})"))
                       for t in tables},
            "indexes": sorted(conn.execute(
                "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index'")),
            "user_version": conn.execute("PRAGMA user_version").fetchall(),
        }
    finally:
        conn.close()


@pytest.mark.parametrize("version", [1, 2])
def test_database_of_an_older_schema_is_upgraded_and_the_workflow_goes_on(version):
    """tests/data/schema{1,2}.sqlite were written by laufband at 377579a (see
    make_old_databases.py): a completed, c failed (d blocked), e claimed by worker Z
    that died without going offline, b and f ready."""
    shutil.copy(os.path.join(DATA, f"schema{version}.sqlite"), "g.sqlite")
    graph = [Task("a"), Task("b", dependencies={"a"}), Task("c"),
             Task("d", dependencies={"c"}), Task("e"), Task("f")]
    clock = FakeClock(1_700_100_000.0)  # Z's heartbeat (2023) is long gone
    b = make(graph, name="B", clock=clock, max_failed_retries=1)
    assert rows("SELECT value FROM laufband_meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)]
    list(make([Task("x")], db="fresh.sqlite"))
    assert schema_of("g.sqlite") == schema_of("fresh.sqlite")
    # Z's claim became a live attempt; B's first beat reaps it (e goes back: a retry
    # is left), B's budget runs c again (and so d), and the rest runs.
    assert rows("SELECT task, attempt, worker, ended_at FROM attempts") == [(3, 1, "Z", None)]
    beat(b)
    assert sorted(t.id for t in b) == ["b", "c", "d", "e", "f"]
    assert set(states().values()) == {"completed"}
    assert rows("SELECT outcome, error FROM attempts WHERE worker = 'Z'") == [
        ("killed", "worker Z was declared dead by B: no heartbeat for 100000 s")]


@pytest.mark.parametrize("version", [1, 2])
def test_upgrade_waits_for_workers_of_the_older_version(version):
    shutil.copy(os.path.join(DATA, f"schema{version}.sqlite"), "g.sqlite")
    before = snapshot_file("g.sqlite")
    clock = FakeClock(1_700_000_010.0)  # Z beat 10 s ago: it may be running
    with pytest.raises(SchemaVersionError, match="1 worker.*still running.*Let them finish"):
        make([Task("a")], name="B", clock=clock)
    assert snapshot_file("g.sqlite") == before


def snapshot_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_wal_is_explicit_opt_in():
    list(make([Task("a")], journal_mode="wal"))
    assert rows("PRAGMA journal_mode") == [("wal",)]


@pytest.mark.nfs_locking
def test_database_deleted_between_runs_starts_over():
    list(make([Task("a")], name="A"))
    os.remove("g.sqlite")
    shutil.rmtree("unused", ignore_errors=True)
    assert [t.id for t in make([Task("a")], name="B")] == ["a"]


@pytest.mark.nfs_locking
def test_database_locked_by_a_process_paused_in_a_transaction(monkeypatch):
    """SQLite's own lock cannot be broken: a holder paused inside a transaction blocks
    writers until SQLite's busy timeout, then they stop with an explanation."""
    from laufband.store import connection

    worker = make([Task("a")], name="A")
    monkeypatch.setattr(connection, "BUSY_TIMEOUT_MS", 100)
    worker._store.db.engine.dispose()  # new connections get the short timeout
    paused = sqlite3.connect("g.sqlite", isolation_level=None)
    paused.execute("BEGIN IMMEDIATE")  # the "paused" holder of SQLite's write lock
    try:
        with pytest.raises(DatabaseError, match="stayed locked by another process.*paused"):
            list(worker)
    finally:
        paused.execute("ROLLBACK")
        paused.close()
    assert [t.id for t in make([Task("a")], name="B")] == ["a"]


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_change_mark_follows_commits(mode):
    """Waiting workers watch this instead of reading under the lock: a commit must
    change it (the database file in rollback mode, the -wal file in WAL mode), and
    nothing else may (the watch would turn into a read at every poll)."""
    worker = make([Task("a"), Task("b")], journal_mode=mode)
    store = worker._store
    first = store.change_mark()
    assert first is not None and store.change_mark() == first
    deadline = time.monotonic() + 5
    while store.change_mark() == first:  # commits within one tick of the file clock
        assert time.monotonic() < deadline, "a commit did not change the mark"
        worker._clock.advance(1)  # a new heartbeat stamp: the commit writes a page
        beat(worker)
    quiet = store.change_mark()
    store.counts()  # a read
    assert store.change_mark() == quiet


def statement(name: str) -> str:
    from laufband.store import attempts, claiming, incremental, ledger

    for sql in (claiming.SQL, attempts.SQL, ledger.SQL, incremental.SQL):
        if name in sql:
            return sql[name]
    raise KeyError(name)


@pytest.mark.parametrize("name", ["claim", "end_attempts", "complete", "release_dependents",
                                  "move_many", "pending_below", "blocked_below", "below",
                                  "states", "ready_below", "wait_again", "rerun",
                                  "mark_dirty", "behind_failure"])
@pytest.mark.parametrize("batch", [1, 64])
def test_batch_statements_look_tasks_up_by_primary_key(name, batch):
    """No claim+finish statement, and no walk over a task's descendants, may walk an
    index range over all tasks of a state: SQLite without statistics prefers the state
    index for some shapes once a batch has ~10 tasks (cost grew with the graph: 16 ms
    instead of 1 ms per batch at 100k tasks). Checked on the query plan of a real
    database."""
    from laufband.store.ledger import in_list

    tasks = [Task(str(i), dependencies={str(i - 1)} if i % 4 else set()) for i in range(200)]
    list(make(tasks, batch_size=1))
    marks, params = in_list(list(range(1, batch + 1)))
    sql = statement(name).format(pks=marks, in_pks=f"IN ({marks})")  # Ledger.in_pks
    conn = sqlite3.connect("g.sqlite")
    from laufband.store.incremental import SQL as INCREMENTAL

    for create in INCREMENTAL["make_sets"]:  # the temporary tables invalidation uses
        conn.execute(create)
    try:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}",
                                               {**params, "now": 0.0, "new": "ready"})]
    finally:
        conn.close()
    on_tasks = [line for line in plan if " tasks " in f"{line} " or line.endswith(" t")
                or " t USING" in line]
    assert all("INTEGER PRIMARY KEY" in line for line in on_tasks), plan
    assert on_tasks or name == "below", plan  # the walk reads only edges, ...
    assert not [line for line in plan if line.startswith("SCAN t")], plan
    assert not [line for line in plan if line.startswith("SCAN e")], plan  # by their key


def test_a_large_registration_keeps_the_lock_fresh(monkeypatch):
    """Registering a huge graph holds the lock for long: it is refreshed after every
    chunk of rows, so nobody breaks it (shown with chunks of 100 rows)."""
    from laufband.locking import DatabaseLock
    from laufband.store import registration

    monkeypatch.setattr(registration, "CHUNK", 100)
    refreshes = []
    refresh = DatabaseLock.refresh
    monkeypatch.setattr(DatabaseLock, "refresh",
                        lambda self: refreshes.append(self._depth) or refresh(self))
    make([Task(f"t{i}", dependencies={f"t{i - 1}"} if i else set()) for i in range(1000)])
    assert len([depth for depth in refreshes if depth]) >= 10  # while held


def test_laufband_status_does_not_upgrade_an_older_database(capsys):
    """A read-only command never writes: on a version-1 database it says what to do."""
    from laufband import cli

    shutil.copy(os.path.join(DATA, "schema1.sqlite"), "g.sqlite")
    before = snapshot_file("g.sqlite")
    assert cli.main(["--db", "g.sqlite", "status"]) == 2
    err = capsys.readouterr().err
    assert "uses laufband schema version 1" in err
    assert "The first worker of this version upgrades it in place" in err
    assert snapshot_file("g.sqlite") == before


def test_laufband_status_takes_a_path_or_a_url(capsys, monkeypatch):
    from laufband import cli

    list(make([Task("a"), Task("b")]))
    for argv in (["--db", "g.sqlite", "status"], ["--db", "sqlite:///g.sqlite", "status"],
                 ["status", "--db", "g.sqlite"]):
        assert cli.main(argv) == 0
        assert "tasks: 2/2 completed (100.0 %)" in capsys.readouterr().out
    monkeypatch.setenv("LAUFBAND_DB", os.path.abspath("g.sqlite"))
    assert cli.main(["workers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "labels -: 1 worker(s) (1 offline)"
    assert lines[2].startswith("  w ") and lines[2].endswith(" -")
