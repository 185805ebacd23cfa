"""``hintpipe host``: accept guest processes and migrate each one, in real time.

One task per connection, each with its own session, page state, shared-memory mapping and
migration engine; nothing is shared between guests but the listener and the memory budget, so a
slow, stuck or hostile guest only stalls its own task (handshakes have a timeout, barriers,
pauses and an idle guest too). Every guest is charged its memory
(:class:`~hintpipe.paired.budget.GuestCost`) against the host's budget before anything is mapped
or allocated for it, and everything it held is released when it leaves. Per guest
the host prints one report (the keys of ``hintpipe demo --json`` plus ``status``, ``reason``,
``guest`` and ``transport``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import numpy as np
import trio

from hintpipe.channel.address import Address
from hintpipe.channel.endpoint import Endpoint
from hintpipe.channel.records import V1, RecordEndpoint, record
from hintpipe.channel.stream import AuthError, auth_server, open_listener, open_stream_endpoint, sendall
from hintpipe.choices import WORKLOADS
from hintpipe.config import RACE_MODES, RunConfig
from hintpipe.guest.workload import WorkloadStats
from hintpipe.host.migration import MigrationEngine, drive_migration
from hintpipe.host.pagestate import HostPageState
from hintpipe.host.reclaim import BackedPageState, Reclaimer, reclaim_refusal, reclaim_rounds
from hintpipe.linux.backing import backing_of, backing_unit
from hintpipe.linux.memfd import verify_words
from hintpipe.host.session import GuestGone, HostSession
from hintpipe.linux.malloc import trim as trim_malloc
from hintpipe.paired.barrier import GuestLeft, GuestStuck, HostControl
from hintpipe.paired.budget import BudgetExceeded, GuestCost, MemoryBudget, Reservation, default_limit, mib
from hintpipe.paired.handoff import (
    TCP_REFUSAL, HostRealMemory, ReceivedRam, RealMemoryError, check_backend, receive_handoff,
)
from hintpipe.paired.mirror import MirroredRegion, MirrorReceiver
from hintpipe.paired.region import RegionError, SharedRegion
from hintpipe.protocol import MAX_PAGE_COUNT, ErrorCode, ProtocolError, encode
from hintpipe.protocol.messages import CMD_ID_BASE, Error, Hello
from hintpipe.progress import NO_PROGRESS, Progress, RoundProgress
from hintpipe.report import GuardFigures, HintFigures, RunResult, format_summary, run_report


@dataclass(frozen=True)
class HostOptions:
    """What ``hintpipe host`` needs."""

    address: Address
    cfg: RunConfig
    guests: int | None = None
    json: bool = False
    out: str | None = None
    secret: bytes | None = None
    handshake_timeout_s: float = 10.0
    barrier_timeout_s: float = 30.0
    idle_timeout_s: float | None = 30.0
    """Fail a guest that sends no frame for this long (KEEPALIVE pings it first; None: no bound)."""
    # the host allocates a few bytes per guest page (and 4 KiB per page with real memory): a
    # Hello is untrusted, so its page_count is capped before anything is mapped or allocated
    max_guest_pages: int = 1 << 26
    max_memory: int | None = None
    """Bytes all guests together may cost this host (:mod:`hintpipe.paired.budget`); None: half of
    MemAvailable at start."""


LINGER_S = 10.0
"""How long a guest has to read ``Done`` and close. The host keeps reading meanwhile: closing a
socket with unread input resets the connection and the guest would lose its ``Done`` (seen with 64
guests on 2 cores, where a guest's last RoundEnd came in after 2 s). A guest that reads Done
closes at once, so this only bounds a slow or stuck one."""

_LOCK_KEYS = ("batches", "empty_holds", "p50_hold_us", "p99_hold_us", "max_hold_us", "alloc_sections",
              "p99_alloc_wait_us", "max_alloc_wait_us")
"""The guest-reported zone lock figures a host report carries."""


def _num(v):
    """A JSON number from untrusted input, else 0."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


def _section(gstats: dict, key: str) -> dict:
    """One section of the guest's untrusted stats snapshot ({} unless it is a dict)."""
    obj = gstats.get(key)
    return obj if isinstance(obj, dict) else {}


def _report_config(base: RunConfig, pages: int, guest_cfg: dict) -> RunConfig:
    """The host's config with the guest's own geometry/workload/walker settings where sane."""
    cfg = replace(base, pages=pages)
    try:
        kind = guest_cfg.get("workload")
        history = guest_cfg.get("history")
        if not (isinstance(history, (int, float)) and not isinstance(history, bool) and 0 <= history <= 1):
            history = cfg.workload.history
        wl = replace(cfg.workload, kind=kind if kind in WORKLOADS else cfg.workload.kind,
                     seed=int(_num(guest_cfg.get("seed")) or cfg.workload.seed), history=float(history))
        cfg = replace(cfg, workload=wl,
                      batch=int(_num(guest_cfg.get("batch")) or cfg.batch),
                      min_order=int(_num(guest_cfg.get("min_order")) or cfg.min_order),
                      race_mode=guest_cfg.get("race_mode") if guest_cfg.get("race_mode") in RACE_MODES else cfg.race_mode,
                      queue_size=int(_num(guest_cfg.get("queue_size")) or cfg.queue_size),
                      event_idx=bool(guest_cfg.get("event_idx", cfg.event_idx)))
    except (ValueError, TypeError):
        cfg = replace(base, pages=pages)
    return cfg


def _counters(obj) -> dict:
    """Numeric counters from an untrusted dict (at most 32 keys)."""
    if not isinstance(obj, dict):
        return {}
    return {k: _num(v) for k, v in list(obj.items())[:32] if isinstance(k, str)}


def _notifications(ep: Endpoint, gstats: dict) -> dict:
    """The report's ``notifications``: demo's keys for shm (guest->host kicks from the guest's
    counters, interrupts and host->guest kicks from the host's), stream counters otherwise."""
    host = ep.notify_stats() if hasattr(ep, "notify_stats") else {}
    guest = _counters(gstats.get("notifications"))
    out: dict = {}
    if host:
        out = {"kicks": guest.get("kicks", 0), "kicks_suppressed": guest.get("kicks_suppressed", 0),
               "interrupts": host["interrupts"], "interrupts_suppressed": host["interrupts_suppressed"],
               "host_to_guest_kicks": host["kicks"], "host_to_guest_kicks_suppressed": host["kicks_suppressed"],
               "guest_interrupts": guest.get("interrupts", 0),
               "guest_interrupts_suppressed": guest.get("interrupts_suppressed", 0),
               "event_idx": bool(host.get("event_idx"))}
    stream = getattr(ep, "stats", None)
    if hasattr(stream, "as_dict"):
        out["host_stream"] = stream.as_dict()
        out["guest_stream"] = _counters(gstats.get("stream"))
    return out


class GuestServer:
    """Serves guests on one listening address; ``reports`` collects one dict per guest."""

    def __init__(self, opts: HostOptions, progress: Progress = NO_PROGRESS) -> None:
        self.opts = opts
        if opts.max_memory is None:
            limit, how = default_limit()
            self.budget = MemoryBudget(limit, source=f"--max-memory {mib(limit)}, {how}")
        else:
            self.budget = MemoryBudget(opts.max_memory, source=f"--max-memory {mib(opts.max_memory)}")
        self.progress = progress
        self.reports: list[dict] = []
        self.served = 0
        self._ids = 0  # guest ids: given once a guest identifies itself (a RAM handoff or a Hello)
        self._conns = 0  # connections accepted: each has its own block of command ids
        self._all_done = trio.Event()

    def _new_guest_id(self) -> int:
        self._ids += 1
        return self._ids

    def _guest_done(self, rep: dict) -> None:
        """Report one guest (migrated, failed or refused) and count it toward ``--guests``."""
        self.reports.append(rep)
        self.emit(rep)
        self.served += 1
        if self.opts.guests is not None and self.served >= self.opts.guests:
            self._all_done.set()

    def _refused(self, gid: int, name: str, pages: int | None, reason: str) -> None:
        """A guest that identified itself and was refused: it counts as a failed guest."""
        print(f"hintpipe host: guest {gid}: {reason}", file=sys.stderr, flush=True)
        self._guest_done({"status": "failed", "reason": reason, "transport": self.opts.address.kind,
                          "guest": {"id": gid, "name": name, "pages": pages}})

    def emit(self, rep: dict) -> None:
        """Print (and append to --out) one guest's report."""
        if self.opts.json:
            text = json.dumps(rep)
        else:
            head = f"guest {rep['guest']['id']} {rep['guest']['name']!r} over {rep['transport']}: {rep['status']}"
            if rep.get("reason"):
                head += f" ({rep['reason']})"
            text = head + ("\n" + format_summary(rep) if "migration" in rep else "")
        print(text, flush=True)
        if self.opts.out:
            with open(self.opts.out, "a") as f:
                f.write(text + "\n")

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED, listener=None) -> None:
        """Listen (on ``listener`` if given, else a new one: ListenError if impossible) and serve
        until cancelled or ``guests`` guests are done."""
        addr = self.opts.address
        if addr.kind == "tcp" and not addr.is_loopback() and self.opts.secret is None:
            raise ValueError(f"refusing to listen on non-loopback {addr} without --secret")
        if listener is None:
            listener = await open_listener(addr)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(listener.getsockname())
                nursery.start_soon(self._accept_loop, listener, nursery)
                await self._all_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            listener.close()
            if addr.kind in ("unix", "shm"):
                try:
                    os.unlink(addr.socket_path)
                except FileNotFoundError:
                    pass

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        # Every trio accept is a checkpoint, so a busy host would take one scheduling pass per
        # waiting guest (64 guests at once waited minutes in the backlog): after each wake-up the
        # backlog is drained without waiting, through a non-blocking twin of the listening socket.
        with socket.socket(fileno=os.dup(listener.fileno())) as twin:
            twin.setblocking(False)
            while True:
                sock, _ = await listener.accept()
                self._start_connection(sock, nursery)
                while True:
                    try:
                        raw, _ = twin.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    self._start_connection(trio.socket.from_stdlib_socket(raw), nursery)

    def _start_connection(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        self._conns += 1
        nursery.start_soon(self._connection, sock, self._conns)

    async def _connection(self, sock: trio.socket.SocketType, conn: int) -> None:
        reservation = self.budget.reservation()
        try:
            await self._connection_inner(sock, conn, _Admission(self.opts, reservation))
        except Exception as e:  # one guest's failure must never take the host (and the others) down
            if os.environ.get("HINTPIPE_DEBUG"):
                raise
            print(f"hintpipe host: connection {conn}: internal error: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
        finally:
            # everything the guest held is unreferenced by now (its session, page state, engine,
            # mappings); hand the freed heap back to the system, then the budget back to others
            trim_malloc()
            reservation.release()

    async def _connection_inner(self, sock: trio.socket.SocketType, conn: int, admission: "_Admission") -> None:
        kind = self.opts.address.kind
        rx: ReceivedRam | None = None
        try:
            if self.opts.cfg.memory == "real":
                # real memory: the guest's RAM handoff is the first message on the socket
                # (before Hello on unix, before the shm setup on shm's control socket)
                try:
                    if kind == "tcp":
                        raise RealMemoryError(TCP_REFUSAL)
                    rx = await receive_handoff(sock, self.opts.handshake_timeout_s)
                    check_backend(self.opts.cfg.wp, rx.info.backend)
                except RealMemoryError as e:
                    if rx is not None:  # a valid handoff: a guest, refused for its settings
                        rx.close()
                        self._refused(self._new_guest_id(), "?", rx.info.page_count, str(e))
                    else:
                        print(f"hintpipe host: connection {conn}: {e}", file=sys.stderr, flush=True)
                    await self._refuse_raw(sock, str(e), frame=kind == "unix")
                    return
            if kind == "shm":
                from hintpipe.channel.shm import ShmSetupError, open_shm_host

                try:
                    async with open_shm_host(sock, timeout_s=self.opts.handshake_timeout_s,
                                             admit=admission.ring) as ep:
                        await self._serve_guest(ep, conn, ep.take_fds, admission, rx)
                except ShmSetupError as e:
                    print(f"hintpipe host: connection {conn}: shm setup refused: {e}", file=sys.stderr, flush=True)
                return
            if kind == "tcp" and self.opts.secret is not None:
                try:
                    with trio.fail_after(self.opts.handshake_timeout_s):
                        await auth_server(sock, self.opts.secret)
                except (AuthError, trio.TooSlowError, OSError) as e:
                    msg = str(e) or "authentication timed out"
                    with trio.move_on_after(1):
                        try:  # in a V1 record: the guest reads records whether or not it authenticated
                            await sendall(sock, record(V1, encode(Error(int(ErrorCode.UNSUPPORTED), msg))))
                            sock.shutdown(socket.SHUT_WR)
                            while await sock.recv(65536):  # drain, so closing does not reset the
                                pass  # connection before the guest has read the Error
                        except OSError:
                            pass
                    print(f"hintpipe host: connection {conn}: {msg}", file=sys.stderr, flush=True)
                    return
            async with open_stream_endpoint(sock, collect_fds=kind == "unix") as stream:
                if kind != "tcp":
                    await self._serve_guest(stream, conn, stream.take_fds, admission, rx)
                    return
                # tcp: the guest streams its memory; its INIT is admitted before the mirror is made
                mirror = MirrorReceiver(stream.queue_nowait, admit=admission.mirror)
                ep = RecordEndpoint(stream, mirror)
                try:
                    await self._serve_guest(ep, conn, ep.take_fds, admission, rx, mirror)
                finally:
                    if mirror.region is not None:
                        mirror.region.close()  # a mirror made for a guest that was then refused
        finally:
            if rx is not None:
                rx.close()
            sock.close()

    async def _refuse_raw(self, sock: trio.socket.SocketType, msg: str, *, frame: bool) -> None:
        """Refuse a guest before any transport is open: an Error frame (unix) and a clean close."""
        if not frame:
            return
        with trio.move_on_after(1):
            try:
                await sendall(sock, encode(Error(int(ErrorCode.UNSUPPORTED), msg)))
                sock.shutdown(socket.SHUT_WR)
                while await sock.recv(65536):  # drain, so closing does not reset the connection
                    pass  # before the guest has read the Error
            except OSError:
                pass

    async def _serve_guest(self, ep: Endpoint, conn: int, take_fds: Callable[[], list[int]], admission: "_Admission",
                           rx: ReceivedRam | None = None, mirror: MirrorReceiver | None = None) -> None:
        opts = self.opts
        # command ids are unique across this host's connections: a guest that reconnects never
        # sees an id of its previous connection (blocks of 2**16 rounds per connection)
        cfg = opts.cfg
        # the guards are the host's alone: nothing the guest sends reaches these switches
        session = HostSession(ep, max_ranges=cfg.max_ranges, idle_timeout_s=opts.idle_timeout_s,
                              drop_stale=cfg.guard_on("stale-drop"),
                              first_cmd_id=CMD_ID_BASE + ((conn - 1) % 32768) * 65536)

        def page_state(pages: int) -> HostPageState:
            guards = dict(refuse_written=cfg.guard_on("refuse-written"), invalidate=cfg.guard_on("invalidate"))
            if rx is None:
                return HostPageState(pages, **guards)
            unit = backing_unit(backing_of(rx.memfd))  # a write marks its whole backing page
            if pages % unit:
                raise RegionError(f"a hugetlb guest must be a whole number of 2M pages, not {pages} pages")
            return BackedPageState(pages, unit=unit, **guards)
        regions: list[SharedRegion] = []

        def make_state(hello: Hello) -> HostPageState:
            admission.guest(hello.page_count)  # size limit and memory budget, before anything else
            if mirror is not None:  # tcp: the mirror the guest's records fill
                if mirror.region is None or mirror.region.page_count != hello.page_count:
                    raise RegionError("tcp guest did not announce its memory (INIT record) for Hello's page_count")
                regions.append(mirror.region)
                return page_state(hello.page_count)
            fds = take_fds()
            for extra in fds[1:]:
                os.close(extra)
            if not fds:
                raise RegionError(f"no guest memory received: guests must share their RAM memfd "
                                  f"({'tcp cannot carry file descriptors; use unix: or shm:' if opts.address.kind == 'tcp' else 'SCM_RIGHTS with Hello'})")
            try:
                regions.append(SharedRegion.attach(fds[0], hello.page_count))
            except BaseException:
                os.close(fds[0])
                raise
            if rx is not None and rx.info.page_count != hello.page_count:
                raise RegionError(f"the RAM handoff says {rx.info.page_count} pages, Hello says {hello.page_count}")
            return page_state(hello.page_count)

        async def refuse(code: ErrorCode, msg: str, hello: Hello | None = None) -> None:
            with trio.move_on_after(1):
                try:
                    await ep.send_frame(session.conn.error(code, msg))
                    # read (and drop) what the guest still sends until it leaves: closing a tcp
                    # socket with unread input resets the connection, and the guest would lose
                    # the Error (a tcp guest streams its memory records before its Hello)
                    receive = getattr(ep, "stream", ep).receive
                    while await receive():
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError, OSError):
                    pass
            if hello is not None:
                self._refused(gid, hello.name, hello.page_count, msg)
            elif admission.refused is not None:  # a tcp INIT refused: a guest that announced its size
                self._refused(gid, "?", admission.refused, msg)
            else:  # not a guest yet (a silent or garbage peer): it does not count
                print(f"hintpipe host: connection {conn}: {msg}", file=sys.stderr, flush=True)

        gid = 0
        try:
            with trio.fail_after(opts.handshake_timeout_s):
                hello = await session.handshake(make_state)
        except trio.TooSlowError:
            await refuse(ErrorCode.UNEXPECTED_MESSAGE, "no Hello within the handshake timeout")
            return
        except ProtocolError as e:
            if admission.refused is not None:
                gid = self._new_guest_id()
            await refuse(e.code, e.message)
            return
        except RegionError as e:  # a well-formed Hello this host cannot serve
            gid = self._new_guest_id()
            await refuse(ErrorCode.UNSUPPORTED, str(e), session.hello)
            return
        except (GuestGone, trio.BrokenResourceError, trio.ClosedResourceError):
            return  # closed before a Hello (a liveness probe, a guest that changed its mind)
        gid = self._new_guest_id()
        region = regions[0]
        print(f"hintpipe host: guest {gid} {hello.name!r} connected over {opts.address.kind} "
              f"({hello.page_count} pages)", file=sys.stderr, flush=True)
        real = None
        try:
            if rx is not None:
                try:
                    real = HostRealMemory(rx, session.state, scan_before_send=cfg.guard_on("scan-before-send"))
                except (RealMemoryError, ValueError, OSError) as e:
                    await refuse(ErrorCode.UNSUPPORTED, f"guest RAM unusable: {e}", hello)
                    return
                if cfg.reclaim and (why := reclaim_refusal(memory="real", wp=real.name, race_mode="detect")):
                    await refuse(ErrorCode.UNSUPPORTED, f"this host reclaims guest memory: {why}", hello)
                    return
            await self._migrate(ep, gid, session, hello, region, real, admission.reservation)
        finally:
            if real is not None:
                real.close()  # sync uffd: lifts all protection, so no guest writer stays blocked
            region.close()

    async def _migrate(self, ep: Endpoint, gid: int, session: HostSession, hello: Hello, region: SharedRegion,
                       real: HostRealMemory | None, reservation: Reservation) -> None:
        opts = self.opts
        state = session.state
        control = HostControl(region, session.closed, timeout_s=opts.barrier_timeout_s)

        async def on_fault(pfns: np.ndarray) -> None:
            pfns = pfns.astype(np.int64)
            state.on_written(pfns)
            region.protect[pfns] = 0  # after on_written: the guest writes only after FaultDone

        session.fault_handler = on_fault

        async def start_round(index: int) -> None:
            await control.barrier(state.begin_first_round if index == 0 else state.begin_round)

        kernel_wp = real is not None and real.backend is not None
        pause, reclaimer, intact = control.pause, None, None
        if real is not None:
            def intact(idx: np.ndarray) -> np.ndarray:
                v = region.versions[idx]  # the guest's own record of its writes
                return verify_words(real.ram.words, idx, v) | (v == 0)
        if real is not None and opts.cfg.reclaim:
            # every applied frame is discarded before it is acked: under the check in detect
            # mode, and an isolating guest keeps its blocks until the ack (protocols/wire-v1.md)
            reclaimer = Reclaimer(state, real.ram.fd, backing=real.ram.backing, check=opts.cfg.guard_on("reclaim-check"))

            async def on_hints(ev) -> None:
                await reclaimer.discard_now(ev.ranges[:, 0], ev.orders)

            session.on_hints = on_hints

            async def pause() -> None:
                await trio.to_thread.run_sync(reclaimer.stop)
                await control.pause()
        engine = MigrationEngine(
            opts.cfg.migration, state,
            read_source=real.read_source if real is not None else lambda idx: region.versions[idx],
            free_mask=lambda: region.free,  # the engine copies what it keeps (one copy a round)
            pause_guest=pause,
            session=session,
            # uffd/uffd-async/off: no barrier, the kernel's protection needs none (HostRealMemory)
            start_round=real.start_round if kernel_wp else start_round,
            before_chunk=real.before_chunk if kernel_wp else None,
            dest=real.dest if real is not None else None,
            observers=(rounds := RoundProgress(self.progress, f"guest {gid} {hello.name!r}"),),
            broken_guards=opts.cfg.broken,
            source_intact=intact,
        )
        t0 = time.perf_counter()
        wp_stats: dict = {}

        def stop_tracking() -> None:
            if reclaimer is not None:  # before protection is lifted
                reclaimer.stop()
            if kernel_wp:  # before releasing the guest: no writer left blocked
                wp_stats.update(real.stop())

        before = None
        if reclaimer is not None and opts.cfg.reclaim_for_s > 0:
            # real memory only: the kernel's write-protect needs no barrier (HostRealMemory)
            before = reclaim_rounds(reclaimer, session, real.start_round, opts.cfg.reclaim_for_s)
        try:
            reason = await drive_migration(engine, cancel_on_disconnect=True,
                                           aborts=(GuestStuck, GuestLeft, RealMemoryError),
                                           before_done=stop_tracking, linger_s=LINGER_S, before=before)
        finally:
            session.fault_handler = None  # holds the page state and the region: let go of them now
        rounds.close()
        res = engine.result
        if reason is None and opts.cfg.broken:
            reason = (f"guard {', '.join(sorted(opts.cfg.broken))} broken on purpose (a demonstration): "
                      f"{res.lost_pages} lost pages")
        elif reason is None and not res.verified:
            reason = f"verification failed: {res.lost_pages} lost pages"
        status = "migrated" if reason is None else "failed"
        gstats = region.read_stats()
        wl = _section(gstats, "workload")
        workload = WorkloadStats(**{f.name: int(_num(wl.get(f.name))) for f in fields(WorkloadStats)})
        lock = _section(gstats, "lock")
        # --wp sim across processes: faults travel over the link (Fault/FaultDone frames), the
        # protection bytes live in guest RAM shared with the host (or mirrored to it over tcp)
        wp = {"backend": "sim", "faults": state.faults, "fault_messages": session.conn.fault_frames,
              "barriers": control.barriers,
              "guest_ram": "mirrored" if isinstance(region, MirroredRegion) else "shared"}
        if real is not None:
            wp = {**wp, "backend": real.name, **wp_stats}
        run = RunResult(migration=res, hints=HintFigures.of(session.conn, state),
                        guards=GuardFigures.of(opts.cfg.broken, session.conn, state, wp), faults=state.faults,
                        wp=wp, lock={k: _num(lock.get(k)) for k in _LOCK_KEYS},
                        notifications=_notifications(ep, gstats), workload=asdict(workload),
                        wall_s=time.perf_counter() - t0,
                        reclaim=reclaimer.figures.as_dict() if reclaimer is not None else None)
        cfg = _report_config(opts.cfg, hello.page_count, _section(gstats, "config"))
        if real is not None:
            cfg = replace(cfg, backing=real.ram.backing)
        rep = run_report(cfg, run, None)
        rep["status"] = status
        rep["reason"] = reason
        rep["transport"] = opts.address.kind
        rep["guest"] = {"id": gid, "name": hello.name, "pages": hello.page_count}
        rep["memory"] = {"reserved_bytes": reservation.nbytes, "budget_bytes": self.budget.limit,
                         "budget_peak_bytes": self.budget.peak}
        self._guest_done(rep)


async def host_main(opts: HostOptions, progress: Progress = NO_PROGRESS) -> int:
    """Serve until ``guests`` are done or SIGINT/SIGTERM; exit status 0 unless a migration failed
    (128 + the signal's number when a signal stopped a host that still had ``guests`` to serve).

    The listener is opened first, so an address that cannot be listened on raises ListenError
    (one sentence) before anything else starts.
    """
    server = GuestServer(opts, progress)
    listener = await open_listener(opts.address)
    stopped_by: list[int] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def watch():
                async for sig in signals:
                    print(f"hintpipe host: {signal.Signals(sig).name}, shutting down", file=sys.stderr, flush=True)
                    stopped_by.append(sig)
                    nursery.cancel_scope.cancel()
                    return

            async def work():
                await server.serve(listener=listener)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(work)
    if stopped_by and opts.guests is not None and server.served < opts.guests:
        return 128 + stopped_by[0]
    return 0 if all(r["status"] == "migrated" for r in server.reports) else 1


class _Admission:
    """One connection's way in: the guest-size limit and the memory budget, checked on every
    size the guest announces (shm rings, tcp INIT, Hello) before anything is mapped or
    allocated for it, and charged to its :class:`Reservation`."""

    def __init__(self, opts: HostOptions, reservation: Reservation) -> None:
        self.opts = opts
        self.reservation = reservation
        self.pages: int | None = None
        self.cost: GuestCost | None = None
        self.refused: int | None = None
        """The page count of a guest refused at its tcp INIT (it then counts as a guest)."""

    def guest(self, page_count: int) -> None:
        """Admit a guest of ``page_count`` pages (again: a no-op); RegionError refuses it."""
        if self.pages is not None:
            if page_count != self.pages:
                raise RegionError(f"the guest announced {self.pages} pages, then {page_count}")
            return
        limit = min(self.opts.max_guest_pages, MAX_PAGE_COUNT)
        if page_count > limit:
            raise RegionError(f"a guest of {page_count} pages exceeds this host's limit of "
                              f"{limit} pages (--max-guest-pages)")
        cost = GuestCost.of(page_count, memory=self.opts.cfg.memory)
        try:
            self.reservation.grow(cost.total, f"a guest of {page_count} pages ({cost.describe()})")
        except BudgetExceeded as e:
            raise RegionError(str(e)) from None
        self.pages, self.cost = page_count, cost

    def mirror(self, page_count: int) -> None:
        """tcp INIT: :meth:`guest`, refusing with ProtocolError (UNSUPPORTED) from the record layer."""
        try:
            self.guest(page_count)
        except RegionError as e:
            self.refused = page_count
            raise ProtocolError(ErrorCode.UNSUPPORTED, str(e)) from None

    def ring(self, nbytes: int) -> None:
        """shm setup: charge the rings the host is asked to map; ShmSetupError refuses."""
        from hintpipe.channel.shm import ShmSetupError

        try:
            self.reservation.grow(nbytes, f"the guest's shm rings ({mib(nbytes)})")
        except BudgetExceeded as e:
            raise ShmSetupError(str(e)) from None
