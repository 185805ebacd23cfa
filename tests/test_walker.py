"""Tests for hintpipe.guest.walker: the lock-bounded free-list walker."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hintpipe.guest.buddy import ISOLATED, REPORTED, BuddyAllocator
from hintpipe.guest.walker import FreeListWalker
from hintpipe.units import MAX_ORDER

N = 1 << 13
MIN_ORDER = 3
BIG_BUDGET = 1e9  # tests never depend on wall time


def fragmented(seed: int, n: int = N, frac: float = 0.5):
    """An allocator with about ``frac`` of its pages allocated in mixed orders."""
    rng = np.random.default_rng(seed)
    a = BuddyAllocator(n)
    held: dict[int, int] = {}
    while a.nr_free_pages > n * (1 - frac):
        o = int(rng.integers(0, 6))
        p = a.alloc(o)
        if p is not None:
            held[p] = o
    # free a random third back so the free lists are fragmented
    for p in rng.permutation(sorted(held))[: len(held) // 3].tolist():
        a.free(p, held.pop(p))
    return a, held, rng


def random_ops(a: BuddyAllocator, held: dict, rng, k: int, after=None) -> None:
    """k random allocs/frees between two batches (the lock is dropped).

    ``after()`` runs after each op, so a test can see a block leave the
    free lists even if a later op puts it back.
    """
    for _ in range(k):
        if held and rng.random() < 0.5:
            p = sorted(held)[int(rng.integers(len(held)))]
            a.free(p, held.pop(p))
        else:
            o = int(rng.integers(0, MAX_ORDER + 1))
            p = a.alloc(o)
            if p is not None:
                held[p] = o
        if after is not None:
            after()


def listed_at_least(a: BuddyAllocator, min_order: int) -> set[tuple[int, int]]:
    p, o = a.free_blocks(min_order)
    return set(zip(p.tolist(), o.tolist()))


def still_heads(a, blocks) -> set:
    if not blocks:
        return set()
    arr = np.array(sorted(blocks), dtype=np.int64)
    ok = a.is_free_head(arr[:, 0], arr[:, 1])
    return {b for b, k in zip(sorted(blocks), ok.tolist()) if k}


@settings(derandomize=True, max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.sampled_from([1, 3, 8, 32]),
       ops=st.integers(0, 12))
def test_walk_invariants_under_concurrent_churn(seed, batch, ops):
    a, held, rng = fragmented(seed)
    w = FreeListWalker(a, min_order=MIN_ORDER, batch=batch, time_budget_us=BIG_BUDGET)
    w.start_round()
    initial = listed_at_least(a, MIN_ORDER)
    stayed_free = set(initial)  # blocks that stay free heads the whole round
    reported: set = set()  # reported this round and still the same free block
    all_reported: set = set()
    for _ in range(100_000):
        pfns, orders = w.next_batch()
        assert pfns.size <= batch
        assert pfns.dtype == np.uint64 and orders.dtype == np.uint8
        if pfns.size == 0:
            break
        assert (orders >= MIN_ORDER).all()
        # every returned block is a free-list head of that order right now
        assert a.is_free_head(pfns, orders).all()
        assert a.is_reported(pfns).all()
        got = set(zip(pfns.tolist(), orders.tolist()))
        assert len(got) == pfns.size, "duplicate inside one batch"
        # never reported twice unless it stopped being that free block since
        assert not (got & reported), "block reported twice without being freed again"
        reported |= got
        all_reported |= got
        # the lock is dropped: the guest allocates and frees meanwhile
        def after():
            nonlocal reported, stayed_free
            reported = still_heads(a, reported)
            stayed_free = still_heads(a, stayed_free)

        random_ops(a, held, rng, ops, after)
        a.check_invariants()
    else:
        pytest.fail("walk did not terminate")
    assert w.done
    assert w.next_batch()[0].size == 0
    # covers every block that stayed free the whole round
    assert stayed_free <= all_reported
    # ... and every block free now at >= min_order (including those freed or
    # merged during the walk) was reported: nothing was missed
    assert listed_at_least(a, MIN_ORDER) <= reported
    assert w.stats.max_batch_len <= batch
    assert w.stats.blocks >= len(all_reported)


def test_higher_order_freed_midwalk_is_reported_next_batch():
    a = BuddyAllocator(8 * 1024)
    for k in range(4):
        assert a.alloc_at(k * 1024, 9)  # leaves a free order-9 block at k*1024+512
    assert a.alloc_at(4096, MAX_ORDER)
    w = FreeListWalker(a, min_order=9, batch=2, time_budget_us=BIG_BUDGET)
    w.start_round()
    seen = []
    for _ in range(3):
        p, o = w.next_batch()
        seen += list(zip(p.tolist(), o.tolist()))
    assert [o for _, o in seen] == [10, 10, 10, 9, 9, 9]  # top order first
    a.free(4096, MAX_ORDER)  # freed at order 10 after the walk moved on to 9
    p, o = w.next_batch()
    assert list(zip(p.tolist(), o.tolist())) == [(4096, 10), (3 * 1024 + 512, 9)]
    assert w.next_batch()[0].size == 0 and w.done


def test_freed_again_is_reported_again_and_new_round_resets():
    a = BuddyAllocator(4 * 1024)
    w = FreeListWalker(a, min_order=MAX_ORDER, batch=32, time_budget_us=BIG_BUDGET)
    w.start_round()
    p, o = w.next_batch()
    assert sorted(p.tolist()) == [0, 1024, 2048, 3072]
    assert w.next_batch()[0].size == 0 and w.done
    # a new round reports everything again
    w.start_round()
    p, o = w.next_batch()
    assert p.size == 4
    x = a.alloc(MAX_ORDER)
    a.free(x, MAX_ORDER)  # freed again: unreported, logged
    p2, _ = w.next_batch()
    assert p2.tolist() == [x]
    assert w.next_batch()[0].size == 0 and w.done
    # after the round is done, frees are not reported (the walk has ended)
    x = a.alloc(MAX_ORDER)
    a.free(x, MAX_ORDER)
    assert w.next_batch()[0].size == 0


def test_zero_time_budget_still_terminates():
    a, held, rng = fragmented(7)
    w = FreeListWalker(a, min_order=MIN_ORDER, batch=16, time_budget_us=0.0)
    w.start_round()
    n_blocks = len(listed_at_least(a, MIN_ORDER))
    total = 0
    for _ in range(10 * n_blocks + 10):
        p, _ = w.next_batch()
        total += p.size
        if w.done:
            break
    assert w.done
    assert total == n_blocks
    pct = w.stats.percentiles()
    assert pct["max_us"] >= pct["p99_us"] >= pct["p50_us"] > 0
    assert w.stats.batches == w.stats.batch_durations().size
    assert w.stats.blocks == n_blocks and w.stats.max_batch_len <= 16


def test_stop_abandons_walk():
    a = BuddyAllocator(16 * 1024)
    w = FreeListWalker(a, min_order=9, batch=4, time_budget_us=BIG_BUDGET)
    w.start_round()
    assert w.next_batch()[0].size == 4
    w.stop()
    assert w.done and w.next_batch()[0].size == 0
    a.free(a.alloc(MAX_ORDER), MAX_ORDER)
    assert w.next_batch()[0].size == 0


@settings(derandomize=True, max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.sampled_from([1, 4, 32]))
def test_isolate_mode(seed, batch):
    a, held, rng = fragmented(seed)
    fresh = BuddyAllocator(N).free_counts()
    w = FreeListWalker(a, min_order=MIN_ORDER, batch=batch, time_budget_us=BIG_BUDGET,
                       isolate=True)
    w.start_round()
    inflight: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(100_000):
        pfns, orders = w.next_batch()
        assert pfns.size <= batch
        if pfns.size == 0:
            break
        ip = pfns.astype(np.int64)
        # isolated: still free pages, but off the lists
        assert (a.meta[ip] & ISOLATED).all() and a.free_mask[ip].all()
        assert not a.is_free_head(pfns, orders).any()
        for p, o in zip(ip.tolist(), orders.tolist()):
            assert not a.alloc_at(p, o)
        inflight.append((pfns, orders))
        random_ops(a, held, rng, 4)
        # nothing allocated may overlap an in-flight block
        for p, o in zip(ip.tolist(), orders.tolist()):
            assert a.free_mask[p : p + (1 << o)].all()
        a.check_invariants()
        if i % 2:  # the host acks older batches out of order
            rp, ro = inflight.pop(0)
            w.release(rp, ro)
            a.check_invariants()
    else:
        pytest.fail("walk did not terminate")
    assert w.done
    with pytest.raises(ValueError):
        w.release([N + 1024], [MAX_ORDER])
    for rp, ro in inflight:
        w.release(rp, ro)
    assert w.inflight == 0
    for p, o in held.items():
        a.free(p, o)
    a.check_invariants()
    assert a.nr_isolated_pages == 0
    assert (a.free_counts() == fresh).all()  # merged back to max-order blocks


def test_isolate_release_after_stop_is_rereported_next_round():
    a = BuddyAllocator(4 * 1024)
    held = a.alloc_bulk(2 * 1024)  # two max-order blocks allocated, two free
    w = FreeListWalker(a, min_order=MAX_ORDER, batch=1, time_budget_us=BIG_BUDGET,
                       isolate=True)
    w.start_round()
    p1, o1 = w.next_batch()
    w.stop()
    w.start_round()  # new command id: p1 is still in flight from the old round
    p2, o2 = w.next_batch()
    assert p2.tolist() != p1.tolist()
    w.release(p1, o1)  # acked late: comes back unreported, for this round
    assert not a.meta[int(p1[0])] & REPORTED
    p3, o3 = w.next_batch()
    assert p3.tolist() == p1.tolist()
    w.release(p2, o2)
    w.release(p3, o3)
    assert a.meta[int(p3[0])] & REPORTED  # current round, did not merge
    assert w.next_batch()[0].size == 0 and w.done
    for p in held.tolist():
        a.free(p, MAX_ORDER)
    a.check_invariants()


def test_a_walk_imports_nothing_inside_its_holds():
    """A hold must not import a module: an import costs milliseconds of CPU inside the zone lock
    (np.unique's first call imports numpy.ma: a 10-20 ms hold in the demo). A fresh interpreter
    walks a guest whose blocks of two orders are freed mid-walk (the insert-log path) and checks
    that no module appeared during its batches."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys
from hintpipe.guest.buddy import BuddyAllocator
from hintpipe.guest.walker import FreeListWalker
a = BuddyAllocator(1 << 14)
heads = [a.alloc(10) for _ in range(8)] + [a.alloc(9) for _ in range(8)]
w = FreeListWalker(a, min_order=9, batch=2, time_budget_us=1e9)
w.start_round()
before = set(sys.modules)
w.next_batch()
for p in heads[:4]:
    a.free(p, 10)
for p in heads[8:12]:
    a.free(p, 9)
n = 0
while not w.done:
    n += len(w.next_batch()[0])
new = sorted(set(sys.modules) - before)
assert n > 0, n
print(" ".join(new))
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported inside a hold: {out.stdout.strip()}"
