"""The host's per-guest page state: the skip bitmap and the write tracking it depends on.

Three numpy bool arrays of one byte per page:

- ``skip``: the page was hinted free and has not been written since; the sender does not send
  it. It persists across rounds: a page hinted in round 0 that stays free is never sent.
- ``written``: the page was written since the current round began (its write-protection was
  removed by a fault). Hints never set ``skip`` on such a page: a hint describes the page as it was
  when the guest walked it, and a write after that walk makes the hint stale.
- ``dirty``: the send set of the current round (pages written during the previous round).

A write fault clears ``skip``, sets ``written`` and so puts the page into the next round's send
set. Only hints under the active command id reach :meth:`apply_hints` (the connection drops stale
ones), which is what makes a persistent skip safe: a hint is applied in the same round its walk
happened in, and that round's write tracking catches every later write.

Real write-protect backends deliver faults from another OS thread, so every mutation holds
``self.lock``: a hint's check of ``written`` and its setting of ``skip`` must not interleave with a
fault's setting of ``written`` and clearing of ``skip``, or a stale skip could survive the fault.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


@dataclass
class HintStats:
    """What hints did to the bitmap."""

    batches: int = 0
    ranges: int = 0
    pages: int = 0
    pages_marked: int = 0
    pages_refused_written: int = 0


class HostPageState:
    """Skip bitmap + write tracking for one guest of ``page_count`` pages.

    ``invalidate=False`` switches write-protect *invalidation* off (faults still mark pages dirty,
    but neither clear ``skip`` nor stop later hints from setting it). It exists only so tests can
    show that the loss oracle catches the resulting lost writes.
    """

    def __init__(self, page_count: int, *, invalidate: bool = True) -> None:
        self.page_count = page_count
        self.skip = np.zeros(page_count, dtype=bool)
        self.written = np.zeros(page_count, dtype=bool)
        self.dirty = np.ones(page_count, dtype=bool)  # round 0 sends everything
        self.invalidate = invalidate
        self.lock = threading.Lock()
        self.faults = 0
        self.hints = HintStats()

    def begin_round(self) -> None:
        """Protect every page again; what was written last round becomes this round's send set."""
        with self.lock:
            # swap instead of copying: both arrays are page_count bytes
            self.dirty, self.written = self.written, self.dirty
            self.written[:] = False

    def begin_first_round(self) -> None:
        """Round 0: everything is to be sent and everything is protected."""
        with self.lock:
            self.dirty[:] = True
            self.written[:] = False

    def on_written(self, pfns: np.ndarray) -> int:
        """Handle write faults for ``pfns``; return how many were first writes this round."""
        pfns = np.asarray(pfns, dtype=np.int64)
        with self.lock:
            first = int(np.count_nonzero(~self.written[pfns]))
            self.written[pfns] = True
            if self.invalidate:
                self.skip[pfns] = False
            self.faults += first
        return first

    def apply_hints(self, ranges: np.ndarray) -> int:
        """Mark hinted free ranges in the skip bitmap; return the pages newly marked.

        ``ranges`` is an ``(n, 2)`` array of ``[start_pfn, npages]`` already validated by the
        protocol layer: each range a naturally aligned power of two inside the guest. The work is
        grouped by block size, so each group is one fancy-indexed row assignment on a
        ``(pages / npages, npages)`` view of the bitmap (no Python loop per range).
        """
        ranges = np.asarray(ranges, dtype=np.uint64).reshape(-1, 2)
        n = len(ranges)
        if n == 0:
            return 0
        starts = ranges[:, 0].astype(np.int64)
        sizes = ranges[:, 1].astype(np.int64)
        self.hints.batches += 1
        self.hints.ranges += n
        self.hints.pages += int(sizes.sum())
        with self.lock:
            return self._apply_locked(starts, sizes)

    def _apply_locked(self, starts: np.ndarray, sizes: np.ndarray) -> int:
        marked = 0
        refused = 0
        for size in np.unique(sizes):  # at most 21 distinct sizes
            k = int(size)
            rows = starts[sizes == size] // k
            limit = (self.page_count // k) * k  # aligned ranges always lie inside this prefix
            skip = self.skip[:limit].reshape(-1, k)
            if self.invalidate:
                ok = ~self.written[:limit].reshape(-1, k)[rows]
                refused += k * len(rows) - int(np.count_nonzero(ok))
            else:
                ok = np.ones((len(rows), k), dtype=bool)
            new = ok & ~skip[rows]
            marked += int(np.count_nonzero(new))
            skip[rows] |= ok
        self.hints.pages_marked += marked
        self.hints.pages_refused_written += refused
        return marked
