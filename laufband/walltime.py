"""When this worker's allocation ends: inside a SLURM job, the end of the job's time
limit; outside one, never (no limit).

Read once per job and cached: ``SLURM_JOB_END_TIME`` (epoch seconds, in the job's
environment on recent SLURM versions) where it is set, else ``scontrol show job -o $SLURM_JOB_ID``
(``EndTime=2026-11-30T20:01:02``, the controller's local time), else ``squeue -h -o %e
-j $SLURM_JOB_ID``. Each query is cut off after ``QUERY_TIMEOUT`` seconds; anything that
fails is logged once and means no limit (such a worker is no worse off than before:
the stop signal at the time limit still hands its task back).

What a worker does with the end (claims only what fits, stops in time) is in
graphband.py, threads.py and store/runtimes.py.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import threading
from collections.abc import Callable, Mapping
from datetime import datetime

log = logging.getLogger(__name__)

#: The job's end in epoch seconds (SLURM sets it in the job's environment).
END_VARIABLE = "SLURM_JOB_END_TIME"
JOB_VARIABLE = "SLURM_JOB_ID"
#: Longest wait for scontrol or squeue (the controller may be slow or down).
QUERY_TIMEOUT = 5.0
#: What scontrol and squeue print for a job without an end (no time limit, pending).
_NO_END = {"unknown", "none", "n/a", "unlimited", "infinite", ""}
_END_FIELD = re.compile(r"(?:^|\s)EndTime=(\S*)")

#: Runs a command: (argv, timeout) -> stdout; raises OSError, SubprocessError on failure.
Runner = Callable[[list[str], float], str]

_lock = threading.RLock()  # _query warns while holding it
_queried: dict[str, float | None] = {}  # job id -> its end (None: no limit, or unknown)
_warned: set[str] = set()


def allocation_end(env: Mapping[str, str] | None = None, run: Runner | None = None
                   ) -> float | None:
    """The end of this process's allocation in epoch seconds, or None (no limit known).

    ``env`` and ``run`` are for tests (default: ``os.environ`` and a subprocess)."""
    env = os.environ if env is None else env
    raw = env.get(END_VARIABLE, "").strip()
    if raw:
        try:
            end = float(raw)
        except ValueError:
            end = math.nan
        if math.isfinite(end) and end > 0:
            return end
        _warn_once(f"env:{raw}", f"{END_VARIABLE}={raw!r} is not a time in epoch seconds; "
                   "asking the controller instead")
    job = env.get(JOB_VARIABLE, "").strip()
    if not job:
        return None  # not inside a SLURM job: no limit
    with _lock:  # one query per job, also when several workers start at once
        if job not in _queried:
            _queried[job] = _query(job, run or _run)
        return _queried[job]


def _query(job: str, run: Runner) -> float | None:
    """scontrol, then squeue; None (logged once) if neither tells."""
    errors = []
    for argv, parse in ((["scontrol", "show", "job", "-o", job], parse_scontrol),
                        (["squeue", "-h", "-o", "%e", "-j", job], parse_end_time)):
        try:
            return parse(run(argv, QUERY_TIMEOUT))
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            errors.append(f"`{' '.join(argv)}`: {exc}")
    _warn_once(f"job:{job}", f"could not read when SLURM job {job} ends ({'; '.join(errors)}); "
               "this worker assumes no time limit")
    return None


def _run(argv: list[str], timeout: float) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)
    return done.stdout


def parse_scontrol(text: str) -> float | None:
    """The ``EndTime=`` of ``scontrol show job -o`` (one line per job)."""
    match = _END_FIELD.search(text)
    if match is None:
        raise ValueError(f"no EndTime in its output {text.strip()[:200]!r}")
    return parse_end_time(match.group(1))


def parse_end_time(text: str) -> float | None:
    """A SLURM time (``2026-11-30T20:01:02``, local time) in epoch seconds; None for
    ``Unknown`` and its kind (no end). ValueError for anything else."""
    value = text.strip().splitlines()[0].strip() if text.strip() else ""
    if value.lower() in _NO_END:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        raise ValueError(f"not a SLURM time: {value[:60]!r}") from None


def _warn_once(key: str, message: str) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning("laufband: %s", message)


def forget() -> None:
    """Drop what was read (tests)."""
    with _lock:
        _queried.clear()
        _warned.clear()


def duration(seconds: float) -> str:
    """``seconds`` for a message: "45 s", "12 min", "3.5 h"."""
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
