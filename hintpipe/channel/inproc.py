"""In-process transport: a pair of split virtqueues with trio doorbells.

Guest to host frames go through one virtqueue (the guest is its driver, as a balloon driver is the
driver of the hinting queue); host to guest frames go through a second one driven by the host, in
place of virtio's config space and interrupt. A full queue blocks the sender until the other side
returns used descriptors: that is the channel's backpressure. Kicks and interrupts are counted,
with EVENT_IDX suppression, on both queues.
"""

from __future__ import annotations

import trio

from hintpipe.channel.virtqueue import NotifyStats, QueueFull, SplitVirtqueue


class _Direction:
    """One virtqueue plus the two doorbells of its trio users."""

    def __init__(self, size: int, event_idx: bool) -> None:
        self.vq = SplitVirtqueue(size, event_idx=event_idx)
        self.kick = trio.Event()
        self.irq = trio.Event()
        self.closed = False
        self.unused_desc: int | None = None


class FrameEndpoint:
    """One side's view of the link: send frames on its queue, receive from the peer's.

    ``receive()`` returns one frame (one descriptor) and hands the previous descriptor back to the
    peer as used when it is called again, so a slow consumer holds the peer's descriptors.
    """

    def __init__(self, tx: _Direction, rx: _Direction) -> None:
        self._tx = tx
        self._rx = rx

    async def send_frame(self, frame: bytes) -> None:
        """Post one frame; wait while the queue is full."""
        tx = self._tx
        while True:
            if tx.closed:
                raise trio.ClosedResourceError("in-process channel closed")
            tx.vq.reclaim()
            try:
                if tx.vq.add(frame):
                    tx.kick.set()
                    tx.kick = trio.Event()
                break
            except QueueFull:
                await tx.irq.wait()  # the device replaces the event after setting it
        # posted: a cancellation now must not pretend the frame was not sent
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive(self) -> bytes:
        """Next frame from the peer, or ``b""`` once the peer closed and the queue is drained."""
        rx = self._rx
        self._return_used()
        while True:
            item = rx.vq.pop()
            if item is None:
                rx.vq.enable_kicks()
                item = rx.vq.pop()  # a buffer posted between the pop and enabling kicks
            if item is not None:
                rx.unused_desc = item[0]
                await trio.lowlevel.checkpoint()
                return item[1]
            if rx.closed:
                return b""
            await rx.kick.wait()

    def _return_used(self) -> None:
        rx = self._rx
        if rx.unused_desc is not None:
            if rx.vq.push_used(rx.unused_desc):
                rx.irq.set()
                rx.irq = trio.Event()
            rx.unused_desc = None

    async def aclose(self) -> None:
        """Close our sending direction: the peer reads EOF after draining."""
        self._return_used()
        for d in (self._tx, self._rx):
            d.closed = True
            d.kick.set()
            d.irq.set()
        await trio.lowlevel.checkpoint()

    @property
    def tx_stats(self) -> NotifyStats:
        """Kicks and interrupts of the queue this side drives."""
        return self._tx.vq.stats


def inproc_pair(size: int = 256, *, event_idx: bool = True) -> tuple[FrameEndpoint, FrameEndpoint]:
    """Return ``(guest_end, host_end)`` of a new in-process link with queues of ``size`` descriptors."""
    g2h = _Direction(size, event_idx)
    h2g = _Direction(size, event_idx)
    return FrameEndpoint(g2h, h2g), FrameEndpoint(h2g, g2h)
