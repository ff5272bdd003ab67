"""`laufband submit`: the array script it writes, the sbatch command line, its errors.

sbatch here is a fake on PATH (a script that records its arguments, its folder and the
script it was given); tests/integration/test_slurm.py submits to real SLURM daemons.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from laufband import cli, submit


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def sbatch(tmp_path, monkeypatch):
    """Puts a fake sbatch first on PATH; ``sbatch(out=, err=, rc=)`` sets what it
    answers; ``sbatch.calls()`` is what it was called with."""
    folder = tmp_path / "bin"
    folder.mkdir()
    log = tmp_path / "sbatch.jsonl"
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")

    class Fake:
        def __call__(self, out: str = "4242\n", err: str = "", rc: int = 0) -> None:
            exe = folder / "sbatch"
            exe.write_text(
                f"#!{sys.executable}\nimport json, os, sys\n"
                f"with open({str(log)!r}, 'a') as f:\n"
                "    f.write(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
                "                        'script': open(sys.argv[-1]).read()}) + '\\n')\n"
                f"sys.stdout.write({out!r}); sys.stderr.write({err!r}); sys.exit({rc})\n")
            exe.chmod(0o755)

        def calls(self) -> list[dict]:
            return ([json.loads(line) for line in log.read_text().splitlines()]
                    if log.exists() else [])

    fake = Fake()
    fake()
    return fake


def scripts(folder: Path) -> list[Path]:
    return sorted(folder.glob("laufband-submit-*.sbatch"))


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines()
            if line.startswith("#SBATCH ")]


def test_dry_run_prints_the_array_script_and_writes_nothing(capsys, tmp_path, sbatch):
    (tmp_path / "runs").mkdir()
    code, out, err = run(capsys, "submit", "--workers", "4", "--db", "runs/wf.sqlite",
                         "--dry-run", "--", "python", "main.py")
    assert (code, err) == (0, "")
    assert out.startswith("#!/bin/bash\n")
    assert directives(out) == ["--job-name=laufband", "--array=0-3", "--signal=B:USR1@60",
                               "--requeue", "--output=laufband-%A_%a.out"]
    assert f"export LAUFBAND_DB={tmp_path}/runs/wf.sqlite\n" in out  # made absolute
    assert ("export LAUFBAND_IDENTIFIER=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}\n"
            in out)
    assert out.endswith("\nexec python main.py\n")
    assert f"#   cd {tmp_path} && sbatch laufband-submit-" in out
    assert f"# Watch: laufband --db {tmp_path}/runs/wf.sqlite status\n" in out
    assert not scripts(tmp_path) and not sbatch.calls()
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)  # valid shell


def test_the_script_execs_the_command_with_its_arguments_unchanged(capsys, tmp_path):
    """Spaces, quotes and $ in the command reach the program as they were given."""
    args = ["a b", "it's", "$HOME", "`id`", "*", ""]
    probe = "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ['LAUFBAND_IDENTIFIER'], os.environ['LAUFBAND_DB'], os.getcwd()]))"  # noqa: E501
    code, out, _ = run(capsys, "submit", "--workers", "2", "--db", "d b.sqlite",
                       "--dry-run", "--", sys.executable, "-c", probe, *args)
    assert code == 0
    env = {**os.environ, "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1"}
    ran = subprocess.run(["bash"], input=out, text=True, capture_output=True, env=env,
                         check=True, cwd=tmp_path)
    assert json.loads(ran.stdout) == [args, "7_1", f"{tmp_path}/d b.sqlite", str(tmp_path)]


def test_submit_writes_the_script_here_and_passes_sbatch_options_unchanged(
        capsys, tmp_path, sbatch):
    sbatch_args = ["--time=02:00:00", "-p", "debug", "--partition=x", "--mem", "4G"]
    # --db before the command, and --workers amid sbatch's options
    code, out, err = run(capsys, "--db", "wf.sqlite", "submit", *sbatch_args[:3],
                         "--workers", "3", *sbatch_args[3:], "--", "python", "main.py",
                         "--workers", "9")
    assert (code, err) == (0, "")
    [script] = scripts(tmp_path)
    [call] = sbatch.calls()
    # laufband's own options are gone; the others keep their order; the command after
    # -- is the workers' (its --workers too).
    assert call["argv"] == ["--parsable", *sbatch_args, script.name]
    assert call["cwd"] == str(tmp_path)
    assert call["script"] == script.read_text()
    assert "--array=0-2" in directives(call["script"])
    assert call["script"].endswith("\nexec python main.py --workers 9\n")
    assert (f"#   cd {tmp_path} && sbatch --time=02:00:00 -p debug --partition=x --mem 4G "
            f"{script.name}\n") in call["script"]
    assert out.splitlines() == [
        "submitted job array 4242: 3 worker(s), 4242_0 to 4242_2",
        f"script: {script} (`sbatch {script.name}` here adds 3 more)",
        f"output: {tmp_path}/laufband-4242_<task>.out",
        f"watch:  laufband --db {tmp_path}/wf.sqlite status   (or watch, workers; "
        "squeue -j 4242; cancel: scancel 4242)"]


def test_the_job_id_of_a_cluster_and_sbatch_warnings(capsys, tmp_path, sbatch):
    sbatch(out="77;cluster1\n", err="sbatch: warning: a warning\n")
    code, out, err = run(capsys, "submit", "--workers", "1", "--", "./job")
    assert code == 0
    assert out.startswith("submitted job array 77: 1 worker(s), 77_0 to 77_0\n")
    assert "watch:  laufband status" in out  # no --db: the workers' own database
    assert err == "sbatch: warning: a warning\n"
    assert "export LAUFBAND_DB" not in scripts(tmp_path)[0].read_text()


def test_laufband_db_from_the_environment(capsys, tmp_path, monkeypatch):
    (tmp_path / "rel").mkdir()
    monkeypatch.setenv("LAUFBAND_DB", "sqlite:///rel/wf.sqlite")
    out = run(capsys, "submit", "--workers", "1", "--dry-run", "--", "x")[1]
    assert f"export LAUFBAND_DB=sqlite:///{tmp_path}/rel/wf.sqlite\n" in out
    server = "postgresql+psycopg://u@host/wf"
    out = run(capsys, "submit", "--workers", "1", "--db", server, "--dry-run", "--", "x")[1]
    assert f"export LAUFBAND_DB={server}\n" in out


@pytest.mark.parametrize("signal", ["--signal=B:USR1@300", "--sig=USR1@30"])
def test_the_users_signal_replaces_the_default(capsys, sbatch, signal):
    code, out, _ = run(capsys, "submit", "--workers", "2", signal, "--dry-run", "--", "x")
    assert code == 0
    assert not any(d.startswith("--signal") for d in directives(out))
    assert f"sbatch {signal} laufband-submit-" in out


@pytest.mark.parametrize("argv, message", [
    (["--workers", "2"], "no command to run: end the options with --"),
    (["--workers", "2", "-p", "x", "python", "main.py"],
     "(-p x python main.py would go to sbatch)"),
    (["--workers", "2", "--"], "no command to run"),
    (["--workers", "0", "--", "x"], "--workers 0: give the number of workers, >= 1"),
    (["--workers", "-3", "--", "x"], "--workers -3"),
    (["--workers", "2", "--array=0-9", "--", "x"], "--array conflicts with --workers 2"),
    (["--workers", "2", "--array", "0-9", "--", "x"], "makes the array 0-1 itself"),
    (["--workers", "2", "-a", "3", "--", "x"], "--array conflicts"),
    (["--workers", "2", "-a0-9%2", "--", "x"], "--array conflicts"),
    (["--workers", "2", "--arr=1", "--", "x"], "--array conflicts"),
    (["--workers", "2", "--db", "nosuch://x", "--", "x"], "neither a file path nor"),
    (["--workers", "2", "--db", "no/wf.sqlite", "--", "x"],
     "--db no/wf.sqlite: the folder /"),
    (["--workers", "2", "--db", "postgresql+psycopg://u:s3cret@h/db", "--", "x"],
     "the URL has a password, which laufband submit would write into the script"),
    (["--workers", "2", "--db", "postgresql+psycopg://u@h/db?password=s3cret", "--", "x"],
     "the URL has a password"),
])
def test_bad_arguments_are_refused_before_anything_is_written(
        capsys, tmp_path, sbatch, argv, message):
    code, out, err = run(capsys, "submit", *argv)
    assert (code, out) == (2, "")
    assert err.startswith("laufband: ") and message in err
    assert "s3cret" not in err
    assert not scripts(tmp_path) and not sbatch.calls()


def test_workers_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["submit", "--", "python", "main.py"])
    assert exc.value.code == 2
    assert "--workers" in capsys.readouterr().err


def test_without_sbatch_on_path_it_says_where_sbatch_must_be(capsys, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    code, out, err = run(capsys, "submit", "--workers", "2", "--", "python", "main.py")
    assert (code, out) == (2, "")
    assert "sbatch not found" in err and "SLURM's sbatch, which must be on PATH" in err
    assert not scripts(tmp_path)


def test_a_refused_submission_shows_sbatchs_error_and_keeps_no_script(
        capsys, tmp_path, sbatch):
    sbatch(out="", err="sbatch: error: invalid partition specified: nope\n", rc=1)
    code, out, err = run(capsys, "submit", "--workers", "2", "-p", "nope", "--", "x")
    assert (code, out) == (1, "")
    assert err == ("laufband: sbatch exited with 1, nothing was submitted:\n"
                   "sbatch: error: invalid partition specified: nope\n")
    assert len(sbatch.calls()) == 1 and not scripts(tmp_path)


def test_two_scripts_of_the_same_second_do_not_overwrite_each_other(tmp_path):
    first = submit.reserve(tmp_path, "laufband-submit-x.sbatch")
    second = submit.reserve(tmp_path, "laufband-submit-x.sbatch")
    assert (first.name, second.name) == ("laufband-submit-x.sbatch",
                                         "laufband-submit-x-1.sbatch")


def test_other_commands_keep_their_own_parsing(capsys):
    """Only `submit` splits at -- and passes unknown options on; elsewhere an unknown
    option is still an error, and `submit` after -- is an argument."""
    with pytest.raises(SystemExit):
        cli.main(["status", "--time=1"])
    assert "unrecognized arguments: --time=1" in capsys.readouterr().err
    assert cli._command_of(["--db", "submit", "explain", "--", "submit"]) == "explain"
