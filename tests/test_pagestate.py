"""Host skip bitmap: vectorised hint application against a brute-force reference, the bit-per-page
representation, and staged hints against faults and round ends."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hintpipe.host.pagebits import PageBits
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


def reference(n: int, ranges: np.ndarray, written: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
    """What the skip bitmap must hold: a per-range loop over bool arrays."""
    ref = np.zeros(n, dtype=bool) if skip is None else skip.copy()
    for start, size in ranges.tolist():
        ref[start:start + size] |= ~written[start:start + size]
    return ref


def mark_pages(state: HostPageState, pages: np.ndarray) -> None:
    """Put ``pages`` into the skip bitmap (order-0 hints)."""
    pages = np.asarray(pages, dtype=np.uint64)
    state.apply_hints(np.column_stack((pages, np.ones_like(pages))))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(ranges=aligned_ranges(), written=st.lists(st.integers(0, N - 1), max_size=200))
def test_apply_hints_equals_per_range_loop(ranges, written):
    state = HostPageState(N)
    state.begin_first_round()
    w = np.array(written, dtype=np.int64)
    state.on_written(w)
    marked = state.apply_hints(ranges)
    ref = reference(N, ranges, state.written_in())
    assert not ref[w].any()  # a page written this round is never re-validated by a hint
    assert np.array_equal(state.skip_in(), ref)
    assert marked == int(ref.sum()) == state.count_skip()
    assert state.pages_refused_written == sum(int(state.written_in(s, s + n).sum()) for s, n in ranges.tolist())


def test_fault_invalidates_skip_and_dirties_next_round():
    state = HostPageState(64)
    state.begin_first_round()
    state.apply_hints(np.array([[0, 32]], dtype=np.uint64))
    assert state.skip_in(0, 32).all()
    state.on_written(np.array([5]))
    assert not state.is_skip([5])[0] and state.is_skip([4])[0]
    state.begin_round()
    assert np.flatnonzero(state.dirty_in()).tolist() == [5]
    assert state.count_written() == 0
    # a second write next round faults again
    assert state.on_written(np.array([5])) == 1


def test_each_guard_switch_turns_off_only_its_guard():
    # invalidate off: a write leaves the skip set (and counts no invalidation); hints still refused
    state = HostPageState(64, invalidate=False)
    state.begin_first_round()
    state.apply_hints(np.array([[0, 8]], dtype=np.uint64))
    state.on_written(np.array([3]))
    assert state.is_skip([3])[0] and state.skips_invalidated == 0
    state.apply_hints(np.array([[8, 8]], dtype=np.uint64))
    state.on_written(np.array([9]))
    assert state.is_skip([9])[0]
    state.on_written(np.array([20]))
    state.apply_hints(np.array([[16, 8]], dtype=np.uint64))
    assert not state.is_skip([20])[0] and state.pages_refused_written == 1
    # refuse-written off: a hint marks a written page; writes still invalidate
    state = HostPageState(64, refuse_written=False)
    state.begin_first_round()
    state.on_written(np.array([3]))
    state.apply_hints(np.array([[0, 8]], dtype=np.uint64))
    assert state.is_skip([3])[0] and state.pages_refused_written == 0
    state.on_written(np.array([3, 3, 4]))
    assert not state.is_skip([3])[0] and not state.is_skip([4])[0] and state.skips_invalidated == 2


def test_skips_invalidated_counts_only_skips_a_write_cleared():
    state = HostPageState(64)
    state.begin_first_round()
    state.on_written(np.array([40]))  # no skip there: a fault, not an invalidation
    state.apply_hints(np.array([[0, 16]], dtype=np.uint64))
    state.on_written(np.array([1, 2, 2, 30]))
    assert state.skips_invalidated == 2


def test_non_multiple_page_count():
    state = HostPageState(1000)  # not a multiple of 8, nor of 1024
    state.begin_first_round()
    assert state.count_dirty() == 1000 and state.dirty_in().all() and len(state.dirty_in()) == 1000
    state.apply_hints(np.array([[512, 256], [768, 128], [992, 8]], dtype=np.uint64))
    skip = state.skip_in()
    assert skip[512:896].all() and skip[992:1000].all() and not skip[896:992].any()
    assert state.count_skip() == 392
    state.on_written(np.arange(990, 1000))
    state.begin_round()
    assert state.count_dirty() == 10 and np.flatnonzero(state.dirty_in()).tolist() == list(range(990, 1000))


def test_one_bit_per_page():
    n = 1 << 26  # the default --max-guest-pages
    assert HostPageState.BYTES_PER_PAGE == 3 / 8
    assert HostPageState.nbytes_for(n) == 3 * n // 8 == 24 << 20
    state = HostPageState(1 << 20)
    assert state.nbytes == HostPageState.nbytes_for(1 << 20) == 3 << 17
    assert HostPageState.nbytes_for(1000) == 3 * 128  # padded to whole 1024-page units


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
    mark_pages(state, np.flatnonzero(rng.random(n) < pre_skip))
    state.on_written(np.flatnonzero(rng.random(n) < written_frac))
    before = state.skip_in()
    marked = state.apply_hints(ranges)
    ref = reference(n, ranges, state.written_in(), before)
    assert np.array_equal(state.skip_in(), ref)
    assert marked == int(np.count_nonzero(ref & ~before))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), frames=st.integers(1, 40), per_frame=st.integers(1, 64),
       repeat=st.booleans())
def test_staged_frames_equal_per_range_loop(seed, frames, per_frame, repeat):
    """Frames staged and applied together, also the same blocks in several frames (a guest may
    hint a block again in a later frame): the bitmap is the OR of them, nothing more."""
    n = 1 << 14
    rng = np.random.default_rng(seed)
    runs = np.repeat(rng.random(n // 32) < 0.6, 32) & (rng.random(n) < 0.9)
    pfns, orders = decompose(runs)
    state = HostPageState(n)
    state.begin_first_round()
    state.on_written(rng.integers(0, n, size=n // 50))
    sent = []
    for _ in range(frames):
        pick = np.sort(rng.choice(len(pfns), size=min(per_frame, len(pfns)), replace=False))
        if repeat and sent and rng.random() < 0.5:
            pick = sent[-1]  # the previous frame again
        sent.append(pick)
        state.stage_hints(np.column_stack((pfns[pick], np.uint64(1) << orders[pick].astype(np.uint64))))
    assert state.staged_blocks == sum(len(p) for p in sent) < HostPageState.STAGE_RANGES
    all_ranges = np.concatenate([np.column_stack((pfns[p], np.uint64(1) << orders[p].astype(np.uint64)))
                                 for p in sent])
    ref = reference(n, all_ranges, state.written_in())
    assert np.array_equal(state.skip_in(), ref)  # reading applies what is staged
    assert state.staged_blocks == 0


def test_staging_applies_on_its_own_when_full():
    state = HostPageState(1 << 16)
    state.begin_first_round()
    starts = np.arange(0, HostPageState.STAGE_RANGES, dtype=np.uint64) * 8
    for i in range(0, len(starts), 32):
        state.stage_hints(np.column_stack((starts[i:i + 32], np.full(32, 8, dtype=np.uint64))))
    assert state.staged_blocks == 0  # the last frame reached the bound
    assert state.pages_marked == 8 * HostPageState.STAGE_RANGES


@pytest.mark.parametrize("refuse", [True, False])
def test_fault_between_staging_and_applying_is_refused(refuse):
    """A write fault arriving after a hint was staged and before it is applied: the staged hint
    must not put the faulted page into the skip bitmap. The fault does not wait for the staged
    hints; the refuse-written check at apply time keeps the page out, because the fault set
    ``written`` first. With the guard off the page is skipped: a lost write."""
    state = HostPageState(64, refuse_written=refuse)
    state.begin_first_round()
    state.stage_hints(np.array([[8, 8]], dtype=np.uint64))  # pages 8..15
    assert state.on_written(np.array([11])) == 1
    assert state.staged_blocks == 1  # not applied by the fault
    skip = state.skip_in()  # applies it
    assert skip[8:11].all() and skip[12:16].all()
    assert skip[11] == (not refuse)
    assert state.pages_refused_written == (1 if refuse else 0)


def test_round_end_applies_staged_hints_in_their_round():
    """Hints staged in a round are applied before the next round begins: applied after the swap,
    a hint would meet an empty ``written`` and skip a page written after its walk."""
    state = HostPageState(64)
    state.begin_first_round()
    state.stage_hints(np.array([[0, 8]], dtype=np.uint64))
    state.on_written(np.array([2]))
    state.begin_round()
    assert state.staged_blocks == 0
    assert np.flatnonzero(state.dirty_in()).tolist() == [2]
    assert not state.is_skip([2])[0] and state.count_skip() == 7


def test_on_written_any_order_and_repeats():
    state = HostPageState(256)
    state.begin_first_round()
    state.apply_hints(np.array([[0, 128]], dtype=np.uint64))
    pfns = np.array([9, 3, 9, 8, 100, 3, 10, 11, 12, 13, 14, 15, 1], dtype=np.int64)
    assert state.on_written(pfns) == len(set(pfns.tolist()))
    assert np.flatnonzero(state.written_in()).tolist() == sorted(set(pfns.tolist()))
    assert np.flatnonzero(~state.skip_in(0, 128)).tolist() == sorted(set(pfns.tolist()))
    assert state.on_written(pfns[::-1]) == 0 and state.faults == len(set(pfns.tolist()))


def test_pagebits_ranges_and_counts():
    rng = np.random.default_rng(5)
    mask = rng.random(5000) < 0.3
    bits = PageBits.from_mask(mask)
    assert bits.count() == int(mask.sum())
    for a, b in ((0, 5000), (3, 17), (8, 4096), (4999, 5000), (100, 100)):
        assert np.array_equal(bits.get(a, b), mask[a:b])
    idx = rng.integers(0, 5000, 100)
    assert np.array_equal(bits.gather(idx), mask[idx])
    more = np.zeros(5000, dtype=bool)
    more[13:77] = rng.random(64) < 0.5
    bits.add_mask(13, more[13:77])
    bits.add_mask(1024, more[13:77])
    want = mask | more
    want[1024:1088] |= more[13:77]
    assert np.array_equal(bits.get(), want)
    full = PageBits(5000, fill=True)
    assert full.count() == 5000 and full.get().all()


@pytest.mark.parametrize("n", [4096, 4093])
def test_send_set_and_stayed_free_equal_bool_reference(n):
    """The engine's per-chunk view (bytes when aligned, unpacked otherwise) against bool arrays."""
    rng = np.random.default_rng(n)
    state = HostPageState(n)
    state.begin_first_round()
    state.on_written(np.flatnonzero(rng.random(n) < 0.3))
    state.begin_round()  # dirty: those pages
    mark_pages(state, np.flatnonzero(rng.random(n) < 0.4))
    state.on_written(np.flatnonzero(rng.random(n) < 0.1))
    dirty, skip, written = state.dirty_in(), state.skip_in(), state.written_in()
    free_start = rng.random(n) < 0.5
    free_now = free_start & (rng.random(n) < 0.8)
    start_bits = PageBits.from_mask(free_start)
    for bounds in ([0, 1024, 2048, n], [0, 3, 1000, 1001, n]):
        skipped = PageBits(n)
        for a, b in zip(bounds[:-1], bounds[1:]):
            go, nskip = state.send_set(a, b, skipped)
            assert go.tolist() == (np.flatnonzero(dirty[a:b] & ~skip[a:b]) + a).tolist()
            assert nskip == int(np.count_nonzero(dirty[a:b] & skip[a:b]))
        assert np.array_equal(skipped.get(), dirty & skip)
        stayed_ref = free_start & free_now & ~written & dirty
        got = [state.stayed_free(a, a + 1024, start_bits, free_now[a:a + 1024], skipped) for a in range(0, n, 1024)]
        assert sum(g[0] for g in got) == int(stayed_ref.sum())
        assert sum(g[1] for g in got) == int((stayed_ref & dirty & skip).sum())


def test_on_written_a_few_pages_at_a_time_equals_one_call():
    """The fault handler records a few pages per call: the same state as one call with them all."""
    rng = np.random.default_rng(15)
    n = 1000
    pages = rng.integers(0, n, size=300)
    hinted = np.flatnonzero(rng.random(n) < 0.5)
    a, b = HostPageState(n), HostPageState(n)
    for s in (a, b):
        s.begin_first_round()
        mark_pages(s, hinted)
    cuts = np.cumsum([0] + [1, 2, 5, 8, 3, 9, 40] * 8)  # calls of 1..9 pages (scalar path) and 40 (arrays)
    assert cuts[-1] >= len(pages)
    firsts = sum(a.on_written(pages[i:j]) for i, j in zip(cuts[:-1], cuts[1:]))
    assert firsts == b.on_written(pages) == len(set(pages.tolist()))
    assert np.array_equal(a.written_in(), b.written_in()) and np.array_equal(a.skip_in(), b.skip_in())
    assert a.is_written(pages).all() and not a.is_skip(pages).any()
    with pytest.raises(IndexError):
        a.on_written(np.array([n]))
