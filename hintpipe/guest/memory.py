"""Guest RAM in simulation: one content version per page, bumped by every write.

Every write goes through a :class:`WriteTracker` first, the way a vCPU's store goes through the
MMU: if the host has write-protected the page, the tracker delivers the fault and returns only
once the host has handled it, so the host always learns of a write before the write lands.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class WriteTracker(Protocol):
    """What stands between a guest write and guest memory (the write-protect mechanism)."""

    async def before_write(self, pfns: np.ndarray) -> None:
        """Return once the host has handled faults for every protected page in ``pfns``."""


class NoTracking:
    """No write-protection at all: writes are invisible to the host (a broken setup, for tests)."""

    async def before_write(self, pfns: np.ndarray) -> None:
        return None


class GuestMemory:
    """``versions[pfn]`` is the content of page ``pfn``; 0 means never written."""

    def __init__(self, page_count: int, tracker: WriteTracker | None = None) -> None:
        self.page_count = page_count
        self.versions = np.zeros(page_count, dtype=np.uint32)
        self.tracker: WriteTracker = tracker if tracker is not None else NoTracking()
        self.pages_written = 0

    async def write(self, pfns: np.ndarray) -> None:
        """Write pages ``pfns`` (each gets a new version), faulting first where protected."""
        if len(pfns) == 0:
            return
        await self.tracker.before_write(pfns)
        self.versions[pfns] += 1
        self.pages_written += len(pfns)
