"""``laufband submit``: write a SLURM job-array script of the shape of
examples/slurm/run.sbatch and hand it to sbatch.

A thin layer over sbatch, no scheduler of our own: the array has one task per worker,
every other sbatch option goes to sbatch's command line unchanged (where it wins over
the script's ``#SBATCH`` lines), and the script stays in the current folder so that
it can be read and submitted again by hand.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from laufband.errors import ConfigError, LaufbandError

#: SIGUSR1 to the batch shell (``exec``: the worker) 60 s before the time limit: the
#: worker drains (README, "Running on a SLURM cluster").
SIGNAL = "B:USR1@60"
#: Each array task's output, in the folder the job runs in (%A array job, %a task).
OUTPUT = "laufband-%A_%a.out"


class SbatchError(LaufbandError, RuntimeError):
    """sbatch refused the job (its own message says why)."""


@dataclass(frozen=True)
class Job:
    """What ``laufband submit`` wrote and what sbatch returned."""

    job_id: str
    script: Path
    warnings: str  # sbatch's stderr of a successful submission (e.g. a warning)


def given(sbatch_args: list[str], long: str, short: str | None = None) -> bool:
    """Whether the sbatch options contain ``--long`` (also ``--long=X`` and the
    abbreviations of 3 letters or more that sbatch's getopt accepts) or ``-s``/``-sX``."""
    for arg in sbatch_args:
        if arg.startswith("--"):
            name = arg[2:].partition("=")[0]
            if len(name) >= 3 and long.startswith(name):
                return True
        elif short and arg.startswith(f"-{short}"):
            return True
    return False


def check(workers: int, command: list[str], sbatch_args: list[str]) -> None:
    """ConfigError for what cannot become a job array of ``workers`` tasks."""
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give the number of workers, >= 1 (one "
                          "array task each)")
    if not command:
        stray = f" ({shlex.join(sbatch_args)} would go to sbatch)" if sbatch_args else ""
        raise ConfigError("no command to run: end the options with -- and give the "
                          "workers' command, e.g. `laufband submit --workers 8 -- python "
                          f"main.py`{stray}")
    if given(sbatch_args, "array", "a"):
        raise ConfigError(f"--array conflicts with --workers {workers}: laufband submit "
                          f"makes the array 0-{workers - 1} itself, one task per worker; "
                          "change --workers instead")


def worker_db(db: str) -> str:
    """LAUFBAND_DB for the workers: ``--db`` with a relative file path made absolute
    (the job may start elsewhere; a URL of a server stays as it is). A SQLite file's
    folder must exist: else every array task would fail on it."""
    from laufband.store.connection import absolute_url, database_url, has_secret, sqlite_path

    url = absolute_url(database_url(db, "--db"))  # a ConfigError for neither path nor URL
    if has_secret(url):
        # The script, its output and the job's environment are often readable by others.
        raise ConfigError("--db: the URL has a password, which laufband submit would write "
                          "into the script and print; leave it out of the URL and put it "
                          "in ~/.pgpass (chmod 600) on the shared home, or PGPASSWORD")
    path = sqlite_path(url)
    if path is not None and not os.path.isdir(os.path.dirname(path)):
        folder = os.path.dirname(path)
        raise ConfigError(f"--db {db}: the folder {folder} does not exist; create it "
                          f"(mkdir -p {shlex.quote(folder)}) on the shared file system")
    return url if "://" in db else path or db


def script_name(now: float | None = None) -> str:
    return time.strftime("laufband-submit-%Y%m%d-%H%M%S.sbatch", time.localtime(now))


def sbatch_line(sbatch_args: list[str], script: str) -> str:
    """The sbatch command line that submits ``script`` with the user's options."""
    return shlex.join(["sbatch", *sbatch_args, script])


def script_text(workers: int, command: list[str], sbatch_args: list[str],
                db: str | None, folder: str, name: str) -> str:
    """The batch script (run.sbatch's shape) for ``workers`` array tasks running
    ``command`` in ``folder``; LAUFBAND_DB is ``db`` (already absolute) if given."""
    from laufband import __version__

    watch = "laufband" + (f" --db {shlex.quote(db)}" if db else "")
    lines = [
        "#!/bin/bash",
        f"# Written by `laufband submit` (laufband {__version__}): {workers} worker(s) as a "
        "SLURM",
        "# job array; together they run the workflow once through one database. It was",
        "# submitted as below (sbatch's command-line options win over the #SBATCH lines);",
        f"# the same again adds {workers} more worker(s):",
        f"#   cd {shlex.quote(folder)} && {sbatch_line(sbatch_args, name)}",
        f"# Watch: {watch} status",
        "#",
        "#SBATCH --job-name=laufband",
        f"#SBATCH --array=0-{workers - 1}",
        *([] if given(sbatch_args, "signal") else [f"#SBATCH --signal={SIGNAL}"]),
        "#SBATCH --requeue",
        f"#SBATCH --output={OUTPUT}",
        "",
    ]
    if db:
        where = ("On a file system every node sees (not /tmp or node-local scratch)."
                 if "://" not in db or db.startswith("sqlite") else
                 "A database server every node reaches.")
        lines += [f"# {where}", f"export LAUFBAND_DB={shlex.quote(db)}"]
    else:
        lines += ["# No --db: the workers' own db= (or $LAUFBAND_DB, or their default in "
                  "this folder)."]
    lines += [
        "# A requeued array task keeps its ids, so it takes its old worker identity back.",
        "export LAUFBAND_IDENTIFIER=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}",
        "",
        "# exec: the command replaces the shell, so B:USR1 and scancel's SIGTERM reach it.",
        f"exec {shlex.join(command)}",
    ]
    return "\n".join(lines) + "\n"


def reserve(folder: Path, name: str) -> Path:
    """A new empty file ``name`` in ``folder`` (never an existing one: a second
    submission within the same second gets ``-1``, ``-2``, ...)."""
    stem = name.removesuffix(".sbatch")
    for n in range(100):
        path = folder / (name if n == 0 else f"{stem}-{n}.sbatch")
        try:
            path.open("x").close()
        except FileExistsError:
            continue
        return path
    raise LaufbandError(f"{folder}/{stem}-*.sbatch: 100 scripts of this second exist "
                        "already; remove some")


def sbatch(sbatch_args: list[str], script: Path) -> tuple[str, str]:
    """Submit ``script`` with the user's options, from its folder: the job id and
    sbatch's stderr."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise LaufbandError("sbatch not found: laufband submit runs SLURM's sbatch, which "
                            "must be on PATH (run it on a login node of the cluster, or "
                            "add SLURM's bin folder to PATH); --dry-run shows the script")
    out = subprocess.run([exe, "--parsable", *sbatch_args, script.name], cwd=script.parent,
                         capture_output=True, text=True)
    if out.returncode:
        said = out.stderr.strip() or out.stdout.strip() or "(nothing on stderr)"
        raise SbatchError(f"sbatch exited with {out.returncode}, nothing was submitted:\n"
                          f"{said}")
    job = out.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    if not job:
        raise SbatchError(f"sbatch printed no job id: {out.stdout!r} {out.stderr!r}")
    return job, out.stderr


def submit(workers: int, command: list[str], sbatch_args: list[str], db: str | None,
           folder: Path) -> Job:
    """Write the script into ``folder`` and submit it; on a refusal, remove it again."""
    path = reserve(folder, script_name())
    try:
        path.write_text(script_text(workers, command, sbatch_args, db, str(folder),
                                    path.name))
        job, warnings = sbatch(sbatch_args, path)
    except (LaufbandError, OSError):
        path.unlink(missing_ok=True)
        raise
    return Job(job, path, warnings)
