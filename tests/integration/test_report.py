"""``write_report`` on a database made by real worker processes, and the page checked
in a real browser (Debian's chromium, driven by playwright).

Without /usr/bin/chromium the browser test skips, unless LAUFBAND_REQUIRE_BROWSER=1
(CI sets it), when it fails and says how to install it.
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import Workers, query
from graphs import build

from laufband import Monitor
from laufband.errors import LaufbandError
from laufband.report import MissingDependencyError, render_html, write_report
from laufband.store import Store, database_url
from laufband.store.timeline import AttemptSpan, Timeline, WorkerSpan

pytestmark = pytest.mark.processes

GRAPH = "layered:3x10"
FAILING = "L2_5"  # in the last layer: nothing waits for it, so every task runs
CHROMIUM = Path("/usr/bin/chromium")
# Read at import: the autouse fixture of conftest removes LAUFBAND_* before each test.
REQUIRE_BROWSER = os.environ.get("LAUFBAND_REQUIRE_BROWSER") == "1"


class Run:
    """A finished run of 3 workers over GRAPH (one raises in FAILING and exits), its
    database, and the reports written from it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.db = folder / "graph.sqlite"
        self.ids = sorted(t.id for t in build(GRAPH))

    def attempts(self) -> list[tuple]:
        return query(self.db, "SELECT t.id, a.attempt, a.worker, a.outcome FROM attempts a"
                              " JOIN tasks t ON t.pk = a.task ORDER BY t.id, a.attempt")

    def worker_ids(self) -> list[str]:
        return [w for (w,) in query(self.db, "SELECT id FROM workers ORDER BY id")]

    def store(self) -> Store:
        return Store.open_read_only(database_url(str(self.db)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    workers = Workers(folder)
    try:
        with pytest.MonkeyPatch.context() as mp:  # no LAUFBAND_* of ours in the workers
            for name in [n for n in os.environ if n.startswith("LAUFBAND_")]:
                mp.delenv(name)
            workers.start(GRAPH, 3, fail=FAILING, sleep=0.02)
            done = workers.wait()
    finally:
        workers.kill_all()
    assert sorted(code != 0 for code in done.returncodes) == [False, False, True], done.stderr
    assert sum("failed on purpose" in err for err in done.stderr) == 1
    return Run(folder)


@pytest.fixture(scope="module")
def page(run):
    """The .html report, written once."""
    return write_report(run.store(), run.folder / "report.html")


def test_the_page_names_every_task_worker_attempt_and_the_failure(run, page):
    text = page.read_text(encoding="utf-8")
    attempts = run.attempts()
    assert len(attempts) >= len(run.ids)  # each task ran; some were handed back
    for task_id in run.ids:
        assert f'data-task="{task_id}"' in text, task_id
    for worker in run.worker_ids():
        assert f'data-worker="{worker}"' in text, worker
    assert text.count('class="attempt"') == len(attempts)
    assert f"task {FAILING} failed on purpose" in text
    assert text.count('data-outcome="failed"') == 1
    # Self-contained: nothing is loaded from elsewhere.
    for reference in ("http://", "https://", "<script", "<link rel=\"stylesheet\""):
        assert reference not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_status_and_failure_tables(run, page):
    text = page.read_text(encoding="utf-8")
    status = dict(query(run.db, "SELECT state, count(*) FROM tasks GROUP BY state"))
    assert status == {"completed": len(run.ids) - 1, "failed": 1}
    pct = 100.0 * status["completed"] / len(run.ids)
    assert (f'<tr data-state="completed"><td>completed</td><td class="n">'
            f'{status["completed"]}</td><td class="n">{pct:.1f}</td></tr>') in text
    failures = text[text.index('<section id="failures">'):]
    assert f"<code>{FAILING}</code>" in failures
    assert "RuntimeError: task L2_5 failed on purpose" in failures


def test_monitor_get_attempts_matches_the_attempts_table(run):
    spans = Monitor(db=str(run.db)).get_attempts()
    assert sorted((a.task, a.attempt, a.worker, a.outcome) for a in spans) == run.attempts()
    assert [a.started_at for a in spans] == sorted(a.started_at for a in spans)
    [failed] = [a for a in spans if a.outcome == "failed"]
    assert failed.task == FAILING and "failed on purpose" in failed.error
    assert all(a.duration is not None and a.duration >= 0 for a in spans)
    timeline = run.store().timeline(buckets=10)
    assert sum(timeline.completions) == len(run.ids) - 1
    assert len(timeline.completions) == 10
    assert {w.id for w in timeline.workers} == set(run.worker_ids())


def test_png_and_svg_figures(run):
    pytest.importorskip("matplotlib")
    store = run.store()
    png = write_report(store, run.folder / "report.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    svg = write_report(store, run.folder / "figure.svg")
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_figures_without_matplotlib_say_what_to_install(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'laufband\[report\]'"):
        write_report(run.store(), run.folder / "nothing.png")
    assert not (run.folder / "nothing.png").exists()
    with pytest.raises(LaufbandError, match=r"\.html, \.png, \.svg"):
        write_report(run.store(), run.folder / "report.pdf")


def test_user_strings_are_escaped():
    hostile = '<script>alert("x")</script>&'
    worker = WorkerSpan(f"w{hostile}", "host<b>", 1, frozenset({"<gpu>"}), "offline",
                        100.0, 110.0, 110.0, 1, 1)
    attempt = AttemptSpan(f"t{hostile}", 1, worker.id, 101.0, 102.0, "failed",
                          f"ValueError: {hostile}")
    # Still running on a worker that is gone: drawn until its last heartbeat.
    running = AttemptSpan("t2", 1, "gone", 101.5, None, None, None)
    gone = WorkerSpan("gone", "h", 2, frozenset(), "dead", 100.0, None, 104.0, 0, 1)
    from laufband.store.reads import FailureGroup

    timeline = Timeline(at=120.0, database=f"/db/{hostile}", attempts=(attempt, running),
                        total_attempts=2, workers=(worker, gone), start=101.0, end=104.0,
                        bucket=0.5, completions=(0, 0), counts={"failed": 1}, total=1,
                        failures=(FailureGroup(attempt.error, 1, [attempt.task]),))
    text = render_html(timeline)
    assert "<script" not in text and "<b>" not in text and "<gpu>" not in text
    assert "t&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in text
    assert timeline.end_of(running) == 104.0
    assert 'data-outcome="running"' in text and "running for 2.5 s" in text


# --------------------------------------------------------------------- browser
def _browser(p):
    """chromium via playwright, or skip (fail with LAUFBAND_REQUIRE_BROWSER=1)."""
    install = ("install it with `apt-get install -y chromium` (Debian; binary "
               "/usr/bin/chromium) and `pip install -e '.[test]'` (playwright)")
    if not CHROMIUM.exists():
        message = f"no browser at {CHROMIUM}: {install}"
        if REQUIRE_BROWSER:
            pytest.fail(f"LAUFBAND_REQUIRE_BROWSER=1 but {message}")
        pytest.skip(message)
    return p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])


@pytest.fixture(scope="module")
def playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = "playwright is not installed: pip install -e '.[test]'"
        if REQUIRE_BROWSER:
            pytest.fail(f"LAUFBAND_REQUIRE_BROWSER=1 but {message}")
        pytest.skip(message)
    with sync_playwright() as p:
        yield p


def test_the_page_in_a_real_browser(run, page, playwright):
    browser = _browser(playwright)
    try:
        tab = browser.new_page(viewport={"width": 1300, "height": 900})
        errors: list[str] = []
        requests: list[str] = []
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.on("request", lambda r: requests.append(r.url))
        tab.goto(page.as_uri(), wait_until="load")
        bars = tab.eval_on_selector_all(
            "svg.timeline rect.attempt",
            "els => els.map(e => [e.dataset.task, e.dataset.worker, e.dataset.outcome,"
            " e.querySelector('title').textContent, e.getBBox().width,"
            " getComputedStyle(e).fill])")
        labels = tab.eval_on_selector_all("svg.timeline text.wlabel",
                                          "els => els.map(e => e.textContent)")
        title = tab.title()
    finally:
        browser.close()
    assert errors == [], errors
    assert requests == [page.as_uri()], requests  # nothing but the page itself
    attempts = run.attempts()
    assert len(bars) == len(attempts)
    assert sorted((task, worker, outcome) for task, worker, outcome, *_ in bars) == sorted(
        (task, worker, outcome) for task, _, worker, outcome in attempts)
    for task, worker, outcome, tip, width, fill in bars:
        assert tip.startswith(f"{task} on {worker}, attempt "), tip
        assert f": {outcome}, " in tip, tip
        assert width > 0
        assert fill != "rgb(0, 0, 0)"  # coloured by the outcome rules
    fills = {outcome: fill for _, _, outcome, _, _, fill in bars}
    assert fills["failed"] != fills["completed"]
    [failed] = [tip for _, _, outcome, tip, *_ in bars if outcome == "failed"]
    assert f"{FAILING} on " in failed and "failed on purpose" in failed
    for worker in run.worker_ids():
        assert any(worker in label for label in labels), (worker, labels)
    assert title.startswith("laufband report")
