"""Synchronous userfaultfd write-protect: every first write to a protected page is a fault message.

:class:`UffdSyncTracker` handles the messages on a dedicated OS thread: it calls
``on_fault(pfns)`` *before* lifting the protection (so the write that follows is covered by the
dirty mark) and then clears WP, which wakes the writer. :class:`SyncUffdBackend` binds it to a
host page state.

Who does what: the *guest* process creates the memfd and the uffd (the uffd is tied to the
creator's mm), does the UFFDIO_API handshake and UFFDIO_REGISTER on its own mapping, and sends
both fds plus its mapping address and pid to the host (:mod:`hintpipe.paired.handoff`). The host
builds a tracker from those. The host keeps its uffd copy open: closing the last reference to a
uffd unregisters the range.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import threading
from typing import Callable, TypeVar

import numpy as np

from hintpipe.host.pagestate import HostPageState
from hintpipe.linux.userfaultfd import (
    UFFD_EVENT_PAGEFAULT, UFFD_MSG_SIZE, UFFD_PAGEFAULT_FLAG_WP, UFFDIO_WRITEPROTECT,
    UffdioWriteprotect, parse_messages,
)
from hintpipe.linux.ioctl import ioctl
from hintpipe.units import PAGE_SHIFT, PAGE_SIZE, page_runs
from hintpipe.wp.base import UffdRange, WpBackend

__all__ = ["UffdSyncTracker", "SyncUffdBackend"]

T = TypeVar("T")
_READ_BATCH = 256  # messages per read(2): 8 KiB
_SMALL_BATCH = 16  # up to this many messages: plain-Python decode and per-page release
_FLAGS_ADDR = struct.Struct("<QQ")  # uffd_msg.arg.pagefault.{flags, address} at offset 8


class UffdSyncTracker(UffdRange):
    """Synchronous WP: fault messages handled by a dedicated OS thread.

    ``on_fault(pfns)`` receives an int64 array of guest pfns (one read(2) batch;
    may contain duplicates if several threads hit one page).  It runs in the
    handler thread: it must be thread-safe and quick, and must never wait on
    anything that could be waiting on a guest writer.

    Round boundaries: the handler marks (``on_fault``) and then lifts WP; both
    happen under ``round_lock``.  The engine must start a round with
    :meth:`new_round`, which takes the dirty snapshot and re-protects under the
    same lock.  Otherwise a fault marked in round N but released after the
    round N+1 protect_all leaves its page unprotected in round N+1 while the
    write is still pending, and a round N+1 copy taken before the write lands
    would lose it.

    Why a thread and not a trio task: the faulting writer is a thread blocked
    *in the kernel* until we clear WP.  If the handler ran on the host's trio
    loop, anything that blocks that loop (a synchronous call, a full channel,
    an await on the guest, which is itself stuck on the fault) would stall the
    handler, and the guest would never wake: a deadlock.  The handler thread
    only touches the uffd and the callback, and it releases the GIL while it
    sleeps in poll(2) and in each ioctl, so it makes progress whatever the
    event loop is doing.  Writers in the *same* process must not hold the GIL
    while they fault (numpy copies and ctypes.memmove release it; pure-Python
    stores into a memoryview do not).
    """

    def __init__(self, ram_addr: int, page_count: int, uffd_fd: int,
                 on_fault: Callable[[np.ndarray], None], *, start: bool = True, unit_pages: int = 1):
        super().__init__(ram_addr, page_count, uffd_fd)
        self.on_fault = on_fault
        # pages per backing page (512 on hugetlb, where WP can only be cleared per 2 MiB)
        self.unit_pages = unit_pages
        self.unprotect_calls = 0
        self.foreign_faults = 0   # faults outside [ram_addr, end): released, not reported
        self.error: BaseException | None = None           # handler-side OS error (thread stops)
        self.callback_error: BaseException | None = None  # first exception from on_fault
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.round_lock = threading.RLock()  # mark+release vs snapshot+protect_all
        self._wp_arg = UffdioWriteprotect()  # reused by the handler thread only
        self._thread = threading.Thread(target=self._run, name="uffd-wp-handler", daemon=True)
        self._closed = False
        if start:
            self.start()

    def start(self) -> None:
        """Start the handler thread (done by the constructor unless start=False)."""
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.uffd_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake_r in events:
                return
            if events.get(self.uffd_fd, 0) & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                self.error = OSError(errno.EBADF, "userfaultfd closed under the handler")
                return
            try:
                data = os.read(self.uffd_fd, UFFD_MSG_SIZE * _READ_BATCH)
            except BlockingIOError:
                continue  # another reader took it, or a spurious wakeup
            except OSError as e:
                self.error = e
                return
            # Small batches (the common case: each blocked writer sends one
            # message) are decoded in plain Python: numpy's per-call overhead
            # would dominate the ~20 us a fault costs otherwise.
            if len(data) <= UFFD_MSG_SIZE * _SMALL_BATCH:
                pfns, foreign = self._decode_small(data)
            else:
                pfns, foreign = self._decode_numpy(data)
            with self.round_lock:
                try:
                    if pfns:
                        self.on_fault(np.array(pfns, dtype=np.int64))
                except BaseException as e:  # keep serving: a stuck writer is worse
                    if self.callback_error is None:
                        self.callback_error = e
                finally:
                    # Mark first (above), then unprotect: the write that proceeds
                    # is already covered by the mark.  Clearing WP wakes the writer.
                    self.faults += len(pfns)
                    self.foreign_faults += len(foreign)
                    try:
                        self._release(pfns, foreign)
                    except OSError as e:  # mm gone (guest exited) or fd closed
                        self.error = e
                        return

    def protect_all(self) -> None:
        """Write-protect all guest RAM (under ``round_lock``; prefer :meth:`new_round`)."""
        with self.round_lock:
            super().protect_all()

    def new_round(self, snapshot: Callable[[], T] | None = None) -> T | None:
        """Start a round atomically with respect to fault handling.

        Under ``round_lock``: call ``snapshot()`` (take and clear the dirty set
        that ``on_fault`` fills), then write-protect everything.  Returns what
        ``snapshot`` returned.  Then copy the snapshot's pages: a write that
        lands after this call faults again and is marked for the next round.
        Blocks the caller for at most one handler batch (microseconds).
        """
        with self.round_lock:
            result = snapshot() if snapshot is not None else None
            super().protect_all()
            return result

    def _decode_small(self, data: bytes) -> tuple[list[int], list[int]]:
        lo, hi = self.ram_addr, self.ram_addr + self.page_count * PAGE_SIZE
        pfns: list[int] = []
        foreign: list[int] = []
        for off in range(0, len(data) - UFFD_MSG_SIZE + 1, UFFD_MSG_SIZE):
            flags, addr = _FLAGS_ADDR.unpack_from(data, off + 8)
            if data[off] != UFFD_EVENT_PAGEFAULT or not flags & UFFD_PAGEFAULT_FLAG_WP:
                continue
            if lo <= addr < hi:
                pfns.append((addr - lo) >> PAGE_SHIFT)
            else:
                foreign.append(addr & ~(PAGE_SIZE - 1))
        return pfns, foreign

    def _decode_numpy(self, data: bytes) -> tuple[list[int], list[int]]:
        lo, hi = self.ram_addr, self.ram_addr + self.page_count * PAGE_SIZE
        msgs = parse_messages(data)
        wp = msgs[(msgs["event"] == UFFD_EVENT_PAGEFAULT)
                  & (msgs["flags"] & UFFD_PAGEFAULT_FLAG_WP != 0)]
        addr = wp["address"].astype(np.int64)
        inside = (addr >= lo) & (addr < hi)
        return (((addr[inside] - lo) >> PAGE_SHIFT).tolist(),
                (addr[~inside] & ~np.int64(PAGE_SIZE - 1)).tolist())

    def _release(self, pfns: list[int], foreign: list[int]) -> None:
        """Clear WP (and wake) page by page; contiguous runs share one ioctl."""
        if self.unit_pages > 1:  # whole backing pages: a part of one is EINVAL
            u = self.unit_pages
            starts, counts = page_runs(np.array(pfns, dtype=np.int64) // u)
            runs = zip((starts * u).tolist(), (counts * u).tolist())
        elif len(pfns) > _SMALL_BATCH:
            starts, counts = page_runs(np.array(pfns, dtype=np.int64))
            runs = zip(starts.tolist(), counts.tolist())
        else:
            runs = ((p, 1) for p in sorted(set(pfns)))
        arg = self._wp_arg
        for s, c in runs:
            arg.range.start, arg.range.len = self.ram_addr + s * PAGE_SIZE, c * PAGE_SIZE
            self._clear_wp(arg)
        for a in sorted(set(foreign)):
            arg.range.start, arg.range.len = a, PAGE_SIZE
            self._clear_wp(arg)

    def _clear_wp(self, arg: UffdioWriteprotect) -> None:
        arg.mode = 0
        while True:
            try:
                ioctl(self.uffd_fd, UFFDIO_WRITEPROTECT, arg)
                break
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    raise
        self.unprotect_calls += 1

    def close(self, *, unprotect: bool = True) -> None:
        """Stop the handler thread; by default lift all protection first so no writer stays blocked.

        Re-raises an exception the ``on_fault`` callback raised, if any.
        """
        if self._closed:
            return
        self._closed = True
        if unprotect:
            try:
                self.unprotect_all()
            except OSError:
                pass  # the guest's mm may be gone already
        if self._thread.is_alive():
            os.write(self._wake_w, b"x")
            self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.callback_error is not None:
            raise self.callback_error

    def stats(self) -> dict:
        """Counters for the JSON report."""
        return {**super().stats(), "unprotect_calls": self.unprotect_calls,
                "foreign_faults": self.foreign_faults}

    def __enter__(self) -> "UffdSyncTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SyncUffdBackend(WpBackend):
    """Synchronous userfaultfd WP: a handler thread turns each fault into ``state.on_written``.

    ``uffd_fd``: a uffd whose handshake (WP_FEATURES_SYNC) and MODE_WP registration of the guest
    RAM mapping at ``ram_addr`` the *guest* process did; here it may be a copy received over
    SCM_RIGHTS. The handler thread marks the page (skip cleared, dirty for the next round) before
    it lifts the protection and wakes the writer.

    No deadlock: the handler thread waits only on the kernel (poll/read/ioctl), on ``round_lock``
    (held by :meth:`start_round` for a snapshot swap and a protect ioctl, neither of which waits on
    a guest write) and on ``state.lock`` (held only for array updates). It also needs the GIL:
    when the writer is a thread of this process (the in-process demo), it must fault with the GIL
    released, which :func:`hintpipe.linux.memfd.write_pages_nogil` guarantees by copying through
    ``ctypes.memmove``; the trio loop itself never waits on the handler except for the bounded
    ``round_lock`` hold.
    """

    name = "uffd"

    def __init__(self, state: HostPageState, ram_addr: int, page_count: int, uffd_fd: int, *,
                 unit_pages: int = 1) -> None:
        super().__init__(state)
        if page_count != state.page_count:
            raise ValueError("guest RAM and page state disagree on the page count")
        self.tracker = UffdSyncTracker(ram_addr, page_count, uffd_fd, state.on_written, unit_pages=unit_pages)

    def _check(self) -> None:
        t = self.tracker
        if t.error is not None:
            raise RuntimeError(f"userfaultfd handler stopped: {t.error}") from t.error
        if t.callback_error is not None:
            raise RuntimeError(f"fault callback failed: {t.callback_error}") from t.callback_error

    def start_round(self, index: int) -> None:
        """Swap the page state and re-protect everything under the tracker's ``round_lock``."""
        self._check()
        self.rounds += 1
        self.tracker.new_round(self.state.begin_first_round if index == 0 else self.state.begin_round)

    def stats(self) -> dict:
        """Fault messages handled and protect ioctls."""
        s = self.tracker.stats()
        return {"backend": self.name, "faults": s["faults"], "protect_calls": s["protect_calls"],
                "unprotect_calls": s["unprotect_calls"]}

    def close(self) -> None:
        """Lift all protection (no writer stays blocked) and stop the handler thread."""
        self.tracker.close()
