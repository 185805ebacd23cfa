"""How long work says where it is, and how a terminal shows it.

Production code reports progress through two small interfaces and never draws anything itself:

* :class:`Progress` hands out :class:`Task` objects (a description, a total, a unit); work
  updates its task as it goes. :data:`NO_PROGRESS` discards everything (the default everywhere,
  and what a command uses when stderr is not a terminal or ``--json``/``--quiet`` was given);
  :func:`open_progress` gives a live ``rich`` bar with rate and ETA on a terminal.
* :class:`MigrationObserver` is what the migration engine calls at each round's start and end,
  after each chunk of pages and when the migration is finished. :class:`RoundProgress` turns
  those calls into a task's bar; :class:`~hintpipe.host.timeline.Timeline` records the same
  moments for the report's charts.

This module imports neither numpy, trio nor rich at import time (rich is imported only when a
bar is opened), so the command line can import it cheaply.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

__all__ = ["Task", "Progress", "NO_PROGRESS", "open_progress", "MigrationObserver", "RoundProgress"]


class Task:
    """One piece of work on a progress display; this base shows nothing."""

    def update(self, completed: float | None = None, *, total: float | None = None,
               description: str | None = None) -> None:
        """Set how much is done (``completed`` going down starts the task afresh: a new round),
        and optionally a new total or description."""

    def close(self) -> None:
        """The work is over: remove the task from the display (again: nothing happens)."""


class Progress:
    """Hands out tasks; this base (:data:`NO_PROGRESS`) shows nothing."""

    def task(self, description: str, total: float | None = None, unit: str = "") -> Task:
        """A new task: ``total`` units of work (None: unknown), ``unit`` names them (``pages``)."""
        return Task()


NO_PROGRESS = Progress()
"""Progress that goes nowhere."""


class _RichTask(Task):
    def __init__(self, bar, task_id) -> None:
        self._bar = bar
        self._id = task_id
        self._done = 0.0

    def update(self, completed=None, *, total=None, description=None) -> None:
        if self._id is None:  # closed: late updates change nothing
            return
        kw = {}
        if total is not None:
            kw["total"] = total
        if description is not None:
            kw["description"] = description
        if completed is not None and completed < self._done:
            self._bar.reset(self._id, **kw)  # a new round: rate and ETA start over
            kw = {}
        if completed is not None:
            self._done = completed
            kw["completed"] = completed
        if kw:
            self._bar.update(self._id, **kw)

    def close(self) -> None:
        if self._id is not None:
            self._bar.remove_task(self._id)
            self._id = None


class _RichProgress(Progress):
    """Tasks as lines of one live ``rich`` display on stderr: bar, count, rate, ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, Progress as Bar, ProgressColumn, TaskProgressColumn,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text

        class Count(ProgressColumn):
            def render(self, task) -> Text:
                unit = task.fields.get("unit", "")
                done = f"{int(task.completed):,}"
                return Text(f"{done}/{int(task.total):,} {unit}" if task.total is not None else f"{done} {unit}")

        class Rate(ProgressColumn):
            def render(self, task) -> Text:
                speed = task.finished_speed or task.speed
                if speed is None:
                    return Text("")
                for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
                    if speed >= scale:
                        return Text(f"{speed / scale:.1f} {prefix}{task.fields.get('unit', '')}/s")
                return Text(f"{speed:.2f} {task.fields.get('unit', '')}/s")

        # printing to stdout while the bar is live: through the bar's console only when stdout is
        # the same kind of thing (a terminal); a redirected stdout must keep its own output
        self._bar = Bar(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), Count(), Rate(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True,
                        redirect_stdout=sys.stdout.isatty(), redirect_stderr=True)

    def task(self, description, total=None, unit=""):
        return _RichTask(self._bar, self._bar.add_task(description, total=total, unit=unit))

    def __enter__(self) -> "_RichProgress":
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()


@contextmanager
def open_progress(enabled: bool) -> Iterator[Progress]:
    """A live bar on stderr while the block runs when ``enabled`` (and rich is installed), else
    :data:`NO_PROGRESS`. Commands pass ``enabled`` only when stderr is a terminal and neither
    ``--json`` nor ``--quiet`` was given."""
    if not enabled:
        yield NO_PROGRESS
        return
    try:
        bar = _RichProgress()
    except ImportError:  # a dependency, but a missing bar must never stop the work
        yield NO_PROGRESS
        return
    with bar:
        yield bar


class MigrationObserver:
    """What the migration engine reports while it runs; every method is a no-op here.

    Called on the engine's task (under trio), so an observer must be quick: no per-page Python.
    """

    def round_started(self, engine: "MigrationEngine", index: int, live: bool) -> None:
        """Round ``index`` begins (``live``: a pre-copy round; else the final stop-and-copy)."""

    def chunk_done(self, engine: "MigrationEngine", index: int, scanned: int, sent: int, skipped: int) -> None:
        """The first ``scanned`` pages of round ``index`` are dealt with: ``sent`` put on the link
        and ``skipped`` left out as hinted free, so far in this round."""

    def round_ended(self, engine: "MigrationEngine", report: "RoundReport") -> None:
        """Round ``report.index`` is over (all its pages on the link)."""

    def finished(self, engine: "MigrationEngine", result: "MigrationResult") -> None:
        """The migration is over and verified (``result.verified`` says how it went)."""


class RoundProgress(MigrationObserver):
    """A migration's progress as one task: the current round's pages dealt with so far."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress = progress
        self.label = label
        self.task: Task | None = None

    def round_started(self, engine, index, live) -> None:
        what = f"{self.label}: round {index}" + ("" if live else " (stop-and-copy)")
        total = engine.state.page_count
        if self.task is None:
            self.task = self.progress.task(what, total=total, unit="pages")
        else:
            self.task.update(0, total=total, description=what)

    def chunk_done(self, engine, index, scanned, sent, skipped) -> None:
        if self.task is not None:
            self.task.update(scanned)

    def finished(self, engine, result) -> None:
        self.close()

    def close(self) -> None:
        """Remove the task (a migration that ended early never reports ``finished``)."""
        if self.task is not None:
            self.task.close()
            self.task = None
