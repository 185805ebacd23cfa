"""Guest workloads: what the vCPUs do to memory while the guest is being migrated.

Every workload boots the same way: ``static_fraction`` of memory is allocated in max-order
blocks and written once (kernel, page cache, a resident application); then ``history`` of the
pages still free get old data, as in a guest that has run a while (Linux does not zero freed
pages; ``history`` 0 is a freshly booted guest whose free pages were never written). ``idle`` then only touches
a few static pages per second. ``churn`` also allocates and frees blocks of a configurable order
mix around ``churn_fraction`` of memory, writes each block it allocates (an allocation is a
write), and rewrites random allocated pages. ``race`` is churn plus an adversary that aims at the
windows where hinting can go wrong (:class:`RaceWorkload`). Time is trio's clock; all randomness
comes from one seeded generator, so a run is reproducible.
"""

from __future__ import annotations

from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np
import trio

from hintpipe.choices import WORKLOADS
from hintpipe.guest.buddy import BuddyAllocator, MigrateType
from hintpipe.guest.memory import GuestMemory
from hintpipe.guest.zonelock import ZoneLock
from hintpipe.units import MAX_ORDER, block_pages, distinct

_AGE_CHUNK = 1 << 20  # pages given old data per step at boot

# mostly small allocations, a few huge-page sized ones: about 8 pages written per allocation
DEFAULT_ORDER_MIX = ((0, 0.6), (1, 0.1), (2, 0.1), (3, 0.1), (4, 0.09), (9, 0.01))
WORKLOAD_KINDS = WORKLOADS + ("replay",)
"""Workload kinds; ``replay`` is driven by a recorded trace (:mod:`hintpipe.trace.replay`)."""


BOOT_WRITE_BLOCKS = 1024
"""Max-order blocks the boot writes per step (4 Mi pages: bounded temporaries)."""


@dataclass(frozen=True)
class WorkloadConfig:
    """Knobs of a workload. Rates are per second of (virtual) guest time."""

    kind: str = "churn"
    static_fraction: float = 0.30
    churn_fraction: float = 0.20
    ops_per_s: float = 10_000.0
    write_pages_per_s: float = 40_000.0
    order_mix: tuple[tuple[int, float], ...] = DEFAULT_ORDER_MIX
    unmovable_fraction: float = 0.2
    tick_s: float = 0.002
    seed: int = 1
    history: float = 1.0
    """Fraction of the pages free when migration starts that hold old data (written and freed
    before). 1.0: the guest's page cache has cycled through all of its memory since boot, the
    usual state of a guest that has run a while; 0.0: a freshly booted guest (or one with
    ``init_on_free=1``), whose free pages are all zero."""

    @classmethod
    def idle(cls, **kw) -> "WorkloadConfig":
        """An idle guest: booted, resident memory, a trickle of writes, no allocation churn."""
        base = dict(kind="idle", ops_per_s=0.0, write_pages_per_s=2_000.0, churn_fraction=0.0)
        base.update(kw)
        return cls(**base)

    @classmethod
    def race(cls, **kw) -> "WorkloadConfig":
        """Churn plus the race adversary (:class:`RaceWorkload`), with churn's rates."""
        return cls(**{"kind": "race", **kw})

    @classmethod
    def replay(cls, **kw) -> "WorkloadConfig":
        """A recorded kernel as the guest (``hintpipe replay``): the trace decides every
        allocation; ``write_pages_per_s`` extra writes go to allocated pages each ``tick_s``."""
        base = dict(kind="replay", static_fraction=0.0, churn_fraction=0.0, ops_per_s=0.0,
                    write_pages_per_s=0.0, tick_s=0.02)
        base.update(kw)
        return cls(**base)

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise ValueError(f"unknown workload {self.kind!r} (idle, churn or race)")
        if self.tick_s <= 0 or self.ops_per_s < 0 or self.write_pages_per_s < 0:
            raise ValueError("tick must be > 0 and operation and write rates >= 0")
        if not 0 <= self.static_fraction + self.churn_fraction < 1:
            raise ValueError("static_fraction + churn_fraction must be in [0, 1)")
        if not 0 <= self.history <= 1:
            raise ValueError(f"history must be in [0, 1], got {self.history}")
        for order, weight in self.order_mix:
            if not 0 <= order <= MAX_ORDER or weight < 0:
                raise ValueError(f"bad order mix entry {(order, weight)}")


@dataclass
class WorkloadStats:
    """What the workload did."""

    allocs: int = 0
    frees: int = 0
    alloc_failures: int = 0
    pages_written: int = 0
    ticks: int = 0
    history_pages: int = 0
    """Free pages given old data at boot (see ``WorkloadConfig.history``)."""
    race_blocks_reused_in_flight: int = 0
    """race: reported blocks reallocated and written before their Hints frame went out."""
    race_frames_delayed: int = 0
    """race: frames sent a few ms after some of their blocks were reallocated and written."""
    race_frames_held: int = 0
    """race: frames held past their round (they reach the host under a stopped command id)."""
    race_held_blocks_reused: int = 0
    """race: blocks of held frames reallocated and written between StopRound and RoundEnd."""
    race_blocks_written_then_freed: int = 0
    """race: blocks written after a round began and freed before its walk (reported, refused)."""
    race_hinted_blocks_rewritten: int = 0
    """race: blocks reported this round reallocated and written while the host sends."""
    race_boundary_blocks: int = 0
    """race: blocks reallocated and written between StopRound and RoundEnd (after the host's
    round-end collection, before the next round's)."""


class PauseGate:
    """Lets the migration pause the vCPUs for stop-and-copy (and resume them).

    ``pause()`` returns only once every running vCPU is parked at its gate, so no write can land
    after the final send set is taken.
    """

    def __init__(self) -> None:
        self._running = trio.Event()
        self._running.set()
        self._parked = trio.Event()
        self.paused = False
        self.pause_started = trio.Event()
        """Set once pause() is called (a new one after resume())."""
        self.vcpus = 0
        self._parked_count = 0
        self._sections = 0

    async def pause(self) -> None:
        """Stop the vCPUs at their next step and wait until they have stopped."""
        self.paused = True
        self._running = trio.Event()
        self._parked = trio.Event()
        self._parked_count = 0
        self.pause_started.set()
        if self.vcpus or self._sections:
            await self._parked.wait()

    def resume(self) -> None:
        """Let the vCPUs run again."""
        self.paused = False
        self.pause_started = trio.Event()
        self._running.set()

    def leave(self) -> None:
        """A vCPU stops for good (its work is done): ``pause()`` no longer waits for it."""
        self.vcpus -= 1
        if self.paused:
            self._maybe_parked()

    def _maybe_parked(self) -> None:
        if self._parked_count >= self.vcpus and not self._sections:  # releases pause()
            self._parked.set()

    async def checkpoint(self) -> None:
        """Called by a vCPU between steps: park here while paused."""
        if self.paused:
            self._parked_count += 1
            self._maybe_parked()
            try:
                await self._running.wait()
            finally:
                self._parked_count -= 1

    @asynccontextmanager
    async def section(self) -> AsyncIterator[None]:
        """Guest work outside the vCPU loops (a workload's hook in the producer's tasks): it waits
        while the guest is paused, and a pause waits for it to end."""
        while self.paused:
            await self._running.wait()
        self._sections += 1
        try:
            yield
        finally:
            self._sections -= 1
            if self.paused:
                self._maybe_parked()


@dataclass
class Workload:
    """Drives one guest's allocator and memory according to a :class:`WorkloadConfig`."""

    cfg: WorkloadConfig
    alloc: BuddyAllocator
    memory: GuestMemory
    zone: ZoneLock
    gate: PauseGate = field(default_factory=PauseGate)
    stats: WorkloadStats = field(default_factory=WorkloadStats)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.cfg.seed)
        self._orders = np.array([o for o, _ in self.cfg.order_mix], dtype=np.int64)
        w = np.array([w for _, w in self.cfg.order_mix], dtype=float)
        self._order_p = w / w.sum() if w.sum() > 0 else None
        # churn blocks as parallel arrays (swap-remove on free), so rewrites gather vectorised
        self._bpfn = np.zeros(1024, dtype=np.int64)
        self._bord = np.zeros(1024, dtype=np.int8)
        self._bmt = np.zeros(1024, dtype=np.int8)
        self._nblocks = 0
        self._churn_pages = 0
        self._static = np.empty(0, dtype=np.int64)

    async def boot(self) -> None:
        """Allocate and write the static memory (before migration starts)."""
        n = int(self.alloc.page_count * self.cfg.static_fraction)
        async with self.zone.allocator():
            heads = self.alloc.alloc_bulk(n, MAX_ORDER)
        self._static = np.asarray(heads, dtype=np.int64)
        # a slice of blocks at a time: the pages of all of them as one int64 array (and the
        # temporaries that expand it) were gigabytes for a 2**30-page guest
        for i in range(0, len(self._static), BOOT_WRITE_BLOCKS):
            heads = self._static[i:i + BOOT_WRITE_BLOCKS]
            pages = block_pages(heads, np.full(len(heads), MAX_ORDER))
            await self.memory.write(pages)
            self.stats.pages_written += len(pages)
        await self._age()

    async def _age(self) -> None:
        """Give ``history`` of the free pages old data, chosen page by page with a generator
        of its own (so the workload's run is the same whatever the history)."""
        h = self.cfg.history
        if h <= 0:
            return
        rng = np.random.default_rng([self.cfg.seed, 1])
        n = self.alloc.page_count
        for a in range(0, n, _AGE_CHUNK):  # bounded temporaries on any guest size
            pages = np.flatnonzero(self.alloc.free_mask[a:a + _AGE_CHUNK]) + a
            if h < 1:
                pages = pages[rng.random(len(pages)) < h]
            await self.memory.write(pages)
            self.stats.history_pages += len(pages)

    async def run(self) -> None:
        """Run forever (until cancelled), one tick of work per ``tick_s`` of guest time."""
        cfg = self.cfg
        carry_ops = carry_writes = 0.0
        self.gate.vcpus += 1
        try:
            while True:
                await trio.sleep(cfg.tick_s)
                await self.gate.checkpoint()
                self.stats.ticks += 1
                carry_ops += cfg.ops_per_s * cfg.tick_s
                carry_writes += cfg.write_pages_per_s * cfg.tick_s
                nops, carry_ops = int(carry_ops), carry_ops - int(carry_ops)
                nw, carry_writes = int(carry_writes), carry_writes - int(carry_writes)
                await self._tick_extra()
                if nops:
                    await self._churn(nops)
                if nw:
                    await self._rewrite(nw)
        finally:
            self.gate.vcpus -= 1

    async def _tick_extra(self) -> None:
        """A subclass's own work each tick, before the churn (nothing here)."""

    async def _churn(self, nops: int) -> None:
        rng = self.rng
        target = self.cfg.churn_fraction * self.alloc.page_count
        orders = rng.choice(self._orders, size=nops, p=self._order_p).tolist()
        coins = rng.random(nops).tolist()
        unmovable = (rng.random(nops) < self.cfg.unmovable_fraction).tolist()
        # blocks allocated this tick, written once the lock is dropped; one freed again within the
        # tick leaves this map, so the write never lands on a free page
        new: dict[int, int] = {}
        async with self.zone.allocator():
            for i in range(nops):
                # steer around the target: allocate more often below it, free more often above
                p_alloc = 0.5 + 0.4 * min(1.0, max(-1.0, (target - self._churn_pages) / max(target, 1)))
                if coins[i] < p_alloc or not self._nblocks:
                    order = orders[i]
                    mt = MigrateType.UNMOVABLE if unmovable[i] else MigrateType.MOVABLE
                    pfn = self.alloc.alloc(order, mt)
                    if pfn is None:
                        self.stats.alloc_failures += 1
                        continue
                    self._push_block(pfn, order, mt)
                    self._churn_pages += 1 << order
                    new[pfn] = order
                    self.stats.allocs += 1
                else:
                    pfn, order, mt = self._pop_block(int(rng.integers(self._nblocks)))
                    self.alloc.free(pfn, order, mt)
                    new.pop(pfn, None)
                    self._churn_pages -= 1 << order
                    self.stats.frees += 1
        if new:
            pages = block_pages(np.fromiter(new.keys(), np.int64, len(new)), np.fromiter(new.values(), np.int64, len(new)))
            await self.memory.write(pages)
            self.stats.pages_written += len(pages)

    def _push_block(self, pfn: int, order: int, mt: int) -> None:
        n = self._nblocks
        if n == len(self._bpfn):
            self._bpfn = np.resize(self._bpfn, 2 * n)
            self._bord = np.resize(self._bord, 2 * n)
            self._bmt = np.resize(self._bmt, 2 * n)
        self._bpfn[n], self._bord[n], self._bmt[n] = pfn, order, mt
        self._nblocks = n + 1

    def _pop_block(self, j: int) -> tuple[int, int, MigrateType]:
        """Remove block ``j`` (the last one takes its place); return (pfn, order, mt)."""
        out = int(self._bpfn[j]), int(self._bord[j]), MigrateType(int(self._bmt[j]))
        last = self._nblocks - 1
        self._bpfn[j], self._bord[j], self._bmt[j] = self._bpfn[last], self._bord[last], self._bmt[last]
        self._nblocks = last
        return out

    async def _rewrite(self, npages: int) -> None:
        """Rewrite ``npages`` random allocated pages: half static, half churn blocks."""
        rng = self.rng
        parts = []
        n_static = npages if not self._nblocks else npages // 2
        if len(self._static) and n_static:
            heads = self._static[rng.integers(len(self._static), size=n_static)]
            parts.append(heads + rng.integers(1 << MAX_ORDER, size=n_static))
        n_churn = npages - n_static
        if self._nblocks and n_churn:
            idx = rng.integers(self._nblocks, size=n_churn)
            pfn = self._bpfn[idx]
            order = self._bord[idx].astype(np.int64)
            parts.append(pfn + (rng.integers(1 << 30, size=n_churn) & ((1 << order) - 1)))
        if parts:
            pages = distinct(np.concatenate(parts))
            await self.memory.write(pages)
            self.stats.pages_written += len(pages)


class RaceWorkload(Workload):
    """``race``: churn, plus an adversary aimed at the windows where hinting can go wrong.

    The guest is untrusted, so its timing is fair game. Through the producer's hooks
    (:class:`~hintpipe.guest.producer.ProducerHooks`) it acts on the windows on purpose. To
    *reuse* a reported block is to allocate its first 2**:attr:`REUSE_ORDER` pages (the hint
    covers them like the rest) and write them.

    * *in flight*: when the walker has taken a batch it reuses some of its blocks before their
      frame goes out (``detect`` mode; in ``isolate`` mode reported blocks are off the free
      lists until acked, so this cannot happen). The host learns of the write before the hint
      (a synchronous fault, or a Fault frame answered before the write and before the later
      Hints frame) and must refuse it (*refuse-written*). The walk's first frame, and now and
      then another, is sent :attr:`DELAY_S` or half the previous round later, so that a host
      that scans (uffd-async) may see the write before the hint arrives.
    * *stale*: in the first round, and then now and then, it holds frames and RoundEnd back
      until the next StartRound (or until it is paused), having taken a few of their blocks,
      which it writes between StopRound and RoundEnd. The frames arrive under a stopped command
      id after the host swapped rounds, when ``written`` no longer shows the write, so only
      dropping them is safe (*stale-drop*; in ``isolate`` mode their blocks stay isolated, so
      applying them is harmless). The host's StopRound waits 0.5 s for RoundEnd and proceeds
      without it; no frame is held more than a round, so the guest stays within the protocol's
      open rounds.
    * *written, then freed*: when a walk starts it writes the first pages of a few blocks (its
      own older ones, else resident ones) and frees them, so the walk reports pages written this
      round; once reported (and acked, in isolate mode) it reuses them, a write that faults no
      more (the pages are unprotected already), so only refusing their hint keeps them sent
      (*refuse-written*, in both race modes).
    * *during the send*: now and then a tick reuses a block reported this round, wherever the
      host's sender is (*invalidate*; with uffd-async a scan must find the write).
    * *at the round boundary*: between StopRound and RoundEnd (after the host's round-end
      collection of writes, before the next round's swap) it reuses a few reported blocks and
      frees old ones; the last round's boundary is right before the pause (with uffd-async only
      the scan before the next swap sees these writes: *scan-before-send*).

    In the first round it also rewrites its resident memory (a slice a tick), so that the
    migration needs a second live round and the frames held in the first reach the host after
    its swap.

    What it reuses stays allocated and unwritten for :attr:`KEEP_ROUNDS` rounds at least, within
    a fixed share of memory, so a write a broken guard let through in the last rounds shows as a
    lost page in the final check. Its counters are the ``race_*`` fields of :class:`WorkloadStats`.
    """

    REUSE_ORDER = 4
    """A reused block is its first 2**REUSE_ORDER pages (the hint covers them all the same)."""
    REUSE_FRACTION = 0.0625
    """Of each batch's blocks, reallocated and written before the frame goes out (detect mode)."""
    DELAY_P = 0.5
    """Chance that some of a frame's blocks are reused and the frame sent :attr:`DELAY_S` (or
    :attr:`DELAY_SHARE` of the previous round) later (the first frame of each walk always)."""
    DELAY_S = 0.03
    DELAY_SHARE = 0.5
    """A delayed frame waits at least this share of the previous round (StartRound to StopRound):
    long enough for the host to pass many pages, short of the round's end."""
    DELAYED_BLOCKS = 3
    """Blocks of a delayed frame reused (at least)."""
    HELD_BLOCKS = 2
    """Blocks of a held frame taken at once and written at the round boundary."""
    HOLD_P = 0.25
    """Chance that a frame after a walk's first is the first one held past its round (the second
    frame of the first walk always is)."""
    HOLD_MORE_P = 0.5
    """Chance that a later frame of a round that holds one is held too."""
    FREE_WRITTEN = 2
    """Blocks written and then freed when a walk starts (own older ones, else resident ones)."""
    BOUNDARY = 2
    """Reported blocks reused at each round boundary."""
    HINTED_P = 0.05
    """Chance per tick of reusing one block reported this round."""
    BURST_TICKS = 32
    """Ticks over which the first round rewrites the resident memory."""
    KEEP_ROUNDS = 2
    """Rounds a reused block stays allocated (and unwritten) before it may be freed again."""
    TRAP_FRACTION = 0.25
    """Most memory the blocks kept to show a loss may hold (the oldest are freed first)."""
    RECYCLE_FRACTION = 0.1
    """Most memory the other reused blocks may hold (the oldest are freed first)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._round = 0
        self._last_start: int | None = None
        self._start_t: float | None = None
        self._last_round_s = 0.0
        self._started = trio.Event()
        self._held_round = -1
        self._burst = 0  # resident blocks rewritten so far (first round)
        self._held_blocks: list[tuple[int, int]] = []
        self._frames = 0  # frames of this round so far
        self._hinted: list[tuple[int, int]] = []  # blocks reported this round (pfn, order)
        self._freed_written: list[tuple[int, int]] = []  # written, freed at this walk's start
        n = self.alloc.page_count
        # blocks whose write a broken guard would lose: kept allocated and never rewritten, so
        # the loss shows in the final check; and the others, freed again after a while
        self._traps = _Pool(self.alloc, self.stats, self.TRAP_FRACTION * n)
        self._recycled = _Pool(self.alloc, self.stats, self.RECYCLE_FRACTION * n)

    # -- what the adversary does to memory --------------------------------------------------

    async def _reuse(self, blocks: list[tuple[int, int]], pool: "_Pool | None" = None) -> list[tuple[int, int]]:
        """Allocate (the first part of) these blocks where still free into ``pool`` (default: the
        traps), write them; return the parts it got."""
        got = await self._claim(blocks, pool)
        await self._write_blocks(got)
        return got

    async def _claim(self, blocks: list[tuple[int, int]], pool: "_Pool | None" = None) -> list[tuple[int, int]]:
        """Allocate the first :attr:`REUSE_ORDER` part of each of these blocks where it is still
        free (not isolated); return those parts (not written yet)."""
        pool = self._traps if pool is None else pool
        got = []
        async with self.zone.allocator():
            for pfn, order in blocks:
                order = min(order, self.REUSE_ORDER)
                if not pool.make_room(1 << order, self._round - self.KEEP_ROUNDS):
                    break
                if self.alloc.alloc_at(pfn, order):
                    got.append((pfn, order))
                    pool.add(pfn, order, self._round)
        self.stats.allocs += len(got)
        return got

    async def _write_blocks(self, blocks: list[tuple[int, int]]) -> None:
        if blocks:
            pages = _pages_of(blocks)
            await self.memory.write(pages)
            self.stats.pages_written += len(pages)

    def _pick_free(self, blocks: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
        """Up to ``k`` random blocks of ``blocks`` that are still free as that block."""
        if not blocks or k <= 0:
            return []
        p = np.array([b[0] for b in blocks], dtype=np.int64)
        o = np.array([b[1] for b in blocks], dtype=np.int64)
        free = np.flatnonzero(self.alloc.is_free_head(p, o))
        return self._pick([blocks[i] for i in free.tolist()], k)

    def _pick(self, blocks: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
        if not blocks or k <= 0:
            return []
        idx = self.rng.choice(len(blocks), size=min(k, len(blocks)), replace=False)
        return [blocks[i] for i in sorted(idx.tolist())]

    # -- the producer's hooks ---------------------------------------------------------------

    def round_started(self, cmd_id: int) -> None:
        """A StartRound arrived: frames held in earlier rounds may go now."""
        self._last_start = cmd_id
        self._start_t = trio.current_time()
        self._started.set()
        self._started = trio.Event()

    async def walk_starting(self, cmd_id: int) -> None:
        """Write a few blocks and free them, so this round's walk reports written pages."""
        self._round += 1
        self._frames = 0
        self._hinted = []
        self._freed_written = []
        async with self.gate.section():
            own = self._recycled.oldest(self.FREE_WRITTEN, self._round - self.KEEP_ROUNDS)
            k = self.FREE_WRITTEN - len(own)
            resident = [(int(p), MAX_ORDER) for p in self._static[:k]]
            blocks = own + resident
            if not blocks:
                return
            # the first part of each is enough: the walk reports the block, its hint covers the part
            await self.memory.write(_pages_of([(p, min(o, self.REUSE_ORDER)) for p, o in blocks]))
            async with self.zone.allocator():
                for _ in own:
                    self._recycled.free_first()
                for pfn, order in resident:
                    self.alloc.free(pfn, order)
                    self.stats.frees += 1
            self._static = self._static[len(resident):]
            self._freed_written = blocks
            self.stats.race_blocks_written_then_freed += len(blocks)

    async def batch_taken(self, cmd_id: int, pfns: np.ndarray, orders: np.ndarray) -> bool:
        """Reuse some of the batch's blocks before their frame goes out; maybe hold or delay it."""
        blocks = list(zip(pfns.tolist(), orders.tolist()))
        self._hinted.extend(blocks)
        self._frames += 1
        k = int(self.rng.binomial(len(blocks), self.REUSE_FRACTION))
        p_hold = self.HOLD_MORE_P if self._held_round == self._round else self.HOLD_P
        first_hold = self._round == 1 and self._frames == 2
        if self._frames > 1 and (first_hold or self.rng.random() < p_hold):
            self._held_round = self._round
            # a few of its blocks are taken now and written at the round boundary (round_stopping)
            async with self.gate.section():
                self._held_blocks += await self._claim(self._pick(blocks, self.HELD_BLOCKS))
            self.stats.race_frames_held += 1
            return True
        if self._frames == 1 or self.rng.random() < self.DELAY_P:
            # reuse a quarter of the frame and send it later: the host scans (uffd-async) what
            # it passes meanwhile, so the hint may arrive after the host saw the write
            fresh = [b for b in blocks if b not in self._freed_written]
            async with self.gate.section():
                reused = await self._reuse(self._pick(fresh, max(k, self.DELAYED_BLOCKS)))
            self.stats.race_blocks_reused_in_flight += len(reused)
            if reused:
                self.stats.race_frames_delayed += 1
                await trio.sleep(max(self.DELAY_S, self.DELAY_SHARE * self._last_round_s))
            return False
        async with self.gate.section():
            reused = await self._reuse(self._pick(blocks, k))
        self.stats.race_blocks_reused_in_flight += len(reused)
        return False

    async def round_stopping(self, cmd_id: int) -> None:
        """Between StopRound and RoundEnd: reuse a few reported blocks, free old own ones."""
        if self._start_t is not None:
            self._last_round_s = trio.current_time() - self._start_t
        async with self.gate.section():
            if self._held_blocks:  # the held frame's hint will arrive after the host's swap
                await self._write_blocks(self._held_blocks)
                self.stats.race_held_blocks_reused += len(self._held_blocks)
                self._held_blocks = []
            got = await self._reuse(self._pick_free(self._hinted, self.BOUNDARY))
            self.stats.race_boundary_blocks += len(got)
            async with self.zone.allocator():
                self._recycled.free_older(self._round - self.KEEP_ROUNDS)

    async def release_held(self, cmd_id: int) -> None:
        """Hold until a later StartRound arrives or the guest is paused."""
        async with trio.open_nursery() as nursery:
            async def started() -> None:
                while self._last_start is None or self._last_start <= cmd_id:
                    await self._started.wait()
                nursery.cancel_scope.cancel()

            async def paused() -> None:
                await self.gate.pause_started.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(started)
            nursery.start_soon(paused)

    async def _tick_extra(self) -> None:
        """During the send: reallocate and write the blocks written and freed at the walk's start
        once they have been reported (and acked, in isolate mode), and now and then another block
        reported this round. In the first round, rewrite all resident memory once."""
        if self._round == 1 and self._burst < len(self._static):
            # a slice a tick: a guest whose writes wait for the host (sync faults) keeps hinting
            step = max(1, -(-len(self._static) // self.BURST_TICKS))
            heads = self._static[self._burst:self._burst + step]
            self._burst += step
            pages = block_pages(heads, np.full(len(heads), MAX_ORDER))
            await self.memory.write(pages)
            self.stats.pages_written += len(pages)
        if self._freed_written:
            reported = set(self._hinted)
            ready = [b for b in self._freed_written if b in reported]
            got = await self._reuse(ready) if ready else []
            # keep the ones still free as that block (isolated in flight, or not reported yet)
            taken = {p for p, _ in got}
            self._freed_written = [(p, o) for p, o in self._freed_written
                                   if p not in taken and self.alloc.head[p] == o + 1]
            self.stats.race_hinted_blocks_rewritten += len(got)
        if self._hinted and self.rng.random() < self.HINTED_P:
            got = await self._reuse(self._pick_free(self._hinted, 1), self._recycled)
            self.stats.race_hinted_blocks_rewritten += len(got)


class _Pool:
    """Blocks the race workload allocated, oldest first, within ``limit`` pages."""

    def __init__(self, alloc: BuddyAllocator, stats: WorkloadStats, limit: float) -> None:
        self.alloc = alloc
        self.stats = stats
        self.limit = limit
        self.blocks: deque[tuple[int, int, int]] = deque()  # (pfn, order, round allocated)
        self.pages = 0

    def make_room(self, pages: int, max_round: int) -> bool:
        """Free the oldest blocks allocated in round ``max_round`` or before until ``pages`` more
        fit; False if they do not (zone lock held)."""
        while self.blocks and self.pages + pages > self.limit and self.blocks[0][2] <= max_round:
            self.free_first()
        return self.pages + pages <= self.limit

    def add(self, pfn: int, order: int, round_: int) -> None:
        self.blocks.append((pfn, order, round_))
        self.pages += 1 << order

    def oldest(self, k: int, max_round: int) -> list[tuple[int, int]]:
        """Up to ``k`` oldest blocks allocated in round ``max_round`` or before."""
        return [(p, o) for p, o, r in list(self.blocks)[:k] if r <= max_round]

    def free_first(self) -> None:
        pfn, order, _ = self.blocks.popleft()
        self.alloc.free(pfn, order)
        self.pages -= 1 << order
        self.stats.frees += 1

    def free_older(self, max_round: int) -> None:
        """Free every block allocated in round ``max_round`` or before (zone lock held)."""
        while self.blocks and self.blocks[0][2] <= max_round:
            self.free_first()


def _pages_of(blocks: list[tuple[int, int]]) -> np.ndarray:
    return block_pages(np.array([p for p, _ in blocks], dtype=np.int64), np.array([o for _, o in blocks], dtype=np.int64))


def make_workload(cfg: WorkloadConfig, alloc: BuddyAllocator, memory: GuestMemory, zone: ZoneLock) -> Workload:
    """The workload ``cfg.kind`` names (``race``: a :class:`RaceWorkload`, whose hooks the
    producer takes; the others: a :class:`Workload`)."""
    cls = RaceWorkload if cfg.kind == "race" else Workload
    return cls(cfg, alloc, memory, zone)


def producer_hooks(workload: Workload):
    """The :class:`~hintpipe.guest.producer.ProducerHooks` of ``workload``, or None."""
    return workload if isinstance(workload, RaceWorkload) else None
