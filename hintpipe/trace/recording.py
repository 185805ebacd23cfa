"""Open a trace: a recording folder (tracefs text + snapshots) or a hintpipe trace-v1 file.

Both give the same thing: a :class:`Trace` with the initial buddy-free bitmap, optional
buddyinfo start/end figures and a stream of columnar EventBatches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TraceError
from .events import EventBatch
from .format import MAGIC, iter_v1_batches, read_v1_header, write_v1
from .model import ReplayModel
from .snapshot import read_buddyinfo, read_kpageflags_buddy
from .tracefs import ParseStats, iter_tracefs

TRACE_NAMES = ("kmem.trace.zst", "kmem.trace.gz", "kmem.trace")
KPAGEFLAGS_NAMES = ("kpageflags.start.zst", "kpageflags.start.gz", "kpageflags.start")


@dataclass
class Trace:
    """An opened trace. ``batches()`` can be called more than once (it re-reads the source)."""

    path: Path
    kind: str  # "recording" or "trace-v1"
    initial_free: np.ndarray  # bool[page_count], buddy-free pages at the start
    buddyinfo_start: dict | None = None  # parse_buddyinfo() result
    buddyinfo_end: dict | None = None
    source: dict = field(default_factory=dict)  # uname, workload, original file names
    events_hint: int | None = None  # event count if the container knows it up front
    skip_bad: bool = False
    chunk_size: int = 4 << 20
    stats: ParseStats = field(default_factory=ParseStats)

    @property
    def page_count(self) -> int:
        """Pages the trace spans (the snapshot's PFN range)."""
        return len(self.initial_free)

    def batches(self) -> Iterator[EventBatch]:
        """Stream the events in trace order."""
        if self.kind == "recording":
            self.stats = ParseStats()
            return iter_tracefs(self.source["trace_file"], chunk_size=self.chunk_size, skip_bad=self.skip_bad,
                                stats=self.stats, page_count=self.page_count)
        return iter_v1_batches(self.path, self.page_count)

    def model(self, **kw) -> ReplayModel:
        """A fresh replay model positioned at the start of the trace."""
        return ReplayModel(self.initial_free, self.batches(), **kw)


def _first(d: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (d / n).exists():
            return d / n
    return None


def open_recording(d: str | Path, skip_bad: bool = False, chunk_size: int = 4 << 20) -> Trace:
    """Open a recording folder laid out as in the traces README (kmem.trace.zst, kpageflags.start.zst, ...)."""
    d = Path(d)
    tf = _first(d, TRACE_NAMES)
    if tf is None:
        raise TraceError("missing", f"no kmem trace in the recording (expected one of {', '.join(TRACE_NAMES)})", str(d))
    kf = _first(d, KPAGEFLAGS_NAMES)
    if kf is None:
        raise TraceError("missing", "no kpageflags snapshot in the recording (kpageflags.start.zst); "
                         "the initial free pages are unknown", str(d))
    source = {"trace_file": str(tf), "kpageflags_file": str(kf)}
    for name in ("uname.txt", "workload.txt"):
        if (d / name).exists():
            source[name.split(".")[0]] = (d / name).read_text().strip()
    bis = read_buddyinfo(d / "buddyinfo.start") if (d / "buddyinfo.start").exists() else None
    bie = read_buddyinfo(d / "buddyinfo.end") if (d / "buddyinfo.end").exists() else None
    return Trace(d, "recording", read_kpageflags_buddy(kf), bis, bie, source, None, skip_bad, chunk_size)


def open_trace(path: str | Path, skip_bad: bool = False) -> Trace:
    """Open a recording folder or a hintpipe trace-v1 file (detected by its magic)."""
    p = Path(path)
    if p.is_dir():
        return open_recording(p, skip_bad)
    if not p.exists():
        raise TraceError("missing", "no such trace file or recording folder", str(p))
    with open(p, "rb") as f:
        head = f.read(len(MAGIC))
    if head == MAGIC:
        return Trace(p, "trace-v1", **read_v1_header(p))
    raise TraceError("format", "not a recording folder nor a hintpipe trace-v1 file (bad magic); "
                     "a bare kmem text file needs its kpageflags snapshot: pass the recording folder", str(p))


def convert(recording_dir: str | Path, out_file: str | Path, skip_bad: bool = False, progress=None) -> dict:
    """Convert a recording folder (or another trace-v1 file) into a trace-v1 file; ``progress``
    (a :class:`~hintpipe.progress.Progress`) shows the events converted so far."""
    trace = open_trace(recording_dir, skip_bad=skip_bad)
    task = None if progress is None else progress.task("converting", total=trace.events_hint, unit="events")
    try:
        return write_v1(out_file, trace, task=task)
    finally:
        if task is not None:
            task.close()
