"""SLURM: the time from `sbatch` to the first task, with this checkout and laufband 0.2.1.

    eval "$(scripts/slurm-up.sh)"              # the daemons (a single-node cluster)
    python benchmarks/slurm.py                 # 5 runs per row, about 2 minutes
    python benchmarks/slurm.py --quick         # 2 runs per row
    python benchmarks/slurm.py --no-upstream   # without laufband 0.2.1

Each run submits a job array (1 or 8 array tasks) whose script, as
examples/slurm/run.sbatch, exports LAUFBAND_IDENTIFIER from the array ids and execs
Python on benchmarks/slurm_worker.py: a flat graph of 16 tasks per worker, 50 ms each,
in a fresh database. The driver notes the wall clock just before `sbatch`; each worker
notes its batch shell's start, its interpreter's start, `import laufband` done, the
worker constructed (the graph registered) and its first task's start (time.time(): one
machine, one clock). Every task must run exactly once, and every job must complete
(exit code 1 otherwise).

Columns (medians over the runs; "first" is the worker whose first task started first):
    sbatch s      the sbatch command itself
    shell s       sbatch called -> the first worker's batch shell runs (SLURM schedules
                  and launches the job)
    python s      shell -> interpreter start (exec), then `import laufband`
    construct s   Graphband(...) (opening the database, registering the graph)
    claim s       constructed -> the first task starts (the first claim)
    first task s  sbatch called -> the first task starts (the sum; its range over runs)
    all working s sbatch called -> every worker has started a task
    others        cores other processes used meanwhile (this machine is shared)
Rows run in turns, so a busy moment of the machine hits every row alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (benchmarks/run.py: 0.2.1's venv, tables, CPU meter)

TASKS_PER_WORKER = 16
SLEEP = 0.05
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(args.workdir).resolve()
        self.python = {"current": sys.executable}
        self.failures: list[str] = []
        self.submitted: list[str] = []

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def slurm(*cmd: str, **kwargs) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)
    if out.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def job_states(job: str) -> list[str]:
    """``JobState`` of each array task (scontrol show job -o)."""
    return [word.split("=", 1)[1] for line in slurm("scontrol", "show", "job", "-o", job)
            .splitlines() for word in line.split() if word.startswith("JobState=")]


def wait_ended(job: str, deadline: float) -> list[str]:
    """Poll until nothing of the job is queued or running; its final states."""
    end = time.monotonic() + deadline
    while slurm("squeue", "-h", "-j", job, "-o", "%i").strip():
        if time.monotonic() > end:
            raise RuntimeError(f"job {job} still queued or running after {deadline:.0f} s")
        time.sleep(0.1)
    return job_states(job)


def run_once(ctx: Context, impl: str, workers: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"lb-slurm-{impl}-", dir=ctx.workdir))
    try:
        return measure(ctx, impl, workers, folder)
    finally:
        if not ctx.args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def measure(ctx: Context, impl: str, workers: int, folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAUFBAND_")}
    env.pop("PYTHONPATH", None)
    if impl == "current":
        env["PYTHONPATH"] = str(REPO)  # this checkout, whatever the venv holds
    tasks = TASKS_PER_WORKER * workers
    cmd = [ctx.python[impl], str(HERE / "slurm_worker.py"), "--db",
           f"sqlite:///{folder / 'db.sqlite'}", "--tasks", str(tasks), "--sleep", str(SLEEP)]
    out = shlex.quote(str(folder)) + '/w"$SLURM_ARRAY_TASK_ID".json'
    script = folder / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        # bash's own clock: no process started before the stamp
        f'echo "$EPOCHREALTIME" > {shlex.quote(str(folder))}/shell."$SLURM_ARRAY_TASK_ID"\n'
        'export LAUFBAND_IDENTIFIER="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"\n'
        f"exec {shlex.join(cmd)} --out {out}\n")
    meter = bench.CpuMeter()
    submitted = time.time()
    job = slurm("sbatch", "--parsable", f"--array=0-{workers - 1}", f"--chdir={folder}",
                f"--output={folder}/slurm-%A_%a.out", "--job-name=laufband-bench",
                str(script), env=env).strip().split(";")[0]
    sbatch_s = time.time() - submitted
    ctx.submitted.append(job)
    states = wait_ended(job, 120 + 10 * tasks * SLEEP)
    others = meter.others()
    problems = [f"array task ended {s}" for s in states if s != "COMPLETED"]
    infos = []
    for i in range(workers):
        path = folder / f"w{i}.json"
        if not path.exists():
            log = (folder / f"slurm-{job}_{i}.out")
            tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
            problems.append(f"worker {i} wrote nothing: {tail}")
            continue
        info = json.loads(path.read_text())
        info["shell"] = float((folder / f"shell.{i}").read_text().replace(",", "."))
        infos.append(info)
    ran = [t for info in infos for t in info["tasks"]]
    if sorted(ran) != sorted(f"t{i}" for i in range(tasks)):
        problems.append(f"{len(ran)} task runs, {len(set(ran))} distinct, of {tasks}")
    want = bench.UPSTREAM if impl == "upstream" else None
    for info in infos:
        if (info["version"] == bench.UPSTREAM) != (want is not None) or (
                want is None and not info["file"].startswith(str(REPO / "laufband"))):
            problems.append(f"a worker of {impl} ran laufband {info['version']} from "
                            f"{info['file']}")
    idle = [info for info in infos if info["first_task"] is None]
    if idle:
        problems.append(f"{len(idle)} worker(s) ran no task")
    if problems:
        ctx.failures.append(f"{impl}, {workers} job(s): {'; '.join(problems)}")
        ctx.say(f"  {impl:<8} {workers} job(s): PROBLEM: {'; '.join(problems[:3])}")
        return {}
    first = min(infos, key=lambda info: info["first_task"])
    m = {
        "sbatch": sbatch_s,
        "shell": first["shell"] - submitted,
        "python": first["started"] - first["shell"],
        "import": first["imported"] - first["started"],
        "construct": first["constructed"] - first["imported"],
        "claim": first["first_task"] - first["constructed"],
        "first_task": first["first_task"] - submitted,
        "all_working": max(info["first_task"] for info in infos) - submitted,
        "others": others,
    }
    ctx.say(f"  {impl:<8} {workers} job(s): first task {m['first_task']:.2f} s (shell "
            f"{m['shell']:.2f} s), all working {m['all_working']:.2f} s")
    return m


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="2 runs per row")
    p.add_argument("--repeat", type=int, default=None, help="runs per row (default 5; 2 "
                   "with --quick)")
    p.add_argument("--no-upstream", action="store_true", help="skip laufband 0.2.1")
    p.add_argument("--workdir", default=str(Path.cwd()),
                   help="where the runs' folders go: the jobs must see it (default: here)")
    p.add_argument("--keep", action="store_true", help="keep the runs' folders")
    args = p.parse_args()
    repeat = args.repeat or (2 if args.quick else 5)
    ctx = Context(args)
    if not shutil.which("sbatch"):
        raise SystemExit('no sbatch here: eval "$(scripts/slurm-up.sh)" starts a '
                         "single-node SLURM")
    impls = ["current"] if args.no_upstream else ["upstream", "current"]
    if "upstream" in impls:
        ctx.python["upstream"] = bench.upstream_python(ctx)  # type: ignore[arg-type]
    rows_of = [(impl, n) for n in (1, 8) for impl in impls]
    results: dict[tuple[str, int], list[dict]] = {row: [] for row in rows_of}
    started = time.monotonic()
    try:
        for r in range(repeat):
            ctx.say(f"round {r + 1}/{repeat}")
            for row in rows_of:
                m = run_once(ctx, *row)
                if m:
                    results[row].append(m)
    finally:
        if ctx.submitted:  # whatever happened, no job of ours stays queued
            subprocess.run(["scancel", *ctx.submitted], capture_output=True)

    def med(ms: list[dict], key: str) -> str:
        return f"{statistics.median(m[key] for m in ms):.2f}" if ms else "-"

    rows = []
    for (impl, n), ms in results.items():
        firsts = [m["first_task"] for m in ms]
        rows.append([
            bench.UPSTREAM if impl == "upstream" else "this checkout", str(n), str(len(ms)),
            med(ms, "sbatch"), med(ms, "shell"),
            f"{med(ms, 'python')} + {med(ms, 'import')}", med(ms, "construct"),
            med(ms, "claim"), med(ms, "first_task"),
            f"{min(firsts):.2f}-{max(firsts):.2f}" if firsts else "-",
            med(ms, "all_working"), f"{med(ms, 'others')}"])
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "laufband"],
                           capture_output=True, text=True).stdout.strip()
    version = slurm("sbatch", "--version").strip()
    print(f"## laufband SLURM benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"commit {commit}{' (laufband/ modified)' if dirty else ''}, {version}, "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {repeat} run(s) per "
          f"row, {time.monotonic() - started:.0f} s")
    print(bench.table(
        ["laufband", "jobs", "runs", "sbatch s", "shell s", "python s", "construct s",
         "claim s", "first task s", "range s", "all working s", "others"], rows,
        f"sbatch to the first task: a job array of 1 or 8, {TASKS_PER_WORKER} tasks of "
        f"{SLEEP * 1000:.0f} ms per worker (medians; python s = exec + import)"))
    return bench.report_failures(ctx.failures)


if __name__ == "__main__":
    sys.exit(main())
