"""TCP: guest memory streamed to the host (the host cannot map a remote memfd).

On ``tcp:`` both directions are records (:mod:`hintpipe.channel.records`). Type 0 carries the
v1 byte stream; the others, defined here, keep a host-side *mirror* of the guest's region (same
layout as :mod:`hintpipe.paired.region`) in step:

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
region (see :mod:`hintpipe.paired.barrier`): at every barrier and at pause the host's mirror holds
every write that happened before, which is all the migration needs (later writes are faulted
and resent). The guest clears its own protect bits after each FaultDone.
"""

from __future__ import annotations

import struct

from typing import Callable

import numpy as np

from hintpipe.channel.records import record
from hintpipe.paired.region import (
    OFF_BARRIER_ACK,
    OFF_BARRIER_DONE,
    OFF_BARRIER_REQ,
    OFF_PAUSE_ACK,
    OFF_PAUSE_REQ,
    STATS_MAX,
    STATS_OFFSET,
    SharedRegion,
)
from hintpipe.protocol import MAX_PAGE_COUNT, ErrorCode, ProtocolError

__all__ = ["INIT", "VERSIONS_RANGE", "VERSIONS", "FREE", "WORD", "STATS", "PROTECT_ALL",
           "MAX_MIRROR_PAGES", "MirroredRegion", "MirrorReceiver"]

INIT, VERSIONS_RANGE, VERSIONS, FREE, WORD, STATS, PROTECT_ALL = range(1, 8)
MAX_MIRROR_PAGES = 1 << 26
"""Largest guest (256 GiB) a host mirrors over tcp: bounds what an INIT record can make it map."""
CHUNK_PAGES = 1 << 17  # VERSIONS/VERSIONS_RANGE pages per record (<= 1 MiB of payload)
HOST_WORDS = (OFF_BARRIER_REQ, OFF_BARRIER_DONE, OFF_PAUSE_REQ)
GUEST_WORDS = (OFF_BARRIER_ACK, OFF_PAUSE_ACK)


def _bad(msg: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED_FRAME, f"memory record: {msg}")


def _drop(data: bytes) -> None:
    """Where records go before a link exists."""


class MirroredRegion(SharedRegion):
    """A region whose changes are streamed to the peer via ``send`` (a sync enqueue of records).

    Make one with :meth:`mirror`; ``role`` is the side this copy belongs to (``guest`` or
    ``host``), which decides the records it sends and the ones it accepts.
    """

    def __init__(self, fd: int, page_count: int, *, owner: bool, role: str = "guest",
                 send: Callable[[bytes], None] = _drop) -> None:
        super().__init__(fd, page_count, owner=owner)
        self.role = role
        self._send = send
        self._dirty: list[np.ndarray] = []

    @classmethod
    def mirror(cls, page_count: int, *, role: str,
               send: Callable[[bytes], None] = _drop) -> "MirroredRegion":
        """A new zeroed region of ``page_count`` pages for ``role``, sending records to ``send``."""
        return cls.create(page_count, name=f"hintpipe-mirror-{role}", role=role, send=send)

    # guest side
    def note_written(self, pfns) -> None:
        """Guest: remember pages about to be written, to send their versions at the next flush."""
        if self.role == "guest":
            self._dirty.append(np.asarray(pfns, dtype=np.int64))

    def start_sync(self, send: Callable[[bytes], None]) -> None:
        """Guest: mirror this region over ``send`` from now on, starting with all of it (INIT,
        every version, the free mask; before Hello). Writes noted before are covered by it."""
        self._send = send
        self._dirty.clear()
        self.initial_sync()

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
        """Guest: publish the stats snapshot and send it (STATS)."""
        super().write_stats(stats)
        n = int.from_bytes(self._mm[STATS_OFFSET:STATS_OFFSET + 4], "little")
        self._send(record(STATS, bytes(self._mm[STATS_OFFSET + 4:STATS_OFFSET + 4 + n])))

    # both sides
    def set_word(self, off: int, value: int) -> None:
        """Write one of this side's control words and send it (WORD); a guest first flushes its
        writes, so every ack carries the writes made before it."""
        if self.role == "guest":
            self.flush()  # every ack carries the writes before it
        super().set_word(off, value)
        self._send(record(WORD, struct.pack("<II", off, value & 0xFFFFFFFF)))

    def protect_all(self) -> None:
        """Host: protect every page and tell the guest (PROTECT_ALL)."""
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

    def on_record(self, rtype: int, body: bytes) -> None:
        """A record from the peer (the :class:`~hintpipe.channel.records.RecordHandler` hook)."""
        if rtype == INIT:
            raise _bad("INIT twice")
        self.apply(rtype, body)


class MirrorReceiver:
    """Host side of a tcp guest's memory: the mirror its first record (INIT) creates, then
    every later record applied to it; records toward the guest go to ``send``.

    ``admit(page_count)`` runs on INIT before the mirror is made: the host's guest-size limit
    and memory budget (it raises ProtocolError, UNSUPPORTED, to refuse the guest), so an INIT
    can never make the host allocate what a Hello would be refused for (wire-v1 11.6.1).
    """

    def __init__(self, send: Callable[[bytes], None], admit: Callable[[int], None] | None = None) -> None:
        self.region: MirroredRegion | None = None
        self._send = send
        self._admit = admit

    def on_record(self, rtype: int, body: bytes) -> None:
        """Create the mirror from INIT, or apply a record to it (bad ones raise ProtocolError)."""
        if self.region is not None:
            self.region.on_record(rtype, body)
            return
        if rtype != INIT or len(body) != 8:
            raise _bad("the guest's first record must be INIT")
        (pages,) = struct.unpack("<Q", body)
        if pages < 1:
            raise _bad(f"INIT page_count {pages} out of range")
        if pages > min(MAX_PAGE_COUNT, MAX_MIRROR_PAGES):
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"a guest of {pages} pages is above the largest this host "
                                                       f"mirrors over tcp ({MAX_MIRROR_PAGES} pages)")
        if self._admit is not None:
            self._admit(pages)
        self.region = MirroredRegion.mirror(pages, role="host", send=self._send)
