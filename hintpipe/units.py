"""Page units and page arithmetic shared by the guest, the host, the traces and the kernel bindings.

A guest page is a 4 KiB x86-64 base page; a *block* of order ``k`` is ``2**k`` naturally aligned
pages (the buddy allocator's unit, ``MAX_ORDER`` as Linux's ``MAX_PAGE_ORDER`` on x86-64); a *run*
is ``count`` consecutive pages from ``start`` (a hinted range on the wire, a region PAGEMAP_SCAN
reports, a stretch of pages written together). Everything that turns blocks or runs into pages, or
pages back into runs, goes through the functions here, vectorised (no Python loop per block).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

PAGE_SHIFT = 12
"""log2 of the page size."""
PAGE_SIZE = 1 << PAGE_SHIFT
"""Bytes per guest page (x86-64 base pages); a pfn numbers 4 KiB pages."""
MAX_ORDER = 10
"""Largest buddy block order (Linux ``MAX_PAGE_ORDER`` on x86-64: 4 MiB blocks)."""
NR_ORDERS = MAX_ORDER + 1
"""Block orders 0..MAX_ORDER."""
MAX_PAGE_COUNT = 1 << 40
"""Largest guest size in pages (4 PiB): keeps every start + npages far below 2**64."""


def order_pages(orders: int | ArrayLike) -> int | np.ndarray:
    """Pages in blocks of ``orders`` (``2**order``): an int for an int, an int64 array otherwise."""
    if isinstance(orders, (int, np.integer)):
        return 1 << int(orders)
    return np.left_shift(np.int64(1), np.asarray(orders, dtype=np.int64))


def pages_order(npages: int | ArrayLike) -> int | np.ndarray:
    """Order of blocks of ``npages`` pages (each a power of two): ``log2(npages)``.

    An int for an int, a uint8 array otherwise (``popcount(npages - 1)``, exact for powers of two).
    """
    if isinstance(npages, (int, np.integer)):
        return int(npages).bit_length() - 1
    return np.bitwise_count(np.asarray(npages, dtype=np.uint64) - np.uint64(1))


def run_pages(starts: ArrayLike, counts: ArrayLike, *,
              return_index: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Every page of the runs ``[starts[i], starts[i] + counts[i])``, in run order, as int64.

    With ``return_index`` also returns, for each page, the index of the run it came from. This is
    the one expansion of blocks (``counts = order_pages(orders)``) and ranges into pages.
    """
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    total = int(counts.sum())
    if total == len(counts) and not (counts - 1).any():  # every run one page: nothing to expand
        pages = starts.copy()
        return (pages, np.arange(total)) if return_index else pages
    first = np.cumsum(counts) - counts  # position of each run's first page in the output
    pages = np.repeat(starts - first, counts) + np.arange(total, dtype=np.int64)
    if return_index:
        return pages, np.repeat(np.arange(len(counts)), counts)
    return pages


def block_pages(pfns: ArrayLike, orders: ArrayLike) -> np.ndarray:
    """Every page of the blocks ``(pfns[i], orders[i])``, in block order, as int64."""
    return run_pages(pfns, order_pages(orders))


def distinct(pfns: ArrayLike) -> np.ndarray:
    """``pfns`` as a strictly ascending int64 array: sorted and repeats dropped, unless they are
    already (one comparison pass). ``np.unique`` is not used: on numpy 2.4 it is tens of times
    slower than a sort for integer arrays."""
    p = np.asarray(pfns, dtype=np.int64).ravel()
    if len(p) > 1 and not (p[1:] > p[:-1]).all():
        p = np.sort(p)
        new = p[1:] != p[:-1]
        if not new.all():
            p = p[np.concatenate(([True], new))]
    return p


def page_runs(pfns: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Pages -> ``(starts, counts)`` of their maximal runs (sorted; duplicates merged)."""
    pfns = distinct(pfns)
    if not len(pfns):
        return pfns, pfns
    brk = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = pfns[np.concatenate(([0], brk))]
    ends = pfns[np.concatenate((brk - 1, [len(pfns) - 1]))]
    return starts, ends - starts + 1


def align_up(n: int, alignment: int = PAGE_SIZE) -> int:
    """``n`` rounded up to a multiple of ``alignment`` (a power of two)."""
    return (n + alignment - 1) & ~(alignment - 1)
