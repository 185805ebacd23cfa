"""Write tracking: every ``--wp`` backend behind one shape, and the choice between them.

Each backend module holds both halves of one mechanism: the guest-side tracker (what a guest
write goes through, :class:`~hintpipe.wp.base.WriteTracker`) and the host-side backend bound to
one :class:`~hintpipe.host.pagestate.HostPageState` (:class:`~hintpipe.wp.base.WpBackend`):
:mod:`~hintpipe.wp.sim` (simulated faults), :mod:`~hintpipe.wp.uffd_sync` (userfaultfd fault
messages), :mod:`~hintpipe.wp.uffd_async` (WP_ASYNC and PAGEMAP_SCAN), :mod:`~hintpipe.wp.shared`
(faults over the link from a guest process) and, in :mod:`~hintpipe.wp.base`, the tracker that
does nothing and the ``off`` backend. This module probes what the kernel offers
(:func:`probe`), resolves ``--wp`` (:func:`resolve_backend`) and builds backends
(:func:`make_backend`).

Real backends are built from what a host process receives from its guest: the uffd (over
SCM_RIGHTS, see :mod:`hintpipe.paired.handoff`), the guest's mapping address of its RAM, the page
count and, for ``uffd-async``, the guest's pid (PAGEMAP_SCAN reads ``/proc/PID/pagemap``).
Nothing here assumes the guest lives in this process.

Why hints applied late are safe with each backend (a hint describes a page as it was when the
guest walked it; the guest may write the page before the hint is applied):

* ``sim`` and ``uffd``: the fault is handled (``state.on_written``: skip cleared, ``written`` set)
  *before* the write lands, so a hint applied after the write finds ``written`` set and is refused
  (the refuse-written guard). The page stays unprotected for the rest of the round, so a later
  write to it faults no more: without the refusal its skip would outlive that write.
* ``uffd-async``: the kernel resolves the fault itself, so the page state learns of a write only
  at the next scan, and every scan re-protects what it reports. A hint applied between the write
  and that scan does set the skip bit; the scan then clears it (``on_written``, counted as
  ``scan_caught_pages``) and the page is in the next round's send set. A hint applied after a
  scan saw the write is refused (needed: the page may not be sent this round, and nothing will
  write it again). Safety rests on the full scan right before each round's swap, the final one
  taken with the guest paused: every write before it is in a send set still to come (the
  *scan-before-send* guard). The engine's other scans are not needed for safety: the scan of
  each chunk right before it is sent only sends a page written since its hint in this round as
  well as in the next (``tests/test_guards.py::test_uffd_async_needs_no_per_chunk_scans``), and
  the whole-guest scan at the end of a live round feeds the convergence check.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from hintpipe.choices import WP_CHOICES
from hintpipe.host.pagestate import HostPageState
from hintpipe.linux.pagemap import PagemapScanner
from hintpipe.linux.userfaultfd import (
    UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFD_FEATURE_WP_UNPOPULATED, UFFDIO_REGISTER_MODE_WP, WP_FEATURES_ASYNC, WP_FEATURES_SYNC,
    UffdUnavailable, Userfaultfd, allows_writeprotect, available_features, feature_names,
)
from hintpipe.units import PAGE_SIZE
from hintpipe.wp.base import WpBackend
from hintpipe.wp.sim import SimBackend
from hintpipe.wp.uffd_async import AsyncUffdBackend
from hintpipe.wp.uffd_sync import SyncUffdBackend

__all__ = ["WP_CHOICES", "REAL_BACKENDS", "AUTO_ORDER", "UffdUnavailable", "probe",
           "resolve_backend", "make_backend"]

REAL_BACKENDS = ("uffd", "uffd-async")
"""Backends that write-protect real memory in the kernel."""
AUTO_ORDER = ("uffd-async", "uffd")
"""What ``--wp auto`` tries, best first; ``sim`` when neither works."""


def probe(backend: str = "uffd") -> dict:
    """Check a backend end to end on a 1-page memfd; returns what was found.

    ``backend`` is "uffd" (sync WP faults) or "uffd-async" (WP_ASYNC + PAGEMAP_SCAN).
    Raises UffdUnavailable with one sentence naming what is missing.
    """
    if backend not in ("uffd", "uffd-async"):
        raise ValueError(f"unknown backend {backend!r}")
    want = WP_FEATURES_ASYNC if backend == "uffd-async" else WP_FEATURES_SYNC
    offered = available_features()
    missing = want & ~offered
    if missing & UFFD_FEATURE_PAGEFAULT_FLAG_WP:
        raise UffdUnavailable("the kernel's userfaultfd has no write-protect support "
                              "(UFFD_FEATURE_PAGEFAULT_FLAG_WP missing)")
    if missing & UFFD_FEATURE_WP_HUGETLBFS_SHMEM:
        raise UffdUnavailable("the kernel's userfaultfd cannot write-protect shmem/memfd "
                              "(UFFD_FEATURE_WP_HUGETLBFS_SHMEM missing, needs Linux 5.19+)")
    if missing & UFFD_FEATURE_WP_UNPOPULATED:
        raise UffdUnavailable("the kernel's userfaultfd lacks UFFD_FEATURE_WP_UNPOPULATED "
                              "(needs Linux 6.4+)")
    if missing & UFFD_FEATURE_WP_ASYNC:
        raise UffdUnavailable("the kernel's userfaultfd lacks asynchronous write-protect "
                              "(UFFD_FEATURE_WP_ASYNC missing, needs Linux 6.7+)")
    uffd = Userfaultfd.create(want)
    memfd = os.memfd_create("hintpipe-probe", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, PAGE_SIZE)
        m = mmap.mmap(memfd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            anchor = ctypes.c_char.from_buffer(m)
            addr = ctypes.addressof(anchor)
            del anchor
            m[0:1] = b"\1"
            try:
                ioctls = uffd.register(addr, PAGE_SIZE, UFFDIO_REGISTER_MODE_WP)
            except OSError as e:
                raise UffdUnavailable("UFFDIO_REGISTER in write-protect mode on a memfd "
                                      f"mapping failed ({os.strerror(e.errno)})") from e
            if not allows_writeprotect(ioctls):
                raise UffdUnavailable("UFFDIO_WRITEPROTECT is not allowed on memfd mappings")
            uffd.writeprotect(addr, PAGE_SIZE, True)
            uffd.writeprotect(addr, PAGE_SIZE, False)
            pagemap_scan = False
            if backend == "uffd-async":
                try:
                    with PagemapScanner(os.getpid()) as sc:
                        sc.written_ranges(addr, 1)          # arming pass
                        m[0:1] = b"\2"                       # resolved by the kernel
                        starts, _ = sc.written_ranges(addr, 1)
                except OSError as e:
                    raise UffdUnavailable("the PAGEMAP_SCAN ioctl on /proc/PID/pagemap failed "
                                          f"({os.strerror(e.errno)}; needs Linux 6.7+)") from e
                if len(starts) != 1:
                    raise UffdUnavailable("PAGEMAP_SCAN did not report a page written under "
                                          "WP_ASYNC")
                pagemap_scan = True
            uffd.unregister(addr, PAGE_SIZE)
        finally:
            m.close()
    finally:
        os.close(memfd)
        uffd.close()
    return {
        "backend": backend,
        "features": offered,
        "feature_names": feature_names(offered),
        "requested": want,
        "user_mode_only": uffd.user_mode_only,
        "register_ioctls": ioctls,
        "pagemap_scan": pagemap_scan,
    }


def resolve_backend(requested: str, memory: str = "real") -> str:
    """The backend to use for ``--wp requested`` with ``--memory memory``.

    ``auto`` picks the first of :data:`AUTO_ORDER` whose :func:`probe`
    succeeds (real memory only), else ``sim``. A real backend asked for by name is probed and
    :class:`UffdUnavailable` propagates (never a silent fallback). Raises ValueError for a real
    backend without real memory.
    """
    if requested not in WP_CHOICES:
        raise ValueError(f"unknown write-protect backend {requested!r} (one of {', '.join(WP_CHOICES)})")
    if requested in ("sim", "off"):
        return requested
    if requested == "auto":
        if memory != "real":
            return "sim"
        for name in AUTO_ORDER:
            try:
                probe(name)
                return name
            except UffdUnavailable:
                continue
        return "sim"
    if memory != "real":
        raise ValueError(f"--wp {requested} write-protects real memory: use it with --memory real")
    try:
        probe(requested)
    except UffdUnavailable as e:
        raise UffdUnavailable(f"--wp {requested} is unavailable: {e.reason}") from e
    return requested


def make_backend(name: str, state: HostPageState, *, ram_addr: int | None = None,
                 page_count: int | None = None, uffd_fd: int | None = None,
                 pid: int | None = None, scan_before_send: bool = True, unit_pages: int = 1) -> WpBackend:
    """Build the backend ``name`` (already resolved: not ``auto``) for ``state``.

    Real backends need ``ram_addr`` (the guest's mapping address), ``page_count`` and
    ``uffd_fd``; ``uffd-async`` also the guest's ``pid``. ``scan_before_send=False`` turns the
    uffd-async round-start scan off (a demonstration; the other backends do not scan).
    ``unit_pages``: guest pages per backing page of the guest's memfd (512 on hugetlb), the
    granularity real backends protect and scan at.
    """
    if name == "sim":
        return SimBackend(state)
    if name == "off":
        return WpBackend(state)
    if name not in REAL_BACKENDS:
        raise ValueError(f"unknown or unresolved write-protect backend {name!r}")
    if ram_addr is None or uffd_fd is None:
        raise ValueError(f"--wp {name} needs the guest's uffd and RAM address")
    n = state.page_count if page_count is None else page_count
    if name == "uffd":
        return SyncUffdBackend(state, ram_addr, n, uffd_fd, unit_pages=unit_pages)
    if pid is None:
        raise ValueError("--wp uffd-async needs the guest's pid (for /proc/PID/pagemap)")
    return AsyncUffdBackend(state, ram_addr, n, uffd_fd, pid, scan_before_send=scan_before_send,
                            unit_pages=unit_pages)
