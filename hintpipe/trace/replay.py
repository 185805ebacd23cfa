"""Replay a real allocator trace through the hinting pipeline and a migration.

The guest here is not the buddy model of ``hintpipe.guest`` but the recorded kernel itself: a
:class:`ReplayModel` advances through the trace in virtual time (1 s of trace = 1 s of trio's
clock, so a 10 s recording does not take 10 s), every allocation is a write to its pages (through
the same simulated write-protect as the demo), and the producer walks the model's buddy-free
pages. The recorded history decides every allocation, so hinted blocks cannot be isolated: replay
runs in ``detect`` mode only. Verification is as in the demo: each allocated page's destination
version must equal the source's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import trio
import trio.testing

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
from hintpipe.report import HintFigures, RunOutcome, RunResult, replay_run_report
from hintpipe.units import MAX_ORDER, NR_ORDERS, order_pages
from hintpipe.wp.sim import SimBackend

from .events import EventBatch
from .model import ReplayModel
from .recording import Trace
from .snapshot import decompose


__all__ = ["ReplayUsageError", "TraceWalker", "TraceWorkload", "ReplayRun", "replay_migration", "replay",
           "replay_outcome"]


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


class TraceWorkload:
    """The recorded kernel as the guest's vCPUs: applies the trace as virtual time passes.

    Every ``cfg.tick_s`` of guest time the trace advances as far; each allocation writes its
    pages, and ``cfg.write_pages_per_s`` extra writes go to allocated pages. ``task`` is told the
    trace position (events applied) after each step.
    """

    def __init__(self, model: ReplayModel, memory: GuestMemory, zone: ZoneLock, cfg: WorkloadConfig,
                 task: Task | None = None) -> None:
        self.task = task or Task()
        self.model = model
        self.memory = memory
        self.zone = zone
        self.cfg = cfg
        self.gate = PauseGate()
        self.rng = np.random.default_rng(cfg.seed)
        self.pages_written = 0
        self.finished_at: float | None = None

    async def run(self) -> None:
        """Replay until the trace ends, then stay idle (paused or not) until cancelled."""
        cfg = self.cfg
        t0 = trio.current_time()
        first = self.model.peek_first_ts_ns() or 0
        carry = 0.0
        self.gate.vcpus += 1
        try:
            while True:
                await trio.sleep(cfg.tick_s)
                await self.gate.checkpoint()
                if self.finished_at is not None:
                    continue
                now_ns = first + int((trio.current_time() - t0) * 1e9)
                async with self.zone.allocator():
                    allocated, _ = self.model.advance_to(now_ns)
                await self.memory.write(allocated)
                self.pages_written += len(allocated)
                carry += cfg.write_pages_per_s * cfg.tick_s
                if carry >= 1:
                    k, carry = int(carry), carry - int(carry)
                    cand = self.rng.integers(self.model.page_count, size=4 * k)
                    cand = cand[~self.model.free_mask[cand]][:k]
                    await self.memory.write(cand)
                    self.pages_written += len(cand)
                self.task.update(self.model.events_applied)
                if self.model.done:
                    self.finished_at = trio.current_time() - t0
                    self.task.close()
        finally:
            self.gate.vcpus -= 1


@dataclass
class ReplayRun:
    """One replayed migration."""

    result: MigrationResult
    model: ReplayModel
    state: HostPageState
    zone: ZoneLock
    session: HostSession | None
    walker: TraceWalker | None
    workload: TraceWorkload
    wall_s: float
    wp: dict
    timeline: Timeline | None = None

    def figures(self) -> RunResult:
        """The run's figures for its report."""
        return RunResult(migration=self.result,
                         hints=HintFigures.of(self.session.conn if self.session else None, self.state),
                         faults=self.state.faults, wp=self.wp, lock=self.zone.summary(),
                         wall_s=self.wall_s, timeline=self.timeline, lock_samples_us=self.zone.samples_us())


async def replay_migration(trace: Trace, events: EventBatch, cfg: RunConfig, *, hinting: bool = True,
                           observers: Sequence[MigrationObserver] = (), task: Task | None = None) -> ReplayRun:
    """Migrate the traced guest while its trace replays; runs under any trio clock. The engine
    tells ``observers`` of each round and chunk (a :class:`Timeline` among them is kept in the
    result); ``task`` follows the trace position."""
    if cfg.workload.kind != "replay":
        raise ReplayUsageError("a replay's workload is its trace: configure it with RunConfig.for_replay")
    t_wall = time.perf_counter()
    model = ReplayModel(trace.initial_free, [events])
    n = model.page_count
    memory = GuestMemory(n)
    memory.versions[~model.free_mask] = 1  # pages in use at the start hold boot content
    state = HostPageState(n, invalidate=cfg.invalidate)
    backend = SimBackend(state)  # the recorded kernel's writes fault like an in-process guest's
    memory.tracker = backend.guest_tracker
    zone = ZoneLock(charge_holds=cfg.charge_holds, fixed_hold_s=cfg.fixed_hold_s)
    workload = TraceWorkload(model, memory, zone, cfg.workload, task)
    link = walker = None
    if hinting:
        walker = TraceWalker(model, min_order=cfg.min_order, batch=cfg.batch, time_budget_us=cfg.time_budget_us)
        link = InProcessLink(cfg, walker, zone, n, name="replay")
    engine = MigrationEngine(
        replace(cfg.migration, hinting=hinting), state,
        read_source=lambda idx: memory.versions[idx],
        free_mask=lambda: model.free_mask,
        pause_guest=workload.gate.pause,
        session=link.session if link else None,
        before_chunk=backend.before_chunk,
        start_round=backend.start_round,
        observers=observers,
    )
    result = await migrate_in_process(engine, workload.run, link)
    workload.task.close()
    return ReplayRun(result, model, state, zone, link.session if link else None, walker, workload,
                     time.perf_counter() - t_wall, backend.stats(),
                     next((o for o in observers if isinstance(o, Timeline)), None))


def _buddyinfo_pages(info: dict | None) -> int | None:
    return None if not info else int(info["free_pages"])


def replay(trace: Trace, cfg: RunConfig, *, progress: Progress = NO_PROGRESS) -> dict:
    """Replay ``trace`` with hinting (and, with ``cfg.baseline``, without); return the JSON report."""
    return replay_outcome(trace, cfg, progress=progress).report


def _read_events(trace: Trace, progress: Progress) -> EventBatch:
    task = progress.task("reading the trace", total=trace.events_hint, unit="events")
    batches, n = [], 0
    for b in trace.batches():
        batches.append(b)
        n += len(b)
        task.update(n)
    task.close()
    return EventBatch.concat(batches)


def replay_outcome(trace: Trace, cfg: RunConfig, *, progress: Progress = NO_PROGRESS) -> RunOutcome:
    """:func:`replay`, keeping both runs (each with its :class:`Timeline`) for the charts;
    ``progress`` shows the reading of the trace, then each run's trace position and rounds."""
    t0 = time.perf_counter()
    events = _read_events(trace, progress)
    parse_s = time.perf_counter() - t0
    init_blocks = decompose(trace.initial_free)[1]
    initial_by_order = np.bincount(init_blocks, minlength=NR_ORDERS).tolist()

    async def one(hinting: bool) -> ReplayRun:
        label = "with hinting" if hinting else "baseline (no hinting)"
        task = progress.task(f"{label}: trace events", total=len(events), unit="events")
        return await replay_migration(trace, events, cfg, hinting=hinting, task=task,
                                      observers=(Timeline(), RoundProgress(progress, f"{label}: migration")))

    async def main():
        run = await one(True)
        base = await one(False) if cfg.baseline else None
        return run, base

    run, base = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    run.model.run_to_end()  # a migration shorter than the trace: finish the trace for fidelity
    final_free = run.model.nr_free_pages
    ref_end = _buddyinfo_pages(trace.buddyinfo_end)
    elapsed = time.perf_counter() - t0
    span = (int(events.ts_ns[-1]) - int(events.ts_ns[0])) / 1e9 if len(events) else 0.0
    figs, base_figs = run.figures(), base.figures() if base else None
    report = replay_run_report(
        cfg, figs, base_figs,
        trace={
            "path": str(trace.path),
            "kind": trace.kind,
            "events": len(events),
            "span_s": round(span, 6),
            "pages": trace.page_count,
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
            "trace_finished_during_migration": run.workload.finished_at is not None,
        },
        parse_s=parse_s, elapsed_s=elapsed)
    return RunOutcome(report, figs, base_figs)
