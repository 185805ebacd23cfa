"""Open a trace: a recording folder (protocols/recording-v1.md) or a hintpipe trace-v1 file.

Every trace opens to the same thing: a :class:`Trace` with the initial buddy-free bitmap, the
buddyinfo start/end figures when known, and one reader interface for its events,
:class:`EventSource` (``batches()``: columnar EventBatches in trace order). Three sources exist:

- :class:`TextEvents`: tracefs text (``kmem.trace.zst``), the vectorised parser of tracefs.py;
- :class:`RawEvents`: the kernel's ring-buffer pages (``raw/``), decoded by ringbuffer.py;
- :class:`V1Events`: a trace-v1 file (format.py), which is also what the trace cache holds.

A recording folder holding both ``raw/`` and a text trace is read from ``raw/`` (lossless,
nanosecond stamps, faster to decode). :func:`open_trace` with ``cache=True`` loads a recording
through its cached trace-v1 conversion (cache.py).
A recording with ``zoneinfo.start`` also says what every PFN was at the start and its zones
(:class:`~.layout.Layout`: free, used, zero or balloon, not RAM).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import TraceError
from .events import EventBatch
from .format import MAGIC, iter_v1_batches, read_v1_header, write_v1
from .layout import Layout, classify, zones_from_zoneinfo
from .model import ReplayModel
from .ringbuffer import RAW_DIR, DecodeStats, check_orders, iter_raw_batches, read_meta
from .snapshot import parse_zoneinfo, read_buddyinfo, read_kpageflags
from .tracefs import ParseStats, iter_tracefs

TRACE_NAMES = ("kmem.trace.zst", "kmem.trace.gz", "kmem.trace")
KPAGEFLAGS_NAMES = ("kpageflags.start.zst", "kpageflags.start.gz", "kpageflags.start")
INFO_NAMES = ("buddyinfo.start", "buddyinfo.end", "zoneinfo.start", "uname.txt", "workload.txt")
"""Files of a recording besides the events and kpageflags that an opened trace reflects."""


class EventSource(Protocol):
    """Where a trace's events come from (the one reader interface of every trace kind)."""

    encoding: str
    """``tracefs-text``, ``ring-buffer`` or ``trace-v1``."""
    files: list[Path]
    """The files the events are read from."""

    def batches(self, stats: ParseStats) -> Iterator[EventBatch]:
        """Stream the events in trace order, counting what was skipped in ``stats``."""
        ...


@dataclass
class TextEvents:
    """tracefs text (zstd, gzip or plain), parsed by :func:`~hintpipe.trace.tracefs.iter_tracefs`."""

    path: Path
    page_count: int
    skip_bad: bool = False
    chunk_size: int = 4 << 20
    encoding: str = "tracefs-text"

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def batches(self, stats: ParseStats) -> Iterator[EventBatch]:
        return iter_tracefs(self.path, chunk_size=self.chunk_size, skip_bad=self.skip_bad, stats=stats,
                            page_count=self.page_count)


@dataclass
class RawEvents:
    """A recording's ring-buffer pages (``raw/``), decoded and merged across CPUs by time stamp.

    Lost events (the recorder's ``meta.json`` count, or pages the kernel flagged) raise
    TraceError ``lost-events``, as ``[LOST N EVENTS]`` lines do in text; with ``skip_bad`` they
    are counted in ``stats.lost_events`` and pages that do not decode are skipped and counted.
    """

    raw_dir: Path
    page_count: int
    skip_bad: bool = False
    encoding: str = "ring-buffer"
    decode_stats: DecodeStats = field(default_factory=DecodeStats)

    @property
    def files(self) -> list[Path]:
        d = self.raw_dir
        return sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))

    def batches(self, stats: ParseStats) -> Iterator[EventBatch]:
        sp = str(self.raw_dir)
        meta = read_meta(self.raw_dir)
        meta_lost = int(meta.get("lost_events") or 0)
        if meta_lost and not self.skip_bad:
            raise TraceError("lost-events", f"the recorder lost {meta_lost} events (a ring buffer overran); "
                             "a replay would drift (re-record, or pass skip_bad)", sp)
        ds = self.decode_stats = DecodeStats()
        for b in iter_raw_batches(self.raw_dir, ds, strict=not self.skip_bad):
            check_orders(b, sp)
            outside = b.outside(self.page_count)
            if outside.any():
                if not self.skip_bad:
                    i = int(np.flatnonzero(outside)[0])
                    raise TraceError("pfn-range", f"pfn {int(b.pfn[i]):#x} order {int(b.order[i])} on CPU "
                                     f"{int(b.cpu[i])} at {int(b.ts_ns[i]) / 1e9:.6f} s lies beyond the snapshot "
                                     f"({self.page_count} pages)", sp)
                stats.skipped["pfn-range"] = stats.skipped.get("pfn-range", 0) + int(outside.sum())
                b = b.take(~outside)
            stats.lines += len(b)
            stats.events += len(b)
            yield b
        # (the per-CPU decoders' counts are complete once the pages are all read)
        if ds.losses and not self.skip_bad:
            cpu, ts, n = min(ds.losses, key=lambda x: x[1])
            what = f"{n} events" if n >= 0 else "events"
            raise TraceError("lost-events", f"the kernel lost {what} on CPU {cpu} before time stamp "
                             f"{ts / 1e9:.6f} s; a replay would drift (re-record, or pass skip_bad)", sp)
        lost = max(meta_lost, ds.lost_events)
        if lost or ds.lost_unknown:
            stats.lost_events += lost
            stats.skipped["lost-events"] = stats.skipped.get("lost-events", 0) + len(ds.losses) + bool(meta_lost)
        if ds.bad_pages:
            stats.skipped["corrupt-page"] = stats.skipped.get("corrupt-page", 0) + ds.bad_pages


@dataclass
class V1Events:
    """The event batches of a trace-v1 file. What the conversion that wrote it skipped (its end
    record's ``skipped`` and ``lost_events``) is added to the stats once the end is read."""

    path: Path
    page_count: int
    encoding: str = "trace-v1"

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def batches(self, stats: ParseStats) -> Iterator[EventBatch]:
        end: dict = {}
        for b in iter_v1_batches(self.path, self.page_count, end):
            stats.events += len(b)
            yield b
        for k, v in (end.get("skipped") or {}).items():
            stats.skipped[k] = stats.skipped.get(k, 0) + v
        stats.lost_events += end.get("lost_events") or 0


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
    reader: EventSource | None = None
    known_layout: Layout | None = None
    """What each PFN was at the start and the zones, when the recording says (see :attr:`layout`)."""

    @property
    def page_count(self) -> int:
        """Pages the trace spans (the snapshot's PFN range)."""
        return len(self.initial_free)

    @property
    def encoding(self) -> str:
        """How the events are stored where they are read from (see :class:`EventSource`)."""
        return self.reader.encoding

    @property
    def layout(self) -> Layout:
        """The recording's :class:`~.layout.Layout`, or every PFN counted as RAM if it has none."""
        if self.known_layout is None:
            self.known_layout = Layout.all_ram(self.initial_free)
        return self.known_layout

    def batches(self) -> Iterator[EventBatch]:
        """Stream the events in trace order (``stats`` starts afresh)."""
        self.stats = ParseStats()
        return self.reader.batches(self.stats)

    def events(self) -> EventBatch:
        """All events in trace order, as one batch."""
        return EventBatch.concat(list(self.batches()))

    def model(self, **kw) -> ReplayModel:
        """A fresh replay model positioned at the start of the trace."""
        return ReplayModel(self.initial_free, self.batches(), **kw)


def _first(d: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (d / n).exists():
            return d / n
    return None


@dataclass(frozen=True)
class RecordingFiles:
    """The files of a recording folder an opened trace is made from."""

    folder: Path
    events: Path  # raw/ folder or text trace file
    encoding: str  # "ring-buffer" or "tracefs-text"
    kpageflags: Path

    def all(self) -> list[Path]:
        """Every file the opened trace depends on (events, snapshot, buddyinfo, provenance)."""
        ev = sorted(p for p in self.events.rglob("*") if p.is_file()) if self.events.is_dir() else [self.events]
        return ev + [self.kpageflags] + [self.folder / n for n in INFO_NAMES if (self.folder / n).exists()]


def recording_files(d: str | Path) -> RecordingFiles:
    """Locate the event source and snapshot of a recording folder (TraceError ``missing`` if a
    required part is absent). Ring-buffer pages are preferred over a text trace."""
    d = Path(d)
    if (d / RAW_DIR).is_dir():
        ev, enc = d / RAW_DIR, "ring-buffer"
    else:
        tf = _first(d, TRACE_NAMES)
        if tf is None:
            raise TraceError("missing", f"no events in the recording (expected {RAW_DIR}/ or one of "
                             f"{', '.join(TRACE_NAMES)})", str(d))
        ev, enc = tf, "tracefs-text"
    kf = _first(d, KPAGEFLAGS_NAMES)
    if kf is None:
        raise TraceError("missing", "no kpageflags snapshot in the recording (kpageflags.start.zst); "
                         "the initial free pages are unknown", str(d))
    return RecordingFiles(d, ev, enc, kf)


def recording_info(d: Path) -> tuple[dict | None, dict | None, dict]:
    """(buddyinfo_start, buddyinfo_end, provenance) of a recording folder."""
    source = {}
    for name in ("uname.txt", "workload.txt"):
        if (d / name).exists():
            source[name.split(".")[0]] = (d / name).read_text().strip()
    bis = read_buddyinfo(d / "buddyinfo.start") if (d / "buddyinfo.start").exists() else None
    bie = read_buddyinfo(d / "buddyinfo.end") if (d / "buddyinfo.end").exists() else None
    return bis, bie, source


def open_recording(d: str | Path, skip_bad: bool = False, chunk_size: int = 4 << 20) -> Trace:
    """Open a recording folder (protocols/recording-v1.md): ``raw/`` ring-buffer pages or a
    tracefs text trace, plus ``kpageflags.start.zst`` and the buddyinfo files."""
    rf = recording_files(d)
    d = rf.folder
    flags = read_kpageflags(rf.kpageflags)
    initial = flags.buddy
    zi = d / "zoneinfo.start"
    layout = classify(flags, zones_from_zoneinfo(parse_zoneinfo(zi.read_text())) if zi.exists() else [])
    bis, bie, source = recording_info(d)
    source["kpageflags_file"] = str(rf.kpageflags)
    if rf.encoding == "ring-buffer":
        source["raw_dir"] = str(rf.events)
        reader: EventSource = RawEvents(rf.events, len(initial), skip_bad)
    else:
        source["trace_file"] = str(rf.events)
        reader = TextEvents(rf.events, len(initial), skip_bad, chunk_size)
    return Trace(d, "recording", initial, bis, bie, source, None, skip_bad, chunk_size, reader=reader,
                 known_layout=layout)


def open_v1(p: str | Path) -> Trace:
    """Open a trace-v1 file (its header is read and checked now, its batches when streamed)."""
    p = Path(p)
    h = read_v1_header(p)
    return Trace(p, "trace-v1", reader=V1Events(p, len(h["initial_free"])), **h)


def open_cached(d: str | Path, skip_bad: bool = False, log: Callable[[str], None] | None = None) -> Trace:
    """Open a recording folder through its cached trace-v1 conversion (:mod:`~hintpipe.trace.cache`).

    A valid cache (same converter, same ``skip_bad``, every source file of the same size and
    content) is loaded directly; otherwise the recording is converted now, the cache written
    (beside the recording if its folder is writable, else in the user's cache folder) and
    ``log`` told so in one sentence. Where no cache can be written the recording is read
    directly, as without a cache.
    """
    from . import cache

    if cache.cache_disabled():
        return open_recording(d, skip_bad)
    rf = recording_files(d)
    files = rf.all()
    hit = cache.lookup(rf.folder, files, skip_bad)
    if hit is None:
        tr = open_recording(rf.folder, skip_bad)
        hit = cache.store(rf.folder, tr, files, skip_bad, log)
        if hit is None:
            return tr
    tr = open_v1(hit)
    tr.path, tr.kind, tr.skip_bad = rf.folder, "recording", skip_bad
    tr.source["cache_file"] = str(hit)
    return tr


def open_trace(path: str | Path, skip_bad: bool = False, *, cache: bool = False,
               log: Callable[[str], None] | None = None) -> Trace:
    """Open a recording folder or a hintpipe trace-v1 file (detected by its magic).

    With ``cache``, a recording folder is loaded through its cached trace-v1 conversion
    (:func:`open_cached`; ``log`` hears one sentence when the cache is made).
    """
    p = Path(path)
    if p.is_dir():
        return open_cached(p, skip_bad, log) if cache else open_recording(p, skip_bad)
    if not p.exists():
        raise TraceError("missing", "no such trace file or recording folder", str(p))
    with open(p, "rb") as f:
        head = f.read(len(MAGIC))
    if head == MAGIC:
        return open_v1(p)
    raise TraceError("format", "not a recording folder nor a hintpipe trace-v1 file (bad magic); "
                     "a bare kmem text file needs its kpageflags snapshot: pass the recording folder", str(p))


def convert(recording_dir: str | Path, out_file: str | Path, skip_bad: bool = False, progress=None) -> dict:
    """Convert a recording folder (text or raw) or another trace-v1 file into a trace-v1 file; ``progress``
    (a :class:`~hintpipe.progress.Progress`) shows the events converted so far."""
    trace = open_trace(recording_dir, skip_bad=skip_bad)
    task = None if progress is None else progress.task("converting", total=trace.events_hint, unit="events")
    try:
        return write_v1(out_file, trace, task=task)
    finally:
        if task is not None:
            task.close()
