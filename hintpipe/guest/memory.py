"""Guest RAM: one content value per page, set by every write (and real bytes, optionally).

Every write goes through a :class:`~hintpipe.wp.base.WriteTracker` first, the way a vCPU's store
goes through the MMU: if the host has write-protected the page, the tracker delivers the fault and
returns only once the host has handled it, so the host always learns of a write before the write
lands. :class:`GuestMemory` keeps content values only (simulation); :class:`RealGuestMemory` also
stores each page's bytes in a memfd, so a lost write shows as a byte difference.
"""

from __future__ import annotations

import numpy as np

from hintpipe.linux.memfd import CHUNK_PAGES, WORDS_PER_PAGE, GuestRam, write_pages_nogil
from hintpipe.units import distinct
from hintpipe.wp.base import UNTRACKED, WriteTracker

ZERO_CONTENT = 0
"""The content value of a page whose every byte is zero."""


class GuestMemory:
    """``versions[pfn]`` is the content of page ``pfn`` (uint32).

    ``ZERO_CONTENT`` (0) means every byte of the page is zero: never written since the guest
    started, or last written with zeros (:meth:`write_zeros`). Any other value is data: each
    :meth:`write` call stores a value no earlier call used (a write sequence number), so a copy
    of a page taken before a later write never matches the page's content, even if zeros were
    written in between. (The sequence wraps after 2**32 - 1 write calls, skipping 0.)
    """

    def __init__(self, page_count: int, tracker: WriteTracker | None = None) -> None:
        self.page_count = page_count
        self.versions = np.zeros(page_count, dtype=np.uint32)
        self.tracker: WriteTracker = tracker if tracker is not None else UNTRACKED
        self.pages_written = 0
        self._seq = 0

    def _next_content(self) -> int:
        self._seq = self._seq % 0xFFFF_FFFF + 1  # 1 .. 2**32 - 1: never ZERO_CONTENT
        return self._seq

    async def write(self, pfns: np.ndarray) -> None:
        """Write data to pages ``pfns`` (each gets a new content value), faulting first where
        protected."""
        if len(pfns) == 0:
            return
        await self.tracker.before_write(pfns)
        self.versions[pfns] = self._next_content()
        self.pages_written += len(pfns)

    async def write_zeros(self, pfns: np.ndarray) -> None:
        """Write zeros over all of pages ``pfns`` (a write like any other: it faults first)."""
        if len(pfns) == 0:
            return
        await self.tracker.before_write(pfns)
        self.versions[pfns] = ZERO_CONTENT
        self.pages_written += len(pfns)


class RealGuestMemory(GuestMemory):
    """:class:`GuestMemory` whose writes also store real bytes into a :class:`GuestRam`."""

    def __init__(self, ram: GuestRam, tracker: WriteTracker | None = None) -> None:
        super().__init__(ram.page_count, tracker)
        self.ram = ram
        self._scratch = np.empty((CHUNK_PAGES, WORDS_PER_PAGE), dtype=np.uint64)

    async def write(self, pfns: np.ndarray) -> None:
        """Set new content values (after the simulated tracker, if any), then store the pages'
        (pfn, value) patterns.

        With a real backend the fault happens inside the store, in the kernel; with ``sim`` the
        tracker has already delivered it. Duplicated pfns are written once (one new value).
        """
        if len(pfns) == 0:
            return
        await self.tracker.before_write(pfns)
        pfns = distinct(pfns)
        self.versions[pfns] = self._next_content()
        write_pages_nogil(self.ram, pfns, self.versions[pfns], self._scratch)
        self.pages_written += len(pfns)

    async def write_zeros(self, pfns: np.ndarray) -> None:
        """Store zero bytes over all of pages ``pfns``."""
        if len(pfns) == 0:
            return
        await self.tracker.before_write(pfns)
        pfns = distinct(pfns)
        self.versions[pfns] = ZERO_CONTENT
        write_pages_nogil(self.ram, pfns, None, self._scratch)
        self.pages_written += len(pfns)
