"""TCP: guest memory streamed to the host (the host cannot map a remote memfd).

On ``tcp:`` the byte stream is a sequence of *records* ``[type u8][length u32 LE][payload]``.
Type 0 records carry the v1 byte stream unchanged (any split); the others keep a host-side
*mirror* of the guest's region (same layout as :mod:`hintpipe.proc.region`) in step:

=====  ==============  =====  =================================================================
type   name            dir    payload
=====  ==============  =====  =================================================================
0      V1              both   bytes of the v1 frame stream
1      INIT            G->H   u64 page_count (first record of the guest, exactly once)
2      VERSIONS_RANGE  G->H   u64 start_pfn, then u32 versions of pages start.. (<= 1 MiB)
3      VERSIONS        G->H   u32 n, n x u64 pfn, n x u32 version
4      FREE            G->H   the free mask, one bit per page (numpy packbits, big bit order)
5      WORD            both   u32 offset, u32 value: a control word (only the sender's own)
6      STATS           G->H   UTF-8 JSON, <= 4092 bytes (the region's stats page)
7      PROTECT_ALL     H->G   empty: set every protect bit
=====  ==============  =====  =================================================================

Records are applied in order, so the guest's "flush dirty versions + free mask, then WORD ack"
and the host's "PROTECT_ALL, then WORD barrier_done" keep the barrier semantics of the shared
region (see :mod:`hintpipe.proc.control`): at every barrier and at pause the host's mirror holds
every write that happened before, which is all the migration needs (later writes are faulted
and resent). The guest clears its own protect bits after each FaultDone.
"""

from __future__ import annotations

import struct

import numpy as np
import trio

from hintpipe.proc.region import (
    OFF_BARRIER_ACK,
    OFF_BARRIER_DONE,
    OFF_BARRIER_REQ,
    OFF_PAUSE_ACK,
    OFF_PAUSE_REQ,
    STATS_MAX,
    STATS_OFFSET,
    SharedRegion,
)
from hintpipe.protocol import MAX_FRAME_PAYLOAD, MAX_PAGE_COUNT, ErrorCode, ProtocolError

V1, INIT, VERSIONS_RANGE, VERSIONS, FREE, WORD, STATS, PROTECT_ALL = range(8)
REC = struct.Struct("<BI")
MAX_RECORD = MAX_FRAME_PAYLOAD + 64
"""Largest record payload accepted (checked on the header, before buffering)."""
MAX_MIRROR_PAGES = 1 << 26
"""Largest guest (256 GiB) a host mirrors over tcp: bounds what an INIT record can make it map."""
CHUNK_PAGES = 1 << 17  # VERSIONS/VERSIONS_RANGE pages per record (<= 1 MiB of payload)
HOST_WORDS = (OFF_BARRIER_REQ, OFF_BARRIER_DONE, OFF_PAUSE_REQ)
GUEST_WORDS = (OFF_BARRIER_ACK, OFF_PAUSE_ACK)


def record(rtype: int, payload: bytes = b"") -> bytes:
    """One record's bytes."""
    return REC.pack(rtype, len(payload)) + payload


def _bad(msg: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED_FRAME, f"memory record: {msg}")


class MirroredRegion(SharedRegion):
    """A region whose changes are streamed to the peer via ``send`` (a sync enqueue of bytes)."""

    def __init__(self, page_count: int, *, role: str, send) -> None:
        base = SharedRegion.create(page_count, name=f"hintpipe-mirror-{role}")
        self.__dict__.update(base.__dict__)
        self.role = role
        self._send = send
        self._dirty: list[np.ndarray] = []

    # guest side
    def note_written(self, pfns) -> None:
        if self.role == "guest":
            self._dirty.append(np.asarray(pfns, dtype=np.int64))

    def initial_sync(self) -> None:
        """Guest: INIT, all versions, the free mask (before Hello)."""
        self._send(record(INIT, struct.pack("<Q", self.page_count)))
        for a in range(0, self.page_count, CHUNK_PAGES):
            vals = self.versions[a:a + CHUNK_PAGES]
            self._send(record(VERSIONS_RANGE, struct.pack("<Q", a) + vals.astype("<u4").tobytes()))
        self._sync_free()

    def _sync_free(self) -> None:
        self._send(record(FREE, np.packbits(self.free.view(np.uint8)).tobytes()))

    def flush(self) -> None:
        """Guest: send the versions of every page written since the last flush, and the free mask."""
        if self._dirty:
            pfns = np.unique(np.concatenate(self._dirty))
            self._dirty.clear()
            for i in range(0, len(pfns), CHUNK_PAGES):
                part = pfns[i:i + CHUNK_PAGES]
                body = struct.pack("<I", len(part)) + part.astype("<u8").tobytes() + self.versions[part].astype("<u4").tobytes()
                self._send(record(VERSIONS, body))
        self._sync_free()

    def write_stats(self, stats: dict) -> None:
        super().write_stats(stats)
        n = int.from_bytes(self._mm[STATS_OFFSET:STATS_OFFSET + 4], "little")
        self._send(record(STATS, bytes(self._mm[STATS_OFFSET + 4:STATS_OFFSET + 4 + n])))

    # both sides
    def set_word(self, off: int, value: int) -> None:
        if self.role == "guest":
            self.flush()  # every ack carries the writes before it
        super().set_word(off, value)
        self._send(record(WORD, struct.pack("<II", off, value & 0xFFFFFFFF)))

    def protect_all(self) -> None:
        super().protect_all()
        self._send(record(PROTECT_ALL))

    # receiving
    def apply(self, rtype: int, body: bytes) -> None:
        """Apply one peer record (validated; bad ones raise ProtocolError)."""
        n = self.page_count
        if rtype == WORD:
            if len(body) != 8:
                raise _bad("WORD must be 8 bytes")
            off, value = struct.unpack("<II", body)
            if off not in (GUEST_WORDS if self.role == "host" else HOST_WORDS):
                raise _bad(f"WORD at offset {off} is not the peer's to write")
            SharedRegion.set_word(self, off, value)
        elif self.role == "guest":
            if rtype != PROTECT_ALL or body:
                raise _bad(f"record type {rtype} is never sent to a guest")
            SharedRegion.protect_all(self)
        elif rtype == VERSIONS_RANGE:
            if len(body) < 8 or (len(body) - 8) % 4:
                raise _bad("VERSIONS_RANGE length")
            (start,) = struct.unpack_from("<Q", body)
            vals = np.frombuffer(body, dtype="<u4", offset=8)
            if start > n or len(vals) > n - start:
                raise _bad("VERSIONS_RANGE outside the guest")
            self.versions[start:start + len(vals)] = vals
        elif rtype == VERSIONS:
            if len(body) < 4:
                raise _bad("VERSIONS length")
            (cnt,) = struct.unpack_from("<I", body)
            if len(body) != 4 + 12 * cnt:
                raise _bad("VERSIONS length")
            pfns = np.frombuffer(body, dtype="<u8", count=cnt, offset=4)
            vals = np.frombuffer(body, dtype="<u4", count=cnt, offset=4 + 8 * cnt)
            if cnt and int(pfns.max()) >= n:
                raise _bad("VERSIONS pfn outside the guest")
            self.versions[pfns.astype(np.int64)] = vals
        elif rtype == FREE:
            if len(body) != (n + 7) // 8:
                raise _bad("FREE length")
            self.free.view(np.uint8)[:] = np.unpackbits(np.frombuffer(body, dtype=np.uint8), count=n)
        elif rtype == STATS:
            if len(body) > STATS_MAX:
                raise _bad("STATS too long")
            self._mm[STATS_OFFSET + 4:STATS_OFFSET + 4 + len(body)] = body
            self._mm[STATS_OFFSET:STATS_OFFSET + 4] = len(body).to_bytes(4, "little")
        else:
            raise _bad(f"record type {rtype} is never sent to a host")


class RecordEndpoint:
    """Frame endpoint over a stream endpoint that speaks the record layer (tcp).

    The host side creates its mirror when the guest's INIT arrives (``region``); the guest side
    is given its mirror. ``receive`` applies memory records and returns the v1 bytes.
    """

    def __init__(self, stream, *, role: str, region: MirroredRegion | None = None) -> None:
        self.stream = stream
        self.role = role
        self.region = region
        self._buf = bytearray()
        self.stats = stream.stats

    def send_nowait(self, data: bytes) -> None:
        """Enqueue raw record bytes (memory records: bounded by the guest size)."""
        self.stream.queue_nowait(data)

    async def send_frame(self, frame: bytes) -> None:
        await self.stream.send_frame(record(V1, frame))

    async def receive(self) -> bytes:
        while True:
            out = self._parse()
            if out:
                await trio.lowlevel.checkpoint()
                return out
            data = await self.stream.receive()
            if not data:
                if self._buf:
                    raise _bad("stream ended inside a record")
                return b""
            self._buf += data

    def _parse(self) -> bytes:
        out = bytearray()
        pos = 0
        buf = self._buf
        while len(buf) - pos >= REC.size:
            rtype, length = REC.unpack_from(buf, pos)
            if length > MAX_RECORD:
                raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"memory record of {length} bytes")
            if len(buf) - pos - REC.size < length:
                break
            body = bytes(buf[pos + REC.size:pos + REC.size + length])
            pos += REC.size + length
            if rtype == V1:
                out += body
            elif self.role == "host" and self.region is None:
                if rtype != INIT or len(body) != 8:
                    raise _bad("the guest's first record must be INIT")
                (pages,) = struct.unpack("<Q", body)
                if not 1 <= pages <= min(MAX_PAGE_COUNT, MAX_MIRROR_PAGES):
                    raise _bad(f"INIT page_count {pages} out of range")
                self.region = MirroredRegion(pages, role="host", send=self.send_nowait)
            elif rtype == INIT:
                raise _bad("INIT twice")
            else:
                self.region.apply(rtype, body)
        del buf[:pos]
        return bytes(out)

    def take_fds(self) -> list[int]:
        """No fds on tcp."""
        return []

    async def aclose(self) -> None:
        await self.stream.aclose()
