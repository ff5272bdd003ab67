"""PostgreSQL as the workflow database, against a real server (scripts/postgres-up.sh):
workers that share no folder, concurrent first starts, passwords that never show, and
``worker.lock`` next to the script. (The exactly-once, fault and CLI suites run on
PostgreSQL too: they are marked ``backends``.)"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import backends
import pytest
import sqlalchemy as sa
from conftest import assert_dependency_order, assert_exactly_once, query, wait_until
from graphs import build

pytestmark = [pytest.mark.processes, pytest.mark.postgres]

SECRET = "laufband-secret"  # the password scripts/postgres-up.sh gives the role laufband


@pytest.fixture
def pg(tmp_path):
    """The PostgreSQL backend for this test (its databases are dropped afterwards)."""
    from conftest import SERVICES

    chosen = backends.Backend("postgres", SERVICES["postgres"])
    backends.current = chosen
    try:
        yield chosen
    finally:
        backends.current = backends.SQLITE
        chosen.drop_all()


@contextlib.contextmanager
def reaped(procs: list[subprocess.Popen]) -> Iterator[None]:
    """Kill and reap whatever of ``procs`` still runs when the block ends."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def as_role(url: str, password: str | None) -> str:
    """``url`` for the password-protected role ``laufband`` (with ``password`` in it),
    which is made the owner of the database (PostgreSQL 15: only the owner may create
    tables in its schema public)."""
    parsed = sa.engine.make_url(url)
    backends.current._admin(f'ALTER DATABASE "{parsed.database}" OWNER TO laufband')
    return parsed.set(username="laufband", password=password).render_as_string(
        hide_password=False)


def test_workers_in_different_folders_start_together_on_an_empty_database(workers, pg):
    """What crashed before: workers started at once, each in a folder of its own (jobs on
    different nodes), on an empty database: concurrent schema creation, then claims.
    Every task runs exactly once in dependency order, and no lock file is made."""
    url = pg.url()
    folders = [workers.folder / f"node{i}" for i in range(8)]
    for folder in folders:
        folder.mkdir()
        workers.start("layered:5x40", db=url, cwd=folder, sleep=0.01)
    run = workers.wait(timeout=180)
    assert run.returncodes == [0] * 8, run.stderr
    tasks = build("layered:5x40")
    assert_exactly_once(run, [t.id for t in tasks])
    assert_dependency_order(run, tasks)
    assert len({r["pid"] for r in run.records}) > 1, "one worker did everything"
    assert not list(workers.folder.rglob("*.lock")), "a lock file on PostgreSQL"
    assert query("graph.sqlite", "SELECT count(*) FROM workers") == [(8,)]


def laufband_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "laufband.cli", *argv], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_the_password_never_shows(workers, pg):
    """Errors, the CLI's tables and its JSON print the URL with the password masked."""
    url = pg.url()
    wrong = as_role(url, "not-the-password")
    [bad] = workers.start("flat:3", db=wrong)
    assert bad.wait(timeout=60) != 0
    err = workers.stderr_of(bad)
    assert "password" in err and "~/.pgpass" in err, err  # says what to do
    assert "not-the-password" not in err
    good = as_role(url, SECRET)
    [ok] = workers.start("flat:3", db=good)
    assert ok.wait(timeout=60) == 0, workers.stderr_of(ok)
    for argv in (["status"], ["status", "--json"], ["workers"], ["workers", "--json"],
                 ["tasks"]):
        out = laufband_cli("--db", good, *argv)
        assert out.returncode == 0, out.stderr
        assert SECRET not in out.stdout + out.stderr, argv
    missing = sa.engine.make_url(good).set(database="no_such_db").render_as_string(
        hide_password=False)
    out = laufband_cli("--db", missing, "status")
    assert out.returncode != 0 and "does not exist" in out.stderr, out.stderr
    assert SECRET not in out.stdout + out.stderr
    assert "***" in out.stderr  # the URL is shown, masked


def test_tables_of_another_role_get_a_hint_that_works(workers, pg):
    """A role that may not use the tables another role made is told what to do, and
    doing it (the GRANTs the hint names) is enough to write."""
    url = pg.url()
    # The tables are the superuser's; its worker stops at t1 (raised), t2 stays ready.
    [first] = workers.start("flat:3", db=url, fail="t1")
    assert first.wait(timeout=60) == 1, workers.stderr_of(first)
    role_url = as_role(url, SECRET)
    out = laufband_cli("--db", role_url, "cancel", "--drain-timeout", "1")
    assert out.returncode != 0, out.stdout
    assert "permission denied for table" in out.stderr, out.stderr
    assert "createdb -O" in out.stderr, out.stderr
    assert SECRET not in out.stdout + out.stderr
    for grant in ("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public",
                  "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public"):
        assert grant in out.stderr, out.stderr
        pg.execute(f"{grant} TO laufband")
    # Cancelling t2 writes its history (events.id: a sequence).
    out = laufband_cli("--db", role_url, "cancel", "--drain-timeout", "1")
    assert out.returncode == 0, out.stderr
    assert pg.rows("SELECT state FROM tasks WHERE id = 't2'") == [("cancelled",)]


def test_the_password_comes_from_pgpass_or_the_environment(workers, pg, tmp_path):
    """As libpq does: no password in the URL, it is read from ~/.pgpass or PGPASSWORD;
    with neither, a clear error."""
    url = as_role(pg.url(), None)
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PGPASSFILE": str(home / ".pgpass")}
    env.pop("PGPASSWORD", None)
    [none] = workers.start("flat:3", db=url, env=env)
    assert none.wait(timeout=60) != 0
    assert "password" in workers.stderr_of(none), workers.stderr_of(none)
    u = sa.engine.make_url(url)
    (home / ".pgpass").write_text(f"{u.host}:{u.port}:*:laufband:{SECRET}\n")
    (home / ".pgpass").chmod(0o600)
    [from_file] = workers.start("flat:3", db=url, env=env)
    assert from_file.wait(timeout=60) == 0, workers.stderr_of(from_file)
    (home / ".pgpass").unlink()
    [from_env] = workers.start("flat:3", db=url, env={**env, "PGPASSWORD": SECRET})
    assert from_env.wait(timeout=60) == 0, workers.stderr_of(from_env)
    assert query("graph.sqlite", "SELECT count(*) FROM tasks WHERE state = 'completed'") \
        == [(3,)]


USER_LOCK_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from laufband import Laufband

    counter = Path(sys.argv[2])
    worker = Laufband(range(40), db=sys.argv[1], tqdm_kwargs={"disable": True})
    for item in worker:
        with worker.lock:  # a read-modify-write that loses updates without the lock
            n = int(counter.read_text() or 0) if counter.exists() else 0
            time.sleep(0.005)
            counter.write_text(str(n + 1))
""")


def test_worker_lock_lives_next_to_the_script(workers, pg, tmp_path):
    """On PostgreSQL there is no database file to put worker.lock next to: it is next to
    the script, so workers in different folders still exclude each other."""
    shared = tmp_path / "shared"
    shared.mkdir()
    script = shared / "main.py"
    script.write_text(USER_LOCK_SCRIPT)
    counter = shared / "counter.txt"
    url = pg.url()
    procs = []
    for i in range(4):
        folder = tmp_path / f"node{i}"
        folder.mkdir()
        with open(folder / "err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, str(script), url, str(counter)],
                                          cwd=folder, stderr=err))
    with reaped(procs):
        codes = [p.wait(timeout=120) for p in procs]
    errs = [(tmp_path / f"node{i}" / "err").read_text() for i in range(4)]
    assert codes == [0] * 4, errs
    assert counter.read_text() == "40"  # no update lost


def test_db_lock_is_refused_on_postgres(pg):
    from laufband import Graphband, Task
    from laufband.errors import ConfigError
    from laufband.locking import FastLock

    with pytest.raises(ConfigError, match="advisory lock"):
        Graphband([Task("a")], db=pg.url(), db_lock=FastLock("x.lock"))


def columns(name: str) -> list[tuple]:
    return query(name, "SELECT table_name, column_name, data_type, is_nullable FROM"
                       " information_schema.columns WHERE table_schema = 'public'"
                       " ORDER BY table_name, column_name")


def test_workers_started_together_migrate_an_older_database_once(workers, pg, tmp_path):
    """A database of schema 4 (made here from a fresh one: what 4 -> 5 added, dropped)
    with its graph registered; 4 workers in folders of their own start at once: one
    migrates it under the advisory lock, the others wait and find it migrated; every
    task runs exactly once, and the tables equal a fresh database's."""
    from laufband import Graphband

    url = pg.url()
    worker = Graphband(build("flat:40"), db=url, identifier="registrar")
    worker.close()
    pg.execute("ALTER TABLE tasks DROP COLUMN runtime")
    pg.execute("ALTER TABLE workers DROP COLUMN allocation_end")
    pg.execute("UPDATE laufband_meta SET value = '4' WHERE key = 'schema_version'")
    for i in range(4):
        folder = tmp_path / f"node{i}"
        folder.mkdir()
        workers.start("flat:40", db=url, cwd=folder)
    run = workers.wait(timeout=180)
    assert run.returncodes == [0] * 4, run.stderr
    assert_exactly_once(run, [t.id for t in build("flat:40")])
    assert query("graph.sqlite", "SELECT value FROM laufband_meta"
                                 " WHERE key = 'schema_version'") == [("5",)]
    Graphband(build("flat:2"), db=pg.url("fresh"), identifier="fresh").close()
    assert columns("graph.sqlite") == columns("fresh")


def test_connections_give_up_on_a_lost_server(pg):
    """Every connection (the pool's and the lock's) has libpq's network timeouts, so a
    server that is gone ends in an error, not a call blocked for hours; a URL's own
    settings win."""
    from laufband import Graphband, Task
    from laufband.store import Store
    from laufband.store.connection import server_connect

    url = pg.url()
    Graphband([Task("a")], db=url, identifier="w").close()
    with Store.open_existing(url).db.engine.connect() as pooled:
        conns = [pooled.connection.driver_connection, server_connect(url)()]
        try:
            for conn in conns:  # the libpq options each connection was opened with
                given = conn.info.get_parameters()
                assert (given["connect_timeout"], given["tcp_user_timeout"],
                        given["keepalives_idle"]) == ("10", "60000", "30")
        finally:
            conns[1].close()
    own = sa.engine.make_url(url).update_query_dict({"keepalives_idle": "7"})
    conn = server_connect(own.render_as_string(hide_password=False))()
    try:
        assert conn.info.get_parameters()["keepalives_idle"] == "7"
    finally:
        conn.close()


#: What both workers of ``run_pair`` start with: their arguments and a barrier.
PAIR_PRELUDE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path

    url, name, meet = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    def barrier(stage):  # both workers get here, or this one gives up
        (meet / f"{stage}-{name}").touch()
        deadline = time.monotonic() + 60
        while len(list(meet.glob(f"{stage}-*"))) < 2:
            if time.monotonic() > deadline:
                sys.exit(f"{name}: the other worker never reached {stage!r}")
            time.sleep(0.01)
""")

SIDE_BY_SIDE_SCRIPT = textwrap.dedent("""
    from laufband import Graphband, Task
    from laufband.store import Store, claiming

    first = {"ledger": True, "claim": True}

    real_ledger, real_claim = Store._ledger, claiming.claim

    def ledger(self, cancel=None, beside=False, **kw):
        if beside and first.pop("ledger", False):
            barrier("claiming")  # both have done the rest of their first step
        return real_ledger(self, cancel, beside, **kw)

    def claim(led, me, limit, ahead=False, **kw):
        got = real_claim(led, me, limit, ahead, **kw)
        if got and first.pop("claim", False):
            (meet / f"first-{name}").write_text(json.dumps([c.id for c in got]))
            barrier("claimed")  # ... inside the claim's transaction: both at once
        return got

    Store._ledger, claiming.claim = ledger, claim
    worker = Graphband([Task(str(i)) for i in range(6)], db=url, identifier=name,
                       batch_size=1, tqdm_kwargs={"disable": True})
    with open(meet / f"ran-{name}", "w") as out:
        for task in worker:
            print(task.id, file=out, flush=True)
""")


def run_pair(pg, tmp_path, source: str):
    """Run ``source`` (after PAIR_PRELUDE) as workers A and B; both must exit 0.
    Returns the meeting folder (their barriers' and records' files)."""
    script = tmp_path / "pair.py"
    script.write_text(PAIR_PRELUDE + source)
    meet = tmp_path / "meet"
    meet.mkdir()
    url = pg.url()
    procs = [subprocess.Popen([sys.executable, str(script), url, name, str(meet)],
                              stderr=subprocess.PIPE, text=True) for name in ("A", "B")]
    with reaped(procs):
        errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    return meet


def test_claims_run_side_by_side(pg, tmp_path):
    """Two workers' claims on PostgreSQL run at the same time: each one holds its claim
    transaction open until the other has claimed too (with claims serialised, or a
    claim that waited for the task the other one found, neither gets there), and they
    claim different tasks (FOR UPDATE SKIP LOCKED). Every task still runs once."""
    meet = run_pair(pg, tmp_path, SIDE_BY_SIDE_SCRIPT)
    firsts = [json.loads((meet / f"first-{n}").read_text()) for n in ("A", "B")]
    assert len(firsts[0]) == len(firsts[1]) == 1 and firsts[0] != firsts[1], firsts
    ran = [line for n in ("A", "B") for line in (meet / f"ran-{n}").read_text().split()]
    assert sorted(ran) == [str(i) for i in range(6)], ran
    assert pg.rows("SELECT count(*) FROM attempts") == [(6,)]


COMPLETIONS_SCRIPT = textwrap.dedent("""
    from laufband import Graphband, Task
    from laufband.store import attempts

    real_end, first = attempts.end, [True]

    def end(led, worker, finishes):
        if finishes and first and first.pop():
            barrier("completing")  # both inside a step that records a completion
        return real_end(led, worker, finishes)

    attempts.end = end
    tasks = [Task("r0"), Task("r1"), Task("j", dependencies={"r0", "r1"}),
             *(Task(f"e{i}") for i in range(4))]
    worker = Graphband(tasks, db=url, identifier=name, batch_size=1,
                       heartbeat_interval=3600, heartbeat_timeout=7200,
                       tqdm_kwargs={"disable": True})
    barrier("registered")  # the other's registration would wait for our step
    with open(meet / f"ran-{name}", "w") as out:
        for task in worker:
            print("start", task.id, time.time(), file=out, flush=True)
            time.sleep(0.05)
            print("end", task.id, time.time(), file=out, flush=True)
""")


def test_steps_that_complete_tasks_run_side_by_side(pg, tmp_path):
    """Two workers' steps that record completions run at the same time (each one waits
    inside its step until the other is inside one too: with such steps serialised,
    neither gets there). Each completes one dependency of j: the step that brings j's
    waits to zero makes it ready, once, and j runs after both. Every task runs once,
    and the counts match the tasks."""
    meet = run_pair(pg, tmp_path, COMPLETIONS_SCRIPT)
    times: dict[tuple[str, str], list[float]] = {}
    for n in ("A", "B"):
        for line in (meet / f"ran-{n}").read_text().splitlines():
            what, task, at = line.split()
            times.setdefault((what, task), []).append(float(at))
    ids = ["r0", "r1", "j", "e0", "e1", "e2", "e3"]
    assert {task for what, task in times if what == "start"} == set(ids), times
    assert all(len(v) == 1 for v in times.values()), times  # each task once
    assert times["start", "j"][0] > max(times["end", "r0"][0], times["end", "r1"][0])
    ready_j = ("SELECT count(*) FROM events e JOIN tasks t ON t.pk = e.task"
               " WHERE t.id = 'j' AND e.event = 'ready'")
    assert pg.rows(ready_j) == [(1,)]
    assert pg.rows("SELECT state, sum(n) FROM counts WHERE n != 0 GROUP BY state") == [
        ("completed", 7)]


def test_ledger_statements_run_on_the_driver_connection(pg):
    """On a server the Ledger runs its statements on psycopg's connection, in the
    transaction SQLAlchemy began: placeholders as sqlalchemy.text() reads them (not a
    '::' cast; a literal '%' stays), and the driver's errors explained like any other."""
    from laufband import Graphband, Task
    from laufband.errors import DatabaseError
    from laufband.store.connection import Database
    from laufband.store.ledger import Ledger, pyformat

    Graphband([Task("a")], db=pg.url(), identifier="W").close()
    db = Database(pg.url(), None)
    try:
        with db.transaction() as conn:
            led = Ledger(conn, 0.0)
            assert led.all("SELECT 'a%' || :x, '2'::int, :y", {"x": "b", "y": None}) == [
                ("a%b", 2, None)]
            # Arrays go in binary (no quoting to check per element): any values, None,
            # quotes, an empty array.
            arrays = "SELECT CAST(:a AS integer[]), CAST(:b AS text[]), CAST(:c AS bigint[])"
            assert "CAST(%(a)b AS integer[])" in pyformat(arrays)
            assert led.all(arrays, {"a": [1, None, 2**31 - 1], "b": ["x'y,\"{}", None],
                                    "c": []}) == [([1, None, 2**31 - 1], ["x'y,\"{}", None], [])]
            assert led.run("UPDATE tasks SET label = :label WHERE id = 'a'",
                           {"label": "100%"}) == 1
            conn.rollback()  # the statements ran in SQLAlchemy's transaction
        assert pg.rows("SELECT label FROM tasks") == [(None,)]
        with pytest.raises(DatabaseError, match="no_such_table"), db.transaction() as conn:
            Ledger(conn, 0.0).run("UPDATE no_such_table SET x = 1", {})
    finally:
        db.engine.dispose()


def test_a_connection_lost_inside_a_step_keeps_the_servers_reason(pg):
    """A Ledger statement on the driver connection that the server ended (here: idle in
    the transaction past its timeout, as a worker that hung) raises the server's reason
    with its hint, not the error of a rollback on the dead connection ("the connection
    is lost", review23), and the next transaction gets a working connection."""
    from laufband import Graphband, Task
    from laufband.errors import DatabaseError
    from laufband.store.connection import Database
    from laufband.store.ledger import Ledger

    Graphband([Task("a")], db=pg.url(), identifier="W").close()
    db = Database(pg.url(), None)
    try:
        hung = pytest.raises(DatabaseError, match="hung inside a transaction")
        with hung, db.transaction() as conn:
            led = Ledger(conn, 0.0)
            led.run("SET LOCAL idle_in_transaction_session_timeout = 200", {})
            pid = led.scalar("SELECT pg_backend_pid()")
            wait_until(lambda: not pg.rows(
                f"SELECT 1 FROM pg_stat_activity WHERE pid = {pid}"), timeout=30)
            led.run("UPDATE tasks SET label = 'x'", {})
        with db.transaction() as conn:
            assert Ledger(conn, 0.0).all("SELECT label FROM tasks") == [(None,)]
    finally:
        db.engine.dispose()


@contextlib.contextmanager
def rolled_back(pg) -> Iterator[sa.Connection]:
    """A connection to the test's database in a transaction that is rolled back."""
    engine = sa.create_engine(pg.url())
    try:
        with engine.connect() as conn:
            yield conn
            conn.rollback()
    finally:
        engine.dispose()


def explain(conn: sa.Connection, sql: str, params: dict, analyze: bool = True) -> list:
    """The server's plan of ``sql`` (JSON; with ``analyze``, as run)."""
    options = "ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON"
    return conn.execute(sa.text(f"EXPLAIN ({options}) {sql}"), params).scalar()


def nodes(node: dict) -> Iterator[dict]:
    """A plan node (EXPLAIN's JSON) and all nodes below it."""
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


def test_a_claim_reads_attempts_only_of_tasks_that_run(pg):
    """A claim's find on a graph just registered (no statistics yet) looks for the
    worker's own live attempts only of ready tasks that have live attempts (shared
    tasks), never for every ready task it passes: as an anti-join the server walked
    all of the worker's live attempts for each ready task, most of its time in a run
    of trivial tasks."""
    from laufband import Graphband, Task
    from laufband.store.claiming import SQL as CLAIMING

    Graphband([Task(f"t{i}") for i in range(2000)], db=pg.url(), identifier="W").close()
    pg.execute("INSERT INTO attempts (task, attempt, worker, started_at)"
               " SELECT pk, 1, 'W', 0 FROM tasks WHERE pk < 300")
    pg.execute("UPDATE tasks SET state = 'running', running = 1 WHERE pk < 300")
    [(reqset, generation)] = pg.rows("SELECT min(reqset), max(generation) FROM tasks")
    with rolled_back(pg) as conn:
        plan = explain(conn, CLAIMING["find_ready"], {
            "reqset": reqset, "generation": generation, "worker": "W", "limit": 256})

    top = plan[0]["Plan"]
    assert top["Actual Rows"] == 256
    on_attempts = [n for n in nodes(top) if n.get("Relation Name") == "attempts"]
    assert on_attempts, "the find no longer reads attempts: update this test"
    assert all(n["Actual Loops"] == 0 for n in on_attempts), json.dumps(plan, indent=1)


def test_ending_a_batch_of_attempts_reads_each_once(pg):
    """The completions of a batch end its attempts by (task, attempt) pairs: found by
    the task's key and the pair as one number, not as a join that scanned all pairs
    once per attempt (256 x 256 in a step, as planned on a graph just registered)."""
    from laufband import Graphband, Task
    from laufband.store.attempts import SQL as ATTEMPTS
    from laufband.store.ledger import Ledger

    Graphband([Task(f"t{i}") for i in range(2000)], db=pg.url(), identifier="W").close()
    pg.execute("INSERT INTO attempts (task, attempt, worker, started_at)"
               " SELECT pk, 1, 'W', 0 FROM tasks WHERE pk BETWEEN 1 AND 256")
    with rolled_back(pg) as conn:
        # Pairs of other attempt numbers, and of other tasks, are not ended.
        pairs, params = Ledger(conn, 0.0).pairs_in(
            "task", "attempt", [(pk, 1) for pk in range(1, 257)] + [(257, 1), (1, 2)])
        plan = explain(conn, ATTEMPTS["end_and_count"].format(pairs=pairs),
                       {**params, "worker": "W", "now": 1.0})  # a server's form
        ended = conn.execute(sa.text("SELECT count(*) FROM attempts WHERE ended_at = 1")
                             ).scalar()
    assert plan[0]["Plan"]["Actual Rows"] == 256 and ended == 256
    assert "Nested Loop" not in json.dumps(plan), json.dumps(plan, indent=1)


def test_a_registration_leaves_statistics_for_the_steps_plans(pg):
    """The worker that registers a graph has the server's planner statistics made
    (ANALYZE) right after: without them a step's updates of a batch by primary key
    were planned as scans of every task (the server's own ANALYZE comes a minute or
    more later)."""
    from laufband import Graphband, Task
    from laufband.store.claiming import SQL as CLAIMING
    from laufband.store.ledger import _ANY_PKS

    Graphband([Task(f"t{i}") for i in range(20_000)], db=pg.url(), identifier="W").close()
    assert pg.rows("SELECT relname FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL"
                   " AND relname IN ('tasks', 'edges', 'attempts') ORDER BY relname") == [
        ("attempts",), ("edges",), ("tasks",)]
    with rolled_back(pg) as conn:  # a server's form of the claim
        plan = explain(conn, CLAIMING["claim_and_add"].format(in_pks=_ANY_PKS),
                       {"pks": list(range(5000, 5256)), "now": 0.0, "worker": "W"},
                       analyze=False)
    assert "tasks" in json.dumps(plan), "the plan does not show the tasks: update this test"
    assert not [n for n in nodes(plan[0]["Plan"]) if n.get("Relation Name") == "tasks"
                and n["Node Type"] == "Seq Scan"], json.dumps(plan, indent=1)


def test_statistics_are_not_waited_for(pg, caplog):
    """The ANALYZE after a registration skips a table that another session holds (a
    VACUUM, an index being built: SHARE UPDATE EXCLUSIVE) instead of waiting for it,
    up to the lock timeout (review22: the registering worker stalled, then failed,
    after its registration had committed), and says so in the log."""
    import threading

    import psycopg

    from laufband import Graphband, Task

    Graphband([Task("a")], db=pg.url(), identifier="A").close()
    holder = psycopg.connect(backends._conninfo(pg.url()))
    holder.execute("LOCK TABLE tasks IN SHARE UPDATE EXCLUSIVE MODE")
    done: list[object] = []

    def register() -> None:
        try:
            worker = Graphband([Task("a"), Task("b")], db=pg.url(), identifier="B")
            done.append([t.id for t in worker])
        except Exception as exc:  # reported below
            done.append(exc)

    thread = threading.Thread(target=register)
    thread.start()
    try:
        thread.join(timeout=30)
        assert not thread.is_alive(), "the registering worker waits for the table lock"
    finally:
        holder.rollback()
        holder.close()
        thread.join()
    assert done == [["a", "b"]]
    assert any('skipping analyze of "tasks"' in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_deadlock_is_reported_as_a_conflict(pg):
    """Two transactions that lock two rows in opposite orders: the server rolls one
    back, which laufband reports as a Conflict (a DatabaseError that Store.step answers
    by running the step again alone)."""
    import threading

    from laufband import DatabaseError, Graphband, Task
    from laufband.store.connection import Conflict

    w = Graphband([Task("a"), Task("b")], db=pg.url(), identifier="W",
                  heartbeat_interval=3600, heartbeat_timeout=7200,
                  tqdm_kwargs={"disable": True})
    db = w._store.db
    both = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def lock(first: str, second: str) -> None:
        try:
            with db.translate_errors(), db.engine.begin() as conn:
                for i, task in enumerate((first, second)):
                    conn.exec_driver_sql(f"SELECT 1 FROM tasks WHERE id = '{task}' FOR UPDATE")
                    if not i:
                        both.wait()
        except DatabaseError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=lock, args=order) for order in (("a", "b"), ("b", "a"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert len(errors) == 1 and isinstance(errors[0], Conflict), errors
    assert "deadlock" in str(errors[0])
    w.close()


def test_a_step_beside_others_that_meets_a_deadlock_runs_again_alone(pg, monkeypatch):
    """A step beside others that the server rolled back (Conflict) runs again alone:
    its completion is recorded once, and it claims."""
    from laufband import Graphband, Task
    from laufband.store import attempts
    from laufband.store.connection import Conflict

    real_end, tries = attempts.end, []

    def end(led, worker, finishes):
        tries.append((bool(finishes), led.beside))
        if finishes and led.beside:
            raise Conflict("deadlock detected (made by the test)")
        return real_end(led, worker, finishes)

    monkeypatch.setattr(attempts, "end", end)
    w = Graphband([Task("a"), Task("b")], db=pg.url(), identifier="W", batch_size=1,
                  heartbeat_interval=3600, heartbeat_timeout=7200,
                  tqdm_kwargs={"disable": True})
    assert [t.id for t in w] == ["a", "b"]
    # The second step: beside (rolled back), then alone.
    assert tries[1:3] == [(True, True), (True, False)], tries
    assert pg.rows("SELECT t.id, a.outcome FROM attempts a JOIN tasks t ON t.pk = a.task"
                   " ORDER BY t.id") == [("a", "completed"), ("b", "completed")]
    assert pg.rows("SELECT count(*) FROM events WHERE event = 'fenced'") == [(0,)]
    w.close()


def test_a_map_whose_step_fails_after_its_completions_were_recorded(pg, monkeypatch):
    """A step beside others that claims nothing commits its completions, then runs the
    rest alone; if that fails (a lost connection), the completions stay recorded once:
    the map, which records what it still holds on the way out, does not record them
    again (that would be rejected as a late write: a false warning and history row)."""
    from laufband import DatabaseError, Graphband, Task
    from laufband.store import Store, _Alone

    real, state = Store._step, {"rest": False, "raised": False}

    def step(self, me, finishes, want, cancel, beside=False):
        if not beside and state["rest"] and not state["raised"]:
            state["raised"] = True
            raise DatabaseError("the connection was lost (made by the test)")
        out = real(self, me, finishes, want, cancel, beside)
        state["rest"] = out is _Alone.REST
        return out

    monkeypatch.setattr(Store, "_step", step)
    w = Graphband([Task("a")], db=pg.url(), identifier="W", heartbeat_interval=3600,
                  heartbeat_timeout=7200, tqdm_kwargs={"disable": True})
    with pytest.raises(DatabaseError, match="made by the test"):
        w.map(lambda task: None, threads=1)
    w.close()
    assert state["raised"]
    assert pg.rows("SELECT outcome FROM attempts") == [("completed",)]
    assert pg.rows("SELECT event FROM events ORDER BY id") == [("claimed",), ("completed",)]


def test_a_waiting_worker_hears_of_commits(pg):
    """On PostgreSQL a waiting worker's change mark (the server's form of watching the
    SQLite file) moves with each commit of another worker's write transaction, not with
    a rollback, and not while it does not listen (it stops after a wait)."""
    from laufband import Graphband, Task

    def worker(name):
        return Graphband([Task("x")], db=pg.url(), identifier=name, heartbeat_interval=3600,
                         heartbeat_timeout=7200, tqdm_kwargs={"disable": True})

    a, b = worker("A"), worker("B")
    listener, writer = a._store, b._store

    def commit(fail=False):
        try:
            with writer.db.transaction() as conn:
                conn.exec_driver_sql("SELECT 1")
                if fail:
                    raise RuntimeError("rolled back")
        except RuntimeError:
            assert fail

    def heard_after(before):  # poll with a deadline: notices arrive after the commit
        deadline = time.monotonic() + 10
        while (mark := listener.change_mark(listen=True)) == before:
            assert time.monotonic() < deadline, "a commit was never heard of"
            time.sleep(0.01)
        return mark

    (start,) = listener.change_mark(listen=True)
    assert listener.change_mark(listen=True) == (start,)  # nothing committed
    commit(fail=True)
    commit()
    # Notices arrive in commit order: the commit's is heard, and none came before it.
    assert heard_after((start,)) == (start + 1,)
    assert listener.change_mark() is None  # not waiting: not listening
    commit()
    # Listening again counts as a change (commits meanwhile were not heard): one.
    (again,) = listener.change_mark(listen=True)
    assert again == start + 2
    commit()
    assert heard_after((again,)) == (again + 1,)
    a.close()
    b.close()


def test_steps_notify_the_waiting_workers_only_when_it_concerns_them(pg):
    """A step that ends an attempt and claims the last ready task, and one that ends an
    attempt while others still run and nothing became ready, notify nobody (in the tail
    of a run most workers wait: each notice woke every one of them to read); the step
    that finishes the workflow notifies, and the waiting worker leaves."""
    from laufband import Graphband, Task

    url = pg.url()

    def worker(name):
        return Graphband([Task(f"t{i}") for i in range(3)], db=url, identifier=name,
                         batch_size=1, heartbeat_interval=3600, heartbeat_timeout=7200,
                         tqdm_kwargs={"disable": True})

    a, b = worker("A"), worker("B")
    try:
        notify_when_it_concerns_them(pg, url, a, b)
    finally:
        a.close()
        b.close()
    states = pg.rows("SELECT state, count(*) FROM tasks GROUP BY state")
    assert states == [("completed", 3)], states


def notify_when_it_concerns_them(pg, url, a, b):
    import threading

    import psycopg

    it_a, it_b = iter(a), iter(b)
    next(it_a), next(it_b)  # one task each, one left ready
    raw = sa.engine.make_url(url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(raw, autocommit=True) as listener, \
            psycopg.connect(raw, autocommit=True) as marker:
        listener.execute("LISTEN laufband")
        (marker_pid,) = marker.execute("SELECT pg_backend_pid()").fetchone()

        def notices_up_to_marker() -> list[int]:
            """The backends that notified, in commit order, up to a marker's notice."""
            marker.execute("SELECT pg_notify('laufband', '')")
            pids: list[int] = []
            for notice in listener.notifies(timeout=30):
                pids.append(notice.pid)
                if notice.pid == marker_pid:
                    return pids
            raise AssertionError(f"the marker's notice never came: {pids}")

        next(it_b)  # B ends its attempt and claims the last ready task
        assert notices_up_to_marker() == [marker_pid]
        # A ends its attempt; nothing is ready, B's task runs: A waits (in a thread).
        ended = threading.Event()
        waiter = threading.Thread(target=lambda: (list(it_a), ended.set()))
        waiter.start()
        try:
            deadline = time.monotonic() + 30
            while pg.rows("SELECT leave_as FROM workers WHERE id = 'A'") != [("offline",)]:
                assert time.monotonic() < deadline, "A never began to wait"
                time.sleep(0.01)
            assert notices_up_to_marker() == [marker_pid]
            assert list(it_b) == []  # B ends the last task: the workflow is over
            pids = notices_up_to_marker()
            assert len(pids) >= 2 and marker_pid not in pids[:-1], pids
        finally:
            waiter.join(timeout=60)
        assert ended.is_set() and not waiter.is_alive()


SHARED_SLOTS_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from laufband import Graphband, Task
    from laufband.store import Store

    url, name, meet, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    real, first = Store._ledger, [True]

    def ledger(self, cancel=None, beside=False, **kw):  # all first steps at once
        if beside and first and first.pop():
            (meet / name).touch()
            deadline = time.monotonic() + 60
            while len(list(meet.iterdir())) < n and time.monotonic() < deadline:
                time.sleep(0.002)
        return real(self, cancel, beside, **kw)

    Store._ledger = ledger
    worker = Graphband([Task("t", max_parallel_workers=n)], db=url, identifier=name,
                       tqdm_kwargs={"disable": True})
    for task in worker:
        print(task.id, flush=True)
        time.sleep(1)
""")


def test_side_by_side_first_steps_take_every_slot_of_a_shared_task(pg, tmp_path):
    """4 workers' first steps at once, one task with 4 slots: a step beside others that
    finds nothing (the row is locked by another claim, SKIP LOCKED) must not decide to
    leave, as its counts show the task ready: each worker takes a slot."""
    script = tmp_path / "slots.py"
    script.write_text(SHARED_SLOTS_SCRIPT)
    meet = tmp_path / "meet"
    meet.mkdir()
    url = pg.url()
    procs = [subprocess.Popen([sys.executable, str(script), url, f"W{i}", str(meet), "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    with reaped(procs):
        outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e for _, e in outs]
    assert [o.split() for o, _ in outs] == [["t"]] * 4, outs
    assert pg.rows("SELECT count(*) FROM attempts WHERE outcome = 'completed'") == [(4,)]


def test_map_stops_listening_when_it_returns(pg):
    """A map with a free slot listens for commits; when it returns, its listening
    connection is closed (a listener nobody reads holds back the server's NOTIFY queue
    for every database)."""
    from laufband import Graphband, Task

    w = Graphband([Task("a"), Task("b", dependencies={"a"})], db=pg.url(), identifier="M",
                  heartbeat_interval=3600, heartbeat_timeout=7200,
                  tqdm_kwargs={"disable": True})
    w.map(lambda task: time.sleep(0.5 if task.id == "a" else 0), threads=2)
    assert w._store.db._notices is not None, "the map never listened"
    name = f"laufband notices pid {os.getpid()}"
    assert pg.rows("SELECT state FROM pg_stat_activity WHERE application_name = ?",
                   (name,)) == []
    w.close()


MAP_WAITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from laufband import Graphband, Task
    url, meet = sys.argv[1], Path(sys.argv[2])
    tasks = [Task("long", requirements={"a"}), Task("x", requirements={"b"}),
             Task("y", dependencies={"x"}, requirements={"a"})]
    w = Graphband(tasks, db=url, identifier="A", labels={"a"}, heartbeat_interval=3600,
                  heartbeat_timeout=7200, tqdm_kwargs={"disable": True})

    def run(task):
        if task.id == "y":
            (meet / "y").touch()
            return
        (meet / "long").touch()
        deadline = time.monotonic() + 20
        while not (meet / "y").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        (meet / "long-saw-y").write_text(str((meet / "y").exists()))

    w.map(run, threads=2)
""")
HOLDER = textwrap.dedent("""
    import sys
    from laufband import Graphband, Task
    url = sys.argv[1]
    tasks = [Task("long", requirements={"a"}), Task("x", requirements={"b"}),
             Task("y", dependencies={"x"}, requirements={"a"})]
    w = Graphband(tasks, db=url, identifier="B", labels={"b"}, heartbeat_interval=3600,
                  heartbeat_timeout=7200, tqdm_kwargs={"disable": True})
    with w.db_lock:  # its commits hold the session lock: they notify nobody
        for task in w:
            pass
""")


def test_a_map_with_a_free_slot_sees_a_commit_that_notified_nobody(pg, tmp_path):
    """A commit made under worker.db_lock sends no notice; a map waiting with a free
    slot still reads the database now and then, so the task that commit made ready
    starts while the map's other task still runs (not at the next heartbeat)."""
    meet = tmp_path / "meet"
    meet.mkdir()
    (tmp_path / "a.py").write_text(MAP_WAITER)
    (tmp_path / "b.py").write_text(HOLDER)
    url = pg.url()
    a = subprocess.Popen([sys.executable, str(tmp_path / "a.py"), url, str(meet)],
                         stderr=subprocess.PIPE, text=True)
    b = None
    try:
        deadline = time.monotonic() + 60
        while not (meet / "long").exists():
            assert a.poll() is None and time.monotonic() < deadline, a.stderr.read()
            time.sleep(0.01)
        b = subprocess.run([sys.executable, str(tmp_path / "b.py"), url],
                           capture_output=True, text=True, timeout=60)
        assert b.returncode == 0, b.stderr
        assert a.wait(timeout=60) == 0, a.stderr.read()
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert (meet / "long-saw-y").read_text() == "True"


IN_TIME_CLAIMER = textwrap.dedent("""
    import io, logging, os, sys
    from laufband import Graphband, Task
    from laufband.store import Want
    url, name, n, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    log = io.StringIO()
    logging.getLogger("laufband").addHandler(logging.StreamHandler(log))
    w = Graphband([Task(str(i)) for i in range(n)], db=url, identifier=name,
                  tqdm_kwargs={"disable": True}, batch_size=1)
    if steps:
        it = iter(w)
        next(it)
        assert w._me.deadline is not None  # claims by the walltime find
        for _ in range(steps):  # steps that only claim: side by side
            w._store.step(w._me, [], Want(2, 2))
    print(log.getvalue().count("found ready were claimed"), flush=True)
    os._exit(0)  # what it claimed stays claimed: the checks read the database
""")


def test_walltime_claims_side_by_side_find_no_task_just_claimed(pg, tmp_path):
    """Workers whose allocation ends claim through the walltime find, locking what it
    finds; a row another claim committed meanwhile is locked in its new version, and the
    find checks it again (state, a free slot): no task is found that is no longer ready
    (the claim's guard would refuse it, with a warning), none is claimed twice."""
    script = tmp_path / "claimer.py"
    script.write_text(IN_TIME_CLAIMER)
    url, n = pg.url(), 6000
    env = {**os.environ, "SLURM_JOB_ID": "4242",
           "SLURM_JOB_END_TIME": str(int(time.time()) + 7200)}
    subprocess.run([sys.executable, str(script), url, "init", str(n), "0"], env=env,
                   check=True, capture_output=True, timeout=120)  # registers the graph
    procs = [subprocess.Popen([sys.executable, str(script), url, f"W{i}", str(n), "150"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(8)]
    with reaped(procs):
        outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [e for _, e in outs]
    assert [int(o) for o, _ in outs] == [0] * 8, outs  # warnings per worker
    assert pg.rows("SELECT count(*) FROM (SELECT task FROM attempts GROUP BY task"
                   " HAVING count(*) > 1) twice") == [(0,)]
    assert pg.rows("SELECT count(*) FROM attempts") == pg.rows(
        "SELECT count(*) FROM tasks WHERE state = 'running'")


@pytest.mark.parametrize("seen", [True, False], ids=["seen-at-checkout", "too-recent"])
def test_connections_the_server_ended_while_idle_are_replaced(pg, monkeypatch, seen):
    """A server restart, ``idle_session_timeout`` or ``pg_terminate_backend`` ends a
    worker's idle connections: its next transaction opens new ones instead of failing.
    (Not by a ping on every use of a pooled connection: that costs a round trip each.)
    ``too-recent``: the checkout does not see it yet (the server's farewell still on its
    way, review25): the transaction's first statement fails, and runs again on a new
    connection."""
    from laufband import Graphband, Task
    from laufband.store import connection

    if not seen:
        monkeypatch.setattr(connection, "_readable", lambda _conn: False)

    w = Graphband([Task(f"t{i}") for i in range(4)], db=pg.url(), identifier="W",
                  batch_size=1, heartbeat_interval=3600, heartbeat_timeout=7200,
                  tqdm_kwargs={"disable": True})
    it = iter(w)
    got = [next(it).id]
    mine = "SELECT pid FROM pg_stat_activity WHERE application_name = ?"
    name = (f"laufband pid {os.getpid()}",)
    before = {pid for (pid,) in pg.rows(mine, name)}
    assert before, "the worker holds no connection"
    for pid in before:
        pg._admin(f"SELECT pg_terminate_backend({pid})")
    wait_until(lambda: not before & {pid for (pid,) in pg.rows(mine, name)},
               timeout=30, what="the server to end the worker's connections")
    got += [task.id for task in it]
    assert sorted(got) == ["t0", "t1", "t2", "t3"]
    assert pg.rows("SELECT outcome, count(*) FROM attempts GROUP BY outcome") == [
        ("completed", 4)]
    w.close()


def test_a_step_beside_others_lets_go_of_the_counts_as_it_commits(pg, monkeypatch):
    """Every step locks the counts rows last and holds them to its commit: a step
    beside others sends the lock, the bump, what it decides from them and the commit
    in one round trip, so when its worker hears back the counts are free again (they
    were held for three round trips, a queue every step of 32 workers waited in)."""
    import psycopg

    from laufband import Graphband, Task
    from laufband.store.ledger import Ledger

    checked: list[bool] = []
    real = Ledger.flush

    def flush(self):
        bumped = any(self._deltas.values())
        real(self)
        if self.beside and bumped:
            with psycopg.connect(backends._conninfo(pg.url()), autocommit=True) as other:
                try:
                    other.execute("SELECT 1 FROM counts FOR UPDATE NOWAIT")
                    checked.append(True)
                except psycopg.errors.LockNotAvailable:
                    checked.append(False)

    monkeypatch.setattr(Ledger, "flush", flush)
    worker = Graphband([Task(str(i)) for i in range(4)], db=pg.url(), identifier="W",
                       batch_size=1, tqdm_kwargs={"disable": True})
    assert [task.id for task in worker] == ["0", "1", "2", "3"]
    assert len(checked) >= 3 and all(checked), checked


@pytest.mark.parametrize("counts, maybe, touched, notified, released", [
    # (reqset 1 by state), an attempt ended, the requirement sets it changed
    ({"pending": 1, "completed": 1}, False, [1], False, False),
    ({"completed": 2}, False, [1], True, True),  # the workflow is over
    ({"failed": 1, "completed": 1}, False, [1], False, False),  # Python decides
    ({"ready": 1, "running": 1}, True, [1], True, False),  # a slot or resources freed
    ({"pending": 1, "completed": 1}, True, [1], True, False),  # nothing runs any more
    ({"pending": 1, "running": 1}, True, [1], False, False),
    ({"completed": 1, "running": 1}, True, [2], True, False),  # reqset 2 is done
])
def test_what_a_step_beside_others_decides_from_the_counts(pg, counts, maybe, touched,
                                                           notified, released):
    """SQL["settle"], what a step beside others decides in SQL once it has bumped the
    counts: the waiting workers are released when no task is unfinished (nor failed:
    Python decides that from the budgets), and told when that holds, or when an
    attempt ended and Ledger.wakes asks of the counts what Python asks."""
    from laufband import Graphband, Task
    from laufband.store.ledger import SQL, Ledger

    worker = Graphband([Task("a"), Task("b", requirements={"gpu"})], db=pg.url(),
                       identifier="W", labels={"gpu"})
    worker.close()
    with rolled_back(pg) as conn:
        reqsets = [r for (r,) in conn.execute(sa.text(
            "SELECT DISTINCT reqset FROM tasks ORDER BY reqset"))]
        conn.execute(sa.text("UPDATE counts SET n = 0"))
        for state, n in counts.items():
            conn.execute(sa.text("UPDATE counts SET n = :n WHERE reqset = :r AND state = :s"),
                         {"n": n, "r": reqsets[0], "s": state})
        conn.execute(sa.text("UPDATE workers SET state = 'busy', leave_as = 'offline'"))
        led = Ledger(conn, 5.0)
        ids = [reqsets[r - 1] for r in touched]
        led._deltas = {(r, "completed"): 1 for r in ids}
        sent = led.all(SQL["settle"], {"maybe": maybe, "touched": ids, "now": 5.0})
        state = conn.execute(sa.text("SELECT state FROM workers")).scalar()
    assert (bool(sent), state == "offline") == (notified, released)
    if maybe and not released:  # the same rule as Ledger._wakes_after
        assert led._wakes_after() == notified
