"""How tests/data/schema4.sqlite was made (kept for the record; it needs the laufband
of commit f8ae796, schema version 4, on the path):

    mkdir /tmp/v4 && git archive f8ae796 | tar -x -C /tmp/v4
    PYTHONPATH=/tmp/v4 python tests/data/make_schema4.py tests/data

The workflow of make_schema3.py (a -> b, c -> d, e, f; A completes a and fails c, so d
is blocked; Z claims e and dies without going offline, in 2023; b and f ready), with
what schema 4 added: a priority (a), a timeout (b), a resource under a limit (c, api=2),
a result (a's), and worker A inside a SLURM array job.
"""

import os
import sqlite3
import sys

from laufband import Graphband, Task
from laufband.clock import FakeClock

folder = sys.argv[1]
db = os.path.join(folder, "schema4.sqlite")
for suffix in ("", ".lock", ".user.lock"):
    if os.path.exists(db + suffix):
        os.remove(db + suffix)
graph = [Task("a", fingerprint="a1", priority=2), Task("b", dependencies={"a"}, timeout=600),
         Task("c", resources={"api": 1}), Task("d", dependencies={"c"}, requirements={"gpu"}),
         Task("e"), Task("f")]
clock = FakeClock(1_700_000_000.0)
opts = dict(db=f"sqlite:///{db}", clock=clock, tqdm_kwargs={"disable": True},
            heartbeat_interval=3600, heartbeat_timeout=7200, batch_size=1,
            enable_fingerprints=True, limits={"api": 2})
os.environ.update(SLURM_JOB_ID="1235", SLURM_ARRAY_JOB_ID="1230", SLURM_ARRAY_TASK_ID="5",
                  SLURMD_NODENAME="node7")
a = Graphband(graph, identifier="A", **opts)
for task in a:
    if task.id == "c":
        break
    a.set_result({"done": task.id})
for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURMD_NODENAME"):
    del os.environ[var]
z = Graphband(graph, identifier="Z", **opts)
it = iter(z)
assert next(it).id == "e"
z._session.heartbeat.stop()
z._finalizer.detach()
conn = sqlite3.connect(db)
print(conn.execute("SELECT id, state FROM tasks").fetchall())
print(conn.execute("SELECT task, attempt, worker, ended_at, result FROM attempts").fetchall())
print(conn.execute("SELECT id, state, slurm FROM workers").fetchall())
conn.close()
os._exit(0)  # Z dies holding its claim
