"""Lock-bounded free-list walker: the guest side of free page hinting, one batch per zone-lock hold.

The producer calls :meth:`FreeListWalker.next_batch` with the zone lock held; each call returns
at most ``batch`` free blocks and ends once its time budget is spent. The budget is a promise:
the work inside a hold is a sequence of *steps*, each bounded by a constant amount of work
whatever the guest size (at most :data:`STEP_LINES` cache lines of the allocator's arrays, or
:data:`LOG_CHUNK` insert-log entries), and the walker reads its clock after every step and
stops when the next step, costed like the last one, would end past the budget
(:class:`HoldBudget`). So every hold ends within the budget plus at most one bounded step.
Between batches the lock is dropped and the guest allocates and frees freely, so:

* a walk starts by clearing last round's REPORTED flags, in steps over the pfn space, before it
  reports anything (so the clearing never erases a mark of this round);
* it then makes one pass per order, top order first: the pass over order ``k`` reads the head
  array at every ``2**k``-th pfn (where a block of that order can start), a bounded number of
  slots a step, so no step depends on how many blocks are free;
* blocks inserted into the free lists during the walk (freed, or merged into a bigger block) at
  order >= ``min_order`` come in through the allocator's insert log, converted in bounded pieces
  and visited too, higher orders first;
* every candidate is re-validated when it is returned (a listed free head of that order, not
  REPORTED this round); a returned block is flagged REPORTED and inserting a block clears the
  flag, so a block is reported twice in a round only if it was freed again.

In ``isolate`` mode (``mm/page_reporting.c`` style) returned blocks are also taken off the free
lists until the host acks them (:meth:`release`).

Sans-I/O and lock-free: the producer owns the lock; the walker's clock measures its budget and
its per-batch durations: the CPU time of the calling thread unless another is injected (a kernel
walks with preemption off; this process may be preempted mid-batch, see
:mod:`hintpipe.guest.zonelock`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterator, Protocol

import numpy as np
from numpy.typing import ArrayLike

from hintpipe.units import MAX_ORDER, NR_ORDERS

from .buddy import ISOLATED, REPORTED, BuddyAllocator

__all__ = ["Walker", "FreeListWalker", "WalkerStats", "DEFAULT_MIN_ORDER", "DEFAULT_BATCH",
           "DEFAULT_BUDGET_US", "STEP_LINES", "LOG_CHUNK", "step_slots", "HoldBudget"]

#: pageblock_order on x86 (2 MiB): the default page_reporting_order.
DEFAULT_MIN_ORDER = 9
#: PAGE_REPORTING_CAPACITY: blocks per report in mm/page_reporting.c.
DEFAULT_BATCH = 32
#: Zone-lock budget per hold, microseconds.
DEFAULT_BUDGET_US = 200.0
#: Most cache lines of the allocator's per-page arrays one step reads or writes: a step over
#: the pfn space reads one byte every ``2**order`` pages, so it covers ``STEP_LINES`` slots when
#: they lie a cache line or more apart and up to 64 per line when they are denser. Cold, a
#: line costs up to about 0.1 us here, so a step stays within tens of microseconds.
STEP_LINES = 512
#: Most insert-log entries one step converts to arrays.
LOG_CHUNK = 1024


def step_slots(stride: int) -> int:
    """Slots one step covers when they lie ``stride`` bytes apart (see :data:`STEP_LINES`)."""
    return STEP_LINES * max(1, 64 // stride)


# Per-batch durations kept for percentiles (a ring: bounded memory).
_RING = 1 << 14
# Candidates validated per queue window, as a multiple of the room left in the batch: most
# queued entries are still valid, so 2x rarely needs a second window.
_OVERSCAN = 2
# Most logged candidates one queue window validates (two random reads each: head and meta).
_QUEUE_WINDOW = STEP_LINES // 2
# Slots a pass reads per block still wanted in the batch (before doubling on misses).
_SCAN_SLOTS_PER_BLOCK = 4

# A candidate is skipped if either flag is set on its head.
_SKIP = ISOLATED | REPORTED

_EMPTY = (np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint8))
# Per order, a row of that order to copy the batch's orders from (cheaper than np.full).
_ORDER_FILL = np.repeat(np.arange(MAX_ORDER + 1, dtype=np.uint8)[:, None], 4096, axis=1)


HOLD_RESERVE = 0.1
"""Share of a hold's budget the walker leaves free of steps (:attr:`HoldBudget.reserve_s`): the
zone lock measures the whole hold, which ran 4-12 us past the walker's own end in replays, and
a step can cost more than the one before it; with a tenth of the budget kept, replays' holds
end under the budget in most runs (p99 182-191 us, against 204-212 us with none)."""


class HoldBudget:
    """The time budget of one lock hold, checked after every bounded step of work.

    :meth:`begin` starts a hold; :meth:`step_done` ends a step and says whether the hold must
    stop: when another step costed like the one just done, plus the work of finishing the hold
    (costed like the last hold's), would end past the budget. Each hold makes at least one
    step, so a walk always progresses, and a hold ends within the budget plus at most one step
    (the one that turned out dearer than its predecessor). :meth:`finish` ends the hold and
    returns its duration. ``clock`` is the time source, in seconds.
    """

    def __init__(self, budget_s: float, clock: Callable[[], float]) -> None:
        self.budget_s = float(budget_s)
        self.clock = clock
        self.cut = False  #: the current hold stopped (or must stop) for its budget
        self._t0 = self._t_step = self._deadline = 0.0
        self._finish_s = 0.0  # the last hold's time from its last step to its end
        self.reserve_s = self.budget_s * HOLD_RESERVE
        """Kept free of steps: the hold's work outside the walker (taking, measuring and
        releasing the lock, handing the batch over), which the budget covers too."""

    def begin(self) -> None:
        """Start a hold."""
        self._t0 = self._t_step = self.clock()
        self._deadline = self._t0 + self.budget_s
        self.cut = False

    def step_done(self) -> bool:
        """End a step; True when the hold must stop (sets :attr:`cut`)."""
        now = self.clock()
        step = now - self._t_step
        self._t_step = now
        if now + step + self._finish_s + self.reserve_s > self._deadline:
            self.cut = True
        return self.cut

    def finish(self) -> float:
        """End the hold; return how long it took."""
        t1 = self.clock()
        self._finish_s = t1 - self._t_step
        return t1 - self._t0


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
    empty_batches: int = 0  #: batches (included in ``batches``) that returned no block
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
        self.empty_batches += int(n_blocks == 0)
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

    ``min_order``: smallest block order reported (9 = 2 MiB, like page_reporting_order).
    ``batch``: most blocks per :meth:`next_batch`. ``time_budget_us``: a batch ends once this
    much time has passed, or earlier when the next step would end past it; a hold exceeds the
    budget by at most one bounded step (see the module docstring). ``isolate``: take returned
    blocks off the free lists until released. ``clock``: the time source of the budget and of
    the recorded durations, in seconds.

    One walker per allocator: it owns the allocator's insert log.
    """

    def __init__(
        self,
        alloc: BuddyAllocator,
        *,
        min_order: int = DEFAULT_MIN_ORDER,
        batch: int = DEFAULT_BATCH,
        time_budget_us: float = DEFAULT_BUDGET_US,
        isolate: bool = False,
        clock: Callable[[], float] = time.thread_time,
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
        self.budget = HoldBudget(self.time_budget_s, clock)
        self.stats = WalkerStats()
        self.round = 0  #: number of start_round() calls so far (0 = none)
        self._active = False
        # walk start: slots (of 2**min_order pages) whose REPORTED flags are still to clear
        self._clear_pos = self._clear_end = 0
        # the pass in progress: its order (below min_order: all passes done) and next slot
        self._scan_order = -1
        self._scan_pos = 0
        # insert logs taken from the allocator, being converted: [keys, values, entries left]
        self._logs: deque[list] = deque()
        # per order: deque of logged pfn arrays still to visit; _pos: cursor in the front one
        self._queues: list[deque[np.ndarray]] = [deque() for _ in range(NR_ORDERS)]
        self._pos = [0] * NR_ORDERS
        self._misses = 0  # consecutive queue windows without a valid candidate
        # isolate mode: blocks in flight {pfn: (order, round)}
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

        O(1): turns on the allocator's insert log (so blocks freed or merged during the walk
        are visited) and sets the walk's cursors. The work itself (clearing last round's
        REPORTED flags, then one pass per order) runs in bounded steps inside the following
        :meth:`next_batch` calls. Any previous round is abandoned.
        """
        self.alloc.enable_insert_log(self.min_order)
        self._reset_cursors()
        self._clear_end = -(-self.alloc.page_count >> self.min_order)
        self._scan_order = MAX_ORDER
        self.round += 1
        self.stats.rounds += 1
        self._active = True

    def _reset_cursors(self) -> None:
        for q in self._queues:
            q.clear()
        self._pos = [0] * NR_ORDERS
        self._logs.clear()
        self._clear_pos = self._clear_end = 0
        self._scan_order = -1
        self._scan_pos = 0

    def stop(self) -> None:
        """Abandon the walk (host StopRound); the next next_batch() is empty.

        In isolate mode, blocks already returned stay isolated until :meth:`release` is called
        for them (the producer releases them when the host acks, even after stop); on release
        they go back unreported if they belong to an earlier round than the current one.
        """
        self._active = False
        self.alloc.disable_insert_log()
        self._reset_cursors()

    # ------------------------------------------------------------------ steps
    def _clear_step(self) -> None:
        """Clear REPORTED on one step's slots: every head a walker reports is aligned to
        ``2**min_order`` (and flags live on heads only), so a strided view reaches them all."""
        mo = self.min_order
        a = self._clear_pos
        b = min(self._clear_end, a + step_slots(1 << mo))
        view = self.alloc.meta[a << mo : b << mo : 1 << mo]
        view &= ~np.uint8(REPORTED)
        self._clear_pos = b

    def _log_step(self) -> None:
        """Convert up to LOG_CHUNK entries of the oldest taken insert log into per-order queues."""
        ent = self._logs[0]
        keys, values, left = ent
        k = min(LOG_CHUNK, left)
        p = np.fromiter(islice(keys, k), dtype=np.int64, count=k)
        o = np.fromiter(islice(values, k), dtype=np.uint8, count=k)
        if left == k:
            self._logs.popleft()
        else:
            ent[2] = left - k
        # the orders present (at most NR_ORDERS groups); not np.unique, whose first call imports
        # numpy.ma (10-20 ms of CPU, once, inside a hold)
        orders = np.flatnonzero(np.bincount(o, minlength=NR_ORDERS)).tolist()
        if len(orders) == 1:
            self._queues[orders[0]].append(p)
        else:
            for order in orders:
                self._queues[order].append(p[o == order])

    def _take(self, order: int, room: int, got: list[np.ndarray]) -> int:
        """Queue windows of ``order`` (logged blocks), one step each: append valid candidates
        to ``got``; return how many (at most ``room``)."""
        q = self._queues[order]
        a = self.alloc
        found = 0
        while room > found and q and not self.budget.cut:
            arr = q[0]
            pos = self._pos[order]
            # a window that found nothing doubles the next one (up to a step's worth), so a
            # long run of stale candidates costs few steps
            width = min((room - found) * _OVERSCAN << self._misses, _QUEUE_WINDOW)
            win = arr[pos : pos + width]
            # is_free_head() and not REPORTED, inlined: the pfns come from the allocator (in
            # range). One queue array never names a pfn twice (a log is a set); the same block
            # in two arrays (or found by a pass too) is caught by REPORTED, set below at once.
            ok = (a.head[win] == order + 1) & ((a.meta[win] & _SKIP) == 0)
            idx = ok.nonzero()[0]
            if idx.size > room - found:
                idx = idx[: room - found]
                consumed = int(idx[-1]) + 1
            else:
                consumed = win.size
            sel = win[idx]
            self._misses = 0 if sel.size else min(self._misses + 1, 30)
            if sel.size:
                a.meta[sel] |= REPORTED  # now, so a duplicate later in this batch is filtered
                got.append(sel)
                found += sel.size
            pos += consumed
            if pos >= arr.size:
                q.popleft()
                pos = 0
            self._pos[order] = pos
            self.budget.step_done()
        return found

    def _scan(self, order: int, room: int, got: list[np.ndarray]) -> int:
        """The pass over ``order``: read the head byte of every ``2**order``-th pfn, a bounded
        number of slots a step; append valid heads to ``got``; return how many (at most
        ``room``)."""
        a = self.alloc
        n_slots = a.page_count >> order  # a block of this order fits only in a whole slot
        most = step_slots(1 << order)
        found = 0
        while room > found and self._scan_pos < n_slots and not self.budget.cut:
            s = self._scan_pos
            # a few slots per block still wanted, doubled after a step that found nothing
            e = min(n_slots, s + min((room - found) * _SCAN_SLOTS_PER_BLOCK << self._misses, most))
            heads = a.head[s << order : e << order : 1 << order]
            cand = (heads == order + 1).nonzero()[0]
            nxt = e
            if cand.size:
                pf = (cand + s) << order
                idx = ((a.meta[pf] & _SKIP) == 0).nonzero()[0]
                if idx.size > room - found:
                    idx = idx[: room - found]
                    nxt = s + int(cand[idx[-1]]) + 1
                sel = pf[idx]
                if sel.size:
                    a.meta[sel] |= REPORTED
                    got.append(sel)
                    found += sel.size
            self._misses = 0 if found else min(self._misses + 1, 30)
            self._scan_pos = nxt
            self.budget.step_done()
        if self._scan_pos >= n_slots:  # this pass is over: the next order's begins
            self._scan_order = order - 1
            self._scan_pos = 0
        return found

    # ---------------------------------------------------------------- batches
    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Return up to ``batch`` free blocks (pfns uint64, orders uint8).

        Call with the zone lock held. Every returned block is a listed free head of that order
        at this moment and was not reported earlier in this round unless freed again since; it
        is flagged REPORTED (and isolated in isolate mode). Higher orders first, including
        blocks inserted at a higher order after the walk moved below it.

        The budget is checked after every step (see the module docstring), so a batch can be
        empty while the walk goes on: the walk is over only when :attr:`done` is True. Each
        call makes at least one step, so the walk terminates.
        """
        if not self._active:
            return _EMPTY[0].copy(), _EMPTY[1].copy()
        budget = self.budget
        budget.begin()
        self._misses = 0
        while self._clear_pos < self._clear_end and not self.budget.cut:
            self._clear_step()
            self.budget.step_done()
        if self._clear_pos < self._clear_end:  # budget spent starting the walk: nothing yet
            self.stats.record_batch(0, 0, budget.finish(), True)
            return _EMPTY[0].copy(), _EMPTY[1].copy()
        if self.alloc.has_pending_inserts:
            log = self.alloc.take_insert_log()
            self._logs.append([iter(log), iter(log.values()), len(log)])
        while self._logs and not self.budget.cut:
            self._log_step()
            self.budget.step_done()
        room = self.batch
        parts_p: list[np.ndarray] = []
        parts_o: list[np.ndarray] = []
        npages = 0
        for order in range(MAX_ORDER, self.min_order - 1, -1):
            if room == 0 or self.budget.cut:
                break
            got: list[np.ndarray] = []
            k = self._take(order, room, got)
            if order == self._scan_order and room > k:
                k += self._scan(order, room - k, got)
            if k:
                parts_p.extend(got)
                if k <= _ORDER_FILL.shape[1]:
                    parts_o.append(_ORDER_FILL[order][:k].copy())
                else:
                    parts_o.append(np.full(k, order, np.uint8))
                room -= k
                npages += k << order
        if len(parts_p) == 1:
            pfns, orders = parts_p[0], parts_o[0]
        elif parts_p:
            pfns = np.concatenate(parts_p)
            orders = np.concatenate(parts_o)
        else:
            pfns = np.empty(0, dtype=np.int64)
            orders = np.empty(0, dtype=np.uint8)
        if pfns.size and self.isolate:
            # isolate() flags ISOLATED and drops REPORTED; the walker keeps the block off the
            # lists so it cannot be re-reported meanwhile (one step: at most ``batch`` blocks)
            self.alloc.isolate(pfns, orders)
            for p, o in zip(pfns.tolist(), orders.tolist()):
                self._inflight[p] = (o, self.round)
        if (pfns.size == 0 and not self.budget.cut and self._scan_order < self.min_order
                and not any(self._queues) and not self._logs and not self.alloc.has_pending_inserts):
            self._active = False
            self.alloc.disable_insert_log()
        self.stats.record_batch(int(pfns.size), npages, budget.finish(), budget.cut)
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
