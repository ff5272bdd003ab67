"""The transaction ledger: runs one transaction's statements and books every task state
change (the one place that checks the state machine, keeps the counts in step and
appends the history).

Count changes and history rows are collected and written once at the end (``flush``),
so a claim+finish costs a handful of statements. The statements run on the driver's
connection (sqlite3, psycopg), in the transaction SQLAlchemy began: several times
cheaper per statement than SQLAlchemy's execute (SCALING_ANALYSIS.md, 'Measurements
behind the code').
"""

from __future__ import annotations

import functools
import json
import re
import typing as t
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from laufband.states import UNFINISHED, Event, TaskState, check_transition
from laufband.store.model import Counts
from laufband.store.notices import NOTIFY

S = TaskState

SQL = {
    # With the cancel flag (cancelling.py; reqset NULL), which every step reads: one
    # statement, one round trip to a server, for both.
    "counts": "SELECT reqset, state, n FROM counts UNION ALL"
              " SELECT NULL, value, NULL FROM laufband_meta WHERE key = 'cancel'",
    "bump": "UPDATE counts SET n = n + :delta WHERE reqset = :reqset AND state = :state",
    # A server's form of "bump" and "event": one statement for all rows, one array per
    # column (see Ledger.run_rows).
    "bump_all": "UPDATE counts SET n = n + d.delta FROM unnest(CAST(:reqset AS integer[]),"
                " CAST(:state AS text[]), CAST(:delta AS integer[])) AS d(reqset, state,"
                " delta) WHERE counts.reqset = d.reqset AND counts.state = d.state",
    "notify": f"SELECT {NOTIFY}",
    # Before "bump_all" in a step beside others: every counts row, in one order (so two
    # such steps wait for each other instead of deadlocking: an UPDATE ... FROM locks
    # rows in the order of its plan), as the steps that committed meanwhile left them.
    # From here to its commit the step is alone with the counts: what it decides from
    # them (the workflow is over, a waiting worker may act) sees every other step.
    "lock_counts": "SELECT reqset, state, n FROM counts ORDER BY reqset, state FOR UPDATE",
    "event": "INSERT INTO events (task, attempt, event, state, worker, at, detail)"
             " VALUES (:task, :attempt, :event, :state, :worker, :at, :detail)",
    "event_all": "INSERT INTO events (task, attempt, event, state, worker, at, detail)"
                 " SELECT * FROM unnest(CAST(:task AS integer[]),"
                 " CAST(:attempt AS integer[]), CAST(:event AS text[]),"
                 " CAST(:state AS text[]), CAST(:worker AS text[]),"
                 " CAST(:at AS double precision[]), CAST(:detail AS text[]))",
    "move": "UPDATE tasks SET state = :new, updated_at = :now"
            " WHERE pk = :pk AND state = :old RETURNING reqset",
    # {pks}: ":p0, :p1, ..." (see in_list). Only pk in the WHERE: with a condition on
    # state as well, SQLite (no statistics) prefers the state index from ~10 pks on and
    # scans every task of that state, a cost that grows with the graph (query-plan
    # test in tests/unit/test_database.py).
    "move_many": "UPDATE tasks SET state = :new, updated_at = :now WHERE pk IN ({pks})"
                 " RETURNING pk, reqset, state",
    # Run by the transaction after which no task is unfinished: the waiting workers take
    # the state they stored (see schema.py). Not a worker that holds a live attempt: it
    # waited once, but now runs an attempt of a shared task a sibling attempt completed.
    "release_waiters": "UPDATE workers SET state = leave_as, leave_as = NULL, stopped_at ="
                       " CASE WHEN leave_as = 'offline' THEN :now ELSE stopped_at END"
                       " WHERE state = 'busy' AND leave_as IS NOT NULL AND NOT EXISTS"
                       " (SELECT 1 FROM attempts WHERE attempts.worker = workers.id"
                       " AND attempts.ended_at IS NULL)",
    # Tasks failed or killed for good, by how often and what they need (by the state
    # index: failed and killed tasks only), and what live workers may run again.
    "failure_groups": "SELECT t.state, t.failures, t.kills, r.labels, count(*) FROM tasks t"
                      " JOIN reqsets r ON r.id = t.reqset WHERE t.state IN ('failed', 'killed')"
                      " GROUP BY t.state, t.failures, t.kills, r.labels",
    "live_budgets": "SELECT labels, max_failed, max_killed FROM workers"
                    " WHERE state IN ('idle', 'busy')",
}
# The history ("event_all") and "lock_counts" in one statement (one round trip).
SQL["event_all_lock_counts"] = f"WITH ev AS ({SQL['event_all']}) {SQL['lock_counts']}"
# What a step beside others decides from the counts once they are locked and bumped
# (Ledger._flush_beside), in SQL, so that it is sent with them and the commit: the
# waiting workers are released if no task is unfinished (nor failed or killed: a step
# beside others takes that path only when none is, and cannot make one so), and told
# of the commit if that, or (``maybe``: an attempt ended) what Ledger.wakes asks of the
# counts, holds. A statement alone with the counts sees every other step's commit.
_NOT_OVER = ("EXISTS (SELECT 1 FROM counts WHERE state IN ("
             + ", ".join(f"'{s}'" for s in (*UNFINISHED, TaskState.FAILED, TaskState.KILLED))
             + ") AND n <> 0)")
SQL["settle"] = (
    f"WITH released AS ({SQL['release_waiters']} AND NOT {_NOT_OVER} RETURNING 1)"
    f" SELECT {NOTIFY} WHERE NOT {_NOT_OVER} OR (:maybe AND (EXISTS (SELECT 1 FROM counts"
    " WHERE state = 'ready' AND n <> 0) OR NOT EXISTS (SELECT 1 FROM counts WHERE state ="
    " 'running' AND n <> 0) OR EXISTS (SELECT 1 FROM unnest(CAST(:touched AS integer[]))"
    " AS r(id) WHERE NOT EXISTS (SELECT 1 FROM counts c WHERE c.reqset = r.id AND c.state"
    " IN ('pending', 'running') AND c.n <> 0))))")
# "bump_all" that also tells the waiting workers of the commit (notices.py).
SQL["bump_all_notify"] = f"WITH bumped AS ({SQL['bump_all']} RETURNING 1) SELECT {NOTIFY}"


def in_list(values: Sequence[t.Any]) -> tuple[str, dict[str, t.Any]]:
    """Placeholders ``:p0, :p1, ...`` and their parameters, for ``IN ({pks})``."""
    return (", ".join(f":p{i}" for i in range(len(values))),
            {f"p{i}": v for i, v in enumerate(values)})


#: A server's forms of ``Ledger.in_pks`` and ``Ledger.pairs_in``: array parameters, so
#: that the statement's text does not change with the batch and the driver keeps it
#: prepared (psycopg caches no statement of more than 50 parameters). A pair is found
#: by its first key (an index) and the two keys as one number (``= ANY`` of a constant
#: array is a hash lookup): ``(a, b) IN (SELECT * FROM unnest(...))`` was planned, with
#: few statistics, as a join that scanned all pairs once per row, 256 x 256 in a step.
_ANY_PKS = "= ANY(CAST(:pks AS integer[]))"
_PAIRS_ANY = ("{a} = ANY(CAST(:pair_a AS integer[])) AND CAST({a} AS bigint) * 4294967296"
              " + {b} = ANY(CAST(:pair_ab AS bigint[]))")


#: ``:name`` placeholders, as ``sqlalchemy.text()`` finds them (not ``::`` casts).
_PLACEHOLDER = re.compile(r"(?<![:\w\x5c]):(\w+)(?!:)")
#: An array parameter, ``CAST(:name AS type[])``: sent in binary (``%(name)b``), which
#: psycopg dumps in a third (integers) to two thirds (text) of the CPU of the text
#: form, which checks every element for quoting (SCALING_ANALYSIS.md).
_ARRAY_PARAM = re.compile(r"CAST\(:(\w+) AS ([\w ]+)\[\]\)")


def pyformat(sql: str) -> str:
    """A statement's ``:name`` placeholders as psycopg's ``%(name)s`` (and a literal
    ``%`` doubled), for a server's driver connection. Cached, unless long: a statement
    with an IN list of a batch's keys (``in_list``) has a text of its own per size."""
    return _pyformat(sql) if len(sql) <= 4096 else _convert(sql)


def _convert(sql: str) -> str:
    sql = _ARRAY_PARAM.sub(r"CAST(%(\1)b AS \2[])", sql.replace("%", "%%"))
    return _PLACEHOLDER.sub(r"%(\1)s", sql)


_pyformat = functools.lru_cache(maxsize=512)(_convert)


class Ledger:
    """One transaction's statements and bookings (``counts`` is read at the start and
    kept up to date by ``record``). ``beside``: a step that runs beside other steps
    (on a server; claiming.py). ``tells``: on a server, the transaction notifies the
    waiting workers itself, and only if what it changed may concern them (``wakes``),
    instead of at every commit (a worker's step: notices.py)."""

    def __init__(self, conn: Connection, now: float, beside: bool = False,
                 tells: bool = False) -> None:
        self.conn = conn
        self.now = now
        self.beside = beside
        driver = conn.connection.driver_connection
        self._raw = driver if conn.dialect.name == "sqlite" else None
        #: A server's driver connection (psycopg): statements run on it directly, as on
        #: SQLite, in the transaction SQLAlchemy began (a fifth of the CPU per
        #: statement: SCALING_ANALYSIS.md, 'Measurements behind the code').
        self._server = driver if self._raw is None else None
        self._tells = tells and self._raw is None
        #: Set by a change the counts do not show that may concern a waiting worker (a
        #: worker left: what the live workers can run changed).
        self.wake = False
        #: An attempt ended: its resources and its task's slot are free (a shared task
        #: with a free slot stays 'ready', so the counts do not show it).
        self.ended = False
        self._deltas: dict[tuple[int, str], int] = {}
        self._events: list[dict[str, t.Any]] = []
        #: The cancel flag's stored value (cancelling.py, which keeps it up to date).
        self.cancel_flag: str | None = None
        rows: dict[int, dict[str, int]] = {}
        for reqset, state, n in self.all(SQL["counts"]):
            if reqset is None:
                self.cancel_flag = state
            else:
                rows.setdefault(reqset, {})[state] = n
        self.counts = Counts(rows)

    @property
    def server(self) -> bool:
        """A database server (PostgreSQL), not a SQLite file."""
        return self._raw is None

    # -- execution
    def all(self, sql: str, params: dict[str, t.Any] | None = None) -> list[tuple]:
        if self._raw is not None:
            return self._raw.execute(sql, params or {}).fetchall()
        return self._on_server(pyformat(sql), params or {}).fetchall()

    def scalar(self, sql: str, params: dict[str, t.Any] | None = None) -> t.Any:
        rows = self.all(sql, params)
        return rows[0][0] if rows else None

    def in_pks(self, values: Sequence[int]) -> tuple[str, dict[str, t.Any]]:
        """``{in_pks}`` of a statement (``pk {in_pks}``) and its parameters: SQLite
        ``IN (:p0, ...)``, a server ``= ANY(:pks)``."""
        if self._raw is not None:
            marks, params = in_list(values)
            return f"IN ({marks})", params
        return _ANY_PKS, {"pks": list(values)}

    def pairs_in(self, a: str, b: str, pairs: Sequence[tuple[int, int]]
                 ) -> tuple[str, dict[str, t.Any]]:
        """The condition "(column ``a``, column ``b``) is one of ``pairs``" (both
        non-negative 32-bit integers) and its parameters: SQLite ``(a, b) IN (VALUES
        (:a0, :b0), ...)``, a server two arrays (see _PAIRS_ANY)."""
        if self._raw is not None:
            params = {f"a{i}": x for i, (x, _) in enumerate(pairs)}
            params.update({f"b{i}": y for i, (_, y) in enumerate(pairs)})
            marks = ", ".join(f"(:a{i}, :b{i})" for i in range(len(pairs)))
            return f"({a}, {b}) IN (VALUES {marks})", params
        return _PAIRS_ANY.format(a=a, b=b), {"pair_a": [x for x, _ in pairs],
                                             "pair_ab": [(x << 32) + y for x, y in pairs]}

    def run_rows(self, sql: str, bulk: str, rows: list[dict[str, t.Any]]) -> int:
        """``sql`` once per row; on a server ``bulk`` once instead, with one array per
        column (psycopg's executemany sends a statement per row: for a batch of 64
        tasks' history that cost more than all other statements of a step together)."""
        if not rows:
            return 0
        if self._raw is not None:
            return self.run(sql, rows)
        return self.run(bulk, self._columns(rows))

    @staticmethod
    def _columns(rows: list[dict[str, t.Any]]) -> dict[str, list[t.Any]]:
        """Rows as one array per column (a server's bulk statements)."""
        return {key: [row[key] for row in rows] for key in rows[0]}

    def run(self, sql: str, params: dict[str, t.Any] | list[dict[str, t.Any]]) -> int:
        if isinstance(params, list) and not params:
            return 0  # nothing to run (SQLAlchemy would take [] for "no parameters")
        if self._raw is not None:
            if isinstance(params, list):
                return self._raw.executemany(sql, params).rowcount
            return self._raw.execute(sql, params).rowcount
        if isinstance(params, list):  # rare on a server (run_rows sends arrays)
            return self.conn.execute(sa.text(sql), params).rowcount
        return self._on_server(pyformat(sql), params).rowcount

    def _on_server(self, sql: str, params: dict[str, t.Any]) -> t.Any:
        """A statement on the driver connection (see ``_losing``)."""
        with self._losing():
            return self._server.execute(sql, params)

    @contextmanager
    def _losing(self) -> Iterator[None]:
        """Statements on the driver connection: one that lost the connection hands it
        to SQLAlchemy invalidated (no rollback on it: its error would hide this one)."""
        try:
            yield
        except BaseException:
            if self._server.broken or self._server.closed:
                self.conn.invalidate()
            raise

    # -- booking
    def record(self, moved: Sequence[tuple[int, int]], old: str, new: str, event: Event,
               worker: str | None, attempt: int | None = None, detail: str | None = None) -> None:
        """Book ``moved`` (pk, reqset) from ``old`` to ``new``: counts and history."""
        if old != new:
            check_transition(TaskState(old), TaskState(new))
            rows = self.counts.rows
            for _pk, reqset in moved:
                for state, delta in ((old, -1), (new, 1)):
                    key = (reqset, state)
                    self._deltas[key] = self._deltas.get(key, 0) + delta
                    by_state = rows.setdefault(reqset, {})
                    by_state[state] = by_state.get(state, 0) + delta
        self.note([pk for pk, _ in moved], event, new, worker, attempt, detail)

    def note(self, pks: Sequence[int], event: Event, state: str | None, worker: str | None,
             attempt: int | None = None, detail: str | None = None) -> None:
        """Append history rows; ``state`` is None for events that change no state."""
        self._events.extend(
            {"task": pk, "attempt": attempt, "event": event.value, "state": state,
             "worker": worker, "at": self.now, "detail": detail}
            for pk in pks
        )

    def move(self, pk: int, old: str, new: str, event: Event, worker: str | None,
             attempt: int | None = None, detail: str | None = None) -> None:
        """Change one task's state (it must be ``old``) and book it."""
        reqset = self.scalar(SQL["move"], {"pk": pk, "old": old, "new": new, "now": self.now})
        if reqset is None:
            raise AssertionError(f"task pk {pk} was not in state {old!r}")
        self.record([(pk, reqset)], old, new, event, worker, attempt, detail)

    def move_all(self, pks: Sequence[int], new: str, event: Event, worker: str | None,
                 detail: str | None = None) -> None:
        """Set tasks (whatever states they were in: each is booked from its own) to
        ``new``; in chunks, by primary key."""
        for start in range(0, len(pks), 5000):
            marks, params = in_list(pks[start:start + 5000])
            before = dict(self.all(f"SELECT pk, state FROM tasks WHERE pk IN ({marks})",
                                   params))
            rows = self.all(SQL["move_many"].format(pks=marks),
                            {**params, "new": new, "now": self.now})
            for pk, reqset, _state in rows:
                self.record([(pk, reqset)], before[pk], new, event, worker, detail=detail)

    def final_failures(self) -> int:
        """Tasks failed or killed for good that no live worker may run again (its labels
        cover the task's requirements and its budget its failures or kills)."""
        if not self.counts.n([TaskState.FAILED, TaskState.KILLED]):
            return 0
        live = [(frozenset(json.loads(labels)), failed, killed)
                for labels, failed, killed in self.all(SQL["live_budgets"])]
        final = 0
        for state, failures, kills, labels, n in self.all(SQL["failure_groups"]):
            needs = frozenset(json.loads(labels))
            if not any(needs <= has and (budget_f >= failures if state == TaskState.FAILED
                                         else budget_k >= kills)
                       for has, budget_f, budget_k in live):
                final += n
        return final

    def _workflow_over(self) -> bool:
        """No task is unfinished, and no live worker's budget runs a failed one again."""
        failed = self.counts.n([TaskState.FAILED, TaskState.KILLED])
        return not self.counts.n(UNFINISHED) and (not failed or self.final_failures() == failed)

    def wakes(self) -> bool:
        """May what this transaction changed let a waiting worker claim a task or leave
        (waiting.py; the rules of workers.done_for and Counts.can_change)? Tasks became
        ready; a task left the usual path (failed, killed, blocked, cancelled, back to
        pending ...); attempts ended (``ended``, or a running task's count fell) while
        tasks are ready (resources or a shared task's slot freed: such a task stays
        'ready' while a slot is free), or ended the last running task anywhere, or the
        last unfinished one of a requirement set; a worker left. Not: claims, and
        completions that make nothing ready (the tail of a run, where most workers
        wait). Whatever this misses a waiter still reads within POLL_MAX."""
        reason = self._wake_reason()
        return self._wakes_after() if reason is None else reason

    def _wake_reason(self) -> bool | None:
        """``wakes`` as far as what this transaction changed decides it; None: an
        attempt ended, and the counts after it decide (``_wakes_after``)."""
        if self.wake:
            return True
        ended = self.ended
        for (_reqset, state), delta in self._deltas.items():
            if delta > 0 and state == S.READY:
                return True
            if delta and state not in (S.READY, S.RUNNING, S.COMPLETED):
                return True
            ended = ended or (delta < 0 and state == S.RUNNING)
        return None if ended else False

    def _touched(self) -> set[int]:
        return {reqset for (reqset, _), delta in self._deltas.items() if delta}

    def _wakes_after(self) -> bool:
        """``wakes`` after an attempt ended (SQL["settle"] asks the same in SQL)."""
        counts = self.counts
        if counts.n([S.READY]) or not counts.n([S.RUNNING]):
            return True
        return any(not counts.n([S.PENDING, S.RUNNING], [r]) for r in self._touched())

    def _lock_counts(self, history: bool) -> None:
        """Lock the counts (a step beside others) and take in what the steps that
        committed since this one began changed: ``counts`` is then what this commit
        leaves (in place: a step's result holds the object). ``history``: write the
        collected history rows in the same statement."""
        self._take_counts(self.all(*self._lock_statement(history)))

    def _lock_statement(self, history: bool) -> tuple[str, dict[str, t.Any] | None]:
        if history:
            return SQL["event_all_lock_counts"], self._columns(self._events)
        return SQL["lock_counts"], None

    def _take_counts(self, locked: list[tuple]) -> None:
        """The counts as the lock found them, plus this transaction's changes."""
        rows: dict[int, dict[str, int]] = {}
        for reqset, state, n in locked:
            rows.setdefault(reqset, {})[state] = n
        for (reqset, state), delta in self._deltas.items():
            by_state = rows.setdefault(reqset, {})
            by_state[state] = by_state.get(state, 0) + delta
        self.counts.rows.clear()
        self.counts.rows.update(rows)

    def flush(self) -> None:
        """Write the collected count changes and history rows; if no task is
        unfinished any more, release the waiting workers. A transaction that
        ``tells`` notifies the waiting workers if its changes concern them."""
        # The history first: the counts rows, once written, are locked until the
        # commit, and every step writes them (steps beside others wait for each other).
        # A step beside others that locks them writes its history in that statement: a
        # round trip less, for the server's time to insert the rows under the lock.
        bumps = [{"reqset": r, "state": s, "delta": d} for (r, s), d in self._deltas.items() if d]
        locks = bool(bumps) and self.beside
        if locks and not self.counts.n([TaskState.FAILED, TaskState.KILLED]):
            self._flush_beside(bumps)
            return
        if self._events and not locks:
            self.run_rows(SQL["event"], SQL["event_all"], self._events)
        if locks:
            self._lock_counts(history=bool(self._events))
        over = bool(bumps) and self._workflow_over()
        notify = self._tells and (over or self.wakes())
        if bumps:
            # Notifying in the same statement costs no round trip of its own (only a
            # server notifies: "bump" is SQLite's form).
            self.run_rows(SQL["bump"], SQL["bump_all_notify" if notify else "bump_all"],
                          bumps)
            if over:
                self.run(SQL["release_waiters"], {"now": self.now})
        elif notify:
            self.all(SQL["notify"])
        self._deltas.clear()
        self._events.clear()

    def _flush_beside(self, bumps: list[dict[str, t.Any]]) -> None:
        """``flush`` of a step beside others, and its commit, in one round trip (a
        pipeline): the history and the lock of the counts, their bump, what is decided
        from them (SQL["settle"]) and the commit. The counts are locked for the server's
        time to run these, not for three round trips: every step waits for them, and
        on a loaded machine a round trip is a wait for the CPU as well
        (SCALING_ANALYSIS.md). Only steps run beside others, and a step tells the
        waiting workers itself (``tells``). With failed or killed tasks ``flush``
        decides in Python (final_failures); their number does not change meanwhile
        (what fails is recorded by a step alone, which waits for every step beside)."""
        reason = self._wake_reason()
        sql, params = self._lock_statement(history=bool(self._events))
        server = self._server
        with self._losing(), server.pipeline():
            locked = server.execute(pyformat(sql), params)
            bump = SQL["bump_all_notify" if reason else "bump_all"]
            server.execute(pyformat(bump), self._columns(bumps))
            # Fewer tasks unfinished: the workflow may be over.
            over = sum(b["delta"] for b in bumps if b["state"] in UNFINISHED) < 0
            maybe = reason is None
            if maybe or over:
                server.execute(pyformat(SQL["settle"]),
                               {"maybe": maybe, "touched": sorted(self._touched()),
                                "now": self.now})
            server.commit()
        self._take_counts(locked.fetchall())
        self._deltas.clear()
        self._events.clear()
