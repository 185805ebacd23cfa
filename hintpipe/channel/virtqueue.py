"""A VIRTIO 1.x split virtqueue, sans-I/O, over any writable buffer.

The ring lives in a buffer laid out exactly as the VIRTIO spec lays a split virtqueue (descriptor
table, available ring, used ring, free-running 16-bit indices), so the same code drives an
in-process queue (a ``bytearray``) and a shared-memory queue between two processes (an ``mmap``).
One descriptor carries one wire-protocol frame. The *driver* adds buffers and kicks; the *device*
pops them, returns them on the used ring and interrupts. With ``event_idx`` each side publishes the
index at which it next wants to be notified and the other side notifies only when its own index
crosses it (``vring_need_event``), which is what suppresses most kicks and interrupts under load.

Layout (all little-endian, offsets from the start of the ring area, N = queue size)::

    0                 descriptor table  N x {addr u64, len u32, flags u16, next u16}
    16N               available ring    flags u16, idx u16, ring[N] u16, used_event u16
    align4(18N + 6)   used ring         flags u16, idx u16, ring[N] {id u32, len u32}, avail_event u16

Payload bytes live outside the ring, in a :class:`BufferPool` (a Python dict in-process, fixed
slots after the ring in shared memory); ``addr`` is the slot's offset in that pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hintpipe.units import align_up

DESC_SIZE = 16
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768


class QueueFull(Exception):
    """The driver has no free descriptor: wait for the device to return used buffers."""


class VirtqueueError(Exception):
    """The peer wrote an impossible ring state (a bad descriptor id, length or index jump)."""


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """VIRTIO's notification test: did the index move from ``old`` to ``new`` cross ``event``?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass(frozen=True)
class RingLayout:
    """Byte offsets of the three parts of a split ring of ``size`` entries."""

    size: int
    desc: int = field(init=False)
    avail: int = field(init=False)
    used: int = field(init=False)
    total: int = field(init=False)

    def __post_init__(self) -> None:
        n = self.size
        if n < 1 or n > MAX_QUEUE_SIZE or n & (n - 1):
            raise ValueError(f"queue size must be a power of two in 1..{MAX_QUEUE_SIZE}, got {n}")
        object.__setattr__(self, "desc", 0)
        object.__setattr__(self, "avail", DESC_SIZE * n)
        used = align_up(DESC_SIZE * n + 6 + 2 * n, 4)
        object.__setattr__(self, "used", used)
        object.__setattr__(self, "total", used + 6 + 8 * n)


class BufferPool:
    """Payload storage addressed by descriptor ``addr``: in-process, a dict of bytes objects."""

    slot_size = 1 << 30

    def __init__(self) -> None:
        self._data: dict[int, bytes] = {}

    def addr_of(self, desc_id: int) -> int:
        """The ``addr`` a descriptor with this id points at."""
        return desc_id

    def put(self, desc_id: int, data: bytes) -> None:
        """Store ``data`` in the slot of ``desc_id``."""
        self._data[desc_id] = bytes(data)

    def get(self, addr: int, length: int) -> bytes:
        """Read ``length`` bytes at ``addr`` (raises VirtqueueError for an address it never gave)."""
        try:
            data = self._data.pop(addr)
        except KeyError:
            raise VirtqueueError(f"descriptor addr {addr} does not point at a posted buffer") from None
        if len(data) != length:
            raise VirtqueueError(f"descriptor len {length} != posted {len(data)}")
        return data


class SlotPool(BufferPool):
    """Payload storage in fixed-size slots of a shared buffer (shared-memory transport)."""

    def __init__(self, buf: memoryview, offset: int, nslots: int, slot_size: int) -> None:
        self._buf = buf
        self._offset = offset
        self._nslots = nslots
        self.slot_size = slot_size

    def addr_of(self, desc_id: int) -> int:
        """The byte offset of slot ``desc_id`` in the shared buffer."""
        return desc_id * self.slot_size

    def put(self, desc_id: int, data: bytes) -> None:
        """Copy ``data`` into slot ``desc_id`` (at most one slot)."""
        if len(data) > self.slot_size:
            raise ValueError(f"frame of {len(data)} bytes exceeds slot size {self.slot_size}")
        start = self._offset + self.addr_of(desc_id)
        self._buf[start : start + len(data)] = data

    def get(self, addr: int, length: int) -> bytes:
        """Read ``length`` bytes of the slot at ``addr`` (VirtqueueError unless a whole slot's start)."""
        if addr % self.slot_size or addr // self.slot_size >= self._nslots or length > self.slot_size:
            raise VirtqueueError(f"descriptor (addr={addr}, len={length}) is outside the slots")
        start = self._offset + addr
        return bytes(self._buf[start : start + length])


@dataclass
class NotifyStats:
    """Notification counters: kicks (driver to device) and interrupts (device to driver)."""

    kicks: int = 0
    kicks_suppressed: int = 0
    interrupts: int = 0
    interrupts_suppressed: int = 0


class SplitVirtqueue:
    """Both halves of one split virtqueue over ``buf``; a process uses the half of its role.

    ``buf`` must hold ``RingLayout(size).total`` bytes at ``offset`` and start zeroed. Indices are
    free-running u16 kept in the shared ring; each side also keeps its private ``last_*`` index.
    """

    def __init__(
        self,
        size: int = 256,
        *,
        buf: memoryview | bytearray | None = None,
        offset: int = 0,
        pool: BufferPool | None = None,
        event_idx: bool = True,
    ) -> None:
        self.layout = RingLayout(size)
        self.size = size
        if buf is None:
            buf = bytearray(self.layout.total)
        mv = memoryview(buf)
        lay = self.layout
        self._desc = np.frombuffer(
            mv,
            dtype=np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")]),
            count=size,
            offset=offset + lay.desc,
        )
        self._avail = np.frombuffer(mv, dtype="<u2", count=size + 3, offset=offset + lay.avail)
        self._used_hdr = np.frombuffer(mv, dtype="<u2", count=2, offset=offset + lay.used)
        self._used_ring = np.frombuffer(
            mv, dtype=np.dtype([("id", "<u4"), ("len", "<u4")]), count=size, offset=offset + lay.used + 4
        )
        self._avail_event = np.frombuffer(mv, dtype="<u2", count=1, offset=offset + lay.used + 4 + 8 * size)
        self.pool = pool if pool is not None else BufferPool()
        self.event_idx = event_idx
        self.stats = NotifyStats()
        # driver-private state
        self._free_ids = list(range(size - 1, -1, -1))
        self._in_flight = np.zeros(size, dtype=bool)  # a used id must be one we posted
        self._last_used = 0
        # device-private state
        self._last_avail = 0

    # ---- driver side -------------------------------------------------------------------
    @property
    def free_descriptors(self) -> int:
        """Descriptors the driver can still post before it must reclaim used ones."""
        return len(self._free_ids)

    def add(self, data: bytes) -> bool:
        """Post one buffer; return True when the device must be kicked.

        Raises :class:`QueueFull` when every descriptor is in flight (the backpressure).
        """
        if not self._free_ids:
            raise QueueFull
        desc_id = self._free_ids.pop()
        self.pool.put(desc_id, data)
        self._in_flight[desc_id] = True
        d = self._desc[desc_id]
        d["addr"] = self.pool.addr_of(desc_id)
        d["len"] = len(data)
        d["flags"] = 0
        d["next"] = 0
        old = int(self._avail[1])
        new = (old + 1) & 0xFFFF
        self._avail[2 + old % self.size] = desc_id
        self._avail[1] = new  # publishing the index last is the release barrier (x86 TSO)
        if self.event_idx:
            kick = vring_need_event(int(self._avail_event[0]), new, old)
        else:
            kick = not (int(self._used_hdr[0]) & VRING_USED_F_NO_NOTIFY)
        if kick:
            self.stats.kicks += 1
        else:
            self.stats.kicks_suppressed += 1
        return kick

    def reclaim(self) -> int:
        """Take back the descriptors the device has used; return how many."""
        used_idx = int(self._used_hdr[1])
        n = (used_idx - self._last_used) & 0xFFFF
        if n > self.size - len(self._free_ids):
            raise VirtqueueError(f"used index jumped by {n} with only {self.size - len(self._free_ids)} in flight")
        for i in range(n):
            desc_id = int(self._used_ring[(self._last_used + i) % self.size]["id"])
            if desc_id >= self.size or not self._in_flight[desc_id]:
                # a duplicate would let us reuse a descriptor the device still holds
                raise VirtqueueError(f"used ring returned descriptor id {desc_id}, which is not in flight")
            self._in_flight[desc_id] = False
            self._free_ids.append(desc_id)
        self._last_used = used_idx
        # ask for an interrupt when the device uses the next one
        self._avail[2 + self.size] = used_idx
        return n

    # ---- device side -------------------------------------------------------------------
    def avail_pending(self) -> bool:
        """Whether the driver has posted buffers the device has not popped yet."""
        return int(self._avail[1]) != self._last_avail

    def pop(self) -> tuple[int, bytes] | None:
        """Take the next posted buffer as ``(descriptor id, payload)``, or None if there is none."""
        avail_idx = int(self._avail[1])
        pending = (avail_idx - self._last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(f"available index jumped by {pending} > queue size {self.size}")
        desc_id = int(self._avail[2 + self._last_avail % self.size])
        if desc_id >= self.size:
            raise VirtqueueError(f"available ring names descriptor {desc_id} >= {self.size}")
        d = self._desc[desc_id]
        data = self.pool.get(int(d["addr"]), int(d["len"]))
        self._last_avail = (self._last_avail + 1) & 0xFFFF
        return desc_id, data

    def push_used(self, desc_id: int, length: int = 0) -> bool:
        """Return a buffer to the driver; return True when the driver must be interrupted."""
        old = int(self._used_hdr[1])
        new = (old + 1) & 0xFFFF
        e = self._used_ring[old % self.size]
        e["id"] = desc_id
        e["len"] = length
        self._used_hdr[1] = new
        if self.event_idx:
            irq = vring_need_event(int(self._avail[2 + self.size]), new, old)
        else:
            irq = not (int(self._avail[0]) & VRING_AVAIL_F_NO_INTERRUPT)
        if irq:
            self.stats.interrupts += 1
        else:
            self.stats.interrupts_suppressed += 1
        return irq

    def enable_kicks(self) -> None:
        """Device is about to sleep: ask to be kicked when the driver posts the next buffer."""
        self._avail_event[0] = self._last_avail
