"""Host skip bitmap: vectorised hint application against a brute-force reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hintpipe.host.pagestate import HostPageState
from hintpipe.trace.snapshot import decompose

N = 1 << 12


@st.composite
def aligned_ranges(draw):
    out, used = [], np.zeros(N, dtype=bool)
    for _ in range(draw(st.integers(1, 40))):
        order = draw(st.integers(0, 10))
        size = 1 << order
        start = draw(st.integers(0, N // size - 1)) * size
        if not used[start:start + size].any():
            used[start:start + size] = True
            out.append((start, size))
    return np.array(out, dtype=np.uint64)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(ranges=aligned_ranges(), written=st.lists(st.integers(0, N - 1), max_size=200))
def test_apply_hints_equals_per_range_loop(ranges, written):
    state = HostPageState(N)
    state.begin_first_round()
    w = np.array(written, dtype=np.int64)
    state.on_written(w)
    marked = state.apply_hints(ranges)
    ref = np.zeros(N, dtype=bool)
    for start, size in ranges.tolist():
        ref[start:start + size] = True
    ref[w] = False  # a page written this round is never re-validated by a hint
    assert np.array_equal(state.skip, ref)
    assert marked == int(ref.sum())


def test_fault_invalidates_skip_and_dirties_next_round():
    state = HostPageState(64)
    state.begin_first_round()
    state.apply_hints(np.array([[0, 32]], dtype=np.uint64))
    assert state.skip[:32].all()
    state.on_written(np.array([5]))
    assert not state.skip[5] and state.skip[4]
    state.begin_round()
    assert np.flatnonzero(state.dirty).tolist() == [5]
    assert not state.written.any()
    # a second write next round faults again
    assert state.on_written(np.array([5])) == 1


def test_each_guard_switch_turns_off_only_its_guard():
    # invalidate off: a write leaves the skip set (and counts no invalidation); hints still refused
    state = HostPageState(64, invalidate=False)
    state.begin_first_round()
    state.apply_hints(np.array([[0, 8]], dtype=np.uint64))
    state.on_written(np.array([3]))
    assert state.skip[3] and state.skips_invalidated == 0
    state.apply_hints(np.array([[8, 8]], dtype=np.uint64))
    state.on_written(np.array([9]))
    assert state.skip[9]
    state.on_written(np.array([20]))
    state.apply_hints(np.array([[16, 8]], dtype=np.uint64))
    assert not state.skip[20] and state.pages_refused_written == 1
    # refuse-written off: a hint marks a written page; writes still invalidate
    state = HostPageState(64, refuse_written=False)
    state.begin_first_round()
    state.on_written(np.array([3]))
    state.apply_hints(np.array([[0, 8]], dtype=np.uint64))
    assert state.skip[3] and state.pages_refused_written == 0
    state.on_written(np.array([3, 3, 4]))
    assert not state.skip[3] and not state.skip[4] and state.skips_invalidated == 2


def test_skips_invalidated_counts_only_skips_a_write_cleared():
    state = HostPageState(64)
    state.begin_first_round()
    state.on_written(np.array([40]))  # no skip there: a fault, not an invalidation
    state.apply_hints(np.array([[0, 16]], dtype=np.uint64))
    state.on_written(np.array([1, 2, 2, 30]))
    assert state.skips_invalidated == 2


def test_non_multiple_page_count():
    state = HostPageState(1000)  # not a multiple of 1024
    state.begin_first_round()
    state.apply_hints(np.array([[512, 256], [768, 128], [992, 8]], dtype=np.uint64))
    assert state.skip[512:896].all() and state.skip[992:1000].all() and not state.skip[896:992].any()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), n_ranges=st.integers(1, 3000), shuffle=st.booleans(),
       pre_skip=st.floats(0, 0.5), written_frac=st.floats(0, 0.3))
def test_apply_hints_large_batches_equal_per_range_loop(seed, n_ranges, shuffle, pre_skip, written_frac):
    """Big batches reach the grouped, sorted and chunked paths; skip bits may already be set."""
    n = 1 << 16
    rng = np.random.default_rng(seed)
    # non-overlapping aligned blocks of mixed orders: a random free mask of runs, split the way
    # the buddy allocator would (top order first, as the walker sends them)
    runs = np.repeat(rng.random(n // 64) < 0.6, 64) & (rng.random(n) < 0.97)
    pfns, orders = decompose(runs)
    pick = rng.permutation(len(pfns))[:n_ranges] if shuffle else np.arange(min(n_ranges, len(pfns)))
    ranges = np.column_stack((pfns[pick], np.uint64(1) << orders[pick].astype(np.uint64)))
    state = HostPageState(n)
    state.begin_first_round()
    state.skip[:] = rng.random(n) < pre_skip
    written = np.flatnonzero(rng.random(n) < written_frac)
    state.on_written(written)
    before = state.skip.copy()
    marked = state.apply_hints(ranges)
    ref = before.copy()
    for start, size in ranges.tolist():
        ref[start:start + size] |= ~state.written[start:start + size]
    assert np.array_equal(state.skip, ref)
    assert marked == int(np.count_nonzero(ref & ~before))
