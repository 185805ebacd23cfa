"""Vectorised parser for tracefs kmem text (``trace_pipe`` output) into columnar arrays.

A line looks like::

     record_kmem_tra-6209    [001] d..3.   582.427376: mm_page_alloc_zone_locked: page=000000003a8ae113 pfn=0x116a34 order=2 migratetype=2 percpu_refill=1

Fast path (per chunk of a few MB, no Python loop per line): find the newlines once, locate the
``": mm_page_"`` anchor that follows the timestamp at a guessed fixed offset from the line start
(the comm/pid/cpu/flags prefix has a fixed width; the offset is re-guessed where it moves), then
read each field as one little-endian 8-byte word per row (an overlapping uint64 view of the
buffer) and decode it with SWAR arithmetic on uint64 arrays: hex and decimal digits, byte-class
tests and literal compares, about a dozen gathers and a few dozen vector operations per chunk.
Every row is checked against the line structure; rows the fast path cannot prove correct go to a
per-line regex (slow path), which also produces the precise error for bad lines.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TraceError
from hintpipe.units import MAX_ORDER

from .events import COLUMNS, EVENT_NAMES, NAME_TO_TYPE, EventBatch, EventType
from .stream import iter_line_chunks_threaded

NL, SPACE = 10, 32
ANCHOR = b": mm_page_"

# ": <name>: page=" per event type, then a 16-character pointer and " pfn=0x".
_HEADS = {t: b": " + EVENT_NAMES[t].encode() + b": page=" for t in EventType}
_HEAD_LEN = np.array([len(_HEADS[t]) for t in EventType], np.int64)
PTR_W = 16  # hashed %p on 64-bit prints 16 characters

_PAD = 64  # zero bytes appended so fixed windows never run past the buffer

_LINE_RE = re.compile(
    rb"^(?P<task>.*?)-(?P<pid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[(?P<cpu>\d+)\]\s+(?:\S+\s+)?"
    rb"(?P<sec>\d+)\.(?P<frac>\d+):\s+(?P<event>\w+):\s*(?P<fields>.*?)\s*$"
)
_LOST_RE = re.compile(rb"^\s*CPU:\s*\d+\s+\[LOST\s+(\d+)\s+EVENTS\]\s*$")
_FIELD_RE = re.compile(rb"(\w+)=(\S+)")
_REQUIRED = {
    EventType.ALLOC: ("pfn", "order", "migratetype"),
    EventType.FREE: ("pfn", "order"),
    EventType.FREE_BATCHED: ("pfn", "order"),
    EventType.ALLOC_ZONE_LOCKED: ("pfn", "order", "migratetype", "percpu_refill"),
    EventType.PCPU_DRAIN: ("pfn", "order", "migratetype"),
}


@dataclass
class ParseStats:
    """What a parse saw besides the events themselves."""

    lines: int = 0
    events: int = 0
    slow_lines: int = 0  # lines the vectorised path handed to the per-line regex
    skipped: dict[str, int] = field(default_factory=dict)  # code -> lines skipped (skip_bad)
    lost_events: int = 0  # sum of N over "[LOST N EVENTS]" lines (skip_bad only)


PRE = 40  # front padding: the timestamp and "[CPU]" lie at most this far before the anchor


def _le(lit: bytes) -> int:
    """Little-endian integer of up to 8 bytes (for comparing 8-byte fields in one operation)."""
    return int.from_bytes(lit.ljust(8, b"\0"), "little")


def _mask(n: int) -> int:
    return (1 << (8 * n)) - 1


def _rep(byte: int) -> np.uint64:
    return np.uint64(int.from_bytes(bytes([byte]) * 8, "little"))


_H = _rep(0x80)
_ONES = _rep(0x01)
_LOW = _rep(0x0F)
_ALLF = np.uint64(0xFFFFFFFFFFFFFFFF)
# Per event type, the word after ": mm_pag" ("e_alloc:", "e_free: ", ...): it names the event.
_HEAD_WORDS = np.zeros((len(EventType), 2), np.uint64)
for _t, _h in _HEADS.items():
    _HEAD_WORDS[_t, 1] = _le(_h[8:16])


def _byte_mask(nbytes: np.ndarray) -> np.ndarray:
    """uint64 with the low ``nbytes`` bytes set (0 <= nbytes <= 8), per row."""
    sh = (nbytes.astype(np.uint64) * np.uint64(8)) & np.uint64(63)
    return np.where(nbytes >= 8, _ALLF, (np.uint64(1) << sh) - np.uint64(1))


def _in_range(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """0x80 in each byte of x that lies in [lo, hi] (bytes must be < 0x80)."""
    return (x + _rep(0x80 - lo)) & ~(x + _rep(0x7F - hi)) & _H


def _is_hex(x: np.ndarray) -> np.ndarray:
    return (_in_range(x, 0x30, 0x39) | _in_range(x, 0x61, 0x66)) & ~(x & _H)


def _is_dec(x: np.ndarray) -> np.ndarray:
    return _in_range(x, 0x30, 0x39) & ~(x & _H)


def _first_byte(flags: np.ndarray) -> np.ndarray:
    """Index (0..8) of the lowest byte whose 0x80 bit is set in ``flags`` (8 if none)."""
    low = flags & (~flags + np.uint64(1))  # lowest set bit
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return (np.bitwise_count(low - np.uint64(1)) // 8).astype(np.int64)
    # numpy 1.26: a power of two converts to float exactly, log2 gives its bit index
    bit = np.log2(np.maximum(low, np.uint64(1)).astype(np.float64)).astype(np.int64)
    return np.where(low == 0, 8, bit // 8)


def _hex8(x: np.ndarray) -> np.ndarray:
    """Value of 8 hex digits held in a little-endian word (first digit most significant)."""
    v = (x & _LOW) + np.uint64(9) * ((x >> np.uint64(6)) & _ONES)
    v = ((v << np.uint64(4)) + (v >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    v = ((v << np.uint64(8)) + (v >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    return ((v << np.uint64(16)) + (v >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


def _dec8(x: np.ndarray) -> np.ndarray:
    """Value of 8 decimal digits held in a little-endian word (non-digit bytes pre-zeroed to '0')."""
    v = x & _LOW
    v = (v * np.uint64(10) + (v >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    v = (v * np.uint64(100) + (v >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    return (v * np.uint64(10000) + (v >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


def _fast_rows(buf: np.ndarray, a: np.ndarray, line_end: np.ndarray):
    """Decode rows whose timestamp colon is at ``a`` (``buf`` is padded PRE bytes in front).

    Fields are read as 8-byte words at per-row offsets and decoded with SWAR arithmetic (hex and
    decimal digits, byte classes) on uint64 arrays: a few dozen vector operations per chunk in
    total, not per byte. Each row is validated byte by byte; rows with rare shapes (two-digit
    order, negative migratetype, another flags width, seconds >= 1e8, ...) come back
    ``ok=False`` for the slow path. Returns (columns, ok mask).
    """
    u = np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))
    n = len(a)
    # Event type from the 8 bytes after ": mm_pag", then the ": page=" that must end the head
    # of that type (together they pin the event name).
    x1 = u[a + 8]
    et = np.full(n, 255, np.uint8)
    for t in EventType:
        et[x1 == np.uint64(_HEAD_WORDS[t, 1])] = t
    ok = et != 255
    eti = np.where(ok, et, 0)
    # (": mm_pag" itself was verified when the anchor was found.)
    p = a + _HEAD_LEN[eti]  # pointer
    ok &= (u[p - 8] >> np.uint64(8)) == np.uint64(_le(b": page="))
    ok &= (u[p + PTR_W] & np.uint64(_mask(7))) == np.uint64(_le(b" pfn=0x"))
    # pfn: 1..16 lowercase hex digits, then a space.
    q = p + PTR_W + 7
    w1, w2 = u[q], u[q + 8]
    h1 = _is_hex(w1)
    k1 = _first_byte(~h1 & _H)
    long = k1 >= 8
    if long.any():
        h2 = _is_hex(w2)
        k = np.where(long, 8 + _first_byte(~h2 & _H), k1)
    else:
        k = k1
    ok &= (k >= 1) & (k <= 16)
    kk = np.clip(k, 1, 16)
    lo_n = np.minimum(kk, 8)
    pfn = _hex8(w1 & _byte_mask(lo_n)) >> (np.uint64(4) * (8 - lo_n).astype(np.uint64))
    if long.any():
        n2 = np.maximum(kk - 8, 0)
        lo = _hex8(w2 & _byte_mask(n2)) >> (np.uint64(4) * (8 - n2).astype(np.uint64))
        pfn = np.where(kk > 8, (pfn << (np.uint64(4) * n2.astype(np.uint64))) | lo, pfn)
    r = q + kk
    # " order=D" is exactly one word; then the rest depends on the event type.
    wo = u[r]
    ok &= (wo & np.uint64(_mask(7))) == np.uint64(_le(b" order="))
    order = (wo >> np.uint64(56)).astype(np.int64) - 48
    ok &= (order >= 0) & (order <= 9)  # two-digit order 10 fails the next checks: slow path
    e = r + 8
    has_mt = (et == EventType.ALLOC) | (et == EventType.ALLOC_ZONE_LOCKED) | (et == EventType.PCPU_DRAIN)
    wm = u[e + 6]  # "tetype=D" of " migratetype=D"
    mt = (wm >> np.uint64(56)).astype(np.int64) - 48
    mt_ok = ((wm & np.uint64(_mask(7))) == np.uint64(_le(b"tetype="))) & (buf[e] == SPACE) & (mt >= 0) & (mt <= 9)
    ok &= np.where(has_mt, mt_ok, e == line_end)
    e2 = e + 14
    is_zl = et == EventType.ALLOC_ZONE_LOCKED
    is_al = et == EventType.ALLOC
    # One word per row for the tail: "refill=D" of " percpu_refill=D", "_flags=" of " gfp_flags=".
    wt2 = u[e2 + np.where(is_zl, 8, 4)]
    refill = (wt2 >> np.uint64(56)).astype(np.int64) - 48
    zl_ok = ((wt2 & np.uint64(_mask(7))) == np.uint64(_le(b"refill="))) & (refill >= 0) & (refill <= 1) & (e2 + 16 == line_end)
    al_ok = ((wt2 & np.uint64(_mask(7))) == np.uint64(_le(b"_flags="))) & (line_end > e2 + 11)
    ok &= np.where(is_zl, zl_ok, np.where(is_al, al_ok, np.where(et == EventType.PCPU_DRAIN, e2 == line_end, True)))
    # Timestamp: word at a-8 is "S.UUUUUU" (last second digit, '.', 6 usec digits).
    wt = u[a - 8]
    ok &= ((wt >> np.uint64(8)) & np.uint64(0xFF)) == np.uint64(ord("."))
    usec_w = wt & ~np.uint64(0xFFFF) | np.uint64(0x3030)
    ok &= (_is_dec(usec_w) == _H)
    usec = _dec8(usec_w).astype(np.int64)
    # Seconds: the run of digits ending at a-8 (word at a-15 holds its last 8 bytes).
    ws = u[a - 15]
    nd_mask = ~_is_dec(ws) & _H  # non-digit bytes
    # highest non-digit byte: digits are the bytes above it
    top = np.where(nd_mask == 0, -1, np.floor(np.log2(np.maximum(nd_mask, 1).astype(np.float64))).astype(np.int64) // 8)
    nd = 7 - top
    ok &= (nd >= 1) & (nd <= 7)
    keep = ~_byte_mask(np.clip(top + 1, 0, 8))  # keep bytes above the last non-digit
    sec = _dec8((ws & keep) | (_rep(0x30) & ~keep)).astype(np.int64)
    # CPU: "[NNN] FLAGS " before the %5lu seconds field (5 flag characters on 6.x kernels).
    br = a - 15 - np.maximum(nd, 5)
    wc = u[br - 4]
    ok &= ((wc & np.uint64(0xFF)) == np.uint64(ord("["))) & (((wc >> np.uint64(32)) & np.uint64(0xFF)) == np.uint64(ord("]")))
    cpu_w = (wc & np.uint64(0xFFFFFF00)) | np.uint64(0x3030303000000030) | (np.uint64(0x30) << np.uint64(32))
    ok &= _is_dec(cpu_w) == _H
    cpu = _dec8(cpu_w).astype(np.int64) // 10000
    cols = {
        "ts_ns": sec * 1_000_000_000 + usec * 1000,
        "etype": et,
        "pfn": pfn,
        "order": order.astype(np.uint8),
        "migratetype": np.where(has_mt, mt, -1).astype(np.int8),
        "percpu_refill": np.where(is_zl, refill, 0).astype(np.uint8),
        "cpu": cpu.astype(np.uint16),
    }
    return cols, ok


def _slow_line(line: bytes, path: str, lineno: int):
    """Parse one line with a regex; returns a row tuple, ``("lost", n)`` or raises TraceError."""
    m_lost = _LOST_RE.match(line)
    if m_lost:
        return ("lost", int(m_lost.group(1)))
    m = _LINE_RE.match(line)
    if not m:
        raise TraceError("malformed", f"not a tracefs event line: {line[:120]!r}", path, lineno)
    name = m.group("event").decode("ascii", "replace")
    if name not in NAME_TO_TYPE:
        raise TraceError("unknown-event", f"unknown event {name!r} (expected one of the 5 kmem page events)", path, lineno)
    et = NAME_TO_TYPE[name]
    fields = dict(_FIELD_RE.findall(m.group("fields")))
    try:
        for req in _REQUIRED[et]:
            if req.encode() not in fields:
                raise ValueError(f"field {req} missing")
        pfn = int(fields[b"pfn"], 16)
        order = int(fields[b"order"])
        if not 0 <= order <= MAX_ORDER or not 0 <= pfn < 1 << 63:
            raise ValueError("order or pfn out of range")
        mt = int(fields[b"migratetype"]) if et in (0, 3, 4) else -1
        refill = int(fields[b"percpu_refill"]) if et == 3 else 0
        if refill not in (0, 1) or not -128 <= mt <= 127:
            raise ValueError("percpu_refill or migratetype out of range")
        frac = m.group("frac")
        ts_ns = int(m.group("sec")) * 1_000_000_000 + int(frac.ljust(9, b"0")[:9])
        cpu = int(m.group("cpu"))
    except ValueError as e:
        raise TraceError("malformed", f"bad {name} line ({e}): {line[:120]!r}", path, lineno) from None
    return (ts_ns, int(et), pfn, order, mt, refill, cpu)


def _find_anchors(chunk: bytes, starts: np.ndarray, ends: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """Timestamp-colon position per line, or -1 where the line has no ``": mm_page_"``.

    Guesses a common offset from the line start and verifies it with a vectorised compare; lines
    that miss get a new guess from their own ``bytes.find`` (normally a handful per chunk).
    """
    n = len(starts)
    anchors = np.full(n, -1, np.int64)
    pending = np.arange(n)
    u = np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))
    lit8 = np.uint64(int.from_bytes(ANCHOR[:8], "little"))
    while len(pending):
        i = pending[0]
        a0 = chunk.find(ANCHOR, int(starts[i]), int(ends[i]))
        if a0 < 0:
            pending = pending[1:]
            continue
        cand = starts[pending] + (a0 - starts[i])
        cand_ok = (cand + len(ANCHOR) <= ends[pending]) & (u[cand] == lit8)
        anchors[pending[cand_ok]] = cand[cand_ok]
        anchors[i] = a0
        pending = pending[~cand_ok & (pending != i)]
    return anchors


def prepare_chunk(chunk: bytes) -> tuple:
    """Padded byte buffer, newline positions, line starts and timestamp anchors of a chunk
    (computed ahead, in the reader thread, while the previous chunk is decoded)."""
    # PRE bytes of front padding and _PAD at the back keep every fixed window inside the buffer.
    buf = np.frombuffer(bytes(PRE) + chunk + b"\n" * (not chunk.endswith(b"\n")) + bytes(_PAD), np.uint8)
    nl = np.flatnonzero(buf[PRE:len(buf) - _PAD] == NL) + PRE
    starts = np.concatenate(([PRE], nl[:-1] + 1))
    anchors = _find_anchors(chunk, starts - PRE, nl - PRE, buf[PRE:])
    anchors[anchors >= 0] += PRE
    return chunk, buf, nl, starts, anchors


def parse_chunk(chunk: bytes, path: str = "<trace>", first_line: int = 1, skip_bad: bool = False,
                stats: ParseStats | None = None, page_count: int | None = None,
                prepared: tuple | None = None) -> EventBatch:
    """Parse a chunk of whole lines into an EventBatch (see module doc).

    ``first_line`` is the 1-based line number of the chunk's first line (for error messages).
    With ``page_count``, a block reaching beyond it raises ``pfn-range``. ``prepared`` is
    :func:`prepare_chunk`'s result when it was computed ahead.
    """
    stats = stats if stats is not None else ParseStats()
    chunk, buf, nl, starts, anchors = prepared if prepared is not None else prepare_chunk(chunk)
    # Blank lines (e.g. a trailing one) carry nothing; they are not counted as events.
    nonblank = nl > starts
    n_lines = len(nl)
    stats.lines += n_lines
    has = (anchors >= 0) & nonblank
    rows = np.flatnonzero(has)
    cols, ok = _fast_rows(buf, anchors[rows], nl[rows])
    if len(rows) == n_lines and ok.all():  # the common case: every line took the fast path
        batch = EventBatch(**{k: cols[k].astype(dt, copy=False) for k, dt in COLUMNS.items()})
        batch = _check_range(batch, page_count, path, first_line, None, skip_bad, stats)
        stats.events += len(batch)
        return batch
    good = np.zeros(n_lines, bool)
    good[rows[ok]] = True
    out = {k: np.zeros(n_lines, dt) for k, dt in COLUMNS.items()}
    for k, dt in COLUMNS.items():
        out[k][rows[ok]] = cols[k][ok].astype(dt, copy=False)
    slow = np.flatnonzero(~good & nonblank)
    stats.slow_lines += len(slow)
    for i in slow:
        line = chunk[starts[i] - PRE:nl[i] - PRE]
        lineno = first_line + int(i)
        try:
            row = _slow_line(line, path, lineno)
        except TraceError as e:
            if not skip_bad:
                raise
            stats.skipped[e.code] = stats.skipped.get(e.code, 0) + 1
            continue
        if row[0] == "lost":
            if not skip_bad:
                raise TraceError("lost-events", f"the kernel lost {row[1]} events here; a replay would drift "
                                 "(re-record with a bigger buffer_size_kb, or pass skip_bad)", path, lineno)
            stats.lost_events += row[1]
            stats.skipped["lost-events"] = stats.skipped.get("lost-events", 0) + 1
            continue
        for k, v in zip(COLUMNS, row):
            out[k][i] = v
        good[i] = True
    batch = EventBatch(**out) if good.all() else EventBatch(**{k: v[good] for k, v in out.items()})
    batch = _check_range(batch, page_count, path, first_line, good, skip_bad, stats)
    stats.events += len(batch)
    return batch


def _check_range(batch: EventBatch, page_count: int | None, path: str, first_line: int, good,
                 skip_bad: bool, stats: ParseStats) -> EventBatch:
    """Raise ``pfn-range`` for the first block reaching past the snapshot (line number exact),
    or with ``skip_bad`` drop such events and count them (they lie outside the model)."""
    if page_count is None or not len(batch):
        return batch
    outside = batch.outside(page_count)
    bad = np.flatnonzero(outside)
    if len(bad) and skip_bad:
        stats.skipped["pfn-range"] = stats.skipped.get("pfn-range", 0) + len(bad)
        return batch.take(~outside)
    if len(bad):
        row = int(bad[0]) if good is None else int(np.flatnonzero(good)[bad[0]])
        raise TraceError("pfn-range", f"pfn {int(batch.pfn[bad[0]]):#x} order {int(batch.order[bad[0]])} lies "
                         f"beyond the snapshot ({page_count} pages)", path, first_line + row)
    return batch


PARSE_WORKERS = min(2, os.cpu_count() or 1)
"""Chunks parsed at once: the field decoder is numpy on arrays of ~50 k rows, which releases the
GIL, so a second core nearly doubles the parse rate (more would wait on decompression)."""


def iter_tracefs(path: str | Path, chunk_size: int = 4 << 20, skip_bad: bool = False,
                 stats: ParseStats | None = None, page_count: int | None = None,
                 workers: int | None = None) -> Iterator[EventBatch]:
    """Stream a tracefs kmem text file (zstd, gzip or plain) as EventBatches of ~chunk_size bytes
    of text each, in order. Decompression and line finding run one chunk ahead in a helper
    thread; ``workers`` chunks (default :data:`PARSE_WORKERS`) are parsed at once in a thread
    pool. Memory is bounded by a few chunks. The first bad line in file order raises."""
    stats = stats if stats is not None else ParseStats()
    spath = str(path)
    workers = PARSE_WORKERS if workers is None else max(1, workers)
    prepared = iter_line_chunks_threaded(path, chunk_size, depth=workers + 1, prepare=prepare_chunk)
    if workers == 1:
        line = 1
        for prep in prepared:
            before = stats.lines
            yield parse_chunk(prep[0], spath, line, skip_bad, stats, page_count, prepared=prep)
            line += stats.lines - before
    else:
        yield from _parse_in_pool(prepared, spath, skip_bad, stats, page_count, workers)
    if skip_bad and stats.skipped:
        warnings.warn(f"{spath}: skipped {sum(stats.skipped.values())} bad lines {stats.skipped}"
                      + (f", {stats.lost_events} events lost by the kernel" if stats.lost_events else ""),
                      stacklevel=2)


def _parse_in_pool(prepared: Iterator[tuple], spath: str, skip_bad: bool, stats: ParseStats,
                   page_count: int | None, workers: int) -> Iterator[EventBatch]:
    """Parse prepared chunks ``workers`` at a time; yield their batches in file order."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def one(prep: tuple, first_line: int) -> tuple[EventBatch, ParseStats]:
        st = ParseStats()
        return parse_chunk(prep[0], spath, first_line, skip_bad, st, page_count, prepared=prep), st

    pending: deque = deque()
    line = 1
    with ThreadPoolExecutor(workers, thread_name_prefix="hintpipe-parse") as pool:
        try:
            for prep in prepared:
                pending.append(pool.submit(one, prep, line))
                line += len(prep[2])  # the chunk's lines (newline positions)
                while len(pending) > workers:
                    yield _merged(pending.popleft().result(), stats)
            while pending:
                yield _merged(pending.popleft().result(), stats)
        finally:
            for f in pending:
                f.cancel()


def _merged(result: tuple[EventBatch, ParseStats], stats: ParseStats) -> EventBatch:
    batch, st = result
    stats.lines += st.lines
    stats.events += st.events
    stats.slow_lines += st.slow_lines
    stats.lost_events += st.lost_events
    for k, v in st.skipped.items():
        stats.skipped[k] = stats.skipped.get(k, 0) + v
    return batch


def parse_tracefs(path: str | Path, **kw) -> EventBatch:
    """Parse a whole file into one EventBatch (convenience for tests and small traces)."""
    return EventBatch.concat(list(iter_tracefs(path, **kw)))
