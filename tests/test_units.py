"""Page arithmetic of hintpipe.units: blocks and runs to pages and back."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hintpipe.units import block_pages, order_pages, page_runs, pages_order, run_pages


def test_runs_and_pages():
    starts, counts = page_runs(np.array([9, 1, 2, 3, 7, 9, 10]))
    assert starts.tolist() == [1, 7, 9] and counts.tolist() == [3, 1, 2]
    assert run_pages(starts, counts).tolist() == [1, 2, 3, 7, 9, 10]
    assert run_pages(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).size == 0


def test_run_pages_keeps_run_order_and_reports_the_run_of_each_page():
    pages, idx = run_pages(np.array([8, 0, 3], dtype=np.uint64), [2, 1, 1], return_index=True)
    assert pages.tolist() == [8, 9, 0, 3] and idx.tolist() == [0, 0, 1, 2]
    pages, idx = run_pages([5, 2], [1, 1], return_index=True)  # single pages: no expansion
    assert pages.tolist() == [5, 2] and idx.tolist() == [0, 1]
    assert run_pages([4, 6], [0, 2]).tolist() == [6, 7]  # as many pages as runs, not all single


def test_orders_and_page_counts():
    assert order_pages(9) == 512 and pages_order(512) == 9 and pages_order(1) == 0
    orders = np.array([0, 3, 10], dtype=np.uint8)
    assert order_pages(orders).tolist() == [1, 8, 1024]
    assert pages_order(order_pages(orders)).tolist() == [0, 3, 10]
    assert block_pages([16, 4], orders[:2]).tolist() == [16, 4, 5, 6, 7, 8, 9, 10, 11]


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=80))
def test_page_runs_roundtrip(pfns):
    starts, counts = page_runs(np.array(pfns, dtype=np.int64))
    assert (counts > 0).all()
    assert (starts[1:] > starts[:-1] + counts[:-1]).all()    # maximal: runs never touch
    assert run_pages(starts, counts).tolist() == sorted(set(pfns))
