"""A model of one migration's interleavings, checked by hypothesis step by step.

What this is: a rule-based state machine that drives the production allocator, walker, wire
connections (real frames) and host page state one step at a time, in any order hypothesis picks:
allocations, frees, writes, walker batches, hint delivery (possibly after the round that produced
them ended: a stale command id), chunks sent, round ends; at the end the guest is paused, the rest
is sent, and every allocated page is checked. What it is not: the migration engine. The send loop,
the round structure, the simulated write fault (``_write``) and the final check are re-implemented
here in a few lines, because hypothesis must own every step to reach interleavings a whole
migration under a clock reaches only by chance, and to shrink a failure to a few steps.

So this file shows that the page state and the protocol's rules are sufficient under any
interleaving of these steps; that each guard is *necessary* in a real migration, through
``MigrationEngine`` and its oracle, is shown by ``tests/test_guards.py``. The machine with
invalidation switched off must find a loss, so the check here can fail too. Hints are applied as
they are delivered or, as the host session does, staged and applied later (when the page state
is next read, or at the round end), so faults also land between a hint's staging and its
application.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from hintpipe.guest.buddy import BuddyAllocator
from hintpipe.guest.walker import FreeListWalker
from hintpipe.host.pagestate import HostPageState
from hintpipe.protocol import GuestConnection, HostConnection, Hints, RoundEnd, StaleHints
from hintpipe.units import block_pages

N = 1 << 12
CHUNK = 512


class HintingMachine(RuleBasedStateMachine):
    """One guest and its host, every step an explicit rule."""

    invalidate = True
    staged: bool | None = None  # None: hypothesis picks

    @initialize(isolate=st.booleans(), min_order=st.integers(0, 4), batch=st.integers(1, 8),
                used=st.integers(0, 3), staged=st.booleans())
    def setup(self, isolate, min_order, batch, used, staged):
        if self.staged is None:
            self.staged = staged
        self.alloc = BuddyAllocator(N)
        self.versions = np.zeros(N, dtype=np.uint32)
        self.state = HostPageState(N, invalidate=self.invalidate)
        self.dest = np.zeros(N, dtype=np.uint32)
        # no time budget: a wall-clock cut would make the example non-reproducible
        self.walker = FreeListWalker(self.alloc, min_order=min_order, batch=batch, isolate=isolate,
                                     time_budget_us=1e9)
        self.blocks: list[tuple[int, int]] = []
        for _ in range(used):  # some memory in use before migration starts
            self._alloc(10)
        # the wire: guest and host state machines exchanging real frames
        self.host = HostConnection()
        self.guest = GuestConnection()
        self.host.receive_data(self.guest.hello(N, window=64))
        assert self.host.next_event() is not None
        self.guest.receive_data(self.host.welcome(max_ranges=64))
        self.guest.next_event()
        # frames from guest to host, in order: ("hints", frame, pfns, orders) or ("end", frame)
        self.inflight: deque[tuple] = deque()
        self.cursor = 0
        self.round = 0
        self.state.begin_first_round()
        self._start_hinting()

    # -- guest side ----------------------------------------------------------------------
    def _write(self, pages: np.ndarray) -> None:
        protected = ~self.state.is_written(pages)
        if protected.any():  # the fault is handled before the write lands
            self.state.on_written(pages[protected])
        self.versions[pages] += 1

    def _alloc(self, order: int) -> None:
        pfn = self.alloc.alloc(order)
        if pfn is not None:
            self.blocks.append((pfn, order))
            self._write(block_pages([pfn], [order]))

    @rule(order=st.integers(0, 10))
    def alloc_and_write(self, order):
        self._alloc(order)

    @precondition(lambda self: self.blocks)
    @rule(i=st.integers(0, 1 << 16))
    def free(self, i):
        pfn, order = self.blocks.pop(i % len(self.blocks))
        self.alloc.free(pfn, order)

    @precondition(lambda self: self.blocks)
    @rule(i=st.integers(0, 1 << 16))
    def rewrite(self, i):
        pfn, order = self.blocks[i % len(self.blocks)]
        self._write(block_pages([pfn], [order]))

    @precondition(lambda self: self.hint_id is not None and self.guest.credits_available > 0)
    @rule()
    def walk_batch(self):
        pfns, orders = self.walker.next_batch()
        if len(pfns):
            ranges = np.column_stack((pfns.astype(np.uint64), np.uint64(1) << orders.astype(np.uint64)))
            self.inflight.append(("hints", self.guest.hints(self.hint_id, ranges), pfns, orders))
            self.sent_batches += 1

    # -- host side -----------------------------------------------------------------------
    @precondition(lambda self: self.inflight)
    @rule()
    def deliver_hint(self):
        kind, frame, *blocks = self.inflight.popleft()
        self.host.receive_data(frame)
        ev = self.host.next_event()
        if kind == "end":
            assert isinstance(ev, RoundEnd)
            return
        pfns, orders = blocks
        assert isinstance(ev, (Hints, StaleHints))
        if isinstance(ev, Hints):
            if self.staged:
                self.state.stage_hints(ev.ranges)
            else:
                self.state.apply_hints(ev.ranges)
        self.guest.receive_data(self.host.ack(1))
        self.guest.next_event()
        if self.walker.isolate:
            self.walker.release(pfns, orders)

    @rule()
    def send_chunk(self):
        a = self.cursor
        if a >= N:
            return
        b = min(N, a + CHUNK)
        go = np.flatnonzero(self.state.dirty_in(a, b) & ~self.state.skip_in(a, b)) + a
        self.dest[go] = self.versions[go]
        self.cursor = b

    @rule()
    def end_round(self):
        while self.cursor < N:
            self.send_chunk()
        self._stop_hinting()
        self.state.begin_round()
        self.cursor = 0
        self.round += 1
        self._start_hinting()

    def _start_hinting(self):
        if len(self.host.open_rounds) >= 8:  # a host waits for RoundEnd before it runs out of ids
            while self.inflight:
                self.deliver_hint()
        self.guest.receive_data(self.host.start_round())
        self.hint_id = self.guest.next_event().cmd_id
        self.sent_batches = 0
        self.walker.start_round()

    def _stop_hinting(self):
        if self.hint_id is None:
            return
        if self.host.current_cmd_id is not None:
            self.guest.receive_data(self.host.stop_round())
            self.guest.next_event()
        self.walker.stop()
        # RoundEnd is sent now, but hints already in flight stay in flight: they arrive stale
        self.inflight.append(("end", self.guest.round_end(self.hint_id, self.sent_batches)))
        self.hint_id = None

    @invariant()
    def allocator_consistent(self):
        if hasattr(self, "alloc"):
            assert self.alloc.nr_free_pages + self.alloc.nr_isolated_pages + sum(1 << o for _, o in self.blocks) == N

    def teardown(self):
        if not hasattr(self, "alloc"):
            return
        # stop-and-copy: the guest is paused, in-flight hints are stale by now
        while self.cursor < N:
            self.send_chunk()
        self._stop_hinting()
        while self.inflight:
            self.deliver_hint()
        self.state.begin_round()
        go = np.flatnonzero(self.state.dirty_in() & ~self.state.skip_in())
        self.dest[go] = self.versions[go]
        allocated = np.flatnonzero(~self.alloc.free_mask)
        lost = int(np.count_nonzero(self.dest[allocated] != self.versions[allocated]))
        assert lost == 0, f"{lost} allocated pages lost"


class BrokenInvalidationMachine(HintingMachine):
    invalidate = False


class BrokenInvalidationStagedMachine(HintingMachine):
    invalidate = False
    staged = True


SETTINGS = settings(max_examples=150, stateful_step_count=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_no_lost_write_under_any_interleaving():
    run_state_machine_as_test(HintingMachine, settings=SETTINGS)


def test_oracle_catches_loss_without_invalidation():
    # finding one loss is the point; shrinking it to a minimal example would only cost time
    no_shrink = settings(SETTINGS, phases=[Phase.explicit, Phase.generate])
    with pytest.raises(AssertionError, match="allocated pages lost"):
        run_state_machine_as_test(BrokenInvalidationMachine, settings=no_shrink)


def test_oracle_catches_loss_without_invalidation_staged():
    no_shrink = settings(SETTINGS, phases=[Phase.explicit, Phase.generate])
    with pytest.raises(AssertionError, match="allocated pages lost"):
        run_state_machine_as_test(BrokenInvalidationStagedMachine, settings=no_shrink)


def test_scripted_loss_without_invalidation():
    """A hint applied, then the page allocated and written: without invalidation it is lost."""
    for invalidate, expect_lost in ((True, 0), (False, 1)):
        state = HostPageState(16, invalidate=invalidate)
        versions = np.zeros(16, dtype=np.uint32)
        dest = np.zeros(16, dtype=np.uint32)
        state.begin_first_round()
        state.apply_hints(np.array([[8, 8]], dtype=np.uint64))  # pages 8..15 reported free
        page = np.array([9])
        state.on_written(page[~state.is_written(page)])  # guest reuses page 9
        versions[9] += 1
        go = np.flatnonzero(state.dirty_in() & ~state.skip_in())
        dest[go] = versions[go]
        state.begin_round()  # stop-and-copy
        go = np.flatnonzero(state.dirty_in() & ~state.skip_in())
        dest[go] = versions[go]
        assert int(dest[9] != versions[9]) == expect_lost
