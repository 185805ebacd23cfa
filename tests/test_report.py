"""Progress and charts come from the production run: the engine's observers, the sampled timeline,
the HTML report (self-contained) and the PNG charts."""

from __future__ import annotations

import base64
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hintpipe.config import RunConfig
from hintpipe.host.migration import MigrationConfig
from hintpipe.host.timeline import Timeline
from hintpipe.inprocess import demo_outcome
from hintpipe.progress import Progress, Task
from hintpipe.trace import open_trace
from hintpipe.trace.replay import replay_outcome

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "tests" / "data" / "traces" / "numpy-churn"
SHIPPED = ROOT / "examples" / "traces" / "numpy-churn"
CFG = RunConfig(pages=1 << 14)  # 64 MiB
needs_plot = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                reason="matplotlib is not installed here (pip install '.[test]' installs it)")


class Recorder(Progress):
    """A progress display that keeps every update instead of drawing it."""

    def __init__(self) -> None:
        self.tasks: list[RecordedTask] = []

    def task(self, description, total=None, unit=""):
        t = RecordedTask(description, total, unit)
        self.tasks.append(t)
        return t


class RecordedTask(Task):
    def __init__(self, description, total, unit) -> None:
        self.descriptions, self.total, self.unit = [description], total, unit
        self.updates: list[float] = []
        self.closed = False

    def update(self, completed=None, *, total=None, description=None) -> None:
        if completed is not None:
            self.updates.append(completed)
        if total is not None:
            self.total = total
        if description is not None:
            self.descriptions.append(description)

    def close(self) -> None:
        self.closed = True


def test_demo_progress_comes_from_the_engines_rounds_and_chunks():
    rec = Recorder()
    out = demo_outcome(CFG, progress=rec)
    hinted, base = rec.tasks
    assert hinted.descriptions[0] == "with hinting: round 0" and base.descriptions[0].startswith("baseline")
    for task, run in ((hinted, out.run), (base, out.baseline)):
        assert task.unit == "pages" and task.total == CFG.pages and task.closed
        # each round counts up to the whole guest, chunk by chunk, then starts over
        ends = [i for i, (a, b) in enumerate(zip(task.updates, task.updates[1:] + [0])) if b <= a]
        assert len(ends) == run.migration.rounds
        assert all(task.updates[i] == CFG.pages for i in ends)
        assert len(task.descriptions) == run.migration.rounds
        assert task.descriptions[-1].endswith("(stop-and-copy)")


def test_replay_progress_follows_the_trace_position():
    rec = Recorder()
    # in this process (jobs=1), a run's progress is its trace position and rounds (a link slow
    # enough for the whole trace to play during the migration)
    out = replay_outcome(open_trace(SLICE), RunConfig.for_replay(migration=MigrationConfig(bandwidth_gbit=1.0), baseline=False),
                         progress=rec, jobs=1)
    reading, events = rec.tasks[0], next(t for t in rec.tasks if t.descriptions[0] == "with hinting: trace events")
    assert reading.updates[-1] == out.report["trace"]["events"] == events.total
    assert events.updates == sorted(events.updates) and events.updates[-1] == events.total and events.closed
    # in worker processes, the jobs done
    rec = Recorder()
    replay_outcome(open_trace(SLICE), RunConfig.for_replay(migration=MigrationConfig(bandwidth_gbit=100.0)),
                   progress=rec, jobs=2)
    jobs = next(t for t in rec.tasks if t.descriptions[0].startswith("replaying hintpipe, none in 2 processes"))
    assert jobs.updates == list(range(1, jobs.total + 1)) and jobs.closed


def test_timeline_samples_the_run_and_agrees_with_its_figures():
    out = demo_outcome(CFG)
    for run in (out.run, out.baseline):
        tl = run.timeline
        s = tl.series()
        m = run.migration
        assert len(tl.rounds) == m.rounds
        assert sum(r["sent"] for r in tl.rounds) == m.pages_sent == s["sent_pages"][-1]
        assert s["faults"][-1] == run.faults == sum(r["faults"] for r in tl.rounds)
        assert np.all(np.diff(s["t_s"]) >= 0) and np.all(np.diff(s["sent_pages"]) >= 0)
        assert s["t_s"][-1] == pytest.approx(m.time_s)
        assert s["free_pages"].max() <= CFG.pages
        assert sum(r["bytes_sent"] for r in tl.rounds) == m.bytes_sent  # the engine reports bytes
    hinted = out.run.timeline.series()["hinted_pages"]
    assert hinted.max() > 0 and out.baseline.timeline.series()["hinted_pages"].max() == 0


def test_timeline_stays_bounded():
    import trio
    import trio.testing

    from hintpipe.inprocess import migrate_guest

    tl = Timeline(capacity=8, chunk_samples=64)  # wants ~64 rows a round, may keep 8
    run = trio.run(lambda: migrate_guest(CFG, observers=(tl,)), clock=trio.testing.MockClock(autojump_threshold=0))
    s = tl.series()
    assert 4 <= len(s["t_s"]) <= 8 and len(tl.rounds) == run.result.rounds
    assert np.all(np.diff(s["t_s"]) >= 0) and s["t_s"][-1] == pytest.approx(run.result.time_s)


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)]


def assert_self_contained(page: str) -> None:
    """Nothing fetched from anywhere: every image inline, no script, no stylesheet link."""
    assert "<script" not in page and "<link" not in page and "@import" not in page
    srcs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"url\(", page)


@needs_plot
def test_demo_report_is_one_self_contained_page_with_the_charts(tmp_path):
    report = tmp_path / "out.html"
    p = subprocess.run([sys.executable, "-m", "hintpipe", "demo", "--size", "64M", "--report", str(report),
                        "--plot", str(tmp_path / "png")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    page = report.read_text()
    assert_self_contained(page)
    images = _images(page)
    assert len(images) >= 4 and all(i.startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    for title in ("Free and hinted memory over time", "Pages sent per round", "Write faults per round",
                  "Zone lock: walker holds and allocation waits"):
        assert title in page
    assert "VERIFIED" in page and "pages sent without hinting" in page
    pngs = sorted(f.name for f in (tmp_path / "png").iterdir())
    assert pngs == ["faults_per_round.png", "lock.png", "memory.png", "sent_over_time.png", "sent_per_round.png"]
    assert not list(tmp_path.glob("**/*.part"))


@needs_plot
def test_replay_of_the_shipped_recording_writes_a_report(tmp_path):
    report = tmp_path / "r.html"
    p = subprocess.run([sys.executable, "-m", "hintpipe", "replay", str(SHIPPED), "--report", str(report)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "220,344 events" in p.stdout and "VERIFIED" in p.stdout
    page = report.read_text()
    assert_self_contained(page)
    assert len(_images(page)) >= 4 and "numpy-churn" in page


@needs_plot
def test_renderer_puts_several_runs_side_by_side(tmp_path):
    from dataclasses import replace

    from hintpipe.charts import write_html

    a = replace(demo_outcome(RunConfig(pages=1 << 12)), label="batch 32")
    b = replace(demo_outcome(RunConfig(pages=1 << 12, batch=4)), label="batch 4")
    page = write_html([a, b], tmp_path / "cmp.html").read_text()
    assert_self_contained(page)
    assert "<th>batch 32</th><th>batch 4</th>" in page
    assert "batch 4: with hinting" in page or len(_images(page)) >= 4


def test_charts_say_how_to_get_matplotlib_before_any_work(tmp_path):
    # matplotlib made unimportable: the flag is refused at once, nothing runs, nothing is written
    code = ("import sys, importlib.util\n_find = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name.startswith('matplotlib') else _find(name, *a)\n"
            "from hintpipe.cli import main\n"
            f"sys.exit(main(['demo', '--size', '16G', '--report', {str(tmp_path / 'r.html')!r}]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == ("hintpipe: --report draws its charts with matplotlib, which is not installed here: "
                                "pip install 'hintpipe[plot]' (in a clone of the repository: pip install '.[plot]')")
    assert list(tmp_path.iterdir()) == []
    code = code.replace("from hintpipe.cli import main\n", "sys.argv[1:] = ['--quick', '--plot', 'x']\n"
                        "sys.path.insert(0, 'bench')\nimport run\n").replace(
        f"sys.exit(main(['demo', '--size', '16G', '--report', {str(tmp_path / 'r.html')!r}]))", "run.main()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "pip install 'hintpipe[plot]'" in p.stderr and "[bench]" not in p.stderr
