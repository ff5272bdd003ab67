"""laufband benchmarks: real worker processes, results checked, one report.

    python benchmarks/run.py                      # full run (about 10 minutes)
    python benchmarks/run.py --quick              # smoke run for CI (under a minute)
    python benchmarks/run.py --compare-upstream   # also run laufband 0.2.1 (+2-3 minutes)
    python benchmarks/run.py --only 'flat|chain'  # scenarios whose name matches a regex
    python benchmarks/run.py --json out.json      # also write every measurement

Every scenario runs in a fresh temporary directory. Its workers are separate processes
(benchmarks/worker.py) that build the graph, construct their worker (registering the
graph), wait for a common start signal, run their loop and record each task they ran
(id, start, end, attempt; time.monotonic_ns). The driver then checks from those records
that every task ran exactly once (attempt 1) and never before one of its dependencies
ended, and fails loudly (exit code 1) if not.

The report: the physical limit of the disk (benchmarks/baseline.py: a bare claim+finish
loop on plain sqlite3, same journal settings, no laufband, run in the same run), the
scenarios, where the time of a task goes (instrumented workers), registering a
1,000,000-task DAG and reading its status, simulated NFS latency, laufband 0.2.1 (with
--compare-upstream), and the targets of issue #5.

Columns of the scenario table:
    setup s     launch of the worker processes until all are ready (interpreter start,
                imports, graph built and registered), slowest worker
    wall s      start signal until the last worker's loop ended (all completions
                recorded); throughput and overhead are measured over this window
    tasks/s     tasks / wall s, all workers together
    % limit     tasks/s as a fraction of the bare claim+finish loop
    ovh ms      per-task overhead: worker time not spent in the loop body, per task,
                (workers x wall - sum of task bodies) / tasks
    DB MB       size of the database file at the end
    RSS MB      peak resident memory of the largest worker (ru_maxrss)
    notes       drain = from the end of the last task body to the end of the last loop;
                tasks/worker = fewest-most tasks one worker ran
Short scenarios run --repeat times (3 in the full run); the run with the median
throughput is shown and the range of tasks/s is given in the notes.

The simulated NFS (skip with --no-nfs; needs gcc) preloads benchmarks/nfs_shim.c, built
once into ~/.cache/laufband-bench, into the workers. It sleeps a given time before every
open/close, link/unlink/rename, fsync/fdatasync, (f)truncate and fcntl lock of a file in
the scenario directory, as an NFS client waits for a server round trip, and counts the calls.

--compare-upstream installs laufband==0.2.1 into its own virtualenv (cached under
~/.cache/laufband-bench) and runs the same process scenarios with it. 0.2.1 makes one
pass over the graph and skips tasks whose dependencies are not done, so for DAGs its
workers loop `while worker.has_more_jobs: for task in worker: ...` until a deadline;
a run that hits it is reported as a timeout with the tasks it completed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import graphs  # noqa: E402  (the benchmark's own module, next to this file)

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "laufband-bench"
UPSTREAM = "0.2.1"
NFS_DELAYS_MS = (0, 1, 5)
NFS_BATCHES = (1, 10, 50)
#: The shim's default delayed categories (nfs_shim.c): what counts as a round trip.
DELAYED = ("open", "close", "link", "unlink", "rename", "fsync", "truncate", "lock")


# ----------------------------------------------------------------------- scenarios
@dataclasses.dataclass
class Scenario:
    name: str
    graph: str
    workers: int = 1
    sleep: float = 0.0
    batch: str = "auto"
    journal: str = "delete"
    max_tasks: int = 0
    deadline: float = 180.0
    delay_us: int | None = None  # preload the NFS shim with this delay (None: no shim)
    delay_ops: str = ""  # the shim's NFSSIM_OPS (categories delayed; "": its default)
    instrument: bool = False
    repeat: int = 1
    upstream: bool = True  # run with 0.2.1 too under --compare-upstream
    kind: str = "main"  # main | breakdown | nfs
    sqlite_locking: str = ""  # LAUFBAND_SQLITE_LOCKING ("": auto, i.e. normal on this disk)

    @property
    def tasks(self) -> int:
        n = graphs.size(self.graph)
        return min(n, self.max_tasks) if self.max_tasks else n


def scenarios(quick: bool, repeat: int) -> list[Scenario]:
    r = 1 if quick else repeat
    if quick:
        return [
            Scenario("flat 300", "flat:300", 1, repeat=r),
            Scenario("flat 300", "flat:300", 4, repeat=r),
            Scenario("flat 300, batch 1", "flat:300", 4, batch="1", repeat=r, upstream=False),
            Scenario("layered 4x50", "layered:4x50", 4, repeat=r),
            Scenario("chain 30", "chain:30", 2, repeat=r),
            Scenario("flat 2,000", "flat:2000", 1, repeat=r, upstream=False),
            Scenario("40 x 20 ms", "flat:40", 4, sleep=0.02, repeat=r),
        ]
    return [
        Scenario("flat 1,000", "flat:1000", 1, repeat=r),
        Scenario("flat 1,000", "flat:1000", 4, repeat=r),
        Scenario("flat 1,000", "flat:1000", 8, repeat=r),
        Scenario("flat 1,000, batch 1", "flat:1000", 1, batch="1", repeat=r, upstream=False),
        Scenario("flat 1,000, batch 1", "flat:1000", 8, batch="1", repeat=r, upstream=False),
        Scenario("flat 1,000, batch 10", "flat:1000", 8, batch="10", repeat=r,
                 upstream=False),
        Scenario("flat 1,000, WAL", "flat:1000", 8, journal="wal", repeat=r, upstream=False),
        Scenario("layered 10x100", "layered:10x100", 1, repeat=r),
        Scenario("layered 10x100", "layered:10x100", 4, repeat=r),
        Scenario("layered 10x100", "layered:10x100", 8, repeat=r),
        Scenario("chain 200", "chain:200", 4, repeat=r),
        Scenario("flat 10,000", "flat:10000", 1, repeat=1),
        Scenario("flat 100,000", "flat:100000", 1, repeat=1, deadline=600, upstream=False),
        Scenario("200 x 50 ms", "flat:200", 8, sleep=0.05, repeat=r),
        Scenario("1,000 x 5 ms", "flat:1000", 8, sleep=0.005, repeat=r),
    ]


def breakdown_scenarios(quick: bool) -> list[Scenario]:
    n, w = ("flat:300", 4) if quick else ("flat:2000", 8)
    return [
        Scenario("1 worker, batch 1", n, 1, batch="1", delay_us=0, instrument=True,
                 kind="breakdown"),
        Scenario(f"{w} workers, batch 1", n, w, batch="1", delay_us=0, instrument=True,
                 kind="breakdown"),
        Scenario("1 worker, auto", n, 1, delay_us=0, instrument=True, kind="breakdown"),
        Scenario(f"{w} workers, auto", n, w, delay_us=0, instrument=True, kind="breakdown"),
    ]


def nfs_scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [Scenario("nfs 1 ms, batch 10", "flat:200", 2, batch="10", delay_us=1000,
                         kind="nfs", instrument=True)]
    out = []
    for ms in NFS_DELAYS_MS:
        for batch in NFS_BATCHES:
            # keep each cell to roughly 10 s (~40 delayed operations per transaction
            # with 4 workers contending)
            est_txn_s = 0.004 + 0.040 * ms
            n = int(min(5000, max(50, 10 * batch / est_txn_s)) // 50 * 50)
            out.append(Scenario(f"nfs {ms} ms, batch {batch}", f"flat:{n}", 4,
                                batch=str(batch), delay_us=ms * 1000, kind="nfs",
                                instrument=True, deadline=300))
    return out


# ---------------------------------------------------------------------- results
@dataclasses.dataclass
class Result:
    scenario: Scenario
    impl: str
    ok: bool = True
    problems: list[str] = dataclasses.field(default_factory=list)
    tasks: int = 0
    setup_s: float = 0.0
    wall_s: float = 0.0
    tasks_per_s: float = 0.0
    overhead_ms: float = 0.0
    body_s: float = 0.0
    db_mb: float = 0.0
    rss_mb: float = 0.0
    per_worker: list[int] = dataclasses.field(default_factory=list)
    handover_ms: float | None = None
    handover_max_ms: float | None = None
    efficiency: float | None = None
    drain_ms: float = 0.0  # from the end of the last task body until the last loop ended
    timed_out: bool = False
    crashed: int = 0
    other_cpu: float = 0.0  # cores used by other processes during the run
    shim: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # during the loop
    shim_total: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # whole process
    timers_ns: dict[str, int] = dataclasses.field(default_factory=dict)
    timer_calls: dict[str, int] = dataclasses.field(default_factory=dict)
    workers_info: list[dict] = dataclasses.field(default_factory=list)
    repeats: list[float] = dataclasses.field(default_factory=list)
    folder: str = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["scenario"] = dataclasses.asdict(self.scenario)
        return d


class CpuMeter:
    """CPU used by other processes (not this driver or its children) while measuring."""

    def __init__(self) -> None:
        self.busy0, self.total0 = _proc_stat()
        self.ours0 = _our_cpu()
        self.t0 = time.monotonic()

    def others(self) -> float:
        busy, _ = _proc_stat()
        ticks = os.sysconf("SC_CLK_TCK")
        machine = (busy - self.busy0) / ticks
        elapsed = time.monotonic() - self.t0
        return max(0.0, machine - (_our_cpu() - self.ours0)) / max(elapsed, 1e-9)


def wait_quiet(ctx: Context, limit_s: float) -> float:
    """Wait (up to limit_s) until other processes use under 0.3 cores for 3 s in a row;
    return the load seen last, in cores."""
    ends = time.monotonic() + limit_s
    said = False
    while True:
        meter = CpuMeter()
        time.sleep(3)
        load = meter.others()
        if load < 0.3 or time.monotonic() > ends:
            return load
        if not said:
            ctx.say(f"waiting for a quiet machine (others use {load:.1f} cores)")
            said = True


def _proc_stat() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _our_cpu() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


# ---------------------------------------------------------------------- context
class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(args.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.python = {"current": sys.executable}
        self.shim: Path | None = None
        self.failures: list[str] = []
        self.log = sys.stderr

    def say(self, text: str) -> None:
        print(text, file=self.log, flush=True)


def build_shim(ctx: Context) -> Path | None:
    """Compile the NFS shim once per source version; None (with a note) without gcc."""
    source = HERE / "nfs_shim.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    target = CACHE / f"nfs_shim-{digest}.so"
    if not target.exists():
        if shutil.which("gcc") is None:
            ctx.say("gcc not found: skipping the simulated NFS and the time breakdown "
                    "(apt-get install gcc to run them)")
            return None
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(tmp), str(source), "-ldl"],
                       check=True)
        tmp.rename(target)
        ctx.say(f"built {target}")
    return target


def wait_ready(procs: list[subprocess.Popen], ready: list[Path], by: float,
               problems: list[str]) -> None:
    """Wait until every worker wrote its ready file (registered the graph, waits for the
    start), or report why not."""
    while not all(path.exists() for path in ready):
        if any(p.poll() is not None for p in procs):
            problems.append("a worker exited before it was ready")
            return
        if time.monotonic() > by:
            problems.append("workers not ready in time")
            return
        time.sleep(0.002)


def wait_workers(procs: list[subprocess.Popen], within: float, problems: list[str]) -> None:
    """Wait for the workers to exit; kill (and report) any still running after
    ``within`` seconds."""
    end_by = time.monotonic() + within
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end_by - time.monotonic()))
        except subprocess.TimeoutExpired:
            problems.append(f"worker {p.pid} still running {within:.0f} s after the "
                            "start; killed")
            p.kill()
            p.wait()


def reap_workers(procs: list[subprocess.Popen], errs: list) -> None:
    """Whatever happened: no worker outlives the run, and its stderr file is closed."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for err in errs:
        err.close()


def upstream_python(ctx: Context) -> str:
    venv = CACHE / f"upstream-{UPSTREAM}"
    python = venv / "bin" / "python"
    marker = venv / ".laufband-bench-ok"
    if not marker.exists():
        ctx.say(f"installing laufband=={UPSTREAM} into {venv} (once)")
        if venv.exists():
            shutil.rmtree(venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"laufband=={UPSTREAM}"],
                       check=True)
        marker.write_text(UPSTREAM)
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('laufband'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    if version != UPSTREAM:
        raise SystemExit(f"{venv} holds laufband {version}, not {UPSTREAM}; delete it")
    return str(python)


# ------------------------------------------------------------------ one scenario
def run_scenario(ctx: Context, sc: Scenario, impl: str = "current") -> Result:
    """Run a scenario (repeated if asked); return the run with the median throughput."""
    results = [run_once(ctx, sc, impl) for _ in range(sc.repeat if impl == "current" else 1)]
    ranked = sorted(results, key=lambda r: r.tasks_per_s)
    chosen = ranked[len(ranked) // 2]
    chosen.repeats = [r.tasks_per_s for r in results]
    for r in results:
        if not r.ok and r is not chosen:
            chosen.ok = False
            chosen.problems += r.problems
    return chosen


def run_once(ctx: Context, sc: Scenario, impl: str, keep: bool = False) -> Result:
    res = Result(sc, impl)
    slug = re.sub(r"[^a-z0-9]+", "-", sc.name.lower()).strip("-")
    folder = Path(tempfile.mkdtemp(prefix=f"lb-{slug}-{sc.workers}w-{impl}-",
                                   dir=ctx.workdir))
    res.folder = str(folder)
    data, out, stats = folder / "data", folder / "out", folder / "shim"
    for d in (data, out, stats):
        d.mkdir()
    db = data / "db.sqlite"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUFBAND_", "NFSSIM_"))}
    env.pop("LD_PRELOAD", None)
    if sc.delay_us is not None:
        assert ctx.shim is not None
        env.update(LD_PRELOAD=str(ctx.shim), NFSSIM_PREFIX=str(data),
                   NFSSIM_DELAY_US=str(sc.delay_us), NFSSIM_STATS=str(stats))
        if sc.delay_ops:
            env["NFSSIM_OPS"] = sc.delay_ops
    if sc.sqlite_locking:
        env["LAUFBAND_SQLITE_LOCKING"] = sc.sqlite_locking
    up_deadline = ctx.args.upstream_deadline or (15.0 if ctx.args.quick else 30.0)
    deadline = sc.deadline if impl == "current" else min(sc.deadline, up_deadline)
    go = folder / "go"
    cmd_base = [ctx.python[impl], str(HERE / "worker.py"), "--impl", impl,
                "--db", f"sqlite:///{db}", "--graph", sc.graph, "--go", str(go),
                "--sleep", str(sc.sleep), "--batch-size", sc.batch,
                "--journal-mode", sc.journal, "--deadline", str(deadline)]
    if sc.max_tasks:
        cmd_base += ["--max-tasks", str(sc.max_tasks)]
    if sc.instrument:
        cmd_base.append("--instrument")
    meter = CpuMeter()
    procs, errs = [], []
    launched = time.monotonic()
    try:
        for i in range(sc.workers):
            err = open(out / f"w{i}.err", "w")  # noqa: SIM115 - closed below
            errs.append(err)
            procs.append(subprocess.Popen(
                [*cmd_base, "--out", str(out / f"w{i}.json")], cwd=data, env=env,
                stdout=subprocess.DEVNULL, stderr=err))
        wait_ready(procs, [out / f"w{i}.ready" for i in range(sc.workers)], launched + 600,
                   res.problems)
        res.setup_s = time.monotonic() - launched
        t0 = time.monotonic_ns()
        go.touch()
        wait_workers(procs, deadline + 120, res.problems)
    finally:
        reap_workers(procs, errs)
    res.other_cpu = meter.others()
    infos = []
    for i, p in enumerate(procs):
        path = out / f"w{i}.json"
        if p.returncode != 0 or not path.exists():
            res.crashed += 1
            tail = (out / f"w{i}.err").read_text().strip().splitlines()[-1:] or ["(no stderr)"]
            res.problems.append(f"worker {i} exited with {p.returncode}: {tail[0][:200]}")
            continue
        infos.append(json.loads(path.read_text()))
    analyse(res, sc, infos, t0, impl)
    res.db_mb = sum(f.stat().st_size for f in data.glob("db.sqlite*")) / 2**20
    res.shim_total = read_shim(stats)
    if sc.delay_us is not None and not res.shim_total.get("db fsync", [0])[0]:
        res.problems.append("the NFS shim did not fire (no fsync of the database seen)")
    # 0.2.1 being slow or crashing is reported, not a failure of this benchmark
    res.ok = not (_correctness(res.problems) if impl == "upstream" else res.problems)
    if not (ctx.args.keep or keep):
        shutil.rmtree(folder, ignore_errors=True)
    label = f"{sc.name} x{sc.workers} [{impl}]"
    status = "ok" if res.ok else "PROBLEM: " + "; ".join(res.problems[:3])
    ctx.say(f"  {label:<40} {res.tasks:>7} tasks {res.wall_s:7.2f} s "
            f"{res.tasks_per_s:9.1f}/s  {status}")
    if res.problems and impl == "current":
        ctx.failures.append(f"{label}: {'; '.join(res.problems)}")
    return res


def _correctness(problems: list[str]) -> bool:
    """Problems that are correctness violations (as opposed to 0.2.1 being slow/crashing)."""
    return any(("twice" in p or "before its dependency" in p or "attempt" in p
                or "not in the graph" in p) for p in problems)


def analyse(res: Result, sc: Scenario, infos: list[dict], t0: int, impl: str) -> None:
    res.workers_info = [{k: v for k, v in i.items() if k != "tasks"} for i in infos]
    rows = [row for info in infos for row in info["tasks"]]
    res.tasks = len(rows)
    res.per_worker = sorted(len(info["tasks"]) for info in infos)
    res.timed_out = any(info.get("timed_out") for info in infos)
    if infos:
        end = max(info["loop_end_ns"] for info in infos)
        if impl == "upstream" and res.timed_out and rows and len(
                {row[0] for row in rows}) == sc.tasks:
            # 0.2.1's loop (its pass over the graph, or `while has_more_jobs`) had not
            # ended although every task ran: count up to the last task's end, in its favour
            end = max(row[2] for row in rows)
            res.problems.append("all tasks ran, but its workers were still looping at the "
                                "deadline (throughput counted to the last task's end)")
        res.wall_s = (end - t0) / 1e9
        res.rss_mb = max(info["maxrss_mb"] for info in infos)
    res.body_s = sum(e - s for _, s, e, _ in rows) / 1e9
    if rows and infos:
        res.drain_ms = (max(info["loop_end_ns"] for info in infos) - max(r[2] for r in rows)) / 1e6
    if res.tasks and res.wall_s > 0:
        res.tasks_per_s = res.tasks / res.wall_s
        res.overhead_ms = (len(infos) * res.wall_s - res.body_s) / res.tasks * 1000
    for info in infos:
        for k, v in info.get("shim_loop", {}).items():
            acc = res.shim.setdefault(k, [0, 0, 0])
            for i, n in enumerate(v):
                acc[i] += n
        for k, v in info.get("timers_ns", {}).items():
            res.timers_ns[k] = res.timers_ns.get(k, 0) + v
        for k, v in info.get("timer_calls", {}).items():
            res.timer_calls[k] = res.timer_calls.get(k, 0) + v
    # --- exactly once, attempt 1, dependency order
    runs = Counter(row[0] for row in rows)
    twice = [tid for tid, n in runs.items() if n > 1]
    if twice:
        res.problems.append(f"{len(twice)} task(s) ran twice or more, e.g. {twice[:3]}")
    if impl == "current":
        bad = [row[0] for row in rows if row[3] != 1]
        if bad:
            res.problems.append(f"{len(bad)} task(s) ran with attempt != 1, e.g. {bad[:3]}")
    complete = not sc.max_tasks and not res.timed_out and not res.crashed
    by_id = {row[0]: row for row in rows}
    known = 0  # distinct ids that ran and are in the graph
    for tid, deps in graphs.build(sc.graph):
        if tid not in by_id:
            continue
        known += 1
        for dep in deps:
            if dep not in by_id or by_id[dep][2] >= by_id[tid][1]:
                res.problems.append(f"task {tid} started before its dependency {dep} ended")
                break
    if len(by_id) > known:
        res.problems.append(f"{len(by_id) - known} task id(s) not in the graph ran")
    expected = sc.tasks
    if complete and known != expected:
        res.problems.append(f"{expected - known} of {expected} tasks never ran")
    if sc.max_tasks and known < expected and not res.timed_out:
        res.problems.append(f"only {known} of {expected} tasks ran")
    if res.timed_out and (len(runs) < expected or impl == "current"):
        res.problems.append(f"timeout: {len(runs)} of {expected} tasks done by the deadline")
    # --- scenario-specific measures
    if sc.graph.startswith("chain:") and len(by_id) > 1:
        gaps = []
        for i in range(1, graphs.size(sc.graph)):
            a, b = by_id.get(f"c{i - 1}"), by_id.get(f"c{i}")
            if a and b:
                gaps.append((b[1] - a[2]) / 1e6)
        if gaps:
            res.handover_ms = statistics.fmean(gaps)
            res.handover_max_ms = max(gaps)
    if sc.sleep and res.wall_s:
        res.efficiency = res.tasks * sc.sleep / sc.workers / res.wall_s


def read_shim(folder: Path) -> dict[str, list[int]]:
    """Sum the shim's per-process counters: 'kind category' -> [calls, real_ns, slept_ns]."""
    total: dict[str, list[int]] = {}
    for f in folder.glob("*.txt"):
        for line in f.read_text().splitlines():
            kind, cat, *nums = line.split()
            acc = total.setdefault(f"{kind} {cat}", [0, 0, 0])
            for i, n in enumerate(nums):
                acc[i] += int(n)
    return total


# --------------------------------------------------------------------- baselines
def run_baseline(ctx: Context, tasks: int, batch: int = 1, file_lock: bool = False,
                 processes: int = 1) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="lb-baseline-", dir=ctx.workdir))
    try:
        cmd = [sys.executable, str(HERE / "baseline.py"), "--db", str(folder / "bare.sqlite"),
               "--tasks", str(tasks), "--batch", str(batch), "--processes", str(processes)]
        if file_lock:
            cmd.append("--file-lock")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"baseline failed: {proc.stderr.strip()[-500:]}")
        return json.loads(proc.stdout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------ registration, status
def run_registration(ctx: Context, spec: str, status: bool) -> dict:
    """Register a big DAG (a worker that then runs 1,000 tasks), let a second worker join
    the registered graph, and time status reads of the database."""
    n = graphs.size(spec)
    sc = Scenario(f"register {n:,}", spec, 1, max_tasks=1000, deadline=600, upstream=False)
    first = run_once(ctx, sc, "current", keep=True)  # we need its database afterwards
    made = Path(first.folder)
    out: dict = {"tasks": n, "first": first}
    data = made / "data"
    url = f"sqlite:///{data / 'db.sqlite'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAUFBAND_")}
    # a second worker joins: the graph is stored already, it only validates and compares
    go = made / "go2"
    go.touch()
    join = subprocess.run(
        [sys.executable, str(HERE / "worker.py"), "--db", url, "--graph", spec,
         "--go", str(go), "--out", str(made / "out" / "join.json"), "--max-tasks", "1"],
        cwd=data, env=env, capture_output=True, text=True, timeout=900)
    if join.returncode == 0:
        out["join"] = json.loads((made / "out" / "join.json").read_text())
        out["join"].pop("tasks", None)
    else:
        ctx.failures.append(f"joining worker failed: {join.stderr.strip()[-300:]}")
    if status:
        r = subprocess.run([sys.executable, str(HERE / "status_probe.py"), url], env=env,
                           cwd=data, capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            out["status"] = json.loads(r.stdout)
        else:
            ctx.failures.append(f"status probe failed: {r.stderr.strip()[-300:]}")
        t = time.monotonic()
        cli = subprocess.run([sys.executable, "-m", "laufband.cli", "--db", url, "status"],
                             env=env, cwd=data, capture_output=True, text=True, timeout=300)
        out["cli_s"] = time.monotonic() - t
        out["cli_ok"] = cli.returncode == 0
        out["cli_head"] = cli.stdout.splitlines()[:1]
        if cli.returncode != 0:
            ctx.failures.append(f"laufband status failed: {cli.stderr.strip()[-300:]}")
    out["db_mb"] = (data / "db.sqlite").stat().st_size / 2**20
    if not ctx.args.keep:
        shutil.rmtree(made, ignore_errors=True)
    return out


# ------------------------------------------------------------------- formatting
def table(headers: list[str], rows: list[list], title: str = "") -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        padded = (v.ljust(w) if i == 0 else v.rjust(w)
                  for i, (v, w) in enumerate(zip(values, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    out = [f"\n### {title}\n"] if title else []
    out.append(line(headers))
    out.append("|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2))
                              for i, w in enumerate(widths)) + "|")
    out += [line(r) for r in cells]
    return "\n".join(out)


def f1(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def notes(r: Result) -> str:
    parts = []
    if not r.ok:
        parts.append("FAILED: " + "; ".join(r.problems[:2]))
    elif r.problems:
        parts.append("; ".join(r.problems[:2]))
    if r.handover_ms is not None:
        parts.append(f"hand-over {r.handover_ms:.1f} ms avg, {r.handover_max_ms:.0f} max")
    if r.efficiency is not None:
        parts.append(f"efficiency {100 * r.efficiency:.0f} %")
    if r.scenario.workers > 1 and r.drain_ms > 20:
        parts.append(f"drain {r.drain_ms:.0f} ms")
    if r.scenario.workers > 1 and r.per_worker:
        parts.append(f"tasks/worker {r.per_worker[0]}-{r.per_worker[-1]}")
    if len(r.repeats) > 1:
        parts.append(f"{len(r.repeats)} runs: {min(r.repeats):,.0f}-{max(r.repeats):,.0f}/s")
    if r.other_cpu > 0.25:
        parts.append(f"others used {r.other_cpu:.1f} cores")
    return "; ".join(parts)


def machine() -> dict:
    def first(path: str, key: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return r.stdout.rstrip() if r.returncode == 0 else "?"

    dirty = git("status", "--porcelain", "--", "laufband")
    diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--", "laufband"],
                          capture_output=True).stdout
    return {
        "laufband_tree": git("rev-parse", "--short", "HEAD:laufband"),
        "diff_sha256": hashlib.sha256(diff).hexdigest()[:12] if diff else "",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": [line[3:] for line in dirty.splitlines()],
        "cpu": first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(),
    }


def filesystem(path: Path) -> str:
    best = ("?", "?", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype = line.split()[:3]
        if str(path).startswith(mnt) and len(mnt) >= len(best[2]):
            best = (dev, fstype, mnt)
    return f"{best[1]} on {best[0]} (mounted at {best[2]})"


# ------------------------------------------------------------------------- main
def report_failures(failures: list[str], heading: str = "FAILED:") -> int:
    """A driver's exit status: 1 after listing ``failures`` on stderr under ``heading``,
    0 (and nothing printed) if there are none."""
    if not failures:
        return 0
    print(f"\n{heading}", file=sys.stderr)
    for f in failures:
        print(f"  {f}", file=sys.stderr)
    return 1


def print_footer(ctx: Context, info: dict, after: dict, elapsed: float,
                 others: str = "") -> None:
    """The end of a benchmark's report: a warning if laufband/ changed during the run,
    the load of other processes (``others``: what counts as one), the verdict."""
    if ((after["laufband_tree"], after["diff_sha256"])
            != (info["laufband_tree"], info["diff_sha256"])):
        print(f"\nWARNING: laufband/ changed during the run (now commit {after['commit']}, "
              f"diff {after['diff_sha256'] or 'none'}): the numbers mix two versions.")
    print(f"\nOther processes on this machine{others} used {info['others_cores']:.2f} cores "
          "on average during the measurements.")
    print(f"\nbenchmark finished in {elapsed:.0f} s; "
          + ("all correctness checks passed." if not ctx.failures else
             f"{len(ctx.failures)} FAILURE(S):"))
    for failure in ctx.failures:
        print(f"  - {failure}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--quick", action="store_true", help="small sizes, one run each (CI)")
    p.add_argument("--compare-upstream", action="store_true",
                   help=f"also run laufband {UPSTREAM} (own cached virtualenv)")
    p.add_argument("--only", default="", help="run scenarios whose name matches this regex")
    p.add_argument("--no-nfs", action="store_true", help="skip the simulated-NFS matrix")
    p.add_argument("--no-register", action="store_true", help="skip the big-DAG scenarios")
    p.add_argument("--repeat", type=int, default=3, help="runs of each short scenario")
    p.add_argument("--upstream-deadline", type=float, default=0.0,
                   help="seconds a 0.2.1 scenario may claim before it counts as a timeout "
                   "(default 30, 15 with --quick)")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="where the scenario directories are made (the disk under test)")
    p.add_argument("--keep", action="store_true", help="keep the scenario directories")
    p.add_argument("--json", help="write every measurement to this file")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for other processes to go quiet")
    args = p.parse_args()

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)  # so that every worker gets reaped
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; worker processes were stopped", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    ctx = Context(args)
    started = time.monotonic()
    info = machine()
    info["filesystem"] = filesystem(ctx.workdir)
    only = re.compile(args.only) if args.only else None

    def wanted(name: str) -> bool:
        return only is None or bool(only.search(name))

    if args.wait_quiet:
        info["load_at_start"] = wait_quiet(ctx, args.wait_quiet)
    whole_run = CpuMeter()
    if not args.no_nfs:
        ctx.shim = build_shim(ctx)
    with_shim = ctx.shim is not None
    if args.compare_upstream:
        ctx.python["upstream"] = upstream_python(ctx)
    out: dict = {"machine": info, "quick": args.quick}
    print(header(info, args))

    # -- physical limits
    ctx.say("bare claim+finish loops (no laufband)")
    bare_tasks = 1000 if args.quick else 3000
    limits = [run_baseline(ctx, bare_tasks)]
    extra: list[tuple[str, dict]] = []
    if not args.quick:
        extra = [
            ("bare + flufl.lock file lock", run_baseline(ctx, bare_tasks, file_lock=True)),
            ("bare + file lock, 8 processes",
             run_baseline(ctx, bare_tasks, file_lock=True, processes=8)),
            ("bare, 10 tasks per transaction", run_baseline(ctx, 10 * bare_tasks, batch=10)),
            ("bare, 50 tasks per transaction", run_baseline(ctx, 20 * bare_tasks, batch=50)),
        ]
        limits.append(run_baseline(ctx, bare_tasks))

    # -- main scenarios
    ctx.say("scenarios")
    main_results = [run_scenario(ctx, sc) for sc in scenarios(args.quick, args.repeat)
                    if wanted(sc.name)]
    ctx.say("time per task, instrumented")
    breakdown = [run_scenario(ctx, sc) for sc in breakdown_scenarios(args.quick)
                 if wanted(sc.name) and with_shim]
    reg = []
    if not args.no_register and wanted("register"):
        ctx.say("registering big DAGs")
        specs = ["big:10x2000"] if args.quick else ["big:10x10000", "big:100x10000"]
        reg = [run_registration(ctx, spec, status=i == len(specs) - 1)
               for i, spec in enumerate(specs)]
    nfs = []
    if with_shim:
        ctx.say("simulated NFS latency")
        nfs = [run_scenario(ctx, sc) for sc in nfs_scenarios(args.quick) if wanted(sc.name)]
    up: list[tuple[Result, Result]] = []
    if args.compare_upstream:
        ctx.say(f"laufband {UPSTREAM}")
        for r in main_results:
            if r.scenario.upstream:
                up.append((r, run_scenario(ctx, r.scenario, "upstream")))
    limits.append(run_baseline(ctx, bare_tasks))
    limit = statistics.median(b["tasks_per_s"] for b in limits)

    # -- report
    print(limits_table(limits, extra, limit))
    if main_results:
        print(main_table(main_results, limit))
    if breakdown:
        print(breakdown_table(breakdown))
        print(ops_table([r for r in breakdown if "batch 1" in r.scenario.name]))
    if reg:
        print(registration_table(reg))
    if nfs:
        print(nfs_table(nfs))
    if up:
        print(upstream_table(up))
    checks = targets(main_results, limit, reg, up, args.quick)
    print(table(["target", "measured", "met"], checks, "Targets"))
    elapsed = time.monotonic() - started
    info["others_cores"] = whole_run.others()
    after = machine()
    print_footer(ctx, info, after, elapsed)
    if args.json:
        out.update(
            limit=limit, limits=limits, extra=extra, elapsed_s=elapsed,
            results=[r.to_json() for r in main_results + breakdown + nfs],
            upstream=[[a.to_json(), b.to_json()] for a, b in up],
            registration=[{k: (v.to_json() if isinstance(v, Result) else v)
                           for k, v in r.items()} for r in reg],
            targets=checks, failures=ctx.failures)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 1 if ctx.failures else 0


def header(info: dict, args: argparse.Namespace) -> str:
    dirty = (f" + uncommitted changes in {', '.join(info['dirty'])} (`git diff HEAD -- "
             f"laufband` sha256 {info['diff_sha256']})" if info["dirty"] else "")
    return (f"# laufband benchmark{' (quick)' if args.quick else ''}\n\n"
            f"- commit {info['commit']} (laufband/ tree {info['laufband_tree']}){dirty}, "
            f"{info['date']}\n"
            f"- {info['cores']} cores ({info['cpu']}), {info['memory_gb']} GB RAM, "
            f"kernel {info['kernel']}\n"
            f"- disk under test: {info['filesystem']} (directory {args.workdir})\n"
            f"- Python {info['python']}, SQLite {info['sqlite']}; default NFS-safe mode: "
            "rollback journal (delete) + flufl.lock file lock")


def limits_table(limits: list[dict], extra: list[tuple[str, dict]], limit: float) -> str:
    rows = [[f"bare loop, run {i + 1}", f1(b["tasks_per_s"], 0), f1(b["ms_per_txn"], 2),
             f1(b["fsync_ms"], 2)] for i, b in enumerate(limits)]
    rows += [[name, f1(b["tasks_per_s"], 0), f1(b["ms_per_txn"], 2), f1(b["fsync_ms"], 2)]
             for name, b in extra]
    return table(["bare claim+finish loop (plain sqlite3)", "tasks/s", "ms/txn",
                  "4 KiB fsync ms"], rows,
                 f"Physical limit on this disk: {limit:,.0f} tasks/s (median of the bare "
                 "single-process runs)")


def main_table(results: list[Result], limit: float) -> str:
    rows = [[r.scenario.name, r.scenario.workers, f"{r.tasks:,}", f1(r.setup_s), f1(r.wall_s, 2),
             f1(r.tasks_per_s, 0), f"{100 * r.tasks_per_s / limit:.0f} %", f1(r.overhead_ms, 2),
             f1(r.db_mb), f1(r.rss_mb, 0), notes(r)] for r in results]
    return table(["scenario", "workers", "tasks", "setup s", "wall s", "tasks/s", "% limit",
                  "ovh ms", "DB MB", "RSS MB", "notes"], rows, "Scenarios (default settings "
                 "unless named: batch_size='auto', journal_mode='delete')")


def breakdown_table(results: list[Result]) -> str:
    rows = []
    for r in results:
        n = max(r.tasks, 1)
        ms = {k: v / 1e6 / n for k, v in r.timers_ns.items()}
        s = {k: v[1] / 1e6 / n for k, v in r.shim.items()}
        worker_ms = r.wall_s * 1000 / n * r.scenario.workers
        acquire, release = ms.get("lock_acquire_in_step", 0), ms.get("lock_release_in_step", 0)
        fsync = s.get("db fsync", 0)
        fs_other = sum(v for k, v in s.items() if k.startswith("db ") and k != "db fsync")
        step = ms.get("step", 0)
        sql = step - acquire - release - fsync - fs_other
        steps = max(r.timer_calls.get("step", 1), 1)
        held = (step - acquire) * n / 1000 / r.wall_s if r.wall_s else 0
        rows.append([r.scenario.name, f"{r.tasks / steps:.1f}", f1(1000 * r.wall_s / n, 3),
                     f1(worker_ms, 3), f1(acquire, 3), f1(fsync, 3), f1(fs_other, 3),
                     f1(sql, 3), f1(release, 3), f1(worker_ms - step, 3),
                     f"{100 * held:.0f} %"])
    return table(["run (flat, trivial tasks)", "tasks/txn", "wall ms/task", "worker ms/task",
                  "lock acquire+wait", "fsync", "other db I/O", "SQL+Python", "lock release",
                  "outside txn", "lock held"], rows,
                 "Where the time goes: ms per task, summed over workers (worker ms = wall x "
                 "workers); the transaction = lock acquire .. release; 'lock held' = share of "
                 "the wall time some worker held the database lock for a claim+finish")


def ops_table(results: list[Result]) -> str:
    """File-system calls per committed transaction, by file and kind (from the shim)."""
    cats = ["open", "close", "link", "unlink", "fsync", "lock", "stat", "utime"]
    rows = []
    for r in results:
        steps = max(r.timer_calls.get("step", 1), 1)
        for kind in ("db", "lock"):
            rows.append([f"{r.scenario.name}: {'database' if kind == 'db' else 'lock file'}",
                         *(f"{r.shim.get(f'{kind} {c}', [0])[0] / steps:.1f}" for c in cats)])
    return table(["run", *cats], rows, "File-system calls per claim+finish transaction "
                 "('lock' on the database = fcntl byte-range locks; on the lock file, "
                 "failed attempts of waiting workers count too)")


def registration_table(reg: list[dict]) -> str:
    rows = []
    for r in reg:
        first: Result = r["first"]
        w = first.workers_info[0] if first.workers_info else {}
        j = r.get("join", {})
        rows.append([f"{r['tasks']:,}", f1(w.get("build_s")), f1(w.get("construct_s")),
                     f1(j.get("construct_s")), f1(first.tasks_per_s, 0),
                     f1(w.get("rss_import_mb"), 0), f1(w.get("rss_tasks_mb"), 0),
                     f1(w.get("rss_ready_mb"), 0), f1(first.rss_mb, 0), f1(j.get("maxrss_mb"), 0),
                     f1(r["db_mb"], 0)])
    out = table(["DAG tasks", "build Tasks s", "Graphband() s (registers)",
                 "2nd worker Graphband() s", "then tasks/s", "RSS after import MB",
                 "+ Task list MB", "+ Graphband MB", "peak MB", "2nd worker peak MB", "DB MB"],
                rows, "Registering a big layered DAG (each task depends on 2 of the layer "
                "before); the registering worker then runs 1,000 tasks")
    st = next((r for r in reg if "status" in r), None)
    if st:
        s = st["status"]
        out += table(["status read", "seconds"], [
            ["open_store(url) (schema check)", f1(s["open_s"], 4)],
            ["store.counts() (the summary), best of 5", f1(s["counts_s"], 4)],
            ["store.counts(), worst of 5", f1(s["counts_max_s"], 4)],
            ["cli.status(store) (counts, workers, running, failed)", f1(s["status_s"], 4)],
            ["`python -m laufband.cli status` (whole process)", f1(st["cli_s"], 2)],
        ], f"Status summary of the {st['tasks']:,}-task database")
    return out


def nfs_table(results: list[Result]) -> str:
    rows = []
    delayed = set(DELAYED)
    zero = {r.scenario.batch: r for r in results if r.scenario.delay_us == 0}

    def ms_per_txn(r: Result) -> float:
        return 1000 * r.wall_s / max(r.timer_calls.get("step", 1), 1)

    for r in results:
        steps = max(r.timer_calls.get("step", 1), 1)
        per = {kind: sum(v[0] for k, v in r.shim.items()
                         if k.startswith(kind + " ") and k.split()[1] in delayed) / steps
               for kind in ("lock", "db")}
        base = zero.get(r.scenario.batch)
        delay_ms = (r.scenario.delay_us or 0) / 1000
        trips = (f"{(ms_per_txn(r) - ms_per_txn(base)) / delay_ms:.0f}"
                 if base is not None and delay_ms else "-")
        rows.append([r.scenario.name, r.scenario.workers, f"{r.tasks:,}",
                     f1(r.tasks_per_s, 0), f"{r.tasks / steps:.1f}", f1(ms_per_txn(r), 1),
                     trips, f"{per['lock']:.1f}", f"{per['db']:.1f}", f1(r.setup_s, 1),
                     notes(r)])
    return table(["injected latency per operation", "workers", "tasks", "tasks/s",
                  "tasks/txn", "wall ms/txn", "latencies/txn", "lock-file ops/txn",
                  "db ops/txn", "setup s", "notes"], rows,
                 "Simulated NFS: every open/close, link/unlink/rename, fsync, truncate and "
                 "fcntl lock in the scenario directory waits the given time. Ops are counted "
                 "while claiming, all workers, per committed claim+finish transaction; "
                 "'latencies/txn' = (wall ms/txn - the same at 0 ms) / latency: how many "
                 "round trips one transaction costs on the critical path")


def upstream_table(pairs: list[tuple[Result, Result]]) -> str:
    rows = []
    for cur, old in pairs:
        ratio = cur.tasks_per_s / old.tasks_per_s if old.tasks_per_s else float("inf")
        state = "ok" if not old.problems else "; ".join(old.problems[:2])
        rows.append([cur.scenario.name, cur.scenario.workers, f1(cur.tasks_per_s, 0),
                     f1(old.tasks_per_s, 1), f"{old.tasks:,}", f"{ratio:,.1f}x",
                     f1(old.rss_mb, 0), f1(old.db_mb, 1), state])
    return table(["scenario", "workers", "this tasks/s", f"{UPSTREAM} tasks/s",
                  f"{UPSTREAM} tasks done", "ratio", f"{UPSTREAM} RSS MB", f"{UPSTREAM} DB MB",
                  f"{UPSTREAM} outcome"], rows,
                 f"This checkout against laufband {UPSTREAM}, same scenarios, same run")


def targets(results: list[Result], limit: float, reg: list[dict],
            up: list[tuple[Result, Result]], quick: bool) -> list[list[str]]:
    def find(name: str, workers: int) -> Result | None:
        return next((r for r in results if r.scenario.name == name
                     and r.scenario.workers == workers), None)

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    rows: list[list[str]] = []
    flat, n1k = ("flat 300", "flat 300") if quick else ("flat 1,000", "flat 1,000")
    w8 = 4 if quick else 8
    big = find(flat, w8)
    if big:
        frac = big.tasks_per_s / limit
        rows.append([f"{flat} x{w8} workers >= 60 % of the bare loop", f"{100 * frac:.0f} %",
                     yes(frac >= 0.6)])
        rows.append([f"{flat} x{w8} workers >= 300 tasks/s", f1(big.tasks_per_s, 0),
                     yes(big.tasks_per_s >= 300)])
        rows.append([f"batched claiming (auto): {flat} x{w8} >= 2,000 tasks/s",
                     f1(big.tasks_per_s, 0), yes(big.tasks_per_s >= 2000)])
    unbatched = find(f"{flat}, batch 1", w8)
    if unbatched:
        frac = unbatched.tasks_per_s / limit
        rows.append([f"(batch_size=1) {flat} x{w8} >= 60 % of the bare loop",
                     f"{100 * frac:.0f} % ({unbatched.tasks_per_s:,.0f}/s)", yes(frac >= 0.6)])
    for cur, old in up:
        if cur.scenario.name == flat and cur.scenario.workers == w8:
            ratio = cur.tasks_per_s / old.tasks_per_s if old.tasks_per_s else float("inf")
            rows.append([f"{flat} x{w8} >= 20x laufband {UPSTREAM}", f"{ratio:.1f}x",
                         yes(ratio >= 20)])
    small = find(n1k if not quick else "flat 300", 1)
    large = find("flat 100,000", 1) or find("flat 2,000", 1)
    if small and large:
        ratio = large.overhead_ms / small.overhead_ms
        rows.append([f"per-task overhead, 1 worker, {large.tasks:,} vs {small.tasks:,} tasks "
                     "<= 1.5x", f"{large.overhead_ms:.3f} / {small.overhead_ms:.3f} ms = "
                     f"{ratio:.2f}x", yes(ratio <= 1.5)])
    chain = next((r for r in results if r.handover_ms is not None), None)
    if chain:
        rows.append([f"{chain.scenario.name}: hand-over < 30 ms on average",
                     f"{chain.handover_ms:.1f} ms", yes(chain.handover_ms < 30)])
    sleepy = next((r for r in results if r.efficiency is not None), None)
    if sleepy:
        rows.append([f"{sleepy.scenario.name} x{sleepy.scenario.workers}: parallel "
                     "efficiency >= 90 %", f"{100 * sleepy.efficiency:.0f} %",
                     yes(sleepy.efficiency >= 0.9)])
    if reg:
        r = reg[-1]
        w = r["first"].workers_info[0] if r["first"].workers_info else {}
        t = w.get("construct_s", float("nan"))
        rows.append([f"register a {r['tasks']:,}-task DAG < 60 s", f"{t:.1f} s",
                     yes(t < 60)])
        if "status" in r:
            s = r["status"]
            read = s["open_s"] + s["status_s"]
            rows.append(["status summary of it < 1 s (open_store + cli.status)",
                         f"{read * 1000:.0f} ms (counts alone {s['counts_s'] * 1000:.1f} ms; "
                         f"whole CLI process {r['cli_s']:.2f} s)", yes(read < 1)])
        rows.append([f"worker memory for {r['tasks']:,} tasks (report)",
                     f"{r['first'].rss_mb:,.0f} MB peak", "-"])
    if quick:
        rows = [[a + " (quick sizes)", b, c] for a, b, c in rows]
    return rows


if __name__ == "__main__":
    sys.exit(main())
