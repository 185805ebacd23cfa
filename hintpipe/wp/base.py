"""What every write-tracking backend shares.

* :class:`WriteTracker`: the guest side, what stands between a guest write and guest memory, the
  way a vCPU's store goes through the MMU: if the host has write-protected the page, the tracker
  delivers the fault and returns only once the host has handled it. :class:`GatedTracker` adds
  the gate a round barrier closes (paired processes).
* :data:`UNTRACKED` (:class:`Untracked`): the one tracker that does nothing before a write, for
  when the kernel tracks writes itself (a userfaultfd-protected store faults inside the store) or
  nothing does (``--wp off``, the broken setup the oracle must catch).
* :class:`WpBackend`: the host side, bound to one :class:`HostPageState`, with the hooks the
  migration engine calls; this base tracks nothing (``--wp off``).
* :class:`UffdRange`: the guest RAM range both userfaultfd trackers protect.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from hintpipe.host.pagestate import HostPageState
from hintpipe.linux.userfaultfd import UFFDIO_WRITEPROTECT_MODE_WP, writeprotect_fd
from hintpipe.units import PAGE_SIZE

__all__ = ["WriteTracker", "GatedTracker", "Untracked", "UNTRACKED", "WpBackend", "UffdRange"]


class WriteTracker(Protocol):
    """Guest side of write tracking: called before every guest write."""

    name: str
    """Which mechanism this is (for reports)."""
    fault_events: int
    """Faults this tracker delivered (each may cover several pages)."""

    async def before_write(self, pfns: np.ndarray) -> None:
        """Return once the host has handled faults for every protected page in ``pfns``."""


class GatedTracker(WriteTracker, Protocol):
    """A tracker whose writers a round barrier can hold back (paired processes)."""

    async def quiesce(self) -> None:
        """Close the gate and wait until no writer is between its check and its write."""

    def reopen(self) -> None:
        """Let writers through again."""


class Untracked:
    """Does nothing before a write: the kernel tracks writes itself, or nothing does.

    With ``uffd``/``uffd-async`` a write to a protected page faults inside the store (see
    :func:`hintpipe.linux.memfd.write_pages_nogil`); with ``--wp off`` writes are invisible to
    the host. A round barrier finds no writer between a check and its write (there is no check),
    so :meth:`quiesce` and :meth:`reopen` return at once.
    """

    name = "untracked"
    fault_events = 0

    async def before_write(self, pfns: np.ndarray) -> None:
        """No user-space check."""

    async def quiesce(self) -> None:
        """Nothing to wait for."""

    def reopen(self) -> None:
        """Nothing was closed."""


UNTRACKED = Untracked()
"""The shared instance (it has no state)."""


class WpBackend:
    """The host side of write tracking for one guest's page state: the engine's hooks.

    * ``start_round(index)``: start round ``index`` (0 = first): re-protect guest RAM and swap the
      page state's ``written``/``dirty`` sets, atomically with respect to fault handling;
    * ``before_chunk(start, stop)`` (async): make every write to pages ``[start, stop)`` so far
      visible in the page state (only the asynchronous backend has work to do here);
    * ``guest_tracker``: what an *in-process* guest's memory calls before a write (only the
      simulated backend delivers faults that way; real backends fault in the kernel);
    * ``stats()`` for the JSON report (``backend``, ``faults``, ``protect_calls``) and ``close()``.

    This base tracks nothing: it is the ``--wp off`` backend, whose migrations the oracle must
    find losing pages.
    """

    name = "off"

    def __init__(self, state: HostPageState) -> None:
        self.state = state
        self.guest_tracker: WriteTracker = UNTRACKED
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


class UffdRange:
    """The guest mapping ``[ram_addr, ram_addr + page_count pages)`` registered with ``uffd_fd``.

    The fd may be a copy received from the guest process: write-protect ioctls act on the mm of
    the process that registered the range.
    """

    def __init__(self, ram_addr: int, page_count: int, uffd_fd: int):
        if ram_addr % PAGE_SIZE or page_count <= 0:
            raise ValueError("ram_addr must be page aligned and page_count positive")
        self.ram_addr = ram_addr
        self.page_count = page_count
        self.uffd_fd = uffd_fd
        self.faults = 0         # sync: fault messages handled; async: written pages found
        self.protect_calls = 0  # kernel calls that (re-)armed write protection

    def protect_all(self) -> None:
        """Write-protect the whole guest RAM range (start of a round)."""
        writeprotect_fd(self.uffd_fd, self.ram_addr, self.page_count * PAGE_SIZE,
                        UFFDIO_WRITEPROTECT_MODE_WP)
        self.protect_calls += 1

    def unprotect_all(self) -> None:
        """Lift write protection everywhere and wake any blocked writer."""
        writeprotect_fd(self.uffd_fd, self.ram_addr, self.page_count * PAGE_SIZE, 0)

    def stats(self) -> dict:
        """Counters for the JSON report."""
        return {"faults": self.faults, "protect_calls": self.protect_calls}
