"""SQLite's own lock on a network file system (``LAUFBAND_SQLITE_LOCKING``): which
protocol a worker uses for a file, and the checks that keep one protocol per process.
The connections themselves are made in connection.py (``Database._exclusive_engine``).
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import typing as t
import urllib.parse

import sqlalchemy as sa

from laufband.errors import ConfigError

log = logging.getLogger(__name__)

#: How a worker takes SQLite's own lock (``LAUFBAND_SQLITE_LOCKING``). ``normal``:
#: pooled connections and SQLite's lock protocol, 9 lock calls per transaction (3 to
#: read, 1 to write, 2 to commit, 3 to let go), the fastest on a local disk. ``exclusive``:
#: a connection per transaction (and per read) through SQLite's ``unix-excl`` VFS, which
#: takes the whole lock in one call at its first statement and lets go when the file
#: closes: 1 lock call plus the file's open and close, 6 fewer round trips to an NFS
#: server per transaction, for about half a millisecond of CPU to open the connection
#: (SCALING_ANALYSIS.md, 'NFS'). ``auto`` (default): ``exclusive`` on a network file
#: system (/proc/self/mountinfo), else ``normal``. Both protocols exclude each other
#: correctly, so workers that chose differently can share a file.
SQLITE_LOCKING = ("auto", "exclusive", "normal")
#: File systems whose every lock call and open is a round trip to a server.
NETWORK_FILE_SYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
    "glusterfs", "fuse.glusterfs", "fuse.sshfs", "fuse.ceph-fuse", "9p", "afs", "ocfs2",
    "gfs2"})


def file_system_type(path: str, mountinfo: str | None = None) -> str | None:
    """The type of the file system that holds ``path`` (``nfs4``, ``ext4``...), from
    /proc/self/mountinfo (Linux; ``mountinfo``: its text, for tests); None where it
    cannot tell."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mountinfo.splitlines():
        fields = line.split()
        try:  # ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - TYPE ...
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
            fstype = fields[fields.index("-") + 1]
        except (IndexError, ValueError):
            continue
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # the last of equal ones is on top
            best, kind = point, fstype
    return kind


def sqlite_locking(path: str, journal_mode: str, env: t.Mapping[str, str] = os.environ
                   ) -> str:
    """``exclusive`` or ``normal`` for the SQLite file ``path`` (SQLITE_LOCKING)."""
    from laufband import config  # here: config imports the store (connection.py)

    var = "LAUFBAND_SQLITE_LOCKING"
    value = config.choice_from_environment(
        var, SQLITE_LOCKING, "auto", env,
        " (auto: exclusive on a network file system, else normal)")
    if journal_mode == "wal":
        if value == "exclusive":
            raise ConfigError(
                f"{var}=exclusive cannot be used with journal_mode='wal' (WAL needs "
                "memory shared by the processes of one host, and a connection that stays "
                "open): use journal_mode='delete' (on NFS), or unset the variable.")
        return "normal"
    if value == "auto":
        folder = os.path.dirname(os.path.abspath(path))
        return "exclusive" if file_system_type(folder) in NETWORK_FILE_SYSTEMS \
            else "normal"
    return value


def sqlite_uri(url: str) -> tuple[str, dict[str, list[str]]]:
    """The SQLite URI filename (``file:...``) that the sqlite URL ``url`` opens, and the
    parameters in it (``mode``, ``vfs``...)."""
    parsed = sa.engine.make_url(url)
    [name], kwargs = parsed.get_dialect()().create_connect_args(parsed)
    if not (kwargs.get("uri") and name.startswith("file:")):
        name = f"file:{urllib.parse.quote(name)}"  # a plain file name
    return name, urllib.parse.parse_qs(urllib.parse.urlsplit(name).query)


def is_wal_file(path: str) -> bool:
    """Is the SQLite file at ``path`` in WAL mode (its header's format versions are 2)?
    False for a missing or empty file."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return False
    return len(header) == 20 and header[18:20] == b"\x02\x02"


#: The protocol each SQLite file is used with in this process, under each name of it
#: (its real path, and its device and inode once it exists). One only: unix-excl's lock
#: is the process's, and an unlock by a connection of SQLite's usual protocol in the
#: same process lets it go under the others.
_PROTOCOLS: dict[t.Hashable, str] = {}
#: laufband's connections open in this process, per file (its real path: a file a
#: worker is about to create has no inode yet): the foreign-hold check looks only when
#: there are none.
_OPEN: dict[str, int] = {}
_REGISTRY_LOCK = threading.Lock()


def _keys(path: str) -> list[t.Hashable]:
    keys: list[t.Hashable] = [os.path.realpath(path)]
    try:
        st = os.stat(path)
    except OSError:
        return keys
    return [*keys, (st.st_dev, st.st_ino)]  # also through a bind mount or hard link


def one_protocol(path: str, wanted: str, first: t.Callable[[str], str]) -> str:
    """The protocol for ``path`` in this process: the one chosen for it here before
    (a later choice that differs is logged and not followed), else ``first(wanted)``,
    which may open the file: it runs before any connection of this process to it (an
    open and close of the file would let go this process's lock on it)."""
    keys = _keys(path)
    with _REGISTRY_LOCK:
        known = next((_PROTOCOLS[k] for k in keys if k in _PROTOCOLS), None)
        chosen = first(wanted) if known is None else known
        for key in keys:
            _PROTOCOLS.setdefault(key, chosen)
    if known is not None and known != wanted:
        log.warning("laufband: %s is already used with SQLite's %s locking in this "
                    "process; the %s locking chosen now is not used, since both in one "
                    "process would let SQLite's lock go (LAUFBAND_SQLITE_LOCKING)",
                    path, known, wanted)
    return chosen


def counted_connection(path: str) -> type[sqlite3.Connection]:
    """A sqlite3 connection class that counts itself open (for ``laufband_open``)."""
    key = os.path.realpath(path)

    class Counted(sqlite3.Connection):
        def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
            super().__init__(*args, **kwargs)
            self._counted = True
            _count(key, +1)

        def close(self) -> None:
            try:
                super().close()
            finally:
                if self.__dict__.pop("_counted", False):
                    _count(key, -1)

    return Counted


def _count(key: str, delta: int) -> None:
    with _REGISTRY_LOCK:
        _OPEN[key] = _OPEN.get(key, 0) + delta


def laufband_open(path: str) -> int:
    """laufband's connections to ``path`` open in this process now."""
    with _REGISTRY_LOCK:
        return _OPEN.get(os.path.realpath(path), 0)


def foreign_hold(path: str, locks: str | None = None) -> bool:
    """Does this process hold a POSIX lock on the file ``path`` (Linux: /proc/locks;
    ``locks``: its text, for tests)? Asked when no connection of laufband's to it is
    open here: then another one (a user's sqlite3 connection) keeps unix-excl's lock."""
    try:
        st = os.stat(path)
        if locks is None:
            with open("/proc/locks") as f:
                locks = f.read()
    except OSError:
        return False
    me = str(os.getpid())
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in locks.splitlines():
        fields = line.split()
        # ID: POSIX ADVISORY WRITE PID MAJOR:MINOR:INODE START END
        if len(fields) >= 6 and fields[1] == "POSIX" and fields[4] == me \
                and fields[5] == device:
            return True
    return False
