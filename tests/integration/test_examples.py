"""The runnable examples run (each copied to a folder of its own: they write next to
themselves)."""

from __future__ import annotations

import os
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


def test_the_pipeline_example_streams_two_families_under_the_cap(tmp_path):
    """examples/pipeline/run.py: 2 resolve and 3 download workers (4 threads each), the
    downloads capped at 3 at once across all of them."""
    out = subprocess.run([sys.executable, str(EXAMPLES / "pipeline" / "run.py"), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PIPELINE_SOURCES": "12"})
    assert out.returncode == 0, out.stderr
    assert "tasks: 24/24 completed (100.0 %)" in out.stdout
    assert "labels download: 3 worker(s) (3 offline)" in out.stdout
    assert "labels resolve: 2 worker(s) (2 offline)" in out.stdout
    line = next(x for x in out.stdout.splitlines() if x.startswith("downloads: "))
    assert line.startswith("downloads: 12, at most ")
    assert int(line.split("at most ")[1].split()[0]) <= 3
    assert len(list((tmp_path / "out" / "downloads").iterdir())) == 12


def test_the_readme_shows_the_sbatch_example_as_it_is():
    """The README's job script is examples/slurm/run.sbatch, which test_slurm.py runs
    under real SLURM daemons."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    script = (EXAMPLES / "slurm" / "run.sbatch").read_text()
    assert f"```bash\n{script}```\n" in readme
