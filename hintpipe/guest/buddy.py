"""A Linux-like buddy allocator over one zone, with its state in numpy.

The model follows ``mm/page_alloc.c`` closely enough for free page hinting
to be meaningful: free blocks are naturally aligned power-of-two runs of
pages kept on per-(order, migratetype) free lists, allocation takes the
smallest fitting block and splits it (``expand()``), freeing merges with the
buddy while it can (``__free_one_page``), and page reporting may *isolate*
free blocks (take them off the lists while the host handles them) and put
them back (``__putback_isolated_page``).

Per-page state is three numpy byte arrays (about 3 bytes per page, so a
2**28-page / 1 TiB guest fits in 768 MiB and builds in well under a second);
per-block state is Python dicts used as insertion-ordered sets, one per free
list, because the number of free blocks is small compared with pages and the
kernel itself does per-block list operations under the zone lock.

This module is sans-I/O and lock-free: callers (the producer) provide the
zone lock.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from hintpipe.units import MAX_ORDER, NR_ORDERS

__all__ = [
    "NR_MIGRATETYPES",
    "MigrateType",
    "REPORTED",
    "ISOLATED",
    "MT_MASK",
    "BuddyAllocator",
]


class MigrateType(IntEnum):
    """Free-list migrate types (the subset that matters for hinting)."""

    UNMOVABLE = 0
    MOVABLE = 1
    RECLAIMABLE = 2


NR_MIGRATETYPES = len(MigrateType)

# Bits of the per-page ``meta`` array; meaningful on free-block heads only.
MT_MASK = 0x03  #: migratetype of the free list the block is on
REPORTED = 0x04  #: PageReported: already reported this round, not since reinserted
ISOLATED = 0x08  #: off the free lists while the host handles it (page_reporting)

# Like the kernel's fallbacks[] table: which lists to steal from, in order.
_FALLBACKS = {
    MigrateType.UNMOVABLE: (MigrateType.RECLAIMABLE, MigrateType.MOVABLE),
    MigrateType.MOVABLE: (MigrateType.RECLAIMABLE, MigrateType.UNMOVABLE),
    MigrateType.RECLAIMABLE: (MigrateType.UNMOVABLE, MigrateType.MOVABLE),
}

_EMPTY_PFNS = np.empty(0, dtype=np.uint64)
_EMPTY_ORDERS = np.empty(0, dtype=np.uint8)


def _check_order(order: int) -> int:
    order = int(order)
    if not 0 <= order <= MAX_ORDER:
        raise ValueError(f"order {order} outside 0..{MAX_ORDER}")
    return order


class BuddyAllocator:
    """Buddy allocator over ``page_count`` pages (one zone, PFNs from 0).

    Per-page numpy state (public for vectorised readers, do not write):

    * ``head``: uint8, ``order + 1`` if a free or isolated block of that
      order starts at this pfn, else 0 (0-based so ``np.zeros`` stays lazy).
    * ``meta``: uint8, migratetype bits | ``REPORTED`` | ``ISOLATED``, on heads.
    * ``free_mask``: bool, the page is free (on a free list or isolated).

    ``populate=True`` starts with all memory free as the largest aligned
    blocks (max-order blocks, the tail covered by smaller aligned blocks),
    all on the MOVABLE lists.
    """

    def __init__(self, page_count: int, *, populate: bool = True) -> None:
        page_count = int(page_count)
        if page_count <= 0:
            raise ValueError("page_count must be positive")
        self.page_count = page_count
        self.head = np.zeros(page_count, dtype=np.uint8)
        self.meta = np.zeros(page_count, dtype=np.uint8)
        self.free_mask = np.zeros(page_count, dtype=np.bool_)
        # _lists[order][mt]: {pfn: None}, insertion-ordered; the end is the
        # list head (most recently freed, allocated first: LIFO like the kernel).
        self._lists: list[list[dict[int, None]]] = [
            [{} for _ in range(NR_MIGRATETYPES)] for _ in range(NR_ORDERS)
        ]
        self._nr_free = 0
        self._nr_isolated = 0
        # Opt-in insert notification log for the walker: {pfn: order}, a
        # bounded ordered set (at most page_count >> min_order entries).
        self._log_min_order: int | None = None
        self._log: dict[int, int] = {}
        if populate:
            self._populate()

    # ------------------------------------------------------------------ setup
    def _populate(self) -> None:
        """Free everything as the largest aligned blocks, vectorised."""
        self.free_mask[:] = True
        n_max = self.page_count >> MAX_ORDER
        mt = int(MigrateType.MOVABLE)
        self.head[: n_max << MAX_ORDER : 1 << MAX_ORDER] = MAX_ORDER + 1
        self.meta[: n_max << MAX_ORDER : 1 << MAX_ORDER] = mt
        self._lists[MAX_ORDER][mt] = dict.fromkeys(range(0, n_max << MAX_ORDER, 1 << MAX_ORDER))
        # The tail (< 2**MAX_ORDER pages) as one aligned block per set bit,
        # largest first: each stays aligned because it starts after larger ones.
        pfn = n_max << MAX_ORDER
        for order in range(MAX_ORDER - 1, -1, -1):
            if self.page_count - pfn >= 1 << order:
                self.head[pfn] = order + 1
                self.meta[pfn] = mt
                self._lists[order][mt][pfn] = None
                pfn += 1 << order
        self._nr_free = self.page_count

    # ------------------------------------------------------ list primitives
    def _insert(self, pfn: int, order: int, mt: int) -> None:
        """Put a block on a free list (clears REPORTED/ISOLATED, logs it)."""
        self.head[pfn] = order + 1
        self.meta[pfn] = mt
        self._lists[order][mt][pfn] = None
        self._nr_free += 1 << order
        lmo = self._log_min_order
        if lmo is not None and order >= lmo:
            # move to the end so the log stays ordered by latest insert
            self._log.pop(pfn, None)
            self._log[pfn] = order

    def _unlink(self, pfn: int, order: int) -> None:
        """Take a listed (non-isolated) free block off its list."""
        mt = int(self.meta[pfn]) & MT_MASK
        del self._lists[order][mt][pfn]
        self.head[pfn] = 0
        self.meta[pfn] = 0
        self._nr_free -= 1 << order

    def _merge_insert(self, pfn: int, order: int, mt: int) -> tuple[int, int]:
        """``__free_one_page``: merge with free, listed buddies, then insert."""
        head = self.head
        meta = self.meta
        n = self.page_count
        while order < MAX_ORDER:
            buddy = pfn ^ (1 << order)
            if buddy >= n or head[buddy] != order + 1 or meta[buddy] & ISOLATED:
                break
            self._unlink(buddy, order)
            pfn &= ~(1 << order)
            order += 1
        self._insert(pfn, order, mt)
        return pfn, order

    def _find_listed(self, order: int, mts) -> tuple[int, int, int] | None:
        for mt in mts:
            lst = self._lists[order][mt]
            if lst:
                return lst.popitem()[0], order, int(mt)
        return None

    # ------------------------------------------------------------ allocation
    def alloc(self, order: int, mt: MigrateType = MigrateType.MOVABLE) -> int | None:
        """Allocate a 2**order block; return its head pfn or None if no memory.

        Like ``__rmqueue_smallest`` (smallest order >= ``order`` on ``mt``'s
        lists, most recently freed first), then, simplified
        ``__rmqueue_fallback``: steal from the other migratetypes' lists,
        largest block first; split remainders go to ``mt``'s lists.
        """
        order = _check_order(order)
        mt = int(mt)
        found = None
        for o in range(order, NR_ORDERS):
            found = self._find_listed(o, (mt,))
            if found:
                break
        if found is None:
            for o in range(MAX_ORDER, order - 1, -1):
                found = self._find_listed(o, _FALLBACKS[MigrateType(mt)])
                if found:
                    break
        if found is None:
            return None
        pfn, o, _ = found
        self.head[pfn] = 0
        self.meta[pfn] = 0
        self._nr_free -= 1 << o
        self._expand(pfn, order, o, mt)
        self.free_mask[pfn : pfn + (1 << order)] = False
        return pfn

    def _expand(self, pfn: int, low: int, high: int, mt: int) -> None:
        """``expand()``: put the upper halves of a split block on the lists."""
        while high > low:
            high -= 1
            self._insert(pfn + (1 << high), high, mt)

    def alloc_at(self, pfn: int, order: int) -> bool:
        """Allocate exactly the aligned block ``[pfn, pfn + 2**order)``.

        Succeeds only if the whole block lies inside one listed (not
        isolated) free block, which is split as needed; returns False
        otherwise (trace replay uses this to follow recorded allocations).
        """
        order = _check_order(order)
        pfn = int(pfn)
        if pfn < 0 or pfn & ((1 << order) - 1) or pfn + (1 << order) > self.page_count:
            return False
        if not self.free_mask[pfn]:
            return False
        for k in range(order, NR_ORDERS):
            hp = pfn & ~((1 << k) - 1)
            if self.head[hp] == k + 1:
                break
        else:
            return False  # inside a free block of order < `order`: not whole
        if self.meta[hp] & ISOLATED:
            return False
        mt = int(self.meta[hp]) & MT_MASK
        self._unlink(hp, k)
        # Split down towards pfn, listing the half that does not contain it.
        while k > order:
            k -= 1
            half = 1 << k
            if pfn & half:
                self._insert(hp, k, mt)
                hp += half
            else:
                self._insert(hp + half, k, mt)
        self.free_mask[pfn : pfn + (1 << order)] = False
        return True

    def alloc_bulk(
        self, npages: int, order: int = MAX_ORDER, mt: MigrateType = MigrateType.MOVABLE
    ) -> np.ndarray:
        """Allocate ceil(npages / 2**order) blocks of ``order``, vectorised.

        For fast initial population (e.g. 40% of a 2**28-page guest).
        Whole free blocks of order ``order`` and up are taken from the lists
        (all migratetypes, smallest order first, most recent first) and cut
        into ``order``-sized pieces with array operations; only a final
        partial split goes through :meth:`alloc`. Returns the head pfns
        (uint64); fewer blocks if memory runs out.
        """
        order = _check_order(order)
        need = -(-int(npages) // (1 << order))
        out: list[np.ndarray] = []
        for o in range(order, NR_ORDERS):
            if need <= 0:
                break
            per = 1 << (o - order)
            for m in range(NR_MIGRATETYPES):
                lst = self._lists[o][m]
                take = min(len(lst), need // per)
                if take == 0:
                    continue
                keys = list(lst)
                big = np.array(keys[len(keys) - take :], dtype=np.int64)
                self._lists[o][m] = dict.fromkeys(keys[: len(keys) - take])
                self.head[big] = 0
                self.meta[big] = 0
                span = (self.page_count >> o) << o
                self.free_mask[:span].reshape(-1, 1 << o)[big >> o] = False
                self._nr_free -= take << o
                pieces = (big[:, None] + (np.arange(per, dtype=np.int64) << order)[None, :]).ravel()
                out.append(pieces)
                need -= take * per
            if need > 0 and need < per:
                # a larger block exists only partly needed: split it normally
                while need > 0:
                    p = self.alloc(order, mt)
                    if p is None:
                        break
                    out.append(np.array([p], dtype=np.int64))
                    need -= 1
                break
        if not out:
            return _EMPTY_PFNS.copy()
        return np.concatenate(out).astype(np.uint64)

    def free(self, pfn: int, order: int, mt: MigrateType = MigrateType.MOVABLE) -> None:
        """Free an allocated block, merging with its buddies like ``__free_one_page``.

        Raises ValueError for a misaligned or out-of-range block, or if any
        of its pages is already free (double free).
        """
        order = _check_order(order)
        pfn = int(pfn)
        size = 1 << order
        if pfn < 0 or pfn & (size - 1) or pfn + size > self.page_count:
            raise ValueError(f"bad block pfn={pfn} order={order} (page_count {self.page_count})")
        if self.free_mask[pfn : pfn + size].any():
            raise ValueError(f"double free: block pfn={pfn} order={order} has free pages")
        if int(mt) not in (0, 1, 2):
            raise ValueError(f"bad migratetype {mt}")
        self.free_mask[pfn : pfn + size] = True
        self._merge_insert(pfn, order, int(mt))

    # ------------------------------------------------------------- queries
    @property
    def nr_free_pages(self) -> int:
        """Pages on the free lists (isolated pages excluded, as NR_FREE_PAGES)."""
        return self._nr_free

    @property
    def nr_isolated_pages(self) -> int:
        """Pages free but isolated (in flight to the host)."""
        return self._nr_isolated

    def free_counts(self) -> np.ndarray:
        """Listed free blocks per order, like a /proc/buddyinfo row (int64[11])."""
        return np.array([sum(len(d) for d in per_mt) for per_mt in self._lists], dtype=np.int64)

    def free_blocks(self, min_order: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """All listed free blocks of order >= ``min_order``, top order first.

        Returns (pfns uint64, orders uint8); within an order pfns ascend.
        Built from the free lists (O(blocks), not O(pages)).
        """
        pfn_parts: list[np.ndarray] = []
        ord_parts: list[np.ndarray] = []
        for o in range(MAX_ORDER, max(int(min_order), 0) - 1, -1):
            parts = [
                np.fromiter(d, dtype=np.uint64, count=len(d)) for d in self._lists[o] if d
            ]
            if not parts:
                continue
            p = np.sort(np.concatenate(parts))
            pfn_parts.append(p)
            ord_parts.append(np.full(p.size, o, dtype=np.uint8))
        if not pfn_parts:
            return _EMPTY_PFNS.copy(), _EMPTY_ORDERS.copy()
        return np.concatenate(pfn_parts), np.concatenate(ord_parts)

    def is_free_head(self, pfns, orders) -> np.ndarray:
        """Vectorised: is each pfn a listed (non-isolated) free head of that order?"""
        pfns = np.asarray(pfns, dtype=np.int64)
        orders = np.asarray(orders, dtype=np.int64)
        if orders.shape != pfns.shape:
            pfns, orders = np.broadcast_arrays(pfns, orders)
        ok = (pfns >= 0) & (pfns < self.page_count)
        idx = np.where(ok, pfns, 0)
        ok &= self.head[idx] == orders + 1
        ok &= (self.meta[idx] & ISOLATED) == 0
        return ok

    def is_reported(self, pfns) -> np.ndarray:
        """Vectorised REPORTED flag of the given pfns (False out of range)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        ok = (pfns >= 0) & (pfns < self.page_count)
        return ok & ((self.meta[np.where(ok, pfns, 0)] & REPORTED) != 0)

    def mark_reported(self, pfns) -> None:
        """Set REPORTED on the given free heads (vectorised)."""
        self.meta[np.asarray(pfns, dtype=np.int64)] |= REPORTED

    def clear_reported(self, min_order: int = 0) -> None:
        """Clear REPORTED on listed free blocks of order >= min_order (new round).

        REPORTED only ever lives on listed free heads (removal and insertion
        clear it), so this is O(blocks), not O(pages).
        """
        for per_mt in self._lists[max(int(min_order), 0) :]:
            for d in per_mt:
                if d:
                    self.meta[np.fromiter(d, dtype=np.int64, count=len(d))] &= ~np.uint8(REPORTED)

    # ------------------------------------------------------------ isolation
    def isolate(self, pfns, orders) -> None:
        """Take listed free blocks off their lists (page_reporting isolation).

        They stay free (``free_mask``) but are neither allocatable nor merge
        partners until :meth:`putback`. Raises ValueError (changing nothing)
        if any block is not currently a listed free head of that order.
        """
        pfns = np.asarray(pfns, dtype=np.int64).ravel()
        orders = np.asarray(orders, dtype=np.int64).ravel()
        if pfns.shape != orders.shape:
            raise ValueError("pfns and orders differ in length")
        ok = self.is_free_head(pfns, orders)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"cannot isolate pfn={int(pfns[bad])} order={int(orders[bad])}: not a free head")
        if pfns.size > 1 and np.unique(pfns).size != pfns.size:
            raise ValueError("duplicate blocks in isolate()")
        for pfn, order in zip(pfns.tolist(), orders.tolist()):
            mt = int(self.meta[pfn]) & MT_MASK
            del self._lists[order][mt][pfn]
        self.meta[pfns] = (self.meta[pfns] & MT_MASK) | ISOLATED
        sizes = int((np.int64(1) << orders).sum())
        self._nr_free -= sizes
        self._nr_isolated += sizes

    def putback(self, pfns, orders, *, mark_reported: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Return isolated blocks to the free lists, merging like free().

        With ``mark_reported`` a block that did not merge gets REPORTED, as
        mm/page_reporting.c does after ``__putback_isolated_page`` when the
        buddy order is unchanged; a merged block is new and unreported.
        Returns the resulting (heads, orders). Raises ValueError if a block
        is not an isolated head of that order.
        """
        pfns = np.asarray(pfns, dtype=np.int64).ravel()
        orders = np.asarray(orders, dtype=np.int64).ravel()
        if pfns.shape != orders.shape:
            raise ValueError("pfns and orders differ in length")
        inr = (pfns >= 0) & (pfns < self.page_count)
        idx = np.where(inr, pfns, 0)
        ok = inr & (self.head[idx] == orders + 1) & ((self.meta[idx] & ISOLATED) != 0)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"cannot put back pfn={int(pfns[bad])} order={int(orders[bad])}: not isolated")
        if pfns.size > 1 and np.unique(pfns).size != pfns.size:
            raise ValueError("duplicate blocks in putback()")
        out_p = np.empty(pfns.size, dtype=np.uint64)
        out_o = np.empty(pfns.size, dtype=np.uint8)
        for i, (pfn, order) in enumerate(zip(pfns.tolist(), orders.tolist())):
            mt = int(self.meta[pfn]) & MT_MASK
            self.head[pfn] = 0
            self.meta[pfn] = 0
            self._nr_isolated -= 1 << order
            hp, ho = self._merge_insert(pfn, order, mt)
            if mark_reported and ho == order:
                self.meta[hp] |= REPORTED
            out_p[i] = hp
            out_o[i] = ho
        return out_p, out_o

    # ---------------------------------------------------- insert notification
    def enable_insert_log(self, min_order: int) -> None:
        """Start logging blocks inserted into a free list at order >= min_order."""
        self._log_min_order = _check_order(min_order)
        self._log = {}

    def disable_insert_log(self) -> None:
        """Stop logging and drop pending entries."""
        self._log_min_order = None
        self._log = {}

    @property
    def has_pending_inserts(self) -> bool:
        """The insert log holds entries not yet drained."""
        return bool(self._log)

    def take_insert_log(self) -> dict[int, int]:
        """Return the log itself ({pfn: order}, oldest first) and start an empty one.

        O(1) whatever the log holds, so a walker can convert it in bounded pieces; the
        returned dict is the caller's (the allocator never touches it again). Entries may be
        stale, as with :meth:`drain_insert_log`.
        """
        log = self._log
        self._log = {}
        return log

    def drain_insert_log(self) -> tuple[np.ndarray, np.ndarray]:
        """Return and clear the logged (pfns uint64, orders uint8), oldest first.

        Entries may be stale (the block was allocated or merged since):
        validate with :meth:`is_free_head`. The log keeps one entry per pfn
        (the latest), so it is bounded by ``page_count >> min_order``.
        """
        log = self._log
        if not log:
            return _EMPTY_PFNS.copy(), _EMPTY_ORDERS.copy()
        p = np.fromiter(log.keys(), dtype=np.uint64, count=len(log))
        o = np.fromiter(log.values(), dtype=np.uint8, count=len(log))
        self._log = {}
        return p, o

    # ------------------------------------------------------------ invariants
    def check_invariants(self) -> None:
        """Assert the whole state is consistent (O(pages); for tests).

        Raises AssertionError with a message on the first violation.
        """
        n = self.page_count
        heads = np.flatnonzero(self.head).astype(np.int64)
        orders = self.head[heads].astype(np.int64) - 1
        sizes = np.int64(1) << orders
        assert (orders <= MAX_ORDER).all(), "head order out of range"
        assert ((heads & (sizes - 1)) == 0).all(), "misaligned free head"
        assert (heads + sizes <= n).all(), "free block past end of zone"
        # coverage: every page in at most one free block, exactly the free_mask
        diff = np.zeros(n + 1, dtype=np.int32)
        np.add.at(diff, heads, 1)
        np.add.at(diff, heads + sizes, -1)
        cover = np.cumsum(diff[:n])
        assert (cover <= 1).all(), "overlapping free blocks"
        assert ((cover == 1) == self.free_mask).all(), "free_mask disagrees with free blocks"
        meta = self.meta
        nonhead = np.ones(n, dtype=np.bool_)
        nonhead[heads] = False
        assert (meta[nonhead] == 0).all(), "meta bits set on a non-head page"
        hm = meta[heads]
        iso = (hm & ISOLATED) != 0
        assert ((hm & MT_MASK) < NR_MIGRATETYPES).all(), "bad migratetype"
        assert not (iso & ((hm & REPORTED) != 0)).any(), "isolated block flagged REPORTED"
        # list membership == non-isolated heads
        listed = {}
        for o in range(NR_ORDERS):
            for m in range(NR_MIGRATETYPES):
                for pfn in self._lists[o][m]:
                    assert pfn not in listed, f"pfn {pfn} on two lists"
                    listed[pfn] = (o, m)
        expect = {
            int(p): (int(o), int(m))
            for p, o, m in zip(heads[~iso], orders[~iso], (hm[~iso] & MT_MASK))
        }
        assert listed == expect, "free lists disagree with the head array"
        # no unmerged buddies among listed heads
        lh = heads[~iso]
        lo = orders[~iso]
        ho = np.full(n, -1, dtype=np.int8)
        ho[lh] = lo
        cand = lo < MAX_ORDER
        bud = lh[cand] ^ (np.int64(1) << lo[cand])
        inr = bud < n
        assert not (ho[bud[inr]] == lo[cand][inr]).any(), "two free buddies left unmerged"
        assert self._nr_free == int(sizes[~iso].sum()), "nr_free counter wrong"
        assert self._nr_isolated == int(sizes[iso].sum()), "nr_isolated counter wrong"
