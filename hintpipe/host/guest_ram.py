"""Guest RAM as a real memfd shared between the guest and host processes.

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
import mmap
import os

import numpy as np

from hintpipe.units import PAGE_SIZE

__all__ = ["GuestRam", "page_pattern", "WORDS_PER_PAGE"]

WORDS_PER_PAGE = PAGE_SIZE // 8
_CHUNK_PAGES = 2048  # 8 MiB scratch per step: bounded memory, stays in L2/L3-ish sizes
_RAMP = (np.arange(WORDS_PER_PAGE, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
_MIX_P = np.uint64(0xBF58476D1CE4E5B9)
_MIX_V = np.uint64(0x94D049BB133111EB)


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
    its own).  Attributes: ``fd``, ``addr`` (virtual address of this mapping, for
    UFFDIO_REGISTER / PAGEMAP_SCAN in *this* process), ``pages`` (uint8 view
    (page_count, 4096)) and ``words`` (uint64 view (page_count, 512)).
    """

    def __init__(self, page_count: int, *, fd: int | None = None, name: str = "hintpipe-guest-ram"):
        if page_count <= 0:
            raise ValueError("page_count must be positive")
        self.page_count = page_count
        self.size = page_count * PAGE_SIZE
        if fd is None:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.size)
        else:
            if os.fstat(fd).st_size < self.size:
                raise ValueError(f"memfd is smaller than {page_count} pages")
            self.fd = os.dup(fd)
        self._mmap = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(self._mmap)
        self.addr = ctypes.addressof(anchor)
        del anchor  # release the buffer export at once so close() can unmap
        self.pages = np.frombuffer(self._mmap, dtype=np.uint8).reshape(page_count, PAGE_SIZE)
        self.words = self.pages.view(np.uint64).reshape(page_count, WORDS_PER_PAGE)

    def page_addr(self, pfn: int) -> int:
        """Virtual address of page ``pfn`` in this mapping."""
        return self.addr + pfn * PAGE_SIZE

    def touch(self) -> None:
        """Populate the whole memfd (first touch of fresh memory is slow; do it once)."""
        self.words[:, 0] = 0  # one write per page allocates it in the page cache

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
        buf = np.empty((min(len(pfns), _CHUNK_PAGES), WORDS_PER_PAGE), dtype=np.uint64)
        for i in range(0, len(pfns), _CHUNK_PAGES):  # loop per 8 MiB chunk, not per page
            p, v = pfns[i:i + _CHUNK_PAGES], versions[i:i + _CHUNK_PAGES]
            if len(p) and p[-1] - p[0] == len(p) - 1 and np.all(np.diff(p) == 1):
                page_pattern(p, v, out=self.words[p[0]:p[-1] + 1])  # contiguous: in place
            else:
                self.words[p] = page_pattern(p, v, out=buf[:len(p)])

    def write_pages_nogil(self, pfns: np.ndarray, versions: np.ndarray | int) -> None:
        """Like :meth:`write_pages` but never holding the GIL while a store can fault
        (see :func:`hintpipe.realmem.write_pages_nogil`, which does the work)."""
        from hintpipe.realmem import write_pages_nogil  # realmem builds on this module

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
    buf = np.empty((min(len(pfns), _CHUNK_PAGES), WORDS_PER_PAGE), dtype=np.uint64)
    for i in range(0, len(pfns), _CHUNK_PAGES):
        p, v = pfns[i:i + _CHUNK_PAGES], versions[i:i + _CHUNK_PAGES]
        exp = page_pattern(p, v, out=buf[:len(p)])
        ok[i:i + len(p)] = (words[p] == exp).all(axis=1)
    return ok
