"""A report of a run: ``write_report(store_or_monitor, "run.html")``.

``.html``: one self-contained file (no network: inline SVG and CSS, no script) with
the status table (tasks per state), a timeline of every attempt per worker (one row
per worker; each attempt a bar coloured by how it ended, whose tooltip names task,
worker, attempt, outcome and duration), completions over time, the workers, and the
failures grouped by error. ``.png`` / ``.svg``: a figure for slides (timeline and
throughput), drawn with matplotlib (``pip install 'laufband[report]'``).

An attempt spans its claim to the record of its end: tasks a worker claimed in one
batch share both stamps (see batching.py), and show as overlapping bars, stacked in
lanes (at most ``MAX_LANES`` per worker). Everything comes from one read
(``Store.timeline``); the page is built by joining strings, so 100,000 attempts take
well under a second (benchmarks/report.py).
"""

from __future__ import annotations

import contextlib
import html
import os
import threading
import typing as t
from datetime import datetime
from pathlib import Path

from laufband.errors import LaufbandError
from laufband.states import TaskState

if t.TYPE_CHECKING:
    from laufband.monitor import Monitor
    from laufband.store import Store
    from laufband.store.reads import FailureGroup
    from laufband.store.timeline import AttemptSpan, Timeline

__all__ = ["FORMATS", "MissingDependencyError", "render_html", "write_report"]

FORMATS = (".html", ".png", ".svg")
#: Attempts a report draws at most (the latest by start); the page says when it cut.
MAX_ATTEMPTS = 250_000
BUCKETS = 80
#: Overlapping attempts of one worker (a batch, threads) are stacked in this many lanes.
MAX_LANES = 6
#: Rows of each failure table (the largest groups).
MAX_GROUPS = 50

OUTCOME_COLORS = {
    "completed": "#2e9d57",
    "failed": "#d62f2f",
    "killed": "#7b2fa8",
    "preempted": "#f08c00",
    "cancelled": "#8a8f98",
    "running": "#2f74d0",
}
_OTHER_COLOR = "#555b66"


class MissingDependencyError(LaufbandError, ImportError):
    """An optional dependency of a feature is not installed."""


def write_report(source: Store | Monitor | str | os.PathLike[str], output: str | Path,
                 *, limit: int | None = MAX_ATTEMPTS, buckets: int = BUCKETS) -> Path:
    """Write a report of the workflow ``source`` (a Store, a Monitor, or a database
    path or URL) to ``output``: ``.html`` (self-contained page), ``.png`` or ``.svg``
    (a figure for slides; needs matplotlib). At most ``limit`` attempts are drawn (the
    latest by start; None: all). Returns the path written."""
    path = Path(output)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise LaufbandError(f"Cannot write a report to {str(output)!r}: name a file ending "
                            f"in {', '.join(FORMATS)}.")
    timeline = _timeline(source, buckets, limit)
    if suffix == ".html":
        _write_atomically(path, render_html(timeline).encode("utf-8"))
    else:
        _write_figure(timeline, path, suffix[1:])
    return path


def _timeline(source: t.Any, buckets: int, limit: int | None) -> Timeline:
    from laufband.monitor import Monitor
    from laufband.store import Store

    if isinstance(source, Store | Monitor):
        return source.timeline(buckets, limit)
    if isinstance(source, str | os.PathLike):
        return Monitor(db=os.fspath(source)).timeline(buckets, limit)
    raise TypeError(f"write_report needs a Store, a Monitor or a database path, "
                    f"got {type(source).__name__}.")


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers (a browser reloading) never see half a file."""
    with _replacing(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def _replacing(path: Path) -> t.Iterator[Path]:
    """A file beside ``path`` to write, put in its place at the end (the usual
    permissions, unlike a temporary file's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ formatting
def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        m, s = divmod(round(seconds), 60)
        return f"{m} min {s:02d} s"
    h, m = divmod(round(seconds) // 60, 60)
    return f"{h} h {m:02d} min"


def _stamp(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at).astimezone().isoformat(sep=" ", timespec="seconds")


_STEPS = [1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60,
          120, 300, 600, 900, 1800, 3600, 7200, 3 * 3600, 6 * 3600, 12 * 3600, 86400]


def _tick_step(span: float, most: int = 10) -> float:
    for step in _STEPS:
        if span / step <= most:
            return step
    return span / most


def _tick_label(seconds: float, step: float) -> str:
    if step < 1:
        return f"{seconds:.3g} s"
    if step < 60:
        return f"{seconds:.0f} s"
    if step < 3600:
        return f"{seconds / 60:.0f} min" if step % 60 == 0 else f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.0f} h" if step % 3600 == 0 else f"{seconds / 3600:.1f} h"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


# ------------------------------------------------------------------------ html
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;
color:#1d2127;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#555b66;margin:0 0 8px}
table{border-collapse:collapse;margin:4px 0}
th,td{padding:3px 10px;border-bottom:1px solid #e3e5e8;text-align:left;vertical-align:top}
th{background:#f4f5f7;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow:auto;max-height:80vh;border:1px solid #e3e5e8}
svg{display:block;font:11px system-ui,sans-serif}
svg text{fill:#1d2127}
.grid{stroke:#eceef1;stroke-width:1}.axis{stroke:#9aa0a8;stroke-width:1}
.life{stroke:#c9cdd3;stroke-width:1}
.band{fill:#fff}.band:nth-child(even){fill:#f6f7f9}
rect.attempt:hover,rect.bar:hover{stroke:#000;stroke-width:1}
rect.bar{fill:#2e9d57}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
pre.error{margin:0;white-space:pre-wrap;word-break:break-word;max-width:70ch;
font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.note{color:#8a4b00}
"""


def _outcome_css() -> str:
    rules = [f"rect.attempt[data-outcome={name}]{{fill:{color}}}"
             for name, color in OUTCOME_COLORS.items()]
    return f"rect.attempt{{fill:{_OTHER_COLOR}}}" + "".join(rules)


def render_html(timeline: Timeline) -> str:
    """The self-contained page of a report (a string)."""
    tl = timeline
    n_workers = len({w.id for w in tl.workers} | {a.worker for a in tl.attempts})
    span = "-" if tl.start is None else (
        f"{_stamp(tl.start)} to {_stamp(tl.end)} ({_duration((tl.end or tl.start) - tl.start)})")
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<link rel="icon" href="data:,">',
        f"<title>laufband report: {_e(tl.database)}</title>",
        f"<style>{CSS}{_outcome_css()}</style></head><body>",
        "<h1>laufband report</h1>",
        f'<p class="meta">Database <code>{_e(tl.database)}</code>, read at {_stamp(tl.at)}.'
        f" {tl.total} tasks, {tl.total_attempts} attempts, {n_workers} workers."
        f" Attempts from {span}.</p>",
        '<section id="status"><h2>Status</h2>', _status_table(tl), "</section>",
        '<section id="timeline"><h2>Timeline</h2>',
        "<p class=\"meta\">One row per worker, one bar per attempt (from its claim to"
        " the record of its end; a batch's attempts share both and are stacked). Hover"
        " a bar for the task, the attempt and how it ended.</p>",
    ]
    if len(tl.attempts) < tl.total_attempts:
        parts.append(f'<p class="note">Showing the latest {len(tl.attempts)} of '
                     f"{tl.total_attempts} attempts.</p>")
    parts += [_legend(tl), '<div class="scroll">', _timeline_svg(tl), "</div></section>",
              '<section id="throughput"><h2>Throughput</h2>', _throughput_svg(tl),
              "</section>",
              '<section id="workers"><h2>Workers</h2>', _workers_table(tl), "</section>",
              '<section id="failures"><h2>Failures</h2>', _failures(tl), "</section>",
              "</body></html>\n"]
    return "".join(parts)


def _status_table(tl: Timeline) -> str:
    rows = ["<table class=\"status\"><thead><tr><th>state</th><th>tasks</th><th>%</th>"
            "</tr></thead><tbody>"]
    for state in TaskState:
        n = tl.counts.get(state.value, 0)
        if n or state.value in ("completed", "failed", "running"):
            pct = 100.0 * n / tl.total if tl.total else 0.0
            rows.append(f'<tr data-state="{state.value}"><td>{state.value}</td>'
                        f'<td class="n">{n}</td><td class="n">{pct:.1f}</td></tr>')
    rows.append(f'<tr><th>total</th><th class="n">{tl.total}</th><th class="n">'
                f'{100.0 if tl.total else 0.0:.1f}</th></tr></tbody></table>')
    return "".join(rows)


def _legend(tl: Timeline) -> str:
    seen: dict[str, int] = {}
    for a in tl.attempts:
        seen[a.state] = seen.get(a.state, 0) + 1
    items = [f'<span><i style="background:{color}"></i>{name} ({seen.get(name, 0)})</span>'
             for name, color in OUTCOME_COLORS.items()]
    items += [f'<span><i style="background:{_OTHER_COLOR}"></i>{_e(name)} ({n})</span>'
              for name, n in seen.items() if name not in OUTCOME_COLORS]
    return f'<p class="legend">{"".join(items)}</p>'


LEFT, PLOT_W, RIGHT, TOP, AXIS_H = 190, 1000, 24, 8, 26
LANE_H, ROW_PAD = 10, 6


def _x_scale(tl: Timeline) -> tuple[float, float]:
    """(start, pixels per second) of the time axis shared by timeline and throughput."""
    start = tl.start if tl.start is not None else tl.at
    end = tl.end if tl.end is not None else start
    return start, PLOT_W / max(end - start, 1e-3)


def _rows(tl: Timeline) -> list[tuple[str, list[AttemptSpan]]]:
    """Workers in order of start (and workers only attempts name), with their
    attempts in order of start."""
    by_worker: dict[str, list[AttemptSpan]] = {w.id: [] for w in tl.workers}
    for a in tl.attempts:
        by_worker.setdefault(a.worker, []).append(a)
    return list(by_worker.items())


def _lanes(attempts: list[AttemptSpan], ends: list[float]) -> tuple[list[int], int]:
    """Lane of each attempt (the first free one; over MAX_LANES, the one free first)."""
    lane_end: list[float] = []
    lanes = []
    for a, end in zip(attempts, ends, strict=True):
        for i, free_at in enumerate(lane_end):
            if free_at <= a.started_at:
                lane_end[i] = end
                lanes.append(i)
                break
        else:
            if len(lane_end) < MAX_LANES:
                lane_end.append(end)
                lanes.append(len(lane_end) - 1)
            else:
                i = min(range(MAX_LANES), key=lane_end.__getitem__)
                lane_end[i] = max(lane_end[i], end)
                lanes.append(i)
    return lanes, max(1, len(lane_end))


_RECT = ('<rect class="attempt" data-outcome="%s" x="%.1f" y="%d" width="%.1f" height="%d"'
         ' data-task="%s" data-worker="%s"><title>%s</title></rect>')


def _timeline_svg(tl: Timeline) -> str:
    start, scale = _x_scale(tl)
    seen = tl.last_seen()
    workers = {w.id: w for w in tl.workers}
    bands: list[str] = []  # below the grid, which is below the bars
    body: list[str] = []
    y = TOP
    for wid, attempts in _rows(tl):
        ends = [a.ended_at if a.ended_at is not None else tl.end_of(a, seen)
                for a in attempts]
        lanes, n_lanes = _lanes(attempts, ends)
        height = n_lanes * LANE_H + ROW_PAD
        ew = _e(wid)
        w = workers.get(wid)
        about = ew if w is None else _e(
            f"{wid}: {w.hostname} pid {w.pid}, {w.state}"
            + (f", labels {', '.join(sorted(w.labels))}" if w.labels else "")
            + f", {len(attempts)} attempts, {w.completed} completed")
        shown = ew if len(wid) <= 28 else _e(wid[:12] + "…" + wid[-14:])
        bands.append(f'<rect class="band" x="0" y="{y}" width="{LEFT + PLOT_W + RIGHT}"'
                     f' height="{height}"/>')
        body.append(f'<g class="row" data-worker="{ew}">'
                    f'<text class="wlabel" x="{LEFT - 8}" y="{y + height / 2 + 4:.0f}"'
                    f' text-anchor="end">{shown}<title>{about}</title></text>')
        if w is not None:
            x1 = LEFT + (max(w.started_at, start) - start) * scale
            x2 = LEFT + (max(w.last_seen(tl.at), start) - start) * scale
            ly = y + height / 2
            body.append(f'<line class="life" x1="{x1:.1f}" x2="{x2:.1f}" y1="{ly:.0f}"'
                        f' y2="{ly:.0f}"/>')
        top = y + ROW_PAD // 2
        for a, end, lane in zip(attempts, ends, lanes, strict=True):
            outcome = a.outcome or "running"
            duration = end - a.started_at
            task = _e(a.task)
            tip = (f"{task} on {ew}, attempt {a.attempt}: {outcome}, "
                   + (_duration(duration) if a.ended_at is not None
                      else f"running for {_duration(duration)}"))
            if a.error:
                tip += "\n" + _e(a.error[:300])
            body.append(_RECT % (outcome if outcome.isidentifier() else "other",
                                 LEFT + (a.started_at - start) * scale, top + lane * LANE_H,
                                 max(duration * scale, 0.6), LANE_H - 1, task, ew, tip))
        body.append("</g>")
        y += height
    plot_h = y
    width = LEFT + PLOT_W + RIGHT
    return (f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}"'
            f' height="{plot_h + AXIS_H}" viewBox="0 0 {width} {plot_h + AXIS_H}">'
            + '<g class="bands">' + "".join(bands) + "</g>" + _axis(tl, TOP, plot_h)
            + "".join(body) + "</svg>")


def _axis(tl: Timeline, top: float, bottom: float) -> str:
    """Grid lines and labels of elapsed time below a plot from ``top`` to ``bottom``."""
    _start, scale = _x_scale(tl)
    span = PLOT_W / scale
    step = _tick_step(span)
    out = [f'<g class="xaxis"><line class="axis" x1="{LEFT}" x2="{LEFT + PLOT_W}"'
           f' y1="{bottom}" y2="{bottom}"/>']
    i = 0
    while i * step <= span * 1.0001:
        x = LEFT + i * step * scale
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}"/>'
                   f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">'
                   f"{_tick_label(i * step, step)}</text>")
        i += 1
    out.append("</g>")
    return "".join(out)


def _throughput_svg(tl: Timeline) -> str:
    height, top = 160, 10
    width = LEFT + PLOT_W + RIGHT
    if tl.start is None:
        return '<p class="meta">No attempt yet.</p>'
    _start, scale = _x_scale(tl)
    peak = max(tl.completions) or 1
    bar_w = tl.bucket * scale
    per_min = 60.0 / tl.bucket
    total = sum(tl.completions)
    out = [f'<p class="meta">Completed attempts per {_duration(tl.bucket)} '
           f"({total} in all; at most {_rate(peak * per_min)} per minute).</p>",
           f'<svg class="throughput" xmlns="http://www.w3.org/2000/svg" width="{width}"'
           f' height="{top + height + AXIS_H}" viewBox="0 0 {width} {top + height + AXIS_H}">',
           f'<text x="{LEFT - 8}" y="{top + 10}" text-anchor="end">{peak}</text>'
           f'<text x="{LEFT - 8}" y="{top + height}" text-anchor="end">0</text>']
    for i, n in enumerate(tl.completions):
        if not n:
            continue
        h = height * n / peak
        x = LEFT + i * bar_w
        lo, hi = i * tl.bucket, (i + 1) * tl.bucket
        out.append(f'<rect class="bar" x="{x:.1f}" y="{top + height - h:.1f}"'
                   f' width="{max(bar_w - 1, 0.8):.1f}" height="{h:.1f}"><title>{n} completed'
                   f" between {_tick_label(lo, tl.bucket)} and {_tick_label(hi, tl.bucket)}"
                   f" ({_rate(n * per_min)} per minute)</title></rect>")
    out.append(_axis(tl, top, top + height) + "</svg>")
    return "".join(out)


def _workers_table(tl: Timeline) -> str:
    if not tl.workers:
        return '<p class="meta">No worker registered.</p>'
    per: dict[str, dict[str, int]] = {}
    for a in tl.attempts:
        by = per.setdefault(a.worker, {})
        by[a.state] = by.get(a.state, 0) + 1
    rows = ["<table class=\"workers\"><thead><tr><th>worker</th><th>host</th>"
            "<th>labels</th><th>state</th><th>started</th><th>ran</th><th>attempts</th>"
            "<th>completed</th><th>failed</th><th>killed</th><th>preempted</th></tr>"
            "</thead><tbody>"]
    for w in tl.workers:
        by = per.get(w.id, {})
        ran = w.last_seen(tl.at) - w.started_at
        rows.append(
            f'<tr data-worker="{_e(w.id)}"><td>{_e(w.id)}</td><td>{_e(w.hostname)}</td>'
            f"<td>{_e(', '.join(sorted(w.labels)) or '-')}</td><td>{_e(w.state)}</td>"
            f"<td>{_stamp(w.started_at)}</td><td>{_duration(max(ran, 0.0))}</td>"
            f'<td class="n">{sum(by.values())}</td><td class="n">{by.get("completed", 0)}</td>'
            f'<td class="n">{by.get("failed", 0)}</td><td class="n">{by.get("killed", 0)}</td>'
            f'<td class="n">{by.get("preempted", 0)}</td></tr>')
    rows.append("</tbody></table>")
    return "".join(rows)


def _failures(tl: Timeline) -> str:
    out = ["<h3>Tasks failed for good</h3>"]
    if tl.failures:
        out.append(_failure_table("failures", tl.failures, "tasks"))
    else:
        out.append('<p class="meta">No task failed or was killed for good.</p>')
    groups = _attempt_failures(tl.attempts)
    if sum(g.count for g in groups) > sum(g.count for g in tl.failures):  # some retried
        out += ["<h3>Attempts that failed or were killed (retried ones too)</h3>",
                _failure_table("attempt-failures", groups, "attempts")]
    return "".join(out)


def _attempt_failures(attempts: t.Iterable[AttemptSpan]) -> list[FailureGroup]:
    from laufband.store.reads import FailureGroup

    groups: dict[str, list[str]] = {}
    for a in attempts:
        if a.outcome in ("failed", "killed"):
            key = f"{a.outcome}: {a.error or '(no error recorded)'}"
            groups.setdefault(key, []).append(f"{a.task}#{a.attempt}")
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    return [FailureGroup(error, len(ids), ids[:5]) for error, ids in ordered]


def _failure_table(css: str, groups: t.Sequence[FailureGroup], unit: str) -> str:
    rows = [f'<table class="{css}"><thead><tr><th>error</th><th>{unit}</th>'
            "<th>for example</th></tr></thead><tbody>"]
    for g in groups[:MAX_GROUPS]:
        rows.append(f'<tr><td><pre class="error">{_e(g.error[:2000])}</pre></td>'
                    f'<td class="n">{g.count}</td>'
                    f"<td>{', '.join(f'<code>{_e(x)}</code>' for x in g.examples)}</td></tr>")
    rows.append("</tbody></table>")
    if len(groups) > MAX_GROUPS:
        rest = groups[MAX_GROUPS:]
        rows.append(f'<p class="note">And {len(rest)} more errors ({sum(g.count for g in rest)}'
                    f" {unit}): <code>laufband status</code> and <code>laufband explain"
                    "</code> show them.</p>")
    return "".join(rows)


# ---------------------------------------------------------------------- figure
def _write_figure(tl: Timeline, path: Path, fmt: str) -> None:
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise MissingDependencyError(
            f"Writing a {fmt.upper()} report needs matplotlib: pip install "
            "'laufband[report]' (or write an .html report, which needs nothing).") from exc
    start = tl.start if tl.start is not None else tl.at
    span = max((tl.end if tl.end is not None else start) - start, 1e-3)
    unit, div = (("s", 1.0) if span < 300 else ("min", 60.0) if span < 3 * 3600
                 else ("h", 3600.0))
    fig = Figure(figsize=(12, 6.75), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    seen = tl.last_seen()
    rows = _rows(tl)
    present: dict[str, None] = {}
    for i, (_wid, attempts) in enumerate(rows):
        by_outcome: dict[str, list[tuple[float, float]]] = {}
        for a in attempts:
            end = tl.end_of(a, seen)
            by_outcome.setdefault(a.state, []).append(
                ((a.started_at - start) / div, max(end - a.started_at, span * 2e-4) / div))
        for outcome, ranges in by_outcome.items():
            present[outcome] = None
            # A thin white edge tells back-to-back attempts apart (few: visible).
            top.broken_barh(ranges, (i - 0.4, 0.8), edgecolor="white",
                            linewidth=0.6 if len(ranges) < 500 else 0,
                            facecolors=OUTCOME_COLORS.get(outcome, _OTHER_COLOR))
    top.set_ylim(len(rows) - 0.5, -0.5)
    if len(rows) <= 30:
        top.set_yticks(range(len(rows)), [wid for wid, _ in rows], fontsize=8)
    else:
        top.set_yticks([])
    top.set_ylabel(f"workers ({len(rows)})")
    top.set_title(f"{tl.total} tasks: {tl.counts.get('completed', 0)} completed, "
                  f"{tl.counts.get('failed', 0)} failed; {tl.total_attempts} attempts "
                  f"on {len(rows)} workers", fontsize=11)
    top.legend(handles=[Patch(color=OUTCOME_COLORS.get(o, _OTHER_COLOR), label=o)
                        for o in present], loc="upper right", fontsize=8)
    centers = [(i + 0.5) * tl.bucket / div for i in range(len(tl.completions))]
    per_s = max(tl.completions) / tl.bucket > 100  # else per minute
    rates = [n * (1.0 if per_s else 60.0) / tl.bucket for n in tl.completions]
    bottom.bar(centers, rates, width=tl.bucket / div, color=OUTCOME_COLORS["completed"],
               linewidth=0)
    bottom.set_ylabel("completed / s" if per_s else "completed / min")
    bottom.set_xlabel(f"time since the first claim ({unit})")
    bottom.set_xlim(0, span / div * 1.01)
    with _replacing(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=150)
