"""How tests/data/schema1.sqlite and schema2.sqlite were made (kept for the record; it
needs the laufband of commit 377579a, schema version 2, on the path):

    git worktree add /tmp/old 377579a
    PYTHONPATH=/tmp/old python tests/data/make_old_databases.py tests/data

The workflow: a -> b, c -> d, e, f. Worker A completes a and fails c (break; d is
then blocked); worker Z claims e and dies without going offline (its claim is live, its
heartbeat old, in 2023); b and f are ready. schema1.sqlite is the same database taken
back to version 1
(no workers.leave_as).
"""

import os
import shutil
import sqlite3
import sys

from laufband import Graphband, Task
from laufband.clock import FakeClock

folder = sys.argv[1]
db = os.path.join(folder, "schema2.sqlite")
for suffix in ("", ".lock", ".user.lock"):
    if os.path.exists(db + suffix):
        os.remove(db + suffix)
graph = [Task("a"), Task("b", dependencies={"a"}), Task("c"), Task("d", dependencies={"c"}),
         Task("e"), Task("f")]
clock = FakeClock(1_700_000_000.0)
opts = dict(db=f"sqlite:///{db}", clock=clock, tqdm_kwargs={"disable": True},
            heartbeat_interval=3600, heartbeat_timeout=7200, batch_size=1)
a = Graphband(graph, identifier="A", **opts)
for task in a:
    if task.id == "c":
        break
z = Graphband(graph, identifier="Z", **opts)
it = iter(z)
assert next(it).id == "e"
z._heartbeat.stop()
z._finalizer.detach()
conn = sqlite3.connect(db)
print(conn.execute("SELECT id, state FROM tasks").fetchall())
print(conn.execute("SELECT * FROM claims").fetchall())
print(conn.execute("SELECT id, state FROM workers").fetchall())
conn.close()
shutil.copy(db, os.path.join(folder, "schema1.sqlite"))
conn = sqlite3.connect(os.path.join(folder, "schema1.sqlite"))
conn.execute("ALTER TABLE workers DROP COLUMN leave_as")
conn.execute("UPDATE laufband_meta SET value = '1' WHERE key = 'schema_version'")
conn.execute("PRAGMA user_version = 1")
conn.commit()
conn.close()
os._exit(0)  # Z dies holding its claim
