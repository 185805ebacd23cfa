"""One guest and its host wired together in one process: what ``hintpipe demo`` runs.

The guest (buddy allocator, memory, workload, walker, producer) and the host (session, page
state, write-protect backend, migration engine) talk over an in-process virtqueue link
(:class:`InProcessLink`, also the link of ``hintpipe replay``). Time is trio's ``MockClock``
with autojump, so link time, workload rates and round timing are virtual while every computation
really runs. :func:`run_demo` migrates the same configuration twice, with and without hinting,
to give the baseline. With ``--memory real`` the guest's pages live in a :class:`RealMachine`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Awaitable, Callable, Sequence

import numpy as np
import trio

from hintpipe.channel.inproc import inproc_pair
from hintpipe.config import RunConfig
from hintpipe.guest.buddy import BuddyAllocator
from hintpipe.guest.memory import GuestMemory, RealGuestMemory
from hintpipe.guest.producer import MigrationFailed, Producer, ProducerHooks
from hintpipe.guest.walker import FreeListWalker, Walker
from hintpipe.guest.workload import Workload, make_workload, producer_hooks
from hintpipe.guest.zonelock import ZoneLock
from hintpipe.host.migration import MigrationEngine, MigrationResult, drive_migration
from hintpipe.host.pagestate import HostPageState
from hintpipe.host.reclaim import BackedPageState, Reclaimer, reclaim_refusal, reclaim_rounds
from hintpipe.host.session import HostSession
from hintpipe.host.timeline import Timeline
from hintpipe.linux.backing import backing_unit
from hintpipe.linux.memfd import WORDS_PER_PAGE, GuestRam, verify_words
from hintpipe.linux.userfaultfd import Userfaultfd, register_wp
from hintpipe.progress import NO_PROGRESS, MigrationObserver, Progress, RoundProgress
from hintpipe.protocol import Hello
from hintpipe.report import GuardFigures, HintFigures, RunOutcome, RunResult, run_report
from hintpipe.wp import make_backend, resolve_backend
from hintpipe.wp.base import WpBackend

__all__ = ["InProcessLink", "InProcessRun", "RealMachine", "migrate_in_process", "migrate_guest",
           "run_demo", "demo_outcome"]


class InProcessLink:
    """A guest's hinting producer and its host session, joined by an in-process virtqueue pair.

    The session's stale-drop guard follows ``cfg`` (``hooks``: the guest workload's, if any)."""

    def __init__(self, cfg: RunConfig, walker: Walker, zone: ZoneLock, page_count: int, *, name: str,
                 hooks: ProducerHooks | None = None) -> None:
        self._guest_end, self._host_end = inproc_pair(cfg.queue_size, event_idx=cfg.event_idx)
        self.producer = Producer(self._guest_end, walker, zone, page_count, window=cfg.queue_size, name=name,
                                 hooks=hooks)
        self.session = HostSession(self._host_end, max_ranges=cfg.max_ranges,
                                   drop_stale=cfg.guard_on("stale-drop"))

    async def run_guest(self) -> None:
        """The guest's side: serve rounds until ``Done``, then close the link (the host sees it)."""
        try:
            await self.producer.run()
        except MigrationFailed:
            pass  # the guest learns the verdict; the host's report has it too
        finally:
            await self._guest_end.aclose()

    def kicks(self) -> dict:
        """Notifications on both queues (the report's ``notifications``)."""
        g, h = self._guest_end.tx_stats, self._host_end.tx_stats
        return {
            "kicks": g.kicks,
            "kicks_suppressed": g.kicks_suppressed,
            "interrupts": g.interrupts,
            "interrupts_suppressed": g.interrupts_suppressed,
            "host_to_guest_kicks": h.kicks,
            "host_to_guest_kicks_suppressed": h.kicks_suppressed,
        }


async def migrate_in_process(engine: MigrationEngine, vcpus: Callable[[], Awaitable[None]],
                             link: InProcessLink | None,
                             before: Callable[[], Awaitable[None]] | None = None) -> MigrationResult:
    """Migrate with ``engine`` while the guest's ``vcpus`` and (with hinting) its side of ``link``
    run beside it; return the engine's result. ``before`` runs once the guest runs and before the
    migration starts (rounds of reclaim alone). Runs under any trio clock."""
    state = engine.state

    def same_guest(hello: Hello) -> HostPageState:
        if hello.page_count != state.page_count:
            raise ValueError("guest geometry changed")
        return state

    async with trio.open_nursery() as guest:
        if link is not None:
            guest.start_soon(link.run_guest)
            await link.session.handshake(same_guest)
        guest.start_soon(vcpus)
        await drive_migration(engine, before=before)
        guest.cancel_scope.cancel()
    return engine.result


@dataclass
class InProcessRun:
    """Everything a finished in-process migration leaves behind (tests look inside)."""

    result: MigrationResult
    state: HostPageState
    alloc: BuddyAllocator
    memory: GuestMemory
    zone: ZoneLock
    workload: Workload
    producer: Producer | None
    session: HostSession | None
    walker: FreeListWalker | None
    wall_s: float
    kicks: dict
    wp: dict = field(default_factory=dict)
    timeline: Timeline | None = None
    broken: frozenset[str] = frozenset()
    reclaim: dict | None = None
    """What reclaim did (``--reclaim``), else None."""

    def figures(self) -> RunResult:
        """The run's figures for its report."""
        return RunResult(
            migration=self.result,
            hints=HintFigures.of(self.session.conn if self.session else None, self.state),
            guards=GuardFigures.of(self.broken, self.session.conn if self.session else None, self.state, self.wp),
            faults=self.state.faults, wp=self.wp, lock=self.zone.summary(),
            notifications=self.kicks, workload=asdict(self.workload.stats), wall_s=self.wall_s,
            timeline=self.timeline, lock_samples_us=self.zone.samples_us(), reclaim=self.reclaim)


async def migrate_guest(cfg: RunConfig, *, hinting: bool = True, machine: RealMachine | None = None,
                        observers: Sequence[MigrationObserver] = (),
                        workload: Callable[..., Workload] = make_workload) -> InProcessRun:
    """Boot a guest, migrate it (hinting on or off) and verify; runs under any trio clock.

    With ``cfg.memory == "real"`` the guest's pages live in ``machine`` (a :class:`RealMachine`,
    reused across runs by :func:`run_demo`; made here and closed at the end if not given), and
    ``cfg.wp`` must be resolved (not ``auto``) unless this function makes the machine.
    The engine tells ``observers`` of each round and chunk, and a :class:`Timeline` among them
    is kept in the result (``InProcessRun.timeline``). ``workload(cfg.workload, alloc, memory,
    zone)`` makes what the guest's vCPUs run (default: the workload ``cfg.workload.kind`` names,
    :func:`~hintpipe.guest.workload.make_workload`): a :class:`~hintpipe.guest.workload.Workload`
    or a subclass of it (``examples/custom_workload.py``); a race workload's hooks go to the
    producer.
    """
    if cfg.memory == "real" and machine is None:
        wp = resolve_backend(cfg.wp, "real")
        with RealMachine(cfg.pages, wp, backing=cfg.backing) as own:
            return await migrate_guest(replace(cfg, wp=wp), hinting=hinting, machine=own, observers=observers,
                                       workload=workload)
    wp_name = resolve_backend(cfg.wp, cfg.memory) if cfg.wp == "auto" else cfg.wp
    t_wall = time.perf_counter()
    n = cfg.pages
    alloc = BuddyAllocator(n)
    guards = dict(refuse_written=cfg.guard_on("refuse-written"), invalidate=cfg.guard_on("invalidate"))
    reclaimer = intact = None
    if cfg.memory == "real":
        if machine.backend != wp_name:
            raise ValueError(f"machine registered for --wp {machine.backend}, config says {wp_name}")
        state = BackedPageState(n, unit=backing_unit(machine.backing), **guards)
        machine.reset_dest()
        backend = make_backend(wp_name, state, scan_before_send=cfg.guard_on("scan-before-send"),
                               **machine.backend_kwargs())
        memory = RealGuestMemory(machine.guest)
        read_source, dest = machine.read_source, machine.dest
        intact = lambda idx: machine.source_intact(idx, memory.versions[idx])  # noqa: E731
        if cfg.reclaim and hinting:
            refusal = reclaim_refusal(memory=cfg.memory, wp=wp_name, race_mode=cfg.race_mode)
            if refusal:
                backend.close()
                raise ValueError(refusal)
            reclaimer = Reclaimer(state, machine.guest.fd, backing=machine.backing,
                                  check=cfg.guard_on("reclaim-check"))
    else:
        state = HostPageState(n, **guards)
        backend = make_backend(wp_name, state)
        memory = GuestMemory(n)
        read_source, dest = (lambda idx: memory.versions[idx]), None
    try:
        return await _migrate(cfg, hinting, alloc, memory, state, backend, read_source, dest, t_wall, observers,
                              workload, reclaimer, intact)
    finally:
        backend.close()  # sync uffd: lifts all protection, so no later write can block


async def _migrate(cfg: RunConfig, hinting: bool, alloc: BuddyAllocator, memory: GuestMemory,
                   state: HostPageState, backend: WpBackend,
                   read_source: Callable[[np.ndarray], np.ndarray], dest: np.ndarray | None,
                   t_wall: float, observers: Sequence[MigrationObserver],
                   make_workload: Callable[..., Workload], reclaimer: Reclaimer | None = None,
                   source_intact: Callable[[np.ndarray], np.ndarray] | None = None) -> InProcessRun:
    zone = ZoneLock(charge_holds=cfg.charge_holds, fixed_hold_s=cfg.fixed_hold_s)
    workload = make_workload(cfg.workload, alloc, memory, zone)
    await workload.boot()  # before round 0: untracked, and round 0 sends everything anyway
    memory.tracker = backend.guest_tracker  # simulated faults from now on (real ones: in-kernel)
    link = walker = None
    if hinting:
        walker = FreeListWalker(alloc, min_order=cfg.min_order, batch=cfg.batch,
                                time_budget_us=cfg.time_budget_us, isolate=cfg.race_mode == "isolate")
        link = InProcessLink(cfg, walker, zone, cfg.pages, name="sim-guest", hooks=producer_hooks(workload))
    vcpus, pause = workload.run, workload.gate.pause
    before = None
    if reclaimer is not None and link is not None:
        vcpus, pause = _with_reclaim(reclaimer, link.session, cfg.race_mode, workload)
        if cfg.reclaim_for_s > 0:
            before = reclaim_rounds(reclaimer, link.session, backend.start_round, cfg.reclaim_for_s)
    engine = MigrationEngine(
        replace(cfg.migration, hinting=hinting),
        state,
        read_source=read_source,
        free_mask=lambda: alloc.free_mask,
        pause_guest=pause,
        session=link.session if link else None,
        before_chunk=backend.before_chunk,
        start_round=backend.start_round,
        dest=dest,
        observers=observers,
        broken_guards=cfg.broken,
        source_intact=source_intact,
    )
    try:
        result = await migrate_in_process(engine, vcpus, link, before)
    finally:
        if reclaimer is not None:
            reclaimer.stop()
    timeline = next((o for o in observers if isinstance(o, Timeline)), None)
    return InProcessRun(result, state, alloc, memory, zone, workload, link.producer if link else None,
                        link.session if link else None, walker, time.perf_counter() - t_wall,
                        link.kicks() if link else {}, backend.stats(), timeline, cfg.broken,
                        reclaimer.figures.as_dict() if reclaimer is not None else None)


def _with_reclaim(reclaimer: Reclaimer, session: HostSession, race_mode: str, workload: Workload):
    """The guest's vCPUs and the engine's pause with reclaim running beside them.

    ``isolate``: each applied frame is discarded before it is acked. ``detect``: applied frames are
    queued and discarded every few ms of guest time while the vCPUs run. Reclaim stops for good
    before the guest is paused for the stop-and-copy (and so before write-protect is lifted).
    """
    if race_mode == "isolate":
        async def on_hints(ev) -> None:
            await reclaimer.discard_now(ev.ranges[:, 0], ev.orders)
    else:
        async def on_hints(ev) -> None:
            reclaimer.hinted(ev.ranges[:, 0], ev.orders)
    session.on_hints = on_hints

    async def vcpus() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reclaimer.run)
            await workload.run()

    async def pause() -> None:
        await trio.to_thread.run_sync(reclaimer.stop)  # waits for a discard under way
        await workload.gate.pause()

    return vcpus, pause


def run_demo(cfg: RunConfig, *, progress: Progress = NO_PROGRESS) -> dict:
    """Run the hinted migration and (with ``cfg.baseline``) its baseline under a virtual clock;
    return the report (:func:`~hintpipe.report.run_report`).

    One :class:`RealMachine` serves both runs in real-memory mode (allocated and touched once).
    ``cfg.wp == "auto"`` is resolved first; the report's ``wp.backend`` is the one used. Guards
    in ``cfg.broken`` are off in the hinted run only: the baseline is what a real system does.
    Raises ``UffdUnavailable`` when a real backend asked for by name cannot work here, and
    ValueError for ``scan-before-send`` broken without uffd-async.
    """
    return demo_outcome(cfg, progress=progress).report


def demo_outcome(cfg: RunConfig, *, progress: Progress = NO_PROGRESS) -> RunOutcome:
    """:func:`run_demo`, keeping both runs (each with its :class:`Timeline`) for the charts;
    ``progress`` shows each run's rounds as they go."""
    import trio.testing  # here, not at the top: it imports pytest, 0.2 s that ``replay`` does not need

    if cfg.reclaim and cfg.wp == "auto" and cfg.race_mode == "detect" and cfg.memory == "real":
        cfg = replace(cfg, wp="uffd")  # auto's first choice, uffd-async, cannot reclaim in detect mode
    cfg = replace(cfg, wp=resolve_backend(cfg.wp, cfg.memory))
    if "scan-before-send" in cfg.broken and cfg.wp != "uffd-async":
        raise ValueError(f"the scan-before-send guard exists only with --wp uffd-async (this run uses {cfg.wp})")
    if cfg.reclaim:
        refusal = reclaim_refusal(memory=cfg.memory, wp=cfg.wp, race_mode=cfg.race_mode)
        if refusal:
            raise ValueError(refusal)
    machine = (RealMachine(cfg.pages, cfg.wp, backing=cfg.backing, progress=progress)
               if cfg.memory == "real" else None)

    async def one(hinting: bool) -> InProcessRun:
        label = "with hinting" if hinting else "baseline (no hinting)"
        # the baseline is what a real system does: every guard in force
        return await migrate_guest(cfg if hinting else replace(cfg, broken=frozenset()), hinting=hinting,
                                   machine=machine, observers=(Timeline(), RoundProgress(progress, label)))

    async def main():
        run = await one(True)
        base = await one(False) if cfg.baseline else None
        return run, base

    try:
        run, base = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        if machine is not None:
            machine.close()
    figs, base_figs = run.figures(), base.figures() if base else None
    return RunOutcome(run_report(cfg, figs, base_figs), figs, base_figs)


class RealMachine:
    """Guest RAM, its userfaultfd registration, the host's mapping and the destination buffer.

    What outlives one migration run, allocated and touched once before anything is timed: the
    guest's mapping of a memfd (registered with userfaultfd when a real backend is used), the
    host's own mapping of the same memfd (reads never fault, writes are untracked) and the
    destination buffer. ``backend`` is a resolved ``--wp`` name; for ``uffd``/``uffd-async`` the guest side registers
    its mapping (:func:`hintpipe.linux.userfaultfd.register_wp`, raising ``UffdUnavailable``) and
    :attr:`uffd` holds the fd a host adapter is built from (``pid`` = this process).
    """

    def __init__(self, page_count: int, backend: str, *, backing: str = "shmem",
                 progress: Progress = NO_PROGRESS) -> None:
        self.page_count = page_count
        self.backend = backend
        self.backing = backing
        self.guest = GuestRam(page_count, backing=backing)
        self.uffd: Userfaultfd | None = None
        self.host: GuestRam | None = None
        self.dest = None
        task = progress.task("preparing guest RAM and destination", total=2 * page_count, unit="pages")
        try:
            step = 1 << 16  # 256 MiB per step: a live bar, and Ctrl-C is seen between steps
            for a in range(0, page_count, step):
                self.guest.touch(a, a + step)  # first touch is slow: pay it here, not in the migration
                task.update(min(page_count, a + step))
            self.host = GuestRam(page_count, fd=self.guest.fd)
            self.dest = np.empty((page_count, WORDS_PER_PAGE), dtype=np.uint64)
            for a in range(0, page_count, step):  # touched, so the first round pays no page faults
                self.dest[a:a + step].fill(0)
                task.update(page_count + min(page_count, a + step))
            task.close()
            if backend in ("uffd", "uffd-async"):
                self.uffd = register_wp(self.guest.addr, self.guest.size, backend)
        except BaseException:
            self.close()
            raise
        self.pid = os.getpid()

    def reset_dest(self) -> None:
        """Zero the destination before a run (a stale copy must not hide a lost write)."""
        self.dest.fill(0)

    def read_source(self, idx: np.ndarray) -> np.ndarray:
        """Source bytes of pages ``idx`` as (len(idx), 512) words, read through the host mapping."""
        return self.host.words[idx]

    def source_intact(self, idx: np.ndarray, versions: np.ndarray) -> np.ndarray:
        """Per page of ``idx``: does guest RAM hold the pattern of its last write (``versions``;
        0 = never written, nothing to hold)?"""
        return verify_words(self.host.words, idx, versions) | (versions == 0)

    def backend_kwargs(self) -> dict:
        """What :func:`hintpipe.wp.make_backend` needs for a real backend."""
        return {"ram_addr": self.guest.addr, "page_count": self.page_count,
                "uffd_fd": self.uffd.fd if self.uffd else None, "pid": self.pid,
                "unit_pages": backing_unit(self.backing)}

    def close(self) -> None:
        """Close the uffd (unregisters), then both mappings (idempotent)."""
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        for ram in (self.host, self.guest):
            if ram is not None:
                ram.close()
        self.dest = None

    def __enter__(self) -> "RealMachine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
