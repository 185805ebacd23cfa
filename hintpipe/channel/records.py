"""The tcp transport's record layer: ``[type u8][length u32 LE][payload]`` in both directions.

Type 0 (:data:`V1`) records carry the v1 byte stream unchanged, split anywhere; every other type
is a *side record* that :class:`RecordEndpoint` hands, in stream order, to its
:class:`RecordHandler` (the guest-memory mirror of :mod:`hintpipe.paired.mirror` defines types
1-7; ``protocols/wire-v1.md`` section 11.2 is normative). A record's announced length is checked
on its 5 header bytes, before anything is buffered.
"""

from __future__ import annotations

import struct
from typing import Protocol

import trio

from hintpipe.channel.stream import StreamEndpoint, StreamStats
from hintpipe.protocol import MAX_FRAME_PAYLOAD, ErrorCode, ProtocolError

__all__ = ["V1", "REC", "MAX_RECORD", "record", "RecordHandler", "RecordEndpoint"]

V1 = 0
"""Record type of the v1 frame stream."""
REC = struct.Struct("<BI")
"""Record header: type, payload length."""
MAX_RECORD = MAX_FRAME_PAYLOAD + 64
"""Largest record payload accepted (checked on the header, before buffering)."""


def record(rtype: int, payload: bytes = b"") -> bytes:
    """One record's bytes."""
    return REC.pack(rtype, len(payload)) + payload


class RecordHandler(Protocol):
    """Receives the side records (every type but :data:`V1`) of one connection, in order."""

    def on_record(self, rtype: int, body: bytes) -> None:
        """Apply one record; a bad one raises :class:`~hintpipe.protocol.ProtocolError`."""


class RecordEndpoint:
    """Frame endpoint (``send_frame``/``receive``/``aclose``) over a stream speaking records.

    ``receive`` applies the side records that arrived, through ``handler``, and returns the v1
    bytes among them. Side records toward the peer go out with :meth:`send_nowait`.
    """

    def __init__(self, stream: StreamEndpoint, handler: RecordHandler) -> None:
        self.stream = stream
        self.handler = handler
        self._buf = bytearray()

    @property
    def stats(self) -> StreamStats:
        """The underlying stream's counters."""
        return self.stream.stats

    def send_nowait(self, data: bytes) -> None:
        """Enqueue whole records (side records: the caller bounds their volume)."""
        self.stream.queue_nowait(data)

    async def send_frame(self, frame: bytes) -> None:
        """Send one v1 frame in a :data:`V1` record."""
        await self.stream.send_frame(record(V1, frame))

    async def receive(self) -> bytes:
        """The v1 bytes of the next records that carry any, ``b""`` at end of stream."""
        while True:
            out = self._parse()
            if out:
                await trio.lowlevel.checkpoint()
                return out
            data = await self.stream.receive()
            if not data:
                if self._buf:
                    raise ProtocolError(ErrorCode.MALFORMED_FRAME, "memory record: stream ended inside a record")
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
            else:
                self.handler.on_record(rtype, body)
        del buf[:pos]
        return bytes(out)

    def take_fds(self) -> list[int]:
        """No fds on tcp."""
        return []

    async def aclose(self) -> None:
        """Close the underlying stream."""
        await self.stream.aclose()
