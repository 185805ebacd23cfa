"""Guest RAM as a real memfd shared between the guest and host processes, and sealed memfds.

The guest creates the memfd, maps it MAP_SHARED and registers that mapping
with userfaultfd; the host maps the same memfd (fd received over SCM_RIGHTS)
to read page bytes for migration.  The host's mapping is a different VMA:
its reads never fault, and its writes are *not* tracked.

Page content is a deterministic function of (pfn, version) over the whole
page, so a torn or stale copy is detected byte for byte:
u64 word 0 = pfn, word 1 = version, word i>=2 = mix(pfn, version) + i*ODD.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os

import numpy as np

from hintpipe.linux.backing import advise_mapping, backing_of, memfd_flags
from hintpipe.units import PAGE_SIZE

__all__ = ["GuestRam", "page_pattern", "verify_words", "write_pages_nogil", "sealed_memfd",
           "WORDS_PER_PAGE", "CHUNK_PAGES"]

WORDS_PER_PAGE = PAGE_SIZE // 8
CHUNK_PAGES = 2048
"""Pages of pattern scratch per step of a write or a check (8 MiB): bounded whatever the size."""
_RAMP = (np.arange(WORDS_PER_PAGE, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
_MIX_P = np.uint64(0xBF58476D1CE4E5B9)
_MIX_V = np.uint64(0x94D049BB133111EB)


def sealed_memfd(size: int, name: str, *, backing: str = "shmem") -> int:
    """A new memfd of ``size`` bytes sealed against shrinking, growing and further sealing
    (``backing``: see :mod:`hintpipe.linux.backing`).

    A peer that maps it can rely on its size: a truncation of a mapped memfd would make the
    mapper's next access die with SIGBUS, and the kernel refuses it under F_SEAL_SHRINK.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | memfd_flags(backing))
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def page_pattern(pfns: np.ndarray, versions: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Expected content of pages as a (n, 512) uint64 array (little-endian words)."""
    pfns = np.asarray(pfns, dtype=np.uint64).reshape(-1)
    versions = np.broadcast_to(np.asarray(versions, dtype=np.uint64), pfns.shape)
    if out is None:
        out = np.empty((len(pfns), WORDS_PER_PAGE), dtype=np.uint64)
    seed = pfns * _MIX_P ^ (versions + np.uint64(1)) * _MIX_V
    np.add(seed[:, None], _RAMP[None, :], out=out)
    out[:, 0] = pfns
    out[:, 1] = versions
    return out


class GuestRam:
    """``page_count`` pages of memfd-backed memory mapped MAP_SHARED.

    ``GuestRam(n)`` creates a new memfd; ``GuestRam(n, fd=fd)`` maps an existing
    one (e.g. received from the other process; the fd is dup'ed, the caller keeps
    its own).  ``backing`` (a new memfd): ``shmem``, ``hugetlb`` (2 MiB pages from the
    hugetlb pool; ``page_count`` a multiple of 512) or ``thp`` (see
    :mod:`hintpipe.linux.backing`).  Attributes: ``fd``, ``addr`` (virtual address of this mapping, for
    UFFDIO_REGISTER / PAGEMAP_SCAN in *this* process), ``pages`` (uint8 view
    (page_count, 4096)) and ``words`` (uint64 view (page_count, 512)).
    """

    def __init__(self, page_count: int, *, fd: int | None = None, name: str = "hintpipe-guest-ram",
                 backing: str = "shmem"):
        if page_count <= 0:
            raise ValueError("page_count must be positive")
        self.page_count = page_count
        self.size = page_count * PAGE_SIZE
        self.backing = backing
        if fd is None:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC | memfd_flags(backing))
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                os.close(self.fd)
                raise
        else:
            if os.fstat(fd).st_size < self.size:
                raise ValueError(f"memfd is smaller than {page_count} pages")
            self.fd = os.dup(fd)
            self.backing = backing_of(fd) if backing == "shmem" else backing
        self._mmap = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        advise_mapping(self._mmap, backing)
        anchor = ctypes.c_char.from_buffer(self._mmap)
        self.addr = ctypes.addressof(anchor)
        del anchor  # release the buffer export at once so close() can unmap
        self.pages = np.frombuffer(self._mmap, dtype=np.uint8).reshape(page_count, PAGE_SIZE)
        self.words = self.pages.view(np.uint64).reshape(page_count, WORDS_PER_PAGE)

    def page_addr(self, pfn: int) -> int:
        """Virtual address of page ``pfn`` in this mapping."""
        return self.addr + pfn * PAGE_SIZE

    def touch(self, start: int = 0, stop: int | None = None) -> None:
        """Populate pages ``[start, stop)`` of the memfd, all by default (first touch of fresh
        memory is slow; do it once)."""
        self.words[start:stop, 0] = 0  # one write per page allocates it in the page cache

    def write_pages(self, pfns: np.ndarray, versions: np.ndarray | int) -> None:
        """Fill pages ``pfns`` with the (pfn, version) pattern.

        Writes go through numpy.  Under *sync* userfaultfd tracking in the same
        process, the writing thread blocks in the kernel on a protected page; it
        must not hold the GIL then, or the handler thread can never run.  numpy
        releases the GIL for these copies, but if in doubt write from another
        process (the real guest) or use :meth:`write_pages_nogil`.
        """
        pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
        versions = np.broadcast_to(np.asarray(versions, dtype=np.uint64), pfns.shape)
        self._check(pfns)
        buf = np.empty((min(len(pfns), CHUNK_PAGES), WORDS_PER_PAGE), dtype=np.uint64)
        for i in range(0, len(pfns), CHUNK_PAGES):  # loop per 8 MiB chunk, not per page
            p, v = pfns[i:i + CHUNK_PAGES], versions[i:i + CHUNK_PAGES]
            if len(p) and p[-1] - p[0] == len(p) - 1 and np.all(np.diff(p) == 1):
                page_pattern(p, v, out=self.words[p[0]:p[-1] + 1])  # contiguous: in place
            else:
                self.words[p] = page_pattern(p, v, out=buf[:len(p)])

    def write_pages_nogil(self, pfns: np.ndarray, versions: np.ndarray | int) -> None:
        """Like :meth:`write_pages` but never holding the GIL while a store can fault
        (see :func:`write_pages_nogil`)."""
        write_pages_nogil(self, pfns, versions)

    def verify(self, pfns: np.ndarray, versions: np.ndarray | int) -> np.ndarray:
        """Boolean array: does page ``pfns[i]`` hold exactly the pattern of ``versions[i]``?"""
        return verify_words(self.words, pfns, versions)

    def close(self) -> None:
        """Unmap and close the fd (idempotent).  Views handed out must be dropped first."""
        if self.fd < 0:
            return
        self.pages = self.words = None  # type: ignore[assignment]
        try:
            self._mmap.close()
        except BufferError:
            pass  # someone still holds a view: the mapping goes away with it
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "GuestRam":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, pfns: np.ndarray) -> None:
        if len(pfns) and (pfns.min() < 0 or pfns.max() >= self.page_count):
            raise IndexError(f"pfn outside guest RAM of {self.page_count} pages")


def verify_words(words: np.ndarray, pfns: np.ndarray, versions: np.ndarray | int) -> np.ndarray:
    """Compare pages of a (n, 512) uint64 array (any copy of guest RAM) to their expected pattern."""
    pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
    versions = np.broadcast_to(np.asarray(versions, dtype=np.uint64), pfns.shape)
    ok = np.empty(len(pfns), dtype=bool)
    buf = np.empty((min(len(pfns), CHUNK_PAGES), WORDS_PER_PAGE), dtype=np.uint64)
    for i in range(0, len(pfns), CHUNK_PAGES):
        p, v = pfns[i:i + CHUNK_PAGES], versions[i:i + CHUNK_PAGES]
        exp = page_pattern(p, v, out=buf[:len(p)])
        ok[i:i + len(p)] = (words[p] == exp).all(axis=1)
    return ok


def write_pages_nogil(ram: GuestRam, pfns: np.ndarray, versions: np.ndarray | None,
                      scratch: np.ndarray | None = None) -> None:
    """Write the (pfn, version) pattern of pages ``pfns`` into ``ram`` (zeros when ``versions``
    is None), never holding the GIL while a store into guest memory can fault.

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
    order = np.argsort(pfns, kind="stable")
    pfns = pfns[order]
    if versions is not None:
        versions = np.broadcast_to(np.asarray(versions, dtype=np.uint64), order.shape)[order]
    if pfns[0] < 0 or pfns[-1] >= ram.page_count:
        raise IndexError(f"pfn outside guest RAM of {ram.page_count} pages")
    if scratch is None or len(scratch) < min(len(pfns), CHUNK_PAGES):
        scratch = np.empty((min(len(pfns), CHUNK_PAGES), WORDS_PER_PAGE), dtype=np.uint64)
    if versions is None:
        scratch[:min(len(pfns), CHUNK_PAGES)] = 0
    base, src0 = ram.addr, scratch.ctypes.data
    memmove = ctypes.memmove
    for i in range(0, len(pfns), CHUNK_PAGES):
        p = pfns[i:i + CHUNK_PAGES]
        if versions is not None:
            page_pattern(p, versions[i:i + CHUNK_PAGES], out=scratch[:len(p)])
        brk = np.flatnonzero(np.diff(p) != 1) + 1
        run_lo = np.concatenate(([0], brk))
        run_hi = np.concatenate((brk, [len(p)]))
        for lo, hi, pfn in zip(run_lo.tolist(), run_hi.tolist(), p[run_lo].tolist()):
            memmove(base + pfn * PAGE_SIZE, src0 + lo * PAGE_SIZE, (hi - lo) * PAGE_SIZE)
