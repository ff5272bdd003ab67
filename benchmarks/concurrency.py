"""Thread workers and global caps against their ideal, and against laufband 0.2.1.

    python benchmarks/concurrency.py            # full run (about 3 minutes)
    python benchmarks/concurrency.py --quick    # 24 tasks per row, 1 run: CI (under 30 s)
    python benchmarks/concurrency.py --no-upstream   # without laufband 0.2.1

Every task sleeps 50 ms (I/O-bound work: threads overlap it); every run has a fresh
temporary directory, and its workers are separate processes
(benchmarks/concurrency_worker.py) that build a flat graph, construct their worker
(registering the graph), wait for a common start signal, run their loop and record
each task they ran. The driver checks that every task ran exactly once (attempt 1) and
that no more tasks held a resource at once than its limit, and exits 1 if not. Each
configuration runs --repeat times (3; 1 with --quick), the rows of a table in turns
(round 1 runs each row once, then round 2, ...): the run with the median of the table's
main time is shown, with the range over the runs.

1. Threads: one process, ``worker.map(fn, threads=N)`` over 200 tasks. Ideal = tasks x
   50 ms / N; efficiency = ideal / the map call's wall time.
2. Caps: 120 tasks, each ``resources={"api": 1}``, ``limits={"api": 3}``: 8 processes
   with the plain loop, and 3 processes with ``map(threads=4)``. Ideal = 120 x 50 ms / 3
   (the cap allows 3 at once); ratio = task span / ideal. The overlap is counted twice:
   task bodies at once (from the workers' records) and live attempts at once (from the
   ``attempts`` table: what the cap limits, from claim to record).
3. 200 tasks with 8 processes of laufband 0.2.1 (installed once into its own virtualenv
   under ~/.cache/laufband-bench, as run.py --compare-upstream does), 8 processes of this
   checkout, and 1 process of this checkout with ``map(threads=8)``: what threads save
   against processes (start-up, CPU, memory). 0.2.1 has neither threads nor caps.

Columns:
    loop s      first loop start (~ the start signal) to the end of the last worker's
                loop (for one process: the map call)
    span s      first task body's start to the last one's end
    process s   launch of the processes to the exit of the last one (interpreter start,
                imports, registration, the loop, and the exit)
    setup s     launch to the last worker ready (constructed, graph registered)
    ovh ms/task per task, the time a slot (thread, process, or unit of the cap) spent
                outside task bodies during the loop: (slots x loop s - bodies) / tasks
    CPU s       user + system time of all the workers together
    RSS MB      peak resident memory, summed over the workers
    others      cores that other processes of the machine used during the run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (benchmarks/run.py: 0.2.1's venv, tables, CPU meter)

SLEEP = 0.05
RESOURCE, LIMIT = "api", 3


@dataclasses.dataclass
class Config:
    name: str
    tasks: int
    processes: int
    threads: int = 0  # 0: the plain loop; N: worker.map(fn, threads=N)
    capped: bool = False
    impl: str = "current"

    @property
    def parallel(self) -> int:
        """Tasks that can run at once (the ideal's divisor)."""
        slots = self.processes * max(1, self.threads)
        return min(slots, LIMIT) if self.capped else slots

    @property
    def ideal_s(self) -> float:
        return self.tasks * SLEEP / self.parallel

    @property
    def shape(self) -> str:
        how = f"map(threads={self.threads})" if self.threads else "plain loop"
        return f"{self.processes} x {how}"


@dataclasses.dataclass
class Measure:
    config: Config
    problems: list[str] = dataclasses.field(default_factory=list)
    loop_s: float = 0.0
    span_s: float = 0.0
    process_s: float = 0.0
    setup_s: float = 0.0
    cpu_s: float = 0.0
    rss_mb: float = 0.0
    body_s: float = 0.0  # the task bodies' time, summed
    bodies_at_once: int = 0
    live_at_once: int | None = None  # from the attempts table (this checkout only)
    per_worker: list[int] = dataclasses.field(default_factory=list)
    others: float = 0.0


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(args.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.python = {"current": sys.executable}
        self.failures: list[str] = []

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ one run
def run_once(ctx: Context, cfg: Config) -> Measure:
    m = Measure(cfg)
    folder = Path(tempfile.mkdtemp(prefix=f"lb-concurrency-{cfg.impl}-", dir=ctx.workdir))
    try:
        infos = launch(ctx, cfg, folder, m)
        check(cfg, infos, m)
        if cfg.impl == "current" and not m.problems:
            m.live_at_once = live_attempts_at_once(folder / "db.sqlite", m)
        if cfg.capped and max(m.bodies_at_once, m.live_at_once or 0) > LIMIT:
            m.problems.append(f"more than {LIMIT} tasks held {RESOURCE!r} at once "
                              f"(bodies {m.bodies_at_once}, live attempts {m.live_at_once})")
    finally:
        if not ctx.args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    status = "ok" if not m.problems else "PROBLEM: " + "; ".join(m.problems[:3])
    ctx.say(f"  {cfg.name:<34} {cfg.impl:<8} loop {m.loop_s:6.2f} s  span {m.span_s:6.2f} s"
            f"  process {m.process_s:6.2f} s  {status}")
    if m.problems:
        ctx.failures.append(f"{cfg.name} [{cfg.impl}]: {'; '.join(m.problems)}")
    return m


def launch(ctx: Context, cfg: Config, folder: Path, m: Measure) -> list[dict]:
    """Start the workers, start them together once all are ready, reap them; their
    records (one dict per worker that finished)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAUFBAND_")}
    env.pop("PYTHONPATH", None)
    if cfg.impl == "current":
        env["PYTHONPATH"] = str(REPO)  # this checkout, whatever the venv holds
    go = folder / "go"
    cmd = [ctx.python[cfg.impl], str(HERE / "concurrency_worker.py"), "--impl", cfg.impl,
           "--db", f"sqlite:///{folder / 'db.sqlite'}", "--tasks", str(cfg.tasks),
           "--sleep", str(SLEEP), "--threads", str(cfg.threads), "--go", str(go)]
    if cfg.capped:
        cmd += ["--resource", RESOURCE, "--limit", str(LIMIT)]
    outs = [folder / f"w{i}.json" for i in range(cfg.processes)]
    meter = bench.CpuMeter()
    procs: list[subprocess.Popen] = []
    errs = []
    launched = time.monotonic()
    try:
        for i, out in enumerate(outs):
            err = open(folder / f"w{i}.err", "w")  # noqa: SIM115 - closed below
            errs.append(err)
            procs.append(subprocess.Popen([*cmd, "--out", str(out)], cwd=folder, env=env,
                                          stdout=subprocess.DEVNULL, stderr=err))
        bench.wait_ready(procs, [out.with_suffix(".ready") for out in outs], launched + 120,
                         m.problems)
        m.setup_s = time.monotonic() - launched
        go.touch()
        bench.wait_workers(procs, 60 + 10 * cfg.ideal_s, m.problems)
        m.process_s = time.monotonic() - launched
    finally:
        bench.reap_workers(procs, errs)
    m.others = meter.others()
    infos = []
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        if p.returncode != 0 or not out.exists():
            tail = (folder / f"w{i}.err").read_text().strip().splitlines()[-1:] or [""]
            m.problems.append(f"worker {i} exited with {p.returncode}: {tail[0][:200]}")
            continue
        infos.append(json.loads(out.read_text()))
    return infos


def check(cfg: Config, infos: list[dict], m: Measure) -> None:
    """Times from the records; every task exactly once (attempt 1), the right laufband."""
    want = bench.UPSTREAM if cfg.impl == "upstream" else None
    for info in infos:
        if (info["version"] == bench.UPSTREAM) != (want is not None) or (
                want is None and not info["file"].startswith(str(REPO / "laufband"))):
            m.problems.append(f"a worker of {cfg.impl} ran laufband {info['version']} "
                              f"from {info['file']}")
    rows = [row for info in infos for row in info["tasks"]]
    m.per_worker = sorted(len(info["tasks"]) for info in infos)
    if not rows:
        m.problems.append("no task ran")
        return
    m.loop_s = (max(i["loop_end_ns"] for i in infos)
                - min(i["loop_start_ns"] for i in infos)) / 1e9
    m.span_s = (max(r[2] for r in rows) - min(r[1] for r in rows)) / 1e9
    m.cpu_s = sum(i["cpu_s"] for i in infos)
    m.rss_mb = sum(i["maxrss_mb"] for i in infos)
    m.body_s = sum(r[2] - r[1] for r in rows) / 1e9
    m.bodies_at_once = most_at_once([(r[1], r[2]) for r in rows])
    runs = Counter(r[0] for r in rows)
    twice = [tid for tid, n in runs.items() if n > 1]
    if twice:
        m.problems.append(f"{len(twice)} task(s) ran twice or more, e.g. {twice[:3]}")
    missing = cfg.tasks - len(set(runs) & {f"t{i}" for i in range(cfg.tasks)})
    if missing and not m.problems:
        m.problems.append(f"{missing} of {cfg.tasks} tasks never ran")
    if cfg.impl == "current":
        bad = [r[0] for r in rows if r[3] != 1]
        if bad:
            m.problems.append(f"{len(bad)} task(s) ran with attempt != 1, e.g. {bad[:3]}")


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (one that ends as another starts: not both)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = now = 0
    for _, step in events:  # at a tie -1 sorts first
        now += step
        most = max(most, now)
    return most


def live_attempts_at_once(db: Path, m: Measure) -> int:
    """The most attempts live at once, by their stamps in the database (a claim and a
    record in one transaction share a stamp: the record counts first)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT started_at, ended_at FROM attempts").fetchall()
    finally:
        conn.close()
    if any(end is None for _, end in rows):
        m.problems.append("an attempt is still live after every worker exited")
    return most_at_once([(s, e) for s, e in rows if e is not None])


def rounds(ctx: Context, configs: list[Config], key: str) -> list[tuple[Measure, list[float]]]:
    """Run each config --repeat times, in rounds (each round runs every config once, so
    that a change of the machine's load falls on all rows alike); for each config the
    run with the median ``key``, and the values of all its runs."""
    runs: list[list[Measure]] = [[] for _ in configs]
    for _ in range(ctx.args.repeat):
        for cfg, done in zip(configs, runs, strict=True):
            done.append(run_once(ctx, cfg))
    return [median(done, key) for done in runs]


def median(runs: list[Measure], key: str) -> tuple[Measure, list[float]]:
    values = [getattr(r, key) for r in runs]
    chosen = sorted(runs, key=lambda r: getattr(r, key))[len(runs) // 2]
    for r in runs:
        if r is not chosen:
            chosen.problems += r.problems
    # a cap is judged by every run, not only the median one
    chosen.bodies_at_once = max(r.bodies_at_once for r in runs)
    lives = [r.live_at_once for r in runs if r.live_at_once is not None]
    chosen.live_at_once = max(lives) if lives else None
    return chosen, values


# ------------------------------------------------------------------------ sections
def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else "-"


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def threads_section(ctx: Context, n: int) -> tuple[str, list[list[str]]]:
    rows, targets = [], []
    configs = [Config(f"threads: 1 x map(threads={threads})", n, 1, threads=threads)
               for threads in (1, 4, 8)]
    for cfg, (m, values) in zip(configs, rounds(ctx, configs, "loop_s"), strict=True):
        threads = cfg.threads
        eff = cfg.ideal_s / m.loop_s if m.loop_s else 0.0
        rows.append([cfg.shape, f"{cfg.ideal_s:.2f}", f"{m.loop_s:.2f}", spread(values),
                     pct(eff), overhead(cfg, m), f"{m.process_s:.2f}", f"{m.setup_s:.2f}",
                     m.bodies_at_once, f"{m.cpu_s:.2f}", f"{m.others:.1f}", note(m)])
        if threads == 8:
            targets.append([f"1 process, map(threads=8), {n} x 50 ms: efficiency >= 80 %",
                            pct(eff), yes(eff >= 0.8 and not m.problems)])
    text = bench.table(
        ["workers", "ideal s", "map call s", "range s", "efficiency", "ovh ms/task",
         "process s", "setup s", "tasks at once", "CPU s", "others", "notes"], rows,
        f"Threads: one process, worker.map(fn, threads=N), {n} tasks of 50 ms "
        "(ideal = tasks x 50 ms / N; efficiency = ideal / map call)")
    return text, targets


def caps_section(ctx: Context, n: int) -> tuple[str, list[list[str]]]:
    rows, targets = [], []
    configs = [Config(f"caps: {processes} x threads {threads}", n, processes, threads,
                      capped=True) for processes, threads in ((8, 0), (3, 4))]
    for cfg, (m, values) in zip(configs, rounds(ctx, configs, "span_s"), strict=True):
        ratio = m.span_s / cfg.ideal_s
        live = "-" if m.live_at_once is None else str(m.live_at_once)
        rows.append([cfg.shape, f"{cfg.ideal_s:.2f}", f"{m.span_s:.2f}", spread(values),
                     f"{ratio:.2f}", overhead(cfg, m), f"{m.loop_s:.2f}",
                     f"{m.process_s:.2f}",
                     m.bodies_at_once, live, fmt_spread(m.per_worker), f"{m.others:.1f}",
                     note(m)])
        targets.append([f"{cfg.shape}, {n} tasks, limit {LIMIT}: span / ideal <= 1.3",
                        f"{ratio:.2f}", yes(ratio <= 1.3 and not m.problems)])
        targets.append([f"{cfg.shape}: at most {LIMIT} at once (bodies / live attempts, "
                        "every run)", f"{m.bodies_at_once} / {live}",
                        yes(m.live_at_once is not None and not m.problems
                            and max(m.bodies_at_once, m.live_at_once) <= LIMIT)])
    text = bench.table(
        ["workers", "ideal s", "span s", "range s", "span / ideal", "ovh ms/task",
         "loop s", "process s",
         "bodies at once", "live attempts at once", "tasks/worker", "others", "notes"],
        rows, f"Global caps: {n} tasks of 50 ms, each resources={{{RESOURCE!r}: 1}}, "
        f"limits={{{RESOURCE!r}: {LIMIT}}} (ideal = tasks x 50 ms / {LIMIT}); 'at once' = "
        "the most over all runs")
    return text, targets


def upstream_section(ctx: Context, n: int) -> tuple[str, list[list[str]]]:
    configs = [Config("same run: 0.2.1, 8 processes", n, 8, impl="upstream"),
               Config("same run: 8 processes", n, 8),
               Config("same run: 1 x map(threads=8)", n, 1, threads=8)]
    if ctx.args.no_upstream:
        configs = configs[1:]
    else:
        ctx.python["upstream"] = bench.upstream_python(ctx)  # type: ignore[arg-type]
    rows, measured = [], {}
    for cfg, (m, values) in zip(configs, rounds(ctx, configs, "loop_s"), strict=True):
        measured[cfg.name] = m
        eff = cfg.ideal_s / m.loop_s if m.loop_s else 0.0
        version = bench.UPSTREAM if cfg.impl == "upstream" else "this checkout"
        rows.append([version, cfg.shape, f"{m.loop_s:.2f}", spread(values), pct(eff),
                     overhead(cfg, m), f"{m.process_s:.2f}", f"{m.setup_s:.2f}", f"{m.cpu_s:.2f}",
                     f"{m.rss_mb:.0f}", fmt_spread(m.per_worker), f"{m.others:.1f}",
                     note(m)])
    text = bench.table(
        ["laufband", "workers", "loop s", "range s", "efficiency", "ovh ms/task",
         "process s", "setup s",
         "CPU s", "RSS MB", "tasks/worker", "others", "notes"], rows,
        f"Same run, {n} tasks of 50 ms, 8 at once (ideal {n * SLEEP / 8:.2f} s; efficiency"
        " = ideal / loop s): processes against threads, and laufband "
        f"{bench.UPSTREAM} (no threads, no caps)")
    procs, thr = measured["same run: 8 processes"], measured["same run: 1 x map(threads=8)"]
    targets = [["1 x map(threads=8) against 8 processes (this checkout): process s, CPU s, "
                "RSS MB", f"{thr.process_s:.2f} / {procs.process_s:.2f} s, "
                f"{thr.cpu_s:.2f} / {procs.cpu_s:.2f} s, {thr.rss_mb:.0f} / "
                f"{procs.rss_mb:.0f} MB", "-"]]
    return text, targets


def overhead(cfg: Config, m: Measure) -> str:
    """Per task, the time a slot (a thread, a process, a unit of the cap) spent outside
    task bodies during the loop: (slots x loop s - sum of bodies) / tasks."""
    return f"{1000 * (cfg.parallel * m.loop_s - m.body_s) / cfg.tasks:.1f}"


def note(m: Measure) -> str:
    return "FAILED: " + "; ".join(m.problems[:2]) if m.problems else ""


def fmt_spread(counts: list[int]) -> str:
    return f"{counts[0]}-{counts[-1]}" if counts else "-"


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 run each (CI)")
    p.add_argument("--repeat", type=int, default=None, help="runs per row (default 3; "
                   "1 with --quick)")
    p.add_argument("--no-upstream", action="store_true", help="skip laufband 0.2.1")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="where the temporary directories go (the disk you care about)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    args = p.parse_args()
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    ctx = Context(args)
    sizes = (24, 24, 24) if args.quick else (200, 120, 200)
    started = time.monotonic()
    out, targets = [], []
    for section, n in zip((threads_section, caps_section, upstream_section), sizes,
                          strict=True):
        text, rows = section(ctx, n)
        out.append(text)
        targets += rows
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "laufband"],
                           capture_output=True, text=True).stdout.strip()
    print(f"## laufband concurrency benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"commit {commit}{' (laufband/ modified)' if dirty else ''}, "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {args.repeat} run(s) "
          f"per row, {time.monotonic() - started:.0f} s, workdir {ctx.workdir}")
    for text in out:
        print(text)
    if args.quick:
        targets = [[f"{a} (quick sizes)", b, c] for a, b, c in targets]
    print(bench.table(["target", "measured", "met"], targets, "Targets"))
    return bench.report_failures(ctx.failures, "FAILED (correctness):")


if __name__ == "__main__":
    sys.exit(main())
