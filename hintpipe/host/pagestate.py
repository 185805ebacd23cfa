"""The host's per-guest page state: the skip bitmap and the write tracking it depends on.

Three numpy bool arrays of one byte per page:

- ``skip``: the page was hinted free and has not been written since; the sender does not send
  it. It persists across rounds: a page hinted in round 0 that stays free is never sent.
- ``written``: the page was written since the current round began (its write-protection was
  removed by a fault). Hints never set ``skip`` on such a page: a hint describes the page as it was
  when the guest walked it, and a write after that walk makes the hint stale.
- ``dirty``: the send set of the current round (pages written during the previous round).

A write fault clears ``skip``, sets ``written`` and so puts the page into the next round's send
set. Only hints under the active command id reach :meth:`apply_blocks` (the connection drops stale
ones), which is what makes a persistent skip safe: a hint is applied in the same round its walk
happened in, and that round's write tracking catches every later write.

Two of the host's guards live here (``hintpipe demo --break`` turns one off, to show the loss oracle
catching what it protects against): *refuse-written*, a hint never sets ``skip`` on a page
``written`` this round, and *invalidate*, a write clears the page's ``skip``. Their counters are
here too: :attr:`HostPageState.pages_refused_written` and :attr:`HostPageState.skips_invalidated`.

Real write-protect backends deliver faults from another OS thread, so every mutation holds
``self.lock``: a hint's check of ``written`` and its setting of ``skip`` must not interleave with a
fault's setting of ``written`` and clearing of ``skip``, or a stale skip could survive the fault.
"""

from __future__ import annotations

import threading

import numpy as np

from hintpipe.protocol.messages import MAX_RANGE_ORDER
from hintpipe.units import order_pages, pages_order, run_pages


class HostPageState:
    """Skip bitmap + write tracking for one guest of ``page_count`` pages.

    ``refuse_written=False`` turns the refuse-written guard off (hints set ``skip`` on written
    pages too); ``invalidate=False`` turns invalidation off (writes still mark pages written and
    dirty, but leave ``skip`` set). Both exist only to show that the loss oracle catches what
    the guard protects against.
    """

    def __init__(self, page_count: int, *, refuse_written: bool = True, invalidate: bool = True) -> None:
        self.page_count = page_count
        self.skip = np.zeros(page_count, dtype=bool)
        self.written = np.zeros(page_count, dtype=bool)
        self.dirty = np.ones(page_count, dtype=bool)  # round 0 sends everything
        self.refuse_written = refuse_written
        self.invalidate = invalidate
        self.lock = threading.Lock()
        self.faults = 0
        """First writes to protected pages (each dirtied its page)."""
        self.skips_invalidated = 0
        """Skip bits a write cleared (a fault, or a scan that found the page written)."""
        self.pages_marked = 0
        """Pages hints newly put into the skip bitmap."""
        self.pages_refused_written = 0
        """Hinted pages left out of the skip bitmap because they were written this round."""

    @staticmethod
    def nbytes_for(page_count: int) -> int:
        """Bytes of the arrays a page state of ``page_count`` pages holds (``skip``, ``written``,
        ``dirty``: one byte a page each); a host charges a guest this much before creating it."""
        return 3 * page_count

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
                hit = pfns[self.skip[pfns]]
                if len(hit):  # rare and short: unique() only counts repeated pfns once
                    self.skips_invalidated += len(np.unique(hit))
                    self.skip[hit] = False
            self.faults += first
        return first

    def apply_hints(self, ranges: np.ndarray) -> int:
        """Mark hinted free ranges in the skip bitmap; return the pages newly marked.

        ``ranges`` is an ``(n, 2)`` array of ``[start_pfn, npages]`` already validated by the
        protocol layer: each range a naturally aligned power of two inside the guest. Hints events
        carry their block orders already; they go to :meth:`apply_blocks` directly.
        """
        ranges = np.asarray(ranges, dtype=np.uint64).reshape(-1, 2)
        return self.apply_blocks(ranges[:, 0], pages_order(ranges[:, 1]))

    def apply_blocks(self, starts: np.ndarray, orders: np.ndarray) -> int:
        """Mark the free blocks ``(starts[i], orders[i])`` in the skip bitmap; return the pages
        newly marked (``starts``: uint64 pfns, ``orders``: uint8; validated as for
        :meth:`apply_hints`).

        The work is grouped by block size (no Python loop per block): a block of ``s <= 8`` pages
        is one ``s``-byte word of the bitmap, a larger one a row of ``s / 8`` u64 words, so each
        group is a gather, a few word operations and a scatter on a reshaped view.
        """
        orders = np.asarray(orders, dtype=np.uint8)
        if len(orders) == 0:
            return 0
        # validated values are < 2**40, so the int64 view is exact (and indexes without a cast)
        starts = np.asarray(starts, dtype=np.uint64).view(np.int64)
        with self.lock:
            marked, refused = self._apply_locked(starts, orders)
        self.pages_marked += marked
        self.pages_refused_written += refused
        return marked

    def _apply_locked(self, starts: np.ndarray, orders: np.ndarray) -> tuple[int, int]:
        n = len(orders)
        cut = np.flatnonzero(orders[1:] != orders[:-1]) + 1
        runs = len(cut) + 1
        # The walker sends blocks top order first, ascending pfn: a batch is a few runs of one
        # size, processed as slices. A batch in any other order is either expanded to pages (small
        # batches: fewer numpy calls than one group per size) or grouped by a stable sort.
        if runs <= 4 or (runs <= _NR_SIZES and n >= 64 * runs):
            edges = [0, *cut.tolist(), n]
            groups = [(int(orders[a]), starts[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        else:
            sizes = order_pages(orders)
            total = int(sizes.sum())
            if total <= _EXPAND_MAX_PAGES:
                return self._apply_pages(starts, sizes, total)
            counts = np.bincount(orders, minlength=_NR_SIZES)
            perm = np.argsort(orders, kind="stable")
            groups, pos = [], 0
            for k in np.flatnonzero(counts).tolist():
                c = int(counts[k])
                groups.append((k, starts[perm[pos:pos + c]]))
                pos += c
        marked = refused = 0
        for order, sel in groups:
            # chunks keep every temporary small: large fresh numpy temporaries are mmapped and
            # first-touched on every call, which costs more than the marking itself
            step = _CHUNK_ROWS if order <= 3 else max(1, _CHUNK_BYTES >> order)
            for i in range(0, len(sel), step):
                m, r = self._mark_rows(order, sel[i:i + step])
                marked += m
                refused += r
        return marked, refused

    def _mark_rows(self, k: int, sel: np.ndarray) -> tuple[int, int]:
        """Mark blocks of order ``k`` starting at ``sel``; return (marked, refused) pages."""
        size = 1 << k
        rows = sel >> k
        limit = (self.page_count >> k) << k  # aligned ranges always lie inside this prefix
        skip_b = self.skip.view(np.uint8)[:limit]
        wr_b = self.written.view(np.uint8)[:limit]
        # bool bytes are 0 or 1: ``~word & ONES`` is 1 in each byte of a page not written
        if size <= 8:
            dt = _WORD[size]
            skip, wr = skip_b.view(dt), wr_b.view(dt)
        elif size <= _ROW_GATHER_MIN:
            # a few u64 words per block: gather the words one by one (a 1-D gather), which is
            # several times faster than numpy's row-by-row copy of short 2-D rows
            dt = np.uint64
            w = size >> 3
            rows = ((rows * w)[:, None] + _ARANGE[:w]).ravel()
            skip, wr = skip_b.view(dt), wr_b.view(dt)
        else:
            dt = np.uint64
            skip = skip_b.view(dt).reshape(-1, size >> 3)
            wr = wr_b.view(dt).reshape(-1, size >> 3)
        ones = _ONES[dt]
        old = skip[rows]
        refused = 0
        if self.refuse_written:
            ok = wr[rows]
            np.invert(ok, out=ok)
            np.bitwise_and(ok, ones, out=ok)
            refused = size * len(sel) - np.count_nonzero(ok.view(np.uint8))
        else:
            ok = np.full(old.shape, ones, dtype=dt)
        # every byte is 0 or 1, so counting nonzero bytes counts pages; marked = set after - before
        before = np.count_nonzero(old.view(np.uint8))
        np.bitwise_or(ok, old, out=ok)
        skip[rows] = ok
        return int(np.count_nonzero(ok.view(np.uint8)) - before), int(refused)

    def _apply_pages(self, starts: np.ndarray, sizes: np.ndarray, total: int) -> tuple[int, int]:
        """Small unordered batches: expand the blocks to their pages and mark those."""
        pages = run_pages(starts, sizes)
        if self.refuse_written:
            ok = ~self.written[pages]
            refused = total - int(np.count_nonzero(ok))
        else:
            ok = np.ones(total, dtype=bool)
            refused = 0
        marked = int(np.count_nonzero(ok & ~self.skip[pages]))
        self.skip[pages[ok]] = True
        return marked, refused


# Block sizes 2**0 .. 2**MAX_RANGE_ORDER.
_NR_SIZES = MAX_RANGE_ORDER + 1
# A block of s <= 8 pages is exactly one s-byte word of the (bool, one byte a page) bitmap.
_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_ONES = {
    np.uint8: np.uint8(1),
    np.uint16: np.uint16(0x0101),
    np.uint32: np.uint32(0x0101_0101),
    np.uint64: np.uint64(0x0101_0101_0101_0101),
}
_CHUNK_ROWS = 8192  # blocks of <= 8 pages per step (64 KiB of int64 row numbers)
_CHUNK_BYTES = 1 << 16  # bitmap bytes per step for larger blocks
_EXPAND_MAX_PAGES = 1 << 15
_ROW_GATHER_MIN = 512  # blocks above this many pages are gathered as 2-D rows
_ARANGE = np.arange(_ROW_GATHER_MIN >> 3)
