"""Time the status reads of a laufband database (started by benchmarks/run.py).

    python benchmarks/status_probe.py sqlite:///path/to/db.sqlite

Prints one JSON line: import_s, open_s (open_store: engine + schema check),
counts_s / counts_max_s (store.counts(), the summary `laufband status` prints; best and
worst of 5), status_s (the whole cli.status: counts, workers, running, failed tasks).
"""

from __future__ import annotations

import io
import json
import sys
import time


def main() -> int:
    url = sys.argv[1]
    t = time.perf_counter()
    from laufband.cli import open_store, status

    imported = time.perf_counter() - t
    t = time.perf_counter()
    store = open_store(url)
    opened = time.perf_counter() - t
    reads = []
    for _ in range(5):
        t = time.perf_counter()
        counts = store.counts()
        reads.append(time.perf_counter() - t)
    t = time.perf_counter()
    status(store, out=io.StringIO())
    full = time.perf_counter() - t
    print(json.dumps({"import_s": imported, "open_s": opened, "counts_s": min(reads),
                      "counts_max_s": max(reads), "status_s": full, "total": counts.total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
