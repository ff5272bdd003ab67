"""The runnable examples run (each copied to a folder of its own: they write next to
themselves)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(folder: Path, name: str, *args: str) -> str:
    script = folder / name
    if not script.exists():
        shutil.copy(EXAMPLES / name, script)
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                         text=True, timeout=120, cwd=folder)
    assert out.returncode == 0, out.stderr
    return out.stdout


def ran(output: str) -> list[str]:
    tasks = []
    for line in output.splitlines():
        _, _, what = line.partition(" ran: ")
        if what != "nothing":
            tasks += what.split(", ")
    return sorted(tasks)


def test_the_incremental_example_reruns_only_the_changed_branch(tmp_path):
    first = ran(run_example(tmp_path, "incremental.py"))
    assert first == sorted(["preprocess", *(f"{kind}/{name}" for kind in ("train", "evaluate")
                                            for name in ("small", "medium", "large"))])
    assert ran(run_example(tmp_path, "incremental.py")) == []
    assert ran(run_example(tmp_path, "incremental.py", "--lr", "small=0.05")) == [
        "evaluate/small", "train/small"]
