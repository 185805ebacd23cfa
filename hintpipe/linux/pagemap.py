"""PAGEMAP_SCAN ioctl on /proc/PID/pagemap (Linux 6.7+), via ctypes.

Layouts follow include/uapi/linux/fs.h; semantics fs/proc/task_mmu.c:
the kernel walks ``[start, end)``, writes ``struct page_region`` entries
(``start``/``end`` addresses, ``categories`` masked by ``return_mask``) for
pages whose categories match, merging adjacent pages with equal categories,
and returns the number of entries.  When the output vector is full it stops
and sets ``walk_end`` to where it stopped (``walk_end == end`` means done);
with PM_SCAN_WP_MATCHING only the pages it reported are re-protected, so
resuming from ``walk_end`` loses nothing.

The first WP_MATCHING scan of a freshly registered range reports every page
as written (nothing carries the WP bit yet): that is the arming pass.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from hintpipe.units import PAGE_SIZE

from hintpipe.linux.ioctl import IOC_READ, IOC_WRITE, ioc, ioctl

__all__ = [
    "PmScanArg", "PageRegion", "PAGEMAP_SCAN", "PagemapScanner",
    "PM_SCAN_WP_MATCHING", "PM_SCAN_CHECK_WPASYNC", "PAGE_IS_WPALLOWED", "PAGE_IS_WRITTEN",
    "PAGE_IS_FILE", "PAGE_IS_PRESENT", "PAGE_IS_SWAPPED", "PAGE_IS_PFNZERO",
    "PAGE_IS_HUGE", "PAGE_IS_SOFT_DIRTY",
]

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7

PM_SCAN_WP_MATCHING = 1 << 0    # write-protect the pages reported
PM_SCAN_CHECK_WPASYNC = 1 << 1  # fail (EPERM) on a VMA without async uffd-wp


class PageRegion(ctypes.Structure):
    """struct page_region (24 bytes): [start, end) addresses and categories."""
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


class PmScanArg(ctypes.Structure):
    """struct pm_scan_arg (96 bytes)."""
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


PAGEMAP_SCAN = ioc(IOC_READ | IOC_WRITE, ord("f"), 16, ctypes.sizeof(PmScanArg))

PAGE_REGION_DTYPE = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])
assert PAGE_REGION_DTYPE.itemsize == ctypes.sizeof(PageRegion)

DEFAULT_VEC_LEN = 4096  # 96 KiB of output; longer scans resume from walk_end


class PagemapScanner:
    """An open /proc/PID/pagemap with a reusable PAGEMAP_SCAN output vector.

    ``pid`` may be another process (needs ptrace-read permission on it, e.g.
    root or the same uid with a permissive yama scope).  The mm is the one of
    the process at open time.
    """

    def __init__(self, pid: int | None = None, *, vec_len: int = DEFAULT_VEC_LEN):
        self.pid = os.getpid() if pid is None else pid
        self.fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._vec = np.zeros(vec_len, dtype=PAGE_REGION_DTYPE)
        self._arg = PmScanArg()
        self.ioctl_calls = 0

    def scan(self, start: int, end: int, *, flags: int = 0, category_mask: int = 0,
             category_anyof_mask: int = 0, category_inverted: int = 0,
             return_mask: int = 0, max_pages: int = 0) -> np.ndarray:
        """All matching regions of ``[start, end)`` as a PAGE_REGION_DTYPE array.

        Loops on ``walk_end`` when the output vector fills up.  Raises OSError
        from the kernel (EPERM with PM_SCAN_CHECK_WPASYNC on a range without
        async WP; EINVAL for bad arguments).
        """
        if start % PAGE_SIZE or end % PAGE_SIZE or end < start:
            raise ValueError("scan range must be page aligned with start <= end")
        a, vec = self._arg, self._vec
        out: list[np.ndarray] = []
        pos = start
        while pos < end:
            a.size = ctypes.sizeof(PmScanArg)
            a.flags = flags
            a.start, a.end, a.walk_end = pos, end, 0
            a.vec, a.vec_len = vec.ctypes.data, len(vec)
            a.max_pages = max_pages
            a.category_inverted = category_inverted
            a.category_mask = category_mask
            a.category_anyof_mask = category_anyof_mask
            a.return_mask = return_mask
            n = ioctl(self.fd, PAGEMAP_SCAN, a)
            self.ioctl_calls += 1
            if n:
                out.append(vec[:n].copy())
            if a.walk_end <= pos:  # no progress: avoid spinning on a kernel surprise
                raise OSError(0, f"PAGEMAP_SCAN made no progress at {pos:#x}")
            pos = a.walk_end
            if max_pages:
                break  # the caller asked for a bounded answer
        if not out:
            return np.empty(0, dtype=PAGE_REGION_DTYPE)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def written_ranges(self, base: int, page_count: int, *, protect: bool = True,
                       check_wpasync: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Written pages of ``[base, base+page_count*4096)`` as (start_pfn, npages) int64 arrays.

        pfns are relative to ``base``.  With ``protect`` (PM_SCAN_WP_MATCHING) the
        reported pages are write-protected again in the same call, atomically with
        respect to the guest's writes.  ``check_wpasync`` makes the kernel fail
        with EPERM instead of silently reporting nothing useful when the range is
        not registered for async WP.
        """
        flags = (PM_SCAN_WP_MATCHING if protect else 0) | \
                (PM_SCAN_CHECK_WPASYNC if check_wpasync else 0)
        regs = self.scan(base, base + page_count * PAGE_SIZE, flags=flags,
                         category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)
        starts = (regs["start"].astype(np.int64) - base) // PAGE_SIZE
        counts = (regs["end"].astype(np.int64) - regs["start"].astype(np.int64)) // PAGE_SIZE
        return starts, counts

    def close(self) -> None:
        """Close the pagemap fd (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PagemapScanner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
