"""Reclaim: give hinted free guest memory back to the host without ever losing a write.

The host discards the backing of hinted free pages from the guest's memfd
(``fallocate(PUNCH_HOLE | KEEP_SIZE)``, :func:`hintpipe.linux.backing.punch_runs`): the host's
memory use drops at once, a later guest read of a discarded page sees zeros and a write gets a
fresh page. The danger is a page the guest reuses between its hint and the discard: the punch
would destroy that write. What makes a discard safe here:

* the check: a backing page is punched only while every one of its guest pages has its ``skip``
  bit set (hinted under the active command id, not written since: the page state's
  refuse-written and invalidate guards keep that meaning), under ``state.lock``, the lock the
  write-fault path takes to mark a page. With synchronous write-protect (``uffd``, ``sim``) a
  write to a protected page waits until its fault is marked, and marking needs the lock: a write
  either was marked before the check (the discard is refused and counted,
  ``discards_refused_written``) or stays blocked until the punch is done and then lands on a
  fresh page (the kernel keeps the uffd-wp marker of a punched page, so the write still faults).
  Skip set also means the page was never unprotected since its hint, so the marker is there;
* ``isolate`` race mode: the guest keeps a hinted block off its free lists until the host acks
  its frame, and the host acks only after the discard (:meth:`Reclaimer.discard_now`), so no write
  can reach the block in between; the check runs too and refuses pages written before their hint;
* ``uffd-async`` in ``detect`` mode: the kernel resolves write faults itself, so a store can land
  between the scan that said "unwritten" and the punch; no kernel primitive discards
  conditionally, so :func:`reclaim_refusal` refuses the combination with a sentence.

Backing pages: with ``hugetlb`` a backing page is 512 guest pages. Write-protect works on whole
huge pages, so :class:`BackedPageState` marks the whole backing page written on any write to it;
a hint covering less than a whole backing page is counted (``hints_too_small``) and never punched
(a 4 KiB punch inside a huge page zeroes those bytes in place, bypassing write-protect).

The ``reclaim-check`` guard (``--break reclaim-check``) punches every hinted backing page without
the check, only to show that the loss oracle catches what it prevents.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

import numpy as np
import trio

from hintpipe.host.pagestate import HostPageState
from hintpipe.linux.backing import punch_runs, resident_bytes
from hintpipe.units import PAGE_SIZE, order_pages, page_runs, run_pages

if TYPE_CHECKING:  # pragma: no cover
    from hintpipe.host.session import HostSession

__all__ = ["BackedPageState", "ReclaimFigures", "Reclaimer", "reclaim_refusal", "DISCARD_CHUNK_UNITS",
           "DISCARD_INTERVAL_S", "RECLAIM_ROUND_S", "reclaim_rounds"]

DISCARD_CHUNK_UNITS = 256
"""Backing pages checked and punched per hold of the page state's lock: bounds how long a write
fault can wait for a discard (the prototype measured 5-10 ms at most at load 4)."""
DISCARD_INTERVAL_S = 0.01
"""``detect`` mode: hinted pages are discarded in batches this often (guest time), so the guest
can reuse some of them in between, which the check must then refuse."""
RECLAIM_ROUND_S = 1.0
"""Guest time of a hinting round the host runs for reclaim alone (before a migration): the guest
walks its free lists once a round (Linux's free page reporting looks every 2 s)."""
_MIB = 1 << 20


def reclaim_refusal(*, memory: str, wp: str, race_mode: str, hinting: bool = True) -> str | None:
    """Why ``--reclaim`` cannot run with these settings (one sentence), or None when it can."""
    if memory != "real":
        return "--reclaim discards real guest memory: use it with --memory real"
    if wp == "off":
        return ("--reclaim needs write tracking to know which hinted pages the guest reused; "
                "--wp off has none")
    if wp == "uffd-async" and race_mode != "isolate":
        return ("--reclaim with --wp uffd-async in detect mode is refused: the kernel resolves "
                "asynchronous write faults itself, so a guest store can land between the scan that "
                "saw the page unwritten and the discard, and no kernel call discards only unwritten "
                "pages; use --wp uffd, or --race-mode isolate")
    return None


def reclaim_rounds(reclaimer: "Reclaimer", session: "HostSession", start_round: Callable[[int], Awaitable[None] | None],
                   seconds: float) -> Callable[[], Awaitable[None]]:
    """Reclaim before any migration (``--reclaim-for``): a coroutine function that, for ``seconds``
    of the guest's time, runs hinting rounds of the host's own (:data:`RECLAIM_ROUND_S` each) on
    ``session`` (a :class:`~hintpipe.host.session.HostSession` serving the guest), with
    write-protect armed by ``start_round(index)`` as for a migration round, so the guest's hints
    are discarded while it runs; it ends as the migration is to start. The skip bits these
    rounds set stay valid into the migration: every page is protected from the first round on,
    and a write clears its page's skip."""
    async def run() -> None:
        end = trio.current_time() + seconds
        index = 0
        while trio.current_time() < end:
            started = start_round(index)
            if started is not None:
                await started
            await session.start_round()
            await trio.sleep(min(RECLAIM_ROUND_S, max(0.0, end - trio.current_time())))
            await session.stop_round()
            index += 1
            reclaimer.figures.rounds_before_migration = index
        reclaimer.migration_starts()

    return run


class BackedPageState(HostPageState):
    """The page state of a guest whose memory is backed by pages of ``unit`` guest pages.

    A write anywhere in a backing page marks all of it written (write-protect is lifted, and
    faults are reported, for the whole backing page). :attr:`discarded` is the per backing page
    "punched and not written since", which the reclaimer reads and a write clears.
    """

    def __init__(self, page_count: int, *, unit: int = 1, **kw) -> None:
        if unit < 1 or unit & (unit - 1) or page_count % unit:
            raise ValueError(f"backing page of {unit} pages must be a power of two dividing the guest")
        super().__init__(page_count, **kw)
        self.unit = unit
        self.unit_shift = unit.bit_length() - 1
        self.discarded = np.zeros(page_count // unit, dtype=bool)

    def on_written(self, pfns: np.ndarray) -> int:
        """Write faults on ``pfns``: every page of their backing pages counts as written."""
        pfns = np.asarray(pfns, dtype=np.int64)
        units = pfns >> self.unit_shift
        if self.unit > 1:
            units = np.unique(units)
            pfns = run_pages(units << self.unit_shift, np.full(len(units), self.unit))
        first = super().on_written(pfns)
        # after the skip bits are cleared (from then on no discard passes the check), so a page
        # punched before that is not left marked discarded once written
        with self.lock:
            self.discarded[units] = False
        return first


@dataclass
class ReclaimFigures:
    """What reclaim did in one run (the ``reclaim`` object of a report); pages are 4 KiB."""

    backing: str = "shmem"
    backing_page_kib: int = 4
    pages_hinted: int = 0
    """Hinted pages not already discarded when their hint was handled."""
    pages_discarded: int = 0
    """Pages punched out of the memfd."""
    discards_refused_written: int = 0
    """Hinted pages not punched because the guest wrote them since their hint (or before it)."""
    hints_too_small: int = 0
    """Hinted pages not punched because their hint covered less than a whole backing page."""
    reclaimed_fraction: float | None = None
    """pages_discarded / pages_hinted."""
    punch_calls: int = 0
    discard_batches: int = 0
    max_lock_hold_us: float = 0.0
    """Longest hold of the page state's lock by one discard chunk (a write fault waits at most
    this long)."""
    isolate_wait_ms: float = 0.0
    """isolate mode: wall time hinted blocks stayed off the guest's free lists waiting for their
    discard before the ack (sum over frames)."""
    isolate_max_wait_ms: float = 0.0
    host_rss_before_mib: float = 0.0
    """The memfd's resident size when reclaim started (``st_blocks``)."""
    host_rss_min_mib: float = 0.0
    host_rss_after_mib: float = 0.0
    """... when reclaim stopped (before the stop-and-copy)."""
    check: bool = True
    rounds_before_migration: int = 0
    """Hinting rounds the host ran for reclaim alone, before the migration began (``--reclaim-for``)."""
    host_rss_at_migration_mib: float | None = None
    """The memfd's resident size when the migration began (None: reclaim started with it)."""
    """False: the reclaim-check guard was broken for this run (a demonstration)."""

    def as_dict(self) -> dict:
        """JSON-ready."""
        d = asdict(self)
        for k in ("max_lock_hold_us", "isolate_wait_ms", "isolate_max_wait_ms", "host_rss_before_mib",
                  "host_rss_min_mib", "host_rss_after_mib", "host_rss_at_migration_mib"):
            if d[k] is not None:
                d[k] = round(d[k], 3)
        if self.pages_hinted:
            d["reclaimed_fraction"] = round(self.pages_discarded / self.pages_hinted, 4)
        return d


class Reclaimer:
    """Discard hinted free pages of one guest from its memfd ``fd``, never losing a write.

    ``state`` is the guest's :class:`BackedPageState`. Hints are handed over with
    :meth:`hinted` (queued; ``detect`` mode: :meth:`run` discards them every
    :data:`DISCARD_INTERVAL_S` in a worker thread) or :meth:`discard_now` (``isolate`` mode: before
    the frame is acked). ``check=False`` breaks the reclaim-check guard (a demonstration).
    :meth:`stop` ends discarding for good (before stop-and-copy and before write-protect is lifted).
    """

    def __init__(self, state: BackedPageState, fd: int, *, backing: str = "shmem", check: bool = True,
                 chunk_units: int = DISCARD_CHUNK_UNITS, interval_s: float = DISCARD_INTERVAL_S) -> None:
        self.state = state
        self.fd = fd
        self.unit = state.unit
        self.check = check
        self.chunk_units = chunk_units
        self.interval_s = interval_s
        rss = resident_bytes(fd) / _MIB
        self.figures = ReclaimFigures(backing=backing, backing_page_kib=self.unit * PAGE_SIZE >> 10, check=check,
                                      host_rss_before_mib=rss, host_rss_min_mib=rss, host_rss_after_mib=rss)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._stopped = False
        self._busy = threading.Lock()  # one discard at a time; stop() waits for it

    # ---- hints in ----------------------------------------------------------------------------
    def hinted(self, starts: np.ndarray, orders: np.ndarray) -> None:
        """Queue the hinted blocks ``(starts[i], orders[i])`` (validated by the protocol layer)."""
        if not self._stopped and len(orders):
            self._pending.append((np.asarray(starts, dtype=np.int64).copy(), np.asarray(orders).copy()))

    async def discard_now(self, starts: np.ndarray, orders: np.ndarray) -> None:
        """isolate mode: discard these blocks before returning (the caller acks afterwards)."""
        if self._stopped or not len(orders):
            return
        t0 = time.perf_counter()
        await trio.to_thread.run_sync(self.discard_blocks, np.asarray(starts, dtype=np.int64),
                                      np.asarray(orders))
        waited = (time.perf_counter() - t0) * 1e3
        self.figures.isolate_wait_ms += waited
        self.figures.isolate_max_wait_ms = max(self.figures.isolate_max_wait_ms, waited)

    async def run(self) -> None:
        """detect mode: discard the queued hints every ``interval_s`` until cancelled or stopped."""
        while not self._stopped:
            await trio.sleep(self.interval_s)
            if self._pending:
                await trio.to_thread.run_sync(self.discard_pending)

    def discard_pending(self) -> None:
        """Discard every queued hint now (in the calling thread)."""
        pending, self._pending = self._pending, []
        if pending:
            self.discard_blocks(np.concatenate([p for p, _ in pending]), np.concatenate([o for _, o in pending]))

    def stop(self) -> None:
        """Stop for good: drop the queue, wait for a discard under way, take the final RSS."""
        if self._stopped:
            return
        self._stopped = True
        self._pending = []
        with self._busy:
            self._note_rss(final=True)

    # ---- the discard -------------------------------------------------------------------------
    def discard_blocks(self, starts: np.ndarray, orders: np.ndarray) -> int:
        """Punch the whole backing pages of these hinted blocks that pass the check; return the
        guest pages punched. Thread-safe; holds ``state.lock`` one chunk at a time."""
        with self._busy:
            if self._stopped:
                return 0
            return self._discard(np.asarray(starts, dtype=np.int64), np.asarray(orders, dtype=np.int64))

    def _discard(self, starts: np.ndarray, orders: np.ndarray) -> int:
        f, st, u, sh = self.figures, self.state, self.unit, self.state.unit_shift
        units, too_small = self._whole_units(starts, orders)
        f.hints_too_small += too_small
        f.pages_hinted += too_small
        punched = 0
        for i in range(0, len(units), self.chunk_units):
            chunk = units[i:i + self.chunk_units]
            t0 = time.perf_counter()
            with st.lock:
                fresh = chunk[~st.discarded[chunk]]
                if self.check:
                    ok = self._unwritten(fresh)
                    sel = fresh[ok]
                else:
                    sel = fresh
                if len(sel):
                    rs, rc = page_runs(sel)
                    f.punch_calls += punch_runs(self.fd, rs << sh, rc << sh)
                    st.discarded[sel] = True
            hold = (time.perf_counter() - t0) * 1e6
            f.max_lock_hold_us = max(f.max_lock_hold_us, hold)
            f.pages_hinted += len(fresh) * u
            f.discards_refused_written += (len(fresh) - len(sel)) * u
            f.pages_discarded += len(sel) * u
            punched += len(sel) * u
        f.discard_batches += 1
        self._note_rss()
        return punched

    def _whole_units(self, starts: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, int]:
        """The backing pages these blocks cover wholly (sorted, unique) and how many hinted pages
        lie outside them. Blocks are naturally aligned: one at least a backing page big covers
        whole backing pages; smaller ones lie inside one, which is whole when the batch's small
        blocks add up to all of its pages."""
        u, sh = self.unit, self.state.unit_shift
        sizes = order_pages(orders)
        big = sizes >= u
        parts = [run_pages(starts[big] >> sh, sizes[big] >> sh)] if big.any() else []
        too_small = 0
        if not big.all():
            pages = np.unique(run_pages(starts[~big], sizes[~big]))  # re-hints may repeat a block
            per_unit = np.bincount(pages >> sh)
            whole = np.flatnonzero(per_unit == u)
            parts.append(whole)
            too_small = len(pages) - len(whole) * u
        if not parts:
            return np.empty(0, dtype=np.int64), 0
        return np.unique(np.concatenate(parts)), too_small

    def _unwritten(self, units: np.ndarray) -> np.ndarray:
        """Per backing page: every guest page hinted and not written since (``skip`` all set)."""
        if self.unit == 1:
            return self.state.skip_locked(units)
        pages = run_pages(units << self.state.unit_shift, np.full(len(units), self.unit))
        return self.state.skip_locked(pages).reshape(-1, self.unit).all(axis=1)

    def migration_starts(self) -> None:
        """Note the memfd's resident size as the migration begins (after rounds of reclaim alone)."""
        self.figures.host_rss_at_migration_mib = resident_bytes(self.fd) / _MIB

    def _note_rss(self, *, final: bool = False) -> None:
        rss = resident_bytes(self.fd) / _MIB
        self.figures.host_rss_min_mib = min(self.figures.host_rss_min_mib, rss)
        if final:
            self.figures.host_rss_after_mib = rss
