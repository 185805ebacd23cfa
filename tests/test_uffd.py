"""userfaultfd / PAGEMAP_SCAN bindings checked against the running kernel."""

import ctypes
import errno
import os

import numpy as np
import pytest

import hintpipe.wp as backends
from hintpipe.linux import pagemap as pm
from hintpipe.linux import userfaultfd as u
from hintpipe.linux.ioctl import ioc, ioctl
from hintpipe.linux.memfd import GuestRam


def _need(backend: str) -> dict:
    try:
        return backends.probe(backend)
    except u.UffdUnavailable as e:
        pytest.skip(f"{backend} unavailable on this kernel: {e.reason}")


def test_struct_sizes_and_encoding():
    assert ctypes.sizeof(u.UffdioApi) == 24
    assert ctypes.sizeof(u.UffdioRegister) == 32
    assert ctypes.sizeof(u.UffdioWriteprotect) == 24
    assert u.UFFD_MSG_DTYPE.itemsize == 32
    assert ctypes.sizeof(pm.PmScanArg) == 96
    assert ctypes.sizeof(pm.PageRegion) == 24
    # _IOWR(0xAA, 0x3F, 24): dir=3, size=24, type=0xAA, nr=0x3F
    assert u.UFFDIO_API == (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F
    assert pm.PAGEMAP_SCAN == (3 << 30) | (96 << 16) | (ord("f") << 8) | 16


def test_api_handshake_reports_wp_features():
    _need("uffd")
    fd, _ = u.open_uffd()
    try:
        feats = u.Userfaultfd(fd).api(u.WP_FEATURES_SYNC)
    finally:
        os.close(fd)
    assert feats & u.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    assert feats & u.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    assert "PAGEFAULT_FLAG_WP" in u.feature_names(feats)


def test_api_with_wrong_ioctl_number_is_rejected():
    """A request number encoding the wrong struct size is not UFFDIO_API for the kernel."""
    fd, _ = u.open_uffd()
    try:
        bad = ioc(3, 0xAA, 0x3F, 16)
        with pytest.raises(OSError) as ei:
            ioctl(fd, bad, u.UffdioApi(api=u.UFFD_API))
        assert ei.value.errno in (errno.ENOTTY, errno.EINVAL)
        # the right number still works afterwards on the same fd
        assert u.Userfaultfd(fd).api(0) & u.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    finally:
        os.close(fd)


def test_register_reports_writeprotect_ioctl():
    _need("uffd")
    with GuestRam(4) as ram:
        uffd = u.register_wp(ram.addr, ram.size, "uffd")
        try:
            uffd.writeprotect(ram.addr, ram.size, True)
            uffd.writeprotect(ram.addr, ram.size, False, wake=False)
            uffd.wake(ram.addr, ram.size)
            uffd.unregister(ram.addr, ram.size)
        finally:
            uffd.close()


def test_register_rejects_unaligned_range():
    _need("uffd")
    with GuestRam(2) as ram:
        uffd = u.Userfaultfd.create(u.WP_FEATURES_SYNC)
        try:
            with pytest.raises(OSError) as ei:
                uffd.register(ram.addr + 1, 4096)
            assert ei.value.errno == errno.EINVAL
        finally:
            uffd.close()


def test_probe_names_backend_and_features():
    info = _need("uffd-async")
    assert info["backend"] == "uffd-async"
    assert info["pagemap_scan"] is True
    assert info["requested"] & u.UFFD_FEATURE_WP_ASYNC


def test_probe_rejects_unknown_backend():
    with pytest.raises(ValueError):
        backends.probe("sim")


def test_parse_messages():
    raw = np.zeros(2, dtype=u.UFFD_MSG_DTYPE)
    raw["event"] = u.UFFD_EVENT_PAGEFAULT
    raw["flags"] = [u.UFFD_PAGEFAULT_FLAG_WP | u.UFFD_PAGEFAULT_FLAG_WRITE, 0]
    raw["address"] = [0x7000_1000, 0x7000_3000]
    msgs = u.parse_messages(raw.tobytes())
    assert msgs["address"].tolist() == [0x7000_1000, 0x7000_3000]
    assert msgs["flags"][0] & u.UFFD_PAGEFAULT_FLAG_WP
    with pytest.raises(ValueError):
        u.parse_messages(b"\0" * 33)


def test_pagemap_scan_without_async_wp_fails_with_check():
    """PM_SCAN_CHECK_WPASYNC refuses a range with no async uffd-wp, instead of lying."""
    with GuestRam(4) as ram, pm.PagemapScanner() as sc:
        ram.touch()
        with pytest.raises(OSError) as ei:
            sc.written_ranges(ram.addr, 4)
        assert ei.value.errno == errno.EPERM
        # plain GET with no WP: present pages are reported, the ioctl itself works
        regs = sc.scan(ram.addr, ram.addr + ram.size, category_mask=pm.PAGE_IS_PRESENT,
                       return_mask=pm.PAGE_IS_PRESENT)
        assert int((regs["end"] - regs["start"]).sum()) == ram.size


def test_pagemap_scan_wrong_size_is_einval():
    with GuestRam(1) as ram, pm.PagemapScanner() as sc:
        arg = pm.PmScanArg(size=95, start=ram.addr, end=ram.addr + 4096)
        with pytest.raises(OSError) as ei:
            ioctl(sc.fd, pm.PAGEMAP_SCAN, arg)
        assert ei.value.errno == errno.EINVAL

