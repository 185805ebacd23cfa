"""Lock-bounded free-list walker: the guest side of free page hinting, one batch per zone-lock hold.

The producer calls :meth:`FreeListWalker.next_batch` with the zone lock held;
each call returns at most ``batch`` free blocks and gives up early once
``time_budget_us`` has passed, so the lock hold per batch is bounded by a
block count and a time budget. Between batches the lock is
dropped and the guest allocates and frees freely, so:

* every candidate is re-validated at the moment it is returned (it must be a
  listed free head of that order and not already REPORTED this round);
* blocks inserted into the free lists during the walk (freed, or merged into
  a bigger block) at order >= ``min_order`` come in through the allocator's
  insert log and are visited too, higher orders first;
* a returned block is flagged REPORTED, and inserting a block clears the
  flag, so a block is reported twice in a round only if it was freed again.

In ``isolate`` mode (``mm/page_reporting.c`` style) returned blocks are
also taken off the free lists until the host acks them (:meth:`release`).

Sans-I/O and lock-free: the producer owns the lock and the clock for the
lock-hold measurement; the walker records its own per-batch duration too.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

from hintpipe.units import MAX_ORDER, NR_ORDERS

from .buddy import ISOLATED, REPORTED, BuddyAllocator

__all__ = ["Walker", "FreeListWalker", "WalkerStats", "DEFAULT_MIN_ORDER", "DEFAULT_BATCH"]

#: pageblock_order on x86 (2 MiB): the default page_reporting_order.
DEFAULT_MIN_ORDER = 9
#: PAGE_REPORTING_CAPACITY: blocks per report in mm/page_reporting.c.
DEFAULT_BATCH = 32
# Per-batch durations kept for percentiles (a ring: bounded memory).
_RING = 1 << 14
# Candidates validated per vectorised step, as a multiple of the room left
# in the batch: most snapshot entries are still valid, so 2x rarely loops.
_OVERSCAN = 2
# Upper bound of one validation window (about a millisecond of numpy work).
_MAX_WINDOW = 1 << 16

# A candidate is skipped if either flag is set on its head.
_SKIP = ISOLATED | REPORTED

_EMPTY = (np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint8))
# Per order, a row of that order to copy the batch's orders from (cheaper than np.full).
_ORDER_FILL = np.repeat(np.arange(MAX_ORDER + 1, dtype=np.uint8)[:, None], 4096, axis=1)


@dataclass
class WalkerStats:
    """Counters of a walker over its lifetime (all rounds)."""

    rounds: int = 0
    batches: int = 0
    blocks: int = 0
    pages: int = 0
    max_batch_len: int = 0
    last_batch_s: float = 0.0
    budget_stops: int = 0  #: batches cut short by the time budget
    durations: np.ndarray = field(default_factory=lambda: np.zeros(_RING, dtype=np.float64))
    _n_dur: int = 0

    def record_batch(self, n_blocks: int, n_pages: int, dt: float, cut: bool) -> None:
        """Count one batch of ``n_blocks`` blocks (``n_pages`` pages) that took ``dt`` seconds;
        ``cut``: the time budget ended it."""
        self.batches += 1
        self.blocks += n_blocks
        self.pages += n_pages
        self.max_batch_len = max(self.max_batch_len, n_blocks)
        self.last_batch_s = dt
        self.budget_stops += int(cut)
        self.durations[self._n_dur % _RING] = dt
        self._n_dur += 1

    def batch_durations(self) -> np.ndarray:
        """The recorded per-batch durations in seconds (last ``_RING`` batches)."""
        return self.durations[: min(self._n_dur, _RING)].copy()

    def percentiles(self) -> dict[str, float]:
        """p50/p99/max per-batch duration in microseconds (0 if no batch yet)."""
        d = self.batch_durations()
        if d.size == 0:
            return {"p50_us": 0.0, "p99_us": 0.0, "max_us": 0.0}
        p50, p99 = np.percentile(d, [50, 99]) * 1e6
        return {"p50_us": float(p50), "p99_us": float(p99), "max_us": float(d.max() * 1e6)}


class Walker(Protocol):
    """What the producer drives: a lock-bounded walk of a guest's free blocks, one per round.

    :class:`FreeListWalker` walks the buddy allocator; the replay's
    :class:`~hintpipe.trace.replay.TraceWalker` walks a recorded kernel's free pages.
    """

    isolate: bool
    """Returned blocks stay off the free lists until :meth:`release`."""

    @property
    def done(self) -> bool:
        """No more blocks to visit this round."""

    def start_round(self) -> None:
        """Begin a walk (called with the zone lock held)."""

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next ``(pfns, orders)`` of free blocks (called with the zone lock held)."""

    def release(self, pfns: ArrayLike, orders: ArrayLike) -> None:
        """Put isolated blocks back once the host has acked them."""


class FreeListWalker:
    """Walk the free lists of ``alloc`` in bounded batches, one round at a time.

    ``min_order``: smallest block order reported (9 = 2 MiB, like
    page_reporting_order). ``batch``: most blocks per :meth:`next_batch`.
    ``time_budget_us``: a batch stops early once this much time has passed
    (checked between vectorised steps, so it can be exceeded by one step).
    ``isolate``: take returned blocks off the free lists until released.

    One walker per allocator: it owns the allocator's insert log.
    """

    def __init__(
        self,
        alloc: BuddyAllocator,
        *,
        min_order: int = DEFAULT_MIN_ORDER,
        batch: int = DEFAULT_BATCH,
        time_budget_us: float = 200.0,
        isolate: bool = False,
    ) -> None:
        if not 0 <= min_order <= MAX_ORDER:
            raise ValueError(f"min_order {min_order} outside 0..{MAX_ORDER}")
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.alloc = alloc
        self.min_order = int(min_order)
        self.batch = int(batch)
        self.time_budget_s = float(time_budget_us) * 1e-6
        self.isolate = bool(isolate)
        self.stats = WalkerStats()
        self.round = 0  #: number of start_round() calls so far (0 = none)
        self._active = False
        # per order: deque of pfn arrays still to visit; _pos: cursor in the front one
        self._queues: list[deque[np.ndarray]] = [deque() for _ in range(NR_ORDERS)]
        self._pos = [0] * NR_ORDERS
        self._deadline = 0.0
        self._steps = 0  # vectorised steps in the current batch
        self._cut = False  # the current batch hit the time budget
        self._found = 0  # blocks found so far in the current batch
        self._misses = 0  # consecutive windows without a valid candidate
        # isolate mode: blocks in flight {pfn: (order, round)}
        self._start_orders: list[int] = []  # orders whose start step is still due
        self._inflight: dict[int, tuple[int, int]] = {}

    # ----------------------------------------------------------------- rounds
    @property
    def active(self) -> bool:
        """A round is in progress (started, not stopped, not complete)."""
        return self._active

    @property
    def done(self) -> bool:
        """No round in progress: the walk completed, was stopped, or never began."""
        return not self._active

    @property
    def inflight(self) -> int:
        """Isolate mode: blocks returned and not yet released."""
        return len(self._inflight)

    def start_round(self) -> None:
        """Begin a new walk (a new host command id). Call with the zone lock held.

        Turns on the allocator's insert log (so blocks freed or merged during
        the walk are visited) and schedules one *start step* per order, top
        order first: clear REPORTED on that order's listed blocks and snapshot
        them. The steps run inside the following :meth:`next_batch` calls,
        under the time budget (at least one step per call), so no single lock
        hold pays for every free block; a step costs O(listed blocks of its
        order). No block is reported before every step is done, so clearing
        REPORTED can never erase a mark of this round. Any previous round is
        abandoned.
        """
        self.alloc.enable_insert_log(self.min_order)
        for q in self._queues:
            q.clear()
        self._pos = [0] * NR_ORDERS
        self._start_orders = list(range(MAX_ORDER, self.min_order - 1, -1))
        self.round += 1
        self.stats.rounds += 1
        self._active = True

    def _start_step(self) -> None:
        """One order's share of starting a walk (see :meth:`start_round`)."""
        order = self._start_orders.pop(0)
        listed = self.alloc.listed_blocks(order)
        if listed.size:
            self.alloc.meta[listed] &= ~np.uint8(REPORTED)
            self._queues[order].append(listed)

    def stop(self) -> None:
        """Abandon the walk (host StopRound); the next next_batch() is empty.

        In isolate mode, blocks already returned stay isolated until
        :meth:`release` is called for them (the producer releases them when
        the host acks, even after stop); on release they go back unreported
        if they belong to an earlier round than the current one.
        """
        self._active = False
        self._start_orders = []
        self.alloc.disable_insert_log()
        for q in self._queues:
            q.clear()
        self._pos = [0] * NR_ORDERS

    # ---------------------------------------------------------------- batches
    def _pull_log(self) -> None:
        """Move logged insertions into the per-order queues."""
        if not self.alloc.has_pending_inserts:  # the common case: skip the empty-array copies
            return
        p, o = self.alloc.drain_insert_log()
        if p.size == 0:
            return
        for order in np.unique(o).tolist():
            if order >= self.min_order:
                self._queues[order].append(p[o == order].astype(np.int64))

    def _take(self, order: int, room: int) -> np.ndarray:
        """Up to ``room`` valid candidates of ``order`` (vectorised), as int64."""
        q = self._queues[order]
        a = self.alloc
        got: list[np.ndarray] = []
        while room > 0 and q:
            arr = q[0]
            pos = self._pos[order]
            # a window that found nothing doubles the next one, so a long
            # run of stale candidates costs few (vectorised) steps
            width = min(room * _OVERSCAN << self._misses, _MAX_WINDOW)
            win = arr[pos : pos + width]
            # is_free_head() and not REPORTED, inlined: the pfns come from the
            # allocator (in range) and this is the per-batch hot path. One
            # queue array never names a pfn twice (snapshot and log are
            # sets); the same block in two arrays is caught by REPORTED,
            # which is set below before the next window is read.
            ok = (a.head[win] == order + 1) & ((a.meta[win] & _SKIP) == 0)
            idx = ok.nonzero()[0]  # 1-D: flatnonzero without its Python wrapper
            if idx.size > room:
                idx = idx[:room]
                consumed = int(idx[-1]) + 1
            else:
                consumed = win.size
            sel = win[idx]
            self._misses = 0 if sel.size else min(self._misses + 1, 30)
            if sel.size:
                self._found += sel.size
                got.append(sel)
                # mark now so a duplicate later in this batch is filtered
                a.meta[sel] |= REPORTED
                room -= sel.size
            pos += consumed
            self._steps += 1
            if pos >= arr.size:
                q.popleft()
                pos = 0
            self._pos[order] = pos
            if time.perf_counter() > self._deadline:  # after a step: every call makes progress
                self._cut = True
                break
        if not got:
            return np.empty(0, dtype=np.int64)
        return got[0] if len(got) == 1 else np.concatenate(got)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Return up to ``batch`` free blocks (pfns uint64, orders uint8).

        Call with the zone lock held. Every returned block is a listed free
        head of that order at this moment and was not reported earlier in
        this round unless freed again since; it is flagged REPORTED (and
        isolated in isolate mode). Higher orders first, including blocks
        inserted at a higher order after the walk moved below it.

        The time budget is checked after every vectorised step (start steps
        included), so a batch can be empty while the walk goes on: the walk
        is over only when :attr:`done` is True. Each call makes at least one
        step, so the walk terminates. Scanning stale candidates uses doubling
        windows, so even that case stays a few vectorised steps.
        """
        if not self._active:
            return _EMPTY[0].copy(), _EMPTY[1].copy()
        t0 = time.perf_counter()
        self._deadline = t0 + self.time_budget_s
        self._steps = 0
        self._found = 0
        self._misses = 0
        self._cut = False
        while self._start_orders:
            self._start_step()
            self._steps += 1
            if time.perf_counter() > self._deadline:
                break
        if self._start_orders:  # budget spent starting the walk: report nothing yet
            self.stats.record_batch(0, 0, time.perf_counter() - t0, True)
            return _EMPTY[0].copy(), _EMPTY[1].copy()
        self._pull_log()
        room = self.batch
        parts_p: list[np.ndarray] = []
        parts_o: list[np.ndarray] = []
        cut = False
        npages = 0
        for order in range(MAX_ORDER, self.min_order - 1, -1):
            if room == 0:
                break
            # checked after at least one step, so even a zero budget progresses
            if self._steps and time.perf_counter() > self._deadline:
                cut = True
                break
            sel = self._take(order, room)
            if sel.size:
                parts_p.append(sel)
                if sel.size <= _ORDER_FILL.shape[1]:
                    parts_o.append(_ORDER_FILL[order][: sel.size].copy())
                else:
                    parts_o.append(np.full(sel.size, order, dtype=np.uint8))
                room -= sel.size
                npages += sel.size << order
        if len(parts_p) == 1:
            pfns, orders = parts_p[0], parts_o[0]
        elif parts_p:
            pfns = np.concatenate(parts_p)
            orders = np.concatenate(parts_o)
        else:
            pfns = np.empty(0, dtype=np.int64)
            orders = np.empty(0, dtype=np.uint8)
        if pfns.size and self.isolate:
            # isolate() flags ISOLATED and drops REPORTED; the walker keeps
            # the block off the lists so it cannot be re-reported meanwhile.
            self.alloc.isolate(pfns, orders)
            for p, o in zip(pfns.tolist(), orders.tolist()):
                self._inflight[p] = (o, self.round)
        cut = cut or self._cut
        if pfns.size == 0 and not cut and not any(self._queues) and not self.alloc.has_pending_inserts:
            self._active = False
            self.alloc.disable_insert_log()
        dt = time.perf_counter() - t0
        self.stats.record_batch(int(pfns.size), npages, dt, cut)
        # pfns are non-negative int64: a uint64 view, not a copy
        return pfns.view(np.uint64), orders

    def release(self, pfns: ArrayLike, orders: ArrayLike) -> None:
        """Isolate mode: the host acked these blocks; put them back (merging).

        Blocks of the current round come back REPORTED unless they merged
        (as mm/page_reporting.c); blocks of an earlier round come back
        unreported, so the current round reports them again. No-op when
        not in isolate mode. Raises ValueError for a block not in flight.
        """
        if not self.isolate:
            return
        pfns = np.asarray(pfns, dtype=np.int64).ravel()
        orders = np.asarray(orders, dtype=np.int64).ravel()
        cur = np.zeros(pfns.size, dtype=np.bool_)
        for i, (p, o) in enumerate(zip(pfns.tolist(), orders.tolist())):
            ent = self._inflight.get(p)
            if ent is None or ent[0] != o:
                raise ValueError(f"release of pfn={p} order={o}: not in flight")
            cur[i] = ent[1] == self.round and self._active
        for p in pfns.tolist():
            del self._inflight[p]
        if cur.any():
            self.alloc.putback(pfns[cur], orders[cur], mark_reported=True)
        if (~cur).any():
            self.alloc.putback(pfns[~cur], orders[~cur], mark_reported=False)
