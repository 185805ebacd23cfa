"""The synchronous uffd fault handler with writers in other processes (guests), through
``SyncUffdBackend`` and ``HostPageState.on_written``, the path a migration takes.

Two oracles, each shown to catch the mechanism it guards being broken:

* *recorded before it lands*: while the page state records page p, the writer's store to p must
  not be visible through the host's own mapping of guest RAM (watched for 20 ms per fault). A
  handler that lifts the protection first (``record_first=False``) lets the store land meanwhile.
* *no write lost across round starts* (stronger than comparing a migrated copy at the end, which
  a later recorded rewrite of the page can mask): writers store unique values into random pages
  while the host starts rounds back to back; after each round start K it copies every page (C_K)
  and keeps the round's send set D_K (pages recorded during round K-1). A store first seen in C_K
  landed in round K-1 or K, so every page that changed between C_{K-1} and C_K must be in D_K or
  D_{K+1}. A handler whose record+release is not atomic with the round start (a lock that does
  not lock) releases pages after the next round's protect: their stores land unrecorded.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import hintpipe.wp as backends
from hintpipe.host.pagestate import HostPageState
from hintpipe.linux import userfaultfd as u
from hintpipe.wp.uffd_sync import SyncUffdBackend, UffdSyncTracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from uffd_writers import WriterGroup  # noqa: E402

WATCH_S = 0.02         # how long the page state watches a page for the writer's store
CALLBACK_DELAY = 3e-4  # the lost-write test's record delay (widens a broken handler's window)
JOIN_S = 60            # a writer never woken fails the test instead of hanging the suite


@pytest.fixture(autouse=True)
def _uffd_available():
    try:
        backends.probe("uffd")
    except u.UffdUnavailable as e:
        pytest.skip(f"synchronous uffd unavailable: {e.reason}")


class NoLock:
    """A lock that does not lock: breaks the handler's lock on purpose."""

    def __enter__(self) -> "NoLock":
        return self

    def __exit__(self, *exc) -> None:
        pass


def _wait_in_thread(g: WriterGroup) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.extend(g.wait(JOIN_S)), daemon=True)
    t.start()
    return t, out


class WatchingState(HostPageState):
    """Page state that, before recording pages, watches them for ``value`` landing in guest RAM."""

    def __init__(self, n: int, view: np.ndarray, value: int) -> None:
        super().__init__(n)
        self.view, self.value, self.landed, self.seen = view, value, 0, 0

    def on_written(self, pfns):
        for p in pfns.tolist():
            end = time.perf_counter() + WATCH_S
            while time.perf_counter() < end:
                if self.view[p, 0] == self.value:
                    self.landed += 1
                    break
        self.seen += len(pfns)
        return super().on_written(pfns)


def _recorded_before_landing(record_first: bool) -> tuple[int, int, bool]:
    value, pages = 7, np.arange(3, 11)
    with WriterGroup(64, 1) as g:
        w = g.writers[0]
        view = g.host_view()
        state = WatchingState(64, view, value)
        be = SyncUffdBackend(state, w.addr, 64, w.uffd_fd)
        be.tracker.record_first = record_first
        try:
            be.start_round(0)
            t, _ = _wait_in_thread(g)
            g.start([pages], "page", value)
            t.join(JOIN_S)
            assert not t.is_alive(), "writer still blocked on a write-protect fault"
        finally:
            be.close()  # joins the handler: its last record is over
        ok = bool(state.is_written(pages).all() and (view[pages, 0] == value).all())
        return state.landed, state.seen, ok


def test_write_is_recorded_before_it_lands():
    landed, seen, ok = _recorded_before_landing(True)
    assert seen == 8 and ok
    assert landed == 0


def test_oracle_catches_release_before_record():
    landed, seen, ok = _recorded_before_landing(False)
    assert seen == 8 and ok
    assert landed > 0


class SlowState(HostPageState):
    """Page state whose recording takes CALLBACK_DELAY longer."""

    def on_written(self, pfns):
        r = super().on_written(pfns)
        time.sleep(CALLBACK_DELAY)
        return r


def _rounds_under_writes(broken_lock: bool, seed: int = 5) -> tuple[list, bool]:
    """Two writer processes store counts into random pages while rounds start back to back.
    Returns (violations [(K, pfns in neither D_K nor D_K+1)], whether the migrated copy, built from
    each round's send set, equals guest RAM at the end)."""
    n, per_writer, nw = 128, 1500, 2
    rng = np.random.default_rng(seed)
    plists = [rng.integers(0, n, per_writer) for _ in range(nw)]
    with WriterGroup(n, nw) as g:
        view = g.host_view()
        state = SlowState(n)
        ws = g.writers
        # one handler thread for both guests' uffds, bound to the page state as the backend binds it
        be = SyncUffdBackend(state, ws[0].addr, n, ws[0].uffd_fd)
        be.tracker.close()
        be.tracker = UffdSyncTracker(ws[0].addr, n, ws[0].uffd_fd, state.on_written, start=False)
        be.tracker.attach(ws[1].uffd_fd, ws[1].addr)
        be.tracker.start()
        if broken_lock:
            be.tracker.lock = NoLock()
        rounds = [0]

        def round_start():
            be.start_round(rounds[0])
            rounds[0] += 1
            return state.dirty_in().copy()
        try:
            dsets, copies = [round_start()], [view[:, :8 * nw].copy()]
            dest = copies[0].copy()  # what a pre-copy migration sends: all, then the dirty pages

            def next_round():
                dsets.append(round_start())
                copies.append(view[:, :8 * nw].copy())
                dest[dsets[-1]] = copies[-1][dsets[-1]]
            t, _ = _wait_in_thread(g)
            g.start(plists, "count")
            while t.is_alive():
                next_round()
            t.join(JOIN_S)
            for _ in range(2):  # rounds after the last store: D_{K+1} exists for every copy
                next_round()
        finally:
            be.close()
        assert len(dsets) > 50, "too few round starts overlapped the writes to test anything"
        violations = []
        for k in range(1, len(copies) - 1):
            changed = np.flatnonzero((copies[k - 1] != copies[k]).any(axis=1))
            missing = changed[~(dsets[k][changed] | dsets[k + 1][changed])]
            if len(missing):
                violations.append((k, missing.tolist()))
        return violations, bool((dest == view[:, :8 * nw]).all())


def test_no_write_lost_across_round_starts():
    violations, final_ok = _rounds_under_writes(broken_lock=False)
    assert violations == [] and final_ok


def test_oracle_catches_release_outside_the_lock():
    violations, _ = _rounds_under_writes(broken_lock=True)
    assert violations


def test_every_pending_message_is_resolved_with_merged_runs():
    """Four writer threads of one guest fault at once on consecutive pages: every page is
    recorded and released, and a read holding several messages releases contiguous pages with
    one ioctl (fewer ioctls than faults)."""
    n = 4 * 256
    with WriterGroup(n, 1) as g:
        w = g.writers[0]
        state = HostPageState(n)
        be = SyncUffdBackend(state, w.addr, n, w.uffd_fd)
        try:
            be.start_round(0)
            t, _ = _wait_in_thread(g)
            g.start([np.arange(n)], "page", 3, threads=4)
            t.join(JOIN_S)
            assert not t.is_alive()
            assert state.count_written() == n and be.tracker.faults == n
            assert (g.host_view()[:, 0] == 3).all()
        finally:
            be.close()
    # the release step itself, on a batch of five messages: [5, 8) and [9, 10)
    with WriterGroup(64, 1) as g:
        w = g.writers[0]
        tr = UffdSyncTracker(w.addr, 64, w.uffd_fd, lambda p: None, start=False, switch_interval=None)
        tr.protect_all()
        m = tr._maps[0]
        m.pfns, m.foreign = [9, 5, 7, 6, 5], []
        tr._release(m)
        assert tr.unprotect_calls == 2
        tr.close()


def test_four_guest_processes_one_handler_thread():
    with WriterGroup(4 * 300, 4) as g:
        state = HostPageState(g.page_count)
        ws = g.writers
        tr = UffdSyncTracker(ws[0].addr, g.page_count, ws[0].uffd_fd, state.on_written, start=False)
        for w in ws[1:]:
            tr.attach(w.uffd_fd, w.addr)
        tr.start()
        with pytest.raises(RuntimeError):  # the poll set is fixed once the thread runs
            tr.attach(ws[1].uffd_fd, ws[1].addr)
        try:
            tr.new_round(state.begin_round)
            t, _ = _wait_in_thread(g)
            g.start([np.arange(i, g.page_count, 4) for i in range(4)], "stride", 3)
            t.join(JOIN_S)
            assert not t.is_alive()
            assert state.count_written() == g.page_count and tr.faults == g.page_count
            assert (g.host_view()[:, 0] == 3).all()
        finally:
            tr.close()


def test_close_lifts_protection_and_restores_the_switch_interval():
    before = sys.getswitchinterval()
    with WriterGroup(16, 1) as g:
        w = g.writers[0]
        tr = UffdSyncTracker(w.addr, 16, w.uffd_fd, lambda p: None, switch_interval=1e-4)
        assert abs(sys.getswitchinterval() - 1e-4) < 1e-7
        tr.protect_all()
        tr.close()
        assert sys.getswitchinterval() == before
        t, _ = _wait_in_thread(g)
        g.start([np.arange(16)], "page", 1)   # would hang if still protected
        t.join(JOIN_S)
        assert not t.is_alive() and tr.faults == 0
