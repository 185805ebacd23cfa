"""The hinting policies ``hintpipe replay --policy`` compares, each driven by the same recorded trace.

One small class per policy, all run by :func:`hintpipe.trace.replay.replay_migration` through the
same replay model, guest memory, host page state, migration engine and oracle:

- :class:`HintpipePolicy` (``hintpipe``): hintpipe's lock-bounded walker in ``detect`` mode; the
  host skips hinted pages and write-protect invalidates a skip when the guest reuses the page.
- :class:`PageReportingPolicy` (``page-reporting``): Linux free page reporting
  (``mm/page_reporting.c``) with a QEMU/Firecracker host: continuous passes 2 s after a free
  arms them, blocks isolated while a report is in flight, the host discards each report (the
  migration then sends those pages as zero pages), blocks marked Reported until reused.
- :class:`BalloonHintPolicy` (``balloon-hint``): virtio-balloon free page hinting as QEMU drives
  it: on each command id (a live migration round) the guest allocates free order-10 blocks and
  hints each one; it holds them until DONE (the pause for stop-and-copy) or until the shrinker
  returns them under memory pressure; the host clears hinted pages from the send set.
- :class:`NonePolicy` (``none``): no hints. The baseline every saving is measured against.

docs/policies.md specifies each policy and every constant below with its source (``file:line @
version``); the constants' values are those of Linux 6.6 on x86-64 with 4 KiB pages and QEMU 10.2
unless a line says otherwise.

The recorded trace decides every allocation; a policy only adds side state (blocks it holds or has
isolated). When the trace allocates a page the policy holds, the real kernel would have used
another page: the policy gives the block back at that instant (``alloc_conflicts``), and the
allocation is applied as recorded. An allocation whose zone, net of what the policy holds, would
have been below its min watermark is an ``alloc_failure`` (the task would have entered direct
reclaim); below the low watermark, an ``alloc_stall`` (kswapd woken). Both are evaluated per
replay step (20 ms of trace) against the zone's free pages at the start of the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import trio

from hintpipe.channel.inproc import inproc_pair
from hintpipe.choices import POLICY_NAMES, policy_names
from hintpipe.protocol.codec import decode_ranges, encode_ranges, validate_ranges
from hintpipe.protocol.errors import ProtocolError
from hintpipe.units import MAX_ORDER, block_pages, order_pages, run_pages

from .events import EventBatch, EventType
from .layout import Layout, PageKind
from .model import FreeCounts, ReplayModel
from .reclaim import HUGE_ORDER, ReclaimTracker

# --- Linux free page reporting (mm/page_reporting.c, include/linux/page_reporting.h @ Linux 6.6)
PAGE_REPORTING_CAPACITY = 32
"""Blocks per report (include/linux/page_reporting.h:9)."""
PAGE_REPORTING_DELAY_S = 2.0
"""``PAGE_REPORTING_DELAY`` = 2 * HZ: a pass runs this long after the free that armed it, and
again this long after a pass that left work (mm/page_reporting.c:50, :83, :344-346)."""
PAGEBLOCK_ORDER = 9
"""Default ``page_reporting_order``: ``pageblock_order`` = HPAGE_SHIFT 21 - PAGE_SHIFT 12 on
x86-64 (mm/page_reporting.c:372-377; include/linux/pageblock-flags.h:44)."""
PAGE_REPORTING_BUDGET_LISTS = 16
"""Per free list and pass, ``budget = DIV_ROUND_UP(nr_free, PAGE_REPORTING_CAPACITY * 16)``
reports, plus one: the list is left only once ``budget < 0`` (mm/page_reporting.c:180, :193-197)."""
DISCARD_S_PER_PAGE = 20e-3 / (PAGE_REPORTING_CAPACITY << PAGEBLOCK_ORDER)
"""Host time to discard one 4 KiB page of a report: one full report at order 9 (32 x 2 MiB) took
a median 20 ms to ``fallocate(PUNCH_HOLE)`` on a memfd on this kind of machine (docs/policies.md)."""

# --- virtio-balloon free page hinting (drivers/virtio/virtio_balloon.c @ Linux 6.6, QEMU 10.2)
VIRTIO_BALLOON_HINT_BLOCK_ORDER = MAX_ORDER
"""Blocks the guest allocates and hints: ``MAX_ORDER`` = 10, 4 MiB (virtio_balloon.c:36-40)."""


_ALLOC = int(EventType.ALLOC)
_ZONE_LOCKED = int(EventType.ALLOC_ZONE_LOCKED)


@dataclass
class ReplayWorld:
    """What every policy of one replayed migration shares (built by the replay)."""

    model: ReplayModel
    layout: Layout
    memory: "ReplayMemory"  # noqa: F821 (hintpipe.trace.replay)
    reclaim: ReclaimTracker
    t0: float = 0.0
    """Clock time at which the trace's first event plays."""

    def now(self) -> float:
        """Seconds of replay so far."""
        return trio.current_time() - self.t0


class Policy:
    """A hinting policy in a replay: its guest side, its host side and its figures.

    The replay calls :meth:`prepare` once, runs :meth:`guest_tasks` beside the trace's vCPU,
    calls :meth:`before_step` / :meth:`after_step` around each applied step of the trace and
    :meth:`on_pause` when the guest is paused for stop-and-copy. A policy that hints through
    hintpipe's wire protocol sets :attr:`walker` (the engine then drives its rounds).
    """

    name = ""
    walker = None
    """A :class:`~hintpipe.guest.walker.Walker` the replay runs behind an in-process link and
    hintpipe's host session, one walk per migration round; None for policies without one."""

    def __init__(self, world: ReplayWorld, cfg) -> None:
        self.world = world
        self.cfg = cfg
        self.side: SideState | None = None

    def prepare(self) -> None:
        """Set the policy's state at the start of the trace."""

    def guest_tasks(self) -> list:
        """Async callables that run in the guest beside the trace (until the migration ends)."""
        return []

    def before_step(self, step: EventBatch) -> None:
        """Called with a step of the trace before it is applied."""

    def after_step(self, step: EventBatch, allocated: np.ndarray, freed: np.ndarray) -> None:
        """Called once a step has been applied (``allocated``/``freed``: the model's pages)."""

    def on_pause(self) -> None:
        """The guest is paused for stop-and-copy."""
        if self.side is not None:
            self.side.stop_clock(self.world.now())

    def on_hints_applied(self, starts: np.ndarray, orders: np.ndarray,
                         is_skip: Callable[[np.ndarray], np.ndarray]) -> None:
        """The host put hinted blocks into its skip bitmap (``is_skip(pfns)``: the bits after)."""

    def figures(self) -> dict:
        """The policy's own figures (``details`` of its report entry) and the common ones."""
        out = {"page_seconds_held": 0.0, "max_pages_held": 0, "alloc_failures": 0, "alloc_stalls": 0,
               "alloc_conflicts": 0, "pages_released_on_conflict": 0, "pages_destroyed": 0}
        if self.side is not None:
            out.update(self.side.figures())
        return out


class HintpipePolicy(Policy):
    """hintpipe's walker (``TraceWalker``) in ``detect`` mode; blocks are never isolated."""

    name = "hintpipe"

    def __init__(self, world: ReplayWorld, cfg, *, walker) -> None:
        super().__init__(world, cfg)
        self.walker = walker
        """The replay's :class:`~hintpipe.trace.replay.TraceWalker` over the world's model."""

    def on_hints_applied(self, starts: np.ndarray, orders: np.ndarray,
                         is_skip: Callable[[np.ndarray], np.ndarray]) -> None:
        _discard_skipped(self.world.reclaim, starts, orders, is_skip)


class NonePolicy(Policy):
    """No hints: every dirty page is sent (zero pages as headers)."""

    name = "none"


def _discard_skipped(reclaim: ReclaimTracker, starts: np.ndarray, orders: np.ndarray,
                     is_skip: Callable[[np.ndarray], np.ndarray]) -> None:
    """A host with reclaim on discards a hinted page while it is in the skip bitmap (hinted and
    unwritten since): whole blocks where every page is, single pages elsewhere. ``is_skip(pfns)``
    reads the host's skip bit of each pfn."""
    starts = np.asarray(starts, np.int64)
    orders = np.asarray(orders, np.int64)
    sizes = np.left_shift(1, orders)
    pages = block_pages(starts, orders)  # block after block
    skip = np.asarray(is_skip(pages), dtype=bool)
    first = np.zeros(len(starts), np.int64)
    np.cumsum(sizes[:-1], out=first[1:])
    whole = np.logical_and.reduceat(skip, first)
    reclaim.discard(starts[whole], orders[whole])
    if not whole.all():
        single = pages[skip & ~np.repeat(whole, sizes)]
        reclaim.discard(single, np.zeros(len(single), np.int64))


class SideState:
    """Blocks a policy has taken from the guest (held or isolated), in units of ``2**order``
    pages, with each zone's free pages net of them, and the costs that follow.

    ``counts`` are the model's free pages per unit and per zone (:class:`FreeCounts`), so the
    zone checks are a subtraction. ``page_seconds_held`` integrates the taken pages over the
    replay until :meth:`stop_clock` (the pause for stop-and-copy, or DONE).
    """

    def __init__(self, world: ReplayWorld, order: int) -> None:
        self.world = world
        self.order = order
        model = world.model
        layout = world.layout
        self.zones = layout.zones
        nunits = -(-model.page_count // (1 << order))
        last = np.minimum(np.arange(nunits, dtype=np.int64) * (1 << order) + (1 << order) - 1, model.page_count - 1)
        self.zone_of_unit = layout.zone_index(last) if self.zones else np.zeros(nunits, np.int64)
        self.zone_units: list[tuple[int, int]] = []
        """Per zone, the range of units counted in it (zones are contiguous PFN ranges), its
        start rounded down to a max-order block so block arithmetic stays aligned there."""
        align = 1 << max(0, MAX_ORDER - order)
        for z in range(max(len(self.zones), 1)):
            idx = np.flatnonzero(self.zone_of_unit == z)
            a, b = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
            self.zone_units.append((a - a % align, b))
        self.counts = FreeCounts(model, order, self.zone_of_unit, max(len(self.zones), 1))
        self.taken = np.zeros(nunits, bool)
        self.taken_zone = np.zeros(max(len(self.zones), 1), np.int64)
        self.n_taken = 0
        self.max_taken = 0
        self.page_seconds = 0.0
        self._t_last = 0.0
        self._clock_on = True
        self.alloc_failures = 0
        self.alloc_stalls = 0
        self.alloc_conflicts = 0
        self.pages_released_on_conflict = 0
        self.pages_destroyed = 0
        self.history: list[tuple[float, int]] = []
        """``(time_s, +pages taken or -pages given back)`` in order, while the clock runs; the
        last entry, ``(time_s, 0)``, is when it stopped."""
        self._mins = np.array([z.min for z in self.zones] or [0], np.int64)
        self._lows = np.array([z.low for z in self.zones] or [0], np.int64)
        # the reserve a zone keeps from an allocation that may use every zone above it
        self._reserve = np.array([max(z.protection, default=0) for z in self.zones] or [0], np.int64)

    # -- accounting of taken units --------------------------------------------------------------
    def _integrate(self) -> None:
        if not self._clock_on:
            return
        t = self.world.now()
        self.page_seconds += (self.n_taken << self.order) * max(0.0, t - self._t_last)
        self._t_last = t

    def take(self, units: np.ndarray) -> None:
        """Mark ``units`` taken (they must be free and not taken)."""
        self._integrate()
        if self._clock_on:
            self.history.append((self._t_last, len(units) << self.order))
        self.taken[units] = True
        self._count_zones(units, 1 << self.order)
        self.n_taken += len(units)
        self.max_taken = max(self.max_taken, self.n_taken)

    def give(self, units: np.ndarray) -> None:
        """Give ``units`` back to the guest."""
        units = units[self.taken[units]]
        if not len(units):
            return
        self._integrate()
        if self._clock_on:
            self.history.append((self._t_last, -(len(units) << self.order)))
        self.taken[units] = False
        self._count_zones(units, -(1 << self.order))
        self.n_taken -= len(units)

    def _count_zones(self, units: np.ndarray, pages_each: int) -> None:
        zs = np.maximum(self.zone_of_unit[units], 0)
        if zs[0] == zs[-1] and (len(zs) < 3 or (zs == zs[0]).all()):  # one zone: the usual case
            self.taken_zone[zs[0]] += pages_each * len(units)
        else:
            np.add.at(self.taken_zone, zs, pages_each)

    def stop_clock(self, t: float) -> None:
        """Stop integrating page-seconds (the guest is paused)."""
        self._integrate()
        if self._clock_on:
            self.history.append((self._t_last, 0))
        self._clock_on = False

    def effective_free(self) -> np.ndarray:
        """Free pages per zone in the policy's world: recorded free minus what it has taken."""
        return self.counts.zone_free - self.taken_zone

    # -- the recorded allocations against the policy's world -----------------------------------
    def hit_units(self, step: EventBatch) -> np.ndarray:
        """Taken units that the step's allocations (to a caller or a per-CPU list) touch."""
        if not self.n_taken or not len(step):
            return np.empty(0, np.int64)
        sel = (step.etype == _ALLOC) | (step.etype == _ZONE_LOCKED)
        if not sel.any():
            return np.empty(0, np.int64)
        pfn = step.pfn[sel]
        order = step.order[sel]
        k = self.order
        first = (pfn >> np.uint64(k)).astype(np.int64)
        wide = order > k
        units = first if not wide.any() else np.concatenate([first, run_pages(first[wide], order_pages(order[wide] - k))])
        units = units[units < len(self.taken)]
        return np.unique(units[self.taken[units]])

    def check_allocations(self, step: EventBatch) -> None:
        """Count the step's allocations the policy's world would have failed or stalled."""
        if not self.n_taken or not self.zones:
            return
        sel = np.flatnonzero(step.etype == _ALLOC)
        if not len(sel):
            return
        z = self.world.layout.zone_index(step.pfn[sel].astype(np.int64))
        ok = z >= 0
        z = z[ok]
        need = order_pages(step.order[sel][ok]) - 1
        recorded = self.counts.zone_free[z] - need
        effective = recorded - self.taken_zone[z]
        passed = recorded > self._mins[z]  # the recorded kernel's min check
        self.alloc_failures += int(np.count_nonzero(passed & (effective <= self._mins[z] + self._reserve[z])))
        self.alloc_stalls += int(np.count_nonzero(passed & (effective <= self._lows[z] + self._reserve[z])))

    def figures(self) -> dict:
        """Cost figures: page-seconds held (until :meth:`stop_clock`), the peak, failures,
        stalls and conflicts."""
        return {"page_seconds_held": round(self.page_seconds, 3), "max_pages_held": self.max_taken << self.order,
                "alloc_failures": self.alloc_failures, "alloc_stalls": self.alloc_stalls,
                "alloc_conflicts": self.alloc_conflicts,
                "pages_released_on_conflict": self.pages_released_on_conflict,
                "pages_destroyed": self.pages_destroyed}


def maximal_blocks(full: np.ndarray, min_order: int) -> dict[int, np.ndarray]:
    """Per order ``min_order..MAX_ORDER``: head units of the maximal free blocks of that order,
    given ``full`` (one bool per ``2**min_order``-page unit; entry 0 aligned to a max-order
    block). A block is maximal when it is free and its buddy is not (or it is max-order)."""
    top = MAX_ORDER - min_order
    levels = [full]
    for _ in range(top):
        f = levels[-1]
        m = len(f) & ~1
        levels.append(f[0:m:2] & f[1:m:2])
    out = {}
    for j in range(top + 1):
        own = levels[j]
        if j < top:
            up = levels[j + 1]
            own = own.copy()
            own[0:2 * len(up):2] &= ~up
            own[1:2 * len(up):2] &= ~up
        out[min_order + j] = np.flatnonzero(own) << j
    return out


class PageReportingPolicy(Policy):
    """Linux free page reporting with a QEMU/Firecracker host that discards what is reported.

    State: ``state`` (IDLE, REQUESTED or ACTIVE, as mm/page_reporting.c), the Reported blocks
    (``reported[unit]`` = order of a Reported block starting at that unit, -1 none), the
    report in flight (isolated units) and its withdrawals. Reports travel over a 32-entry
    in-process virtqueue (the balloon's reporting queue) to the host, which checks them as it
    checks any guest input, sleeps the discard time and discards.
    """

    name = "page-reporting"
    IDLE, REQUESTED, ACTIVE = "idle", "requested", "active"

    def __init__(self, world: ReplayWorld, cfg, *, order: int = PAGEBLOCK_ORDER,
                 discard_s_per_page: float = DISCARD_S_PER_PAGE, withdraw: bool = True) -> None:
        super().__init__(world, cfg)
        if not 0 <= order <= MAX_ORDER:
            raise ValueError(f"page_reporting_order must be in 0..{MAX_ORDER}")
        self.order = order
        self.discard_s_per_page = discard_s_per_page
        self.withdraw = withdraw
        """False only to show the oracle catches a discard of a page the guest reallocated."""
        self.side = SideState(world, order)
        n_units = len(self.side.taken)
        self.reported = np.full(n_units, -1, np.int8)
        self.free_since = np.zeros(n_units)
        self.state = self.IDLE
        self._armed = trio.Event()
        self._pass_at = 0.0
        self._due_since = 0.0
        self.history: list[tuple] = []
        """What the policy did, in order: ``("pass", start_s, end_s, due_since_s)`` (a pass and
        the time from which it was due: its arming free, or the end of the pass before it),
        ``("list", zone, order, nr_free, budget, full_reports)`` (one free list of a pass) and
        ``("report", sent_s, orders)``; times in seconds of replay."""
        self.inflight: dict[int, int] = {}
        """Head unit -> order of the blocks of the report in flight (withdrawn ones removed)."""
        self.guest_end, self.host_end = inproc_pair(PAGE_REPORTING_CAPACITY)
        self.failure: str | None = None
        self.passes = 0
        self.reports = 0
        self.reports_during_migration = 0
        self.blocks_reported = 0
        self.pages_hinted = 0
        self.max_visited = 0
        self._visited_total = 0
        self._holds = 0
        self.skipped_zone_passes = 0
        self.initially_reported_blocks = 0

    # -- start --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Blocks the recording shows Reported at the start were discarded by the host before it:
        they start Reported, as zero pages, and reclaimed. A pass is due 2 s in if any free
        block of order >= page_reporting_order is not Reported."""
        w = self.world
        k0 = self.order
        blocks = maximal_blocks(self.side.counts.full, k0)
        rep = w.layout.reported
        for k, heads in blocks.items():
            if rep is None or not len(heads):
                continue
            is_rep = rep[heads << k0]
            heads = heads[is_rep]
            self.reported[heads] = k
            self.initially_reported_blocks += len(heads)
            pfns = heads << k0
            w.memory.versions[block_pages(pfns, np.full(len(pfns), k))] = 0
            w.reclaim.discard(pfns, np.full(len(pfns), k))
        if any(len(h[self.reported[h] != k]) for k, h in blocks.items()):
            self._arm(0.0)

    def guest_tasks(self) -> list:
        return [self._reporter, self._host]

    # -- arming, per step ---------------------------------------------------------------------
    def _arm(self, t: float) -> None:
        if self.state == self.IDLE:
            self.state = self.REQUESTED
            self._due_since = t
            self._pass_at = self.world.t0 + t + PAGE_REPORTING_DELAY_S
            self._armed.set()
        elif self.state == self.ACTIVE:
            self.state = self.REQUESTED

    def before_step(self, step: EventBatch) -> None:
        side = self.side
        side.check_allocations(step)
        hit = side.hit_units(step)
        if len(hit):
            # the trace allocates from a block under report: in Linux it was isolated and another
            # block was used; here the block leaves the report so the host does not discard it
            side.alloc_conflicts += 1
            for head, k in list(self.inflight.items()):
                span = np.arange(head, head + (1 << (k - self.order)))
                if self.taken[span].any() and np.isin(span, hit).any():
                    if self.withdraw:
                        del self.inflight[head]
                    side.give(span)
                    side.pages_released_on_conflict += 1 << k

    @property
    def taken(self) -> np.ndarray:
        return self.side.taken

    def after_step(self, step: EventBatch, allocated: np.ndarray, freed: np.ndarray) -> None:
        counts = self.side.counts
        touched = counts.update(step)
        if not len(touched):
            return
        became = counts.became_full
        if len(became):
            # a free merged into a block of order >= page_reporting_order: the kernel's
            # page_reporting_notify_free; the step's last event stands for the free's time
            t_ev = (int(step.ts_ns[-1]) - (self.world.model.first_ts_ns or 0)) / 1e9
            self.free_since[became] = t_ev
            self._arm(t_ev)
        self._drop_stale_reported(touched)

    def _drop_stale_reported(self, touched: np.ndarray) -> None:
        """A block stays Reported only while it is exactly a maximal free block: allocation,
        split and merge all take it off its free list, which clears PG_reported."""
        span = 1 << (MAX_ORDER - self.order)
        groups = np.unique(touched // span)
        units = (groups[:, None] * span + np.arange(span)).ravel()
        units = units[units < len(self.reported)]
        heads = units[self.reported[units] >= 0]
        if not len(heads):
            return
        full = self.side.counts.full
        ks = self.reported[heads].astype(np.int64)
        keep = np.ones(len(heads), bool)
        for k in np.unique(ks).tolist():
            sel = np.flatnonzero(ks == k)
            h = heads[sel]
            size = 1 << (k - self.order)
            ok = full[(h[:, None] + np.arange(size)).ravel().clip(max=len(full) - 1)].reshape(-1, size).all(axis=1)
            if k < MAX_ORDER:  # merged with its buddy: now part of a larger free block
                buddy = h ^ size
                inb = buddy + size <= len(full)
                merged = np.zeros(len(h), bool)
                merged[inb] = full[(buddy[inb, None] + np.arange(size)).ravel()].reshape(-1, size).all(axis=1)
                ok &= ~merged
            keep[sel] = ok
        self.reported[heads[~keep]] = -1

    # -- the pass -------------------------------------------------------------------------------
    async def _reporter(self) -> None:
        while True:
            await self._armed.wait()
            await trio.sleep_until(self._pass_at)
            await self._unless_paused()
            start = self.world.now()
            await self._pass()
            self.history.append(("pass", start, self.world.now(), self._due_since))
            if self.state == self.REQUESTED:
                self._due_since = self.world.now()
                self._pass_at = trio.current_time() + PAGE_REPORTING_DELAY_S
            else:
                self.state = self.IDLE
                self._armed = trio.Event()

    async def _unless_paused(self) -> None:
        # the guest is stopped for stop-and-copy: its reporting work does not go on
        if self.gate is not None and self.gate.paused:
            await trio.sleep_forever()

    gate = None  # set by the replay: the guest's PauseGate
    zone_lock = None  # set by the replay: the guest's ZoneLock

    def _candidates(self, z: int, k: int) -> tuple[np.ndarray, int, int]:
        """Unreported, not isolated maximal free blocks of order ``k`` in zone ``z``, newest
        freed first; also the order's free block count and its Reported count in the zone."""
        a, b = self.side.zone_units[z]
        heads = maximal_blocks(self.side.counts.full[a:b], self.order)[k] + a
        if self.side.zones:
            heads = heads[self.side.zone_of_unit[heads] == z]
        nr_free = len(heads)
        rep = self.reported[heads] == k
        cand = heads[~rep & ~self.side.taken[heads]]
        cand = cand[np.argsort(-self.free_since[cand], kind="stable")]
        return cand, nr_free, int(np.count_nonzero(rep))

    def _still_candidates(self, cand: np.ndarray, k: int, need: int) -> np.ndarray:
        """The blocks of ``cand`` that are still unreported, not taken, maximal free blocks of
        order ``k`` (the allocator may have run since they were found); checks the first
        ``need`` and goes on only if some of those no longer qualify."""
        def ok(heads: np.ndarray) -> np.ndarray:
            full = self.side.counts.full
            size = 1 << (k - self.order)
            good = (self.reported[heads] != k) & ~self.side.taken[heads]
            for j in range(size):
                good &= full[heads + j]
            if k < MAX_ORDER:
                buddy = heads ^ size
                merged = np.ones(len(heads), bool)
                for j in range(size):
                    merged &= full[np.minimum(buddy + j, len(full) - 1)]
                good &= ~merged
            return good

        first = ok(cand[:need])
        if first.all():
            return cand
        return cand[ok(cand)]

    async def _pass(self) -> None:
        self.state = self.ACTIVE
        self.passes += 1
        side = self.side
        zones = side.zones or [None]
        for z in range(len(zones)):
            zone = zones[z]
            if zone is not None and side.effective_free()[z] <= zone.low + (PAGE_REPORTING_CAPACITY << self.order):
                self.skipped_zone_passes += 1
                continue
            sgl: list[tuple[int, int]] = []
            for k in range(self.order, MAX_ORDER + 1):
                budget = None
                full_reports = 0
                while True:
                    await self._unless_paused()
                    # the list as it stands, found outside the lock (the model has no list to
                    # walk: this search is not the kernel's work); the hold re-checks and isolates
                    cand, nr_free, nr_rep = self._candidates(z, k)
                    async with self.zone_lock.walker() as hold:
                        cand = self._still_candidates(cand, k, PAGE_REPORTING_CAPACITY - len(sgl) + 1)
                        if budget is None:
                            budget = -(-nr_free // (PAGE_REPORTING_CAPACITY * PAGE_REPORTING_BUDGET_LISTS))
                        stop = True
                        if len(cand) and budget < 0:
                            self.state = self.REQUESTED
                            take = cand[:0]
                        else:
                            room = PAGE_REPORTING_CAPACITY - len(sgl)
                            take = cand[:room]
                            if zone is not None and len(take):
                                # __isolate_free_page keeps the zone above its min watermark
                                left = side.effective_free()[z] - (np.arange(1, len(take) + 1) << k)
                                ok = left > zone.min
                                n_ok = int(np.argmin(ok)) if not ok.all() else len(take)
                                take = take[:n_ok]
                                stop = n_ok < min(room, len(cand))
                            stop = stop or len(cand) <= room
                        for h in take.tolist():
                            self.inflight[h] = k
                        if len(take):
                            side.take(run_pages(take, np.full(len(take), 1 << (k - self.order))))
                        sgl.extend((h, k) for h in take.tolist())
                        visited = len(take) + (nr_rep if stop else 0)
                        self._note_visit(visited)
                        if hold is not None:
                            hold.found = len(take)
                    if len(sgl) == PAGE_REPORTING_CAPACITY:
                        await self._report(sgl)
                        budget -= 1
                        full_reports += 1
                        sgl = []
                    if stop:
                        break
                self.history.append(("list", z, k, nr_free, budget + full_reports, full_reports))
            if sgl:
                await self._report(sgl)

    def _note_visit(self, visited: int) -> None:
        self._holds += 1
        self._visited_total += visited
        self.max_visited = max(self.max_visited, visited)

    async def _report(self, sgl: list[tuple[int, int]]) -> None:
        heads = np.array([h for h, _ in sgl], np.int64)
        orders = np.array([k for _, k in sgl], np.int64)
        pfns = heads << self.order
        frame = encode_ranges(np.column_stack((pfns, 1 << orders)).astype(np.uint64))
        self.history.append(("report", self.world.now(), orders.tolist()))
        await self.guest_end.send_frame(frame)
        ack = await self.guest_end.receive()
        if not ack:
            return
        self.reports += 1
        if self.migrating:
            self.reports_during_migration += 1
        self.blocks_reported += len(sgl)
        self.pages_hinted += int((1 << orders).sum())
        # drain: back to the free lists; Reported only if it is still the same free block
        full = self.side.counts.full
        for h, k in sgl:
            if self.inflight.pop(h, None) is None:
                continue  # withdrawn on a conflict: already given back
            span = np.arange(h, h + (1 << (k - self.order)))
            self.side.give(span)
            size = 1 << (k - self.order)
            still = bool(full[span].all()) and (k == MAX_ORDER or not full[(h ^ size) + np.arange(size)].all())
            if still:
                self.reported[h] = k

    migrating = True  # reports counted as "during migration" (the replay is a migration)

    async def _host(self) -> None:
        """The host's reporting queue handler: check, discard, return the buffer."""
        n = self.world.model.page_count
        while True:
            frame = await self.host_end.receive()
            if not frame:
                return
            try:
                ranges = decode_ranges(frame)
                orders = validate_ranges(ranges, n, max_ranges=PAGE_REPORTING_CAPACITY)
            except ProtocolError as e:
                self.failure = f"bad report from the guest: {e}"
                await self.host_end.aclose()
                return
            pages = int(ranges[:, 1].sum())
            await trio.sleep(pages * self.discard_s_per_page)
            self._discard(ranges[:, 0].astype(np.int64), orders.astype(np.int64))
            await self.host_end.send_frame(b"\x01")

    def _discard(self, pfns: np.ndarray, orders: np.ndarray) -> None:
        """Drop the backing of the reported blocks still in the report (a withdrawn block is the
        replay's stand-in for one Linux would have kept isolated: the host never sees it)."""
        heads = pfns >> self.order
        keep = np.array([self.inflight.get(int(h)) == int(k) for h, k in zip(heads, orders)], bool) \
            if self.withdraw else np.ones(len(pfns), bool)
        pfns, orders = pfns[keep], orders[keep]
        if not len(pfns):
            return
        w = self.world
        pages = block_pages(pfns, orders)
        live = ~w.memory.dead[pages]
        if live.any():  # the host destroyed data the guest holds: a loss, whatever happens next
            self.side.pages_destroyed += int(np.count_nonzero(live))
        w.memory.discard(pages)
        w.reclaim.discard(pfns, orders)

    def figures(self) -> dict:
        out = super().figures()
        out.update({
            "hint_messages": self.reports, "pages_hinted": self.pages_hinted,
            "details": {"order": self.order, "passes": self.passes, "reports": self.reports,
                        "blocks_reported": self.blocks_reported,
                        "reports_per_pass": round(self.reports / self.passes, 2) if self.passes else 0.0,
                        "initially_reported_blocks": self.initially_reported_blocks,
                        "zone_passes_below_watermark": self.skipped_zone_passes,
                        "blocks_visited_per_hold_mean": round(self._visited_total / self._holds, 2) if self._holds else 0.0,
                        "blocks_visited_per_hold_max": self.max_visited,
                        "failure": self.failure},
        })
        return out


class BalloonWalker:
    """The guest side of virtio-balloon free page hinting, with the Walker interface.

    Each round (command id) is one run: every :meth:`next_batch` allocates one free order-10
    block (zonelist order Normal, DMA32, DMA; lowest PFN first), holds it, and returns it as one
    hint. The run ends when no zone can give a block without going below its min watermark plus
    its lowmem reserve (``alloc_pages`` with ``__GFP_NORETRY``: no reclaim), or when the host
    stops the round. Held blocks stay held across runs until :meth:`done_command` (DONE) or the
    shrinker returns them.
    """

    isolate = False

    def __init__(self, policy: "BalloonHintPolicy") -> None:
        self.policy = policy
        self._exhausted = True
        self.runs = 0
        self.blocks = 0

    @property
    def done(self) -> bool:
        return self._exhausted

    def start_round(self) -> None:
        self._exhausted = False
        self.runs += 1

    def stop(self) -> None:
        self._exhausted = True

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        head = self.policy.allocate_block()
        if head is None:
            self._exhausted = True
            return np.empty(0, np.uint64), np.empty(0, np.uint8)
        self.blocks += 1
        return (np.array([head << self.policy.side.order], np.uint64),
                np.array([VIRTIO_BALLOON_HINT_BLOCK_ORDER], np.uint8))

    def release(self, pfns, orders) -> None:
        """Held blocks are not released on the host's ack: they are held until DONE."""


class BalloonHintPolicy(Policy):
    """virtio-balloon free page hinting as QEMU drives it during a precopy migration."""

    name = "balloon-hint"

    def __init__(self, world: ReplayWorld, cfg) -> None:
        super().__init__(world, cfg)
        self.side = SideState(world, HUGE_ORDER)
        self._per_block = 1 << (VIRTIO_BALLOON_HINT_BLOCK_ORDER - HUGE_ORDER)
        self.lifo: list[int] = []
        """Head units of held blocks, the most recently allocated last (the shrinker's pop order)."""
        self.walker = BalloonWalker(self)
        self.shrinker_returns = 0
        self.done_returns = 0
        self._zone_order = list(range(len(self.side.zones) - 1, -1, -1)) or [0]
        self._free_blocks: np.ndarray | None = None  # per order-10 block: free and not held
        self._free_gen = -1

    def _block_units(self, head: int) -> np.ndarray:
        return np.arange(head, head + self._per_block)

    def _free_block_cache(self) -> np.ndarray:
        """Per order-10 block: entirely free and not held (recomputed once per replay step)."""
        side = self.side
        if self._free_blocks is None or self._free_gen != side.counts.generation:
            per = self._per_block
            nblk = len(side.taken) // per
            avail = side.counts.full[: nblk * per] & ~side.taken[: nblk * per]
            free = avail[0::per].copy()
            for j in range(1, per):
                free &= avail[j::per]
            self._free_blocks = free
            self._free_gen = side.counts.generation
        return self._free_blocks

    def allocate_block(self) -> int | None:
        """Take the first free order-10 block the zonelist allows, or None."""
        side = self.side
        per = self._per_block
        free_blocks = self._free_block_cache()
        eff = side.effective_free()
        need = (1 << VIRTIO_BALLOON_HINT_BLOCK_ORDER) - 1
        for z in self._zone_order:
            if side.zones:
                zone = side.zones[z]
                if eff[z] - need <= zone.min + max(zone.protection, default=0):
                    continue
            a, b = side.zone_units[z]
            lo = -(-a // per)
            free = free_blocks[lo: b // per]
            i = int(np.argmax(free)) if len(free) else 0
            if len(free) and free[i]:
                head = (lo + i) * per
                side.take(self._block_units(head))
                free_blocks[lo + i] = False
                self.lifo.append(head)
                return head
        return None

    def _release(self, heads: list[int]) -> None:
        if heads:
            side = self.side
            side.give(np.concatenate([self._block_units(h) for h in heads]))
            if self._free_blocks is not None:  # free again, unless the trace has taken them
                per = self._per_block
                for h in heads:
                    self._free_blocks[h // per] = bool(side.counts.full[h:h + per].all())

    def before_step(self, step: EventBatch) -> None:
        side = self.side
        side.check_allocations(step)
        hit = side.hit_units(step)
        if len(hit):
            # the trace allocates from a held block: the real kernel would have used another
            # page; the block goes back (the host skipped it; the write faults as usual)
            side.alloc_conflicts += 1
            heads = set((hit - hit % self._per_block).tolist())
            self.lifo = [h for h in self.lifo if h not in heads]
            self._release(sorted(heads))
            side.pages_released_on_conflict += len(heads) << VIRTIO_BALLOON_HINT_BLOCK_ORDER

    def after_step(self, step: EventBatch, allocated: np.ndarray, freed: np.ndarray) -> None:
        side = self.side
        side.counts.update(step)
        if not self.walker.done:
            self._free_block_cache()  # here, in the allocator's section, not in the next hold
        if not self.lifo or not side.zones:
            return
        # kswapd wakes in a zone at its low watermark and reclaims until the zone is at high; the
        # balloon's shrinker gives back the most recently allocated blocks first
        eff = side.effective_free()
        for z, zone in enumerate(side.zones):
            if eff[z] > zone.low:
                continue
            while self.lifo and side.effective_free()[z] < zone.high:
                self._release([self.lifo.pop()])
                self.shrinker_returns += 1

    def on_pause(self) -> None:
        # DONE: QEMU sends it at the final bitmap sync, with the guest stopped; the guest frees
        # every held block when it runs again
        super().on_pause()
        self.done_returns = len(self.lifo)
        self._release(self.lifo)
        self.lifo = []

    def on_hints_applied(self, starts: np.ndarray, orders: np.ndarray,
                         is_skip: Callable[[np.ndarray], np.ndarray]) -> None:
        # Firecracker's host discards each hinted range on receipt (QEMU's never does)
        _discard_skipped(self.world.reclaim, starts, orders, is_skip)

    def figures(self) -> dict:
        out = super().figures()
        out["details"] = {"runs": self.walker.runs, "blocks_allocated": self.walker.blocks,
                          "shrinker_returns": self.shrinker_returns, "returned_at_done": self.done_returns}
        return out


__all__ = ["POLICIES", "POLICY_NAMES", "policy_names", "Policy", "HintpipePolicy", "PageReportingPolicy",
           "BalloonHintPolicy", "BalloonWalker", "NonePolicy", "ReplayWorld", "SideState", "maximal_blocks"]

POLICIES = {
    "hintpipe": HintpipePolicy,
    "page-reporting": PageReportingPolicy,
    "balloon-hint": BalloonHintPolicy,
    "none": NonePolicy,
}
"""Policy name -> class."""
