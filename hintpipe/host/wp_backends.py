"""Write-protect backends as the migration engine sees them: one adapter per ``--wp`` choice.

Each backend is bound to one :class:`HostPageState` and gives the engine its hooks:

* ``start_round(index)``: start round ``index`` (0 = first): re-protect guest RAM and swap the
  page state's ``written``/``dirty`` sets, atomically with respect to fault handling;
* ``before_chunk(start, stop)`` (async): make every write to pages ``[start, stop)`` so far visible
  in the page state (only the asynchronous backend has work to do here);
* ``guest_tracker``: what an *in-process* guest's :class:`GuestMemory` calls before a write (only
  the simulated backend delivers faults that way; real backends fault in the kernel);
* ``stats()`` for the JSON report (``backend``, ``faults``, ``protect_calls``) and ``close()``.

Real backends are built from what a host process receives from its guest: the uffd (over
SCM_RIGHTS, see :func:`hintpipe.host.wp_real.recv_fds`), the guest's mapping address of its RAM,
the page count and, for ``uffd-async``, the guest's pid (PAGEMAP_SCAN reads
``/proc/PID/pagemap``). Nothing here assumes the guest lives in this process.

Why hints applied late are safe with each backend (the race of design.md):

* ``sim`` and ``uffd``: the fault is handled (``state.on_written``: skip cleared, ``written`` set)
  *before* the write lands, so a hint applied after the write finds ``written`` set and is refused.
* ``uffd-async``: the kernel resolves the fault itself, so the page state learns of a write only at
  the next scan. A hint applied between the write and that scan does set the skip bit, but the scan
  then clears it (``on_written``); a hint applied after the scan is refused (``written``). The
  engine scans a chunk's pages right before deciding what to send from it, scans the whole guest at
  each round end and at each round start (the final one after the guest is paused), so no skip
  set by a late hint survives to a send decision for a page written before that decision; a write
  after the decision is in the next round's send set.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from hintpipe.guest.memory import NoTracking
from hintpipe.host import uffd as _uffd
from hintpipe.host.pagestate import HostPageState
from hintpipe.host.uffd import UffdUnavailable
from hintpipe.host.wp_real import UffdAsyncTracker, UffdSyncTracker
from hintpipe.host.writeprotect import SimWriteProtect
from hintpipe.protocol.errors import ErrorCode, ProtocolError
from hintpipe.units import MAX_PAGE_COUNT, PAGE_SIZE, run_pages

__all__ = [
    "WP_CHOICES", "REAL_BACKENDS", "AUTO_ORDER", "resolve_backend", "WpBackend", "SimBackend",
    "OffBackend", "SyncUffdBackend", "AsyncUffdBackend", "RangeScanTracker", "make_backend",
    "UffdUnavailable", "RamHandoff",
]

WP_CHOICES = ("sim", "uffd", "uffd-async", "auto", "off")
REAL_BACKENDS = ("uffd", "uffd-async")
AUTO_ORDER = ("uffd-async", "uffd")  # best first; "sim" when neither works


def resolve_backend(requested: str, memory: str = "real") -> str:
    """The backend to use for ``--wp requested`` with ``--memory memory``.

    ``auto`` picks the first of :data:`AUTO_ORDER` whose :func:`~hintpipe.host.uffd.probe`
    succeeds (real memory only), else ``sim``. A real backend asked for by name is probed and
    :class:`UffdUnavailable` propagates (never a silent fallback). Raises ValueError for a real
    backend without real memory.
    """
    if requested not in WP_CHOICES:
        raise ValueError(f"unknown write-protect backend {requested!r} (one of {', '.join(WP_CHOICES)})")
    if requested in ("sim", "off"):
        return requested
    if requested == "auto":
        if memory != "real":
            return "sim"
        for name in AUTO_ORDER:
            try:
                _uffd.probe(name)
                return name
            except UffdUnavailable:
                continue
        return "sim"
    if memory != "real":
        raise ValueError(f"--wp {requested} write-protects real memory: use it with --memory real")
    try:
        _uffd.probe(requested)
    except UffdUnavailable as e:
        raise UffdUnavailable(f"--wp {requested} is unavailable: {e.reason}") from e
    return requested


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


class WpBackend:
    """Base: the page state's own round start, no chunk work, no guest-side hook."""

    name = "base"

    def __init__(self, state: HostPageState) -> None:
        self.state = state
        self.guest_tracker = NoTracking()
        self.rounds = 0

    def start_round(self, index: int) -> None:
        """Start round ``index``: swap the page state (0: everything to send)."""
        self.rounds += 1
        if index == 0:
            self.state.begin_first_round()
        else:
            self.state.begin_round()

    async def before_chunk(self, start: int, stop: int) -> None:
        """Nothing to collect: faults reach the page state as they happen."""

    def stats(self) -> dict:
        """``wp`` object of the JSON report."""
        return {"backend": self.name, "faults": self.state.faults, "protect_calls": 0}

    def close(self) -> None:
        """Release kernel resources (nothing here)."""


class OffBackend(WpBackend):
    """No write tracking at all: the oracle must then report lost pages."""

    name = "off"

    def stats(self) -> dict:
        """Nothing tracked."""
        return {"backend": self.name, "faults": 0, "protect_calls": 0}


class SimBackend(WpBackend):
    """Simulated faults delivered by the in-process guest's memory before each write."""

    name = "sim"

    def __init__(self, state: HostPageState) -> None:
        super().__init__(state)
        self.guest_tracker = SimWriteProtect(state)

    def stats(self) -> dict:
        """Faults = first writes per round; one (simulated) protect per round."""
        return {"backend": self.name, "faults": self.state.faults, "protect_calls": self.rounds,
                "fault_events": self.guest_tracker.fault_events}


class SyncUffdBackend(WpBackend):
    """Synchronous userfaultfd WP: a handler thread turns each fault into ``state.on_written``.

    ``uffd_fd``: a uffd whose handshake (WP_FEATURES_SYNC) and MODE_WP registration of the guest
    RAM mapping at ``ram_addr`` the *guest* process did; here it may be a copy received over
    SCM_RIGHTS. The handler thread marks the page (skip cleared, dirty for the next round) before
    it lifts the protection and wakes the writer.

    No deadlock: the handler thread waits only on the kernel (poll/read/ioctl), on ``round_lock``
    (held by :meth:`start_round` for a snapshot swap and a protect ioctl, neither of which waits on
    a guest write) and on ``state.lock`` (held only for array updates). It also needs the GIL:
    when the writer is a thread of this process (the in-process demo), it must fault with the GIL
    released, which :func:`hintpipe.realmem.write_pages_nogil` guarantees by copying through
    ``ctypes.memmove``; the trio loop itself never waits on the handler except for the bounded
    ``round_lock`` hold.
    """

    name = "uffd"

    def __init__(self, state: HostPageState, ram_addr: int, page_count: int, uffd_fd: int) -> None:
        super().__init__(state)
        if page_count != state.page_count:
            raise ValueError("guest RAM and page state disagree on the page count")
        self.tracker = UffdSyncTracker(ram_addr, page_count, uffd_fd, state.on_written)

    def _check(self) -> None:
        t = self.tracker
        if t.error is not None:
            raise RuntimeError(f"userfaultfd handler stopped: {t.error}") from t.error
        if t.callback_error is not None:
            raise RuntimeError(f"fault callback failed: {t.callback_error}") from t.callback_error

    def start_round(self, index: int) -> None:
        """Swap the page state and re-protect everything under the tracker's ``round_lock``."""
        self._check()
        self.rounds += 1
        self.tracker.new_round(self.state.begin_first_round if index == 0 else self.state.begin_round)

    def stats(self) -> dict:
        """Fault messages handled and protect ioctls."""
        s = self.tracker.stats()
        return {"backend": self.name, "faults": s["faults"], "protect_calls": s["protect_calls"],
                "unprotect_calls": s["unprotect_calls"]}

    def close(self) -> None:
        """Lift all protection (no writer stays blocked) and stop the handler thread."""
        self.tracker.close()


class RangeScanTracker(UffdAsyncTracker):
    """:class:`UffdAsyncTracker` plus scans of a sub-range (one chunk costs ~35 us, the whole
    1 GiB guest ~1 ms: scanning only the chunk about to be sent keeps per-chunk scans cheap)."""

    def written_in(self, start: int, stop: int) -> np.ndarray:
        """Sorted int64 pfns of ``[start, stop)`` written since their last scan, re-protected."""
        if not 0 <= start <= stop <= self.page_count:
            raise ValueError("scan range outside guest RAM")
        if start == stop:
            return np.empty(0, dtype=np.int64)
        starts, counts = self._scanner.written_ranges(self.ram_addr + start * PAGE_SIZE, stop - start)
        self.scans += 1
        self.protect_calls += 1
        self.faults += int(counts.sum())
        return run_pages(starts + start, counts)


class AsyncUffdBackend(WpBackend):
    """Asynchronous userfaultfd WP (WP_ASYNC): PAGEMAP_SCAN finds written pages, no messages.

    ``uffd_fd`` as for :class:`SyncUffdBackend` but with WP_FEATURES_ASYNC; ``pid`` is the guest
    process whose ``/proc/PID/pagemap`` is scanned (this process for the in-process demo).
    Round 0 starts with the arming pass, whose "everything written" answer is not counted.
    """

    name = "uffd-async"

    def __init__(self, state: HostPageState, ram_addr: int, page_count: int, uffd_fd: int,
                 pid: int) -> None:
        super().__init__(state)
        if page_count != state.page_count:
            raise ValueError("guest RAM and page state disagree on the page count")
        self.tracker = RangeScanTracker(ram_addr, page_count, uffd_fd, pid)

    def _collect(self, pfns: np.ndarray) -> None:
        if len(pfns):
            self.state.on_written(pfns)

    def start_round(self, index: int) -> None:
        """Round 0: arm (protect all, drop the answer); later: full scan, then swap."""
        self.rounds += 1
        if index == 0:
            self.tracker.arm()
            self.state.begin_first_round()
        else:
            # writes since the last scan belong to the round that is ending
            self._collect(self.tracker.written_since_last())
            self.state.begin_round()

    async def before_chunk(self, start: int, stop: int) -> None:
        """Scan ``[start, stop)`` and hand the written pages to the page state."""
        self._collect(self.tracker.written_in(start, stop))

    def stats(self) -> dict:
        """Written pages found by scans (arming pass excluded), protecting calls, scans."""
        s = self.tracker.stats()
        return {"backend": self.name, "faults": s["faults"], "protect_calls": s["protect_calls"],
                "scans": s["scans"]}

    def close(self) -> None:
        """Close the pagemap fd (the uffd belongs to the caller)."""
        self.tracker.close()


def make_backend(name: str, state: HostPageState, *, ram_addr: int | None = None,
                 page_count: int | None = None, uffd_fd: int | None = None,
                 pid: int | None = None) -> WpBackend:
    """Build the backend ``name`` (already resolved: not ``auto``) for ``state``.

    Real backends need ``ram_addr`` (the guest's mapping address), ``page_count`` and
    ``uffd_fd``; ``uffd-async`` also the guest's ``pid``.
    """
    if name == "sim":
        return SimBackend(state)
    if name == "off":
        return OffBackend(state)
    if name not in REAL_BACKENDS:
        raise ValueError(f"unknown or unresolved write-protect backend {name!r}")
    if ram_addr is None or uffd_fd is None:
        raise ValueError(f"--wp {name} needs the guest's uffd and RAM address")
    n = state.page_count if page_count is None else page_count
    if name == "uffd":
        return SyncUffdBackend(state, ram_addr, n, uffd_fd)
    if pid is None:
        raise ValueError("--wp uffd-async needs the guest's pid (for /proc/PID/pagemap)")
    return AsyncUffdBackend(state, ram_addr, n, uffd_fd, pid)
