"""hintpipe trace format v1 (normative spec: protocols/trace-v1.md).

Layout: the 8 magic bytes ``HPTRACE1`` then one zstd stream holding a sequence of msgpack maps:
a header, event batches of columnar little-endian arrays (msgpack bin), and an end record.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import zstandard

from hintpipe.units import MAX_ORDER, MAX_PAGE_COUNT, PAGE_SIZE

from .errors import TraceError
from .events import COLUMNS, EventBatch
from .layout import Layout, PageKind, Zone
from .stream import iter_zstd_fileobj

MAGIC = b"HPTRACE1"
VERSION = 1
MAX_BATCH = 1 << 20  # events per batch a writer may emit; readers reject larger batches
ZSTD_LEVEL = 6


def _pack_bitmap(mask: np.ndarray) -> bytes:
    return np.packbits(mask.astype(bool), bitorder="little").tobytes()


def _unpack_bitmap(b: bytes, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(b, np.uint8), count=n, bitorder="little").astype(bool)


def write_v1(out_file: str | Path, trace, batch_events: int = 1 << 16, task=None, *, level: int = ZSTD_LEVEL,
             derived_from: dict | None = None) -> dict:
    """Write an opened :class:`~hintpipe.trace.recording.Trace` as trace-v1. Returns a summary.

    The file appears only once complete (written to a temporary ``.part`` name in the same
    folder, then renamed); a failure or an interrupt removes the ``.part`` file. ``task`` (a
    :class:`~hintpipe.progress.Task`) is told the events written so far. ``derived_from`` (a map)
    is stored in the header under that key (the trace cache's record of its source files). What
    reading the source skipped (``trace.stats``: skip_bad) goes into the end record.
    """
    out_file = Path(out_file)
    header = {
        "type": "header",
        "magic": "hintpipe-trace",
        "version": VERSION,
        "page_size": PAGE_SIZE,
        "page_count": trace.page_count,
        "source": {k: v for k, v in trace.source.items() if isinstance(v, str)},
        "initial_free": {"encoding": "bitmap-le", "data": _pack_bitmap(trace.initial_free)},
        "buddyinfo_start": trace.buddyinfo_start,
        "buddyinfo_end": trace.buddyinfo_end,
        "columns": [[k, dt.str] for k, dt in COLUMNS.items()],
    }
    if derived_from is not None:
        header["derived_from"] = derived_from
    if trace.known_layout is not None:
        header.update(_layout_fields(trace.known_layout))
    total = 0
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_file.parent, prefix=f".{out_file.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            raw.write(MAGIC)
            with cctx.stream_writer(raw, closefd=False) as z:
                z.write(msgpack.packb(header, use_bin_type=True))
                for b in trace.batches():
                    for s in range(0, len(b), batch_events):
                        part = b.take(slice(s, s + batch_events))
                        rec = {"type": "batch", "n": len(part)}
                        for k, dt in COLUMNS.items():
                            rec[k] = np.ascontiguousarray(getattr(part, k), dtype=dt).tobytes()
                        z.write(msgpack.packb(rec, use_bin_type=True))
                        total += len(part)
                    if task is not None:
                        task.update(total)
                end = {"type": "end", "events": total}
                stats = getattr(trace, "stats", None)
                if stats is not None and (stats.skipped or stats.lost_events):
                    end["skipped"] = {str(k): int(v) for k, v in stats.skipped.items()}
                    end["lost_events"] = int(stats.lost_events)
                z.write(msgpack.packb(end, use_bin_type=True))
        os.chmod(tmp, 0o644)
        tmp.replace(out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"events": total, "bytes": out_file.stat().st_size, "page_count": trace.page_count}


def _layout_fields(layout: Layout) -> dict:
    """The optional header keys that carry a :class:`~.layout.Layout` (protocols/trace-v1.md)."""
    out = {
        "zones": [z.as_dict() for z in layout.zones],
        "not_ram": {"encoding": "bitmap-le", "data": _pack_bitmap(layout.kind == PageKind.NOT_RAM)},
        "zero_at_start": {"encoding": "bitmap-le", "data": _pack_bitmap(layout.kind == PageKind.ZERO)},
        "layout_notes": list(layout.notes),
    }
    if layout.reported is not None:
        out["reported_at_start"] = {"encoding": "bitmap-le", "data": _pack_bitmap(layout.reported)}
    return out


def _optional_bitmap(h: dict, key: str, n: int, sp: str) -> np.ndarray | None:
    v = h.get(key)
    if v is None:
        return None
    if not isinstance(v, dict) or v.get("encoding") != "bitmap-le" or not isinstance(v.get("data"), bytes) \
            or len(v["data"]) != (n + 7) // 8:
        raise TraceError("format", f"{key} must be a little-endian bitmap of page_count bits", sp)
    return _unpack_bitmap(v["data"], n)


def _layout_of(h: dict, initial_free: np.ndarray, sp: str) -> Layout | None:
    """The header's :class:`~.layout.Layout`, or None when it carries none (older writers)."""
    n = len(initial_free)
    not_ram = _optional_bitmap(h, "not_ram", n, sp)
    zero = _optional_bitmap(h, "zero_at_start", n, sp)
    if not_ram is None or zero is None:
        return None
    zones = h.get("zones") or []
    if not isinstance(zones, list) or not all(isinstance(z, dict) for z in zones):
        raise TraceError("format", "zones must be an array of maps", sp)
    try:
        zs = [Zone.from_dict(z) for z in zones]
    except (KeyError, TypeError, ValueError) as e:
        raise TraceError("format", f"malformed zone ({type(e).__name__}: {e})", sp) from None
    if any(z.start_pfn < 0 or z.spanned < 0 or z.end_pfn > n for z in zs):
        raise TraceError("format", "a zone lies outside the trace's page_count", sp)
    kind = np.full(n, PageKind.USED, np.uint8)
    kind[zero] = PageKind.ZERO
    kind[initial_free] = PageKind.FREE
    kind[not_ram] = PageKind.NOT_RAM
    notes = h.get("layout_notes") or []
    return Layout(kind, zs, _optional_bitmap(h, "reported_at_start", n, sp),
                  [str(x) for x in notes] if isinstance(notes, list) else [])


def _records(path: Path) -> Iterator[dict]:
    """Yield the msgpack maps of a trace-v1 file, with truncation/corruption as TraceError."""
    sp = str(path)
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise TraceError("format", "bad magic (not a hintpipe trace-v1 file)", sp)
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=256 << 20, strict_map_key=True)
        seen_end = False
        for data in iter_zstd_fileobj(f, sp):
            try:
                unpacker.feed(data)
                for rec in unpacker:
                    if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
                        raise TraceError("format", "record is not a map with a string 'type'", sp)
                    if seen_end:
                        raise TraceError("format", "data after the end record", sp)
                    seen_end = rec["type"] == "end"
                    yield rec
            except (msgpack.exceptions.UnpackException, ValueError, TypeError) as e:
                raise TraceError("format", f"bad msgpack record ({type(e).__name__}: {e})", sp) from None
        if not seen_end:
            raise TraceError("truncated", "trace-v1 file is truncated (no end record)", sp)


def _header_record(path: Path) -> dict:
    sp = str(path)
    it = _records(path)
    try:
        h = next(it)
    except StopIteration:
        raise TraceError("truncated", "no header record", sp) from None
    finally:
        it.close()
    return h


def read_v1_header(path: str | Path) -> dict:
    """Read and validate the header of a trace-v1 file; return what an opened trace holds:
    ``initial_free`` (bool per page), ``buddyinfo_start``, ``buddyinfo_end`` and ``source``."""
    path = Path(path)
    h = _header_record(path)
    try:
        return _header_fields(h, path)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise TraceError("format", f"malformed header ({type(e).__name__}: {e})", str(path)) from None


def read_v1_derived_from(path: str | Path) -> dict | None:
    """The header's ``derived_from`` map (None if absent or not a map)."""
    d = _header_record(Path(path)).get("derived_from")
    return d if isinstance(d, dict) else None


def _header_fields(h: dict, path: Path) -> dict:
    sp = str(path)
    if h.get("type") != "header" or h.get("magic") != "hintpipe-trace":
        raise TraceError("format", "first record is not a trace-v1 header", sp)
    if h.get("version") != VERSION:
        raise TraceError("format", f"unsupported version {h.get('version')!r} (this reader knows {VERSION})", sp)
    n = h.get("page_count")
    init = h.get("initial_free") or {}
    if not isinstance(n, int) or n <= 0 or n > MAX_PAGE_COUNT:
        raise TraceError("format", f"bad page_count {n!r}", sp)
    if init.get("encoding") != "bitmap-le" or not isinstance(init.get("data"), bytes) or len(init["data"]) != (n + 7) // 8:
        raise TraceError("format", "initial_free must be a little-endian bitmap of page_count bits", sp)
    cols = {k: v for k, v in h.get("columns") or []}
    for k, dt in COLUMNS.items():
        if cols.get(k) != dt.str:
            raise TraceError("format", f"column {k} must have dtype {dt.str}, header says {cols.get(k)!r}", sp)
    for key in ("buddyinfo_start", "buddyinfo_end"):
        bi = h.get(key)
        if bi is not None and not (isinstance(bi, dict) and isinstance(bi.get("free_pages"), int)
                                   and isinstance(bi.get("by_order"), list)
                                   and all(isinstance(x, int) for x in bi["by_order"])):
            raise TraceError("format", f"{key} must be nil or a map with free_pages and by_order", sp)
    if not isinstance(h.get("source") or {}, dict):
        raise TraceError("format", "source must be a map", sp)
    initial_free = _unpack_bitmap(init["data"], n)
    return {"initial_free": initial_free, "buddyinfo_start": h.get("buddyinfo_start"),
            "buddyinfo_end": h.get("buddyinfo_end"), "source": dict(h.get("source") or {}),
            "known_layout": _layout_of(h, initial_free, sp)}


def iter_v1_batches(path: str | Path, page_count: int, end: dict | None = None) -> Iterator[EventBatch]:
    """Stream the event batches of a trace-v1 file, validating sizes, types and pfn range; the
    end record is copied into ``end`` (if given) once reached."""
    sp = str(path)
    total = 0
    for rec in _records(Path(path)):
        t = rec.get("type")
        if t == "header":
            continue
        if t == "end":
            if rec.get("events") != total:
                raise TraceError("format", f"end record says {rec.get('events')} events, batches held {total}", sp)
            skipped, lost = rec.get("skipped", {}), rec.get("lost_events", 0)
            if not (isinstance(skipped, dict) and all(isinstance(k, str) and isinstance(v, int) and v >= 0
                                                      for k, v in skipped.items())
                    and isinstance(lost, int) and lost >= 0):
                raise TraceError("format", "end record's skipped must map str to counts and lost_events be a count", sp)
            if end is not None:
                end.update(rec)
            return
        if t != "batch":
            continue  # unknown record types are skipped (forward compatibility, see spec)
        n = rec.get("n")
        if not isinstance(n, int) or not 0 <= n <= MAX_BATCH:
            raise TraceError("format", f"bad batch size {n!r} (event {total})", sp)
        cols = {}
        for k, dt in COLUMNS.items():
            b = rec.get(k)
            if not isinstance(b, bytes) or len(b) != n * dt.itemsize:
                raise TraceError("format", f"column {k} of the batch at event {total} has the wrong size", sp)
            cols[k] = np.frombuffer(b, dt)
        batch = EventBatch(**cols)
        if n and ((batch.etype > 4).any() or (batch.order > MAX_ORDER).any()):
            raise TraceError("format", f"unknown event type or order > 10 in the batch at event {total}", sp)
        if n:
            bad = np.flatnonzero(batch.outside(page_count))
            if len(bad):
                raise TraceError("pfn-range", f"event {total + int(bad[0])}: pfn {int(batch.pfn[bad[0]]):#x} lies beyond "
                                 f"the snapshot ({page_count} pages)", sp)
        total += n
        yield batch
    raise TraceError("truncated", "trace-v1 file ended without an end record", sp)
