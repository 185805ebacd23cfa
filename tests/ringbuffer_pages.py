"""Build ring-buffer pages as the kernel writes them, from parsed format descriptions (tests only).

The writer side of kernel/trace/ring_buffer.c in miniature: a record is a 32-bit header
(type_len:5, time_delta:27) followed by its words; every offset comes from the parsed header_page
and event formats, none is written here by hand.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hintpipe.trace.ringbuffer import EventFormat, EventHeader, PageLayout


def payload(fmt: EventFormat, pid: int = 1, **values) -> bytes:
    """The record payload of ``fmt`` with its fields set (common_type from the format's id)."""
    size = fmt.payload_size
    size += -size % 4
    buf = bytearray(size)
    vals = {"common_type": fmt.id, "common_pid": pid, **values}
    for name, v in vals.items():
        f = fmt.fields[name]
        buf[f.offset:f.offset + f.size] = (v & ((1 << (8 * f.size)) - 1)).to_bytes(f.size, "little")
    return bytes(buf)


@dataclass
class Rec:
    """One record: kind "data", "big" (type_len 0), "pad" (discarded, with length), "null"
    (padding to the end of the page), "ext" (time extend), "abs" (absolute stamp), "raw" bytes."""

    kind: str
    delta: int = 0
    data: bytes = b""
    value: int = 0  # ext: the full delta; abs: the absolute stamp (59 bits); pad: payload bytes


def encode(rec: Rec, h: EventHeader) -> bytes:
    """The bytes of one record."""
    def hdr(tl: int, td: int) -> bytes:
        assert 0 <= td < 1 << 27
        return struct.pack("<I", tl | (td << 5))
    if rec.kind == "data":
        assert len(rec.data) % 4 == 0 and 0 < len(rec.data) <= 4 * h.data_max
        return hdr(len(rec.data) // 4, rec.delta) + rec.data
    if rec.kind == "big":
        return hdr(0, rec.delta) + struct.pack("<I", len(rec.data) + 4) + rec.data
    if rec.kind == "pad":
        return hdr(h.padding, rec.delta or 1) + struct.pack("<I", rec.value + 4) + bytes(rec.value)
    if rec.kind == "null":
        return hdr(h.padding, 0)
    if rec.kind == "ext":
        return hdr(h.time_extend, rec.value & ((1 << 27) - 1)) + struct.pack("<I", rec.value >> 27)
    if rec.kind == "abs":
        return hdr(h.time_stamp, rec.value & ((1 << 27) - 1)) + struct.pack("<I", (rec.value >> 27) & 0xFFFFFFFF)
    if rec.kind == "raw":
        return rec.data
    raise ValueError(rec.kind)


def page(layout: PageLayout, h: EventHeader, ts: int, recs: list[Rec], missed: bool = False,
         missed_count: int | None = None, commit: int | None = None) -> bytes:
    """One page: header (time stamp, commit word with flags) then the records, zero-filled."""
    data = b"".join(encode(r, h) for r in recs)
    assert len(data) <= layout.data_size
    size = len(data) if commit is None else commit
    flags = 0
    if missed:
        flags |= 1 << 31
        if missed_count is not None:
            flags |= 1 << 30
            data += struct.pack("<Q", missed_count)
    buf = bytearray(layout.page_size)
    buf[layout.ts_offset:layout.ts_offset + 8] = struct.pack("<Q", ts)
    buf[layout.commit_offset:layout.commit_offset + layout.commit_size] = \
        (size | flags).to_bytes(layout.commit_size, "little")
    buf[layout.data_offset:layout.data_offset + len(data)] = data
    return bytes(buf)
