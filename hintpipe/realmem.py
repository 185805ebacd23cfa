"""Real guest memory for the in-process demo (``--memory real``): bytes in a memfd, not versions.

:class:`RealGuestMemory` keeps :class:`GuestMemory`'s version bookkeeping (the allocator and
workload are unchanged) and also writes each page's (pfn, version) pattern
(:func:`hintpipe.host.guest_ram.page_pattern`) into a :class:`GuestRam` memfd mapping, so a lost
write shows as a byte difference. :class:`RealMachine` holds what outlives one migration run: the
guest's mapping (registered with userfaultfd when a real backend is used), the host's own mapping
of the same memfd (reads never fault, writes are untracked) and the destination buffer, all
allocated and touched once before anything is timed.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from hintpipe.guest.memory import GuestMemory, WriteTracker
from hintpipe.host import uffd as _uffd
from hintpipe.host.guest_ram import WORDS_PER_PAGE, GuestRam, page_pattern
from hintpipe.units import PAGE_SIZE

__all__ = ["RealGuestMemory", "RealMachine", "write_pages_nogil", "WRITE_CHUNK_PAGES"]

WRITE_CHUNK_PAGES = 2048  # pattern scratch per step: 8 MiB, bounded whatever the write size


def write_pages_nogil(ram: GuestRam, pfns: np.ndarray, versions: np.ndarray,
                      scratch: np.ndarray | None = None) -> None:
    """Write the (pfn, version) pattern of pages ``pfns`` into ``ram``, never holding the GIL
    while a store into guest memory can fault.

    Under synchronous userfaultfd WP in this process, a store to a protected page blocks the
    storing thread in the kernel until the handler thread (Python, so it needs the GIL) lifts the
    protection. A store made with the GIL held would therefore deadlock. numpy releases the GIL
    for large copies only (and that is an implementation detail), so the pattern is built in a
    private scratch buffer (never protected) and copied into guest RAM with ``ctypes.memmove``,
    which always releases the GIL. The copy is one C call per maximal run of consecutive pfns
    (one per allocated block, one per scattered rewrite): a Python loop per run is the price of
    the guarantee; the pattern itself is computed vectorised.
    """
    pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
    if not len(pfns):
        return
    versions = np.broadcast_to(np.asarray(versions, dtype=np.uint64), pfns.shape)
    order = np.argsort(pfns, kind="stable")
    pfns, versions = pfns[order], versions[order]
    if pfns[0] < 0 or pfns[-1] >= ram.page_count:
        raise IndexError(f"pfn outside guest RAM of {ram.page_count} pages")
    if scratch is None or len(scratch) < min(len(pfns), WRITE_CHUNK_PAGES):
        scratch = np.empty((min(len(pfns), WRITE_CHUNK_PAGES), WORDS_PER_PAGE), dtype=np.uint64)
    base, src0 = ram.addr, scratch.ctypes.data
    memmove = ctypes.memmove
    for i in range(0, len(pfns), WRITE_CHUNK_PAGES):
        p = pfns[i:i + WRITE_CHUNK_PAGES]
        page_pattern(p, versions[i:i + WRITE_CHUNK_PAGES], out=scratch[:len(p)])
        brk = np.flatnonzero(np.diff(p) != 1) + 1
        run_lo = np.concatenate(([0], brk))
        run_hi = np.concatenate((brk, [len(p)]))
        for lo, hi, pfn in zip(run_lo.tolist(), run_hi.tolist(), p[run_lo].tolist()):
            memmove(base + pfn * PAGE_SIZE, src0 + lo * PAGE_SIZE, (hi - lo) * PAGE_SIZE)


class RealGuestMemory(GuestMemory):
    """:class:`GuestMemory` whose writes also store real bytes into a :class:`GuestRam`."""

    def __init__(self, ram: GuestRam, tracker: WriteTracker | None = None) -> None:
        super().__init__(ram.page_count, tracker)
        self.ram = ram
        self._scratch = np.empty((WRITE_CHUNK_PAGES, WORDS_PER_PAGE), dtype=np.uint64)

    async def write(self, pfns: np.ndarray) -> None:
        """Bump versions (after the simulated tracker, if any), then store the new patterns.

        With a real backend the fault happens inside the store, in the kernel; with ``sim`` the
        tracker has already delivered it. Duplicated pfns are written once (one new version).
        """
        if len(pfns) == 0:
            return
        await self.tracker.before_write(pfns)
        pfns = np.unique(np.asarray(pfns, dtype=np.int64))
        self.versions[pfns] += 1
        write_pages_nogil(self.ram, pfns, self.versions[pfns], self._scratch)
        self.pages_written += len(pfns)


class RealMachine:
    """Guest RAM, its userfaultfd registration, the host's mapping and the destination buffer.

    ``backend`` is a resolved ``--wp`` name; for ``uffd``/``uffd-async`` the guest side registers
    its mapping (:func:`hintpipe.host.uffd.register_wp`, raising ``UffdUnavailable``) and
    :attr:`uffd` holds the fd a host adapter is built from (``pid`` = this process).
    """

    def __init__(self, page_count: int, backend: str) -> None:
        self.page_count = page_count
        self.backend = backend
        self.guest = GuestRam(page_count)
        self.uffd: _uffd.Userfaultfd | None = None
        self.host: GuestRam | None = None
        try:
            self.guest.touch()  # first touch is slow: pay it here, not inside the migration
            self.host = GuestRam(page_count, fd=self.guest.fd)
            self.dest = np.empty((page_count, WORDS_PER_PAGE), dtype=np.uint64)
            self.dest.fill(0)   # touched, so the first round does not pay page faults either
            if backend in ("uffd", "uffd-async"):
                self.uffd = _uffd.register_wp(self.guest.addr, self.guest.size, backend)
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

    def backend_kwargs(self) -> dict:
        """What :func:`hintpipe.host.wp_backends.make_backend` needs for a real backend."""
        return {"ram_addr": self.guest.addr, "page_count": self.page_count,
                "uffd_fd": self.uffd.fd if self.uffd else None, "pid": self.pid}

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
