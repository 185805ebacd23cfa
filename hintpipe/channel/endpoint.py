"""What every transport gives the protocol adapters: a frame endpoint.

:class:`Endpoint` is the shape the in-process virtqueue link
(:class:`~hintpipe.channel.inproc.FrameEndpoint`), unix and tcp streams
(:class:`~hintpipe.channel.stream.StreamEndpoint`), the shared-memory rings
(:class:`~hintpipe.channel.shm.ShmEndpoint`) and the tcp record layer
(:class:`~hintpipe.channel.records.RecordEndpoint`) all implement; the guest's producer and the
host's session are written against it. Endpoints that can carry file descriptors to the host
also implement :class:`FdEndpoint`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Endpoint", "FdEndpoint"]


@runtime_checkable
class Endpoint(Protocol):
    """One side of a link that moves whole v1 frames."""

    async def send_frame(self, frame: bytes) -> None:
        """Send (or queue) one frame; waits while the link is full (backpressure)."""

    async def receive(self) -> bytes:
        """The next bytes from the peer (one or more frames, or part of one on a stream);
        ``b""`` once the peer closed and everything was read."""

    async def aclose(self) -> None:
        """Close this side; the peer reads end of stream after what was already sent."""


@runtime_checkable
class FdEndpoint(Endpoint, Protocol):
    """An endpoint over which the guest hands file descriptors (its RAM memfd) to the host."""

    def take_fds(self) -> list[int]:
        """The fds received so far; the caller owns (and closes) them from now on."""
