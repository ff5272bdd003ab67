"""``laufband cancel`` and ``resume``: stopping a whole workflow cleanly.

A cancel is a flag in ``laufband_meta`` (when, by whom, the drain timeout) that every
step and poll of every worker reads (one lookup by primary key): workers stop claiming
and leave once their running tasks are recorded. Tasks that never started become
``cancelled`` at once; running ones may finish within the drain timeout, after which
``abandon`` records their attempts cancelled (their workers' late results are fenced).
``resume`` clears the flag and brings the cancelled tasks back.
"""

from __future__ import annotations

import dataclasses
import json

from laufband.states import Event, TaskState
from laufband.store import attempts
from laufband.store.ledger import Ledger
from laufband.store.model import Claim, Finish

S = TaskState

SQL = {
    "set_flag": "INSERT INTO laufband_meta (key, value) VALUES ('cancel', :value)",
    "clear_flag": "DELETE FROM laufband_meta WHERE key = 'cancel'",
    # Never started: ready or pending with no attempt running (a shared task with a
    # running attempt is ready while it has free slots: it drains like a running one).
    "not_started": "SELECT pk FROM tasks WHERE state IN ('ready', 'pending') AND running = 0",
    "live": "SELECT a.task, a.attempt, a.worker, t.id FROM attempts a CROSS JOIN tasks t"
            " WHERE a.ended_at IS NULL AND t.pk = a.task",
    "cancelled": "SELECT pk, waiting_on FROM tasks WHERE state = 'cancelled'",
    "failed": "SELECT pk, id FROM tasks WHERE state IN ('failed', 'killed')",
}


@dataclasses.dataclass(frozen=True)
class Cancel:
    at: float
    drain: float
    by: str

    @property
    def deadline(self) -> float:
        return self.at + self.drain


def flag(led: Ledger) -> Cancel | None:
    """The flag as the transaction sees it (read with the counts: Ledger)."""
    raw = led.cancel_flag
    return None if raw is None else Cancel(**json.loads(raw))


def cancel(led: Ledger, drain: float, who: str) -> tuple[Cancel, int, int]:
    """Set the flag (a second cancel keeps the first one's time and drain) and cancel
    what never started. Returns the flag, the tasks cancelled now, the attempts live."""
    current = flag(led)
    if current is None:
        current = Cancel(led.now, drain, who)
        led.cancel_flag = json.dumps(dataclasses.asdict(current))
        led.run(SQL["set_flag"], {"value": led.cancel_flag})
    before = led.counts.n([S.CANCELLED])
    sweep(led, who)
    return current, led.counts.n([S.CANCELLED]) - before, len(led.all(SQL["live"]))


def abandon(led: Ledger, who: str, cancel: Cancel) -> int | None:
    """The drain of ``cancel`` is over: every live attempt is recorded cancelled, its
    task too, and so is what became ready meanwhile (an attempt that failed with
    retries left). None, and nothing done, if the workflow was resumed meanwhile (or
    cancelled anew)."""
    if flag(led) != cancel:
        return None
    live = led.all(SQL["live"])
    for pk, attempt, worker, task_id in live:
        attempts.end(led, worker, [Finish(Claim(pk, task_id, attempt), Event.CANCELLED,
                                          f"still running when the drain of the cancel "
                                          f"by {who} timed out")])
    sweep(led, who)
    return len(live)


def settle(led: Ledger, finishes: list[Finish]) -> list[Finish]:
    """A worker's own "cancelled" (its drain ran out) counts only while the workflow is
    still cancelled; after a resume the attempt is handed back instead."""
    if not any(f.outcome == Event.CANCELLED for f in finishes) or flag(led) is not None:
        return finishes
    return [dataclasses.replace(f, outcome=Event.PREEMPTED,
                                detail="the workflow was resumed during the drain")
            if f.outcome == Event.CANCELLED else f for f in finishes]


def sweep(led: Ledger, who: str) -> None:
    """While cancelled: tasks that are ready or waiting (new ones, too) are cancelled."""
    pks = [pk for (pk,) in led.all(SQL["not_started"])]
    led.move_all(pks, S.CANCELLED, Event.CANCELLED, None, detail=f"cancelled by {who}")


def resume(led: Ledger, who: str) -> int:
    """Clear the flag; cancelled tasks wait or are ready again (blocked if what they
    depend on failed for good meanwhile). Returns how many came back."""
    led.run(SQL["clear_flag"], {})
    led.cancel_flag = None
    rows = led.all(SQL["cancelled"])
    detail = f"resumed by {who}"
    led.move_all([pk for pk, waiting in rows if waiting == 0], S.READY, Event.RESUMED, who,
                 detail=detail)
    led.move_all([pk for pk, waiting in rows if waiting > 0], S.PENDING, Event.RESUMED, who,
                 detail=detail)
    for root, root_id in led.all(SQL["failed"]):
        attempts.block_descendants(led, Claim(root, root_id, 0), who)
    return len(rows)
