"""``hintpipe guest``: one simulated VM in its own process, migrated by a ``hintpipe host``.

The guest boots its allocator and workload with RAM (versions, free mask) in a sealed memfd
(:class:`SharedRegion`), connects, hands the memfd to the host (SCM_RIGHTS with its Hello on
``unix:``; in the shm transport's setup message on ``shm:``) and then runs its workload and its
hinting producer in real time until the host sends ``Done``. Writes to pages the host protected
are faulted over the link (:mod:`hintpipe.paired.barrier`).
"""

from __future__ import annotations

import signal
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field

import trio

from hintpipe.channel.address import Address
from hintpipe.channel.endpoint import Endpoint
from hintpipe.channel.records import RecordEndpoint
from hintpipe.channel.stream import auth_client, connect, open_stream_endpoint
from hintpipe.config import RunConfig
from hintpipe.guest.buddy import BuddyAllocator
from hintpipe.guest.memory import GuestMemory, RealGuestMemory
from hintpipe.guest.producer import MigrationFailed, Producer
from hintpipe.guest.walker import FreeListWalker
from hintpipe.guest.workload import make_workload, producer_hooks
from hintpipe.guest.zonelock import ZoneLock
from hintpipe.paired.barrier import guest_control_loop
from hintpipe.paired.handoff import TCP_REFUSAL, GuestRealRam, send_handoff
from hintpipe.paired.mirror import MirroredRegion
from hintpipe.paired.region import SharedRegion
from hintpipe.wp.base import UNTRACKED, GatedTracker
from hintpipe.wp.shared import SharedWriteProtect


@dataclass
class GuestOutcome:
    """How a guest process ended: ``ok`` only when the host migrated and verified it."""

    ok: bool
    reason: str
    summary: dict = field(default_factory=dict)
    signal: int | None = None
    """The signal (SIGINT, SIGTERM) that stopped the guest, if one did."""


@dataclass(frozen=True)
class GuestOptions:
    """What ``hintpipe guest`` needs."""

    address: Address
    cfg: RunConfig
    name: str = "guest"
    secret: bytes | None = None
    connect_timeout_s: float = 10.0
    idle_timeout_s: float | None = 30.0
    """Leave when the host sends no frame for this long (KEEPALIVE pings it first; None: no bound)."""


def guest_config_dict(cfg: RunConfig) -> dict:
    """The part of the guest's configuration the host puts in its report."""
    return {"workload": cfg.workload.kind, "seed": cfg.workload.seed, "history": cfg.workload.history,
            "batch": cfg.batch,
            "min_order": cfg.min_order, "race_mode": cfg.race_mode, "queue_size": cfg.queue_size,
            "event_idx": cfg.event_idx}


async def _open_endpoint(stack: AsyncExitStack, opts: GuestOptions, region: SharedRegion,
                         real: GuestRealRam | None = None) -> Endpoint:
    addr = opts.address
    with trio.fail_after(opts.connect_timeout_s):
        sock = await connect(addr)
    if real is not None:  # first on the socket, before Hello / the shm setup (wire-v1 11.7)
        try:
            await send_handoff(sock, real)
        except BaseException:
            sock.close()
            raise
        real.release_uffd()  # the host holds the registration now
    if addr.kind == "shm":
        from hintpipe.channel.shm import open_shm_guest

        return await stack.enter_async_context(
            open_shm_guest(sock, [region.fd], size=opts.cfg.queue_size, event_idx=opts.cfg.event_idx))
    if addr.kind == "tcp":
        if opts.secret is not None:
            with trio.fail_after(opts.connect_timeout_s):
                await auth_client(sock, opts.secret)
        stream = await stack.enter_async_context(open_stream_endpoint(sock))
        ep = RecordEndpoint(stream, region)
        region.start_sync(ep.send_nowait)  # INIT, versions, free mask: before Hello, in stream order
        return ep
    return await stack.enter_async_context(open_stream_endpoint(sock, first_fds=[region.fd]))


def _expected_failure(exc: BaseException) -> str | None:
    """The reason text of an expected end (MigrationFailed, a lost connection), also when it
    arrives wrapped in an exception group by the producer's nursery; None for anything else."""
    if isinstance(exc, MigrationFailed):
        return str(exc)
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
        return f"connection lost: {exc}"
    if isinstance(exc, BaseExceptionGroup):
        reasons = [_expected_failure(e) for e in exc.exceptions]
        if reasons and all(r is not None for r in reasons):
            return reasons[0]
    return None


async def run_guest(opts: GuestOptions) -> GuestOutcome:
    """Boot, connect, serve the host until Done (or failure); never raises for expected failures."""
    cfg = opts.cfg
    n = cfg.pages
    real = None
    if cfg.memory == "real" and opts.address.kind == "tcp":
        return GuestOutcome(False, TCP_REFUSAL)
    if opts.address.kind == "tcp":  # no fd passing: a local region mirrored to the host
        region = MirroredRegion.mirror(n, role="guest")
    else:
        region = SharedRegion.create(n)
    try:
        if cfg.memory == "real":  # resolves --wp; UffdUnavailable propagates (CLI: exit 2)
            real = GuestRealRam(n, cfg.wp, cfg.backing)
        alloc = BuddyAllocator(n)
        region.free[:] = alloc.free_mask
        alloc.free_mask = region.free  # the allocator now keeps its free mask in shared memory
        if real is not None:  # page bytes in the RAM memfd; the versions shared too, so the host's
            memory = RealGuestMemory(real.ram)  # oracle can check guest RAM holds the last writes
        else:
            memory = GuestMemory(n)
        memory.versions = region.versions
        zone = ZoneLock(charge_holds=cfg.charge_holds)
        workload = make_workload(cfg.workload, alloc, memory, zone)
        await workload.boot()  # nothing is protected yet: boot writes fault nothing
        walker = FreeListWalker(alloc, min_order=cfg.min_order, batch=cfg.batch,
                                time_budget_us=cfg.time_budget_us, isolate=cfg.race_mode == "isolate")
        async with AsyncExitStack() as stack:
            from hintpipe.channel.shm import ShmSetupError

            try:
                endpoint = await _open_endpoint(stack, opts, region, real)
            except (OSError, trio.TooSlowError, ShmSetupError) as e:
                return GuestOutcome(False, f"cannot connect to {opts.address}: {e or 'timed out'}")
            producer = Producer(endpoint, walker, zone, n, window=cfg.queue_size, name=opts.name,
                                idle_timeout_s=opts.idle_timeout_s, hooks=producer_hooks(workload))
            # sim: faults over the link (protect bytes); uffd/uffd-async: the kernel faults the
            # store itself; off: nothing tracks writes (the oracle must then find lost pages)
            real_wp = real.backend if real is not None else cfg.wp
            tracker: GatedTracker
            if real_wp in ("uffd", "uffd-async", "off"):
                tracker = UNTRACKED
            else:
                tracker = SharedWriteProtect(region, producer.fault)
            memory.tracker = tracker

            def stats() -> dict:
                notif = getattr(endpoint, "notify_stats", None)
                stream = getattr(endpoint, "stats", None)
                return {"config": guest_config_dict(cfg), "lock": zone.summary(),
                        "workload": asdict(workload.stats), "producer": producer.figures(),
                        "fault_events": tracker.fault_events,
                        "notifications": notif() if notif else {},
                        "stream": stream.as_dict() if hasattr(stream, "as_dict") else {}}

            outcome: GuestOutcome | None = None
            async with trio.open_nursery() as nursery:
                async def vcpu() -> None:
                    try:
                        await workload.run()
                    except MigrationFailed:
                        pass  # the producer reports why the connection ended

                nursery.start_soon(vcpu)
                nursery.start_soon(guest_control_loop, region, tracker, workload.gate.pause, stats)
                try:
                    done = await producer.run()
                    outcome = GuestOutcome(True, "migrated and verified", dict(done.summary))
                except (MigrationFailed, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                        BaseExceptionGroup) as e:
                    cause = _expected_failure(e)
                    if cause is None:
                        raise
                    outcome = GuestOutcome(False, cause)
                nursery.cancel_scope.cancel()
            return outcome
    finally:
        region.close()
        if real is not None:
            real.close()


async def guest_main(opts: GuestOptions) -> GuestOutcome:
    """:func:`run_guest` with SIGINT/SIGTERM turned into a clean "interrupted" outcome."""
    result: list[GuestOutcome] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def watch():
                async for sig in signals:
                    result.append(GuestOutcome(False, f"interrupted by {signal.Signals(sig).name}", signal=sig))
                    nursery.cancel_scope.cancel()
                    return

            async def work():
                result.append(await run_guest(opts))
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(work)
    return result[0]
