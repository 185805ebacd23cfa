"""Replay model of the Linux page allocator: which pages are buddy-free (what /proc/buddyinfo
counts) as kmem events are applied in trace order.

Kernel semantics (mm/page_alloc.c, Linux 6.x), one page state change per event:

- ``mm_page_alloc_zone_locked``: the block left the buddy free lists under zone->lock (to a pcp
  list when ``percpu_refill=1``, else straight to the caller): not buddy-free.
- ``mm_page_alloc``: a caller got the block, from a pcp list or the buddy: not buddy-free (a
  no-op after a zone-locked event; it catches blocks taken by paths without one, such as the
  fallback "steal" refill of a pcp list).
- ``mm_page_free``: emitted for every free in free_pages_prepare(). Orders the pcp lists accept
  (``pcp_allowed_order``: order <= PAGE_ALLOC_COSTLY_ORDER = 3, or the THP order 9) go to a pcp
  list, so they do *not* become buddy-free yet; larger orders go straight to the buddy.
- ``mm_page_free_batched``: free_unref_folios() emits it for a page that already had its
  mm_page_free event, just before putting it on a pcp list: no state change.
- ``mm_page_pcpu_drain``: free_pcppages_bulk() moved the block from a pcp list to the buddy:
  buddy-free.

Fidelity (free pages at the end vs /proc/buddyinfo read right after tracing stopped): tar-gzip
875 495 vs 875 425 (+0.008 %); numpy-churn 879 529 vs 875 726 (+0.43 %), of which 3 584 pages are
exactly one order-9 plus three order-10 blocks missing from buddyinfo.end, consistent with blocks
that free page reporting (order >= 9 on this kind of guest) had isolated when it was read, which
no kmem event shows; below order 9 the difference is 219 pages (0.025 %). Recordings made by
``hintpipe record`` (tracing enabled before the snapshot, buddyinfo.end read the moment it
stops) replay to within 0.02 %, often exactly.

Not visible in these five events, hence not modelled: pages taken from the buddy by the pcp
"steal" refill path before they are allocated, compaction's isolated free pages, and free page
reporting's isolated blocks.

Application is vectorised: within a step, every event is expanded to its 2**order pages and one
fancy assignment writes each page's new state; numpy assigns repeated indices in order, so the
last event of a page wins, which is exactly sequential replay.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from hintpipe.units import NR_ORDERS, block_pages, order_pages, run_pages

from .events import EventBatch, EventType
from .snapshot import decompose

PAGE_ALLOC_COSTLY_ORDER = 3
HPAGE_PMD_ORDER = 9  # x86-64 THP order; its frees also go through the pcp lists
BLOCK_ORDER = 8  # blocks of 256+ pages are written as rows of a reshaped view, not page by page
MAX_RUNS = 256  # more alternations of block sizes than this in one step: expand everything


def pcp_allowed_order(order: np.ndarray, thp_order: int | None = HPAGE_PMD_ORDER) -> np.ndarray:
    """Orders freed to per-CPU lists rather than straight to the buddy (mm/page_alloc.c)."""
    ok = order <= PAGE_ALLOC_COSTLY_ORDER
    if thp_order is not None:
        ok |= order == thp_order
    return ok


def effect_table(thp_order: int | None = HPAGE_PMD_ORDER) -> np.ndarray:
    """int8[event type, order]: +1 the block becomes buddy-free, -1 it stops being, 0 no change."""
    orders = np.arange(NR_ORDERS)
    tab = np.zeros((len(EventType), NR_ORDERS), np.int8)
    tab[EventType.ALLOC] = -1
    tab[EventType.ALLOC_ZONE_LOCKED] = -1
    tab[EventType.PCPU_DRAIN] = 1
    tab[EventType.FREE] = np.where(pcp_allowed_order(orders, thp_order), 0, 1)
    return tab


def event_effects(etype: np.ndarray, order: np.ndarray, thp_order: int | None = HPAGE_PMD_ORDER) -> np.ndarray:
    """Per event: +1 the block becomes buddy-free, -1 it stops being buddy-free, 0 no change."""
    return effect_table(thp_order)[etype, order]


_ALLOC = int(EventType.ALLOC)
_FREE = int(EventType.FREE)
_DRAIN = int(EventType.PCPU_DRAIN)


class ReplayModel:
    """Buddy-free pages of a guest, advanced through a stream of events in trace time.

    ``initial_free``: bool[page_count] of buddy-free pages at the start (kpageflags BUDDY bits).
    ``batches``: EventBatches in trace order (an iterator is consumed lazily, so memory stays
    bounded by what one step needs).

    Typical use by a migration replay::

        while not model.done:
            t += step
            allocated, freed = model.advance_to(t)
            memory.write(allocated)
    """

    def __init__(self, initial_free: np.ndarray, batches: Iterable[EventBatch], thp_order: int | None = HPAGE_PMD_ORDER,
                 *, copy: bool = True):
        # copy=False: the model advances ``initial_free`` itself (a caller that is done with it)
        self.free_mask = np.array(initial_free, dtype=bool, copy=True if copy else None)
        self.page_count = len(self.free_mask)
        self.thp_order = thp_order
        self._it: Iterator[EventBatch] = iter(batches)
        self._pending: EventBatch = EventBatch.empty()
        self._pos = 0
        self._exhausted = False
        self.events_applied = 0
        self.t_ns: int | None = None  # trace time of the last applied event
        self.first_ts_ns: int | None = None
        self._scratch: np.ndarray | None = None
        self._effects = effect_table(thp_order)

    # -- event stream --------------------------------------------------------------------
    # Pending events are self._pending[self._pos:]; steps take views, so a small step costs a
    # few array operations, not a copy of what is pending.
    def _remaining(self) -> int:
        return len(self._pending) - self._pos

    def _pull(self) -> bool:
        """Append the next non-empty batch to the pending events; False at the end."""
        while not self._exhausted:
            try:
                b = next(self._it)
            except StopIteration:
                self._exhausted = True
                return False
            if not len(b):
                continue
            if self.first_ts_ns is None:
                self.first_ts_ns = int(b.ts_ns[0])
            if self._remaining():
                self._pending = EventBatch.concat([self._pending.take(slice(self._pos, None)), b])
            else:
                self._pending = b
            self._pos = 0
            return True
        return False

    @property
    def done(self) -> bool:
        """True once every event has been applied."""
        if not self._remaining():
            self._pull()
        return not self._remaining() and self._exhausted

    def peek_first_ts_ns(self) -> int | None:
        """Trace time of the first event (None for an empty trace)."""
        if self.first_ts_ns is None:
            self._pull()
        return self.first_ts_ns

    # -- applying events -------------------------------------------------------------------
    def _unique(self, pages: np.ndarray) -> np.ndarray:
        """Sorted unique pages; large sets go through a scratch bitmap instead of a sort."""
        if len(pages) <= 1:
            return pages.astype(np.int64, copy=False)
        if len(pages) > self.page_count >> 5:
            if self._scratch is None:
                self._scratch = np.zeros(self.page_count, bool)
            self._scratch[pages] = True
            out = np.flatnonzero(self._scratch)
            self._scratch[out] = False
            return out
        s = np.sort(pages)
        keep = np.empty(len(s), bool)
        keep[0] = True
        np.not_equal(s[1:], s[:-1], out=keep[1:])
        return s[keep]

    def _assign_pages(self, pfn: np.ndarray, order: np.ndarray, val: np.ndarray) -> None:
        pages, idx = run_pages(pfn, order_pages(order), return_index=True)
        self.free_mask[pages] = val[idx]  # repeated pages: the last event wins (sequential order)

    def _assign(self, pfn: np.ndarray, order: np.ndarray, val: np.ndarray) -> None:
        """Set the state of blocks in event order. Large aligned blocks are written as rows of a
        reshaped view (no per-page expansion); runs of events keep their relative order."""
        big = order >= BLOCK_ORDER
        if not big.any():
            self._assign_pages(pfn, order, val)
            return
        key = np.where(big, order.astype(np.int16), -1)
        bounds = np.flatnonzero(key[1:] != key[:-1]) + 1
        if len(bounds) > MAX_RUNS:
            self._assign_pages(pfn, order, val)
            return
        edges = np.concatenate(([0], bounds, [len(key)]))
        for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
            k = int(key[lo])
            p = pfn[lo:hi]
            if k < 0 or (p & np.uint64((1 << k) - 1)).any() or self.page_count % (1 << k):
                self._assign_pages(p, order[lo:hi], val[lo:hi])
            else:
                view = self.free_mask.reshape(-1, 1 << k)
                view[(p >> np.uint64(k)).astype(np.int64)] = val[lo:hi, None]

    def apply(self, batch: EventBatch) -> tuple[np.ndarray, np.ndarray]:
        """Apply a batch in order. Returns (allocated pages, pages that became buddy-free), both
        unique sorted int64 arrays; "allocated" covers every page of every mm_page_alloc (each
        allocation counts as a write), "freed" the pages buddy-free now that were not before."""
        if not len(batch):
            e = np.empty(0, np.int64)
            return e, e
        eff = self._effects[batch.etype, batch.order]
        al = np.flatnonzero(batch.etype == _ALLOC)
        allocated = self._unique(block_pages(batch.pfn[al], batch.order[al])) if len(al) else np.empty(0, np.int64)
        plus = np.flatnonzero(eff > 0)
        cand = block_pages(batch.pfn[plus], batch.order[plus]) if len(plus) else np.empty(0, np.int64)
        before = self.free_mask[cand]
        act = np.flatnonzero(eff != 0)
        self._assign(batch.pfn[act], batch.order[act], eff[act] > 0)
        freed = self._unique(cand[~before & self.free_mask[cand]])
        self.events_applied += len(batch)
        self.t_ns = int(batch.ts_ns[-1])
        return allocated, freed

    def next_step(self, t_ns: int) -> EventBatch:
        """Take (without applying) every remaining event with ts_ns <= t_ns: a step to
        :meth:`apply`, so a caller can look at it first."""
        while (not self._remaining() or int(self._pending.ts_ns[-1]) <= t_ns) and self._pull():
            pass
        ts = self._pending.ts_ns
        cut = self._pos + int(np.searchsorted(ts[self._pos:], t_ns, side="right"))
        step = self._pending.take(slice(self._pos, cut))
        self._pos = cut
        return step

    def advance_to(self, t_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """Apply every remaining event with ts_ns <= t_ns; returns (allocated, freed) pages."""
        return self.apply(self.next_step(t_ns))

    def holders(self, batch: EventBatch) -> tuple[np.ndarray, np.ndarray]:
        """Who holds each page the ``mm_page_alloc``, ``mm_page_free`` and ``mm_page_pcpu_drain``
        events of ``batch`` touch, after the batch: ``(pages, freed)``, in event order, one
        entry per page of each event (assigned in order, the last event of a page wins).
        ``freed``: its last event freed it (to a per-CPU list or the buddy) or drained it from a
        per-CPU list to the buddy (it was freed before, perhaps before the trace began), so what
        it holds is no longer the guest's data; otherwise a caller got it and wrote it."""
        sel = np.flatnonzero((batch.etype == _ALLOC) | (batch.etype == _FREE) | (batch.etype == _DRAIN))
        if not len(sel):
            e = np.empty(0, np.int64)
            return e, e.astype(bool)
        pages, idx = run_pages(batch.pfn[sel], order_pages(batch.order[sel]), return_index=True)
        return pages, batch.etype[sel][idx] != _ALLOC

    def changed_blocks(self, batch: EventBatch) -> tuple[np.ndarray, np.ndarray]:
        """``(pfn, order)`` of the events of ``batch`` that set or clear buddy-free state."""
        act = self._effects[batch.etype, batch.order] != 0
        return batch.pfn[act], batch.order[act]

    def run_to_end(self, step_events: int = 1 << 16) -> None:
        """Apply everything that is left, in chunks of about ``step_events`` events."""
        while self._remaining() or self._pull():
            b = self._pending.take(slice(self._pos, None))
            self._pos = len(self._pending)
            for s in range(0, len(b), step_events):
                self.apply(b.take(slice(s, s + step_events)))

    # -- queries ------------------------------------------------------------------------------
    @property
    def nr_free_pages(self) -> int:
        """Pages buddy-free now."""
        return int(np.count_nonzero(self.free_mask))

    def free_blocks(self, min_order: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Current free pages as maximal aligned blocks of order >= min_order, top order first."""
        return decompose(self.free_mask, min_order)

    def free_by_order(self) -> list[int]:
        """Free blocks per order 0..10, as /proc/buddyinfo would count them (summed over zones)."""
        _, orders = decompose(self.free_mask)
        return np.bincount(orders, minlength=NR_ORDERS).tolist()

    def is_free_block(self, pfns: np.ndarray, orders: np.ndarray) -> np.ndarray:
        """bool per block: are all its 2**order pages still buddy-free?"""
        pfns = np.asarray(pfns, np.int64)
        orders = np.asarray(orders, np.int64)
        out = np.zeros(len(pfns), bool)
        inside = (pfns >= 0) & (pfns + (1 << orders) <= self.page_count)
        for k in np.unique(orders[inside]):
            k = int(k)
            sel = np.flatnonzero(inside & (orders == k))
            p = pfns[sel]
            aligned = (p & ((1 << k) - 1)) == 0
            m = self.page_count >> k
            view = self.free_mask[: m << k].reshape(m, 1 << k)
            out[sel[aligned]] = view[p[aligned] >> k].all(axis=1)
            if (~aligned).any():
                pages, idx = run_pages(p[~aligned], np.full((~aligned).sum(), 1 << k), return_index=True)
                bad = np.zeros(int((~aligned).sum()), bool)
                np.logical_or.at(bad, idx, ~self.free_mask[pages])
                out[sel[~aligned]] = ~bad
        return out


class FreeCounts:
    """Free pages per aligned block of ``2**order`` pages of a :class:`ReplayModel`, and per zone,
    kept current step by step: after a step, only the blocks its events touched are recounted.

    What the policies of a replay ask at every step (is this 2 MiB block entirely free? how much
    is free in this zone?) costs a gather of a few hundred blocks instead of a scan of the guest.
    ``zone_of_block``: zone index of each block (-1: none); zones are counted by block, so a block
    that straddles two zones counts in the zone of its last page.
    """

    def __init__(self, model: ReplayModel, order: int, zone_of_block: np.ndarray, nr_zones: int) -> None:
        self.model = model
        self.order = order
        self.size = 1 << order
        n = model.page_count
        self.nblocks = -(-n // self.size)
        self.counts = self._count(np.arange(self.nblocks))
        self.zone_of_block = zone_of_block
        self.zone_free = np.zeros(max(nr_zones, 1), np.int64)
        self.became_full = np.empty(0, np.int64)
        """Blocks the last :meth:`update` found entirely free that were not before it."""
        self.generation = 0
        """Incremented by every :meth:`update` that changed a count (for caches of derived state)."""
        ok = zone_of_block >= 0
        np.add.at(self.zone_free, zone_of_block[ok], self.counts[ok])

    def _count(self, blocks: np.ndarray) -> np.ndarray:
        fm = self.model.free_mask
        whole = len(fm) // self.size
        out = np.empty(len(blocks), np.int64)
        inside = blocks < whole
        if self.size >= 8:  # a bool is one byte 0/1: popcount whole words, eight pages at a time
            words = fm[: whole * self.size].view(np.uint64).reshape(-1, self.size >> 3)
            out[inside] = np.bitwise_count(words[blocks[inside]]).sum(axis=1, dtype=np.int64)
        else:
            out[inside] = fm[: whole * self.size].reshape(-1, self.size)[blocks[inside]].sum(axis=1, dtype=np.int64)
        if not inside.all():  # the last, partial block
            out[~inside] = np.count_nonzero(fm[whole * self.size:])
        return out

    @property
    def full(self) -> np.ndarray:
        """bool per block: all of its pages are free."""
        return self.counts == self.size

    def update(self, step: EventBatch) -> np.ndarray:
        """Recount the blocks the applied ``step`` touched; return their indices (sorted)."""
        pfn, order = self.model.changed_blocks(step)
        self.became_full = np.empty(0, np.int64)
        if not len(pfn):
            return self.became_full
        k = self.order
        first = (pfn >> np.uint64(k)).astype(np.int64)
        wide = order > k
        blocks = first if not wide.any() else np.concatenate(
            [first, run_pages(first[wide], order_pages(order[wide] - k))])
        blocks = np.unique(blocks)
        new = self._count(blocks)
        old = self.counts[blocks]
        delta = new - old
        self.counts[blocks] = new
        self.became_full = blocks[(new == self.size) & (old != self.size)]
        if (delta != 0).any():
            self.generation += 1
        z = self.zone_of_block[blocks]
        ok = (z >= 0) & (delta != 0)
        if ok.any():
            np.add.at(self.zone_free, z[ok], delta[ok])
        return blocks

