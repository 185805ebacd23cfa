"""Tests for hintpipe.guest.buddy: a Linux-like buddy allocator in numpy."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hintpipe.guest.buddy import ISOLATED, REPORTED, BuddyAllocator, MigrateType
from hintpipe.units import MAX_ORDER

# Not a multiple of 1024: the tail is covered by smaller aligned blocks.
N = 3 * 1024 + 512 + 64 + 3


def fresh_counts(n: int) -> np.ndarray:
    return BuddyAllocator(n).free_counts()


def brute_counts(a: BuddyAllocator) -> np.ndarray:
    """Recount listed free blocks per order from the per-page arrays."""
    heads = np.flatnonzero(a.head)
    listed = heads[(a.meta[heads] & ISOLATED) == 0]
    return np.bincount(a.head[listed].astype(np.int64) - 1, minlength=MAX_ORDER + 1)


def test_populate_tail_and_counts():
    a = BuddyAllocator(N)
    a.check_invariants()
    assert a.nr_free_pages == N
    c = a.free_counts()
    assert c[MAX_ORDER] == 3 and c[9] == 1 and c[6] == 1 and c[1] == 1 and c[0] == 1
    assert int((c * (1 << np.arange(MAX_ORDER + 1))).sum()) == N
    assert (brute_counts(a) == c).all()
    pfns, orders = a.free_blocks()
    assert list(orders) == sorted(orders, reverse=True)
    assert a.is_free_head(pfns, orders).all()


def test_unpopulated_is_all_allocated():
    a = BuddyAllocator(2048, populate=False)
    a.check_invariants()
    assert a.nr_free_pages == 0 and a.alloc(0) is None
    a.free(0, MAX_ORDER)
    a.free(1024, 9)
    a.free(1536, 9)
    a.check_invariants()
    assert list(a.free_counts()) == [0] * MAX_ORDER + [2]


def test_alloc_split_lifo_and_merge_back():
    a = BuddyAllocator(2048)
    p = a.alloc(0)
    a.check_invariants()
    # expand(): one upper half per order 0..9 plus the untouched 1024 block
    assert list(a.free_counts()) == [1] * MAX_ORDER + [1]
    q = a.alloc(3)
    a.free(q, 3)
    assert a.alloc(3) == q  # LIFO: most recently freed first
    a.free(q, 3)
    a.free(p, 0)
    a.check_invariants()
    assert list(a.free_counts()) == [0] * MAX_ORDER + [2]


def test_fallback_to_other_migratetype():
    a = BuddyAllocator(1024)  # all MOVABLE
    p = a.alloc(2, MigrateType.UNMOVABLE)
    assert p is not None
    a.check_invariants()
    # remainders were given to the stealing migratetype
    assert a.alloc(2, MigrateType.UNMOVABLE) is not None
    a.free(p, 2, MigrateType.UNMOVABLE)
    a.check_invariants()


def test_exhaustion_returns_none():
    a = BuddyAllocator(1024 + 3)
    got = []
    while (p := a.alloc(0)) is not None:
        got.append(p)
    assert sorted(got) == list(range(1024 + 3))
    assert a.nr_free_pages == 0
    assert a.alloc(0) is None


@pytest.mark.parametrize(
    "pfn,order",
    [(1, 1), (-2, 1), (N, 0), (N - 1, 1), (0, MAX_ORDER + 1), (0, -1)],
)
def test_free_bad_args_raise(pfn, order):
    a = BuddyAllocator(N, populate=False)
    with pytest.raises(ValueError):
        a.free(pfn, order)


def test_double_free_raises():
    a = BuddyAllocator(N)
    p = a.alloc(4)
    a.free(p, 4)
    with pytest.raises(ValueError, match="double free"):
        a.free(p, 4)
    with pytest.raises(ValueError, match="double free"):
        a.free(p, 0)  # part of a free block
    a.check_invariants()


def test_alloc_at():
    a = BuddyAllocator(N)
    assert a.alloc_at(512 + 8, 3)
    assert not a.alloc_at(512 + 8, 3)  # already taken
    assert not a.alloc_at(512, 4)  # partly taken
    assert not a.alloc_at(3, 2)  # misaligned
    assert not a.alloc_at(N - 1, 1)  # out of range
    a.check_invariants()
    assert not a.free_mask[520:528].any() and a.free_mask[512:520].all()
    a.free(520, 3)
    a.check_invariants()
    assert (a.free_counts() == fresh_counts(N)).all()


def test_alloc_bulk_max_order_and_split():
    a = BuddyAllocator(N)
    got = a.alloc_bulk(2 * 1024)
    assert got.dtype == np.uint64 and got.size == 2
    a.check_invariants()
    assert not a.free_mask[got[0] : got[0] + 1024].any()
    b = a.alloc_bulk(700, order=6)  # 11 blocks of 64 pages: 9+1 small, 1 split
    a.check_invariants()
    assert b.size == 11 and ((b % 64) == 0).all() and np.unique(b).size == 11
    assert a.nr_free_pages == N - 2 * 1024 - 11 * 64
    for p in got.tolist():
        a.free(p, MAX_ORDER)
    for p in b.tolist():
        a.free(p, 6)
    a.check_invariants()
    assert (a.free_counts() == fresh_counts(N)).all()


def test_alloc_bulk_runs_out():
    a = BuddyAllocator(4096)
    got = a.alloc_bulk(10 * 1024)
    assert got.size == 4 and a.nr_free_pages == 0
    a.check_invariants()


def test_isolate_putback_reported_semantics():
    a = BuddyAllocator(2048)
    # make 0..1023 two free order-9 buddies 0 and 512, plus allocated stuff
    x = a.alloc_bulk(1024)
    assert x.tolist() == [1024]
    a.alloc_at(0, MAX_ORDER)
    a.free(0, 9)
    assert a.is_free_head([0], 9).all()
    a.isolate([0], [9])
    a.check_invariants()
    assert not a.is_free_head([0], 9).any()
    assert a.meta[0] & ISOLATED and a.free_mask[:512].all()
    assert a.nr_free_pages == 0 and a.nr_isolated_pages == 512
    assert a.alloc(0) is None  # isolated pages are not allocatable
    a.free(512, 9)  # buddy isolated: must not merge
    a.check_invariants()
    assert a.is_free_head([512], 9).all()
    a.isolate([512], [9])
    hp, ho = a.putback([0], [9])
    assert (hp.tolist(), ho.tolist()) == ([0], [9])
    assert a.meta[0] & REPORTED  # did not merge: reported
    hp, ho = a.putback([512], [9])
    assert (hp.tolist(), ho.tolist()) == ([0], [10])
    assert not a.meta[0] & REPORTED  # merged: new, unreported
    a.check_invariants()
    with pytest.raises(ValueError):
        a.putback([0], [10])
    with pytest.raises(ValueError):
        a.isolate([1024], [10])  # allocated
    a.check_invariants()


def test_is_free_head_bounds_and_orders():
    a = BuddyAllocator(2048)
    ok = a.is_free_head([0, 1024, 0, -1024, 4096, 512], [10, 10, 9, 10, 10, 9])
    assert ok.tolist() == [True, True, False, False, False, False]
    assert a.is_free_head(np.array([0, 1024]), 10).all()  # scalar order broadcasts
    a.isolate([1024], [10])
    assert a.is_free_head([0, 1024], [10, 10]).tolist() == [True, False]
    a.putback([1024], [10], mark_reported=False)
    assert not a.is_reported([1024]).any()
    a.check_invariants()


def test_insert_log_clears_reported():
    a = BuddyAllocator(2048)
    a.enable_insert_log(9)
    p = a.alloc(MAX_ORDER)
    lp, lo = a.drain_insert_log()
    assert lp.size == 0  # no split, nothing inserted
    a.mark_reported([1024 - p])  # the other max-order block
    q = a.alloc(0)
    lp, lo = a.drain_insert_log()
    assert (lp.tolist(), lo.tolist()) == ([q + 512], [9])  # order >= 9 only
    a.free(q, 0)
    lp, lo = a.drain_insert_log()
    assert lp.tolist() == [q] and lo.tolist() == [MAX_ORDER]
    assert not a.is_reported([q]).any()
    a.disable_insert_log()
    a.free(p, MAX_ORDER)
    assert a.drain_insert_log()[0].size == 0
    a.check_invariants()


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, MAX_ORDER), st.integers(0, 2)),
        st.tuples(st.just("free"), st.integers(0, 10**6), st.integers(0, 2)),
        st.tuples(st.just("alloc_at"), st.integers(0, N - 1), st.integers(0, MAX_ORDER)),
        st.tuples(st.just("isolate"), st.integers(0, 10**6), st.just(0)),
        st.tuples(st.just("putback"), st.integers(0, 10**6), st.booleans()),
        st.tuples(st.just("bulk"), st.integers(1, 3000), st.integers(0, MAX_ORDER)),
    ),
    max_size=60,
)


@settings(derandomize=True, max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_random_ops_keep_invariants(ops):
    a = BuddyAllocator(N)
    allocated: dict[int, int] = {}  # pfn -> order
    isolated: dict[int, int] = {}
    used = np.zeros(N, dtype=np.bool_)  # independent model of allocated pages

    def take(p: int, o: int) -> None:
        assert not used[p : p + (1 << o)].any(), "allocator handed out a used page"
        used[p : p + (1 << o)] = True
        allocated[p] = o

    for op, x, y in ops:
        if op == "alloc":
            p = a.alloc(x, MigrateType(y))
            if p is None:
                # only when no listed block of order >= x exists
                assert a.free_counts()[x:].sum() == 0
            else:
                assert p % (1 << x) == 0
                take(p, x)
        elif op == "free" and allocated:
            p = sorted(allocated)[x % len(allocated)]
            o = allocated.pop(p)
            used[p : p + (1 << o)] = False
            a.free(p, o, MigrateType(y))
            with pytest.raises(ValueError):
                a.free(p, o)
        elif op == "alloc_at":
            p = x & ~((1 << y) - 1)
            if a.alloc_at(p, y):
                take(p, y)
        elif op == "isolate":
            pf, of = a.free_blocks()
            if pf.size:
                i = x % pf.size
                a.isolate(pf[i : i + 1], of[i : i + 1])
                isolated[int(pf[i])] = int(of[i])
        elif op == "putback" and isolated:
            p = sorted(isolated)[x % len(isolated)]
            a.putback([p], [isolated.pop(p)], mark_reported=y)
        elif op == "bulk":
            for p in a.alloc_bulk(x, y).tolist():
                take(p, y)
        a.check_invariants()
        assert (~a.free_mask == used).all()
        assert a.nr_free_pages + a.nr_isolated_pages + int(used.sum()) == N
        assert (brute_counts(a) == a.free_counts()).all()
    # give everything back: the kernel's merging restores max-order blocks
    for p, o in allocated.items():
        a.free(p, o)
    if isolated:
        a.putback(list(isolated), list(isolated.values()))
    a.check_invariants()
    assert a.nr_free_pages == N
    assert (a.free_counts() == fresh_counts(N)).all()


def test_big_allocator_builds():
    """2**26 pages (256 GiB guest) by default; 2**28 with HINTPIPE_BIG_TESTS=1."""
    n = 1 << (28 if os.environ.get("HINTPIPE_BIG_TESTS") else 26)
    a = BuddyAllocator(n)
    assert a.nr_free_pages == n
    assert a.free_counts()[MAX_ORDER] == n >> MAX_ORDER
    state = a.head.nbytes + a.meta.nbytes + a.free_mask.nbytes
    assert state <= 3 * n
    got = a.alloc_bulk(int(0.4 * n))
    assert got.size == -(-int(0.4 * n) // 1024)
    assert a.nr_free_pages == n - got.size * 1024
    pf, of = a.free_blocks(9)
    assert pf.size == (n >> MAX_ORDER) - got.size
    assert a.is_free_head(pf, of).all()
    assert not a.free_mask[got.astype(np.int64)].any()
