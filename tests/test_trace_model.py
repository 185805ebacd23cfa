"""kpageflags decomposition and the replay model against slow references."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hintpipe.trace.events import EventBatch
from hintpipe.trace.model import ReplayModel
from hintpipe.trace.recording import open_recording
from hintpipe.trace.snapshot import count_by_order, decompose, parse_buddyinfo, read_buddyinfo, read_kpageflags_buddy
from test_trace_helpers import DATA, NUMPY, TAR, reference_replay, regex_rows, text


@pytest.mark.parametrize("rec", [NUMPY, TAR], ids=lambda p: p.name)
def test_initial_decomposition_matches_facts(rec):
    facts = json.loads((DATA / f"{rec.name}.facts.json").read_text())
    free = read_kpageflags_buddy(rec / "kpageflags.start.zst")
    assert len(free) == facts["kpageflags_pfns"]
    assert int(free.sum()) == facts["initial_free_pages"]
    assert count_by_order(free) == facts["initial_free_by_order"]
    bi = read_buddyinfo(rec / "buddyinfo.start")
    assert bi["by_order"] == facts["buddyinfo_start_by_order"]
    assert bi["free_pages"] == facts["buddyinfo_start_free_pages"]
    # The snapshot and buddyinfo.start are read milliseconds apart: close, not equal.
    assert abs(bi["free_pages"] - int(free.sum())) / bi["free_pages"] < 0.01


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=3000))
def test_decompose_is_maximal_aligned_cover(bits):
    mask = np.array(bits, bool)
    pfns, orders = decompose(mask)
    cover = np.zeros(len(mask), bool)
    for p, o in zip(pfns.tolist(), orders.tolist()):
        assert p % (1 << o) == 0 and not cover[p:p + (1 << o)].any()
        cover[p:p + (1 << o)] = True
        # maximal: the enclosing aligned block of order o+1 is not entirely free
        if o < 10:
            q = p & ~((1 << (o + 1)) - 1)
            assert q + (1 << (o + 1)) > len(mask) or not mask[q:q + (1 << (o + 1))].all()
    assert np.array_equal(cover, mask)
    assert list(orders) == sorted(orders, reverse=True)


@pytest.mark.parametrize("rec", [NUMPY, TAR], ids=lambda p: p.name)
def test_replay_equals_reference_model(rec):
    tr = open_recording(rec, chunk_size=1 << 20)
    ref = reference_replay(tr.initial_free, regex_rows(text(rec)))
    m = tr.model()
    m.run_to_end(step_events=7919)  # odd step: events of one page straddle steps
    assert m.done and m.events_applied == len(regex_rows(text(rec)))
    assert np.array_equal(m.free_mask, ref)
    assert m.nr_free_pages == int(ref.sum())
    assert m.free_by_order() == count_by_order(ref)


def test_advance_to_steps_allocations_and_frees():
    tr = open_recording(NUMPY, chunk_size=1 << 20)
    rows = regex_rows(text(NUMPY))
    arr = np.array([r[:4] for r in rows], dtype=np.int64)  # ts, type, pfn, order
    m = tr.model()
    t = m.peek_first_ts_ns()
    prev = t - 1
    steps = 0
    while not m.done:
        t += 5_000_000
        before = m.free_mask.copy()
        allocated, freed = m.advance_to(t)
        steps += 1
        assert m.events_applied == int(np.searchsorted(arr[:, 0], t, side="right"))
        # freed: exactly the pages that turned buddy-free during the step
        assert np.array_equal(freed, np.flatnonzero(m.free_mask & ~before))
        # allocated: every page of every mm_page_alloc of the step, once
        sel = arr[(arr[:, 0] > prev) & (arr[:, 0] <= t) & (arr[:, 1] == 0)]
        expect = np.unique(np.concatenate([np.arange(p, p + (1 << o)) for p, o in sel[:, 2:]] or [np.empty(0, np.int64)]))
        assert np.array_equal(allocated, expect)
        prev = t
    assert steps > 10
    assert np.array_equal(m.free_mask, reference_replay(tr.initial_free, rows))


def test_free_blocks_and_is_free_block():
    mask = np.zeros(4096, bool)
    mask[1024:2048] = True  # order 10
    mask[3:8] = True  # 3 (o0), 4..7 (o2)
    m = ReplayModel(mask, [])
    pfns, orders = m.free_blocks()
    assert pfns.tolist() == [1024, 4, 3] and orders.tolist() == [10, 2, 0]
    p2, o2 = m.free_blocks(min_order=2)
    assert p2.tolist() == [1024, 4]
    assert m.is_free_block(np.array([1024, 4, 3, 0, 5, 4095]), np.array([10, 2, 0, 0, 1, 1])).tolist() == \
        [True, True, True, False, True, False]  # 5..6 unaligned but free; 4095+2 is outside
    m.apply(EventBatch(ts_ns=np.array([1]), etype=np.array([0], np.uint8), pfn=np.array([1030], np.uint64),
                       order=np.array([1], np.uint8), migratetype=np.array([1], np.int8),
                       percpu_refill=np.array([0], np.uint8), cpu=np.array([0], np.uint16)))
    assert not m.is_free_block(np.array([1024]), np.array([10]))[0]
    assert m.nr_free_pages == 1024 + 5 - 2
    assert m.free_by_order()[10] == 0 and sum(n << k for k, n in enumerate(m.free_by_order())) == m.nr_free_pages


def test_same_page_events_in_one_step_apply_in_order():
    def batch(types, pfns, orders):
        n = len(types)
        return EventBatch(ts_ns=np.arange(n), etype=np.array(types, np.uint8), pfn=np.array(pfns, np.uint64),
                          order=np.array(orders, np.uint8), migratetype=np.zeros(n, np.int8),
                          percpu_refill=np.zeros(n, np.uint8), cpu=np.zeros(n, np.uint16))
    mask = np.zeros(2048, bool)
    m = ReplayModel(mask, [])
    # order-10 free (direct to buddy), then a page of it is zone-locked, then drained back.
    m.apply(batch([1, 3, 4, 3], [1024, 1030, 1030, 1500], [10, 0, 0, 2]))
    assert m.nr_free_pages == 1024 - 4
    # order-0 free goes to a pcp list: not buddy-free; free_batched changes nothing.
    m.apply(batch([1, 2], [5, 5], [0, 0]))
    assert not m.free_mask[5]


def test_buddyinfo_parse_rejects_garbage():
    from hintpipe.trace.errors import TraceError
    with pytest.raises(TraceError):
        parse_buddyinfo("Node 0, zone Normal 1 2 x\n")


def test_replay_report_keys():
    from hintpipe.trace.summary import replay_report
    tr = open_recording(TAR)
    m = tr.model()
    m.run_to_end()
    r = replay_report(tr, m)
    facts = json.loads((DATA / "tar-gzip.facts.json").read_text())
    assert r["trace"]["events"] == 30000
    assert r["initial"]["free_pages"] == facts["initial_free_pages"]
    assert r["initial"]["free_by_order"] == facts["initial_free_by_order"]
    assert r["final"]["reference_free_pages"] == facts["buddyinfo_end_free_pages"]
    assert r["final"]["free_pages"] == m.nr_free_pages and len(r["final"]["free_by_order"]) == 11
