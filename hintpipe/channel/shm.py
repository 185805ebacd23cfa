"""Shared-memory transport (``shm:NAME``): two VIRTIO split virtqueues in a sealed memfd.

Setup runs over a unix *control socket* (the rendezvous the address names): the guest creates
the ring memfd and four eventfds and sends them, with its RAM memfd, in one SCM_RIGHTS message;
the host validates everything, maps the ring and answers. Afterwards every v1 frame travels
through the rings; the control socket only carries liveness (its end of stream = the peer died).

Queue A carries guest->host frames (the guest is its driver, as a balloon driver drives the
hinting queue); queue B carries host->guest frames (the host is its driver). A frame longer than a
slot is split over consecutive descriptors, each full but the last; the receiver treats the
descriptor payloads as one byte stream (the sans-I/O connections reassemble frames). Doorbells:
``a_kick`` (guest -> host: buffers in A), ``a_irq`` (host -> guest: A buffers used), ``b_kick``
(host -> guest: buffers in B), ``b_irq`` (guest -> host: B buffers used), each an eventfd awaited
with ``trio.lowlevel.wait_readable``. With EVENT_IDX the notifications are suppressed as the
VIRTIO spec says; kicks and interrupts are counted either way.

Everything the peer writes into the ring is validated by :class:`SplitVirtqueue` (indices,
descriptor ids, addresses, lengths); a violation surfaces as a ``ProtocolError``
(MALFORMED_FRAME) from ``receive`` or a ``BrokenResourceError`` from ``send_frame``, so the
session answers with an Error frame and closes. Layout: ``protocols/wire-v1.md`` section 11.3.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import stat
import struct
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import trio

from hintpipe.channel.virtqueue import QueueFull, RingLayout, SlotPool, SplitVirtqueue, VirtqueueError
from hintpipe.linux.fdpass import anon_inode_name, received_fds, scm_rights
from hintpipe.linux.memfd import sealed_memfd
from hintpipe.protocol import ErrorCode, ProtocolError
from hintpipe.units import align_up

SETUP_MAGIC = b"HPSHM001"
SETUP_OK = b"HPSHMOK\0"
SETUP_ERR = b"HPSHMERR"
SETUP = struct.Struct("<8sIIII")  # magic, version, queue_size, slot_size, flags
RING_MAGIC = b"HPRING01"
FLAG_EVENT_IDX = 1
HEADER_SIZE = 4096
OFF_GUEST_CLOSED = 24  # u32 written by the guest: 1 = it closed queue A for sending
OFF_HOST_CLOSED = 28  # u32 written by the host: 1 = it closed queue B for sending
DEFAULT_SLOT = 128 * 1024
MAX_SLOT = 2 * 1024 * 1024
MAX_QUEUE = 4096
NFDS = 6  # ring, a_kick, a_irq, b_kick, b_irq, guest RAM
LIVENESS_POLL_S = 0.05
RECEIVE_MAX = 1 << 20
SHIELD_S = 5.0


class ShmSetupError(Exception):
    """The shm setup message was refused (the text says why)."""


def ring_layout(size: int, slot: int) -> dict:
    """Byte offsets of the ring memfd parts for ``size`` descriptors of ``slot`` bytes."""
    ring = RingLayout(size).total
    a_ring = HEADER_SIZE
    a_slots = a_ring + align_up(ring)
    b_ring = a_slots + align_up(size * slot)
    b_slots = b_ring + align_up(ring)
    return {"a_ring": a_ring, "a_slots": a_slots, "b_ring": b_ring, "b_slots": b_slots,
            "total": b_slots + align_up(size * slot)}


class ShmEndpoint:
    """One side of a shm link (``send_frame``/``receive``/``aclose``), guest or host role."""

    def __init__(self, *, role: str, ring_fd: int, size: int, slot: int, event_idx: bool,
                 efds: dict[str, int], control: trio.socket.SocketType, extra_fds: list[int]) -> None:
        lay = ring_layout(size, slot)
        self.role = role
        self.size, self.slot, self.event_idx = size, slot, event_idx
        self._ring_fd = ring_fd
        self._mm = mmap.mmap(ring_fd, lay["total"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mv = memoryview(self._mm)
        qa = SplitVirtqueue(size, buf=mv, offset=lay["a_ring"], event_idx=event_idx,
                            pool=SlotPool(mv, lay["a_slots"], size, slot))
        qb = SplitVirtqueue(size, buf=mv, offset=lay["b_ring"], event_idx=event_idx,
                            pool=SlotPool(mv, lay["b_slots"], size, slot))
        self._efds = efds
        if role == "guest":
            self._tx, self._rx = qa, qb
            self._tx_kick, self._tx_wait = efds["a_kick"], efds["a_irq"]
            self._rx_irq, self._rx_wait = efds["b_irq"], efds["b_kick"]
            self._my_closed, self._peer_closed = OFF_GUEST_CLOSED, OFF_HOST_CLOSED
        else:
            self._tx, self._rx = qb, qa
            self._tx_kick, self._tx_wait = efds["b_kick"], efds["b_irq"]
            self._rx_irq, self._rx_wait = efds["a_irq"], efds["a_kick"]
            self._my_closed, self._peer_closed = OFF_HOST_CLOSED, OFF_GUEST_CLOSED
        self._control = control
        self._peek = socket.socket(fileno=os.dup(control.fileno()))
        self._peek.setblocking(False)
        self._extra_fds = list(extra_fds)
        self._held: list[int] = []
        self._closed = False
        self._broken: str | None = None
        self._send_lock = trio.Lock()
        self.wakeups = 0

    # -- helpers ---------------------------------------------------------------------------
    def _word(self, off: int) -> int:
        return int.from_bytes(self._mm[off:off + 4], "little")

    def _peer_gone(self) -> bool:
        if self._word(self._peer_closed):
            return True
        try:
            return self._peek.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    async def _wait(self, fd: int) -> None:
        with trio.move_on_after(LIVENESS_POLL_S):
            await trio.lowlevel.wait_readable(fd)
        try:
            os.eventfd_read(fd)
            self.wakeups += 1
        except BlockingIOError:
            pass

    @staticmethod
    def _ring(fd: int) -> None:
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            pass

    # -- sending (driver of the tx queue) ----------------------------------------------------
    async def send_frame(self, frame: bytes) -> None:
        """Post one frame (split over slots); wait while the queue is full."""
        async with self._send_lock:
            pieces = [frame[i:i + self.slot] for i in range(0, len(frame), self.slot)] or [b""]
            await self._post(pieces[0])
            if len(pieces) > 1:  # the frame has started: finish it, or the stream is corrupt
                with trio.move_on_after(SHIELD_S) as cs:
                    cs.shield = True
                    for piece in pieces[1:]:
                        await self._post(piece)
                if cs.cancelled_caught:
                    self._broken = "peer stopped consuming mid-frame"
                    raise trio.BrokenResourceError(self._broken)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _post(self, piece: bytes) -> None:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("shm endpoint closed")
            if self._broken is not None:
                raise trio.BrokenResourceError(self._broken)
            try:
                self._tx.reclaim()
                kick = self._tx.add(piece)
            except QueueFull:
                if self._peer_gone():
                    raise trio.BrokenResourceError("peer closed the shm link") from None
                await self._wait(self._tx_wait)
                continue
            except VirtqueueError as e:
                self._broken = f"peer corrupted the ring: {e}"
                raise trio.BrokenResourceError(self._broken) from None
            if kick:
                self._ring(self._tx_kick)
            return

    # -- receiving (device of the rx queue) --------------------------------------------------
    def _return_used(self) -> None:
        irq = False
        for desc in self._held:
            irq |= self._rx.push_used(desc)
        self._held.clear()
        if irq:
            self._ring(self._rx_irq)

    async def receive(self) -> bytes:
        """Bytes of the next descriptors (a byte stream of frames), ``b""`` once the peer closed."""
        if self._closed:
            raise trio.ClosedResourceError("shm endpoint closed")
        self._return_used()
        while True:
            chunks: list[bytes] = []
            total = 0
            try:
                while total < RECEIVE_MAX:
                    item = self._rx.pop()
                    if item is None and not chunks:
                        self._rx.enable_kicks()
                        item = self._rx.pop()  # posted between the pop and enabling kicks
                    if item is None:
                        break
                    self._held.append(item[0])
                    chunks.append(item[1])
                    total += len(item[1])
            except VirtqueueError as e:
                self._broken = f"peer corrupted the ring: {e}"
                raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"bad virtqueue state: {e}") from None
            if chunks:
                await trio.lowlevel.checkpoint()
                return b"".join(chunks)
            if self._peer_gone():
                if not self._rx.avail_pending():
                    return b""
                continue
            await self._wait(self._rx_wait)

    # -- closing ---------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Mark our direction closed, ring the peer, release the mapping and fds."""
        if self._closed:
            return
        self._closed = True
        try:
            self._return_used()
            self._mm[self._my_closed:self._my_closed + 4] = (1).to_bytes(4, "little")
            self._ring(self._tx_kick)
            self._ring(self._rx_irq)
        except (ValueError, VirtqueueError):
            pass
        self._peek.close()
        self._control.close()
        for fd in set(self._efds.values()):
            os.close(fd)
        for fd in self._extra_fds:
            os.close(fd)
        self._extra_fds = []
        self._tx = self._rx = None  # drop the numpy views before unmapping
        try:
            self._mm.close()
        except BufferError:
            pass
        os.close(self._ring_fd)
        await trio.lowlevel.checkpoint()

    def take_fds(self) -> list[int]:
        """Host: the guest RAM fd(s) that came with the setup (the caller owns them now)."""
        fds, self._extra_fds = self._extra_fds, []
        return fds

    def notify_stats(self) -> dict:
        """This side's notification counters (kicks it sent on its tx queue, interrupts it sent
        for its rx queue, and the suppressed ones)."""
        tx, rx = self._tx, self._rx
        if tx is None:
            return dict(self._final_stats) if hasattr(self, "_final_stats") else {}
        stats = {"kicks": tx.stats.kicks, "kicks_suppressed": tx.stats.kicks_suppressed,
                 "interrupts": rx.stats.interrupts, "interrupts_suppressed": rx.stats.interrupts_suppressed,
                 "wakeups": self.wakeups, "event_idx": int(self.event_idx)}
        self._final_stats = stats
        return stats


@asynccontextmanager
async def open_shm_guest(control: trio.socket.SocketType, ram_fds: list[int], *, size: int = 256,
                         slot: int = DEFAULT_SLOT,
                         event_idx: bool = True, timeout_s: float = 10.0) -> AsyncIterator[ShmEndpoint]:
    """Guest: create the ring and doorbells, send them (and ``ram_fds``) to the host, wait for OK."""
    lay = ring_layout(size, slot)
    ring_fd = sealed_memfd(lay["total"], "hintpipe-shm-ring")
    efds = {k: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for k in ("a_kick", "a_irq", "b_kick", "b_irq")}
    ep = None
    try:
        with mmap.mmap(ring_fd, HEADER_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as hdr:
            hdr[0:8] = RING_MAGIC
            hdr[8:24] = struct.pack("<IIII", 1, size, slot, FLAG_EVENT_IDX if event_idx else 0)
        fds = [ring_fd, efds["a_kick"], efds["a_irq"], efds["b_kick"], efds["b_irq"], *ram_fds]
        msg = SETUP.pack(SETUP_MAGIC, 1, size, slot, FLAG_EVENT_IDX if event_idx else 0)
        with trio.fail_after(timeout_s):
            await control.sendmsg([msg], [scm_rights(fds)])
            reply = await control.recv(4096)
        if reply[:8] != SETUP_OK:
            text = reply[8:].decode(errors="replace") if reply[:8] == SETUP_ERR else "no answer"
            raise ShmSetupError(f"host refused the shm link: {text}")
        ep = ShmEndpoint(role="guest", ring_fd=ring_fd, size=size, slot=slot, event_idx=event_idx,
                         efds=efds, control=control, extra_fds=[])
    except BaseException:
        for fd in (ring_fd, *efds.values()):
            os.close(fd)
        control.close()
        raise
    try:
        yield ep
    finally:
        ep.notify_stats()
        await ep.aclose()


async def _refuse(control: trio.socket.SocketType, fds: list[int], why: str) -> None:
    for fd in fds:
        os.close(fd)
    with trio.move_on_after(1):
        try:
            await control.send(SETUP_ERR + why.encode()[:1000])
        except OSError:
            pass
    control.close()
    raise ShmSetupError(why)


@asynccontextmanager
async def open_shm_host(control: trio.socket.SocketType, *, timeout_s: float = 10.0,
                        admit: Callable[[int], None] | None = None) -> AsyncIterator[ShmEndpoint]:
    """Host: receive and validate the guest's setup, map its ring, answer OK.

    ``admit(nbytes)`` is called with the size of the ring memfd the guest asks the host to map,
    before anything is mapped; it refuses the guest by raising :class:`ShmSetupError`.
    """
    try:
        with trio.fail_after(timeout_s):
            data, anc, flags, _ = await control.recvmsg(SETUP.size, socket.CMSG_SPACE(4 * (NFDS + 2)))
    except trio.TooSlowError:
        await _refuse(control, [], "no shm setup message within the handshake timeout")
    except OSError as e:
        await _refuse(control, [], f"control socket failed: {e}")
    fds = received_fds(anc)
    if flags & socket.MSG_CTRUNC or len(fds) != NFDS:
        await _refuse(control, fds, f"setup must carry exactly {NFDS} file descriptors, got {len(fds)}")
    if len(data) != SETUP.size:
        await _refuse(control, fds, "truncated setup message")
    magic, version, size, slot, flg = SETUP.unpack(data)
    if magic != SETUP_MAGIC or version != 1:
        await _refuse(control, fds, "bad setup magic/version")
    if not (1 <= size <= MAX_QUEUE and size & (size - 1) == 0):
        await _refuse(control, fds, f"queue size {size} is not a power of two in 1..{MAX_QUEUE}")
    if not (4096 <= slot <= MAX_SLOT and slot % 8 == 0):
        await _refuse(control, fds, f"slot size {slot} outside 4096..{MAX_SLOT} or not a multiple of 8")
    ring_fd, a_kick, a_irq, b_kick, b_irq, ram_fd = fds
    if not all(anon_inode_name(fd) == "eventfd" for fd in (a_kick, a_irq, b_kick, b_irq)):
        await _refuse(control, fds, "doorbell descriptors must be eventfds")
    try:
        seals = fcntl.fcntl(ring_fd, fcntl.F_GET_SEALS)
        st = os.fstat(ring_fd)
    except OSError:
        seals, st = 0, None
    lay = ring_layout(size, slot)
    if admit is not None:
        try:
            admit(lay["total"])
        except ShmSetupError as e:
            await _refuse(control, fds, str(e))
    if st is None or not stat.S_ISREG(st.st_mode) or not seals & fcntl.F_SEAL_SHRINK or st.st_size < lay["total"]:
        await _refuse(control, fds, "ring must be a memfd sealed with F_SEAL_SHRINK and large enough")
    with mmap.mmap(ring_fd, HEADER_SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as hdr:
        if hdr[0:8] != RING_MAGIC or struct.unpack("<IIII", hdr[8:24]) != (1, size, slot, flg):
            await _refuse(control, fds, "ring header disagrees with the setup message")
    for fd in (a_kick, a_irq, b_kick, b_irq):
        os.set_blocking(fd, False)
    ep = ShmEndpoint(role="host", ring_fd=ring_fd, size=size, slot=slot, event_idx=bool(flg & FLAG_EVENT_IDX),
                     efds={"a_kick": a_kick, "a_irq": a_irq, "b_kick": b_kick, "b_irq": b_irq},
                     control=control, extra_fds=[ram_fd])
    try:
        with trio.move_on_after(1):
            await control.send(SETUP_OK)
        yield ep
    finally:
        ep.notify_stats()
        await ep.aclose()
