"""laufband.fingerprint: values (canonical), files (hashed once, cached), code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from laufband import LaufbandError, fingerprint
from laufband import fingerprints as fp_module


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A cache file of this test's own, and an empty in-process cache."""
    monkeypatch.setenv("LAUFBAND_FINGERPRINT_CACHE", str(tmp_path / "cache.sqlite"))
    monkeypatch.setattr(fp_module, "_memory", {})


def test_values_are_canonical():
    assert fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": [1, 2], "b": 1})
    assert fingerprint((1, 2)) == fingerprint([1, 2])
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint(1, 2) != fingerprint(2, 1) != fingerprint([1, 2])
    assert len(fingerprint()) == 32


def test_values_json_cannot_express_get_a_clear_error():
    with pytest.raises(LaufbandError, match="JSON can express.*Convert the value first"):
        fingerprint({"when": object()})


def test_the_same_in_another_process():
    here = fingerprint({"b": [1, {"z": None}], "a": "x"}, 1.5)
    code = ("from laufband import fingerprint; "
            "print(fingerprint({'a': 'x', 'b': [1, {'z': None}]}, 1.5))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "7"})
    assert out.stdout.strip() == here


def counting_reads(monkeypatch) -> list:
    reads: list = []
    hash_file = fp_module._hash_file
    monkeypatch.setattr(fp_module, "_hash_file", lambda p: reads.append(p) or hash_file(p))
    return reads


def test_files_count_by_content_and_are_read_once(tmp_path, monkeypatch):
    monkeypatch.setattr(fp_module, "_RACY_NS", 0)  # the files here were just written
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 3_000_000)
    reads = counting_reads(monkeypatch)
    first = fingerprint(files=[data])
    assert fingerprint(files=[data]) == first and len(reads) == 1  # cached
    monkeypatch.setattr(fp_module, "_memory", {})  # a new process: the cache file knows
    assert fingerprint(files=[str(data)]) == first and len(reads) == 1
    data.write_bytes(b"y" * 3_000_000)  # new content (and mtime): read again
    assert fingerprint(files=[data]) != first and len(reads) == 2
    copy = tmp_path / "copy.bin"
    copy.write_bytes(data.read_bytes())
    assert fingerprint(files=[copy]) == fingerprint(files=[data])  # content, not name


def test_new_contents_with_the_old_modification_time_are_seen(tmp_path, monkeypatch):
    """cp -p, rsync -t or tar set the modification time back: the change time moves."""
    monkeypatch.setattr(fp_module, "_RACY_NS", 0)
    data = tmp_path / "data.bin"
    data.write_bytes(b"a" * 1000)
    old = data.stat()
    first = fingerprint(files=[data])
    data.write_bytes(b"b" * 1000)
    os.utime(data, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert data.stat().st_mtime_ns == old.st_mtime_ns and data.stat().st_size == old.st_size
    assert fingerprint(files=[data]) != first


def test_a_file_written_just_now_is_not_cached(tmp_path, monkeypatch):
    """Two writes within one timestamp tick would look alike: such a file is read each
    time until it is 2 s old."""
    data = tmp_path / "data.bin"
    data.write_bytes(b"fresh")
    reads = counting_reads(monkeypatch)
    fingerprint(files=[data])
    fingerprint(files=[data])
    assert len(reads) == 2


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(LaufbandError, match="cannot read .*nothing.txt"):
        fingerprint(files=[tmp_path / "nothing.txt"])


def preprocess(x):
    return x + 1


def train(x):
    return x * 2


def test_code_counts_by_source():
    assert fingerprint(code=[preprocess]) == fingerprint(code=[preprocess])
    assert fingerprint(code=[preprocess]) != fingerprint(code=[train])
    with pytest.raises(LaufbandError, match="functions, classes or modules"):
        fingerprint(code=[42])


def test_chaining_a_dependencys_fingerprint():
    upstream = fingerprint({"lr": 0.1})
    assert fingerprint({"epochs": 3}, upstream) != fingerprint({"epochs": 3},
                                                               fingerprint({"lr": 0.2}))
