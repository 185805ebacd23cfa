"""Real guest memory in paired processes (``hintpipe guest|host --memory real``).

The guest's RAM is a sealed memfd holding real page bytes (:class:`~hintpipe.linux.memfd.GuestRam`
patterns); the control page, free mask and stats stay in the :class:`~hintpipe.paired.region.SharedRegion`
as in simulated mode. Who does what (normative text: ``protocols/wire-v1.md`` section 11.5):

* The *guest* resolves ``--wp`` (``auto`` = the best backend its kernel offers), creates the RAM
  memfd and, for ``uffd``/``uffd-async``, the userfaultfd, and registers its own mapping in
  MODE_WP (a uffd is bound to the mm of the process that created it, so only the guest can).
* Right after connecting, before anything else on the socket (before ``Hello`` on ``unix:``,
  before the shm setup message on ``shm:``, whose control socket is also a unix socket), the guest
  sends one *RAM handoff* message: 8 bytes :data:`HANDOFF_MAGIC` + the 40-byte
  :class:`RamHandoff`, carrying ``[ram memfd]`` or ``[ram memfd, uffd]``
  with SCM_RIGHTS. Then it closes its own uffd copy: if the host dies, the last reference goes with
  it, the kernel unregisters the range and no guest writer stays blocked.
* The *host* validates everything (the pid must be the socket peer's, the memfd must be sealed
  against shrinking and large enough, the uffd must be a userfaultfd), checks the guest's backend
  against its own ``--wp`` (``auto`` accepts the guest's choice, anything else must match) and
  builds the backend (:func:`~hintpipe.wp.make_backend`).

``tcp:`` cannot carry file descriptors, so ``--memory real`` is refused there.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import struct
from dataclasses import dataclass

import numpy as np
import trio

from hintpipe.host.pagestate import HostPageState
from hintpipe.linux.backing import backing_unit
from hintpipe.linux.fdpass import peer_pid, received_fds, scm_rights
from hintpipe.linux.memfd import WORDS_PER_PAGE, GuestRam, sealed_memfd
from hintpipe.linux.userfaultfd import Userfaultfd, is_userfaultfd, register_wp
from hintpipe.protocol.errors import ErrorCode, ProtocolError
from hintpipe.units import MAX_PAGE_COUNT, PAGE_SIZE
from hintpipe.wp import REAL_BACKENDS, make_backend, resolve_backend
from hintpipe.wp.base import WpBackend

__all__ = ["HANDOFF_MAGIC", "HANDOFF_SIZE", "RamHandoff", "RealMemoryError", "GuestRealRam",
           "send_handoff", "ReceivedRam", "receive_handoff", "check_backend", "HostRealMemory",
           "TCP_REFUSAL"]

_HANDOFF = struct.Struct("<QQQ16s")


@dataclass(frozen=True)
class RamHandoff:
    """The data that rides with the guest's ``[memfd, uffd]`` fds over SCM_RIGHTS.

    ``addr``: the guest's virtual address of its RAM mapping (uffd ranges and PAGEMAP_SCAN
    addresses are in the guest's address space); ``pid``: the guest process (for
    ``/proc/PID/pagemap``); ``page_count``; ``backend``: the resolved ``--wp`` the uffd was
    created for ("uffd" or "uffd-async"; "sim"/"off" send only the memfd).
    """

    addr: int
    pid: int
    page_count: int
    backend: str

    def to_bytes(self) -> bytes:
        """Fixed 40-byte little-endian encoding."""
        return _HANDOFF.pack(self.addr, self.pid, self.page_count, self.backend.encode())

    @classmethod
    def from_bytes(cls, data: bytes) -> "RamHandoff":
        """Decode and check untrusted bytes from the guest; ProtocolError(BAD_FIELD) if wrong."""
        if len(data) != _HANDOFF.size:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"RAM handoff is {len(data)} bytes, expected {_HANDOFF.size}")
        addr, pid, pages, raw = _HANDOFF.unpack(data)
        try:
            backend = raw.rstrip(b"\0").decode("ascii")
        except UnicodeDecodeError:
            backend = "?"
        if backend not in ("sim", "off") + REAL_BACKENDS:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"RAM handoff names unknown backend {backend!r}")
        if addr == 0 or addr % PAGE_SIZE or not 0 < pages <= MAX_PAGE_COUNT or not 0 < pid < 1 << 31:
            raise ProtocolError(ErrorCode.BAD_FIELD, "RAM handoff has a bad address, page count or pid")
        return cls(addr, pid, pages, backend)


HANDOFF_MAGIC = b"HPRAM\x00\x01\x00"
"""First 8 bytes of the RAM handoff message ("HPRAM", NUL, version 1, NUL)."""
HANDOFF_SIZE = len(HANDOFF_MAGIC) + _HANDOFF.size
"""Bytes of the RAM handoff message (48)."""
MAX_HANDOFF_FDS = 2
TCP_REFUSAL = ("--memory real shares guest RAM by passing file descriptors, which tcp cannot carry: "
               "use a unix: or shm: address")


class RealMemoryError(Exception):
    """The guest's real-memory handoff is unusable or does not match this host (one sentence)."""


# ---- guest side ---------------------------------------------------------------------------


class GuestRealRam:
    """Guest side: the RAM memfd (touched), its uffd registration and the handoff to send.

    ``wp`` is the user's ``--wp``; it is resolved here (raises
    :class:`~hintpipe.linux.userfaultfd.UffdUnavailable` for a named backend this kernel lacks).
    """

    def __init__(self, page_count: int, wp: str, backing: str = "shmem") -> None:
        self.page_count = page_count
        self.backend = resolve_backend(wp, "real")
        fd = sealed_memfd(page_count * PAGE_SIZE, "hintpipe-guest-ram", backing=backing)
        try:
            self.ram = GuestRam(page_count, fd=fd, backing=backing)  # dups: the mapping keeps its own fd
        finally:
            os.close(fd)
        self.uffd: Userfaultfd | None = None
        try:
            self.ram.touch()  # first touch is slow: pay it before the migration, not inside
            if self.backend in REAL_BACKENDS:
                self.uffd = register_wp(self.ram.addr, self.ram.size, self.backend)
        except BaseException:
            self.close()
            raise

    def handoff(self) -> bytes:
        """The 48-byte handoff message (magic + RamHandoff)."""
        return HANDOFF_MAGIC + RamHandoff(self.ram.addr, os.getpid(), self.page_count, self.backend).to_bytes()

    def fds(self) -> list[int]:
        """``[memfd]`` or ``[memfd, uffd]``, in that order."""
        return [self.ram.fd] + ([self.uffd.fd] if self.uffd is not None else [])

    def release_uffd(self) -> None:
        """Close this process's uffd copy once the host has one (see the module docstring)."""
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None

    def close(self) -> None:
        """Close the uffd copy and unmap the RAM (idempotent)."""
        self.release_uffd()
        self.ram.close()


async def send_handoff(sock: trio.socket.SocketType, real: GuestRealRam) -> None:
    """Send the RAM handoff message with its fds on a freshly connected unix socket."""
    data = real.handoff()
    n = await sock.sendmsg([data], [scm_rights(real.fds())])
    if n < len(data):  # the fds rode on the first part; the rest is plain bytes
        await sock.send(data[n:])  # pragma: no cover - 48 bytes on a fresh unix socket


# ---- host side ----------------------------------------------------------------------------


@dataclass
class ReceivedRam:
    """What the host received: the validated handoff and the fds it now owns."""

    info: RamHandoff
    memfd: int
    uffd_fd: int | None

    def close(self) -> None:
        """Close the received fds (idempotent)."""
        for name in ("memfd", "uffd_fd"):
            fd = getattr(self, name)
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)


def _check_memfd(fd: int, page_count: int) -> None:
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise RealMemoryError("guest RAM fd is not a sealable memfd") from None
    if not stat.S_ISREG(st.st_mode) or not seals & fcntl.F_SEAL_SHRINK:
        raise RealMemoryError("guest RAM memfd is not sealed with F_SEAL_SHRINK")
    if st.st_size < page_count * PAGE_SIZE:
        raise RealMemoryError(f"guest RAM memfd holds {st.st_size} bytes, {page_count} pages need "
                              f"{page_count * PAGE_SIZE}")


async def receive_handoff(sock: trio.socket.SocketType, timeout_s: float = 10.0) -> ReceivedRam:
    """Host: read and validate the guest's RAM handoff (the first message on the socket).

    Raises :class:`RealMemoryError` with one sentence; no fd is left open on failure.
    """
    fds: list[int] = []
    try:
        with trio.fail_after(timeout_s):
            data, anc, flags, _ = await sock.recvmsg(HANDOFF_SIZE, socket.CMSG_SPACE(4 * (MAX_HANDOFF_FDS + 1)))
            fds.extend(received_fds(anc))
            # a short read: the rest carries no fds; stop at once if it cannot be a handoff (a
            # --memory sim guest's Hello may be shorter than 48 bytes and wait for an answer)
            while data and len(data) < HANDOFF_SIZE and data[:8] == HANDOFF_MAGIC[:len(data[:8])]:
                more = await sock.recv(HANDOFF_SIZE - len(data))
                if not more:
                    break
                data += more
    except trio.TooSlowError:
        raise RealMemoryError("no RAM handoff from the guest within the handshake timeout "
                              "(start the guest with --memory real)") from None
    except OSError as e:
        raise RealMemoryError(f"reading the RAM handoff failed: {e}") from None
    try:
        if len(data) < HANDOFF_SIZE or not data.startswith(HANDOFF_MAGIC):
            raise RealMemoryError("the guest sent no RAM handoff: this host runs --memory real, "
                                  "start the guest with --memory real too")
        if flags & socket.MSG_CTRUNC or len(fds) > MAX_HANDOFF_FDS:
            raise RealMemoryError(f"the RAM handoff carries more than {MAX_HANDOFF_FDS} file descriptors")
        try:
            info = RamHandoff.from_bytes(data[len(HANDOFF_MAGIC):])
        except ProtocolError as e:
            raise RealMemoryError(e.message) from None
        want = 2 if info.backend in REAL_BACKENDS else 1
        if len(fds) != want:
            raise RealMemoryError(f"a --wp {info.backend} RAM handoff must carry {want} file "
                                  f"descriptor(s), got {len(fds)}")
        peer = peer_pid(sock)
        if peer is not None and peer != info.pid:
            raise RealMemoryError(f"the RAM handoff names pid {info.pid} but the peer is pid {peer}")
        _check_memfd(fds[0], info.page_count)
        if want == 2 and not is_userfaultfd(fds[1]):
            raise RealMemoryError("the RAM handoff's second fd is not a userfaultfd")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return ReceivedRam(info, fds[0], fds[1] if want == 2 else None)


def check_backend(host_wp: str, guest_backend: str) -> None:
    """Refuse a guest whose backend differs from an explicit host ``--wp`` (``auto`` accepts any)."""
    if host_wp != "auto" and host_wp != guest_backend:
        raise RealMemoryError(f"the guest tracks writes with --wp {guest_backend} but this host was "
                              f"started with --wp {host_wp}")


class HostRealMemory:
    """Host side of one real-memory guest: its RAM mapping, the destination and the WP backend.

    ``backend`` is None for ``sim`` (faults travel over the link with the protect bytes, exactly
    as in simulated memory mode; only the page contents are real), else a
    :class:`~hintpipe.wp.base.WpBackend` built from the received uffd.

    No round barrier with a real backend: the barrier exists so that a guest writer's user-space
    "is it protected?" check and its store never straddle the host's page-state swap. With uffd
    the check is the kernel's, atomic with the store. ``uffd``: :meth:`UffdSyncTracker.new_round`
    swaps the page state and re-protects under the handler's ``lock``, and the handler marks
    a fault before it lifts the protection under the same lock, so every write is recorded in
    exactly one round, before it lands; a write to a page still unprotected from the previous round
    (between swap and re-protect) is to a page already in this round's send set, sent afterwards.
    ``uffd-async``: the full scan before each swap puts every write before it into a send set
    still to come (the argument is in :mod:`hintpipe.wp`). Pausing still uses the control page
    (:class:`~hintpipe.paired.barrier.HostControl`), so the final round's scan sees every write.
    A guest stuck in the kernel on a protected page never blocks the host's trio loop: the sync
    handler is its own thread, and a barrier would only have to wait for it, not the reverse.
    """

    def __init__(self, rx: ReceivedRam, state: HostPageState, *, scan_before_send: bool = True) -> None:
        n = state.page_count
        if rx.info.page_count != n:
            raise RealMemoryError(f"the RAM handoff says {rx.info.page_count} pages, Hello says {n}")
        if not scan_before_send and rx.info.backend != "uffd-async":
            raise RealMemoryError(f"this host breaks the scan-before-send guard, which only --wp uffd-async "
                                  f"has; the guest uses --wp {rx.info.backend}")
        self.info = rx.info
        self.page_count = n
        self.ram = GuestRam(n, fd=rx.memfd)  # our own mapping: reads never fault (its backing: the fd's)
        self.backend: WpBackend | None = None
        try:
            self.dest = np.empty((n, WORDS_PER_PAGE), dtype=np.uint64)
            self.dest.fill(0)  # touched now: the first round must not pay first-touch faults
            if rx.info.backend != "sim":
                self.backend = make_backend(rx.info.backend, state, ram_addr=rx.info.addr,
                                            page_count=n, uffd_fd=rx.uffd_fd, pid=rx.info.pid,
                                            scan_before_send=scan_before_send,
                                            unit_pages=backing_unit(self.ram.backing))
        except BaseException:
            self.ram.close()
            raise

    @property
    def name(self) -> str:
        """The backend in use (``sim``, ``off``, ``uffd``, ``uffd-async``)."""
        return self.info.backend

    def read_source(self, idx: np.ndarray) -> np.ndarray:
        """Source bytes of pages ``idx`` as (len(idx), 512) words, through the host's mapping."""
        return self.ram.words[idx]

    def start_round(self, index: int) -> None:
        """The backend's round start; an OS error (guest gone, bad range) becomes RealMemoryError."""
        try:
            self.backend.start_round(index)
        except (OSError, RuntimeError) as e:
            raise RealMemoryError(f"write-protecting guest RAM failed: {e}") from None

    async def before_chunk(self, start: int, stop: int) -> None:
        """The backend's chunk scan; an OS error (the guest exited) becomes RealMemoryError."""
        try:
            await self.backend.before_chunk(start, stop)
        except OSError as e:
            raise RealMemoryError(f"scanning guest RAM failed: {e}") from None

    def stats(self) -> dict:
        """The backend's ``wp`` figures (``sim``: none here, the caller has them)."""
        return self.backend.stats() if self.backend is not None else {"backend": "sim"}

    def stop(self) -> dict:
        """Stop the backend (sync: lifts all protection, so no guest writer stays blocked) and
        return its final :meth:`stats`; idempotent."""
        st = self.stats()
        if self.backend is not None:
            try:
                self.backend.close()
            except Exception:
                pass  # the guest may be gone; nothing is left to release
            self.backend = None
        return st

    def close(self) -> None:
        """:meth:`stop`, then drop the destination and unmap guest RAM."""
        self.stop()
        self.dest = None
        self.ram.close()
