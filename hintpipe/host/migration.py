"""Pre-copy live migration in trio time, with free page hinting, the loss oracle and the driver.

Round 0 sends every page, each later round the pages written during the previous one; pages
in the skip bitmap are not sent. A page is put on the link as QEMU's RAM stream puts it
(``migration/ram.c``): a page whose bytes are all zero as its header and one byte
(``save_zero_page``: :data:`ZERO_PAGE_BYTES`), any other as its header and its 4096 bytes
(``save_normal_page``: :data:`NORMAL_PAGE_BYTES`), in the hinted run and in the baseline alike;
the destination of a zero page is set to zeros. The link is modelled by sleeping
``bytes * 8 / bandwidth`` per chunk of pages, so under trio's MockClock a migration of a 4 GiB
guest over 10 Gbit/s takes its seconds of virtual time in well under a second of wall time. In
real time (paired processes) a sleep can end late; the link does not charge its own oversleep
to the migration (it is counted apart, ``sleep_overshoot_s``), while real work that delays the
next chunk (reading pages, scanning for writes, waiting for the guest) is charged. Hinting runs during each live round
under that round's command id and stops before the next round's write tracking starts (as QEMU
stops hinting before its dirty-bitmap sync). When the rest would fit the downtime target, or at
the round limit, the guest is paused and the rest is sent (stop-and-copy). The verifier then
compares every allocated page at the destination with the source: ``lost_pages`` must be 0.

:func:`drive_migration` runs an engine beside the host session that serves its guest and tells
the guest the verdict: the one driver of ``hintpipe demo``, ``hintpipe replay`` and ``hintpipe
host``.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable, Sequence

import numpy as np
import trio

from hintpipe.host.pagebits import PageBits
from hintpipe.host.pagestate import HostPageState
from hintpipe.host.session import HostSession
from hintpipe.progress import MigrationObserver
from hintpipe.units import PAGE_SIZE


VERIFY_CHUNK_BYTES = 16 << 20  # destination bytes compared per step by the oracle (4096 real pages)
PAGE_HEADER_BYTES = 8
"""QEMU's ``save_page_header``: a big-endian u64 of page offset | flags. (The RAMBlock's id
string follows only when the block changes from the last page sent: hintpipe's guest is one
block, so it is not counted.)"""
ZERO_PAGE_BYTES = PAGE_HEADER_BYTES + 1
"""A page whose bytes are all zero: header + ``qemu_put_byte(f, 0)`` (``save_zero_page``)."""
NORMAL_PAGE_BYTES = PAGE_HEADER_BYTES + PAGE_SIZE
"""Any other page: header + its bytes (``save_normal_page``)."""

STATS_CHUNK_PAGES = 1 << 18  # pages per step of whole-guest statistics (bounded temporaries)
LINK_SLACK_S = 0.001  # link time the sender may run ahead of the clock before it sleeps


@dataclass(frozen=True)
class MigrationConfig:
    """Link and convergence settings."""

    bandwidth_gbit: float = 10.0
    max_rounds: int = 30
    downtime_ms: float = 300.0
    chunk_pages: int = 0  # 0: about 1/1024 of the guest, between 256 and 65536 pages
    hinting: bool = True

    def __post_init__(self) -> None:
        if self.bandwidth_gbit <= 0:
            raise ValueError("bandwidth must be positive")
        if self.max_rounds < 1:
            raise ValueError("max_rounds must be >= 1")
        if self.downtime_ms < 0:
            raise ValueError("downtime_ms must be >= 0")
        if self.chunk_pages < 0:
            raise ValueError("chunk_pages must be >= 0")

    def chunk_for(self, pages: int) -> int:
        """Pages sent per link step: small enough that hints arriving mid-round still help."""
        if self.chunk_pages:
            return self.chunk_pages
        return min(65536, max(256, pages >> 10)) & ~255  # whole bytes of the page state's bitmaps

    def seconds_for(self, pages: int) -> float:
        """Link time to move ``pages`` pages of data (the convergence estimate: like QEMU's, it
        counts every remaining page at full size)."""
        return self.seconds_for_bytes(pages * PAGE_SIZE)

    def seconds_for_bytes(self, nbytes: int) -> float:
        """Link time to move ``nbytes`` bytes."""
        return nbytes * 8 / (self.bandwidth_gbit * 1e9)


@dataclass
class RoundReport:
    """One pre-copy round (or the final stop-and-copy)."""

    index: int
    to_send: int
    sent: int
    skipped: int
    duration_s: float
    hinted: bool
    stayed_free: int = 0
    stayed_free_skipped: int = 0
    zero_pages_sent: int = 0
    """Pages of ``sent`` whose bytes were all zero (sent as a header)."""
    bytes_sent: int = 0
    """Bytes put on the link (headers and page data)."""


@dataclass
class MigrationResult:
    """The figures of one migration; ``as_dict`` is the JSON shape other tools read."""

    pages_total: int
    pages_sent: int = 0
    """Pages put on the link, zero pages included."""
    zero_pages_sent: int = 0
    """Pages of ``pages_sent`` whose bytes were all zero, sent as a header only."""
    bytes_sent: int = 0
    """Bytes put on the link: ZERO_PAGE_BYTES per zero page, NORMAL_PAGE_BYTES per other page."""
    pages_skipped: int = 0
    rounds: int = 0
    lost_pages: int = 0
    verified: bool = False
    allocated_pages: int = 0
    time_s: float = 0.0
    downtime_ms: float = 0.0
    converged: bool = False
    sleep_overshoot_s: float = 0.0
    """Time the sender's sleeps ended late (real time only), not charged to ``time_s``."""
    guest_failure: str | None = None
    round_reports: list[RoundReport] = field(default_factory=list)

    @property
    def skip_efficiency(self) -> float | None:
        """Pages skipped / pages that were free when their round began and stayed free."""
        elig = sum(r.stayed_free for r in self.round_reports)
        return None if elig == 0 else sum(r.stayed_free_skipped for r in self.round_reports) / elig

    def as_dict(self) -> dict:
        """JSON-ready figures."""
        d = {k: v for k, v in asdict(self).items() if k != "round_reports"}
        eff = self.skip_efficiency
        d["skip_efficiency"] = None if eff is None else round(eff, 4)
        d["time_s"] = round(self.time_s, 4)
        d["downtime_ms"] = round(self.downtime_ms, 3)
        d["sleep_overshoot_s"] = round(self.sleep_overshoot_s, 4)
        d["per_round"] = [
            {"sent": r.sent, "skipped": r.skipped, "to_send": r.to_send, "duration_s": round(r.duration_s, 4),
             "zero_pages_sent": r.zero_pages_sent, "bytes_sent": r.bytes_sent}
            for r in self.round_reports
        ]
        return d


@dataclass
class MigrationEngine:
    """Migrate one guest whose page state the host tracks in ``state``.

    ``read_source(idx)`` returns the source content of pages ``idx`` (versions in simulation,
    ``(len(idx), 512)`` uint64 words in real-memory mode); ``free_mask()`` is the guest's current
    free-page mask (for the oracle and skip efficiency); ``pause_guest`` stops its vCPUs;
    ``session`` drives hinting.

    Write-protect hooks (the backends of :mod:`hintpipe.wp` provide them): ``start_round(index)``
    starts round ``index`` (0 = first; default ``state.begin_first_round``/``begin_round``), so a
    real backend can re-protect atomically with the swap; ``before_chunk(start, stop)`` collects
    writes to pages ``[start, stop)`` (an asynchronous backend scans them) before that chunk of a
    live round is sent, and once over ``[0, n)`` at the end of each live round. ``dest`` is an
    optional preallocated (already touched) destination, zeroed by the caller. ``observers`` are
    told of each round and chunk as it is done (:class:`~hintpipe.progress.MigrationObserver`:
    a progress bar, the report's time series).
    ``broken_guards`` names the host guards this run turned off (``--break``): such a run
    demonstrates a loss and is never verified, whatever the oracle finds. ``source_intact(idx)``
    (optional, real memory) says per page whether the source still holds what the guest last
    wrote there: the oracle counts a page lost when it does not, so a write destroyed at the
    source (a discard by reclaim) is caught even where the copy matches the damaged source.
    """

    cfg: MigrationConfig
    state: HostPageState
    read_source: Callable[[np.ndarray], np.ndarray]
    free_mask: Callable[[], np.ndarray]
    pause_guest: Callable[[], Awaitable[None]]
    session: HostSession | None = None
    before_chunk: Callable[[int, int], Awaitable[None]] | None = None
    start_round: Callable[[int], None | Awaitable[None]] | None = None
    dest: np.ndarray | None = None
    observers: Sequence[MigrationObserver] = ()
    broken_guards: frozenset[str] = frozenset()
    source_intact: Callable[[np.ndarray], np.ndarray] | None = None

    @staticmethod
    def round_nbytes_for(page_count: int) -> int:
        """Bytes a live round holds per guest for its statistics: the free mask at its start and
        the pages it skipped, one bit a page each."""
        return 2 * ((page_count + 7) >> 3)

    def __post_init__(self) -> None:
        n = self.state.page_count
        if self.dest is None:
            sample = self.read_source(np.zeros(1, dtype=np.int64))
            self.dest = np.zeros((n,) + sample.shape[1:], dtype=sample.dtype)
        self.result = MigrationResult(pages_total=n)
        self._overshoot = 0.0  # how late the link's sleeps ended, in total

    def now(self) -> float:
        """The migration's clock: trio's, less the link's own oversleep (observers time rounds
        with it)."""
        return trio.current_time() - self._overshoot

    async def _sleep_link(self, until: float) -> None:
        """Sleep until ``until`` on the migration's clock; a late wake-up is not charged."""
        target = until + self._overshoot
        await trio.sleep_until(target)
        late = trio.current_time() - target
        if late > 0:
            self._overshoot += late

    async def _start_round(self, index: int) -> None:
        if self.start_round is not None:
            res = self.start_round(index)
            if inspect.isawaitable(res):  # paired processes: a barrier with the guest's writers
                await res
        elif index == 0:
            self.state.begin_first_round()
        else:
            self.state.begin_round()

    async def _hint_start(self) -> bool:
        s = self.session
        if not self.cfg.hinting or s is None or s.failure:
            return False
        try:
            await s.start_round()
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            s.failure = s.failure or f"connection lost: {e}"
            return False

    async def _hint_stop(self) -> None:
        s = self.session
        if s is None or s.failure:
            return
        try:
            await s.stop_round()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            s.failure = s.failure or f"connection lost: {e}"

    async def _send_round(self, index: int, hinted: bool, *, live: bool) -> RoundReport:
        st = self.state
        cfg = self.cfg
        n = st.page_count
        t0 = self.now()
        # one bit a page (the page state's representation): the free mask when the round began
        # and the pages it skipped, for skip efficiency
        free_start = PageBits.from_mask(self.free_mask()) if live else None
        skipped_pages = PageBits(n) if live else None
        sent = skipped = zero = nbytes = 0
        chunk = cfg.chunk_for(n)
        for o in self.observers:
            o.round_started(self, index, live)
        # the link is a clock of its own: each chunk moves the time it is free again; the sender
        # sleeps only once that is LINK_SLACK_S ahead, since real-time sleeps of a few us cost ~1 ms
        link_free_at = t0
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            if self.before_chunk is not None and live:
                await self.before_chunk(a, b)
            go, nskip = st.send_set(a, b, skipped_pages)
            if len(go):
                nz = self._copy_pages(go)
                sent += len(go)
                zero += nz
                cbytes = nz * ZERO_PAGE_BYTES + (len(go) - nz) * NORMAL_PAGE_BYTES
                nbytes += cbytes
                link_free_at = max(link_free_at, self.now()) + cfg.seconds_for_bytes(cbytes)
            if link_free_at - self.now() > LINK_SLACK_S:
                await self._sleep_link(link_free_at)
            else:
                await trio.lowlevel.checkpoint()
            skipped += nskip
            for o in self.observers:
                o.chunk_done(self, index, b, sent, skipped)
        await self._sleep_link(link_free_at)  # the round ends when its last page is on the wire
        if self.before_chunk is not None and live:
            await self.before_chunk(0, n)  # round end: every write so far is in ``written``
        rep = RoundReport(index, st.count_dirty(), sent, skipped, self.now() - t0, hinted,
                          zero_pages_sent=zero, bytes_sent=nbytes)
        if live:
            fm = self.free_mask()
            # chunked: four whole-guest temporaries here were the peak of a 2**28-page run
            for a in range(0, n, STATS_CHUNK_PAGES):
                stayed, stayed_skipped = st.stayed_free(a, a + STATS_CHUNK_PAGES, free_start, fm[a:a + STATS_CHUNK_PAGES],
                                                        skipped_pages)
                rep.stayed_free += stayed
                rep.stayed_free_skipped += stayed_skipped
        for o in self.observers:
            o.round_ended(self, rep)
        return rep

    def _copy_pages(self, go: np.ndarray) -> int:
        """Send pages ``go`` to the destination; return how many were zero pages.

        A page whose content is all zero (simulation: content value 0; real memory: every byte
        0; checked vectorised over the chunk) goes as a header, and the destination sets that
        page to zeros; every other page's bytes are copied.
        """
        data = self.read_source(go)
        is_zero = ~data.reshape(len(go), -1).any(axis=1)
        nz = int(np.count_nonzero(is_zero))
        if nz == 0:
            self.dest[go] = data
        elif nz == len(go):
            self.dest[go] = 0
        else:
            self.dest[go[~is_zero]] = data[~is_zero]
            self.dest[go[is_zero]] = 0
        return nz

    async def run(self) -> MigrationResult:
        """Migrate until converged (or the round limit), stop-and-copy, verify."""
        st = self.state
        cfg = self.cfg
        res = self.result
        t_start = self.now()
        for r in range(cfg.max_rounds):
            await self._start_round(r)
            hinted = await self._hint_start()
            rep = await self._send_round(r, hinted, live=True)
            if hinted:
                await self._hint_stop()
            res.round_reports.append(rep)
            remaining = st.count_written_unskipped()
            if cfg.seconds_for(remaining) * 1e3 <= cfg.downtime_ms:
                res.converged = True
                break
        await self.pause_guest()
        t_pause = self.now()
        await self._start_round(len(res.round_reports))
        final = await self._send_round(len(res.round_reports), False, live=False)
        res.round_reports.append(final)
        res.downtime_ms = (self.now() - t_pause) * 1e3
        res.time_s = self.now() - t_start
        res.sleep_overshoot_s = self._overshoot
        res.rounds = len(res.round_reports)
        res.pages_sent = sum(r.sent for r in res.round_reports)
        res.zero_pages_sent = sum(r.zero_pages_sent for r in res.round_reports)
        res.bytes_sent = sum(r.bytes_sent for r in res.round_reports)
        res.pages_skipped = sum(r.skipped for r in res.round_reports)
        if self.session is not None:
            res.guest_failure = self.session.failure
        self.verify()
        for o in self.observers:
            o.finished(self, res)
        return res

    def verify(self) -> int:
        """The oracle: count allocated pages whose destination content differs from the source."""
        fm = self.free_mask()
        lost = n_allocated = 0
        # chunked: real-memory pages are 4 KiB each, keep memory bounded (a version is 4 bytes)
        step = max(1, VERIFY_CHUNK_BYTES // (self.dest.nbytes // max(1, len(self.dest))))
        # the allocated pfns are listed per window too: as one int64 array they were 8 bytes
        # per allocated page of a 2**28-page guest
        for a in range(0, len(fm), STATS_CHUNK_PAGES):
            allocated = np.flatnonzero(~fm[a:a + STATS_CHUNK_PAGES]) + a
            n_allocated += len(allocated)
            for i in range(0, len(allocated), step):
                idx = allocated[i:i + step]
                differ = (self.dest[idx] != self.read_source(idx)).reshape(len(idx), -1).any(axis=1)
                if self.source_intact is not None:
                    differ |= ~self.source_intact(idx)
                lost += int(np.count_nonzero(differ))
        self.result.allocated_pages = n_allocated
        self.result.lost_pages = lost
        self.result.verified = lost == 0 and not self.broken_guards
        return lost


async def drive_migration(engine: MigrationEngine, *, cancel_on_disconnect: bool = False,
                          aborts: tuple[type[BaseException], ...] = (),
                          before_done: Callable[[], None] | None = None,
                          linger_s: float = 1.0,
                          before: Callable[[], Awaitable[None]] | None = None) -> str | None:
    """Run ``engine`` while its session (if any, handshake done) serves the guest's frames, then
    tell the guest the verdict; return None when the migration ran to its end, else why not.

    A migration ends early when the engine raises one of ``aborts`` (a guest stuck at a barrier,
    guest RAM gone) or, with ``cancel_on_disconnect``, when the guest's connection ends first: its
    vCPUs live on the other side of it, so the migration cannot go on (an in-process guest's can:
    there hinting just stops). ``before_done`` runs before ``Done`` is sent (a sync userfaultfd
    backend lifts all protection there, so no guest writer stays blocked). After ``Done`` the
    guest has ``linger_s`` to read it and leave. Whether the migration verified is in
    ``engine.result``. ``before`` runs with the session serving, before the engine's first round
    (a host's hinting rounds of reclaim alone).
    """
    session = engine.session
    failure: str | None = None
    finished = False
    async with trio.open_nursery() as nursery:
        engine_scope = trio.CancelScope()
        if session is not None:
            nursery.start_soon(session.serve)
            if cancel_on_disconnect:
                async def watch() -> None:
                    await session.closed.wait()
                    if not finished:
                        engine_scope.cancel()

                nursery.start_soon(watch)
        with engine_scope:
            try:
                if before is not None:
                    await before()
                await engine.run()
                finished = True
            except aborts as e:
                failure = str(e)
        if not finished and failure is None:
            failure = f"guest left mid-migration: {session.failure or 'connection closed'}"
        if before_done is not None:
            before_done()
        if finished and session is not None:
            res = engine.result
            await session.finish(res.verified, {"lost_pages": res.lost_pages, "verified": res.verified,
                                                "pages_sent": res.pages_sent, "rounds": res.rounds})
            with trio.move_on_after(linger_s):
                await session.closed.wait()  # the guest leaves once it has read Done
        finished = True
        nursery.cancel_scope.cancel()
    return failure
