"""What backs guest RAM on the host, and how to give it back: memfd kinds, huge pages, punching holes.

Three backings of a guest's memfd (``--backing``):

* ``shmem``: an ordinary memfd, 4 KiB pages;
* ``hugetlb``: a hugetlbfs memfd (``MFD_HUGETLB | MFD_HUGE_2MB``), 2 MiB pages taken from the
  pool ``/proc/sys/vm/nr_hugepages`` reserves; userfaultfd write-protect, PAGEMAP_SCAN and
  ``fallocate`` all act on whole 2 MiB pages there (a 4 KiB punch inside one frees nothing and
  zeroes those 4 KiB in place, bypassing write-protect: never do it);
* ``thp``: shmem whose mappings are advised ``MADV_HUGEPAGE``, which only gives huge pages when
  ``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` allows it (:func:`thp_unavailable`);
  while uffd-wp is armed the kernel maps it in 4 KiB pages, so it reclaims like ``shmem``.

:func:`punch_runs` discards runs of a memfd (``fallocate(PUNCH_HOLE | KEEP_SIZE)``): the pages
leave the page cache (or go back to the hugetlb pool) at once and every mapping of them is
zapped; a later read sees zeros. :func:`resident_bytes` is the memfd's size as the kernel counts
it (``st_blocks * 512``): exact, immediate, whoever maps it, for all three backings.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from typing import Iterator

import numpy as np

from hintpipe.units import PAGE_SHIFT, PAGE_SIZE

__all__ = ["BACKING_PAGE_SIZE", "backing_unit", "backing_of", "memfd_flags", "advise_mapping", "thp_unavailable",
           "punch_runs", "resident_bytes", "hugetlb_pool", "huge_pages_needed", "reserve_huge_pages",
           "NR_HUGEPAGES", "THP_SHMEM_ENABLED"]

HUGE_PAGE_SIZE = 2 << 20
BACKING_PAGE_SIZE = {"shmem": PAGE_SIZE, "hugetlb": HUGE_PAGE_SIZE, "thp": PAGE_SIZE}
"""Bytes per backing page: the granularity of write-protect, scans and discards."""
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
THP_SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"

_MFD_HUGETLB = 0x0004
_MFD_HUGE_2MB = 21 << 26
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_MADV_HUGEPAGE = 14
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


def backing_unit(backing: str) -> int:
    """4 KiB guest pages per backing page (1 for shmem and thp, 512 for hugetlb)."""
    try:
        return BACKING_PAGE_SIZE[backing] >> PAGE_SHIFT
    except KeyError:
        raise ValueError(f"unknown backing {backing!r} (shmem, hugetlb or thp)") from None


def backing_of(fd: int) -> str:
    """The backing of an existing memfd (``hugetlb`` when its block size is a huge page, else
    ``shmem``: a ``thp`` memfd is shmem, its huge pages are a property of the mappings)."""
    return "hugetlb" if os.fstat(fd).st_blksize == HUGE_PAGE_SIZE else "shmem"


def memfd_flags(backing: str) -> int:
    """Extra ``memfd_create`` flags of a backing."""
    backing_unit(backing)
    return _MFD_HUGETLB | _MFD_HUGE_2MB if backing == "hugetlb" else 0


def advise_mapping(m: mmap.mmap, backing: str) -> None:
    """``thp``: ask for huge pages on this mapping (the kernel may still say no, see
    :func:`thp_unavailable`); nothing for the other backings."""
    if backing == "thp":
        m.madvise(getattr(mmap, "MADV_HUGEPAGE", _MADV_HUGEPAGE))


def thp_unavailable(path: str = THP_SHMEM_ENABLED) -> str | None:
    """Why ``--backing thp`` cannot work here (one sentence), or None when the kernel allows it."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return f"--backing thp needs transparent huge pages for shmem, and this kernel has no {path}"
    mode = text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()
    if mode in ("never", "deny"):
        return (f"--backing thp needs shmem transparent huge pages, which {path} turns off here "
                f"('{mode}'): an administrator can allow them with `echo advise > {path}`, "
                "or use --backing hugetlb")
    return None


def punch_runs(fd: int, starts: np.ndarray, counts: np.ndarray) -> int:
    """Discard the runs ``[starts[i], starts[i] + counts[i])`` of 4 KiB pages of memfd ``fd``
    (one ``fallocate`` per run: merge adjacent pages into runs first); return the calls made.

    On hugetlb every run must be whole 2 MiB pages (the caller's job). Raises OSError.
    """
    fallocate = _libc.fallocate
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    n = 0
    for s, c in zip((np.asarray(starts, dtype=np.int64) << PAGE_SHIFT).tolist(),
                    (np.asarray(counts, dtype=np.int64) << PAGE_SHIFT).tolist()):
        if fallocate(fd, mode, s, c) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"fallocate(PUNCH_HOLE) at {s:#x}+{c:#x}: {os.strerror(e)}")
        n += 1
    return n


def resident_bytes(fd: int) -> int:
    """Bytes of memory the memfd holds now (``st_blocks * 512``): what the host pays for it."""
    return os.fstat(fd).st_blocks * 512


def hugetlb_pool(meminfo: str = "/proc/meminfo") -> dict:
    """The 2 MiB huge page pool: ``total``, ``free``, ``reserved`` (promised to mappings),
    ``surplus`` and ``available`` (free and not promised: what a new guest can have)."""
    vals = {}
    with open(meminfo) as f:
        for line in f:
            if line.startswith("HugePages_"):
                k, v = line.split(":", 1)
                vals[k[len("HugePages_"):].lower()] = int(v.split()[0])
    total, free, rsvd = vals.get("total", 0), vals.get("free", 0), vals.get("rsvd", 0)
    return {"total": total, "free": free, "reserved": rsvd, "surplus": vals.get("surp", 0),
            "available": max(0, free - rsvd)}


def huge_pages_needed(guest_bytes: int) -> int:
    """2 MiB huge pages a hugetlb guest of ``guest_bytes`` uses when all of it is touched."""
    return -(-guest_bytes // HUGE_PAGE_SIZE)


@contextlib.contextmanager
def reserve_huge_pages(extra: int, path: str = NR_HUGEPAGES) -> Iterator[int]:
    """Raise ``nr_hugepages`` by ``extra`` for the block and always put the old value back; yields
    the old value. Raises PermissionError (not root) or OSError (the kernel found fewer pages:
    the value is put back at once)."""
    with open(path) as f:
        old = int(f.read())
    try:
        with open(path, "w") as f:
            f.write(str(old + extra))
        with open(path) as f:
            got = int(f.read())
        if got < old + extra:
            raise OSError(f"the kernel found only {got - old} of {extra} huge pages "
                          "(memory too fragmented or too little free)")
        yield old
    finally:
        with open(path, "w") as f:
            f.write(str(old))
