"""The lock budget is a promise: every hold of either walker ends within the budget plus one step.

The walkers read an injected clock. Here that clock is a work meter: it advances by one
nanosecond for every element of the guest's per-page arrays (the allocator's head and meta
bytes, the replay model's free bitmap) that numpy reads or writes, and for every insert-log
entry converted. So a hold's measured length is the work it did, whatever this machine's speed,
and a step whose work grew with the guest size would show as a hold far above the bound.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hintpipe.guest import walker as walker_mod
from hintpipe.guest.buddy import BuddyAllocator
from hintpipe.guest.walker import LOG_CHUNK, FreeListWalker, step_slots
from hintpipe.trace.model import ReplayModel
from hintpipe.trace.replay import TraceWalker
from hintpipe.units import MAX_ORDER

NS = 1e-9  # metered time per element
BUDGET_US = 50.0  # free-list walker: a step covers at most a few thousand elements
TRACE_BUDGET_US = 200.0  # trace walker: a step reads one 65,536-page window
SIZES = [12, 15, 18, 21, 24]  # log2 of the guest's pages
PATTERNS = ["free", "full", "checker", "sparse", "small"]
PASSES = 4  # numpy passes a step makes over the elements it covers (gather, compare, ...)


class Meter:
    """A clock that advances with the work done on metered arrays."""

    def __init__(self) -> None:
        self.elements = 0

    def now(self) -> float:
        return self.elements * NS


def _plain(x):
    return x.view(np.ndarray) if isinstance(x, Metered) else x


class Metered(np.ndarray):
    """An array view that charges its meter for every element an operation touches."""

    meter: Meter

    def __array_finalize__(self, obj) -> None:
        self.meter = getattr(obj, "meter", None)

    def __getitem__(self, key):
        base = self.view(np.ndarray)
        out = base[key]
        if isinstance(out, np.ndarray) and np.may_share_memory(out, base):
            return metered(out, self.meter)  # a view: charged when an operation uses it
        self.meter.elements += np.size(out)  # a gather
        return out

    def __setitem__(self, key, value) -> None:
        target = self.view(np.ndarray)
        self.meter.elements += np.size(target[key])
        target[key] = _plain(value)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for x in inputs + tuple(kwargs.get("out", ())):
            if isinstance(x, Metered):
                self.meter.elements += x.size
        inputs = tuple(_plain(x) for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(x) for x in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        for x in args:
            if isinstance(x, Metered):
                self.meter.elements += x.size
        return func(*(_plain(x) for x in args), **kwargs)

    def nonzero(self):
        self.meter.elements += self.size
        return self.view(np.ndarray).nonzero()


def metered(arr: np.ndarray, meter: Meter) -> Metered:
    m = arr.view(Metered)
    m.meter = meter
    return m


class MeteredLog(dict):
    """An insert log whose iteration charges one element per entry."""

    meter: Meter

    def __iter__(self):
        for k in super().__iter__():
            self.meter.elements += 1
            yield k

    def values(self):
        for v in super().values():
            self.meter.elements += 1
            yield v


def meter_allocator(a: BuddyAllocator, meter: Meter) -> None:
    a.head = metered(a.head, meter)
    a.meta = metered(a.meta, meter)
    take = a.take_insert_log

    def take_metered():
        log = MeteredLog(take())
        log.meter = meter
        return log

    a.take_insert_log = take_metered


def fragment(pattern: str, n: int, rng: np.random.Generator) -> tuple[BuddyAllocator, list]:
    """An allocator of ``n`` pages in one of several shapes; returns it and its held blocks."""
    a = BuddyAllocator(n)
    held: list[tuple[int, int]] = []
    if pattern == "free":
        return a, held
    if pattern in ("full", "checker", "sparse"):
        order = 9
        heads = a.alloc_bulk(n, order).astype(np.int64).tolist()
        if pattern == "checker":
            keep = [p for p in heads if (p >> order) % 2]
            free = [p for p in heads if not (p >> order) % 2]
        elif pattern == "sparse":
            pick = rng.random(len(heads)) < 0.1
            free = [p for p, f in zip(heads, pick) if f]
            keep = [p for p, f in zip(heads, pick) if not f]
        else:
            free, keep = [], heads
        for p in free:
            a.free(p, order)
        held = [(p, order) for p in keep]
        return a, held
    # "small": mixed small orders over the whole guest, a third of them freed again
    while a.nr_free_pages > n // 2:
        o = int(rng.integers(0, 4))
        p = a.alloc(o)
        if p is not None:
            held.append((p, o))
    freed = set(rng.permutation(len(held))[: len(held) // 3].tolist())
    for i in sorted(freed):
        a.free(*held[i])
    return a, [b for i, b in enumerate(held) if i not in freed]


def churn(a: BuddyAllocator, held: list, rng: np.random.Generator, k: int) -> None:
    """Between holds: free and allocate a few large blocks (so the insert log fills)."""
    for _ in range(k):
        if held and rng.random() < 0.6:
            p, o = held.pop(int(rng.integers(len(held))))
            a.free(p, o)
        else:
            o = int(rng.integers(9, MAX_ORDER + 1))
            p = a.alloc(o)
            if p is not None:
                held.append((p, o))


def free_list_step_bound(min_order: int) -> int:
    """Most elements one step of a FreeListWalker touches, as the meter counts them."""
    return PASSES * max(step_slots(1 << min_order), LOG_CHUNK)


def walk_holds(walker, meter: Meter, before_batch=None) -> list[int]:
    """Metered elements of every hold of one walk."""
    holds = []
    walker.start_round()
    for _ in range(1_000_000):
        t0 = meter.elements
        pfns, _ = walker.next_batch()
        holds.append(meter.elements - t0)
        if walker.done:
            return holds
        if before_batch is not None:
            before_batch()
    raise AssertionError("walk did not end")


@settings(derandomize=True, max_examples=24, deadline=None)
@given(log_pages=st.sampled_from(SIZES), pattern=st.sampled_from(PATTERNS),
       min_order=st.sampled_from([3, 9]), batch=st.sampled_from([2, 32, 512]), seed=st.integers(0, 2**16))
def test_free_list_walker_holds_end_within_budget_plus_one_step(log_pages, pattern, min_order, batch, seed):
    if pattern == "small":
        log_pages = min(log_pages, 15)  # built block by block
    if batch == 2:
        log_pages = min(log_pages, 18)  # a hold per two blocks: keep the walk short
    event(f"2**{log_pages} pages, {pattern}")
    rng = np.random.default_rng(seed)
    a, held = fragment(pattern, 1 << log_pages, rng)
    meter = Meter()
    meter_allocator(a, meter)
    w = FreeListWalker(a, min_order=min_order, batch=batch, time_budget_us=BUDGET_US, clock=meter.now)
    for _ in range(2):  # the second walk starts with the first one's REPORTED flags to clear
        holds = walk_holds(w, meter, lambda: churn(a, held, rng, 3))
        bound = BUDGET_US * 1e3 + free_list_step_bound(min_order)
        assert max(holds) <= bound, f"a hold did {max(holds)} elements of work, bound {bound}"


def test_an_unbounded_step_breaks_the_promise(monkeypatch):
    """The property can fail: with a step that covers a whole pass, a big guest's hold does."""
    monkeypatch.setattr(walker_mod, "step_slots", lambda stride: 1 << 40)
    rng = np.random.default_rng(1)
    a, _ = fragment("checker", 1 << 24, rng)
    meter = Meter()
    meter_allocator(a, meter)
    w = FreeListWalker(a, min_order=9, batch=32, time_budget_us=BUDGET_US, clock=meter.now)
    assert max(walk_holds(w, meter)) > BUDGET_US * 1e3 + free_list_step_bound(9)


def trace_model(pattern: str, n: int, rng: np.random.Generator) -> ReplayModel:
    """A replay model whose free bitmap has one of several shapes."""
    if pattern == "free":
        mask = np.ones(n, bool)
    elif pattern == "full":
        mask = np.zeros(n, bool)
    elif pattern == "checker":
        mask = (np.arange(n) >> 9) % 2 == 0
    elif pattern == "sparse":
        mask = np.repeat(rng.random(-(-n >> 9)) < 0.1, 512)[:n]
    else:  # "small": runs of free pages of every length
        mask = np.repeat(rng.random(-(-n >> 3)) < 0.6, 8)[:n]
        mask &= rng.random(n) < 0.97
    return ReplayModel(mask, [])


@settings(derandomize=True, max_examples=24, deadline=None)
@given(log_pages=st.sampled_from(SIZES), pattern=st.sampled_from(PATTERNS),
       min_order=st.sampled_from([3, 9]), batch=st.sampled_from([2, 32, 512]), seed=st.integers(0, 2**16))
def test_trace_walker_holds_end_within_budget_plus_one_step(log_pages, pattern, min_order, batch, seed):
    if batch == 2:
        log_pages = min(log_pages, 18)  # a hold per two blocks: keep the walk short
    event(f"2**{log_pages} pages, {pattern}")
    rng = np.random.default_rng(seed)
    n = (1 << log_pages) + int(rng.integers(0, 4096))  # a ragged last window too
    model = trace_model(pattern, n, rng)
    meter = Meter()
    model.free_mask = metered(model.free_mask, meter)
    w = TraceWalker(model, min_order=min_order, batch=batch, time_budget_us=TRACE_BUDGET_US, clock=meter.now)
    victims = rng.permutation(n)

    def allocate_some():
        model.free_mask.view(np.ndarray)[victims[:64]] = False

    holds = walk_holds(w, meter, allocate_some)
    bound = TRACE_BUDGET_US * 1e3 + PASSES * TraceWalker.WINDOW
    assert max(holds) <= bound, f"a hold did {max(holds)} elements of work, bound {bound}"


@pytest.mark.parametrize("min_order", [3, 7, 9, 10])
def test_trace_walker_blocks_are_the_buddy_decomposition(min_order):
    """Whatever path a window takes (the row table or the general split), a walk without
    allocations returns exactly the maximal aligned free blocks of the bitmap."""
    from hintpipe.trace.snapshot import decompose

    rng = np.random.default_rng(min_order)
    n = (1 << 18) + 3 * 512 + 17
    mask = np.repeat(rng.random(-(-n >> 3)) < 0.7, 8)[:n]
    mask[: 1 << 14] = True
    w = TraceWalker(ReplayModel(mask, []), min_order=min_order, batch=7, time_budget_us=1e9)
    w.start_round()
    got = set()
    while not w.done:
        p, o = w.next_batch()
        got |= set(zip(p.tolist(), o.tolist()))
    p, o = decompose(mask, min_order)
    assert got == set(zip(p.tolist(), o.tolist()))


@pytest.mark.parametrize("reserve", [walker_mod.HOLD_RESERVE, 0.0])
def test_steps_stop_short_of_the_budget_by_its_reserve(monkeypatch, reserve):
    """Steps of a constant cost stop once the next one would reach into the reserve the hold
    keeps for its work around the steps; without a reserve they run up to the budget."""
    monkeypatch.setattr(walker_mod, "HOLD_RESERVE", reserve)
    now = [0.0]
    budget = walker_mod.HoldBudget(200e-6, lambda: now[0])
    budget.begin()
    steps = 0
    while True:
        now[0] += 10e-6  # every step costs 10 us
        steps += 1
        if budget.step_done():
            break
    end_us = budget.finish() * 1e6
    assert end_us == pytest.approx(200 * (1 - reserve), abs=10)  # stopped within one step of it
    assert end_us <= 200 * (1 - reserve) + 1e-6
