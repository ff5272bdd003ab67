"""write_record: how a benchmark worker (worker.py, concurrency_worker.py,
slurm_worker.py) leaves its JSON record for the driver: whole or not at all.

The workers are started as scripts (``python benchmarks/<name>.py``, also with laufband
0.2.1's interpreter), so this folder is their sys.path[0]; standard library only, and
not run.py, whose imports would count in what slurm_worker.py measures.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_record(out: Path | str, info: dict) -> None:
    """``info`` as JSON at ``out``, written to ``out`` with the suffix .tmp and renamed
    into place, so the driver never reads half a record."""
    out = Path(out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.rename(out)
