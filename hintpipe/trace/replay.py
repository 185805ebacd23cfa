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
from typing import Sequence

import numpy as np
import trio
import trio.testing

from hintpipe.config import ReplayUsageError, RunConfig
from hintpipe.guest.memory import GuestMemory
from hintpipe.guest.walker import WalkerStats
from hintpipe.guest.workload import PauseGate, WorkloadConfig
from hintpipe.guest.zonelock import ZoneLock
from hintpipe.host.migration import MigrationEngine, MigrationResult
from hintpipe.host.pagestate import HostPageState
from hintpipe.host.session import HostSession
from hintpipe.host.timeline import Timeline
from hintpipe.inprocess import InProcessLink, migrate_in_process
from hintpipe.progress import NO_PROGRESS, MigrationObserver, Progress, RoundProgress, Task
from hintpipe.report import GuardFigures, HintFigures, RunOutcome, RunResult, replay_run_report
from hintpipe.units import NR_ORDERS, order_pages
from hintpipe.wp.sim import SimBackend

from .events import EventBatch
from .model import ReplayModel
from .recording import Trace
from .snapshot import decompose


__all__ = ["ReplayUsageError", "TraceWalker", "TraceWorkload", "ReplayRun", "replay_migration", "replay",
           "replay_outcome"]


class TraceWalker:
    """Lock-bounded walk of a replay model's buddy-free pages, with the FreeListWalker interface.

    The model keeps a free-page bitmap, not free lists, so the walk goes through the PFN space in
    windows of ``WINDOW`` pages: each window's free pages are split into maximal aligned blocks of
    order >= ``min_order`` (top order first within the window) when the walk reaches it, so no
    single lock hold pays for the whole guest. Each block is checked (vectorised) to be still
    entirely free at the moment it is reported; a block is reported at most once per round
    because windows never overlap. Blocks freed behind the walk are left to the next round. The
    model cannot isolate, so ``isolate`` is always False.
    """

    isolate = False
    WINDOW = 1 << 14

    def __init__(self, model: ReplayModel, *, min_order: int = 9, batch: int = 32, time_budget_us: float = 200.0):
        self.model = model
        self.min_order = min_order
        self.batch = batch
        self.time_budget_s = time_budget_us * 1e-6
        self.stats = WalkerStats()
        self._pfns = np.empty(0, np.uint64)
        self._orders = np.empty(0, np.uint8)
        self._pos = 0
        self._next_window = model.page_count  # no round yet
        # the first call pays numpy's one-off setup (~10 ms): keep it out of the first lock hold
        model.is_free_block(np.zeros(1, np.uint64), np.zeros(1, np.uint8))

    @property
    def done(self) -> bool:
        """No more blocks to visit this round."""
        return self._pos >= len(self._pfns) and self._next_window >= self.model.page_count

    def start_round(self) -> None:
        """Begin a walk from PFN 0 (call with the zone lock held)."""
        self._pfns = np.empty(0, np.uint64)
        self._orders = np.empty(0, np.uint8)
        self._pos = 0
        self._next_window = 0
        self.stats.rounds += 1

    def stop(self) -> None:
        """Abandon the walk."""
        self._pos = len(self._pfns)
        self._next_window = self.model.page_count

    def _load_window(self) -> None:
        a = self._next_window
        b = min(self.model.page_count, a + self.WINDOW)
        pfns, orders = decompose(self.model.free_mask[a:b], self.min_order)
        self._pfns = pfns + np.uint64(a)
        self._orders = orders
        self._pos = 0
        self._next_window = b

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``batch`` blocks still free now; empty when the walk is complete or the time
        budget ran out while scanning windows without free blocks (check :attr:`done`)."""
        t0 = time.perf_counter()
        deadline = t0 + self.time_budget_s
        got_p, got_o, n = [], [], 0
        while n < self.batch and not self.done:
            if self._pos >= len(self._pfns):
                self._load_window()
                if time.perf_counter() > deadline:
                    break  # possibly empty-handed: the caller sees done is False and comes back
                continue
            end = min(len(self._pfns), self._pos + 4 * self.batch)
            p, o = self._pfns[self._pos:end], self._orders[self._pos:end]
            ok = np.flatnonzero(self.model.is_free_block(p, o))[: self.batch - n]
            if n + len(ok) >= self.batch:
                end = self._pos + int(ok[-1]) + 1  # resume right after the last block taken
            got_p.append(p[ok])
            got_o.append(o[ok])
            n += len(ok)
            self._pos = end
            if n and time.perf_counter() > deadline:
                break
        pfns = np.concatenate(got_p) if got_p else np.empty(0, np.uint64)
        orders = np.concatenate(got_o) if got_o else np.empty(0, np.uint8)
        if n:
            pages = int(order_pages(orders).sum())
            self.stats.record_batch(n, pages, time.perf_counter() - t0, False)
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
    broken: frozenset[str] = frozenset()

    def figures(self) -> RunResult:
        """The run's figures for its report."""
        return RunResult(migration=self.result,
                         hints=HintFigures.of(self.session.conn if self.session else None, self.state),
                         guards=GuardFigures.of(self.broken, self.session.conn if self.session else None, self.state, self.wp),
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
    state = HostPageState(n, refuse_written=cfg.guard_on("refuse-written"), invalidate=cfg.guard_on("invalidate"))
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
        broken_guards=cfg.broken,
    )
    result = await migrate_in_process(engine, workload.run, link)
    workload.task.close()
    return ReplayRun(result, model, state, zone, link.session if link else None, walker, workload,
                     time.perf_counter() - t_wall, backend.stats(),
                     next((o for o in observers if isinstance(o, Timeline)), None), cfg.broken)


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
