"""How tests/data/schema3.sqlite was made (kept for the record; it needs the laufband
of commit e51c097, schema version 3, on the path):

    git worktree add /tmp/v3 e51c097
    PYTHONPATH=/tmp/v3 python tests/data/make_schema3.py tests/data

The same workflow as make_old_databases.py (a -> b, c -> d, e, f; A completes a and
fails c, so d is blocked; Z claims e and dies without going offline, in 2023; b and f
ready), with fingerprints, and d needing the label "gpu".
"""

import os
import sqlite3
import sys

from laufband import Graphband, Task
from laufband.clock import FakeClock

folder = sys.argv[1]
db = os.path.join(folder, "schema3.sqlite")
for suffix in ("", ".lock", ".user.lock"):
    if os.path.exists(db + suffix):
        os.remove(db + suffix)
graph = [Task("a", fingerprint="a1"), Task("b", dependencies={"a"}), Task("c"),
         Task("d", dependencies={"c"}, requirements={"gpu"}), Task("e"), Task("f")]
clock = FakeClock(1_700_000_000.0)
opts = dict(db=f"sqlite:///{db}", clock=clock, tqdm_kwargs={"disable": True},
            heartbeat_interval=3600, heartbeat_timeout=7200, batch_size=1,
            enable_fingerprints=True)
a = Graphband(graph, identifier="A", **opts)
for task in a:
    if task.id == "c":
        break
z = Graphband(graph, identifier="Z", **opts)
it = iter(z)
assert next(it).id == "e"
z._session.heartbeat.stop()
z._finalizer.detach()
conn = sqlite3.connect(db)
print(conn.execute("SELECT id, state FROM tasks").fetchall())
print(conn.execute("SELECT task, attempt, worker, ended_at FROM attempts").fetchall())
print(conn.execute("SELECT id, state FROM workers").fetchall())
conn.close()
os._exit(0)  # Z dies holding its claim
