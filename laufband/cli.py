"""The ``laufband`` command: look at and steer a workflow from any shell (a login node).

Parses arguments and renders what ``Monitor`` (the Python API, read-only) returns;
the few commands that change a workflow (``retry``, ``limits NAME=N``, ``prune``) call
the store's write verbs; ``submit`` starts workers as a SLURM job array (submit.py).
Tables are drawn with rich (they fit an 80-column terminal and survive pipes); every
table command also takes ``--json``, whose layout is documented in the README
("Operations").

Exit codes: 0 success; 1 the command ran but found a problem it reports (``retry``
declined, sbatch refused the job); 2 bad arguments, no database, or a database
laufband cannot read.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import shlex
import sys
import time
import typing as t
from pathlib import Path

from laufband.errors import ConfigError, LaufbandError
from laufband.walltime import duration

if t.TYPE_CHECKING:
    from rich.console import Console

    from laufband.monitor import Monitor
    from laufband.store import Store

DEFAULT_FILES = ("graphband.sqlite", "laufband.sqlite")


# ------------------------------------------------------------------ databases
def open_store(db: str) -> Store:
    """The workflow database ``db`` (a path or a URL), opened read-only."""
    from laufband.store import Store, database_url

    return Store.open_read_only(database_url(db, "--db"))


def default_db(announce: bool = False) -> str:
    """$LAUFBAND_DB, else the one workflow database in the current folder (said on
    stderr with ``announce``)."""
    if os.environ.get("LAUFBAND_DB"):
        return os.environ["LAUFBAND_DB"]
    found = [name for name in DEFAULT_FILES if os.path.exists(name)]
    if len(found) > 1:
        raise LaufbandError(f"Both {' and '.join(found)} are here: say which with --db.")
    if not found:
        raise LaufbandError(f"No workflow database here ({' or '.join(DEFAULT_FILES)}): "
                            "run from the folder of your workers, or pass --db PATH.")
    if announce:
        print(f"laufband: using {found[0]} (pass --db to choose)", file=sys.stderr)
    return found[0]


def _monitor(store: Store) -> Monitor:
    from laufband.monitor import Monitor

    return Monitor.of(store)


def _console(out: t.TextIO | None) -> Console:
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich exits with 1 here; `laufband status | head` is a success (main()).
            self.quiet = True
            raise BrokenPipeError

    # Not a terminal (a pipe, a file, a test): 80 columns, no colours.
    return _Console(file=out or sys.stdout, highlight=False, soft_wrap=False,
                    width=None if (out or sys.stdout).isatty() else 80)


def _print(con: Console, renderable: t.Any) -> None:
    """Print without the trailing blanks a table pads its last column with."""
    with con.capture() as captured:
        con.print(renderable)
    con.file.write("\n".join(line.rstrip() for line in captured.get().splitlines()) + "\n")


_ago = duration  # "45 s", "12 min", "3.5 h"


# --------------------------------------------------------------------- status
def status_data(store: Store) -> dict[str, t.Any]:
    view = _monitor(store).status()
    total = view.total or 1
    cancel = store.cancelled()
    return {
        "cancelled": None if cancel is None else {"by": cancel.by, "at": cancel.at,
                                                  "drain_s": cancel.drain},
        "total": view.total,
        "counts": {s: n for s, n in view.counts.items() if n},
        "percent": {s: round(100.0 * n / total, 1) for s, n in view.counts.items() if n},
        "invalidated": view.invalidated,
        "throughput_per_min": {f"{int(w // 60)}m": round(r, 2)
                               for w, r in view.throughput.items()},
        "eta_s": None if view.eta_s is None else round(view.eta_s, 1),
        "runtimes_s": {k: round(v, 4) for k, v in view.runtimes.items()},
        "workers": view.workers,
        "running": [{"task": r["id"], "attempt": r["attempt"], "worker": r["worker"],
                     "for_s": round(max(0.0, view.at - r["started_at"]), 1)}
                    for r in view.running],
        "failures": [{"error": g.error, "count": g.count, "examples": g.examples}
                     for g in view.failures],
        "starved": [{"labels": sorted(labels), "tasks": n} for labels, n in view.starved],
    }


def status(store: Store, out: t.TextIO | None = None, data: dict | None = None) -> None:
    """Progress by state, speed and ETA, runtimes, workers, what runs, what failed, and
    tasks that wait for labels no live worker has."""
    from rich.table import Table

    d = data or status_data(store)
    con = _console(out)
    total, done = d["total"], d["counts"].get("completed", 0)
    pct = 100.0 * done / total if total else 100.0
    con.print(f"tasks: {done}/{total} completed ({pct:.1f} %)")
    if d["cancelled"]:
        c = d["cancelled"]
        con.print(f"CANCELLED by {c['by']} {_ago(time.time() - c['at'])} ago "
                  "(`laufband resume` undoes it)")
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2))
    for state, n in d["counts"].items():
        note = "not in the graph any more" if state == "removed" else ""
        table.add_row(f"  {state}", str(n), f"{d['percent'][state]:.1f} %", note)
    _print(con, table)
    if d["invalidated"]:
        con.print(f"  of which {d['invalidated']} run again: invalidated (fingerprints)")
    rates = ", ".join(f"{r:g}/min ({w})" for w, r in d["throughput_per_min"].items())
    eta = d["eta_s"]
    con.print(f"throughput: {rates}" + (f"; ETA {_ago(eta)}" if eta else ""))
    rt = d["runtimes_s"]
    if rt:
        # From claim to record: a task claimed in a batch or ahead waits in it too.
        con.print(f"claim to completion, last {int(rt['n'])}: median {rt['median']:.3g} s, "
                  f"p90 {rt['p90']:.3g} s, max {rt['max']:.3g} s")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(d["workers"].items()))
    con.print(f"workers: {sum(d['workers'].values())} ({summary or 'none'})")
    for r in d["running"][:20]:
        con.print(f"  running {r['task']!r} (attempt {r['attempt']}) on {r['worker']} "
                  f"for {_ago(r['for_s'])}")
    if len(d["running"]) > 20:
        con.print(f"  ... and {len(d['running']) - 20} more running")
    if d["failures"]:
        con.print("failed or killed for good, by error:")
        for g in d["failures"][:10]:
            more = ", ..." if g["count"] > len(g["examples"]) else ""
            con.print(f"  {g['count']:>6} x {g['error']}  "
                      f"({', '.join(map(repr, g['examples']))}{more})")
    for s in d["starved"]:
        con.print(f"waiting for a worker with labels {{{', '.join(s['labels'])}}}: "
                  f"{s['tasks']} task(s); no live worker has them")


# -------------------------------------------------------------------- workers
def workers_data(store: Store) -> list[dict[str, t.Any]]:
    now = time.time()
    result = []
    for w in store.workers():
        end = w.get("allocation_end")
        result.append({
            "id": w["id"], "state": w["state"], "host": w["hostname"], "pid": w["pid"],
            "labels": sorted(w["labels"]),
            "heartbeat_age_s": round(max(0.0, now - w["heartbeat"]), 1),
            "heartbeat_expired": now - w["heartbeat"] > w["heartbeat_timeout"],
            "threads": w.get("threads", 1), "completed": w.get("completed", 0),
            "slurm": w.get("slurm"), "allocation_end": end,
            "allocation_left_s": None if end is None else round(end - now, 1),
            "running": [{"task": tid, "for_s": round(max(0.0, now - at), 1)}
                        for tid, at in zip(w["running"], w["running_since"], strict=True)],
        })
    return result


def workers_table(store: Store, out: t.TextIO | None = None,
                  data: list[dict] | None = None) -> None:
    """Workers grouped by their labels (a family: the workers of one stage or kind),
    each with what it runs now and how long."""
    from rich.table import Table

    rows = data if data is not None else workers_data(store)
    con = _console(out)
    families: dict[str, list[dict]] = {}
    for w in rows:
        families.setdefault(",".join(w["labels"]) or "-", []).append(w)
    for labels, members in sorted(families.items()):
        states: dict[str, int] = {}
        for w in members:
            states[w["state"]] = states.get(w["state"], 0) + 1
        summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        con.print(f"labels {labels}: {len(members)} worker(s) ({summary})")
        table = Table(box=None, pad_edge=False, padding=(0, 1), show_edge=False)
        # "left": time until the allocation ends (workers in SLURM jobs with a limit).
        limited = any(w["allocation_end"] is not None for w in members)
        for name, justify in (("  worker", "left"), ("state", "left"), ("host", "left"),
                              ("pid", "right"), ("beat", "right"), ("done", "right"),
                              *((("left", "right"),) if limited else ()),
                              ("running", "left")):
            table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for w in members:
            run = w["running"]
            doing = "-" if not run else f"{run[0]['task']} ({_ago(run[0]['for_s'])})" + (
                f" +{len(run) - 1}" if len(run) > 1 else "")
            state = w["state"] + ("!" if w["heartbeat_expired"] and w["state"] in
                                  ("idle", "busy") else "")
            slurm = w["slurm"] or {}
            job = (f"{slurm['array_job']}_{slurm['array_task']}" if "array_task" in slurm
                   else slurm.get("job"))
            host = f"{w['host']} ({job})" if job else w["host"]
            left = w["allocation_left_s"]
            ends = [] if not limited else [
                "-" if left is None or w["state"] not in ("idle", "busy") else _ago(left)]
            table.add_row(f"  {w['id']}", state, host, str(w["pid"]),
                          _ago(w["heartbeat_age_s"]), str(w["completed"]), *ends, doing)
        _print(con, table)


# ---------------------------------------------------------------------- tasks
def tasks_data(store: Store, state: str | None, label: str | None, limit: int | None
               ) -> list[dict[str, t.Any]]:
    try:
        views = _monitor(store).get_tasks(state=state, label=label, limit=limit)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return [{"id": v.id, "state": v.status, "attempts": v.attempts,
             "failures": v.failed_retries, "kills": v.killed_retries, "worker": v.worker_id,
             "updated_at": v.current_status.timestamp.timestamp(),
             "runtime_s": None if v.runtime < 0 else round(v.runtime, 4),
             "last_error": v.last_error} for v in views]


def tasks_table(rows: list[dict], out: t.TextIO | None = None) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, padding=(0, 1))
    for name in ("task", "state", "att", "worker", "runtime", "last error"):
        table.add_column(name, overflow="fold")
    for r in rows:
        runtime = "-" if r["runtime_s"] is None else f"{r['runtime_s']:.3g} s"
        table.add_row(r["id"], r["state"], str(r["attempts"]), r["worker"] or "-", runtime,
                      (r["last_error"] or "")[:60])
    _print(_console(out), table)


# -------------------------------------------------------------------- explain
def explain_data(store: Store, task_id: str) -> dict[str, t.Any]:
    try:
        found = _monitor(store).explain(task_id)
    except KeyError:
        raise LaufbandError(f"No task {task_id!r} in this workflow (`laufband tasks` "
                            "lists them).") from None
    d, task = found.detail, found.task
    return {
        "id": task.id, "state": task.state, "label": task.label,
        "attempts": task.attempts, "failures": task.failures, "kills": task.kills,
        "waiting_for": [{"task": tid, "state": state} for tid, state in d.waiting_for],
        "dependents": d.dependents,
        "requirements": sorted(task.requirements), "runnable_by": found.runnable_by,
        "attempt_list": [{"attempt": a.attempt, "worker": a.worker, "outcome": a.outcome
                          or "running", "started_at": a.started_at, "ended_at": a.ended_at,
                          "error": a.error, "traceback": a.traceback} for a in d.attempts],
        "why": d.why,
        "history": [{"at": at, "event": ev, "state": st, "worker": wk, "detail": de}
                    for at, ev, st, wk, de in d.history[-20:]],
    }


def explain(d: dict, out: t.TextIO | None = None) -> None:
    con = _console(out)
    con.print(f"task {d['id']!r}: {d['state']}" + (f"  ({d['label']})" if d["label"] else ""))
    if d["waiting_for"]:
        waits = ", ".join(f"{w['task']!r} ({w['state']})" for w in d["waiting_for"][:10])
        more = len(d["waiting_for"]) - 10
        con.print(f"  waits for {len(d['waiting_for'])} dependencies: {waits}"
                  + (f" and {more} more" if more > 0 else ""))
    if d["requirements"]:
        who = (f"live workers that have them: {', '.join(d['runnable_by'][:5])}"
               if d["runnable_by"] else "no live worker has them")
        con.print(f"  needs labels {{{', '.join(d['requirements'])}}}: {who}")
    elif d["state"] in ("ready", "pending") and not d["runnable_by"]:
        con.print("  no live worker right now")
    for reason in d["why"]:
        con.print(f"  runs again: {reason}")
    con.print(f"  {d['attempts']} attempt(s), {d['failures']} failed, {d['kills']} killed; "
              f"{d['dependents']} task(s) depend on it")
    for a in d["attempt_list"]:
        took = "" if a["ended_at"] is None else f" after {a['ended_at'] - a['started_at']:.3g} s"
        con.print(f"  attempt {a['attempt']} on {a['worker']}: {a['outcome']}{took}")
        if a["error"]:
            con.print(f"    {a['error']}")
        if a["traceback"]:
            for line in a["traceback"].rstrip().splitlines()[-12:]:
                con.print(f"    | {line}", markup=False)


# ---------------------------------------------------------------- other commands
def limits_table(store: Store, out: t.TextIO | None = None) -> None:
    con = _console(out)
    usage = store.limits()
    if not usage:
        con.print("no limits (tasks declare resources, workers limits={...})")
        return
    con.print(f"{'resource':<20} {'limit':>7} {'held':>7}")
    for name, (capacity, held) in usage.items():
        con.print(f"{name:<20} {capacity:>7} {held:>7}")


def results(store: Store, as_json: bool, out: t.TextIO | None = None) -> None:
    """Results in graph order; --json: one object (its keys keep that order)."""
    out = out or sys.stdout
    rows = store.results()
    if as_json:
        body = ", ".join(f"{json.dumps(tid)}: {raw if raw is not None else 'null'}"
                         for tid, raw in rows)
        print("{" + body + "}", file=out)
        return
    for tid, raw in rows:
        print(f"{tid}\t{raw if raw is not None else ''}", file=out)


def parse_limits(pairs: list[str]) -> dict[str, int]:
    """NAME=N arguments as limits (ConfigError for anything else)."""
    from laufband.store.resources import check_limits

    parsed: dict[str, t.Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"{pair!r}: write NAME=N, e.g. api=4")
        try:
            parsed[name] = int(value)
        except ValueError:
            parsed[name] = value
    return check_limits(parsed, "laufband limits")


def writable_store(db: str) -> Store:
    """The workflow's database for a command that changes it, under its database lock
    (as workers take it). Never creates one."""
    from laufband.store import Store, database_url, sqlite_path
    from laufband.store.connection import absolute_url

    url = database_url(db, "--db")
    path = sqlite_path(absolute_url(url))
    if path is not None and not os.path.exists(path):
        raise LaufbandError(f"No workflow database at {path}.")
    return Store.open_existing(url)


def set_limits(db: str, pairs: list[str]) -> None:
    limits = parse_limits(pairs)
    now = writable_store(db).set_limits(limits, f"laufband limits ({getpass.getuser()})")
    print("limits: " + ", ".join(f"{k}={v}" for k, v in now.items()))


def retry(db: str, args: argparse.Namespace) -> int:
    """Say what will run again, ask (unless --yes), then do it in one transaction."""
    states = [s for s in ("failed", "killed", "blocked") if getattr(args, s)]
    if not args.tasks and not states:
        raise ConfigError("retry what? Name tasks, or give --failed, --killed or --blocked.")
    store = writable_store(db)
    plan = store.retry_plan(args.tasks, states)
    if not plan.pks:
        print("nothing to retry: no task matches")
        return 0
    kinds = ", ".join(f"{n} {state}" for state, n in sorted(plan.states.items()))
    shown = ", ".join(map(repr, plan.ids[:5])) + (", ..." if len(plan.ids) > 5 else "")
    print(f"will run {len(plan.ids)} task(s) again ({kinds}): {shown}; their retry budget "
          f"starts again, and {plan.blocked} blocked task(s) below them wait for them")
    if not args.yes:
        if not sys.stdin.isatty():
            print("laufband: not a terminal to ask on: add --yes to go ahead",
                  file=sys.stderr)
            return 1
        if input("go ahead? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing changed")
            return 1
    done = store.retry(args.tasks, states, f"laufband retry ({getpass.getuser()})")
    print(f"{len(done.ids)} task(s) ready to run again; start workers to run them")
    if store.cancelled() is not None:
        print("laufband: the workflow is cancelled: workers leave at once until "
              "`laufband resume`", file=sys.stderr)
    return 0


def watch_view(store: Store) -> t.Any:
    """One frame of ``laufband watch``: progress, states, workers, latest failures."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    d = status_data(store)
    total, done = d["total"], d["counts"].get("completed", 0)
    rates = d["throughput_per_min"]
    head = Text(f"{done}/{total} completed  {rates.get('1m', 0):g}/min"
                + (f"  ETA {_ago(d['eta_s'])}" if d["eta_s"] else "")
                + ("  CANCELLED" if d["cancelled"] else ""))
    states = Table.grid(padding=(0, 2))
    states.add_row(*(f"{s} {n}" for s, n in d["counts"].items()))
    workers = Table(box=None, pad_edge=False, padding=(0, 1), title_justify="left")
    for name in ("worker", "state", "beat", "done", "running"):
        workers.add_column(name, overflow="ellipsis", no_wrap=True)
    rows = sorted(workers_data(store), key=lambda w: (w["state"] not in ("busy", "idle"),
                                                      w["id"]))
    for w in rows[:15]:
        run = w["running"]
        doing = "-" if not run else f"{run[0]['task']} ({_ago(run[0]['for_s'])})"
        workers.add_row(w["id"], w["state"], _ago(w["heartbeat_age_s"]), str(w["completed"]),
                        doing)
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=max(total, 1), completed=done, width=60),
                f"{100.0 * done / total if total else 100.0:.1f} %")
    parts: list[t.Any] = [head, bar, states, workers]
    if len(rows) > 15:
        parts.append(Text(f"... and {len(rows) - 15} more workers"))
    for g in d["failures"][:5]:
        parts.append(Text(f"{g['count']} x {g['error']}", overflow="ellipsis", no_wrap=True))
    parts.append(Text("q or Ctrl-C quits", style="dim"))
    return Group(*parts)


def watch(db: str, interval: float, count: int | None) -> int:
    """A live view, refreshed every ``interval`` seconds; q or Ctrl-C quits (``count``:
    after that many frames)."""
    from rich.live import Live

    if interval <= 0 or interval != interval:
        raise ConfigError(f"--interval {interval}: give a number of seconds > 0")
    store = open_store(db)
    frames = 0
    # The try is outside the with: a signal may come while the first frame is drawn
    # (Live's __enter__), and the contexts restore the terminal on the way out.
    try:
        with _quit_on_hangup(), _keys() as pressed, Live(
                watch_view(store), auto_refresh=False, console=_console(None)) as live:
            while count is None or frames < count - 1:
                if pressed(interval) == "q":
                    break
                live.update(watch_view(store), refresh=True)
                frames += 1
    except KeyboardInterrupt:
        pass
    return 0


@contextlib.contextmanager
def _quit_on_hangup() -> t.Iterator[None]:
    """SIGTERM or SIGHUP (a closed terminal) quit watch like Ctrl-C: the terminal mode
    is restored on the way out."""
    import signal

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _keys:
    """Single key presses on a terminal (no Enter needed), restored on the way out;
    elsewhere just the waiting."""

    def __enter__(self) -> t.Callable[[float], str | None]:
        self._saved = None
        if sys.stdin.isatty():
            import termios
            import tty

            self._saved = termios.tcgetattr(sys.stdin)
            tty.setcbreak(sys.stdin.fileno())
        return self._read

    def _read(self, timeout: float) -> str | None:
        if self._saved is None:
            time.sleep(timeout)
            return None
        import select

        ready, _, _ = select.select([sys.stdin], [], [], timeout)
        return sys.stdin.read(1) if ready else None

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, self._saved)


#: ``laufband cancel`` exit codes: every running task finished within the drain (0), or
#: some were abandoned (3).
ABANDONED_EXIT = 3


def cancel(db: str, drain: float) -> int:
    """Cancel, wait for the running tasks up to the drain timeout, record what still
    runs as cancelled, and say how it went."""
    import math

    if not math.isfinite(drain) or drain < 0:
        raise ConfigError(f"--drain-timeout {drain}: give a number of seconds >= 0")
    store = writable_store(db)
    who = f"laufband cancel ({getpass.getuser()})"
    flag, stopped, running = store.cancel(drain, who)
    print(f"cancelled: workers stop claiming; {stopped} task(s) that had not started are "
          f"cancelled; {running} running, waiting up to {flag.drain:g} s for them")
    try:
        while (store.live_attempts() and time.time() < flag.deadline
               and store.cancelled() == flag):
            time.sleep(min(0.2, max(0.0, flag.deadline - time.time())))
    except KeyboardInterrupt:
        print("\nlaufband: interrupted: the workflow stays cancelled, but what still runs "
              "was not abandoned; `laufband cancel --drain-timeout 0` abandons it now, "
              "`laufband resume` undoes the cancel.", file=sys.stderr)
        return 130
    abandoned = store.abandon(who, flag)
    if abandoned is None:
        print("the workflow was resumed (or cancelled anew) during the drain: nothing "
              "abandoned")
        return 0
    print(f"{running} running at the cancel: {running - abandoned} finished within the "
          f"drain, {abandoned} abandoned (recorded cancelled; their workers' results will "
          "be discarded). `laufband resume` undoes the cancel.")
    return ABANDONED_EXIT if abandoned else 0


# ----------------------------------------------------------------------- main
TABLES = ("status", "workers", "tasks", "explain")


def _parser() -> argparse.ArgumentParser:
    from laufband import __version__

    parser = argparse.ArgumentParser(
        prog="laufband", description="Look at and steer a laufband workflow.")
    db_help = ("database path or URL (default: $LAUFBAND_DB, or graphband.sqlite / "
               "laufband.sqlite in this folder)")
    parser.add_argument("--db", help=db_help)
    parser.add_argument("--version", action="version", version=f"laufband {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, text in (
            ("status", "progress, throughput and ETA, runtimes, workers, failures"),
            ("workers", "workers by family (labels): state, heartbeat, what they run"),
            ("tasks", "tasks with their state, attempts, worker and last error"),
            ("explain", "why a task is in its state: dependencies, labels, attempts"),
            ("retry", "run failed, killed (and so blocked) tasks again, fresh budget"),
            ("watch", "a live view: progress, states, workers, failures (q quits)"),
            ("cancel", "stop the workflow: no more claims, running tasks drain"),
            ("resume", "undo a cancel: workers may run the workflow again"),
            ("results", "every completed task's result, in graph order"),
            ("limits", "show the global resource limits, or set them: limits api=4"),
            ("report", "a report: HTML (timeline, throughput, tables), or PNG/SVG"),
            ("prune", "delete old history (safe while workers run)")):
        commands[name] = sub.add_parser(name, help=text, description=text)
        # --db after the command too (then it wins)
        commands[name].add_argument("--db", default=argparse.SUPPRESS, help=db_help)
        if name in (*TABLES, "results"):
            commands[name].add_argument("--json", action="store_true",
                                        help="machine-readable output (see README)")
    commands["tasks"].add_argument("--state", help="only tasks in this state")
    commands["tasks"].add_argument("--label", help="only tasks that need this label")
    commands["tasks"].add_argument("--limit", type=int, default=None,
                                   help="at most this many (graph order)")
    commands["explain"].add_argument("task", help="the task id")
    retry = commands["retry"]
    retry.add_argument("tasks", nargs="*", metavar="TASK",
                       help="task ids (a blocked one: what blocks it)")
    for state in ("failed", "killed", "blocked"):
        retry.add_argument(f"--{state}", action="store_true", help=f"every {state} task"
                           + (" (what blocks it)" if state == "blocked" else ""))
    retry.add_argument("--yes", "-y", action="store_true", help="do not ask first")
    commands["watch"].add_argument("--interval", type=float, default=2.0,
                                   help="seconds between refreshes (default 2)")
    commands["watch"].add_argument("--count", type=int, default=None,
                                   help="quit after this many frames")
    commands["report"].add_argument(
        "--output", "-o", default="report.html",
        help="report.html (self-contained), or .png / .svg (pip install "
             "'laufband[report]'); default report.html")
    commands["cancel"].add_argument(
        "--drain-timeout", type=float, default=60.0, metavar="SECONDS",
        help="how long running tasks may take to finish (default 60); then they are "
             "recorded cancelled")
    commands["prune"].add_argument("--keep", type=int, default=10, help="history rows to "
                                   "keep per task, newest first (default 10)")
    commands["prune"].add_argument("--vacuum", action="store_true",
                                   help="then shrink the file (workers wait meanwhile)")
    commands["limits"].add_argument("set", nargs="*", metavar="NAME=N",
                                    help="new limits (running tasks keep what they hold)")
    _submit_parser(sub)
    return parser


SUBMIT = "start N workers as a SLURM job array (writes the script, runs sbatch)"


def _submit_parser(sub: t.Any) -> None:
    """``submit``: its own options, by their full names only (allow_abbrev=False), so
    that every other option is sbatch's and passes through unchanged (main())."""
    from laufband.submit import OUTPUT, SIGNAL

    submit = sub.add_parser(
        "submit", help=SUBMIT, allow_abbrev=False,
        usage="laufband submit --workers N [--db PATH|URL] [--dry-run] [SBATCH OPTION ...]"
              " -- COMMAND ...",
        description=f"{SUBMIT[0].upper()}{SUBMIT[1:]}: writes laufband-submit-<time>"
        ".sbatch into the current folder (keep it to read it or to submit it again: "
        "`sbatch` it from this folder adds N more workers), submits it, and prints the "
        "job id. Each array task runs COMMAND in the current folder (exec, so SLURM's "
        f"signals reach it) with LAUFBAND_IDENTIFIER=ARRAYJOB_TASK; --signal={SIGNAL} "
        f"(drain before the time limit) unless you give --signal, --requeue, output in "
        f"{OUTPUT}. Any other option before -- goes to sbatch unchanged, e.g. "
        "--time=02:00:00 --partition=x (not --array: --workers sizes it).",
        epilog="example: laufband submit --workers 8 --db runs/wf.sqlite --time=01:00:00 "
               "-- python main.py")
    submit.add_argument("--workers", type=int, required=True, metavar="N",
                        help="array tasks, one worker each (0-(N-1))")
    submit.add_argument(
        "--db", default=argparse.SUPPRESS, metavar="PATH|URL",
        help="the workers' LAUFBAND_DB (made absolute). It must be on a file system every "
             "node sees (home or project space; not /tmp or node-local scratch). Default: "
             "$LAUFBAND_DB; without either the workers use their own db=")
    submit.add_argument("--dry-run", action="store_true",
                        help="print the script; write and submit nothing")


def _command_of(argv: list[str]) -> str | None:
    """The command word: the first argument that is neither an option nor --db's value."""
    words = iter(argv)
    for arg in words:
        if arg == "--db":
            next(words, None)
        elif not arg.startswith("-"):
            return arg
    return None


def _parse(argv: list[str]) -> argparse.Namespace:
    """The arguments; for ``submit``, the workers' command (after the first ``--``) in
    ``args.run`` and every option laufband does not know, in order, in ``args.sbatch``."""
    parser = _parser()
    if _command_of(argv) != "submit":
        return parser.parse_args(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, args.sbatch = parser.parse_known_args(argv[:cut])
    args.run = argv[cut + 1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    try:
        return _run(args)
    except LaufbandError as exc:
        print(f"laufband: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `laufband status | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def submit(args: argparse.Namespace) -> int:
    """Write the array script and submit it (or print it: --dry-run); where it is, the
    job id and how to watch."""
    from laufband import submit as sub

    sub.check(args.workers, args.run, args.sbatch)
    given = args.db or os.environ.get("LAUFBAND_DB")
    db = sub.worker_db(given) if given else None
    folder = os.getcwd()
    if args.dry_run:
        print(sub.script_text(args.workers, args.run, args.sbatch, db, folder,
                              sub.script_name()), end="")
        return 0
    try:
        job = sub.submit(args.workers, args.run, args.sbatch, db, Path(folder))
    except sub.SbatchError as exc:
        print(f"laufband: {exc}", file=sys.stderr)
        return 1
    if job.warnings.strip():
        print(job.warnings.rstrip(), file=sys.stderr)
    from laufband.store.connection import display_url

    watch = "laufband" + (f" --db {shlex.quote(display_url(db))}" if db else "")
    print(f"submitted job array {job.job_id}: {args.workers} worker(s), "
          f"{job.job_id}_0 to {job.job_id}_{args.workers - 1}")
    print(f"script: {job.script} (`sbatch {job.script.name}` here adds "
          f"{args.workers} more)")
    print(f"output: {folder}/{sub.OUTPUT.replace('%A', job.job_id).replace('%a', '<task>')}")
    print(f"watch:  {watch} status   (or watch, workers; squeue -j {job.job_id}; "
          f"cancel: scancel {job.job_id})")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "submit":
        return submit(args)
    db = args.db or default_db(announce=True)
    as_json = getattr(args, "json", False)
    if args.command == "prune":
        from laufband.maintenance import prune

        pruned = prune(db, keep=args.keep, vacuum=args.vacuum)
        print(f"deleted {pruned.events} history rows and {pruned.attempts} attempts")
        return 0
    if args.command == "limits" and args.set:
        set_limits(db, args.set)
        return 0
    if args.command == "retry":
        return retry(db, args)
    if args.command == "cancel":
        return cancel(db, args.drain_timeout)
    if args.command == "watch":
        return watch(db, args.interval, args.count)
    if args.command == "resume":
        back = writable_store(db).resume(f"laufband resume ({getpass.getuser()})")
        print(f"resumed: {back} cancelled task(s) may run again; start workers to run them")
        return 0
    store = open_store(db)
    if args.command == "results":
        results(store, as_json)
        return 0
    if args.command == "limits":
        limits_table(store)
        return 0
    if args.command == "report":
        from laufband.report import write_report

        print(f"wrote {write_report(store, args.output)}")
        return 0
    data: t.Any
    if args.command == "status":
        data = status_data(store)
    elif args.command == "workers":
        data = workers_data(store)
    elif args.command == "tasks":
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit {args.limit}: give an integer >= 1")
        data = tasks_data(store, args.state, args.label, args.limit)
    else:
        data = explain_data(store, args.task)
    if as_json:
        json.dump(data, sys.stdout, indent=1)
        print()
        return 0
    {"status": lambda: status(store, data=data),
     "workers": lambda: workers_table(store, data=data),
     "tasks": lambda: tasks_table(data),
     "explain": lambda: explain(data)}[args.command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
