from __future__ import annotations

import backends

from laufband import Graphband, Laufband
from laufband.clock import FakeClock


def make(tasks, name="w", db="g.sqlite", cls=Graphband, clock=None, **kw):
    """A worker with a fixed identifier, no progress output, and a heartbeat thread that
    never fires on its own (tests drive beats by hand with a fake clock)."""
    kw.setdefault("heartbeat_interval", 3600)
    kw.setdefault("heartbeat_timeout", 7200)
    kw.setdefault("tqdm_kwargs", {"disable": True})
    return cls(tasks, db=backends.current.url(db), identifier=name, clock=clock or FakeClock(),
               **kw)


def url(name: str = "g.sqlite") -> str:
    """The URL of the test's database ``name`` on the backend under test."""
    return backends.current.url(name)


def beat(worker) -> None:
    """One heartbeat of ``worker``, by hand (its thread never fires in unit tests)."""
    worker._session.heartbeat.beat()


def flat_worker(items, name="w", **kw):
    return make(items, name=name, cls=Laufband, **kw)


def rows(sql: str, db: str = "g.sqlite") -> list[tuple]:
    return backends.current.rows(sql, name=db)


def live(worker: str | None = None, db: str = "g.sqlite") -> int:
    """Live attempts (claims) of ``worker``, or of everyone."""
    where = f" AND worker = '{worker}'" if worker else ""
    return rows(f"SELECT count(*) FROM attempts WHERE ended_at IS NULL{where}", db)[0][0]


def states(db: str = "g.sqlite") -> dict[str, str]:
    return dict(rows("SELECT id, state FROM tasks", db))


def history(task_id: str, db: str = "g.sqlite") -> list[tuple]:
    return rows(
        "SELECT event, events.state, worker, attempt FROM events"
        f" JOIN tasks ON tasks.pk = events.task WHERE tasks.id = '{task_id}'"
        " ORDER BY events.id", db)
