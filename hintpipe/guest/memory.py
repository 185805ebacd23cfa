"""Guest RAM: one content version per page, bumped by every write (and real bytes, optionally).

Every write goes through a :class:`~hintpipe.wp.base.WriteTracker` first, the way a vCPU's store
goes through the MMU: if the host has write-protected the page, the tracker delivers the fault and
returns only once the host has handled it, so the host always learns of a write before the write
lands. :class:`GuestMemory` keeps versions only (simulation); :class:`RealGuestMemory` also
stores each page's (pfn, version) pattern in a memfd, so a lost write shows as a byte difference.
"""

from __future__ import annotations

import numpy as np

from hintpipe.linux.memfd import CHUNK_PAGES, WORDS_PER_PAGE, GuestRam, write_pages_nogil
from hintpipe.units import distinct
from hintpipe.wp.base import UNTRACKED, WriteTracker


class GuestMemory:
    """``versions[pfn]`` is the content of page ``pfn``; 0 means never written."""

    def __init__(self, page_count: int, tracker: WriteTracker | None = None) -> None:
        self.page_count = page_count
        self.versions = np.zeros(page_count, dtype=np.uint32)
        self.tracker: WriteTracker = tracker if tracker is not None else UNTRACKED
        self.pages_written = 0

    async def write(self, pfns: np.ndarray) -> None:
        """Write pages ``pfns`` (each gets a new version), faulting first where protected."""
        if len(pfns) == 0:
            return
        await self.tracker.before_write(pfns)
        self.versions[pfns] += 1
        self.pages_written += len(pfns)


class RealGuestMemory(GuestMemory):
    """:class:`GuestMemory` whose writes also store real bytes into a :class:`GuestRam`."""

    def __init__(self, ram: GuestRam, tracker: WriteTracker | None = None) -> None:
        super().__init__(ram.page_count, tracker)
        self.ram = ram
        self._scratch = np.empty((CHUNK_PAGES, WORDS_PER_PAGE), dtype=np.uint64)

    async def write(self, pfns: np.ndarray) -> None:
        """Bump versions (after the simulated tracker, if any), then store the new patterns.

        With a real backend the fault happens inside the store, in the kernel; with ``sim`` the
        tracker has already delivered it. Duplicated pfns are written once (one new version).
        """
        if len(pfns) == 0:
            return
        await self.tracker.before_write(pfns)
        pfns = distinct(pfns)
        self.versions[pfns] += 1
        write_pages_nogil(self.ram, pfns, self.versions[pfns], self._scratch)
        self.pages_written += len(pfns)
