from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
WORKER = HERE / "worker.py"
FAULT_WORKER = HERE / "fault_worker.py"  # side effects keyed by attempt, fault hooks
sys.path.insert(0, str(HERE))

import backends  # noqa: E402 - tests/ is on the path only from here on
from graphs import build  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder with no LAUFBAND_* variables leaking in."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("LAUFBAND_"):
            monkeypatch.delenv(name)


@dataclasses.dataclass
class Run:
    records: list[dict]
    exits: list[dict]
    returncodes: list[int]
    stderr: list[str]
    failures: list[dict] = dataclasses.field(default_factory=list)  # bodies that raised

    def by_task(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for rec in self.records:
            out.setdefault(rec["id"], []).append(rec)
        return out


class Workers:
    """Starts real worker processes and always reaps them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        self.outs: list[Path] = []

    def start(self, graph: str, n: int = 1, *, db: str | None = None, env: dict | None = None,
              script: Path = WORKER, cwd: Path | None = None,
              **options: object) -> list[subprocess.Popen]:
        db = db or backends.current.url(self.folder / "graph.sqlite")
        started = []
        for _ in range(n):
            out = self.folder / f"worker{len(self.procs)}.jsonl"
            cmd = [sys.executable, str(script), "--db", db, "--graph", graph, "--out", str(out)]
            for key, value in options.items():
                cmd += [f"--{key.replace('_', '-')}", str(value)]
            # stderr goes to a file: a full pipe could stall a worker that others wait for
            with open(out.with_suffix(".err"), "w") as err:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                        env={**os.environ, **(env or {})},
                                        cwd=cwd or self.folder)
            self.procs.append(proc)
            self.outs.append(out)
            started.append(proc)
        return started

    def stderr_of(self, proc: subprocess.Popen) -> str:
        return self.outs[self.procs.index(proc)].with_suffix(".err").read_text()

    def wait(self, timeout: float = 120.0) -> Run:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                self.kill_all()
                msg = f"worker {proc.pid} did not exit within {timeout} s"
                raise AssertionError(msg) from None
        stderr = [out.with_suffix(".err").read_text() for out in self.outs]
        records, exits, failures = [], [], []
        for out in self.outs:
            if out.exists():
                for line in out.read_text().splitlines():
                    rec = json.loads(line)
                    if "failing" in rec:
                        failures.append(rec)
                    else:
                        (exits if "exit" in rec else records).append(rec)
        return Run(records, exits, [p.returncode for p in self.procs], stderr, failures)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    w.kill_all()


def assert_exactly_once(run: Run, ids) -> None:
    by_task = run.by_task()
    missing = set(ids) - by_task.keys()
    twice = {tid: len(recs) for tid, recs in by_task.items() if len(recs) > 1}
    unknown = by_task.keys() - set(ids)
    assert not missing, f"{len(missing)} tasks never ran, e.g. {sorted(missing)[:5]}"
    assert not twice, f"tasks ran more than once: {dict(list(twice.items())[:5])}"
    assert not unknown, f"unknown tasks ran: {sorted(unknown)[:5]}"


def assert_dependency_order(run: Run, tasks) -> None:
    by_task = {tid: recs[0] for tid, recs in run.by_task().items()}
    for task in tasks:
        for dep in task.dependencies:
            assert by_task[dep]["end"] < by_task[task.id]["start"], (
                f"{task.id} started before its dependency {dep} finished"
            )


#: Small heartbeats (the issue: 1-2 s); detection of a dead worker takes 3-4 s.
FAST = {"LAUFBAND_HEARTBEAT_INTERVAL": "1", "LAUFBAND_HEARTBEAT_TIMEOUT": "3"}


class Faults:
    """Fault workers over one database, plus what they left behind."""

    def __init__(self, workers, graph: str, **env: str) -> None:
        self.workers = workers
        self.graph = graph
        self.db = workers.folder / "graph.sqlite"
        self.effects = workers.folder / "effects"
        self.env = {**FAST, **env}

    def start(self, n: int = 1, **options: object):
        return self.workers.start(self.graph, n, script=FAULT_WORKER, env=self.env,
                                  effects=self.effects, **options)

    def started(self, task: str) -> list[str]:
        """Markers ``task@attempt@pid`` of bodies of ``task`` that began."""
        folder = self.effects / "started"
        return sorted(p.name for p in folder.glob(f"{task}@*")) if folder.exists() else []

    def release(self) -> None:
        (self.effects / "release").touch()

    def events(self, task: str) -> list[tuple[str, int, str]]:
        return query(self.db, "SELECT event, attempt, worker FROM events JOIN tasks"
                     " ON tasks.pk = events.task WHERE tasks.id = ? ORDER BY events.id",
                     (task,))

    def worker_state(self, identifier: str) -> str | None:
        rows = query(self.db, "SELECT state FROM workers WHERE id = ?", (identifier,))
        return rows[0][0] if rows else None

    def state_counts(self) -> dict[str, int]:
        """Tasks per state ({} until the database exists)."""
        return dict(peek(self.db, "SELECT state, count(*) FROM tasks GROUP BY state") or [])

    def live_claims(self) -> int:
        """Live attempts (-1 until the database exists)."""
        rows = peek(self.db, "SELECT count(*) FROM attempts WHERE ended_at IS NULL")
        return -1 if rows is None else rows[0][0]

    def assert_consistent(self) -> None:
        """Every task completed once, by its latest attempt, whose side effect exists
        exactly once; the database is intact and its bookkeeping matches the rows."""
        ids = {t.id for t in build(self.graph)}
        if backends.current.sqlite:
            assert query(self.db, "PRAGMA integrity_check") == [("ok",)]
            assert not Path(f"{self.db}-journal").exists()
        states = dict(query(self.db, "SELECT id, state FROM tasks"))
        assert states == dict.fromkeys(ids, "completed")
        assert query(self.db, "SELECT count(*) FROM attempts WHERE ended_at IS NULL") == [(0,)]
        # Each task's count of running attempts (which the claim's find relies on)
        # matches its live attempts.
        drift = query(self.db, "SELECT id, running FROM tasks WHERE running != (SELECT"
                      " count(*) FROM attempts WHERE attempts.task = tasks.pk"
                      " AND attempts.ended_at IS NULL)")
        assert not drift, (f"{len(drift)} tasks whose running count is not their live "
                           f"attempts, e.g. {drift[:5]}")
        latest = dict(query(self.db, "SELECT id, attempts FROM tasks"))
        completions = query(self.db, "SELECT tasks.id, events.attempt FROM events JOIN tasks"
                            " ON tasks.pk = events.task WHERE event = 'completed'")
        assert sorted(tid for tid, _ in completions) == sorted(ids), "one completion each"
        stale = {tid: (a, latest[tid]) for tid, a in completions if a != latest[tid]}
        assert not stale, f"completions of attempts that were not the latest: {stale}"
        # The counts table (what progress and waiting read) matches the task rows.
        counted = {s: n for s, n in query(self.db, "SELECT state, sum(n) FROM counts"
                                          " GROUP BY state") if n}
        assert counted == dict(query(self.db, "SELECT state, count(*) FROM tasks"
                                     " GROUP BY state"))
        done = {p.name for p in (self.effects / "done").iterdir()}
        doubles = sorted(name for name in done if ".DOUBLE." in name)
        assert not doubles, f"side effects committed twice for one attempt: {doubles}"
        missing = {f"{tid}@{a}" for tid, a in completions} - done
        assert not missing, f"completed attempts without their side effect: {missing}"
        for name in done:  # no side effect of an attempt that was never claimed
            tid, attempt = name.split("@")
            assert int(attempt) <= latest[tid], name


def wait_until(condition, timeout: float = 60.0, interval: float = 0.02, what: str = ""):
    """Poll ``condition`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


def query(db_file: Path, sql: str, params=()) -> list[tuple]:
    """Read the database directly (for checks): the file ``db_file``, or on PostgreSQL
    the test database made for that name. Any error raises: a check must never pass
    because the database is not there (yet)."""
    return backends.current.rows(sql, params, name=db_file)


def peek(db_file: Path, sql: str, params=()) -> list[tuple] | None:
    """``query`` for conditions polled while workers start: None until the database and
    its tables exist, and while a worker killed inside a transaction left a hot journal
    (a read-only connection cannot roll it back; the next writer does, once it broke
    the dead holder's lock: lifetime + 5 s)."""
    try:
        return query(db_file, sql, params)
    except AssertionError:
        return None
    except Exception as exc:
        if (backends.current.missing_table(exc)
                or getattr(exc, "sqlite_errorname", "") == "SQLITE_READONLY_ROLLBACK"):
            return None
        raise


def waiting_workers(db_file: Path) -> int:
    """Workers that wait for others (their row names the state they leave in; 0 until
    the database exists), for conditions polled while workers start."""
    found = peek(db_file, "SELECT count(*) FROM workers WHERE leave_as IS NOT NULL")
    return found[0][0] if found else 0


# ------------------------------------------------------------------ services
#: Set by scripts/postgres-up.sh and scripts/slurm-up.sh (read here, before the autouse
#: fixture above clears LAUFBAND_* for each test). In CI (LAUFBAND_REQUIRE_SERVICES=1)
#: a test that needs a missing service fails instead of skipping.
SERVICES = {
    "postgres": os.environ.get("LAUFBAND_TEST_POSTGRES", ""),
    "slurm": os.environ.get("LAUFBAND_TEST_SLURM", ""),
}
REQUIRE_SERVICES = os.environ.get("LAUFBAND_REQUIRE_SERVICES") == "1"


def need(service: str) -> str:
    """The service's address (a URL, or "1"), or skip (fail in CI) with the way to
    start it."""
    value = SERVICES[service]
    if not value:
        msg = (f"no {service} here: `source <(scripts/{service}-up.sh)` starts one and "
               f"sets LAUFBAND_TEST_{service.upper()} (CI does)")
        if REQUIRE_SERVICES:
            pytest.fail(msg)
        pytest.skip(msg)
    return value


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
#: SQLite with a connection per transaction holding SQLite's whole lock, as workers on
#: NFS run (LAUFBAND_SQLITE_LOCKING=exclusive; connection.SQLITE_LOCKING).
EXCLUSIVE = "sqlite-exclusive"


def pytest_generate_tests(metafunc):
    """Tests marked ``backends`` (or asking for ``backend``) run on SQLite and on
    PostgreSQL; those marked ``nfs_locking`` also on SQLite as on NFS."""
    if metafunc.definition.get_closest_marker("sqlite_only") is not None:
        return  # about the file itself (permissions, journal, lock file)
    nfs = metafunc.definition.get_closest_marker("nfs_locking") is not None
    if ((nfs or metafunc.definition.get_closest_marker("backends") is not None)
            and "backend" not in metafunc.fixturenames):
        metafunc.fixturenames.append("backend")
    if "backend" in metafunc.fixturenames:
        kinds = BACKENDS
        if nfs:
            both = metafunc.definition.get_closest_marker("backends") is not None
            kinds = ["sqlite", EXCLUSIVE, *(BACKENDS[1:] if both else [])]
        metafunc.parametrize("backend", kinds, indirect=True)


@pytest.fixture
def backend(request, monkeypatch):
    """The backend of this test (``backends.current`` while it runs); its PostgreSQL
    databases are dropped afterwards."""
    kind = getattr(request, "param", "sqlite")
    chosen = backends.Backend(kind, SERVICES["postgres"]) if kind != "sqlite" \
        else backends.SQLITE
    if kind == EXCLUSIVE:  # for the workers this test starts, and its own stores
        monkeypatch.setenv("LAUFBAND_SQLITE_LOCKING", "exclusive")
    backends.current = chosen
    try:
        yield chosen
    finally:
        backends.current = backends.SQLITE
        if not chosen.sqlite:
            chosen.drop_all()


@pytest.fixture(autouse=True)
def _services(request):
    for service in SERVICES:
        if request.node.get_closest_marker(service) is not None:
            need(service)
    if (request.node.get_closest_marker("backends") is not None
            or request.node.get_closest_marker("nfs_locking") is not None):
        request.getfixturevalue("backend")  # set backends.current for the whole test
