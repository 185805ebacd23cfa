"""The host's per-guest page state: the skip bitmap and the write tracking it depends on.

Three page sets of one bit per page (:class:`~hintpipe.host.pagebits.PageBits`, 3/8 of a byte a
page in all: a 2**26-page guest costs the host 24 MiB):

- ``skip``: the page was hinted free and has not been written since; the sender does not send
  it. It persists across rounds: a page hinted in round 0 that stays free is never sent.
- ``written``: the page was written since the current round began (its write-protection was
  removed by a fault). Hints never set ``skip`` on such a page: a hint describes the page as it was
  when the guest walked it, and a write after that walk makes the hint stale.
- ``dirty``: the send set of the current round (pages written during the previous round).

A write fault clears ``skip``, sets ``written`` and so puts the page into the next round's send
set. Only hints under the active command id reach the page state (the connection drops stale
ones), which is what makes a persistent skip safe: a hint is applied in the same round its walk
happened in, and that round's write tracking catches every later write.

Hints may be *staged* (:meth:`HostPageState.stage_hints`: the session stages each frame's blocks
and they are applied together, which costs a fraction of one call per frame). Staged hints are
applied before anyone reads the page sets, when enough are staged, and before a round ends
(:meth:`begin_round`), so they are always applied in their own round. A write fault does not wait
for them: a staged hint applied after a fault is refused for the faulted page by the same check
that refuses any hint for a page written this round (``skip |= block & ~written`` at apply time).

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

from hintpipe.host import pagebits
from hintpipe.host.pagebits import PageBits, bit_masks, popcount
from hintpipe.protocol.messages import MAX_RANGE_ORDER
from hintpipe.units import distinct, pages_order


class HostPageState:
    """Skip bitmap + write tracking for one guest of ``page_count`` pages.

    ``refuse_written=False`` turns the refuse-written guard off (hints set ``skip`` on written
    pages too); ``invalidate=False`` turns invalidation off (writes still mark pages written and
    dirty, but leave ``skip`` set). Both exist only to show that the loss oracle catches what
    the guard protects against.

    Readers use the range and count methods (:meth:`skip_in`, :meth:`count_skip`, ...), which
    never expose the representation.
    """

    BYTES_PER_PAGE = 3 * pagebits.BYTES_PER_PAGE
    """Bytes this page state holds per guest page (skip, written and dirty: one bit each)."""
    STAGE_RANGES = 8192
    """Staged blocks that trigger an apply on their own (bounds what staging holds)."""

    def __init__(self, page_count: int, *, refuse_written: bool = True, invalidate: bool = True) -> None:
        self.page_count = page_count
        self._skip = PageBits(page_count)
        self._written = PageBits(page_count)
        self._dirty = PageBits(page_count, fill=True)  # round 0 sends everything
        self.refuse_written = refuse_written
        self.invalidate = invalidate
        self.lock = threading.Lock()
        self.faults = 0
        """First writes to protected pages (each dirtied its page)."""
        self.skips_invalidated = 0
        """Skip bits a write cleared (a fault, or a scan that found the page written)."""
        self._pages_marked = 0
        self._pages_refused_written = 0
        self._staged: list[np.ndarray] = []  # (n, 2) [start, npages] arrays, as received
        self._staged_blocks = 0

    # ------------------------------------------------------------------ size
    @staticmethod
    def nbytes_for(page_count: int) -> int:
        """Bytes of the page sets a page state of ``page_count`` pages holds (what a host charges
        a guest before creating it)."""
        return 3 * pagebits.nbytes_for(page_count)

    @property
    def nbytes(self) -> int:
        """Bytes this page state's page sets hold."""
        return self._skip.nbytes + self._written.nbytes + self._dirty.nbytes

    def arrays(self) -> dict[str, np.ndarray]:
        """The page sets' storage by name (for memory accounting; read-only)."""
        return {"skip": self._skip.bytes, "written": self._written.bytes, "dirty": self._dirty.bytes}

    # --------------------------------------------------------------- readers
    @property
    def pages_marked(self) -> int:
        """Pages hints newly put into the skip bitmap."""
        self.flush()
        return self._pages_marked

    @property
    def pages_refused_written(self) -> int:
        """Hinted pages left out of the skip bitmap because they were written this round."""
        self.flush()
        return self._pages_refused_written

    def skip_in(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``skip`` of pages ``[start, stop)`` as a ``bool`` array (staged hints applied first)."""
        self.flush()
        return self._skip.get(start, stop)

    def written_in(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``written`` of pages ``[start, stop)`` as a ``bool`` array."""
        return self._written.get(start, stop)

    def dirty_in(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``dirty`` (this round's send set) of pages ``[start, stop)`` as a ``bool`` array."""
        return self._dirty.get(start, stop)

    def is_skip(self, pfns: np.ndarray) -> np.ndarray:
        """``skip`` of each of ``pfns`` (staged hints applied first)."""
        self.flush()
        return self._skip.gather(pfns)

    def skip_locked(self, pfns: np.ndarray) -> np.ndarray:
        """``skip`` of each of ``pfns`` for a caller that already holds :attr:`lock` (staged
        hints applied first): a check and what it decides in one hold (reclaim's discard)."""
        self._flush_locked()
        return self._skip.gather(pfns)

    def is_written(self, pfns: np.ndarray) -> np.ndarray:
        """``written`` of each of ``pfns``."""
        return self._written.gather(pfns)

    def count_skip(self) -> int:
        """Pages in the skip bitmap."""
        self.flush()
        return self._skip.count()

    def count_written(self) -> int:
        """Pages written this round."""
        return self._written.count()

    def count_dirty(self) -> int:
        """Pages in this round's send set."""
        return self._dirty.count()

    def send_set(self, start: int, stop: int, skipped: PageBits | None = None) -> tuple[np.ndarray, int]:
        """This round's send set within pages ``[start, stop)``: (the pages to send: dirty and
        not skipped, ascending int64; how many dirty pages are skipped). The skipped ones are
        added to ``skipped`` when given. Staged hints are applied first.

        Works on whole bytes of the bitmaps when ``start`` and ``stop`` are multiples of 8 (or
        ``stop`` is the end), and unpacks only the pages to send, only when there are any.
        """
        self.flush()
        stop = min(stop, self.page_count)
        if start & 7 or (stop & 7 and stop != self.page_count):
            want, hinted = self._dirty.get(start, stop), self._skip.get(start, stop)
            sk = want & hinted
            if skipped is not None:
                skipped.add_mask(start, sk)
            return np.flatnonzero(want & ~hinted) + start, int(np.count_nonzero(sk))
        a, b = start >> 3, (stop + 7) >> 3
        d, s = self._dirty.bytes[a:b], self._skip.bytes[a:b]
        sk = d & s
        nskip = popcount(sk)
        if nskip and skipped is not None:
            skipped.bytes[a:b] |= sk
        go = d & ~s  # the padding past the last page is clear in dirty
        if not go.any():
            return _NO_PAGES, nskip
        return np.flatnonzero(np.unpackbits(go, bitorder="little")) + start, nskip

    def stayed_free(self, start: int, stop: int, free_at_start: PageBits, free_now: np.ndarray,
                    skipped: PageBits) -> tuple[int, int]:
        """Skip efficiency within pages ``[start, stop)`` (a multiple of 8 apart from the end) at
        the end of a round: (pages of the round's send set free when it began and still free now,
        never written during it; how many of those it skipped). ``free_now`` is the guest's free
        mask of the range (``bool``)."""
        a, b = start >> 3, (min(stop, self.page_count) + 7) >> 3
        now = np.packbits(free_now, bitorder="little")
        stayed = free_at_start.bytes[a:b] & self._dirty.bytes[a:b] & ~self._written.bytes[a:b]
        stayed[:len(now)] &= now
        stayed[len(now):] = 0
        return popcount(stayed), popcount(stayed & skipped.bytes[a:b])

    def count_written_unskipped(self) -> int:
        """Pages written this round and not skipped: what the next round would send."""
        self.flush()
        return popcount(self._written.bytes & ~self._skip.bytes)

    # ------------------------------------------------------------- mutations
    def clear_skip(self) -> None:
        """Forget every hint (staged ones too); benchmarks reset the bitmap with it."""
        with self.lock:
            self._staged.clear()
            self._staged_blocks = 0
            self._skip.fill(False)

    def begin_round(self) -> None:
        """Protect every page again; what was written last round becomes this round's send set.

        Hints staged in the round that ends are applied first: they belong to it.
        """
        with self.lock:
            self._flush_locked()
            # swap instead of copying
            self._dirty.swap(self._written)
            self._written.fill(False)

    def keep_dirty(self, mask: np.ndarray) -> None:
        """Leave in this round's send set only the pages where ``mask`` (bool, a page each) is
        true (a replay's PFNs that are not RAM are never sent)."""
        keep = PageBits.from_mask(np.asarray(mask, dtype=bool))
        with self.lock:
            np.bitwise_and(self._dirty.bytes, keep.bytes, out=self._dirty.bytes)

    def begin_first_round(self) -> None:
        """Round 0: everything is to be sent and everything is protected."""
        with self.lock:
            self._flush_locked()
            self._dirty.fill(True)
            self._written.fill(False)

    def on_written(self, pfns: np.ndarray) -> int:
        """Handle write faults for ``pfns``; return how many were first writes this round.

        Staged hints are not waited for: applied later, a hint is refused for these pages because
        they are now ``written``.
        """
        if len(pfns) <= _FEW_PAGES:  # the synchronous fault handler's usual call: a few pages
            return self._on_written_few(np.asarray(pfns).tolist())
        b, m, _ = bit_masks(distinct(pfns))
        if len(b) == 0:
            return 0
        with self.lock:
            # distinct pages have disjoint bits, also where they share a byte: adding the new
            # ones sets them and subtracting the set ones clears them (np.add.at is exact where
            # a scatter would keep one write per byte)
            wr = self._written.bytes
            new = m & ~wr[b]
            np.add.at(wr, b, new)
            if self.invalidate:
                skip = self._skip.bytes
                hit = m & skip[b]
                self.skips_invalidated += popcount(hit)
                np.subtract.at(skip, b, hit)
            first = popcount(new)
            self.faults += first
        return first

    def _on_written_few(self, pfns: list[int]) -> int:
        """:meth:`on_written` of a few pages (same effect) with scalar operations: the array
        path's fixed cost (about 20 us) was most of a synchronous fault's handling."""
        n = self.page_count
        first = 0
        with self.lock:
            wr, skip = self._written.bytes, self._skip.bytes
            for pfn in pfns:
                if not 0 <= pfn < n:
                    raise IndexError(f"pfn {pfn} outside the page state's {n} pages")
                i, bit = pfn >> 3, 1 << (pfn & 7)
                old = int(wr[i])
                if not old & bit:
                    wr[i] = old | bit
                    first += 1
                if self.invalidate:
                    sk = int(skip[i])
                    if sk & bit:
                        skip[i] = sk & ~bit
                        self.skips_invalidated += 1
            self.faults += first
        return first

    def apply_hints(self, ranges: np.ndarray) -> int:
        """Mark hinted free ranges in the skip bitmap now; return the pages newly marked.

        ``ranges`` is an ``(n, 2)`` array of ``[start_pfn, npages]`` already validated by the
        protocol layer: each range a naturally aligned power of two inside the guest. Hints events
        carry their block orders already; they go to :meth:`apply_blocks` directly.
        """
        ranges = np.asarray(ranges, dtype=np.uint64).reshape(-1, 2)
        return self.apply_blocks(ranges[:, 0], pages_order(ranges[:, 1]))

    def apply_blocks(self, starts: np.ndarray, orders: np.ndarray) -> int:
        """Mark the free blocks ``(starts[i], orders[i])`` in the skip bitmap now (staged ones
        first); return the pages newly marked (``starts``: uint64 pfns, ``orders``: uint8;
        validated as for :meth:`apply_hints`).

        ``skip |= block & ~written`` for every block, vectorised: blocks of 8 pages and more are
        whole bytes of the bitmaps (a gather, a few word operations and a scatter per block size,
        on a reshaped view); smaller ones are bit masks within a byte, merged per byte first.
        """
        orders = np.asarray(orders, dtype=np.uint8)
        # validated values are < 2**40, so the int64 view is exact (and indexes without a cast)
        starts = np.asarray(starts, dtype=np.uint64).view(np.int64)
        with self.lock:
            before = self._pages_marked
            self._flush_locked()
            if len(orders):
                self._apply_locked(starts, orders)
            return self._pages_marked - before

    def stage_hints(self, ranges: np.ndarray) -> None:
        """Stage hinted ranges (validated, as for :meth:`apply_hints`) to be applied with others
        later: before the page sets are next read, once :attr:`STAGE_RANGES` blocks are staged,
        and before the round ends. The array is kept, not copied: the caller must not change it
        (a decoded Hints frame's ranges are read-only).

        Staging one frame costs a list append; the frames are joined and applied together, which
        is what makes frames of 32 ranges cheap (one apply call per frame costs ~20 us, all of it
        fixed cost).
        """
        if len(ranges) == 0:
            return
        with self.lock:
            self._staged.append(ranges)
            self._staged_blocks += len(ranges)
            if self._staged_blocks >= self.STAGE_RANGES:
                self._flush_locked()

    @property
    def staged_blocks(self) -> int:
        """Blocks staged and not yet applied."""
        return self._staged_blocks

    def flush(self) -> int:
        """Apply every staged block now; return the pages newly marked."""
        if not self._staged:
            return 0
        with self.lock:
            before = self._pages_marked
            self._flush_locked()
            return self._pages_marked - before

    # -------------------------------------------------------------- kernels
    def _flush_locked(self) -> None:
        staged = self._staged
        if not staged:
            return
        self._staged = []
        self._staged_blocks = 0
        ranges = staged[0] if len(staged) == 1 else np.concatenate(staged)
        # validated values are < 2**40: the int64 view is exact
        self._apply_locked(ranges[:, 0].view(np.int64), pages_order(ranges[:, 1]).astype(np.uint8, copy=False))

    def _apply_locked(self, starts: np.ndarray, orders: np.ndarray) -> None:
        n = len(orders)
        cut = np.flatnonzero(orders[1:] != orders[:-1]) + 1
        # The walker sends blocks top order first, ascending pfn: a batch is a few runs of one
        # size, processed as slices (a size may come back in a later run: runs are applied one
        # after the other, so that is fine). Anything else is grouped by a stable sort of the
        # orders (a radix sort of bytes).
        if len(cut) < 2 * _NR_SIZES:
            edges = [0, *cut.tolist(), n]
            groups = [(int(orders[a]), starts[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        else:
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
            step = _CHUNK_ROWS if order <= 6 else max(1, _CHUNK_BYTES >> (order - 3))
            mark = self._mark_rows if order >= 3 else self._mark_bits
            for i in range(0, len(sel), step):
                m, r = mark(order, sel[i:i + step])
                marked += m
                refused += r
        self._pages_marked += marked
        self._pages_refused_written += refused

    def _mark_rows(self, k: int, sel: np.ndarray) -> tuple[int, int]:
        """Blocks of order ``k >= 3`` at ``sel``: whole bytes. Return (marked, refused) pages."""
        nbytes = 1 << (k - 3)
        rows = sel >> k
        # one element per block: an unsigned word of 1..8 bytes, above that an opaque item of
        # the block's bytes (numpy moves those with one copy each, several times faster than
        # rows of a 2-D array), viewed as u64 words for the arithmetic
        dt = _WORD.get(nbytes) or np.dtype(f"V{nbytes}")
        skip = self._skip.bytes.view(dt)
        old = skip.take(rows)
        ok = self._written.bytes.view(dt).take(rows) if self.refuse_written else None
        if nbytes > 8:
            old, ok = old.view(np.uint64), (None if ok is None else ok.view(np.uint64))
        refused = 0
        if ok is not None:
            refused = popcount(ok)
            np.bitwise_or(ok, old, out=ok)
            np.invert(ok, out=ok)  # pages neither written nor skipped yet
        else:
            ok = np.invert(old)
        marked = popcount(ok)
        np.bitwise_or(ok, old, out=ok)
        skip[rows] = ok.view(dt)
        return marked, refused

    def _mark_bits(self, k: int, sel: np.ndarray) -> tuple[int, int]:
        """Blocks of order ``k < 3`` at ``sel``: bit masks within bytes. Return (marked, refused).

        Several blocks may share a byte, and a scatter keeps one write per byte: the new bits are
        added with ``np.add.at`` (exact for distinct blocks, whose bits are disjoint, once masked
        to the pages not skipped yet) or, for blocks not ascending (maybe repeated), ORed with
        ``np.bitwise_or.at``.
        """
        b, m, distinct = bit_masks(sel, k)
        skip = self._skip.bytes
        t = skip.take(b)
        refused = 0
        if self.refuse_written:
            w = self._written.bytes.take(b)
            refused = _count_bits(k, m & w)
            np.bitwise_or(t, w, out=t)
        np.invert(t, out=t)
        np.bitwise_and(m, t, out=m)  # pages neither written nor skipped yet
        (np.add.at if distinct else np.bitwise_or.at)(skip, b, m)
        return _count_bits(k, m), refused


def _count_bits(k: int, masks: np.ndarray) -> int:
    """Bits set in masks of blocks of order ``k`` (one bit at most each for order 0)."""
    return int(np.count_nonzero(masks)) if k == 0 else popcount(masks)


_NO_PAGES = np.empty(0, dtype=np.int64)
# Up to this many pages, on_written uses scalar operations (cheaper than the array path's fixed cost).
_FEW_PAGES = 8
# Block sizes 2**0 .. 2**MAX_RANGE_ORDER.
_NR_SIZES = MAX_RANGE_ORDER + 1
# A block of 8..64 pages is exactly one 1..8-byte word of the bitmap.
_WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_CHUNK_ROWS = 1 << 15  # blocks of <= 64 pages per step (256 KiB of int64 row numbers)
_CHUNK_BYTES = 1 << 18  # bitmap bytes per step for larger blocks
