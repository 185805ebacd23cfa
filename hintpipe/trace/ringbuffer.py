"""Decode ftrace ring-buffer pages (``per_cpu/cpuN/trace_pipe_raw``) into kmem event columns.

A read of ``trace_pipe_raw`` returns one whole sub-buffer ("page") of the kernel's per-CPU ring
buffer. Its layout is described by the kernel itself, and every offset here comes from those
descriptions rather than from constants (normative summary: protocols/recording-v1.md):

- ``events/header_page``: the page header, a u64 ``timestamp`` (absolute, in trace-clock units)
  and a ``local_t commit`` word whose low 27 bits are the number of data bytes and whose top bits
  are flags (bit 31: events were lost before this page; bit 30: their count is stored as an
  unsigned long right after the data), then ``data`` (its size gives the page size).
- ``events/header_event``: every record starts with a 32-bit header ``type_len:5,
  time_delta:27``. type_len 1..28 is a data record of ``type_len * 4`` payload bytes; 0 is a data
  record whose length (in bytes, counting the length word itself) is the next u32; 29 is padding
  (with time_delta 0 the rest of the page is empty, otherwise a discarded record whose length is
  in the next u32); 30 extends the time delta by ``next_u32 << 27``; 31 is an absolute time stamp
  ``time_delta | next_u32 << 27`` (59 bits; the top 5 bits come from the running time stamp, as
  ``rb_fix_abs_ts()`` in kernel/trace/ring_buffer.c does).
- ``events/kmem/<event>/format``: the event's numeric id and the offset, size and signedness of
  each field of the record's payload.

Records have variable lengths, so one page is walked front to back, but all pages of a chunk are
walked at once: :meth:`RingBufferDecoder.decode_pages` keeps one cursor per page and advances
every cursor by one record per step with array operations, so a chunk costs O(records per page)
numpy calls (about a hundred for 4 KiB pages), not one Python step per record. Payload fields are
then gathered for all records with one vector operation per field.

A recording's ``raw/`` folder holds one zstd file of pages per CPU; :func:`iter_raw_batches`
decodes them a chunk at a time and merges the CPUs by time stamp into trace order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from dataclasses import fields as dc_fields
from pathlib import Path

import numpy as np
import zstandard

from hintpipe.units import MAX_ORDER

from .errors import TraceError
from .events import COLUMNS, EVENT_NAMES, EventBatch, EventType
from .stream import iter_zstd_fileobj, prefetched

KMEM_EVENTS = tuple(EVENT_NAMES[t] for t in EventType)
"""The kmem events hintpipe models, in EventType order (their codes in the ``etype`` column)."""

RAW_DIR = "raw"
"""Folder of a recording that holds the ring-buffer pages and the kernel's descriptions."""
META_FILE = "meta.json"
"""The recorder's description of a raw recording (clock, page size, per-CPU statistics)."""
META_FORMAT = "hintpipe-raw-pages"
META_VERSION = 1

COMMIT_SIZE_MASK = (1 << 27) - 1  # data bytes in the commit word (libtraceevent's COMMIT_MASK)
MISSED_EVENTS = 1 << 31  # RB_MISSED_EVENTS: events were lost between the previous page and this one
MISSED_STORED = 1 << 30  # RB_MISSED_STORED: their count follows the data as an unsigned long
TS_SHIFT = 27
TS_MSB = 0xF8 << 56  # bits an absolute time stamp record cannot hold (kernel TS_MSB)
FAILED_PFN = 0xFFFF_FFFF_FFFF_FFFF
"""pfn of an ``mm_page_alloc`` record for a failed allocation: the kernel records
``page_to_pfn(NULL)`` as -1 (its text output prints ``pfn=0x0``). Such records change no page."""


# ----------------------------------------------------------------------------------------------
# The kernel's descriptions
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One field of a format description: byte offset and size within the record, signedness."""

    name: str
    offset: int
    size: int
    signed: bool


_FIELD_RE = re.compile(r"field:\s*(?P<decl>[^;]*?)\s*;\s*offset:\s*(?P<off>\d+)\s*;\s*size:\s*(?P<size>\d+)\s*;"
                       r"\s*signed:\s*(?P<signed>\d+)\s*;")


def _parse_fields(text: str) -> dict[str, Field]:
    out: dict[str, Field] = {}
    for m in _FIELD_RE.finditer(text):
        name = re.sub(r"\[.*\]$", "", m.group("decl").split()[-1])  # "char comm[16]" -> "comm"
        if name not in out:  # header_page names "commit" and "overwrite" at the same offset
            out[name] = Field(name, int(m.group("off")), int(m.group("size")), m.group("signed") == "1")
    return out


@dataclass(frozen=True)
class EventFormat:
    """An event's ``format`` file: name, numeric id, payload fields."""

    name: str
    id: int
    fields: dict[str, Field]

    @property
    def payload_size(self) -> int:
        """Bytes a record of this event needs to hold every field."""
        return max(f.offset + f.size for f in self.fields.values())


def parse_format(text: str) -> EventFormat:
    """Parse ``events/<system>/<event>/format``."""
    name = re.search(r"^name:\s*(\S+)", text, re.M)
    ident = re.search(r"^ID:\s*(\d+)", text, re.M)
    if not name or not ident:
        raise TraceError("format", "not an event format description (no name: or ID: line)")
    flds = _parse_fields(text)
    if "common_type" not in flds:
        raise TraceError("format", f"event {name.group(1)} has no common_type field")
    return EventFormat(name.group(1), int(ident.group(1)), flds)


@dataclass(frozen=True)
class PageLayout:
    """``events/header_page``: where the page time stamp, commit word and data lie."""

    ts_offset: int
    commit_offset: int
    commit_size: int
    data_offset: int
    data_size: int

    @property
    def page_size(self) -> int:
        """Bytes per sub-buffer (what one read of trace_pipe_raw returns)."""
        return self.data_offset + self.data_size


def parse_header_page(text: str) -> PageLayout:
    """Parse ``events/header_page`` (a sub-buffer of any size, local_t of 4 or 8 bytes)."""
    f = _parse_fields(text)
    try:
        ts, commit, data = f["timestamp"], f["commit"], f["data"]
    except KeyError as e:
        raise TraceError("format", f"header_page has no {e.args[0]} field") from None
    if ts.size != 8 or commit.size not in (4, 8):
        raise TraceError("format", f"unsupported page header (timestamp {ts.size} bytes, commit {commit.size} bytes)")
    if data.offset % 4 or (data.offset + data.size) % 4:
        raise TraceError("format", "page data is not 4-byte aligned")
    return PageLayout(ts.offset, commit.offset, commit.size, data.offset, data.size)


@dataclass(frozen=True)
class EventHeader:
    """``events/header_event``: the special type_len values of the record header."""

    padding: int = 29
    time_extend: int = 30
    time_stamp: int = 31
    data_max: int = 28


def parse_header_event(text: str) -> EventHeader:
    """Parse ``events/header_event``; refuses a record header this decoder does not implement."""
    def num(pat: str) -> int:
        m = re.search(pat, text)
        if not m:
            raise TraceError("format", f"header_event lacks {pat!r}")
        return int(m.group(1))
    bits = (num(r"type_len\s*:\s*(\d+)\s*bits"), num(r"time_delta\s*:\s*(\d+)\s*bits"))
    if bits != (5, 27):
        raise TraceError("format", f"unsupported record header type_len:{bits[0]}, time_delta:{bits[1]}")
    h = EventHeader(num(r"padding\s*:\s*type\s*==\s*(\d+)"), num(r"time_extend\s*:\s*type\s*==\s*(\d+)"),
                    num(r"time_stamp\s*:\s*type\s*==\s*(\d+)"), num(r"data max type_len\s*==\s*(\d+)"))
    if not (h.data_max < h.padding < 32 and h.data_max < h.time_extend < 32 and h.data_max < h.time_stamp < 32):
        raise TraceError("format", "header_event's special record types overlap the data lengths")
    return h


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

@dataclass
class DecodeStats:
    """What decoding saw besides the kmem records it returned."""

    pages: int = 0
    records: int = 0  # kmem records returned
    failed_allocations: int = 0  # mm_page_alloc records with pfn -1 (left out: they change no page)
    other_records: dict[int, int] = field(default_factory=dict)  # event id -> count (not kmem)
    time_extends: int = 0
    time_stamps: int = 0
    paddings: int = 0  # discarded records (padding with a length)
    empty_pages: int = 0
    bad_pages: int = 0  # pages not decoded to their end (lenient decoding only)
    lost_events: int = 0  # sum of the counts stored on pages flagged MISSED_EVENTS
    lost_unknown: int = 0  # pages flagged MISSED_EVENTS without a stored count
    losses: list = field(default_factory=list)  # (cpu, ts_ns of the next record, count or -1)
    markers: list = field(default_factory=list)  # (cpu, ts_ns, text) of trace_marker records
    steps: int = 0  # most records in one page (lockstep iterations)

    def add(self, other: "DecodeStats") -> None:
        """Add ``other``'s counts to these."""
        for f in dc_fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, dict):
                for k, v in b.items():
                    a[k] = a.get(k, 0) + v
            elif isinstance(a, list):
                a.extend(b)
            elif f.name == "steps":
                self.steps = max(a, b)
            else:
                setattr(self, f.name, a + b)

    def as_dict(self) -> dict:
        """JSON-ready copy."""
        d = {f.name: getattr(self, f.name) for f in dc_fields(self)}
        d["other_records"] = {str(k): v for k, v in self.other_records.items()}
        return d


PAD = 256
"""Zero bytes a decoder needs after the pages, so no read of a (malformed) last record runs out."""


def _u64_windows(buf: np.ndarray) -> np.ndarray:
    """Overlapping little-endian u64 view: element i is bytes i..i+7 of ``buf``."""
    return np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))


def _field_at(u32: np.ndarray, u64: np.ndarray, payload: np.ndarray, f: Field, words: dict | None = None) -> np.ndarray:
    """Field ``f`` of the records whose payload starts at byte ``payload`` (4-byte aligned, as
    every ring-buffer record is), as uint64 (signed fields sign-extended, then viewed as int64).

    Fields inside one aligned 32-bit word and 8-byte fields on a 4-byte boundary are read with
    aligned 32-bit gathers (numpy's fast path); anything else from the overlapping 8-byte view.
    ``words`` caches 32-bit words gathered for the same records (the common fields share one).
    """
    if f.size not in (1, 2, 4, 8):
        raise TraceError("format", f"field {f.name} of {f.size} bytes is not a scalar")
    w, r = divmod(f.offset, 4)
    if r + f.size <= 4:
        v = None if words is None else words.get(w)
        if v is None:
            v = u32[payload // 4 + w]
            if words is not None:
                words[w] = v
        if f.size < 4:
            v = (v >> np.uint32(8 * r)) & np.uint32((1 << (8 * f.size)) - 1)
        v = v.astype(np.uint64)
    elif f.size == 8 and r == 0:
        i = payload // 4 + w
        v = u32[i].astype(np.uint64) | (u32[i + 1].astype(np.uint64) << np.uint64(32))
    else:
        v = u64[payload + f.offset]
        if f.size < 8:
            v = v & np.uint64((1 << (8 * f.size)) - 1)
    if f.signed and f.size < 8:
        sign = np.uint64(1 << (8 * f.size - 1))
        v = (v ^ sign) - sign
    return v.view(np.int64) if f.signed else v


class RingBufferDecoder:
    """Decodes ring-buffer pages into :class:`EventBatch` columns using the kernel's descriptions.

    ``formats`` maps event name -> :class:`EventFormat` and must hold the five kmem events;
    records of other ids are counted in :attr:`DecodeStats.other_records` (``marker``, the
    ``ftrace/print`` format, keeps the text of trace_marker records: checkpoints). ``strict``
    (default) raises TraceError ``corrupt`` on a malformed page; otherwise the rest of that page
    is skipped and counted in :attr:`DecodeStats.bad_pages`.
    """

    def __init__(self, layout: PageLayout, header: EventHeader, formats: dict[str, EventFormat],
                 strict: bool = True, marker: EventFormat | None = None):
        self.layout = layout
        self.header = header
        self.strict = strict
        self.marker = marker
        missing = [n for n in KMEM_EVENTS if n not in formats]
        if missing:
            raise TraceError("format", f"no format description for {', '.join(missing)}")
        self.formats = {n: formats[n] for n in KMEM_EVENTS}
        common = self.formats[KMEM_EVENTS[0]].fields
        self.common_type = common["common_type"]
        for fmt in self.formats.values():
            if fmt.fields.get("common_type") != self.common_type:
                raise TraceError("format", f"{fmt.name}: common_type differs from {KMEM_EVENTS[0]}'s")
            if "pfn" not in fmt.fields:
                raise TraceError("format", f"{fmt.name} has no pfn field")
        if max(f.payload_size for f in self.formats.values()) > PAD - 16:
            raise TraceError("format", "a kmem record is larger than this decoder's read-ahead")
        # Per output column: the distinct field locations and the event types that use each, so a
        # field at the same offset in several events is gathered once.
        self._groups: dict[str, list[tuple[Field, list[int]]]] = {}
        for col in ("pfn", "order", "migratetype", "percpu_refill"):
            groups: dict[Field, list[int]] = {}
            for t in EventType:
                f = self.formats[EVENT_NAMES[t]].fields.get(col)
                if f is not None:
                    groups.setdefault(Field(col, f.offset, f.size, f.signed), []).append(int(t))
            self._groups[col] = list(groups.items())
        self._type_of_id = np.full(1 << (8 * self.common_type.size), 255, np.uint8)
        for t in EventType:
            self._type_of_id[self.formats[EVENT_NAMES[t]].id] = int(t)
        self._need = np.array([self.formats[EVENT_NAMES[t]].payload_size for t in EventType], np.int64)

    @classmethod
    def from_dir(cls, d: str | Path, strict: bool = True) -> "RingBufferDecoder":
        """Decoder for the descriptions in ``d``: a recording's raw folder or a tracefs events
        folder (``header_page``, ``header_event``, ``kmem/<event>/format``, and
        ``ftrace/print/format`` if present, for trace_marker checkpoints)."""
        d = Path(d)
        formats = {}
        try:
            for name in KMEM_EVENTS:
                fmt = parse_format((d / "kmem" / name / "format").read_text())
                idf = d / "kmem" / name / "id"
                if idf.exists() and idf.read_text().strip() != str(fmt.id):
                    raise TraceError("format", f"{name}: id file says {idf.read_text().strip()}, format says {fmt.id}",
                                     str(idf))
                if fmt.name != name:
                    raise TraceError("format", f"kmem/{name}/format describes {fmt.name}", str(d))
                formats[name] = fmt
            mf = d / "ftrace" / "print" / "format"
            marker = parse_format(mf.read_text()) if mf.exists() else None
            layout = parse_header_page((d / "header_page").read_text())
            header = parse_header_event((d / "header_event").read_text())
        except FileNotFoundError as e:
            raise TraceError("missing", f"the raw recording lacks {Path(e.filename).relative_to(d)}", str(d)) from None
        except TraceError as e:
            if e.path is None:
                raise TraceError(e.code, str(e).rsplit(" [", 1)[0], str(d)) from None
            raise
        return cls(layout, header, formats, strict, marker)

    # -- page walking ----------------------------------------------------------------------------

    def _bad(self, stats: DecodeStats, msg: str) -> None:
        if self.strict:
            raise TraceError("corrupt", msg)
        stats.bad_pages += 1

    def _page_headers(self, u64: np.ndarray, n: int, stats: DecodeStats):
        L = self.layout
        starts = np.arange(n, dtype=np.int64) * L.page_size
        ts = u64[starts + L.ts_offset]
        commit = u64[starts + L.commit_offset]
        if L.commit_size == 4:
            commit = commit & np.uint64(0xFFFF_FFFF)
        commit = commit.astype(np.int64)
        size = commit & COMMIT_SIZE_MASK
        bad = (size > L.data_size) | (size % 4 != 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            self._bad(stats, f"page {i}: commit word {int(commit[i]):#x} gives {int(size[i])} data bytes "
                             f"(a page holds {L.data_size})")
            size = np.where(bad, 0, size)
        missed = (commit & MISSED_EVENTS) != 0
        stored = missed & ((commit & MISSED_STORED) != 0) & (size + 8 <= L.data_size)
        lost = np.where(missed, -1, 0).astype(np.int64)
        if stored.any():  # the count is an unsigned long right after the data
            lost[stored] = u64[starts[stored] + L.data_offset + size[stored]].astype(np.int64)
        return starts, ts, size, lost

    def _walk(self, u64: np.ndarray, starts: np.ndarray, ts0: np.ndarray, size: np.ndarray, stats: DecodeStats):
        """Advance one cursor per page in lockstep, one record per step; then time-stamp.

        The loop only finds where records start: each step gathers every live cursor's 8 bytes
        (header and the word after it), looks the record's length up by type_len and moves on;
        the few cursors on a record of variable length (type_len 0, padding) are handled apart.
        A cursor lives from the first step until its page ends, so the record it reads at step k
        is its page's k-th record: page order is a scatter, not a sort. Time stamps follow for
        all records at once: a per-page running sum of the deltas (time extends add their 59-bit
        delta), corrected after each absolute stamp (rare).

        Returns, for the data records in page order: header byte positions, the 8 header bytes,
        absolute time stamps, and the page of each record.
        """
        H = self.header
        L = self.layout
        fixed_len = np.zeros(32, np.int64)  # record length by type_len; 0: look closer
        fixed_len[1:H.data_max + 1] = 4 + 4 * np.arange(1, H.data_max + 1)
        fixed_len[H.time_extend] = fixed_len[H.time_stamp] = 8
        m31 = np.uint64(31)
        n = len(size)
        pg = np.flatnonzero(size > 0)  # the page each live cursor walks
        stats.empty_pages += int(n - len(pg))
        pos = starts[pg] + L.data_offset  # byte position of the cursor's next record header
        end = pos + size[pg]
        out_pg, out_pos, out_x, bad_pos = [], [], [], []
        steps = 0
        while len(pos):
            steps += 1
            x = u64[pos]
            nb = fixed_len[(x & m31).astype(np.intp)]
            stop = None
            sp = np.flatnonzero(nb == 0)
            if len(sp):  # type_len 0 and padding: length in the next word; null padding ends the page
                xs = x[sp]
                t = (xs & m31).astype(np.int64)
                a0 = (xs >> np.uint64(32)).astype(np.int64)
                null = (t == H.padding) & (((xs >> np.uint64(5)) & np.uint64((1 << 27) - 1)) == 0)
                var = (t == 0) | ((t == H.padding) & ~null)
                bad = (var & ((a0 < 4) | (a0 % 4 != 0))) | ~(var | null)
                nb[sp] = np.where(var & ~bad, 4 + a0, 0)
                stop = np.zeros(len(pos), bool)
                stop[sp[null | bad]] = True
                if bad.any():
                    j = int(np.flatnonzero(bad)[0])
                    i = sp[j]
                    self._bad(stats, f"page {int(pg[i])}: record with type_len {int(t[j])} and length word "
                                     f"{int(a0[j])} at page offset {int(pos[i] - starts[pg[i]])}")
                    bad_pos.append(pos[sp[bad]])
            out_pg.append(pg)
            out_pos.append(pos)
            out_x.append(x)
            new = pos + nb
            fin = new >= end
            if fin.any():
                over = new > end
                if stop is not None:
                    over &= ~stop
                if over.any():
                    i = int(np.flatnonzero(over)[0])
                    self._bad(stats, f"page {int(pg[i])}: record at page offset {int(pos[i] - starts[pg[i]])} "
                                     f"runs past the page's {int(end[i] - pos[i])} remaining data bytes")
                    bad_pos.append(pos[over])
                stop = fin if stop is None else stop | fin
            pos = new
            if stop is not None:
                keep = np.flatnonzero(~stop)
                if len(keep) < len(pos):
                    pg, pos, end = pg[keep], pos[keep], end[keep]
        stats.steps = max(stats.steps, steps)
        if not out_pos:
            e = np.empty(0, np.int64)
            return e, np.empty(0, np.uint64), np.empty(0, np.uint64), e
        # page order: record k of page p goes to first[p] + k
        opg = np.concatenate(out_pg)
        first = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(opg, minlength=n), out=first[1:])
        step = np.repeat(np.arange(steps, dtype=np.int64), [len(p) for p in out_pg])
        dest = first[opg] + step
        hdr = np.empty(len(dest), np.int64)
        hdr[dest] = np.concatenate(out_pos)
        x = np.empty(len(dest), np.uint64)
        x[dest] = np.concatenate(out_x)
        page = np.repeat(np.arange(n), np.diff(first))
        # time stamps: running sum of the deltas per page, from the page's time stamp
        tl = (x & m31).astype(np.int64)
        td = (x >> np.uint64(5)) & np.uint64((1 << 27) - 1)
        hi = (x >> np.uint64(32)) << np.uint64(TS_SHIFT)
        ext = tl == H.time_extend
        ab = tl == H.time_stamp
        pad = tl == H.padding
        delta = np.where(tl <= H.data_max, td, np.where(ext, td + hi, np.uint64(0)))
        cs = np.cumsum(delta, dtype=np.uint64)
        head = first[:-1][np.diff(first) > 0]  # each page's first record (pages with records)
        base = np.zeros(n, np.uint64)
        base[page[head]] = cs[head] - delta[head]  # running sum before the page's first record
        ts = ts0.astype(np.uint64)[page] + cs - base[page]
        if ab.any():  # an absolute stamp replaces the running value for the rest of its page
            for i in np.flatnonzero(ab).tolist():
                run = int(ts[i])  # running value before the stamp (its own delta counted as 0)
                val = int(hi[i]) + int(td[i])
                if run & TS_MSB:  # rb_fix_abs_ts(): the record lacks the top 5 bits
                    val |= run & TS_MSB
                    if val < run:
                        val += 1 << 59
                ts[i:first[page[i] + 1]] += np.uint64((val - run) % (1 << 64))
        stats.time_extends += int(ext.sum())
        stats.time_stamps += int(ab.sum())
        stats.paddings += int((pad & (td != 0)).sum())
        data = tl <= H.data_max
        if bad_pos:
            data &= ~np.isin(hdr, np.concatenate(bad_pos))
        sel = np.flatnonzero(data)
        if len(sel) < len(data):
            hdr, x, ts, page = hdr[sel], x[sel], ts[sel], page[sel]
        return hdr, x, ts, page

    def _markers(self, raw: np.ndarray, ids, off, plen, ts, cpu: int, stats: DecodeStats) -> None:
        """Keep the text of trace_marker records (a few per recording: checkpoints)."""
        buf = self.marker.fields.get("buf")
        if buf is None:
            return
        for i in np.flatnonzero(ids == self.marker.id).tolist():
            a = int(off[i]) + buf.offset
            b = int(off[i]) + int(plen[i])
            text = bytes(raw[a:b]).split(b"\0", 1)[0].decode(errors="replace").strip()
            stats.markers.append((cpu, int(ts[i]), text))

    # -- public ------------------------------------------------------------------------------

    def cut_pages(self, pages: bytes, until_ns: int) -> bytes:
        """One CPU's pages (in read order) up to the last record stamped at or before
        ``until_ns``: the page holding the first later record keeps only what precedes it (its
        commit word shortened, the rest zeroed, flags kept), and later pages are dropped. The
        result is pages as the kernel could have written them had tracing stopped there."""
        ps = self.layout.page_size
        src = np.frombuffer(pages, np.uint8)
        if len(src) % ps:
            raise TraceError("corrupt", f"{len(src)} bytes are not a whole number of {ps}-byte pages")
        # a page stamped after the cut holds only later records: only the pages before it matter
        L = self.layout
        page_ts = src.reshape(-1, ps)[:, L.ts_offset:L.ts_offset + 8].copy().view("<u8").ravel().view(np.int64)
        n = int(np.searchsorted(np.maximum.accumulate(page_ts), until_ns, side="right")) if len(page_ts) else 0
        if n == 0:
            return b""
        src = src[:n * ps]
        raw = np.zeros(len(src) + PAD, np.uint8)
        raw[:len(src)] = src
        u64 = _u64_windows(raw)
        stats = DecodeStats()
        starts, ts0, size, _ = self._page_headers(u64, n, stats)
        hdr, _, ts, page = self._walk(u64, starts, ts0, size, stats)
        later = np.flatnonzero(ts.view(np.int64) > until_ns)
        if not len(later):
            return src.tobytes()
        i = int(later[0])
        p = int(page[i])
        keep = bytearray(src[:(p + 1) * ps].tobytes())
        data = int(hdr[i] - starts[p]) - L.data_offset
        if data == 0:
            return bytes(keep[:p * ps])
        word = int.from_bytes(keep[p * ps + L.commit_offset:p * ps + L.commit_offset + L.commit_size], "little")
        word = (word & ~COMMIT_SIZE_MASK & ~MISSED_STORED) | data
        keep[p * ps + L.commit_offset:p * ps + L.commit_offset + L.commit_size] = word.to_bytes(L.commit_size, "little")
        keep[p * ps + L.data_offset + data:(p + 1) * ps] = bytes(ps - L.data_offset - data)
        return bytes(keep)

    def decode_pages(self, pages: bytes | bytearray | memoryview | np.ndarray, cpu: int,
                     stats: DecodeStats | None = None) -> EventBatch:
        """Decode a run of whole pages read from one CPU's ``trace_pipe_raw``, in read order."""
        stats = stats if stats is not None else DecodeStats()
        ps = self.layout.page_size
        src = np.frombuffer(pages, np.uint8) if not isinstance(pages, np.ndarray) else pages.reshape(-1).view(np.uint8)
        if len(src) % ps:
            raise TraceError("corrupt", f"{len(src)} bytes are not a whole number of {ps}-byte pages")
        raw = np.zeros(len(src) + PAD, np.uint8)
        raw[:len(src)] = src
        return self.decode_padded(raw, len(src) // ps, cpu, stats)

    def decode_padded(self, raw: np.ndarray, n: int, cpu: int, stats: DecodeStats) -> EventBatch:
        """Decode ``n`` pages held in ``raw``, which has at least :data:`PAD` zero bytes after
        them (no copy is made)."""
        stats.pages += n
        if n == 0:
            return EventBatch.empty()
        u64 = _u64_windows(raw)
        starts, ts0, size, lost = self._page_headers(u64, n, stats)
        hdr, h, ts, page = self._walk(u64, starts, ts0, size, stats)
        # payload position: after the header, or after the length word for type_len 0
        big = (h & np.uint64(31)) == 0
        off = hdr + 4 + 4 * big
        plen = np.where(big, (h >> np.uint64(32)).astype(np.int64) - 4, 4 * (h & np.uint64(31)).astype(np.int64))
        u32 = raw[:len(raw) - len(raw) % 4].view("<u4")
        words: dict = {}
        ids = _field_at(u32, u64, off, self.common_type, words).astype(np.intp)
        et = self._type_of_id[ids]
        known = et != 255
        if not known.all():
            if self.marker is not None:
                self._markers(raw, ids, off, plen, ts, cpu, stats)
            u, cnt = np.unique(ids[~known], return_counts=True)
            for i, k in zip(u.tolist(), cnt.tolist()):
                stats.other_records[i] = stats.other_records.get(i, 0) + k
            off, plen, ts, et, page = off[known], plen[known], ts[known], et[known], page[known]
            words = {}
        short = plen < self._need[et]
        if short.any():
            i = int(np.flatnonzero(short)[0])
            self._bad(stats, f"page {int(page[i])}: a {EVENT_NAMES[EventType(int(et[i]))]} record holds "
                             f"{int(plen[i])} bytes, fewer than its format needs")
            keep = ~short
            off, ts, et, page = off[keep], ts[keep], et[keep], page[keep]
            words = {}
        m = len(et)
        cols = {"ts_ns": ts.view(np.int64), "etype": et, "cpu": np.full(m, cpu, COLUMNS["cpu"])}
        types = np.bincount(et, minlength=len(EventType))
        present_types = int((types > 0).sum())
        for col, groups in self._groups.items():
            dt = COLUMNS[col]
            out = np.full(m, -1 if col == "migratetype" else 0, dt)
            for f, tset in groups:
                present = [t for t in tset if types[t]]
                if not present:
                    continue
                if len(present) == present_types:  # every record here has the field there
                    out[:] = _field_at(u32, u64, off, f, words).astype(dt)
                else:
                    rows = np.flatnonzero(np.isin(et, present))
                    out[rows] = _field_at(u32, u64, off[rows], f).astype(dt)
            cols[col] = out
        batch = EventBatch(**{k: cols[k] for k in COLUMNS})
        # losses: reported with the time stamp of the first record at or after a flagged page
        flagged = np.flatnonzero(lost != 0)
        if len(flagged):
            stats.lost_events += int(lost[lost > 0].sum())
            stats.lost_unknown += int((lost < 0).sum())
            at = np.searchsorted(page, flagged)
            for i, p in zip(at.tolist(), flagged.tolist()):
                t = int(ts[i]) if i < m else int(ts0[p])
                stats.losses.append((cpu, t, int(lost[p])))
        failed = batch.pfn == np.uint64(FAILED_PFN)
        if failed.any():
            stats.failed_allocations += int(failed.sum())
            batch = batch.take(~failed)
        stats.records += len(batch)
        return batch


# ----------------------------------------------------------------------------------------------
# Recordings: one page file per CPU, merged by time stamp
# ----------------------------------------------------------------------------------------------

_CPU_FILE = re.compile(r"cpu(\d+)\.pages\.zst")


def cpu_files(raw_dir: str | Path) -> dict[int, Path]:
    """cpu -> page file (``cpuN.pages.zst``) of a recording's raw folder, by CPU number."""
    out = {}
    for p in Path(raw_dir).glob("cpu*.pages.zst"):
        m = _CPU_FILE.fullmatch(p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def read_meta(raw_dir: str | Path) -> dict:
    """The recorder's ``meta.json`` (empty if absent); TraceError ``format`` if it is not JSON
    of this format."""
    p = Path(raw_dir) / META_FILE
    if not p.exists():
        return {}
    try:
        meta = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise TraceError("format", f"not JSON ({e})", str(p)) from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise TraceError("format", f"not a {META_FORMAT} description", str(p))
    if meta.get("version") != META_VERSION:
        raise TraceError("format", f"unsupported version {meta.get('version')!r} (this reader knows {META_VERSION})",
                         str(p))
    return meta


def iter_page_chunks(path: str | Path, page_size: int, chunk_pages: int = 8192,
                     buffers: int = 3) -> Iterator[tuple[np.ndarray, int]]:
    """Whole pages from a zstd page file, ``chunk_pages`` at a time (memory bounded by the chunk).

    Yields ``(buf, nbytes)``: the pages are ``buf[:nbytes]``, followed by :data:`PAD` zero bytes,
    so decoding needs no copy. The ``buffers`` buffers are reused in turn (fresh ones would cost
    a page fault per 4 KiB each time): a consumer must be done with a buffer before ``buffers -
    1`` more chunks have been yielded. A truncated or corrupt stream, or one that ends inside a
    page, raises TraceError.
    """
    want = page_size * chunk_pages
    ring = [np.empty(want + PAD, np.uint8) for _ in range(buffers)]
    k = got = 0
    buf = ring[0]
    with open(path, "rb") as f:
        for piece in iter_zstd_fileobj(f, str(path)):
            mv = memoryview(piece)
            while len(mv):
                take = min(len(mv), want - got)
                buf[got:got + take] = np.frombuffer(mv[:take], np.uint8)
                got += take
                mv = mv[take:]
                if got == want:
                    buf[got:got + PAD] = 0
                    yield buf, got
                    k += 1
                    buf = ring[k % buffers]
                    got = 0
    if got % page_size:
        raise TraceError("truncated", f"ends inside a page ({got % page_size} stray bytes)", str(path))
    if got:
        buf[got:got + PAD] = 0
        yield buf[:got + PAD], got


def iter_cpu_batches(raw_dir: str | Path, cpu: int, decoder: RingBufferDecoder, stats: DecodeStats,
                     chunk_pages: int = 8192) -> Iterator[EventBatch]:
    """Decoded records of one CPU, in ring-buffer order, a chunk at a time (decompression runs
    one chunk ahead in a helper thread)."""
    path = cpu_files(raw_dir)[cpu]
    ps = decoder.layout.page_size
    for buf, nbytes in prefetched(iter_page_chunks(path, ps, chunk_pages), depth=1, name="hintpipe-raw-pages"):
        try:
            yield decoder.decode_padded(buf, nbytes // ps, cpu, stats)
        except TraceError as e:
            if e.path is None:
                raise TraceError(e.code, str(e).rsplit(" [", 1)[0], str(path)) from None
            raise


def merge_by_time(runs: list[EventBatch]) -> EventBatch:
    """Merge per-CPU runs (each ordered by time stamp, listed in CPU order) into one run ordered
    by time stamp; ties go to the earlier run (the lower CPU), as trace_pipe does. Runs are
    merged pairwise, each merge placing both runs with a binary search and one scatter per
    column; a run whose stamps go backwards (a clock step) falls back to a stable sort."""
    runs = [r for r in runs if len(r)]
    if not runs:
        return EventBatch.empty()
    while len(runs) > 1:
        nxt = [_merge2(runs[i], runs[i + 1]) for i in range(0, len(runs) - 1, 2)]
        if len(runs) % 2:
            nxt.append(runs[-1])
        runs = nxt
    return runs[0]


def _merge2(a: EventBatch, b: EventBatch) -> EventBatch:
    ta, tb = a.ts_ns, b.ts_ns
    if not (np.all(ta[1:] >= ta[:-1]) and np.all(tb[1:] >= tb[:-1])):
        both = EventBatch.concat([a, b])
        return both.take(np.argsort(both.ts_ns, kind="stable"))
    pa = np.searchsorted(tb, ta, side="left") + np.arange(len(ta))
    pb = np.searchsorted(ta, tb, side="right") + np.arange(len(tb))
    out = {}
    for k, dt in COLUMNS.items():
        col = np.empty(len(ta) + len(tb), dt)
        col[pa] = getattr(a, k)
        col[pb] = getattr(b, k)
        out[k] = col
    return EventBatch(**out)


def iter_raw_batches(raw_dir: str | Path, stats: DecodeStats | None = None, strict: bool = True,
                     chunk_pages: int = 8192, parallel: bool = True) -> Iterator[EventBatch]:
    """Every kmem record of a raw recording folder, merged across CPUs by time stamp, in batches.

    Each CPU's file is decoded a chunk at a time; a batch holds the records up to the earliest
    "last time stamp decoded" among the CPUs that still have data (no later chunk of any CPU can
    hold an earlier record while time stamps are monotonic per CPU), so memory stays bounded by
    a chunk per CPU. With ``parallel`` each CPU is decoded in a helper thread, a chunk ahead.
    Losses and failed allocations are counted in ``stats`` (complete once the iteration ends),
    not raised: the caller decides (see :class:`~hintpipe.trace.recording.RawEvents`).
    """
    stats = stats if stats is not None else DecodeStats()
    raw_dir = Path(raw_dir)
    dec = RingBufferDecoder.from_dir(raw_dir, strict=strict)
    files = cpu_files(raw_dir)
    if not files:
        raise TraceError("missing", "the raw recording has no page files (cpuN.pages.zst)", str(raw_dir))
    # each CPU's pages are decoded in a thread of their own (numpy releases the GIL), into
    # stats of their own, added up at the end
    cpu_stats = {cpu: DecodeStats() for cpu in files}
    gens = {cpu: prefetched(iter_cpu_batches(raw_dir, cpu, dec, cpu_stats[cpu], chunk_pages), depth=1,
                            name=f"hintpipe-raw-decode{cpu}") if parallel else
            iter_cpu_batches(raw_dir, cpu, dec, cpu_stats[cpu], chunk_pages) for cpu in files}
    pending = {cpu: EventBatch.empty() for cpu in gens}
    live = set(gens)
    try:
        while live or any(len(p) for p in pending.values()):
            for cpu in sorted(live):
                while cpu in live and not len(pending[cpu]):
                    nxt = next(gens[cpu], None)
                    if nxt is None:
                        live.discard(cpu)
                    else:
                        pending[cpu] = nxt
            if live:
                mark = min(int(pending[c].ts_ns[-1]) for c in live)
                parts = []
                for cpu in sorted(pending):
                    p = pending[cpu]
                    k = int(np.searchsorted(p.ts_ns, mark, side="right")) if len(p) else 0
                    parts.append(p.take(slice(0, k)))
                    pending[cpu] = p.take(slice(k, None))
            else:
                parts = [pending[c] for c in sorted(pending)]
                pending = {c: EventBatch.empty() for c in pending}
            out = merge_by_time(parts)
            if len(out):
                yield out
    finally:
        for g in gens.values():
            g.close()
        for st in cpu_stats.values():
            stats.add(st)


def check_orders(batch: EventBatch, where: str) -> None:
    """TraceError ``corrupt`` if a record's order exceeds MAX_ORDER (a page of garbage)."""
    if len(batch) and int(batch.order.max()) > MAX_ORDER:
        i = int(np.flatnonzero(batch.order > MAX_ORDER)[0])
        raise TraceError("corrupt", f"record with order {int(batch.order[i])} > {MAX_ORDER} at time stamp "
                                    f"{int(batch.ts_ns[i])} ns on CPU {int(batch.cpu[i])}", where)
