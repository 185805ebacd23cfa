"""One simulated VM migrated with free page hinting, in one process: what ``hintpipe demo`` runs.

Wires the parts together: a guest (buddy allocator, memory, workload, walker, producer), an
in-process virtqueue link, and a host (session, page state, simulated write-protect, migration
engine). Time is trio's ``MockClock`` with autojump, so link time, workload rates and round timing
are virtual while every computation really runs. The same configuration is migrated twice, with
and without hinting, to give the baseline.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import trio
import trio.testing

from hintpipe.channel.inproc import inproc_pair
from hintpipe.guest.buddy import BuddyAllocator
from hintpipe.guest.memory import GuestMemory, RealGuestMemory
from hintpipe.guest.producer import MigrationFailed, Producer
from hintpipe.guest.walker import FreeListWalker
from hintpipe.guest.workload import Workload, WorkloadConfig
from hintpipe.guest.zonelock import ZoneLock
from hintpipe.host.migration import MigrationConfig, MigrationEngine, MigrationResult
from hintpipe.host.pagestate import HostPageState
from hintpipe.host.session import HostSession
from hintpipe.realmem import RealMachine
from hintpipe.protocol import MAX_RANGES_PER_BATCH
from hintpipe.units import PAGE_SIZE
from hintpipe.wp import REAL_BACKENDS, WP_CHOICES, make_backend, resolve_backend

RACE_MODES = ("detect", "isolate")


@dataclass(frozen=True)
class SimConfig:
    """Everything one simulated migration depends on."""

    pages: int = 1 << 20
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    batch: int = 32
    min_order: int = 9
    race_mode: str = "detect"
    time_budget_us: float = 200.0
    queue_size: int = 256
    event_idx: bool = True
    max_ranges: int = MAX_RANGES_PER_BATCH
    wp: str = "sim"  # sim, uffd, uffd-async, auto, or off (no write tracking: for the oracle test)
    memory: str = "sim"  # "sim": versions only; "real": page bytes in a memfd (hintpipe.realmem)
    invalidate: bool = True  # write-protect invalidation of skips (off only to prove the oracle)
    charge_holds: bool = True
    fixed_hold_s: float | None = None  # charge this per walker hold instead of the measured time

    def __post_init__(self) -> None:
        if self.pages < 1:
            raise ValueError("pages must be >= 1")
        if self.race_mode not in RACE_MODES:
            raise ValueError(f"race mode must be one of {RACE_MODES}, got {self.race_mode!r}")
        if not 0 <= self.min_order <= 10:
            raise ValueError("min_order must be in 0..10")
        if not 1 <= self.batch <= self.max_ranges:
            raise ValueError(f"batch must be in 1..{self.max_ranges}")
        if self.queue_size < 1 or self.queue_size & (self.queue_size - 1):
            raise ValueError("queue size must be a power of two")
        if self.memory not in ("sim", "real"):
            raise ValueError(f"memory must be 'sim' or 'real', got {self.memory!r}")
        if self.wp not in WP_CHOICES:
            raise ValueError(f"wp must be one of {', '.join(WP_CHOICES)}, got {self.wp!r}")
        if self.wp in REAL_BACKENDS and self.memory != "real":
            raise ValueError(f"--wp {self.wp} write-protects real memory: use it with --memory real")


@dataclass
class SimRun:
    """Everything a finished simulated migration leaves behind (tests look inside)."""

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


async def migrate_guest(cfg: SimConfig, *, hinting: bool = True,
                        machine: RealMachine | None = None) -> SimRun:
    """Boot a guest, migrate it (hinting on or off) and verify; runs under any trio clock.

    With ``cfg.memory == "real"`` the guest's pages live in ``machine`` (a :class:`RealMachine`,
    reused across runs by :func:`run_sim`; made here and closed at the end if not given), and
    ``cfg.wp`` must be resolved (not ``auto``) unless this function makes the machine.
    """
    if cfg.memory == "real" and machine is None:
        wp = resolve_backend(cfg.wp, "real")
        with RealMachine(cfg.pages, wp) as own:
            return await migrate_guest(replace(cfg, wp=wp), hinting=hinting, machine=own)
    wp_name = resolve_backend(cfg.wp, cfg.memory) if cfg.wp == "auto" else cfg.wp
    t_wall = time.perf_counter()
    n = cfg.pages
    alloc = BuddyAllocator(n)
    state = HostPageState(n, invalidate=cfg.invalidate)
    if cfg.memory == "real":
        if machine.backend != wp_name:
            raise ValueError(f"machine registered for --wp {machine.backend}, config says {wp_name}")
        machine.reset_dest()
        backend = make_backend(wp_name, state, **machine.backend_kwargs())
        memory = RealGuestMemory(machine.guest)
        read_source, dest = machine.read_source, machine.dest
    else:
        backend = make_backend(wp_name, state)
        memory = GuestMemory(n)
        read_source, dest = (lambda idx: memory.versions[idx]), None
    try:
        return await _migrate(cfg, hinting, alloc, memory, state, backend, read_source, dest, t_wall)
    finally:
        backend.close()  # sync uffd: lifts all protection, so no later write can block


async def _migrate(cfg, hinting, alloc, memory, state, backend, read_source, dest, t_wall) -> SimRun:
    n = cfg.pages
    zone = ZoneLock(charge_holds=cfg.charge_holds, fixed_hold_s=cfg.fixed_hold_s)
    workload = Workload(cfg.workload, alloc, memory, zone)
    await workload.boot()  # before round 0: untracked, and round 0 sends everything anyway
    memory.tracker = backend.guest_tracker  # simulated faults from now on (real ones: in-kernel)
    mig_cfg = replace(cfg.migration, hinting=hinting)
    producer = session = walker = None
    guest_end, host_end = inproc_pair(cfg.queue_size, event_idx=cfg.event_idx)
    if hinting:
        walker = FreeListWalker(
            alloc,
            min_order=cfg.min_order,
            batch=cfg.batch,
            time_budget_us=cfg.time_budget_us,
            isolate=cfg.race_mode == "isolate",
        )
        producer = Producer(guest_end, walker, zone, n, window=cfg.queue_size, name="sim-guest")
        session = HostSession(host_end, max_ranges=cfg.max_ranges)

    def make_state(hello):
        if hello.page_count != n:
            raise ValueError("guest geometry changed")
        return state

    engine = MigrationEngine(
        mig_cfg,
        state,
        read_source=read_source,
        free_mask=lambda: alloc.free_mask,
        pause_guest=workload.gate.pause,
        session=session,
        before_chunk=backend.before_chunk,
        start_round=backend.start_round,
        dest=dest,
    )
    result = await drive_migration(engine, workload.run, producer, session, make_state)
    kicks = {}
    if hinting:
        g, h = guest_end.tx_stats, host_end.tx_stats
        kicks = {
            "kicks": g.kicks,
            "kicks_suppressed": g.kicks_suppressed,
            "interrupts": g.interrupts,
            "interrupts_suppressed": g.interrupts_suppressed,
            "host_to_guest_kicks": h.kicks,
            "host_to_guest_kicks_suppressed": h.kicks_suppressed,
        }
    return SimRun(result, state, alloc, memory, zone, workload, producer, session, walker,
                  time.perf_counter() - t_wall, kicks, backend.stats())


async def drive_migration(engine: MigrationEngine, vcpus, producer: Producer | None = None,
                          session: HostSession | None = None, make_state=None) -> MigrationResult:
    """Run ``engine`` while the guest's ``vcpus`` task (and, with hinting, its producer and the
    host session) run beside it in one nursery; tell the guest the verdict; cancel the rest."""
    guest_outcome: list[str] = []

    async def run_producer():
        try:
            await producer.run()
            guest_outcome.append("ok")
        except MigrationFailed as e:  # the guest learns the verdict; the host's report has it too
            guest_outcome.append(str(e))

    async with trio.open_nursery() as nursery:
        if producer is not None:
            nursery.start_soon(run_producer)
            await session.handshake(make_state)
            nursery.start_soon(session.serve)
        nursery.start_soon(vcpus)
        result = await engine.run()
        if session is not None:
            await session.finish(result.verified, {"lost_pages": result.lost_pages})
            with trio.move_on_after(1):
                while not guest_outcome and session.failure is None:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return result


def migration_report(run: MigrationResult, baseline: MigrationResult | None) -> dict:
    """``migration.*`` of a report: the hinted run's figures and its baseline's next to them."""
    mig = run.as_dict()
    mig["pages_sent_baseline"] = baseline.pages_sent if baseline else None
    mig["time_s_baseline"] = round(baseline.time_s, 4) if baseline else None
    mig["lost_pages_baseline"] = baseline.lost_pages if baseline else None
    if baseline and baseline.pages_sent:
        mig["pages_saved_pct"] = round(100 * (1 - run.pages_sent / baseline.pages_sent), 2)
    return mig


def report(cfg: SimConfig, run: SimRun, baseline: SimRun | None) -> dict:
    """The JSON object of ``hintpipe demo --json`` (keys documented in the README)."""
    mig = migration_report(run.result, baseline.result if baseline else None)
    st = run.state
    lock = run.zone.summary()
    ws = run.workload.stats
    return {
        "config": {
            "pages": cfg.pages,
            "gib": round(cfg.pages * PAGE_SIZE / 2**30, 3),
            "workload": cfg.workload.kind,
            "batch": cfg.batch,
            "min_order": cfg.min_order,
            "race_mode": cfg.race_mode,
            "bandwidth_gbit": cfg.migration.bandwidth_gbit,
            "queue_size": cfg.queue_size,
            "event_idx": cfg.event_idx,
            "wp": cfg.wp,
            "memory": cfg.memory,
            "seed": cfg.workload.seed,
        },
        "migration": mig,
        "hints": {
            "messages": st.hints.batches,
            "ranges": st.hints.ranges,
            "pages": st.hints.pages,
            "pages_marked": st.hints.pages_marked,
            "pages_refused_written": st.hints.pages_refused_written,
            "stale_messages": run.session.stats.stale_frames if run.session else 0,
            "stale_ranges": run.session.stats.stale_ranges if run.session else 0,
        },
        "faults": st.faults,
        "wp": {**(run.wp or {"backend": cfg.wp, "faults": st.faults, "protect_calls": 0}),
               "faults_baseline": baseline.wp.get("faults") if baseline else None},
        "lock": {"max_hold_us": lock["max_hold_us"], "max_alloc_wait_us": lock["max_alloc_wait_us"], **lock},
        "notifications": run.kicks,
        "workload": asdict(ws),
        "wall_s": round(run.wall_s + (baseline.wall_s if baseline else 0.0), 3),
    }


def run_sim(cfg: SimConfig, *, baseline: bool = True) -> dict:
    """Run the hinted migration and (optionally) its baseline under a virtual clock; return JSON.

    One :class:`RealMachine` serves both runs in real-memory mode (allocated and touched once).
    ``cfg.wp == "auto"`` is resolved first; the report's ``wp.backend`` is the one used.
    Raises ``UffdUnavailable`` when a real backend asked for by name cannot work here.
    """
    cfg = replace(cfg, wp=resolve_backend(cfg.wp, cfg.memory))
    machine = RealMachine(cfg.pages, cfg.wp) if cfg.memory == "real" else None

    async def main():
        run = await migrate_guest(cfg, hinting=True, machine=machine)
        base = await migrate_guest(cfg, hinting=False, machine=machine) if baseline else None
        return run, base

    try:
        run, base = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        if machine is not None:
            machine.close()
    return report(cfg, run, base)
