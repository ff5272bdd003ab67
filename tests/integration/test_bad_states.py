"""A database that goes bad under running workers gives a clear laufband error, not a
traceback from SQLAlchemy or flufl.lock: deleted, truncated, corrupted, on a read-only
file system, its folder read-only (no lock file), the disk full.

CI runs as root, for whom permissions do not stop writes: read-only is a read-only
(bind) mount, and a full disk a small tmpfs. Each test makes and removes its mounts.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from conftest import Faults, wait_until

pytestmark = [pytest.mark.processes, pytest.mark.nfs_locking]


@pytest.fixture
def mount():
    """mount(*options, source, target); everything is unmounted at the end. (Request it
    before `workers`, so that the workers are reaped first.) Only root can mount: CI
    runs as root and runs these; for anyone else they are skipped."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make read-only and full file systems (mount); CI runs "
                    "these as root")
    made: list[Path] = []

    def _mount(*args: str, target: Path) -> None:
        if not target.exists():
            target.mkdir()
        subprocess.run(["mount", *args, str(target)], check=True, capture_output=True)
        made.append(target)

    yield _mount
    for target in reversed(made):
        subprocess.run(["umount", "-l", str(target)], check=False)


def assert_clear_error(stderr: str, *expected: str) -> None:
    """One traceback, ending in a DatabaseError that says what happened."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    for line in reversed(stderr.strip().splitlines()):  # skip trailing log lines
        if line.startswith("laufband.errors."):
            last = line
            break
    assert last.startswith("laufband.errors.DatabaseError: "), stderr
    for text in expected:
        assert text in last, stderr
    assert "sqlalchemy" not in stderr.lower(), stderr
    assert "flufl" not in stderr, stderr
    assert stderr.count("Traceback") == 1, stderr


def break_during_a_task(workers, faults: Faults, damage) -> str:
    """Run one worker into task t0, damage things, let it go on: its error output."""
    [a] = faults.start(hold="t0")
    wait_until(lambda: faults.started("t0"), what="the worker inside t0")
    damage()
    faults.release()
    a.wait(timeout=60)
    assert a.returncode == 1, workers.stderr_of(a)
    return workers.stderr_of(a)


def test_database_deleted_while_running(workers):
    faults = Faults(workers, "flat:2")
    err = break_during_a_task(workers, faults, lambda: faults.db.unlink())
    assert_clear_error(err, "was deleted or moved away while this worker was using it")


@pytest.mark.parametrize("keep", [0, 0.5], ids=["to-nothing", "to-half"])
def test_database_truncated_while_running(workers, keep):
    faults = Faults(workers, "flat:2")

    def truncate():
        os.truncate(faults.db, int(faults.db.stat().st_size * keep) // 4096 * 4096)

    err = break_during_a_task(workers, faults, truncate)
    assert_clear_error(err, str(faults.db))
    assert ("lacks laufband's tables" in err if keep == 0 else "is corrupt" in err), err


def test_database_corrupted_while_running(workers):
    faults = Faults(workers, "flat:2")

    def scribble():
        faults.db.write_bytes(os.urandom(faults.db.stat().st_size))

    err = break_during_a_task(workers, faults, scribble)
    assert_clear_error(err, "is not a laufband SQLite database or is corrupt")


def test_database_on_a_read_only_file_system(mount, workers):
    real, ro = workers.folder / "real", workers.folder / "ro"
    real.mkdir()
    faults = Faults(workers, "flat:2")
    [first] = faults.start(db=f"sqlite:///{real / 'graph.sqlite'}")  # a finished run
    first.wait(timeout=30)
    assert first.returncode == 0
    mount("--bind", str(real), target=ro)
    mount("-o", "remount,bind,ro", target=ro)
    [a] = faults.start(db=f"sqlite:///{ro / 'graph.sqlite'}")
    a.wait(timeout=30)
    assert a.returncode == 1
    assert_clear_error(workers.stderr_of(a), f"{ro / 'graph.sqlite'} is on a read-only file")


def test_lock_folder_becomes_read_only_while_running(mount, workers):
    """The database file stays writable but its folder does not (no lock file, no
    journal): the running worker stops with a clear error, a new one refuses to start."""
    real, shared = workers.folder / "real", workers.folder / "shared"
    real.mkdir()
    (real / "graph.sqlite").touch()  # an empty file is a new database to SQLite
    mount("--bind", str(real), target=shared)
    mount("--bind", str(real / "graph.sqlite"), target=shared / "graph.sqlite")
    faults = Faults(workers, "flat:2")
    db = f"sqlite:///{shared / 'graph.sqlite'}"

    def folder_read_only():
        mount("-o", "remount,bind,ro", target=shared)

    [a] = faults.start(db=db, hold="t0")
    wait_until(lambda: faults.started("t0"), what="the worker inside t0")
    folder_read_only()
    assert os.access(shared / "graph.sqlite", os.W_OK)  # the file itself is writable
    faults.release()
    a.wait(timeout=60)
    assert a.returncode == 1
    assert_clear_error(workers.stderr_of(a), f"Cannot create the lock file {shared}",
                       "read-only file system")
    [b] = faults.start(db=db)
    b.wait(timeout=30)
    assert b.returncode == 1
    assert_clear_error(workers.stderr_of(b), f"The folder {shared} of the database",
                       "read-only file system")


@pytest.mark.parametrize("lock_beside", [True, False], ids=["lock-beside", "lock-elsewhere"])
def test_disk_full_while_running(mount, workers, lock_beside):
    """With the lock file beside the database, creating it fails first; with the lock
    elsewhere (db_lock=), SQLite's journal write does. Both say the disk is full."""
    disk = workers.folder / "disk"
    mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", target=disk)
    faults = Faults(workers, "flat:2")
    options = {} if lock_beside else {"db_lock": workers.folder / "graph.lock"}

    def fill_disk():
        with open(disk / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC

    [a] = faults.start(db=f"sqlite:///{disk / 'graph.sqlite'}", hold="t0", **options)
    wait_until(lambda: faults.started("t0"), what="the worker inside t0")
    fill_disk()
    faults.release()
    a.wait(timeout=60)
    assert a.returncode == 1
    assert_clear_error(workers.stderr_of(a), "disk is full")
