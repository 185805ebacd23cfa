"""Synchronous userfaultfd write-protect: every first write to a protected page is a fault message.

:class:`UffdSyncTracker` handles the messages on a dedicated OS thread that does nothing else: it
records each written page (``on_fault(pfns)``) *before* lifting the protection (so the write that
follows is covered by the record) and then clears WP, which wakes the writer. Every message a
read(2) returns is resolved; pages of one batch that are contiguous share one unprotect ioctl.
:class:`SyncUffdBackend` binds it to a host page state.

Who does what: the *guest* process creates the memfd and the uffd (the uffd is tied to the
creator's mm), does the UFFDIO_API handshake and UFFDIO_REGISTER on its own mapping, and sends
both fds plus its mapping address and pid to the host (:mod:`hintpipe.paired.handoff`). The host
builds a tracker from those. The host keeps its uffd copy open: closing the last reference to a
uffd unregisters the range.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
import threading
import time
from typing import Callable, TypeVar

import numpy as np

from hintpipe.host.pagestate import HostPageState
from hintpipe.linux.userfaultfd import (
    UFFD_EVENT_PAGEFAULT, UFFD_MSG_SIZE, UFFD_PAGEFAULT_FLAG_WP, UFFDIO_WRITEPROTECT,
    UFFDIO_WRITEPROTECT_MODE_WP, UffdioRange, UffdioWriteprotect, parse_messages, writeprotect_fd,
)
from hintpipe.units import PAGE_SHIFT, PAGE_SIZE, page_runs
from hintpipe.wp.base import WpBackend

__all__ = ["UffdSyncTracker", "SyncUffdBackend", "DEFAULT_SPIN_US", "DEFAULT_SWITCH_INTERVAL"]

T = TypeVar("T")
DEFAULT_SPIN_US = 50.0            # busy-poll this long after the last message before sleeping
DEFAULT_SWITCH_INTERVAL = 50e-6   # GIL switch interval while a handler runs
_READ_BATCH = 256                 # messages per read(2): 8 KiB
_SMALL = 32                       # up to this many messages: struct decode; above: numpy
_MSG = struct.Struct("<B7xQQ8x")  # uffd_msg: event u8 @0, pagefault.flags u64 @8, .address @16
_POLLIN = 0x001
_POLL_BAD = 0x008 | 0x010 | 0x020  # POLLERR | POLLHUP | POLLNVAL


class _PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


# Two views of libc. Calls through _keep hold the GIL, for syscalls that cannot block (read of a
# non-blocking uffd, the WP ioctl, poll with timeout 0): each GIL acquisition costs up to the
# switch interval while another thread runs Python, so the handler acquires it once per wake-up,
# not once per syscall. Calls through _drop release it (poll that sleeps). _keep has no argtypes
# on purpose: converting each argument through from_param doubled a read's cost; a Python int
# passes as a C int (every request number fits: the kernel takes it as unsigned int), byref() and
# ctypes arrays as pointers.
_keep = ctypes.PyDLL(None, use_errno=True)
_drop = ctypes.CDLL(None, use_errno=True)
_drop.poll.restype = ctypes.c_int
_drop.poll.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int]


class _Mapping:
    """One uffd, the address at which its process maps guest RAM, and its read buffer."""

    __slots__ = ("fd", "addr", "buf", "view", "pfns", "foreign")

    def __init__(self, fd: int, addr: int) -> None:
        if addr % PAGE_SIZE:
            raise ValueError("ram_addr must be page aligned")
        self.fd = fd
        self.addr = addr
        self.buf = ctypes.create_string_buffer(UFFD_MSG_SIZE * _READ_BATCH)
        self.view = memoryview(self.buf)
        self.pfns: list[int] = []     # of the batch being handled
        self.foreign: list[int] = []  # page addresses outside guest RAM (released, not recorded)


class UffdSyncTracker:
    """Synchronous WP faults on guest RAM handled by one dedicated OS thread.

    ``UffdSyncTracker(ram_addr, page_count, uffd_fd, on_fault)`` serves the uffd ``uffd_fd``
    whose process maps the ``page_count`` pages of guest RAM at ``ram_addr``; :meth:`attach` adds
    the uffd of another process mapping the same RAM (several guest processes, one thread).
    ``on_fault(pfns)`` receives an int64 array of the guest pfns written (every message of one
    wake-up; duplicates possible) *before* their protection is lifted. It runs in the handler
    thread: it must be thread-safe and quick, and must never wait on anything that could be
    waiting on a guest writer. An exception from it is kept (the writers are still released: a
    stuck guest is worse) and re-raised by :meth:`close`.

    ``lock`` (a recursive lock; a new ``threading.RLock`` unless one is given): the handler holds
    it from recording a batch until the batch's pages are unprotected; :meth:`new_round` holds it
    around the dirty snapshot and the re-protection of all RAM. Whoever holds it knows that no
    fault is being recorded or released meanwhile: a fault either completed before (recorded and
    its write allowed) or waits until the lock is dropped. Round starts need that (a fault
    recorded in round N but released after round N+1's protect would let its write land unseen in
    round N+1), and so does any other change to guest pages that must not interleave with a
    fault (discarding pages, for one). Hold it briefly and never while waiting on the guest.
    ``round_lock`` is the same object.

    How it stays fast (per fault: one read, the record, one ioctl): the syscalls of a wake-up run
    with the GIL held; after each batch it busy-polls for ``spin_us`` before sleeping in poll(2)
    (a serialized writer's next fault usually comes within tens of microseconds, and a sleep
    costs a cross-CPU wake-up per fault); while it runs, the interpreter's switch interval is
    ``switch_interval`` (None: unchanged), which bounds how long the woken handler waits for the
    GIL while the host's other threads run Python (the 5 ms default let the rate fall below
    2 k faults/s); :meth:`close` restores it.

    Why a thread and not a trio task: the faulting writer is blocked *in the kernel* until WP is
    cleared. If the handler ran on the host's trio loop, anything that blocks that loop would
    stall the handler, and the guest would never wake. Writers in the *same* process must fault
    with the GIL released (:func:`hintpipe.linux.memfd.write_pages_nogil`); writers in other
    processes (a real guest) have no such constraint.

    ``record_first=False`` lifts the protection *before* calling ``on_fault``: the wrong order,
    there only so tests can show that their oracle catches it.
    """

    def __init__(self, ram_addr: int, page_count: int, uffd_fd: int,
                 on_fault: Callable[[np.ndarray], None], *, start: bool = True,
                 spin_us: float = DEFAULT_SPIN_US,
                 switch_interval: float | None = DEFAULT_SWITCH_INTERVAL,
                 lock=None, record_first: bool = True, unit_pages: int = 1) -> None:
        if page_count <= 0:
            raise ValueError("page_count must be positive")
        if spin_us < 0 or (switch_interval is not None and switch_interval <= 0):
            raise ValueError("spin_us must be >= 0 and switch_interval positive")
        self.ram_addr = ram_addr
        self.page_count = page_count
        self.uffd_fd = uffd_fd
        self.on_fault = on_fault
        self.spin_s = spin_us * 1e-6
        self.switch_interval = switch_interval
        self.record_first = record_first
        self.unit_pages = unit_pages
        """Guest pages per backing page of the RAM memfd (512 on hugetlb): protection is lifted
        a whole backing page at a time."""
        self._maps = [_Mapping(uffd_fd, ram_addr)]
        self.faults = 0           # WP fault messages inside guest RAM handled
        self.foreign_faults = 0   # WP faults outside [ram_addr, end): released, not reported
        self.protect_calls = 0    # protect_all / new_round calls
        self.unprotect_calls = 0  # UFFDIO_WRITEPROTECT clear ioctls
        self.reads = 0            # read(2) calls that returned messages
        self.batches = 0          # record+release rounds (one on_fault call each)
        self.sleeps = 0           # times the thread slept in poll(2)
        self.error: BaseException | None = None           # handler-side OS error (thread stops)
        self.callback_error: BaseException | None = None  # first exception from on_fault
        self.lock = lock if lock is not None else threading.RLock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._pollfds = (_PollFd * 0)()
        self._arg = UffdioWriteprotect(range=UffdioRange(0, PAGE_SIZE), mode=0)  # handler thread's
        self._argref = ctypes.byref(self._arg)
        self._thread: threading.Thread | None = None
        self._saved_interval: float | None = None
        self._closed = False
        self._stop = False
        if start:
            self.start()

    @property
    def round_lock(self):
        """The same object as :attr:`lock`."""
        return self.lock

    # ------------------------------------------------------------------ setup
    def attach(self, uffd_fd: int, ram_addr: int) -> None:
        """Also serve ``uffd_fd``, whose process maps the same guest RAM at ``ram_addr``.
        Only before :meth:`start` (the poll set is fixed while the thread runs)."""
        if self._thread is not None:
            raise RuntimeError("attach() must be called before start()")
        self._maps.append(_Mapping(uffd_fd, ram_addr))

    def start(self) -> None:
        """Start the handler thread (done by the constructor unless start=False)."""
        if self._thread is not None:
            raise RuntimeError("handler already started")
        for m in self._maps:  # reads run with the GIL held: they must never block
            os.set_blocking(m.fd, False)
        fds = [m.fd for m in self._maps] + [self._wake_r]
        self._pollfds = (_PollFd * len(fds))(*[_PollFd(fd, _POLLIN, 0) for fd in fds])
        if self.switch_interval is not None:
            self._saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(self.switch_interval)
        self._thread = threading.Thread(target=self._run, name="uffd-wp-handler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ rounds
    def protect_all(self) -> None:
        """Write-protect all guest RAM in every mapping (under :attr:`lock`; prefer
        :meth:`new_round`)."""
        with self.lock:
            self._protect_all()

    def _protect_all(self) -> None:
        for m in self._maps:
            writeprotect_fd(m.fd, m.addr, self.page_count * PAGE_SIZE, UFFDIO_WRITEPROTECT_MODE_WP)
        self.protect_calls += 1

    def unprotect_all(self) -> None:
        """Lift write protection everywhere and wake any blocked writer."""
        for m in self._maps:
            writeprotect_fd(m.fd, m.addr, self.page_count * PAGE_SIZE, 0)

    def new_round(self, snapshot: Callable[[], T] | None = None) -> T | None:
        """Start a round atomically with respect to fault handling.

        Under :attr:`lock`: call ``snapshot()`` (take and clear the dirty set that ``on_fault``
        fills), then write-protect everything. Returns what ``snapshot`` returned. A write that
        lands after this call faults again and is recorded for the next round. Blocks the caller
        for at most one handler batch.
        """
        with self.lock:
            result = snapshot() if snapshot is not None else None
            self._protect_all()
            return result

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            if len(self._maps) == 1:
                self._run_one()
            else:
                self._run_many()
        except BaseException as e:  # a bug: report it, never die silently
            self.error = e

    def _sleep(self) -> int:
        """Sleep in poll(2) (GIL released) until a uffd or the stop pipe is readable. Returns
        poll's count (0 after a signal), or -1 with ``self.error`` set."""
        self.sleeps += 1
        n = _drop.poll(self._pollfds, len(self._pollfds), -1)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                return 0
            self.error = OSError(err, f"poll on userfaultfd: {os.strerror(err)}")
            return -1
        return n

    def _read(self, m: _Mapping) -> int:
        """Read what ``m``'s uffd holds into its buffer: bytes read, 0 if nothing was pending,
        -1 with ``self.error`` set on a real error."""
        got = _keep.read(m.fd, m.buf, UFFD_MSG_SIZE * _READ_BATCH)
        if got > 0:
            self.reads += 1
            return got
        err = ctypes.get_errno() if got < 0 else errno.EIO
        if err in (errno.EAGAIN, errno.EINTR):
            return 0
        self.error = OSError(err, f"read from userfaultfd: {os.strerror(err)}")
        return -1

    def _run_one(self) -> None:
        """One uffd: the non-blocking read(2) itself is the busy-poll (one syscall per check)."""
        m = self._maps[0]
        clock, spin_s = time.perf_counter, self.spin_s
        last = clock()
        while not self._stop:
            n = self._read(m)
            if n < 0:
                return
            if n > 0:
                self._decode(m, n)
                if not self._handle([m]):
                    return
                last = clock()
                continue
            if spin_s and clock() - last < spin_s:
                continue
            r = self._sleep()
            if r < 0:
                return
            if r and self._pollfds[0].revents & _POLL_BAD:
                self.error = OSError(errno.EBADF, "userfaultfd closed under the handler")
                return
            last = clock()

    def _run_many(self) -> None:
        """Several uffds: busy-poll them all with one poll(2) (timeout 0), read every ready one,
        record all their messages with one ``on_fault`` call, then release them."""
        poll_now, pollfds, nfds = _keep.poll, self._pollfds, len(self._pollfds)
        maps = self._maps
        clock, spin_s = time.perf_counter, self.spin_s
        last = clock()
        while not self._stop:
            n = poll_now(pollfds, nfds, 0)
            if n == 0:
                if spin_s and clock() - last < spin_s:
                    continue
                n = self._sleep()
                last = clock()
            if n < 0:
                if self.error is not None:
                    return
                continue  # EINTR
            batch = []
            for i, m in enumerate(maps):
                rev = pollfds[i].revents
                if not rev:
                    continue
                if rev & _POLL_BAD:
                    self.error = OSError(errno.EBADF, "userfaultfd closed under the handler")
                    return
                got = self._read(m)
                if got < 0:
                    return
                if got:
                    self._decode(m, got)
                    batch.append(m)
            if batch:
                if not self._handle(batch):
                    return
                last = clock()

    def _decode(self, m: _Mapping, nbytes: int) -> None:
        """The WP faults of the ``nbytes`` read into ``m.buf``: pfns inside guest RAM into
        ``m.pfns``, page addresses outside it into ``m.foreign``; other messages are ignored."""
        lo = m.addr
        hi = lo + self.page_count * PAGE_SIZE
        if nbytes <= UFFD_MSG_SIZE * _SMALL:  # the common case: numpy's per-call cost would dominate
            pfns: list[int] = []
            foreign: list[int] = []
            for event, flags, addr in _MSG.iter_unpack(m.view[:nbytes]):
                if event != UFFD_EVENT_PAGEFAULT or not flags & UFFD_PAGEFAULT_FLAG_WP:
                    continue
                if lo <= addr < hi:
                    pfns.append((addr - lo) >> PAGE_SHIFT)
                else:
                    foreign.append(addr & ~(PAGE_SIZE - 1))
        else:
            msgs = parse_messages(m.view[:nbytes])
            wp = msgs[(msgs["event"] == UFFD_EVENT_PAGEFAULT) & (msgs["flags"] & UFFD_PAGEFAULT_FLAG_WP != 0)]
            addr = wp["address"].astype(np.int64)
            inside = (addr >= lo) & (addr < hi)
            pfns = ((addr[inside] - lo) >> PAGE_SHIFT).tolist()
            foreign = (addr[~inside] & ~np.int64(PAGE_SIZE - 1)).tolist()
        m.pfns, m.foreign = pfns, foreign

    def _handle(self, batch: list[_Mapping]) -> bool:
        """Record, then release, every message of this wake-up (under :attr:`lock`). False (and
        ``self.error`` set) if an unprotect failed."""
        pfns = batch[0].pfns if len(batch) == 1 else [p for m in batch for p in m.pfns]
        try:
            with self.lock:
                if not self.record_first:  # the wrong order, for tests only
                    for m in batch:
                        self._release(m)
                try:
                    if pfns:
                        self.on_fault(np.array(pfns, dtype=np.int64))
                except BaseException as e:  # keep serving: a stuck writer is worse
                    if self.callback_error is None:
                        self.callback_error = e
                # recorded (above), then unprotected: the write that proceeds is covered
                self.faults += len(pfns)
                self.batches += 1
                for m in batch:
                    self.foreign_faults += len(m.foreign)
                    if self.record_first:
                        self._release(m)
        except OSError as e:  # mm gone (guest exited) or fd closed
            self.error = e
            return False
        return True

    def _release(self, m: _Mapping) -> None:
        """Clear WP on the batch's pages of mapping ``m`` (waking its writers), runs merged."""
        pfns = m.pfns
        u = self.unit_pages
        if u > 1:  # whole backing pages (hugetlb): clearing WP on part of one is EINVAL
            runs = []
            for unit in sorted({p // u for p in pfns}):
                if runs and runs[-1][0] + runs[-1][1] == unit * u:
                    runs[-1] = (runs[-1][0], runs[-1][1] + u)
                else:
                    runs.append((unit * u, u))
        elif len(pfns) == 1:
            runs = [(pfns[0], 1)]
        elif len(pfns) <= _SMALL:
            runs = []
            for p in sorted(set(pfns)):
                if runs and runs[-1][0] + runs[-1][1] == p:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                else:
                    runs.append((p, 1))
        else:
            s, c = page_runs(np.array(pfns, dtype=np.int64))
            runs = list(zip(s.tolist(), c.tolist()))
        arg = self._arg
        arg.mode = 0
        for s, c in runs:
            arg.range.start, arg.range.len = m.addr + (s << PAGE_SHIFT), c << PAGE_SHIFT
            self._clear_wp(m.fd)
        for a in sorted(set(m.foreign)):
            arg.range.start, arg.range.len = a, PAGE_SIZE
            self._clear_wp(m.fd)

    def _clear_wp(self, fd: int) -> None:
        """UFFDIO_WRITEPROTECT (mode 0) of the range in ``self._arg``: the writer wakes."""
        while _keep.ioctl(fd, UFFDIO_WRITEPROTECT, self._argref) < 0:
            err = ctypes.get_errno()
            if err != errno.EAGAIN:  # EAGAIN: the mm is changing under us; retry
                raise OSError(err, f"UFFDIO_WRITEPROTECT: {os.strerror(err)}")
        self.unprotect_calls += 1

    # ------------------------------------------------------------------ teardown
    def close(self, *, unprotect: bool = True) -> None:
        """Stop the handler thread and restore the switch interval; by default lift all
        protection first so no writer stays blocked. Re-raises an exception ``on_fault`` raised."""
        if self._closed:
            return
        self._closed = True
        if unprotect:
            try:
                self.unprotect_all()
            except OSError:
                pass  # the guest's mm may be gone already
        self._stop = True
        if self._thread is not None and self._thread.is_alive():
            os.write(self._wake_w, b"x")
            self._thread.join()
        if self._saved_interval is not None:
            if abs(sys.getswitchinterval() - self.switch_interval) < 1e-7:  # nobody changed it since
                sys.setswitchinterval(self._saved_interval)
            self._saved_interval = None
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.callback_error is not None:
            raise self.callback_error

    def stats(self) -> dict:
        """Counters for the JSON report."""
        return {"faults": self.faults, "protect_calls": self.protect_calls,
                "unprotect_calls": self.unprotect_calls, "foreign_faults": self.foreign_faults,
                "reads": self.reads, "batches": self.batches, "sleeps": self.sleeps}

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

    No deadlock: the handler thread waits only on the kernel (poll/read/ioctl), on the tracker's
    :attr:`lock` (held by :meth:`start_round` for a snapshot swap and a protect ioctl, neither of
    which waits on a guest write) and on ``state.lock`` (held only for array updates). It also
    needs the GIL: when the writer is a thread of this process (the in-process demo), it must
    fault with the GIL released, which :func:`hintpipe.linux.memfd.write_pages_nogil` guarantees
    by copying through ``ctypes.memmove``; the trio loop itself never waits on the handler except
    for the bounded :attr:`lock` hold.
    """

    name = "uffd"

    def __init__(self, state: HostPageState, ram_addr: int, page_count: int, uffd_fd: int, *,
                 unit_pages: int = 1) -> None:
        super().__init__(state)
        if page_count != state.page_count:
            raise ValueError("guest RAM and page state disagree on the page count")
        self.tracker = UffdSyncTracker(ram_addr, page_count, uffd_fd, state.on_written, unit_pages=unit_pages)

    @property
    def lock(self):
        """The fault handler's lock (:attr:`UffdSyncTracker.lock`): while it is held no fault is
        recorded or released, so guest pages can be changed (discarded, re-protected) without a
        fault interleaving. Recursive; hold it briefly, never while waiting on the guest."""
        return self.tracker.lock

    def _check(self) -> None:
        t = self.tracker
        if t.error is not None:
            raise RuntimeError(f"userfaultfd handler stopped: {t.error}") from t.error
        if t.callback_error is not None:
            raise RuntimeError(f"fault callback failed: {t.callback_error}") from t.callback_error

    def start_round(self, index: int) -> None:
        """Swap the page state and re-protect everything under the tracker's :attr:`lock`."""
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
