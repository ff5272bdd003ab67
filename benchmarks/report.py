"""How long ``write_report`` takes on a big run: prints a table.

    python benchmarks/report.py            # 100,000 tasks
    python benchmarks/report.py --quick    # 5,000 tasks
    python benchmarks/report.py --browser  # + load the page in chromium (playwright)

The database comes from a real run: ``--workers`` processes run loops over N tasks
that do nothing (``batch_size`` large, so the run takes seconds), and one more worker
(label ``flaky``, ``map`` with 2 threads) also runs 20 tasks only it may run, which
raise, so the failure tables are not empty. Then the report is written: the read
(``Store.timeline``), the page (``render_html``), the whole ``.html``, and the ``.png``
(matplotlib). Nothing here asserts a speed; the target for the ``.html`` of 100,000
tasks is under 10 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from laufband import Graphband, Task  # noqa: E402

FLAKY = 20


def graph(n: int) -> list[Task]:
    tasks = [Task(id=f"t{i}") for i in range(n)]
    tasks += [Task(id=f"bad{i}", requirements={"flaky"}) for i in range(FLAKY)]
    return tasks


def worker(db: str, n: int, index: int, flaky: bool, batch: int) -> int:
    """One worker process: a loop over the tasks (doing nothing), or (``flaky``) map
    with a function that raises on the flaky tasks."""
    if flaky:
        w = Graphband(graph(n), db=db, identifier=f"flaky-{index}", labels={"flaky"},
                      tqdm_kwargs={"disable": True})

        def run(task: Task) -> None:
            if task.id.startswith("bad"):
                raise ValueError(f"cannot parse input of {task.id}: <unexpected token>")

        w.map(run, threads=2)
        return 0
    w = Graphband(graph(n), db=db, identifier=f"bench-{index}", batch_size=batch,
                  tqdm_kwargs={"disable": True})
    for _ in w:
        pass
    return 0


def make_database(folder: Path, n: int, workers: int, batch: int) -> tuple[str, float]:
    db = str(folder / "report.sqlite")
    started = time.perf_counter()
    # Register once, so the workers do not all compare the graph at once.
    Graphband(graph(n), db=db, identifier="register", tqdm_kwargs={"disable": True}).close()
    cmd = [sys.executable, __file__, "--worker", db, "--tasks", str(n), "--batch", str(batch)]
    runs = [[*cmd, "--index", str(i)] for i in range(workers)]
    runs.append([*cmd, "--index", "0", "--flaky"])
    errs = [folder / f"worker{i}.err" for i in range(len(runs))]
    procs = []
    for run, err in zip(runs, errs, strict=True):
        with open(err, "w") as f:  # the flaky worker warns about its failures: quiet
            procs.append(subprocess.Popen(run, stderr=f))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}\n"
                         + "\n".join(e.read_text() for e in errs))
    return db, time.perf_counter() - started


def timed(fn, *args):
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


def browser_load(page: Path) -> tuple[float, int] | None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not Path("/usr/bin/chromium").exists():
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox"])
        try:
            tab = browser.new_page()
            started = time.perf_counter()
            tab.goto(page.as_uri(), timeout=300_000)
            bars = tab.locator("rect.attempt").count()
            return time.perf_counter() - started, bars
        finally:
            browser.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5,000 tasks")
    p.add_argument("--tasks", type=int, default=None)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--browser", action="store_true", help="load the page in chromium")
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--flaky", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    n = args.tasks or (5_000 if args.quick else 100_000)
    if args.worker:
        return worker(args.worker, n, args.index, args.flaky, args.batch)

    from laufband.report import render_html, write_report
    from laufband.store import Store, database_url

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        db, made = make_database(folder, n, args.workers, args.batch)
        store = Store.open_read_only(database_url(db))
        timeline, read_s = timed(store.timeline)
        page, render_s = timed(render_html, timeline)
        out, html_s = timed(write_report, store, folder / "report.html")
        size = out.stat().st_size
        rows = [("tasks", f"{timeline.total:,}"), ("attempts", f"{timeline.total_attempts:,}"),
                ("workers", f"{len(timeline.workers)}"),
                ("database from a real run", f"{made:.1f} s"),
                ("read (Store.timeline)", f"{read_s:.2f} s"),
                ("render_html", f"{render_s:.2f} s"),
                ("write_report .html (read + render + write)", f"{html_s:.2f} s"),
                (".html size", f"{size / 1e6:.1f} MB")]
        try:
            _, png_s = timed(write_report, store, folder / "report.png")
            rows.append(("write_report .png (matplotlib)", f"{png_s:.2f} s"))
        except ImportError as exc:
            rows.append(("write_report .png", f"skipped: {exc}"))
        if args.browser:
            loaded = browser_load(out)
            rows.append(("chromium: load the page, count the bars",
                         "skipped (no playwright or /usr/bin/chromium)" if loaded is None
                         else f"{loaded[0]:.1f} s, {loaded[1]:,} bars"))
        del page
    print(f"\n## write_report on {n:,} tasks\n")
    print("| what | |\n|---|---:|")
    for what, value in rows:
        print(f"| {what} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
