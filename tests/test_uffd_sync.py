"""Synchronous userfaultfd write-protect tracking, writer threads in this process."""

import threading

import numpy as np
import pytest

import hintpipe.wp as backends
from hintpipe.linux import userfaultfd as u
from hintpipe.linux.memfd import GuestRam
from hintpipe.wp.uffd_sync import UffdSyncTracker

N = 64
JOIN_S = 10  # a hang (a writer never woken) fails the test instead of blocking the suite


@pytest.fixture
def setup():
    try:
        backends.probe("uffd")
    except u.UffdUnavailable as e:
        pytest.skip(f"uffd (sync) unavailable on this kernel: {e.reason}")
    ram = GuestRam(N)
    uffd = u.register_wp(ram.addr, ram.size, "uffd")
    seen: list[int] = []
    lock = threading.Lock()

    def on_fault(pfns):
        with lock:
            seen.extend(pfns.tolist())

    tracker = UffdSyncTracker(ram.addr, N, uffd.fd, on_fault)
    yield ram, tracker, seen
    tracker.close()
    uffd.close()
    ram.close()


def _write_in_thread(fn, *args):
    t = threading.Thread(target=fn, args=args)
    t.start()
    t.join(JOIN_S)
    assert not t.is_alive(), "writer still blocked on a write-protect fault"


def test_write_to_protected_page_faults_exactly_that_pfn(setup):
    ram, tracker, seen = setup
    ram.touch()
    tracker.protect_all()
    _write_in_thread(ram.write_pages_nogil, np.array([17]), 1)
    assert seen == [17]
    assert tracker.faults == 1
    assert ram.verify([17], 1)[0]          # the writer completed its write


def test_unpopulated_page_is_tracked(setup):
    """A memfd page never touched before protect_all still faults (shmem WP markers)."""
    ram, tracker, seen = setup
    tracker.protect_all()
    _write_in_thread(ram.write_pages, np.array([5, 40]), 2)
    assert sorted(seen) == [5, 40]
    assert ram.verify([5, 40], 2).all()


def test_reprotect_faults_again_next_round(setup):
    ram, tracker, seen = setup
    tracker.protect_all()
    _write_in_thread(ram.write_pages, np.array([3]), 1)
    _write_in_thread(ram.write_pages, np.array([3]), 2)   # same round: no new fault
    assert seen == [3]
    tracker.protect_all()                                  # new round
    _write_in_thread(ram.write_pages, np.array([3, 4]), 3)
    assert sorted(seen) == [3, 3, 4]
    assert tracker.protect_calls == 2


def test_reads_do_not_fault(setup):
    ram, tracker, seen = setup
    ram.write_pages(np.arange(N), 1)
    tracker.protect_all()
    assert ram.verify(np.arange(N), 1).all()
    assert seen == []


def test_unprotected_writes_are_missed(setup):
    """Without protect_all (tracking effectively disabled) a write is not seen."""
    ram, tracker, seen = setup
    _write_in_thread(ram.write_pages, np.array([9]), 1)
    assert seen == [] and tracker.faults == 0


def test_callback_error_still_wakes_writer_and_is_reraised():
    try:
        backends.probe("uffd")
    except u.UffdUnavailable as e:
        pytest.skip(f"uffd (sync) unavailable on this kernel: {e.reason}")
    with GuestRam(4) as ram:
        uffd = u.register_wp(ram.addr, ram.size, "uffd")

        def boom(pfns):
            raise KeyError("callback failed")

        tracker = UffdSyncTracker(ram.addr, 4, uffd.fd, boom)
        tracker.protect_all()
        _write_in_thread(ram.write_pages, np.array([1]), 1)
        with pytest.raises(KeyError):
            tracker.close()
        uffd.close()


def test_close_releases_protection(setup):
    ram, tracker, seen = setup
    tracker.protect_all()
    tracker.close()                      # unprotects everything, stops the thread
    _write_in_thread(ram.write_pages, np.array([2]), 1)   # would hang if still protected
    assert seen == []


def test_many_concurrent_writers_all_seen(setup):
    """8 threads fault at once on distinct and shared pages; every page is reported, none hangs."""
    ram, tracker, seen = setup
    tracker.protect_all()
    groups = [np.arange(i, N, 8) for i in range(8)] + [np.array([0, 1, 2])]
    threads = [threading.Thread(target=ram.write_pages_nogil, args=(g, 7)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive()
    assert set(seen) == set(range(N))
    assert ram.verify(np.arange(N), 7).all()


def test_small_and_numpy_decoders_agree():
    """Both message decoders (struct for small reads, numpy for large ones) give the same pfns and
    foreign pages; non-WP faults and other events are ignored."""
    import ctypes

    from hintpipe.wp.uffd_sync import _Mapping

    base, n = 0x7F00_0000_0000, 64
    tr = UffdSyncTracker(base, n, -1, lambda p: None, start=False, switch_interval=None)
    rng = np.random.default_rng(3)
    for count in (20, 200):  # below and above the numpy threshold
        msgs = np.zeros(count, dtype=u.UFFD_MSG_DTYPE)
        msgs["event"] = u.UFFD_EVENT_PAGEFAULT
        msgs["flags"] = u.UFFD_PAGEFAULT_FLAG_WP | u.UFFD_PAGEFAULT_FLAG_WRITE
        msgs["address"] = base + rng.integers(0, n, count) * 4096 + rng.integers(0, 4096, count)
        msgs["address"][5] = base + n * 4096 + 17          # outside guest RAM
        msgs["flags"][6] = u.UFFD_PAGEFAULT_FLAG_WRITE     # not a WP fault: ignored
        msgs["event"][7] = 0x13                            # not a page fault: ignored
        m = _Mapping(-1, base)
        ctypes.memmove(m.buf, msgs.tobytes(), msgs.nbytes)
        tr._decode(m, msgs.nbytes)
        keep = np.ones(count, bool)
        keep[[5, 6, 7]] = False
        assert m.pfns == ((msgs["address"][keep] - base) >> 12).astype(np.int64).tolist()
        assert m.foreign == [base + n * 4096]
    tr.close(unprotect=False)  # never started: just frees the wakeup pipe


def test_kernel_mode_write_is_tracked(setup):
    """readv(2) into protected guest RAM faults in the kernel; a full-mode uffd tracks it too."""
    import os
    ram, tracker, seen = setup
    ram.touch()
    tracker.protect_all()
    r, w = os.pipe()
    try:
        os.write(w, b"abc")
        box = []
        t = threading.Thread(target=lambda: box.append(os.readv(r, [ram.pages[12]])))
        t.start()
        t.join(JOIN_S)
        assert not t.is_alive() and box == [3]
        assert seen == [12]
        assert bytes(ram.pages[12, :3]) == b"abc"
    finally:
        os.close(r)
        os.close(w)


def test_user_mode_only_uffd_fails_kernel_mode_writes():
    """Documented limitation: with UFFD_USER_MODE_ONLY a syscall writing into protected RAM gets EFAULT."""
    import errno
    import os
    try:
        fd = u.userfaultfd_syscall(os.O_CLOEXEC | os.O_NONBLOCK | u.UFFD_USER_MODE_ONLY)
    except OSError as e:
        pytest.skip(f"UFFD_USER_MODE_ONLY not supported: {e}")
    with GuestRam(4) as ram:
        ram.touch()
        uffd = u.Userfaultfd(fd)
        uffd.api(u.WP_FEATURES_SYNC)
        uffd.register(ram.addr, ram.size)
        tracker = UffdSyncTracker(ram.addr, 4, fd, lambda p: None)
        tracker.protect_all()
        r, w = os.pipe()
        try:
            os.write(w, b"abc")
            with pytest.raises(OSError) as ei:
                os.readv(r, [ram.pages[1]])
            assert ei.value.errno == errno.EFAULT
        finally:
            os.close(r)
            os.close(w)
            tracker.close()
            uffd.close()


def test_concurrent_rounds_lose_nothing(setup):
    """Writers run while the engine takes rounds with new_round(); the final copy equals the source."""
    import time
    ram, tracker, _ = setup
    dirty = np.zeros(N, dtype=bool)
    lock = threading.Lock()

    def on_fault(pfns):
        with lock:
            dirty[pfns] = True

    def snapshot():
        with lock:
            taken = np.flatnonzero(dirty)
            dirty[:] = False
        return taken

    tracker.on_fault = on_fault
    stop = threading.Event()
    batches = [0, 0, 0]

    def writer(i):
        rng = np.random.default_rng(i)
        v = 1
        while not stop.is_set():
            ram.write_pages(rng.choice(N, size=4, replace=False), v)
            v += 1
            batches[i] += 1

    ram.write_pages(np.arange(N), 0)
    tracker.new_round()
    dest = ram.words.copy()                                 # round 0: everything
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    sent = rounds = 0
    while sum(batches) < 600 and rounds < 20000:            # pre-copy rounds under churn
        pages = tracker.new_round(snapshot)
        dest[pages] = ram.words[pages]
        sent += len(pages)
        rounds += 1
        time.sleep(0.0001)                                  # let the writers have the GIL
    stop.set()
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive()
    pages = tracker.new_round(snapshot)                      # stop-and-copy
    dest[pages] = ram.words[pages]
    assert sum(batches) >= 600, "writers did not run"
    assert sent > 0 and tracker.faults > 0
    lost = np.flatnonzero((dest != ram.words).any(axis=1))
    assert lost.size == 0, f"lost pages {lost.tolist()}"
