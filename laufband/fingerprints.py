"""``fingerprint()``: a stable digest of what a task's result depends on.

    Task("train/3", fingerprint=fingerprint(params, files=[data_path], code=[train]))

It covers:
- values that JSON can express (dicts, lists, strings, numbers, booleans, None), in
  a canonical form: the order of a dict's keys does not matter, a tuple counts as a
  list;
- the contents of files (not their names or times): each file is read and hashed once,
  and its digest kept under its (path, size, mtime_ns, ctime_ns, inode, device), in this
  process and in a small cache file shared by all processes
  (``$LAUFBAND_FINGERPRINT_CACHE``, by default ``~/.cache/laufband/file-digests.sqlite``),
  so unchanged large files are not read again on a rerun. The change time catches new
  contents whose modification time was set back (``cp -p``, ``rsync -t``); a file
  modified less than 2 s ago is not cached (a second write within the file system's
  timestamp granularity would not show, as git knows);
- the source code of functions, classes or modules (``inspect.getsource``), and, where
  no source exists, the compiled code.

It does not cover what the code it is given calls (other functions, imported modules,
installed packages), environment variables, or the contents of folders: list what
matters. To make a task rerun when its inputs' producers change, chain fingerprints:
include the fingerprints of its dependencies (with fingerprints enabled, the default
``invalidate_downstream=True`` reruns dependents anyway).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sqlite3
import threading
import time
import typing as t
from collections.abc import Callable, Iterable
from pathlib import Path

from laufband.errors import LaufbandError

_CHUNK = 1 << 20
_Key = tuple[str, int, int, int, int, int]
_memory: dict[_Key, str] = {}
#: A file modified this recently (ns) is hashed each time, not cached.
_RACY_NS = 2_000_000_000
_memory_lock = threading.Lock()


def fingerprint(*values: t.Any, files: Iterable[str | os.PathLike] = (),
                code: Iterable[Callable | type | t.Any] = ()) -> str:
    """A hex digest of ``values`` (JSON-able), the contents of ``files`` and the source
    of ``code``. Equal inputs give equal digests in every process and on every host."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"values\0" + _canonical(values))
    for path in files:
        h.update(b"\0file\0" + file_digest(path).encode())
    for obj in code:
        h.update(b"\0code\0" + _source(obj))
    return h.hexdigest()


def _canonical(values: tuple) -> bytes:
    try:
        text = json.dumps(values, sort_keys=True, separators=(",", ":"), allow_nan=True,
                          ensure_ascii=False)
    except TypeError as exc:
        raise LaufbandError(
            f"fingerprint() takes values that JSON can express (dicts, lists, strings, "
            f"numbers, booleans, None): {exc}. Convert the value first, e.g. str(path) "
            "or a dataclass with dataclasses.asdict(); pass files with files=[...]."
        ) from None
    return text.encode()


def _source(obj: t.Any) -> bytes:
    try:
        return inspect.getsource(obj).encode()
    except (OSError, TypeError):
        code = getattr(obj, "__code__", None)
        if code is None:
            raise LaufbandError(
                f"fingerprint(code=...) takes functions, classes or modules, got "
                f"{type(obj).__name__} {obj!r}.") from None
        return code.co_code + repr(code.co_consts).encode()


def file_digest(path: str | os.PathLike) -> str:
    """The digest of a file's contents, read only if its (size, mtime_ns, inode)
    changed since it was last hashed (here or by another process, via the cache)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise LaufbandError(f"fingerprint(files=...): cannot read {path}: "
                            f"{exc.strerror or exc}.") from None
    key = (real, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < _RACY_NS:
        return _hash_file(real)  # it may change again within the same timestamp
    with _memory_lock:
        known = _memory.get(key)
    if known is None:
        known = _Cache.get(key)
    if known is None:
        known = _hash_file(real)
        _Cache.put(key, known)
    with _memory_lock:
        _memory[key] = known
    return known


def _hash_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _Cache:
    """The digests of files across processes and reruns, in a small SQLite file. Any
    problem with it (read-only home, a full disk) only costs a re-read."""

    @staticmethod
    def _path() -> Path:
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        return Path(os.environ.get("LAUFBAND_FINGERPRINT_CACHE",
                                   default / "laufband" / "file-digests.sqlite"))

    @classmethod
    def _connect(cls) -> sqlite3.Connection:
        path = cls._path()
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=5)
        conn.execute("CREATE TABLE IF NOT EXISTS file_digests (path TEXT, size INTEGER,"
                     " mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER, device INTEGER,"
                     " digest TEXT NOT NULL,"
                     " PRIMARY KEY (path, size, mtime_ns, ctime_ns, inode, device))")
        return conn

    @classmethod
    def get(cls, key: _Key) -> str | None:
        try:
            conn = cls._connect()
            try:
                row = conn.execute("SELECT digest FROM file_digests WHERE path = ?"
                                   " AND size = ? AND mtime_ns = ? AND ctime_ns = ?"
                                   " AND inode = ? AND device = ?", key).fetchone()
            finally:
                conn.close()
        except (OSError, sqlite3.Error):
            return None
        return row[0] if row else None

    @classmethod
    def put(cls, key: _Key, digest: str) -> None:
        try:
            conn = cls._connect()
            try:
                with conn:
                    conn.execute("DELETE FROM file_digests WHERE path = ?", key[:1])
                    conn.execute("INSERT OR REPLACE INTO file_digests"
                                 " VALUES (?, ?, ?, ?, ?, ?, ?)", (*key, digest))
            finally:
                conn.close()
        except (OSError, sqlite3.Error):
            pass
