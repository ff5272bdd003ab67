"""Waiting for other workers: when to read, and when to give up and leave.

A worker whose step claimed nothing, while running tasks may still make work for it,
waits here. Waiting writes nothing: on SQLite it watches the database file (a stat, no
lock) and reads the counters under the lock only when the file changed, spacing the
reads so that they do not crowd the lock the committing workers need. On PostgreSQL it
listens for the commits instead (store/notices.py) and reads in the same rhythm. The store's
``poll`` says whether a task this worker may claim is ready, whether it left (the
transaction that finished the workflow released it), or neither.
"""

from __future__ import annotations

from collections.abc import Callable

from laufband.clock import Clock
from laufband.states import TaskState, WorkerState
from laufband.store import Counts, Me, StepResult, Store

#: Waiting for other workers polls the (tiny) counts table with this backoff, seconds.
POLL_MIN, POLL_MAX = 0.01, 0.25
#: On SQLite, a waiting worker looks at the database file this often (a stat, no lock).
WATCH_INTERVAL = 0.005
#: ... and reads the counters at most this often while they keep changing (every commit
#: changes the file: waiters reading at each one would crowd out the committing workers).
READ_GAP_MAX = 0.05


def wait_for_work(store: Store, me: Me, clock: Clock, leave: WorkerState,
                  stop: Callable[[], bool], observe: Callable[[StepResult], None]) -> bool:
    """Wait until a task this worker may claim is ready (True), or until this worker
    left because nothing it could run can become claimable (False: its state was set
    in the transaction that found so, its own or the one that finished the workflow).
    Returns True as well as soon as ``stop()`` is true (the loop then stops)."""
    try:
        return _wait(store, me, clock, leave, stop, observe)
    finally:
        store.stop_listening()  # on a server (store/notices.py)


def _wait(store: Store, me: Me, clock: Clock, leave: WorkerState,
          stop: Callable[[], bool], observe: Callable[[StepResult], None]) -> bool:
    delay = POLL_MIN
    mark = store.change_mark(listen=True)
    read_at = clock.monotonic()
    while not stop():
        if mark is None:
            clock.sleep(delay)
        else:
            # Watch the file and read the counters once it changed and `delay` passed,
            # or after POLL_MAX anyway.
            clock.sleep(WATCH_INTERVAL)
            seen = store.change_mark(listen=True)
            since = clock.monotonic() - read_at
            if since < POLL_MAX and (seen == mark or since < delay):
                continue
            mark, read_at = seen, clock.monotonic()
        result = store.poll(me, leave)
        observe(result)
        if result.left:
            return False
        if result.claimable:
            return True
        delay = next_read_gap(delay, result.counts, watching=mark is not None)
    return True


def next_read_gap(delay: float, counts: Counts, watching: bool) -> float:
    """How long a waiting worker lets pass before it reads the counters again."""
    if not watching:
        return min(2 * delay, POLL_MAX)
    if counts.n([TaskState.PENDING, TaskState.READY]) == 0:
        # Only running tasks are left: each commit from now on is mostly one of them
        # ending (besides heartbeats and workers leaving), and the last one releases
        # this worker. Read soon after each, more often the fewer run.
        running = counts.n([TaskState.RUNNING])
        return min(READ_GAP_MAX, WATCH_INTERVAL * max(1, running))
    # Commits keep coming (a chain hands over every few ms): space the reads out, or
    # they crowd the lock that the committing workers need.
    return min(2 * delay, READ_GAP_MAX)
