"""Asynchronous userfaultfd write-protect (WP_ASYNC) + PAGEMAP_SCAN, in this process."""

import os

import numpy as np
import pytest

import hintpipe.wp as backends
from hintpipe.linux import pagemap as pm
from hintpipe.linux import userfaultfd as u
from hintpipe.linux.memfd import GuestRam
from hintpipe.wp.uffd_async import UffdAsyncTracker

N = 256


@pytest.fixture
def setup():
    try:
        backends.probe("uffd-async")
    except u.UffdUnavailable as e:
        pytest.skip(f"uffd-async unavailable on this kernel: {e.reason}")
    ram = GuestRam(N)
    uffd = u.register_wp(ram.addr, ram.size, "uffd-async")
    tracker = UffdAsyncTracker(ram.addr, N, uffd.fd, os.getpid())
    yield ram, tracker
    tracker.close()
    uffd.close()
    ram.close()


def test_arming_pass_reports_everything_then_nothing(setup):
    ram, tracker = setup
    ram.write_pages(np.arange(0, N, 3), 1)  # a mix of populated and never-touched pages
    first = tracker.written_since_last()
    assert first.tolist() == list(range(N))   # the arming pass: everything "written"
    assert tracker.written_since_last().size == 0


def test_written_pages_reported_exactly(setup):
    ram, tracker = setup
    ram.write_pages(np.arange(10), 0)
    tracker.arm()
    pfns = np.array([0, 1, 2, 77, 200, 255])   # some populated, some never touched
    ram.write_pages(pfns, 1)
    got = tracker.written_since_last()
    assert got.tolist() == pfns.tolist()
    assert 50 not in got                       # an unwritten page is not reported
    assert ram.verify(pfns, 1).all()           # the kernel resolved the faults itself


def test_rounds_reprotect(setup):
    ram, tracker = setup
    tracker.arm()
    ram.write_pages([5], 1)
    assert tracker.written_since_last().tolist() == [5]
    assert tracker.written_since_last().size == 0
    ram.write_pages([5, 6], 2)                 # new round: 5 faults (silently) again
    assert tracker.written_since_last().tolist() == [5, 6]
    assert tracker.faults == 1 + 2
    assert tracker.scans == 3


def test_protect_all_forgets_pending_writes(setup):
    ram, tracker = setup
    tracker.arm()
    ram.write_pages([8], 1)
    tracker.protect_all()
    assert tracker.written_since_last().size == 0


def test_reads_are_not_writes(setup):
    ram, tracker = setup
    ram.write_pages(np.arange(N), 1)
    tracker.arm()
    assert ram.verify(np.arange(N), 1).all()
    assert tracker.written_since_last().size == 0


def test_scan_resumes_when_output_vector_fills(setup):
    """Every other page written: N/2 regions through a 7-entry vector needs many ioctls."""
    ram, tracker = setup
    tracker.arm()
    pfns = np.arange(0, N, 2)
    ram.write_pages(pfns, 1)
    with pm.PagemapScanner(vec_len=7) as sc:
        starts, counts = sc.written_ranges(ram.addr, N)
        assert sc.ioctl_calls >= len(pfns) // 7
    assert starts.tolist() == pfns.tolist() and (counts == 1).all()
    assert tracker.written_since_last().size == 0    # the small-vector scan re-protected all


def test_scan_without_protect_leaves_pages_written(setup):
    ram, tracker = setup
    tracker.arm()
    ram.write_pages([3], 1)
    with pm.PagemapScanner() as sc:
        assert sc.written_ranges(ram.addr, N, protect=False)[0].tolist() == [3]
    assert tracker.written_since_last().tolist() == [3]


def test_kernel_mode_write_is_reported(setup):
    ram, tracker = setup
    tracker.arm()
    r, w = os.pipe()
    try:
        os.write(w, b"xyz")
        assert os.readv(r, [ram.pages[33]]) == 3
    finally:
        os.close(r)
        os.close(w)
    assert tracker.written_since_last().tolist() == [33]
