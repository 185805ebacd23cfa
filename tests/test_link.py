"""What the migration puts on the link: zero pages as headers, bytes, and link time.

A page whose content is all zero goes as QEMU's zero-page record (an 8-byte header and one
byte), in the hinted run and the baseline alike; the destination of such a page is set to
zeros, and the oracle compares content, so a zero page that did not clear its destination is a
lost page. In real time the link does not charge its own sleep overshoot to the migration.
"""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from hintpipe.config import RunConfig
from hintpipe.guest.buddy import BuddyAllocator
from hintpipe.guest.memory import GuestMemory, RealGuestMemory
from hintpipe.guest.workload import Workload, WorkloadConfig
from hintpipe.guest.zonelock import ZoneLock
from hintpipe.host.migration import (
    NORMAL_PAGE_BYTES, ZERO_PAGE_BYTES, MigrationConfig, MigrationEngine,
)
from hintpipe.host.pagestate import HostPageState
from hintpipe.inprocess import RealMachine, run_demo
from hintpipe.wp import make_backend

SMALL = 1 << 13

# a guest that never writes: nothing resident, no churn, no rewrites, never used before
NEVER_WRITES = WorkloadConfig.idle(static_fraction=0.0, write_pages_per_s=0.0, history=0.0)


@pytest.mark.parametrize("memory", ["sim", "real"])
def test_a_guest_that_never_writes_sends_only_zero_page_headers(memory):
    cfg = RunConfig(pages=SMALL, workload=NEVER_WRITES, memory=memory, wp="sim",
                    migration=MigrationConfig(bandwidth_gbit=1.0))
    m = run_demo(cfg)["migration"]
    assert m["verified"] and m["lost_pages_baseline"] == 0
    # the baseline sends every page, each as a header and one byte
    assert m["pages_sent_baseline"] == m["zero_pages_sent_baseline"] == SMALL
    assert m["bytes_sent_baseline"] == SMALL * ZERO_PAGE_BYTES
    # the hinted run sends what the walker did not hint in time, also as headers only
    assert m["pages_sent"] == m["zero_pages_sent"]
    assert m["bytes_sent"] == m["pages_sent"] * ZERO_PAGE_BYTES
    assert m["time_s_baseline"] < 0.01  # 8192 pages of 9 bytes, not of 4 KiB, over 1 Gbit/s


def test_old_data_in_free_pages_is_sent_in_full_by_the_baseline():
    cfg = RunConfig(pages=SMALL, workload=WorkloadConfig.idle(history=1.0),
                    migration=MigrationConfig(bandwidth_gbit=1.0))
    m = run_demo(cfg)["migration"]
    assert m["verified"]
    assert m["zero_pages_sent_baseline"] == 0
    assert m["bytes_sent_baseline"] == m["pages_sent_baseline"] * NORMAL_PAGE_BYTES
    assert m["bytes_saved_pct"] > 50


@pytest.mark.parametrize("history", [0.0, 0.5, 1.0])
async def test_history_gives_that_share_of_free_pages_old_data(history):
    n = 1 << 14
    alloc = BuddyAllocator(n)
    memory = GuestMemory(n)
    wl = Workload(WorkloadConfig(history=history, seed=2), alloc, memory, ZoneLock())
    await wl.boot()
    free = alloc.free_mask
    share = np.count_nonzero(memory.versions[free]) / np.count_nonzero(free)
    assert share == pytest.approx(history, abs=0.02)
    assert (memory.versions[~free] != 0).all()  # resident memory was written at boot
    assert wl.stats.history_pages == np.count_nonzero(memory.versions[free])


class _Rig:
    """An engine over a guest whose every page is allocated and written, where one page is
    overwritten with zeros once the first chunks are on the link (so after it was sent)."""

    def __init__(self, memory_kind: str, machine: RealMachine | None = None) -> None:
        n = self.n = 4096
        self.state = HostPageState(n)
        if memory_kind == "real":
            self.backend = make_backend("sim", self.state, **machine.backend_kwargs())
            self.memory = RealGuestMemory(machine.guest)
            read, dest = machine.read_source, machine.dest
            machine.reset_dest()
        else:
            self.backend = make_backend("sim", self.state)
            self.memory = GuestMemory(n)
            read, dest = (lambda idx: self.memory.versions[idx]), None
        self.zeroed = 5
        cfg = MigrationConfig(bandwidth_gbit=1.0, chunk_pages=512)
        self.engine = MigrationEngine(cfg, self.state, read_source=read,
                                      free_mask=lambda: np.zeros(n, bool), pause_guest=self._pause,
                                      before_chunk=self._before_chunk, start_round=self.backend.start_round,
                                      dest=dest)

    async def _pause(self) -> None:
        pass

    async def _before_chunk(self, a: int, b: int) -> None:
        if a == 1024:  # page 5 went out with the first chunk: now it is zeroed
            await self.memory.write_zeros(np.array([self.zeroed]))

    async def run(self):
        await self.memory.write(np.arange(self.n))  # boot: every page holds data
        self.memory.tracker = self.backend.guest_tracker
        return await self.engine.run()


@pytest.mark.parametrize("memory_kind", ["sim", "real"])
def test_a_page_written_with_zeros_after_data_counts_as_zero(memory_kind):
    machine = RealMachine(4096, "sim") if memory_kind == "real" else None
    try:
        rig = _Rig(memory_kind, machine)
        res = trio.run(rig.run, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        if machine is not None:
            machine.close()
    assert res.verified
    assert res.round_reports[0].zero_pages_sent == 0  # every page held data when round 0 sent it
    assert res.zero_pages_sent == 1  # the zeroed page went again, as a header
    assert res.bytes_sent == (rig.n * NORMAL_PAGE_BYTES) + ZERO_PAGE_BYTES


def test_a_zero_page_that_does_not_clear_its_destination_is_caught(monkeypatch):
    """Break the zero-page record (the destination keeps its old copy): the oracle finds it."""

    def copy_without_zeroing(self, go):
        data = self.read_source(go)
        is_zero = ~data.reshape(len(go), -1).any(axis=1)
        self.dest[go[~is_zero]] = data[~is_zero]
        return int(np.count_nonzero(is_zero))

    monkeypatch.setattr(MigrationEngine, "_copy_pages", copy_without_zeroing)
    rig = _Rig("sim")
    res = trio.run(rig.run, clock=trio.testing.MockClock(autojump_threshold=0))
    assert res.lost_pages == 1 and not res.verified


class OversleepingClock(trio.abc.Clock):
    """Virtual time in which every sleep ends ``late_s`` after its deadline, as a real-time
    sleep does on a busy machine; :meth:`jump` moves time while a task runs (CPU work)."""

    def __init__(self, late_s: float) -> None:
        self.now = 0.0
        self.late_s = late_s

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self.now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        # called when every task is blocked: "sleep" to the next deadline, and a bit beyond
        if self.now < deadline < float("inf"):
            self.now = deadline + self.late_s
        return 0.0

    def jump(self, seconds: float) -> None:
        self.now += seconds


def _link_engine(work_s: float, clock: OversleepingClock) -> MigrationEngine:
    """An engine over an allocated, written guest whose scan before each chunk takes ``work_s``
    of real work (the clock moves while the task runs, as CPU time does)."""
    n = 1 << 14
    state = HostPageState(n)
    versions = np.arange(1, n + 1, dtype=np.uint32)

    async def pause() -> None:
        pass

    async def scan(a: int, b: int) -> None:
        clock.jump(work_s)

    cfg = MigrationConfig(bandwidth_gbit=1.0, chunk_pages=1024)
    return MigrationEngine(cfg, state, read_source=lambda idx: versions[idx],
                           free_mask=lambda: np.zeros(n, bool), pause_guest=pause, before_chunk=scan)


def test_the_link_does_not_charge_its_own_oversleep():
    clock = OversleepingClock(late_s=0.004)
    engine = _link_engine(0.0, clock)
    res = trio.run(engine.run, clock=clock)
    link = engine.cfg.seconds_for_bytes(res.bytes_sent)
    assert res.pages_sent == engine.state.page_count and res.verified
    assert res.time_s == pytest.approx(link, rel=1e-9)
    assert res.sleep_overshoot_s > 0.004 * 10  # it did oversleep, more than once


def test_the_link_charges_real_work_that_delays_sending():
    """Work before each chunk that takes longer than the chunk's link time delays the link."""
    clock = OversleepingClock(late_s=0.004)
    work = 0.05  # 50 ms a chunk; a chunk of 1024 pages takes 34 ms at 1 Gbit/s
    engine = _link_engine(work, clock)
    res = trio.run(engine.run, clock=clock)
    chunks = engine.state.page_count // 1024
    per_chunk = engine.cfg.seconds_for_bytes(1024 * NORMAL_PAGE_BYTES)
    # the sender scans a chunk, queues it and waits (more than LINK_SLACK_S ahead of the link)
    # until it is on the wire; the round ends with one more scan, then the empty final round
    assert res.time_s == pytest.approx(chunks * (work + per_chunk) + work, rel=1e-9)
    assert res.sleep_overshoot_s > 0
