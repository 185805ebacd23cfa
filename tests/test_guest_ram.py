"""memfd-backed guest RAM and the (pfn, version) page pattern."""

import numpy as np
import pytest

from hintpipe.linux.memfd import GuestRam, page_pattern, verify_words


def test_pattern_header_and_uniqueness():
    pat = page_pattern(np.array([0, 1, 5]), np.array([7, 7, 8]))
    assert pat.shape == (3, 512)
    assert pat[:, 0].tolist() == [0, 1, 5] and pat[:, 1].tolist() == [7, 7, 8]
    # every word beyond the header depends on (pfn, version): no two pages agree anywhere
    assert not (pat[0, 2:] == pat[1, 2:]).any()
    assert not (page_pattern([5], [8])[0, 2:] == page_pattern([5], [9])[0, 2:]).any()


def test_write_then_verify_contiguous_and_scattered():
    with GuestRam(64) as ram:
        ram.write_pages(np.arange(8, 16), 3)           # contiguous path (in place)
        ram.write_pages(np.array([40, 2, 63]), [1, 2, 3])  # scattered path
        assert ram.verify(np.arange(8, 16), 3).all()
        assert ram.verify([40, 2, 63], [1, 2, 3]).all()
        assert not ram.verify([40], [2]).any()          # wrong version
        assert not ram.verify([0], [0]).any()           # never written: zeros
        assert (ram.pages[0] == 0).all()


def test_torn_page_is_detected():
    with GuestRam(4) as ram:
        ram.write_pages([1], [5])
        ram.pages[1, 2048:] = page_pattern([1], [4]).view(np.uint8)[0, 2048:]  # half old, half new
        assert not ram.verify([1], [5])[0]
        assert not ram.verify([1], [4])[0]


def test_second_mapping_from_fd_sees_same_bytes():
    with GuestRam(16) as a:
        with GuestRam(16, fd=a.fd) as b:
            assert b.addr != a.addr
            a.write_pages([3, 9], 11)
            assert b.verify([3, 9], 11).all()
            b.write_pages([4], 12)
            assert a.verify([4], 12).all()
        assert a.verify([3, 9], 11).all()  # closing b left a intact


def test_copy_of_ram_verifies_with_verify_words():
    with GuestRam(8) as ram:
        ram.write_pages(np.arange(8), np.arange(8))
        dest = ram.words.copy()
        ram.write_pages([5], [99])
        ok = verify_words(dest, np.arange(8), np.where(np.arange(8) == 5, 99, np.arange(8)))
        assert ok.tolist() == [True] * 5 + [False] + [True] * 2


def test_nogil_writer_matches_numpy_writer():
    with GuestRam(8) as ram:
        ram.write_pages_nogil(np.array([1, 6]), [4, 5])
        assert ram.verify([1, 6], [4, 5]).all()


def test_bounds_and_size_checks():
    with GuestRam(4) as ram:
        with pytest.raises(IndexError):
            ram.write_pages([4], 0)
        with pytest.raises(ValueError):
            GuestRam(8, fd=ram.fd)
    with pytest.raises(ValueError):
        GuestRam(0)


def test_close_is_idempotent():
    ram = GuestRam(2)
    ram.close()
    ram.close()
    assert ram.fd == -1
