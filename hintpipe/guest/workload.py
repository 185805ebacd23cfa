"""Guest workloads: what the vCPUs do to memory while the guest is being migrated.

Both workloads boot the same way: ``static_fraction`` of memory is allocated in max-order
blocks and written once (kernel, page cache, a resident application); then ``history`` of the
pages still free get old data, as in a guest that has run a while (Linux does not zero freed
pages; ``history`` 0 is a freshly booted guest whose free pages were never written). ``idle`` then only touches
a few static pages per second. ``churn`` also allocates and frees blocks of a configurable order
mix around ``churn_fraction`` of memory, writes each block it allocates (an allocation is a
write), and rewrites random allocated pages. Time is trio's clock; all randomness comes from one
seeded generator, so a run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import trio

from hintpipe.guest.buddy import BuddyAllocator, MigrateType
from hintpipe.guest.memory import GuestMemory
from hintpipe.guest.zonelock import ZoneLock
from hintpipe.units import MAX_ORDER, block_pages

_AGE_CHUNK = 1 << 20  # pages given old data per step at boot

# mostly small allocations, a few huge-page sized ones: about 8 pages written per allocation
DEFAULT_ORDER_MIX = ((0, 0.6), (1, 0.1), (2, 0.1), (3, 0.1), (4, 0.09), (9, 0.01))


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
    def replay(cls, **kw) -> "WorkloadConfig":
        """A recorded kernel as the guest (``hintpipe replay``): the trace decides every
        allocation; ``write_pages_per_s`` extra writes go to allocated pages each ``tick_s``."""
        base = dict(kind="replay", static_fraction=0.0, churn_fraction=0.0, ops_per_s=0.0,
                    write_pages_per_s=0.0, tick_s=0.02)
        base.update(kw)
        return cls(**base)

    def __post_init__(self) -> None:
        if self.kind not in ("idle", "churn", "replay"):
            raise ValueError(f"unknown workload {self.kind!r} (idle or churn)")
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
        self.vcpus = 0
        self._parked_count = 0

    async def pause(self) -> None:
        """Stop the vCPUs at their next step and wait until they have stopped."""
        self.paused = True
        self._running = trio.Event()
        self._parked = trio.Event()
        self._parked_count = 0
        if self.vcpus:
            await self._parked.wait()

    def resume(self) -> None:
        """Let the vCPUs run again."""
        self.paused = False
        self._running.set()

    def leave(self) -> None:
        """A vCPU stops for good (its work is done): ``pause()`` no longer waits for it."""
        self.vcpus -= 1
        if self.paused and self._parked_count >= self.vcpus:
            self._parked.set()

    async def checkpoint(self) -> None:
        """Called by a vCPU between steps: park here while paused."""
        if self.paused:
            self._parked_count += 1
            if self._parked_count >= self.vcpus:  # the last vCPU to stop releases pause()
                self._parked.set()
            try:
                await self._running.wait()
            finally:
                self._parked_count -= 1


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
        if len(self._static):
            pages = block_pages(self._static, np.full(len(self._static), MAX_ORDER))
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
                if nops:
                    await self._churn(nops)
                if nw:
                    await self._rewrite(nw)
        finally:
            self.gate.vcpus -= 1

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
            pages = np.unique(np.concatenate(parts))
            await self.memory.write(pages)
            self.stats.pages_written += len(pages)
