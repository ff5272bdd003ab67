"""Workers as real SLURM jobs (the daemons of scripts/slurm-up.sh): a job array over a
DAG, an array task cancelled mid-task, a requeued array task, the sbatch example, and
`laufband submit`, and a job with a one-minute time limit that drains on its warning
signal.

Each job runs a worker script with this test run's Python over a database in the
test's folder (one machine: the folder is shared as a cluster's file system would
be), and appends what it ran to a JSON-lines file of its own; the checks read those
and the database. The `slurm` fixture cancels every job a test submitted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import (
    FAULT_WORKER,
    WORKER,
    Faults,
    Run,
    assert_dependency_order,
    assert_exactly_once,
    query,
    wait_until,
    waiting_workers,
)
from graphs import build

from laufband import walltime

pytestmark = [pytest.mark.slurm, pytest.mark.processes]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "slurm"
#: 10 layers of 20 tasks, each depending on 3 of the layer before (tests/graphs.py).
GRAPH = "layered:10x20"
#: The layer-0 task with the most descendants (164 of 200): held, it keeps most of the
#: graph waiting until the test releases it.
HELD = "L0_17"
#: SLURMD_NODENAME: slurm-up.sh names the node by the short host name.
NODE = socket.gethostname().split(".")[0]
#: Job states after which nothing of a job runs any more (until a requeue).
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _command(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)
    if check and out.returncode:
        raise AssertionError(f"{shlex.join(cmd)} exited {out.returncode}: {out.stderr}")
    return out


def parse_job(line: str) -> dict[str, str]:
    """One line of ``scontrol show job -o``: ``Key=value`` pairs (a value runs up to the
    next `` Key=``, so values with spaces survive)."""
    return dict(re.findall(r"([A-Za-z][\w:/.]*)=(.*?)(?= [A-Za-z][\w:/.]*=|$)", line.strip()))


def forgotten(stderr: str) -> bool:
    """The error of scontrol/squeue for a job SLURM does not know (any more)."""
    return "Invalid job id" in stderr or "not found" in stderr


class Slurm:
    """Submits jobs from a test's folder, reads their state, and cancels them all at
    the end (the ``slurm`` fixture)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.submitted: list[str] = []

    def submit(self, script: str | Path, *sbatch_args: str, env: dict | None = None,
               log: bool = True) -> str:
        """sbatch a script (its text, or a file) from the test's folder, with the test
        run's environment and ``env``; the job id. With ``log``, the job's output goes
        to ``slurm-<job>_<task>.out`` there (``job_log``), appended across requeues."""
        if isinstance(script, str):
            path = self.folder / f"job{len(self.submitted)}.sh"
            path.write_text(script)
            script = path
        if log:
            sbatch_args = (f"--output={self.folder}/slurm-%A_%a.out", "--open-mode=append",
                           *sbatch_args)
        out = _command("sbatch", "--parsable", f"--chdir={self.folder}", *sbatch_args,
                     str(script), cwd=self.folder, env={**os.environ, **(env or {})})
        job = out.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
        self.submitted.append(job)
        return job

    def jobs(self, job: str) -> list[dict[str, str]]:
        """``scontrol show job -o``: one dict per job (per array task once they are
        split; a pending array's unstarted tasks share one), [] once SLURM forgot it
        (MinJobAge after its end).

        Name one array task as ``ARRAYJOB_TASK`` (here and in squeue, scancel, scontrol
        requeue/update): its own job id may be the array's id, which means every task."""
        out = _command("scontrol", "show", "job", "-o", job, check=False)
        if out.returncode:
            if forgotten(out.stderr):
                return []
            raise AssertionError(f"scontrol show job {job}: {out.stderr}")
        return [parse_job(line) for line in out.stdout.splitlines() if line.strip()]

    def tasks(self, job: str) -> dict[int, dict[str, str]]:
        """An array's started tasks by task id (each has a job id of its own)."""
        return {int(j["ArrayTaskId"]): j for j in self.jobs(job)
                if j.get("ArrayTaskId", "").isdigit()}

    def queued(self, job: str) -> list[str]:
        """What squeue still lists of the job: pending, running or completing (its
        processes may still exit) tasks, as ``id state``."""
        out = _command("squeue", "-h", "-j", job, "-o", "%i %T", check=False)
        if out.returncode and not forgotten(out.stderr):
            raise AssertionError(f"squeue -j {job}: {out.stderr}")
        return out.stdout.split("\n")[:-1] if out.returncode == 0 else []

    def wait_state(self, job: str, state: str, timeout: float = 60) -> dict[str, str]:
        """Wait until one job (or array task: ``ARRAYJOB_TASK``) is in ``state``; its
        record."""
        def reached():
            found = self.jobs(job)
            return found[0] if found and found[0]["JobState"] == state else None
        return wait_until(reached, timeout=timeout, interval=0.1,
                          what=f"job {job} {state}: {self.jobs(job)}")

    def wait_gone(self, job: str, timeout: float = 120) -> list[dict[str, str]]:
        """Wait until nothing of ``job`` runs or waits any more (every array task ended
        and its processes exited); the final records."""
        wait_until(lambda: not self.queued(job), timeout=timeout, interval=0.2,
                   what=f"job {job} to end: {self.queued(job)}")
        final = self.jobs(job)
        assert all(j["JobState"] in ENDED for j in final), final
        return final

    def cancel_all(self) -> None:
        if not self.submitted:
            return
        _command("scancel", *self.submitted, check=False)
        for job in self.submitted:
            self.wait_gone(job, timeout=60)


@pytest.fixture
def slurm(tmp_path):
    s = Slurm(tmp_path)
    yield s
    s.cancel_all()


def worker_job(folder: Path, script: Path, prefix: str = "w", **options: object) -> str:
    """A batch script as users write it (examples/slurm/run.sbatch): the identity from
    the array ids, exec python. Each incarnation (SLURM_RESTART_COUNT: requeues) records
    into ``<prefix><array task>.<restart>.jsonl``."""
    args = [sys.executable, str(script), "--db", f"sqlite:///{folder / 'graph.sqlite'}"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    out = (shlex.quote(f"{folder}/{prefix}")
           + '"${SLURM_ARRAY_TASK_ID}.${SLURM_RESTART_COUNT:-0}"')
    return ("#!/bin/bash\n"
            'export LAUFBAND_IDENTIFIER="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"\n'
            f"exec {shlex.join(args)} --out {out}.jsonl\n")


def recorded(folder: Path, pattern: str = "w*.jsonl") -> Run:
    """What the workers wrote: task records and exit records (jobs have no return code
    here; the test reads their state from SLURM)."""
    records, exits = [], []
    for path in sorted(folder.glob(pattern)):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            (exits if "exit" in rec else records).append(rec)
    return Run(records, exits, [], [])


def workers_json(folder: Path) -> dict[str, dict]:
    """``laufband workers --json`` of the test's database, by worker id."""
    out = _command(sys.executable, "-m", "laufband.cli", "--db", str(folder / "graph.sqlite"),
                 "workers", "--json")
    return {w["id"]: w for w in json.loads(out.stdout)}


def job_log(folder: Path, array_job: str, task: int) -> str:
    return (folder / f"slurm-{array_job}_{task}.out").read_text()


def test_a_job_array_runs_the_dag_once_in_dependency_order(slurm, tmp_path):
    job = slurm.submit(worker_job(tmp_path, WORKER, graph=GRAPH, sleep=0.01), "--array=0-3")
    final = slurm.wait_gone(job)
    tasks = build(GRAPH)
    run = recorded(tmp_path)
    assert_exactly_once(run, [t.id for t in tasks])
    assert_dependency_order(run, tasks)

    array = slurm.tasks(job)
    assert sorted(array) == [0, 1, 2, 3], final
    for i, rec in array.items():
        assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), \
            job_log(tmp_path, job, i)
    # Each array task is one worker, named by LAUFBAND_IDENTIFIER, that recorded its
    # SLURM job, array job, task and node, and left cleanly.
    ids = {f"{job}_{i}": i for i in array}
    assert sorted(e["exit"] for e in run.exits) == sorted(ids)
    for rec in run.records:
        assert rec["worker"] in ids
    workers = workers_json(tmp_path)
    assert workers.keys() == ids.keys()
    node = NODE
    for ident, i in ids.items():
        assert workers[ident]["slurm"] == {"job": array[i]["JobId"], "array_job": job,
                                           "array_task": str(i), "node": node}
        assert workers[ident]["state"] == "offline"
    assert sum(w["completed"] for w in workers.values()) == len(tasks)


def hold_and_find(slurm: Slurm, faults: Faults, job: str) -> tuple[str, int]:
    """Wait until a worker is inside the held task; its identifier and array task."""
    wait_until(lambda: faults.started(HELD), timeout=90, interval=0.1,
               what=f"a worker inside {HELD} ({slurm.queued(job)})")
    [(event, attempt, holder)] = faults.events(HELD)[:1]
    assert (event, attempt) == ("claimed", 1)
    array_job, _, task = holder.partition("_")
    assert array_job == job, holder
    return holder, int(task)


def claimed_again(faults: Faults) -> str:
    """The worker of the held task's attempt 2, once it claimed it."""
    for event, attempt, worker in faults.events(HELD):
        if (event, attempt) == ("claimed", 2):
            return worker
    return ""


def test_two_stages_as_two_arrays_the_later_stage_started_first(slurm, tmp_path):
    """A pipeline of two worker families as two job arrays, the gpu stage's running
    before the cpu stage's was even submitted (the scheduler's order): the gpu workers
    wait for cpu workers (label_wait) instead of leaving with nothing done."""
    def family(labels: str) -> str:  # each family records into <labels><task>.*.jsonl
        return worker_job(tmp_path, WORKER, prefix=labels, graph="stages:20", labels=labels,
                          sleep=0.01)

    gpu = slurm.submit(family("gpu"), "--array=0-1")
    db = tmp_path / "graph.sqlite"
    # Both gpu workers registered and wait (a waiting worker's row names the state it
    # leaves in), with no cpu worker anywhere.
    wait_until(lambda: waiting_workers(db) == 2, timeout=60, interval=0.2,
               what="the gpu workers waiting")
    cpu = slurm.submit(family("cpu"), "--array=0-1")
    for job in (gpu, cpu):
        slurm.wait_gone(job)
        for i, rec in slurm.tasks(job).items():
            assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), \
                job_log(tmp_path, job, i)
    tasks = build("stages:20")
    run = recorded(tmp_path, "*.jsonl")
    assert_exactly_once(run, [t.id for t in tasks])
    assert_dependency_order(run, tasks)
    ran_gpu = {r["worker"] for r in run.records if r["id"].startswith("gpu")}
    assert ran_gpu and ran_gpu <= {f"{gpu}_0", f"{gpu}_1"}, run.records
    assert "labels no live worker has" in job_log(tmp_path, gpu, 0)


def test_scancel_of_an_array_task_hands_its_task_to_the_others(slurm, tmp_path):
    faults = Faults(SimpleNamespace(folder=tmp_path), GRAPH)
    job = slurm.submit(worker_job(tmp_path, FAULT_WORKER, graph=GRAPH, sleep=0.01,
                                  effects=faults.effects, hold=HELD), "--array=0-3")
    holder, task = hold_and_find(slurm, faults, job)

    _command("scancel", f"{job}_{task}")
    # SIGTERM: the worker hands the task back at once (a heartbeat timeout of 60 s: a
    # redo within seconds can only be the hand-back) and another worker claims it.
    successor = wait_until(lambda: claimed_again(faults), timeout=30, interval=0.1,
                           what=f"{HELD} claimed again after scancel")
    assert successor != holder
    wait_until(lambda: not slurm.queued(holder), timeout=60, interval=0.2,
               what=f"the cancelled array task {holder} to end")
    faults.release()
    slurm.wait_gone(job)

    array = slurm.tasks(job)
    assert array[task]["JobState"] == "CANCELLED"
    assert f"SIGTERM received: task '{HELD}' was handed back" in job_log(tmp_path, job, task)
    for i, rec in array.items():
        if i != task:
            assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), \
                job_log(tmp_path, job, i)
    events = faults.events(HELD)
    assert events[:2] == [("claimed", 1, holder), ("preempted", 1, holder)]
    assert ("completed", 2, successor) in events
    assert query(faults.db, "SELECT sum(kills) FROM tasks") == [(0,)]
    assert faults.worker_state(holder) == "offline"
    tasks = build(GRAPH)
    run = recorded(tmp_path)
    assert_exactly_once(run, [t.id for t in tasks])
    assert_dependency_order(run, tasks)
    assert holder not in {e["exit"] for e in run.exits}  # it was stopped, not done
    faults.assert_consistent()


def test_a_requeued_array_task_takes_its_identity_back(slurm, tmp_path):
    faults = Faults(SimpleNamespace(folder=tmp_path), GRAPH)
    job = slurm.submit(worker_job(tmp_path, FAULT_WORKER, graph=GRAPH, sleep=0.01,
                                  effects=faults.effects, hold=HELD),
                       "--array=0-3", "--requeue")
    holder, task = hold_and_find(slurm, faults, job)
    own_id = slurm.tasks(job)[task]["JobId"]  # the array task's own job id
    [(first_pid,)] = query(faults.db, "SELECT pid FROM workers WHERE id = ?", (holder,))

    requeued_at = time.time()
    _command("scontrol", "requeue", holder)  # the worker's identifier: ARRAYJOB_TASK
    successor = wait_until(lambda: claimed_again(faults), timeout=30, interval=0.1,
                           what=f"{HELD} claimed again after the requeue")
    # A requeued job waits (BeginTime) for its old credential to expire: AuthInfo's
    # cred_expire, 120 s by default. An administrator (or this test) may start it now,
    # but not within the second of the requeue: a job started then is refused on the
    # node ("Job credential revoked": revocations are stamped in whole seconds), and
    # it stays pending until the next scheduler pass. So wait for the old process to
    # be gone and the clock to be 2 s past the requeue.
    pending = slurm.wait_state(holder, "PENDING")
    assert (pending["Reason"], pending["Restarts"]) == ("BeginTime", "1"), pending
    wait_until(lambda: not Path(f"/proc/{first_pid}").exists()
               and time.time() > requeued_at + 2, timeout=30, interval=0.1,
               what=f"the first process of {holder} gone, 2 s after the requeue")
    _command("scontrol", "update", f"jobid={holder}", "StartTime=now")
    slurm.wait_state(holder, "RUNNING")

    def back() -> bool:
        rows = query(faults.db, "SELECT pid, state FROM workers WHERE id = ?", (holder,))
        return rows[0][0] != first_pid and rows[0][1] in ("idle", "busy")
    wait_until(back, timeout=60, interval=0.1, what=f"{holder} back after its requeue")
    faults.release()  # most of the graph waits for the held task: work for everyone
    slurm.wait_gone(job)

    array = slurm.tasks(job)
    for i, rec in array.items():
        assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), \
            job_log(tmp_path, job, i)
    assert array[task]["JobId"] == own_id and array[task]["Restarts"] == "1"
    log = job_log(tmp_path, job, task)
    assert f"SIGTERM received: task '{HELD}' was handed back" in log
    # One worker row per array task: the requeued job took its row back (a new pid,
    # the same SLURM ids), and no other worker appeared.
    workers = workers_json(tmp_path)
    assert workers.keys() == {f"{job}_{i}" for i in range(4)}
    assert workers[holder]["pid"] != first_pid
    assert workers[holder]["slurm"] == {"job": own_id, "array_job": job,
                                        "array_task": str(task), "node": NODE}
    assert all(w["state"] == "offline" for w in workers.values()), workers
    events = faults.events(HELD)
    assert events[:2] == [("claimed", 1, holder), ("preempted", 1, holder)]
    assert ("completed", 2, successor) in events
    # The first incarnation stopped inside the held task; the second ran tasks and
    # finished (164 of 200 tasks waited for the held one when it came back).
    first = recorded(tmp_path, f"w{task}.0.jsonl")
    second = recorded(tmp_path, f"w{task}.1.jsonl")
    assert not first.exits and [e["exit"] for e in second.exits] == [holder]
    assert second.records and {r["worker"] for r in second.records} == {holder}
    tasks = build(GRAPH)
    run = recorded(tmp_path)
    assert_exactly_once(run, [t.id for t in tasks])
    assert_dependency_order(run, tasks)
    faults.assert_consistent()


def test_the_sbatch_example_runs_its_workflow(slurm, tmp_path):
    """examples/slurm/run.sbatch as a user submits it (4 array tasks instead of 8, short
    simulations), with this test run's Python."""
    for name in ("run.sbatch", "main.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    job = slurm.submit(tmp_path / "run.sbatch", "--array=0-3", log=False,
                       env={"PYTHON": sys.executable, "SIM_SECONDS": "0.01"})
    slurm.wait_gone(job)
    for i, rec in slurm.tasks(job).items():
        log = (tmp_path / f"laufband-{job}_{i}.out").read_text()
        assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), log
    db = tmp_path / "workflow.sqlite"
    assert query(db, "SELECT state, count(*) FROM tasks GROUP BY state") == [("completed", 73)]
    assert sorted(w for (w,) in query(db, "SELECT id FROM workers")) == [
        f"{job}_{i}" for i in range(4)]
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(report) == [f"analyse/{g}" for g in range(8)]
    assert all(r["n"] == 8 for r in report.values())


#: The worker of `laufband submit`'s test: its database only from LAUFBAND_DB (set by
#: the script from --db), its identity from LAUFBAND_IDENTIFIER; records into
#: w<identifier>.jsonl in the folder it runs in.
SUBMITTED_WORKER = """\
import json, sys, time
sys.path.insert(0, {tests!r})
from graphs import build
from laufband import Graphband

worker = Graphband(build({graph!r}), tqdm_kwargs={{"disable": True}})
with open(f"w{{worker.identifier}}.jsonl", "a", buffering=1) as out:
    for task in worker:
        start = time.monotonic_ns()
        time.sleep(0.01)
        out.write(json.dumps({{"id": task.id, "start": start, "end": time.monotonic_ns(),
                              "worker": worker.identifier}}) + "\\n")
    out.write(json.dumps({{"exit": worker.identifier}}) + "\\n")
"""


def test_laufband_submit_runs_the_dag_as_a_job_array(slurm, tmp_path):
    """`laufband submit --workers 3 ... -- python worker.py` from the test's folder: the
    script it writes runs there, the sbatch option reaches SLURM, each array task is
    one worker over the --db database, and together they run the graph once."""
    (tmp_path / "worker.py").write_text(
        SUBMITTED_WORKER.format(tests=str(WORKER.parent), graph=GRAPH))
    (tmp_path / "sub dir").mkdir()
    out = _command(sys.executable, "-m", "laufband.cli", "submit", "--workers", "3",
                   "--db", "sub dir/graph.sqlite", "--time=00:05:00", "--",
                   sys.executable, "worker.py", cwd=tmp_path)
    job = re.match(r"submitted job array (\d+): 3 worker\(s\)", out.stdout)
    assert job, out.stdout + out.stderr
    job = job[1]
    slurm.submitted.append(job)  # cancelled at the end, whatever happens
    [script] = tmp_path.glob("laufband-submit-*.sbatch")
    assert f"script: {script} " in out.stdout
    assert f"laufband --db '{tmp_path}/sub dir/graph.sqlite' status" in out.stdout

    slurm.wait_gone(job)
    array = slurm.tasks(job)
    assert sorted(array) == [0, 1, 2]
    for i, rec in array.items():
        log = tmp_path / f"laufband-{job}_{i}.out"
        assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()
        assert (rec["TimeLimit"], rec["Requeue"], rec["WorkDir"], rec["Command"],
                rec["StdOut"]) == ("00:05:00", "1", str(tmp_path), str(script), str(log))
    tasks = build(GRAPH)
    run = recorded(tmp_path)
    assert_exactly_once(run, [t.id for t in tasks])
    assert_dependency_order(run, tasks)
    ids = {f"{job}_{i}" for i in range(3)}
    assert sorted(e["exit"] for e in run.exits) == sorted(ids)
    db = tmp_path / "sub dir" / "graph.sqlite"  # LAUFBAND_DB: --db, made absolute
    assert query(db, "SELECT state, count(*) FROM tasks GROUP BY state") == [
        ("completed", len(tasks))]
    workers = {w: state for w, state in query(db, "SELECT id, state FROM workers")}
    assert workers == dict.fromkeys(ids, "offline")


#: Tasks declared (and sleeping) 3 s each, more than one job of a minute can run, and
#: "long", declared to take 10 min, first in claim order (tests/graphs.py).
TIMED = "walltime:24x3"
#: The job's warning: SIGUSR1 20 s before its minute is up. SLURM checks limits in
#: sweeps 30 s apart and sends the warning at the first sweep at most 30 s before it is
#: due, so it comes 10 to 40 s after the job starts; the limit's SIGTERM (which this job
#: must never see) 60 to 90 s after.
WARN = 20
#: LAUFBAND_WALLTIME_MARGIN: the 60 s default would leave a one-minute job no time.
MARGIN = 5


def slurm_time(record: dict[str, str], key: str) -> float:
    return walltime.parse_end_time(record[key])


def test_a_job_with_a_time_limit_drains_on_its_warning_signal_and_exits_0(
        slurm, workers, tmp_path):
    signals = tmp_path / "signals.jsonl"
    job = slurm.submit(worker_job(tmp_path, WORKER, graph=TIMED, runtime_sleep=1,
                                  signal_log=signals),
                       "--array=0", "--time=1", f"--signal=B:USR1@{WARN}",
                       env={"LAUFBAND_WALLTIME_MARGIN": str(MARGIN)})
    slurm.wait_gone(job, timeout=120)
    ident, log = f"{job}_0", job_log(tmp_path, job, 0)

    # Drained: COMPLETED with exit code 0 before the time limit, on SIGUSR1.
    rec = slurm.tasks(job)[0]
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert rec["TimeLimit"] == "00:01:00"
    limit = slurm_time(rec, "StartTime") + 60
    assert slurm_time(rec, "EndTime") < limit, rec
    assert "laufband: SIGUSR1 received: worker" in log
    assert "stops claiming and exits (exit code 0)" in log and "Traceback" not in log
    [(allocation_end,)] = query(tmp_path / "graph.sqlite",
                                "SELECT allocation_end FROM workers WHERE id = ?", (ident,))
    assert allocation_end == limit  # what the worker read from scontrol
    got = [json.loads(line) for line in signals.read_text().splitlines()]
    assert [s["signal"] for s in got] == ["SIGUSR1"], got  # no SIGTERM
    warned = got[0]["at"]
    # The warning came while tasks that fit were left: it, not the lack of time,
    # ended the worker's loop (else the test's timing assumptions are wrong).
    assert warned + 3 < allocation_end - MARGIN, (warned, allocation_end)

    # It ran tasks before the warning, started none after it, and each one it started
    # finished in time: none is left running.
    ran = recorded(tmp_path, "w0.*.jsonl").records
    assert ran and {r["worker"] for r in ran} == {ident}
    assert max(r["wall_start"] for r in ran) < warned, (ran, warned)
    assert max(r["wall_end"] for r in ran) < allocation_end
    attempts = query(tmp_path / "graph.sqlite",
                     "SELECT t.id, a.attempt, a.worker, a.started_at, a.ended_at, a.outcome,"
                     " a.error FROM attempts a JOIN tasks t ON t.pk = a.task")
    completed = {tid for tid, *_, outcome, _ in attempts if outcome == "completed"}
    assert completed == {r["id"] for r in ran}
    for tid, attempt, worker, started, ended, outcome, error in attempts:
        assert (attempt, worker) == (1, ident) and ended is not None, attempts
        if outcome == "completed":
            assert started < warned and ended < allocation_end, (tid, started, ended)
        else:  # claimed ahead before the warning came, never started: handed back
            assert (outcome, error) == (
                "preempted", "SIGUSR1 received: claimed, not started"), (tid, error)
    # "long" (10 min, first in claim order) was never claimed: no attempt at all. The
    # rest waits for others: ready (or pending behind a ready one), nothing running.
    assert "long" not in {tid for tid, *_ in attempts}
    states = dict(query(tmp_path / "graph.sqlite", "SELECT id, state FROM tasks"))
    assert states["long"] == "ready"
    left = {tid for tid, state in states.items() if state != "completed"}
    assert left - {"long"} and {states[tid] for tid in left} <= {"ready", "pending"}
    assert workers_json(tmp_path)[ident]["state"] == "offline"

    # A worker outside SLURM (no limit) runs the rest at once ("long" too).
    workers.start(TIMED, env={"SLURM_JOB_END_TIME": "", "SLURM_JOB_ID": ""})
    rest = workers.wait(timeout=60)
    assert rest.returncodes == [0], rest.stderr
    assert {r["id"] for r in rest.records} == left
    assert_exactly_once(Run(ran + rest.records, [], [], []), [t.id for t in build(TIMED)])
    assert query(tmp_path / "graph.sqlite", "SELECT DISTINCT state FROM tasks") \
        == [("completed",)]
