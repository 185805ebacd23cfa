"""Asynchronous userfaultfd write-protect (WP_ASYNC): the kernel resolves write faults itself.

No fault messages: :class:`UffdAsyncTracker` asks PAGEMAP_SCAN (WP_MATCHING, PAGE_IS_WRITTEN)
which pages were written and re-protects them in the same call; :class:`AsyncUffdBackend` binds
it to a host page state and scans the whole guest before each round's swap, after each live
round and each chunk right before it is sent.
"""

from __future__ import annotations

import numpy as np

from hintpipe.host.pagestate import HostPageState
from hintpipe.linux.pagemap import PagemapScanner
from hintpipe.units import PAGE_SIZE, run_pages
from hintpipe.wp.base import UffdRange, WpBackend

__all__ = ["UffdAsyncTracker", "AsyncUffdBackend"]


class UffdAsyncTracker(UffdRange):
    """Asynchronous WP (WP_ASYNC): no messages; PAGEMAP_SCAN finds written pages.

    The uffd must have had its UFFDIO_API handshake with UFFD_FEATURE_WP_ASYNC
    and the range registered in MODE_WP by the guest ``pid``.  The scanner
    opens ``/proc/pid/pagemap`` (needs ptrace-read permission on the guest).
    A scan of one chunk costs about 35 us, of a whole 1 GiB guest about 1 ms: the engine scans
    only the chunk about to be sent (:meth:`written_in`).
    """

    def __init__(self, ram_addr: int, page_count: int, uffd_fd: int, pid: int, *, unit_pages: int = 1):
        super().__init__(ram_addr, page_count, uffd_fd)
        self.pid = pid
        # pages per backing page: on hugetlb a scan over part of a 2 MiB page reports nothing
        self.unit_pages = unit_pages
        self.scans = 0
        self._scanner = PagemapScanner(pid)

    def arm(self) -> None:
        """The arming pass: one WP_MATCHING scan, whose 'everything written' answer is dropped."""
        self._scanner.written_ranges(self.ram_addr, self.page_count)
        self.protect_calls += 1

    def protect_all(self) -> None:
        """Protect everything now (UFFDIO_WRITEPROTECT over the range; forgets pending writes)."""
        super().protect_all()

    def written_ranges_since_last(self) -> tuple[np.ndarray, np.ndarray]:
        """(start_pfn, npages) runs written since the previous call (or arm), re-protected atomically."""
        starts, counts = self._scanner.written_ranges(self.ram_addr, self.page_count)
        self.scans += 1
        self.protect_calls += 1
        self.faults += int(counts.sum())
        return starts, counts

    def written_since_last(self) -> np.ndarray:
        """Sorted int64 pfns written since the previous call (or arm), re-protected atomically."""
        return run_pages(*self.written_ranges_since_last())

    def written_in(self, start: int, stop: int) -> np.ndarray:
        """Sorted int64 pfns of ``[start, stop)`` written since their last scan, re-protected."""
        if not 0 <= start <= stop <= self.page_count:
            raise ValueError("scan range outside guest RAM")
        if start == stop:
            return np.empty(0, dtype=np.int64)
        u = self.unit_pages
        start, stop = start // u * u, -(-stop // u) * u  # whole backing pages
        starts, counts = self._scanner.written_ranges(self.ram_addr + start * PAGE_SIZE, stop - start)
        self.scans += 1
        self.protect_calls += 1
        self.faults += int(counts.sum())
        return run_pages(starts + start, counts)

    def stats(self) -> dict:
        """Counters for the JSON report."""
        return {**super().stats(), "scans": self.scans,
                "scan_ioctls": self._scanner.ioctl_calls}

    def close(self) -> None:
        """Close the pagemap fd (the uffd fd belongs to the caller)."""
        self._scanner.close()

    def __enter__(self) -> "UffdAsyncTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncUffdBackend(WpBackend):
    """Asynchronous userfaultfd WP (WP_ASYNC): PAGEMAP_SCAN finds written pages, no messages.

    ``uffd_fd`` as for :class:`SyncUffdBackend` but with WP_FEATURES_ASYNC; ``pid`` is the guest
    process whose ``/proc/PID/pagemap`` is scanned (this process for the in-process demo).
    Round 0 starts with the arming pass, whose "everything written" answer is not counted.

    Three kinds of scan hand written pages to the page state (``on_written``: ``written`` set,
    ``skip`` cleared, so the page is in the next round's send set):

    * *round start* (:meth:`start_round`, every round after the first, the final one with the
      guest paused): the whole guest, right before the swap that makes the written pages the
      new round's send set. This is the scan safety rests on: every write before it is in a send
      set still to come, and the final one leaves no write unseen (the *scan-before-send* guard;
      ``scan_before_send=False`` turns it off, only to show what it protects against);
    * *round end* (``before_chunk(0, n)``): the whole guest after a live round's last chunk, so
      the engine's convergence check counts the round's writes;
    * *chunk* (``before_chunk(a, b)``): pages ``[a, b)`` right before that chunk is sent, so a
      page written since its last scan is sent now as well (it is resent next round anyway).

    :attr:`scan_caught` counts, per kind, the pages a scan found written while their skip bit
    was set: a hint had marked them free, the guest wrote them since, and the scan is what
    cleared the skip.
    """

    name = "uffd-async"
    scan_chunks = True
    """Scan each chunk before it is sent. Not needed for safety (the round-start scan is); a class
    attribute so that a measurement can compare runs without it."""

    def __init__(self, state: HostPageState, ram_addr: int, page_count: int, uffd_fd: int,
                 pid: int, *, scan_before_send: bool = True, unit_pages: int = 1) -> None:
        super().__init__(state)
        if page_count != state.page_count:
            raise ValueError("guest RAM and page state disagree on the page count")
        self.tracker = UffdAsyncTracker(ram_addr, page_count, uffd_fd, pid, unit_pages=unit_pages)
        self.scan_before_send = scan_before_send
        self.scan_caught = {"chunk": 0, "round_end": 0, "round_start": 0}

    def _collect(self, pfns: np.ndarray, kind: str) -> None:
        if len(pfns):
            # read before on_written clears them; hints are applied on this (the trio) thread
            self.scan_caught[kind] += int(np.count_nonzero(self.state.is_skip(pfns)))
            self.state.on_written(pfns)

    def start_round(self, index: int) -> None:
        """Round 0: arm (protect all, drop the answer); later: full scan, then swap."""
        self.rounds += 1
        if index == 0:
            self.tracker.arm()
            self.state.begin_first_round()
        else:
            if self.scan_before_send:
                # writes since the last scan belong to the round that is ending
                self._collect(self.tracker.written_since_last(), "round_start")
            self.state.begin_round()

    async def before_chunk(self, start: int, stop: int) -> None:
        """Scan ``[start, stop)`` and hand the written pages to the page state (a call over the
        whole guest is the engine's round-end scan; chunk scans only while :attr:`scan_chunks`)."""
        if (start, stop) == (0, self.state.page_count):
            self._collect(self.tracker.written_in(start, stop), "round_end")
        elif self.scan_chunks:
            self._collect(self.tracker.written_in(start, stop), "chunk")

    def stats(self) -> dict:
        """``faults``: first writes per round, as the page state counts them for every backend;
        ``written_found``: written pages the scans reported (arming pass excluded; a page written
        again after a scan re-protected it is found again); protecting calls; scans; the pages
        scans caught with their skip bit set (``scan_caught_pages``, and by kind of scan)."""
        s = self.tracker.stats()
        return {"backend": self.name, "faults": self.state.faults, "written_found": s["faults"],
                "protect_calls": s["protect_calls"], "scans": s["scans"],
                "scan_caught_pages": sum(self.scan_caught.values()), "scan_caught_by": dict(self.scan_caught)}

    def close(self) -> None:
        """Close the pagemap fd (the uffd belongs to the caller)."""
        self.tracker.close()
