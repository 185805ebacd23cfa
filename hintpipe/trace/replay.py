"""Replay a real allocator trace through hinting policies and a migration.

The guest here is not the buddy model of ``hintpipe.guest`` but the recorded kernel itself: a
:class:`ReplayModel` advances through the trace in virtual time (1 s of trace = 1 s of trio's
clock, so a 10 s recording does not take 10 s), every allocation is a write to its pages (through
the same simulated write-protect as the demo), and a hinting policy
(:mod:`~hintpipe.trace.policies`: hintpipe's walker, Linux free page reporting, virtio-balloon
free page hinting, or none) tells the host about free memory while the host migrates. The
recorded history decides every allocation, so hinted blocks cannot be isolated from it: the
``hintpipe`` policy runs in ``detect`` mode only. :func:`replay` runs one migration per policy,
in worker processes where there are cores, and verifies each: every page that holds guest data
must arrive intact.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import trio

from hintpipe.config import ReplayUsageError, RunConfig
from hintpipe.guest.memory import GuestMemory
from hintpipe.guest.walker import DEFAULT_BUDGET_US, HoldBudget, WalkerStats
from hintpipe.guest.workload import PauseGate, WorkloadConfig
from hintpipe.guest.zonelock import ZoneLock
from hintpipe.host.migration import MigrationEngine, MigrationResult
from hintpipe.host.pagestate import HostPageState
from hintpipe.host.session import HostSession
from hintpipe.host.timeline import Timeline
from hintpipe.inprocess import InProcessLink, migrate_in_process
from hintpipe.progress import NO_PROGRESS, MigrationObserver, Progress, RoundProgress, Task
from hintpipe.report import GuardFigures, HintFigures, RunOutcome, RunResult, replay_run_report
from hintpipe.units import MAX_ORDER, NR_ORDERS, order_pages
from hintpipe.wp.base import UNTRACKED
from hintpipe.wp.sim import SimBackend

from .events import EventBatch
from .layout import reported_by_order
from .model import ReplayModel
from .policies import POLICIES, BalloonHintPolicy, Policy, ReplayWorld, policy_names
from .reclaim import ReclaimTracker
from .recording import Trace
from .snapshot import decompose


__all__ = ["ReplayUsageError", "TraceWalker", "TraceWorkload", "ReplayMemory", "ReplayRun", "replay_migration",
           "run_policies", "replay", "replay_outcome", "replay_outcomes"]


_NO_BLOCKS = (np.empty(0, np.int64), np.empty(0, np.uint8))
_ONE = np.int64(1)
_WINDOW = 1 << 16
# a window whose pages are all free: one max-order block every 2**MAX_ORDER pages
_MAX_HEADS = np.arange(0, _WINDOW, 1 << MAX_ORDER, dtype=np.int64)
_MAX_ORDERS = np.full(len(_MAX_HEADS), MAX_ORDER, np.uint8)
_MAX_ORDERS.flags.writeable = False  # handed out (or sliced) as a batch's orders: never mutated


def _maximal_blocks(free: np.ndarray, min_order: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the set entries of ``free`` (one per aligned ``2**min_order``-page slot, entry 0
    aligned to ``2**MAX_ORDER`` pages) into maximal aligned blocks of order <= MAX_ORDER, as the
    buddy allocator merges them; return (first slot int64, order uint8), in slot order."""
    levels = [free]  # levels[j][i]: the order-(min_order + j) block i is entirely free
    for _ in range(min_order, MAX_ORDER):
        lv = levels[-1]
        levels.append(lv[: len(lv) & ~1].reshape(-1, 2).all(axis=1))
    slot_parts, order_parts = [], []
    for j in range(len(levels) - 1, -1, -1):
        own = levels[j]
        if j + 1 < len(levels) and levels[j + 1].size:
            own = own.copy()
            own[: 2 * levels[j + 1].size].reshape(-1, 2)[levels[j + 1]] = False  # in a free parent
        idx = own.nonzero()[0]
        if idx.size:
            slot_parts.append(idx.astype(np.int64) << j)
            order_parts.append(np.full(idx.size, min_order + j, np.uint8))
    if not slot_parts:
        return _NO_BLOCKS
    slots, orders = np.concatenate(slot_parts), np.concatenate(order_parts)
    by_slot = np.argsort(slots)
    return slots[by_slot], orders[by_slot]


def _row_table(levels: int) -> tuple[np.ndarray, np.ndarray]:
    """For rows of ``2**levels`` slots (one max-order block each): the weights that turn a row's
    free slots into a pattern number, and per pattern the (order + 1) of the maximal block
    beginning at each slot (0: none), orders counted from min_order = MAX_ORDER - levels."""
    width = 1 << levels
    weights = (1 << np.arange(width)).astype(np.uint8)
    table = np.zeros((1 << width, width), np.uint8)
    mo = MAX_ORDER - levels
    for pattern in range(1 << width):
        free = ((pattern >> np.arange(width)) & 1).astype(bool)
        first, orders = _maximal_blocks(free, mo)
        table[pattern, first] = orders + 1
    return weights, table


# rows of up to 8 slots: min_order 7..10 (the default, 9, is a row of two slots)
_ROW_TABLES = {levels: _row_table(levels) for levels in range(4)}


class TraceWalker:
    """Lock-bounded walk of a replay model's buddy-free pages, with the FreeListWalker interface.

    The model keeps a free-page bitmap, not free lists, so the walk goes through the PFN space
    in windows of ``WINDOW`` pages, one bounded step per window visit: the step reads the
    window's free bits once, per ``2**min_order``-page slot (orders below ``min_order`` are never
    computed), merges whole free slots into maximal aligned blocks up to MAX_ORDER, and takes
    those at or after the walk's cursor in pfn order, up to the batch's room. A block is free
    when the step that returns it reads the bitmap, so it is still free when reported; the
    cursor moves past every block taken, so no block is reported twice in a round. Blocks freed
    behind the walk are left to the next round. The lock budget is kept as in
    :class:`~hintpipe.guest.walker.FreeListWalker` (:class:`~hintpipe.guest.walker.HoldBudget`):
    every hold ends within the budget plus at most one step. The model cannot isolate, so
    ``isolate`` is always False.
    """

    isolate = False
    WINDOW = _WINDOW  # pages per step: one 64 KiB read of the free bitmap, about 15 us here

    def __init__(self, model: ReplayModel, *, min_order: int = 9, batch: int = 32,
                 time_budget_us: float = DEFAULT_BUDGET_US, clock: Callable[[], float] = time.thread_time):
        if not 0 <= min_order <= MAX_ORDER:
            raise ValueError(f"min_order {min_order} outside 0..{MAX_ORDER}")
        self.model = model
        self.min_order = min_order
        self.batch = batch
        self.time_budget_s = time_budget_us * 1e-6
        self.budget = HoldBudget(self.time_budget_s, clock)
        self.stats = WalkerStats()
        self._cursor = model.page_count  # no round yet
        self._window_blocks(0)  # numpy's first-call costs, outside any lock hold

    @property
    def done(self) -> bool:
        """No more blocks to visit this round."""
        return self._cursor >= self.model.page_count

    def start_round(self) -> None:
        """Begin a walk from PFN 0 (call with the zone lock held)."""
        self._cursor = 0
        self.stats.rounds += 1

    def stop(self) -> None:
        """Abandon the walk."""
        self._cursor = self.model.page_count

    def _window_blocks(self, start: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The maximal free blocks of order >= min_order in the window at ``start`` (a multiple
        of WINDOW), in pfn order: (pfns int64, orders uint8, the pages they cover).

        Few numpy calls, whatever the window holds: with caches cold (the trace's events ran
        since the last hold) each call costs microseconds here. The window's free bits are read
        once per ``2**min_order``-page slot; each max-order block of slots is one row, and its
        pattern of free slots (at most 8 slots a row: min_order >= MAX_ORDER - 3) indexes a
        table of the row's maximal blocks. Lower min_orders and a guest's ragged last window
        take :func:`_maximal_blocks` instead. Every free slot is in exactly one block, so the
        blocks cover the free slots' pages.
        """
        mo = self.min_order
        slots = (min(self.model.page_count, start + self.WINDOW) - start) >> mo
        free = self.model.free_mask[start:start + (slots << mo)].reshape(slots, 1 << mo).all(axis=1)
        nfree = int(np.count_nonzero(free))
        if nfree == 0:
            return _NO_BLOCKS + (0,)
        if nfree == self.WINDOW >> mo:  # all free: max-order blocks end to end
            return _MAX_HEADS + start, _MAX_ORDERS, self.WINDOW
        table = _ROW_TABLES.get(MAX_ORDER - mo)
        if table is None or slots % len(table[0]):
            pfns, orders = _maximal_blocks(free, mo)
            return (pfns << mo) + start, orders, nfree << mo
        codes = table[1][free.reshape(-1, len(table[0])).view(np.uint8) @ table[0]].ravel()
        idx = codes.nonzero()[0]  # slots that begin a maximal block, ascending
        return (idx << mo) + start, codes[idx] - 1, nfree << mo

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``batch`` blocks free now; empty when the walk is complete or the time budget
        ran out while scanning windows without free blocks (check :attr:`done`)."""
        budget = self.budget
        budget.begin()
        n = self.model.page_count
        got_p, got_o, found, pages = [], [], 0, 0
        while found < self.batch and self._cursor < n and not budget.cut:
            start = self._cursor - self._cursor % self.WINDOW
            p, o, npages = self._window_blocks(start)
            room = self.batch - found
            if p.size and (self._cursor > start or p.size > room):  # part of the window only
                if self._cursor > start:  # resuming inside this window
                    keep = p >= self._cursor
                    p, o = p[keep], o[keep]
                if p.size > room:  # pfn order: resume after the last block taken
                    p, o = p[:room], o[:room]
                    self._cursor = int(p[-1]) + (1 << int(o[-1]))
                else:
                    self._cursor = min(n, start + self.WINDOW)
                npages = int((_ONE << o).sum())
            else:
                self._cursor = min(n, start + self.WINDOW)
            if p.size:
                got_p.append(p)
                got_o.append(o)
                found += p.size
                pages += npages
            budget.step_done()
        if found:
            pfns = (got_p[0] if len(got_p) == 1 else np.concatenate(got_p)).view(np.uint64)
            orders = got_o[0] if len(got_o) == 1 else np.concatenate(got_o)
        else:
            pfns, orders = _NO_BLOCKS[0].view(np.uint64), _NO_BLOCKS[1]
        self.stats.record_batch(found, pages, budget.finish(), budget.cut)
        return pfns, orders

    def release(self, pfns: np.ndarray, orders: np.ndarray) -> None:
        """Nothing to release: blocks are never isolated in a replay."""


class ReplayMemory(GuestMemory):
    """Guest RAM of a replay: what the host holds of each page, and which pages hold guest data.

    ``versions[p]`` is the content the host holds (0: a zero page, as never-touched RAM, or a page
    the host discarded). Each write stores a value no page has held before (GuestMemory's write
    sequence), so no write can bring back a value the destination already holds, even after a
    discard reset the page to zero: a lost write always shows.

    ``dead[p]``: the page holds no data the guest needs; the oracle checks every other page.
    Pages in use at the start hold data, and untouched RAM holds zeros the guest may read; a
    write gives a page data and a free (to the buddy or to a per-CPU list) takes it away: a free
    page's content is stale, and a page the kernel moves to a per-CPU list is not written until
    a caller gets it (``mm_page_alloc``, which counts as a write).
    """

    def __init__(self, versions: np.ndarray, dead: np.ndarray, reclaim: ReclaimTracker) -> None:
        # not GuestMemory.__init__: the arrays come filled from the trace's layout
        self.page_count = len(versions)
        self.versions = versions
        self.dead = dead
        self.tracker = UNTRACKED
        self.pages_written = 0
        self.reclaim = reclaim
        self._seq = int(versions.max(initial=0))  # the next write's value follows the initial ones

    def settle(self, pages: np.ndarray, freed: np.ndarray) -> None:
        """Who holds ``pages`` after a step (:meth:`ReplayModel.holders`): a page whose last event
        freed it holds no guest data, one a caller got does (the last entry of a page wins)."""
        self.dead[pages] = freed

    async def write(self, pfns: np.ndarray) -> None:
        """Write pages ``pfns`` (faulting first where protected); they are backed again."""
        if len(pfns) == 0:
            return
        await self.tracker.before_write(pfns)
        self.versions[pfns] = self._next_content()
        self.dead[pfns] = False
        self.pages_written += len(pfns)
        self.reclaim.touch(pfns)

    def discard(self, pages: np.ndarray) -> None:
        """The host dropped the backing of ``pages``: they read as zeros."""
        self.versions[pages] = 0


class ReplayPageState(HostPageState):
    """The host's page state, telling the policy which hinted blocks went into the skip bitmap."""

    def __init__(self, page_count: int, *, refuse_written: bool, invalidate: bool, on_applied) -> None:
        super().__init__(page_count, refuse_written=refuse_written, invalidate=invalidate)
        self.on_applied = on_applied

    def _apply_locked(self, starts: np.ndarray, orders: np.ndarray) -> None:
        # every applied hint passes here, applied at once or staged and applied later; the lock
        # is held, so the policy reads the skip bits directly (``is_skip`` would take it again)
        super()._apply_locked(starts, orders)
        if len(orders):
            self.on_applied(starts, orders, self._skip.gather)


class TraceWorkload:
    """The recorded kernel as the guest's vCPU: applies the trace as virtual time passes.

    Every ``cfg.tick_s`` of guest time the trace advances as far, the policy sees each step before
    and after it is applied, each allocation writes its pages, and ``cfg.write_pages_per_s``
    extra writes go to allocated pages. Once the trace has ended the vCPU idles without ticking.
    ``task`` is told the trace position (events applied) after each step.
    """

    def __init__(self, model: ReplayModel, memory: ReplayMemory, zone: ZoneLock, cfg: WorkloadConfig,
                 policy: Policy | None = None, world: ReplayWorld | None = None, task: Task | None = None) -> None:
        self.task = task or Task()
        self.model = model
        self.memory = memory
        self.zone = zone
        self.cfg = cfg
        self.policy = policy or Policy(world, None)
        self.world = world
        self.gate = PauseGate()
        self.rng = np.random.default_rng(cfg.seed)
        self.pages_written = 0
        self.finished_at: float | None = None

    async def run(self) -> None:
        """Replay until the trace ends, then idle (no longer a running vCPU) until cancelled."""
        cfg = self.cfg
        model, policy, gate = self.model, self.policy, self.gate
        reclaim = self.world.reclaim if self.world else None
        t0 = self.world.t0 if self.world else trio.current_time()
        first = model.peek_first_ts_ns() or 0
        carry = 0.0
        gate.vcpus += 1
        running = True
        try:
            tick = 0
            while not model.done:
                tick += 1
                await trio.sleep_until(t0 + tick * cfg.tick_s)
                await gate.checkpoint()
                now = trio.current_time() - t0
                async with self.zone.allocator():
                    step = model.next_step(first + int(now * 1e9))
                    policy.before_step(step)
                    allocated, freed = model.apply(step)
                    policy.after_step(step, allocated, freed)
                await self.memory.write(allocated)
                self.memory.settle(*model.holders(step))
                self.pages_written += len(allocated)
                carry += cfg.write_pages_per_s * cfg.tick_s
                if carry >= 1:
                    k, carry = int(carry), carry - int(carry)
                    cand = self.rng.integers(model.page_count, size=4 * k)
                    cand = cand[~self.memory.dead[cand]][:k]  # pages that hold the guest's data
                    await self.memory.write(cand)
                    self.pages_written += len(cand)
                if reclaim is not None:
                    reclaim.sample(now)
                self.task.update(model.events_applied)
            self.finished_at = trio.current_time() - t0
            self.task.close()
            running = False
            gate.leave()
            await trio.sleep_forever()
        finally:
            if running:
                gate.vcpus -= 1


@dataclass
class ReplayRun:
    """One replayed migration under one policy."""

    result: MigrationResult
    model: ReplayModel
    state: HostPageState
    zone: ZoneLock
    session: HostSession | None
    walker: object | None
    workload: TraceWorkload
    wall_s: float
    wp: dict
    policy: Policy
    reclaim: ReclaimTracker
    timeline: Timeline | None = None
    broken: frozenset[str] = frozenset()

    def figures(self) -> RunResult:
        """The run's figures for its report (and its charts: the timeline and lock samples)."""
        return RunResult(migration=self.result,
                         hints=HintFigures.of(self.session.conn if self.session else None, self.state),
                         guards=GuardFigures.of(self.broken, self.session.conn if self.session else None, self.state, self.wp),
                         faults=self.state.faults, wp=self.wp, lock=self.zone.summary(),
                         wall_s=self.wall_s, timeline=self.timeline, lock_samples_us=self.zone.samples_us())

    def policy_figures(self, baseline_bytes: int | None = None) -> dict:
        """This run's entry of the report's ``policies`` list (keys in docs/policies.md)."""
        m = self.result
        pol = self.policy.figures()
        lock = self.zone.summary()
        conn = self.session.conn if self.session else None
        hint_messages = pol.pop("hint_messages", conn.hints_frames if conn else 0)
        pages_hinted = pol.pop("pages_hinted", conn.hints_pages if conn else 0)
        if isinstance(self.policy, BalloonHintPolicy):
            # each run also sends its command id and ends with STOP (outbufs on the hint queue)
            hint_messages = self.policy.walker.blocks + 2 * self.policy.walker.runs
        details = pol.pop("details", {})
        if conn is not None:
            details = {**details, "stale_messages": conn.stale_frames,
                       "pages_refused_written": self.state.pages_refused_written}
        return {
            "name": self.policy.name,
            "bytes_sent": m.bytes_sent,
            "bytes_saved_pct": round(100 * (1 - m.bytes_sent / baseline_bytes), 2) if baseline_bytes else None,
            "pages_sent": m.pages_sent,
            "zero_pages_sent": m.zero_pages_sent,
            "lost_pages": m.lost_pages,
            "verified": m.verified,
            "migration_time_s": round(m.time_s, 4),
            "downtime_ms": round(m.downtime_ms, 3),
            "rounds": m.rounds,
            "hint_messages": hint_messages,
            "pages_hinted": pages_hinted,
            **pol,
            "lock": {"p99_hold_us": lock["p99_hold_us"], "max_hold_us": lock["max_hold_us"],
                     "p50_hold_us": lock["p50_hold_us"], "holds": lock["batches"]},
            "reclaim": self.reclaim.figures(),
            "details": details,
        }


async def replay_migration(trace: Trace, events: EventBatch, cfg: RunConfig, *, hinting: bool = True,
                           policy: str | None = None, policy_kw: dict | None = None, in_place: bool = False,
                           observers: Sequence[MigrationObserver] = (), task: Task | None = None) -> ReplayRun:
    """Migrate the traced guest while its trace replays under ``policy`` (default ``hintpipe``,
    or ``none`` with ``hinting=False``); runs under any trio clock.

    Content at the start: RAM in use and free RAM hold data (Linux does not zero freed pages),
    never-touched or ballooned RAM is zero, and PFNs that are not RAM are never sent
    (:class:`~hintpipe.trace.layout.Layout`). The oracle checks every page that holds guest data
    at the end (:attr:`ReplayMemory.dead` tells the others); a policy whose host destroyed live
    data during the run (``pages_destroyed``) fails it too. The engine tells ``observers`` of each
    round and chunk (a :class:`Timeline` among them is kept in the result); ``task`` follows the
    trace position. ``in_place``: this process is discarded after the run (a forked worker), so
    the trace's arrays are used and changed in place rather than copied.
    """
    if cfg.workload.kind != "replay":
        raise ReplayUsageError("a replay's workload is its trace: configure it with RunConfig.for_replay")
    t_wall = time.perf_counter()
    name = policy or ("hintpipe" if hinting else "none")
    layout = trace.layout
    model = ReplayModel(trace.initial_free, [events], copy=not in_place)
    n = model.page_count
    reclaim = ReclaimTracker(n)
    versions, dead = layout.initial_content()
    if not in_place:
        versions, dead = versions.copy(), dead.copy()
    memory = ReplayMemory(versions, dead, reclaim)
    world = ReplayWorld(model, layout, memory, reclaim)
    kw = dict(policy_kw or {})
    if name == "hintpipe":
        kw["walker"] = TraceWalker(model, min_order=cfg.min_order, batch=cfg.batch, time_budget_us=cfg.time_budget_us)
    pol = POLICIES[name](world, cfg, **kw)
    state = ReplayPageState(n, refuse_written=cfg.guard_on("refuse-written"), invalidate=cfg.guard_on("invalidate"),
                            on_applied=pol.on_hints_applied)
    backend = SimBackend(state)  # the recorded kernel's writes fault like an in-process guest's
    memory.tracker = backend.guest_tracker
    zone = ZoneLock(charge_holds=cfg.charge_holds, fixed_hold_s=cfg.fixed_hold_s)
    workload = TraceWorkload(model, memory, zone, cfg.workload, pol, world, task)
    pol.gate, pol.zone_lock = workload.gate, zone
    link = InProcessLink(cfg, pol.walker, zone, n, name="replay") if pol.walker is not None else None
    ram = layout.ram

    def start_round(index: int) -> None:
        backend.start_round(index)
        if index == 0:
            state.keep_dirty(ram)  # PFNs that are not RAM are never sent

    async def pause() -> None:
        await workload.gate.pause()
        pol.on_pause()

    async def vcpus() -> None:
        async with trio.open_nursery() as nursery:
            for guest_task in pol.guest_tasks():
                nursery.start_soon(guest_task)
            await workload.run()

    engine = MigrationEngine(
        replace(cfg.migration, hinting=link is not None,
                chunk_pages=cfg.migration.chunk_pages or REPLAY_CHUNK_PAGES), state,
        read_source=lambda idx: memory.versions[idx],
        free_mask=lambda: memory.dead,  # the oracle checks the pages that hold guest data
        pause_guest=pause,
        session=link.session if link else None,
        before_chunk=backend.before_chunk,
        start_round=start_round,
        observers=observers,
        broken_guards=cfg.broken,
    )
    world.t0 = trio.current_time()
    pol.prepare()
    result = await migrate_in_process(engine, vcpus, link)
    workload.task.close()
    if pol.side is not None and pol.side.pages_destroyed:
        result.verified = False  # the host destroyed data the guest held (docs/policies.md)
    return ReplayRun(result, model, state, zone, link.session if link else None, pol.walker, workload,
                     time.perf_counter() - t_wall, backend.stats(), pol, reclaim,
                     next((o for o in observers if isinstance(o, Timeline)), None), cfg.broken)


REPLAY_CHUNK_PAGES = 1 << 16
"""Pages the replay's sender moves per step (256 MiB): about a hundred steps per round of a
25 GiB PFN space, where hints arriving mid-round still help the rest of the round."""


class VirtualClock(trio.abc.Clock):
    """Virtual time that jumps to the next deadline whenever every task is blocked: what
    ``trio.testing.MockClock(autojump_threshold=0)`` does for a run without I/O, without
    importing ``trio.testing`` (which imports pytest when it is installed: 0.2 s at start-up)."""

    def __init__(self) -> None:
        self._now = 0.0

    def start_clock(self) -> None:
        """Nothing to start: the time is virtual."""

    def current_time(self) -> float:
        """Seconds of virtual time since the run began."""
        return self._now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        """Called when no task can run: jump to ``deadline`` and sleep not at all."""
        if deadline > self._now:
            if deadline == math.inf:
                return 86400.0  # no deadline and nothing runnable: a deadlock, wait for Ctrl-C
            self._now = deadline
        return 0.0


@dataclass
class PolicyOutcome:
    """What one policy's replay hands back (picklable: it may come from a worker process)."""

    name: str
    run: RunResult
    entry: dict
    bytes_sent: int
    trace_finished: bool = False


def _run_policy(trace: Trace, events: EventBatch, cfg: RunConfig, name: str, in_place: bool = False,
                progress: Progress = NO_PROGRESS, label: str | None = None) -> PolicyOutcome:
    """Replay one policy's migration under a virtual clock (in this process or a worker);
    ``progress`` shows its trace position and rounds under ``label`` (default: the policy)."""
    label = label or name

    async def main() -> ReplayRun:
        task = progress.task(f"{label}: trace events", total=len(events), unit="events")
        return await replay_migration(trace, events, cfg, policy=name, in_place=in_place, task=task,
                                      observers=(Timeline(), RoundProgress(progress, f"{label}: migration")))

    run = trio.run(main, clock=VirtualClock())
    return PolicyOutcome(name, run.figures(), run.policy_figures(), run.result.bytes_sent,
                         run.workload.finished_at is not None)


def trace_facts(trace: Trace, events: EventBatch) -> dict:
    """The trace's own figures, whatever the policy: free blocks and Reported blocks per order
    at the start, the kinds of its PFNs, and the free pages once the whole trace is replayed
    (its fidelity to ``buddyinfo.end``)."""
    pfns, orders = decompose(trace.initial_free)
    model = ReplayModel(trace.initial_free, [events])
    model.run_to_end()
    return {"by_order": np.bincount(orders, minlength=NR_ORDERS).tolist(),
            "reported": reported_by_order(trace.layout, pfns, orders),
            "final_free": model.nr_free_pages,
            "pages_by_kind": trace.layout.pages_by_kind()}


TRACE_FACTS = "trace facts"
"""The job that computes :func:`trace_facts`, beside the policies' replays."""
RUN_COST = {"balloon-hint": 6, "hintpipe": 3, "page-reporting": 2, "none": 2, TRACE_FACTS: 1}
"""Relative wall time of each job here (one message per 4 MiB block makes balloon-hint the
longest): the longest start first, so parallel workers finish together."""

_WORK: tuple | None = None  # what forked workers replay: set in the parent just before forking


def _job(trace: Trace, events: EventBatch, cfg: RunConfig, key: str, in_place: bool,
         progress: Progress = NO_PROGRESS, labels: dict | None = None):
    if key == TRACE_FACTS:
        return trace_facts(trace, events)
    return _run_policy(trace, events, cfg, key, in_place, progress, (labels or {}).get(key))


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it ends the pool


def _work(key: str):
    # a worker runs one job and exits (maxtasksperchild=1), so the trace's arrays, inherited
    # copy-on-write, can serve as the run's own: pages the run never writes are never copied
    trace, events, cfg, labels, queue = _WORK
    progress = _ForwardedProgress(queue, key) if queue is not None else NO_PROGRESS
    return key, _job(trace, events, cfg, key, True, progress, labels)


class _ForwardedTask(Task):
    def __init__(self, queue, ref: tuple) -> None:
        self._queue = queue
        self._ref = ref

    def update(self, completed=None, *, total=None, description=None) -> None:
        self._queue.put((self._ref, "update", (completed, total, description)))

    def close(self) -> None:
        self._queue.put((self._ref, "close", None))


class _ForwardedProgress(Progress):
    """A worker's progress: every task and update goes to the parent, which shows it."""

    def __init__(self, queue, key: str) -> None:
        self._queue = queue
        self._key = key
        self._n = 0

    def task(self, description: str, total: float | None = None, unit: str = "") -> Task:
        self._n += 1
        ref = (self._key, self._n)
        self._queue.put((ref, "task", (description, total, unit)))
        return _ForwardedTask(self._queue, ref)


def _show_forwarded(queue, progress: Progress) -> None:
    """The parent's side of :class:`_ForwardedProgress` (a thread): until ``None`` arrives."""
    tasks: dict = {}
    while (msg := queue.get()) is not None:
        ref, op, args = msg
        if op == "task":
            tasks[ref] = progress.task(*args)
        elif op == "update" and ref in tasks:
            completed, total, description = args
            tasks[ref].update(completed, total=total, description=description)
        elif op == "close" and ref in tasks:
            tasks.pop(ref).close()
    for task in tasks.values():  # a worker that ended without closing its tasks
        task.close()


def usable_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_policies(trace: Trace, events: EventBatch, cfg: RunConfig, names: list[str], *,
                 jobs: int | None = None, progress: Progress = NO_PROGRESS,
                 labels: dict | None = None) -> tuple[list[PolicyOutcome], dict]:
    """Replay each policy of ``names`` and compute the :func:`trace_facts`; return the outcomes
    (in the order of ``names``) and the facts. Jobs run in worker processes, up to ``jobs`` at
    once (default: one per usable core), or here when there is one worker; ``progress`` shows
    each run's trace position and rounds here (``labels``: policy -> how to call its run), or
    the jobs done when they run in workers.

    Each worker is forked for one job once the trace is loaded, so it shares the trace instead
    of parsing it again; workers ignore Ctrl-C, which ends the pool from here
    (KeyboardInterrupt propagates).
    """
    global _WORK
    keys = [*names, TRACE_FACTS]
    order = sorted(keys, key=lambda k: -RUN_COST.get(k, 1))
    workers = min(len(keys), jobs or usable_cores())
    trace.layout.initial_content()  # computed once, before forking: every worker shares it
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        done = {k: _job(trace, events, cfg, k, False, progress, labels) for k in order}
    else:
        task = progress.task(f"replaying {', '.join(names)} in {workers} processes", total=len(keys), unit="jobs")
        ctx = multiprocessing.get_context("fork")
        queue = ctx.SimpleQueue() if progress is not NO_PROGRESS else None
        shower = None
        if queue is not None:
            shower = threading.Thread(target=_show_forwarded, args=(queue, progress), daemon=True)
            shower.start()
        _WORK = (trace, events, cfg, labels, queue)
        pool = ctx.Pool(workers, initializer=_ignore_sigint, maxtasksperchild=1)
        try:
            done = {}
            for key, result in pool.imap_unordered(_work, order, chunksize=1):
                done[key] = result
                task.update(len(done))
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
            _WORK = None
            if shower is not None:
                queue.put(None)
                shower.join(timeout=5)
            task.close()
    facts = done.pop(TRACE_FACTS)
    return [done[n] for n in names], facts


def _buddyinfo_pages(info: dict | None) -> int | None:
    return None if not info else int(info["free_pages"])


def replay(trace: Trace, cfg: RunConfig, policies: list[str] | tuple[str, ...] = ("hintpipe",), *,
           jobs: int | None = None, progress: Progress = NO_PROGRESS) -> dict:
    """Replay ``trace`` under each of ``policies`` (``all`` for every one) and return the JSON
    report: the first policy's figures under the keys of a single replay, every policy in
    ``policies``.

    The baseline is the ``none`` policy: run once (also when it is not asked for, if
    ``cfg.baseline``), its bytes are what every ``bytes_saved_pct`` is relative to.
    """
    return replay_outcomes(trace, cfg, policies, jobs=jobs, progress=progress)[0].report


def _read_events(trace: Trace, progress: Progress) -> EventBatch:
    task = progress.task("reading the trace", total=trace.events_hint, unit="events")
    batches, n = [], 0
    for b in trace.batches():
        batches.append(b)
        n += len(b)
        task.update(n)
    task.close()
    return EventBatch.concat(batches)


def replay_outcome(trace: Trace, cfg: RunConfig, *, progress: Progress = NO_PROGRESS,
                   jobs: int | None = None) -> RunOutcome:
    """The ``hintpipe`` policy's replay and (with ``cfg.baseline``) its ``none`` baseline, as one
    outcome for the charts (:func:`replay_outcomes`)."""
    return replay_outcomes(trace, cfg, ["hintpipe"], jobs=jobs, progress=progress)[0]


def replay_outcomes(trace: Trace, cfg: RunConfig, policies: list[str] | tuple[str, ...] = ("hintpipe",), *,
                    jobs: int | None = None, progress: Progress = NO_PROGRESS) -> list[RunOutcome]:
    """:func:`replay`, keeping the runs behind the report for the charts: one outcome per policy
    asked for (each with the whole report; labelled with the policy when there are several, and
    with the ``none`` run as its baseline when there is one). ``progress`` shows the reading of
    the trace, then the runs."""
    t0 = time.perf_counter()
    names = policy_names(list(policies))
    events = _read_events(trace, progress)
    parse_s = time.perf_counter() - t0
    runs = names + (["none"] if cfg.baseline and "none" not in names else [])
    labels = ({"hintpipe": "with hinting", "none": "baseline (no hinting)"} if names == ["hintpipe"] else {})
    layout = trace.layout
    outcomes, facts = run_policies(trace, events, cfg, runs, jobs=jobs, progress=progress, labels=labels)
    outcomes = {o.name: o for o in outcomes}
    base = outcomes.get("none") if cfg.baseline or "none" in names else None
    first = outcomes[names[0]]
    for o in outcomes.values():
        o.entry["bytes_saved_pct"] = (round(100 * (1 - o.bytes_sent / base.bytes_sent), 2)
                                      if base and base.bytes_sent else None)
    initial_by_order = facts["by_order"]
    final_free = facts["final_free"]
    ref_end = _buddyinfo_pages(trace.buddyinfo_end)
    elapsed = time.perf_counter() - t0
    span = (int(events.ts_ns[-1]) - int(events.ts_ns[0])) / 1e9 if len(events) else 0.0
    base_run = base.run if base is not None and names[0] != "none" else None
    rep = replay_run_report(
        cfg, first.run, base_run,
        trace={
            "path": str(trace.path),
            "kind": trace.kind,
            "events": len(events),
            "span_s": round(span, 6),
            "pages": trace.page_count,
            "pages_by_kind": facts["pages_by_kind"],
            "reported_blocks_by_order": facts["reported"],
            "layout_notes": layout.notes,
            "bad_lines_skipped": sum(trace.stats.skipped.values()),
        },
        initial={
            "free_pages": int(np.count_nonzero(trace.initial_free)),
            "free_by_order": initial_by_order,
            "reference_free_pages": _buddyinfo_pages(trace.buddyinfo_start),
        },
        final={
            "free_pages": final_free,
            "reference_free_pages": ref_end,
            "error_pages": None if ref_end is None else final_free - ref_end,
            "error_pct": None if not ref_end else round(100 * (final_free - ref_end) / ref_end, 4),
            "trace_finished_during_migration": first.trace_finished,
        },
        parse_s=parse_s, elapsed_s=elapsed)
    rep["policy"] = names[0]
    rep["policies"] = [outcomes[n].entry for n in names]
    rep["baseline_policy"] = "none" if base is not None else None
    if len(names) == 1:
        return [RunOutcome(rep, first.run, base_run)]
    return [RunOutcome(rep, outcomes[n].run, None, label=n) for n in names]
