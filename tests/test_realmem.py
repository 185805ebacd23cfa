"""Real guest memory (memfd bytes) with each write-protect backend, through the migration path.

Real userfaultfd on this machine; a backend the kernel lacks is skipped with probe()'s reason.
Writes happen on the trio thread, exactly as in ``hintpipe demo --memory real``: under sync WP the
store blocks in the kernel until the handler thread releases it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import hintpipe.wp as backends
from hintpipe.cli import main
from hintpipe.config import RunConfig
from hintpipe.guest.memory import RealGuestMemory
from hintpipe.guest.workload import WorkloadConfig
from hintpipe.host.migration import MigrationConfig, MigrationEngine
from hintpipe.host.pagestate import HostPageState
from hintpipe.inprocess import RealMachine, migrate_guest, run_demo
from hintpipe.linux import userfaultfd as u
from hintpipe.linux.memfd import verify_words, write_pages_nogil
from hintpipe.wp import make_backend, resolve_backend

SMALL = 1 << 13      # 32 MiB guest for whole migrations
TINY = 1024          # 4 MiB for single-write tests
BACKENDS = ("sim", "uffd", "uffd-async")


def _need(backend: str) -> None:
    if backend in backends.REAL_BACKENDS:
        try:
            backends.probe(backend)
        except u.UffdUnavailable as e:
            pytest.skip(f"{backend} unavailable on this kernel: {e.reason}")


def _cfg(**kw) -> RunConfig:
    base = dict(pages=SMALL, memory="real", workload=WorkloadConfig(seed=5, ops_per_s=20_000.0),
                migration=MigrationConfig(bandwidth_gbit=1.0))
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture
def rig(request):
    """(machine, state, backend, memory) for backend ``request.param``, round 0 started."""
    name = request.param
    _need(name)
    machine = RealMachine(TINY, name)
    state = HostPageState(TINY)
    backend = make_backend(name, state, **machine.backend_kwargs())
    memory = RealGuestMemory(machine.guest, backend.guest_tracker)
    backend.start_round(0)
    yield machine, state, backend, memory
    backend.close()
    machine.close()


# ------------------------------------------------------------------ the write path itself

def test_write_pages_nogil_writes_patterns_in_any_order():
    with RealMachine(TINY, "off") as m:
        pfns = np.array([7, 3, 4, 5, 900, 6, 1023])
        write_pages_nogil(m.guest, pfns, np.arange(1, 8))
        assert verify_words(m.host.words, pfns, np.arange(1, 8)).all()  # seen via the host mapping
        assert not verify_words(m.host.words, [8], [1])[0]                # untouched page


async def test_real_memory_bumps_versions_once_per_duplicate():
    with RealMachine(TINY, "off") as m:
        mem = RealGuestMemory(m.guest)
        await mem.write(np.array([10, 10, 11]))
        await mem.write(np.array([11]))
        assert mem.versions[10] == 1 and mem.versions[11] == 2
        assert verify_words(m.host.words, [10, 11], [1, 2]).all()


def test_oracle_counts_byte_differences_in_chunks(monkeypatch):
    """The engine's verify on (n, 512) pages: one flipped byte is one lost page."""
    import hintpipe.host.migration as mig

    monkeypatch.setattr(mig, "VERIFY_CHUNK_BYTES", 7 * 4096)  # force several chunks (7 pages each)
    with RealMachine(TINY, "off") as m:
        write_pages_nogil(m.guest, np.arange(TINY), 1)
        state = HostPageState(TINY)
        free = np.zeros(TINY, dtype=bool)
        free[500:] = True
        eng = MigrationEngine(MigrationConfig(), state, m.read_source, lambda: free, None, dest=m.dest)
        m.dest[:] = m.host.words
        assert eng.verify() == 0
        m.dest.view(np.uint8)[3, 4095] ^= 1      # allocated page: lost
        m.dest.view(np.uint8)[600, 0] ^= 1       # free page: not checked
        assert eng.verify() == 1 and not eng.result.verified
        assert eng.result.allocated_pages == 500


# ------------------------------------------------------------------ each backend sees a write

@pytest.mark.parametrize("rig", BACKENDS, indirect=True)
async def test_write_to_protected_page_is_seen(rig):
    machine, state, backend, memory = rig
    state.apply_hints(np.array([[40, 8]]))        # hinted free earlier
    await memory.write(np.array([42]))            # reuse: allocation = write
    await backend.before_chunk(0, TINY)           # async: the scan; others: nothing to do
    assert state.is_written([42])[0] and not state.is_skip([42])[0]
    assert state.is_skip([40])[0] and not state.is_written([40])[0]
    assert verify_words(machine.host.words, [42], [1])[0]   # the write landed
    assert backend.stats()["faults"] >= 1
    backend.start_round(1)
    assert state.dirty_in(42, 43)[0] and state.count_dirty() == 1   # sent next round


@pytest.mark.parametrize("rig", ["uffd-async"], indirect=True)
async def test_async_arming_pass_is_not_counted(rig):
    machine, state, backend, memory = rig
    assert backend.stats()["faults"] == 0
    await backend.before_chunk(0, TINY)
    assert state.count_written() == 0


# ------------------------------------------------------------------ late hints vs async scans

@pytest.mark.parametrize("rig", ["uffd-async"], indirect=True)
async def test_async_write_scan_then_late_hint_is_refused(rig):
    machine, state, backend, memory = rig
    await memory.write(np.array([130]))              # the guest reuses a page it had reported
    await backend.before_chunk(128, 136)             # the scan sees the write
    marked = state.apply_hints(np.array([[128, 8]]))  # a hint from a walk before the write lands
    assert not state.is_skip([130])[0]                # refused: written this round
    assert state.is_skip([128])[0] and marked == 7
    assert state.pages_refused_written == 1


@pytest.mark.parametrize("rig", ["uffd-async"], indirect=True)
async def test_async_write_late_hint_then_scan_invalidates(rig):
    machine, state, backend, memory = rig
    await memory.write(np.array([130]))
    state.apply_hints(np.array([[128, 8]]))          # the window: the host has not scanned yet
    assert state.is_skip([130])[0]
    await backend.before_chunk(128, 136)             # the scan before this chunk is sent
    assert not state.is_skip([130])[0] and state.is_written([130])[0]
    backend.start_round(1)
    assert state.dirty_in(130, 131)[0]


@pytest.mark.parametrize("rig", ["uffd-async"], indirect=True)
async def test_async_write_after_chunk_scan_is_caught_at_round_start(rig):
    """A write to a chunk already scanned (and a late hint) is found by the round-start scan."""
    machine, state, backend, memory = rig
    await backend.before_chunk(0, TINY)
    await memory.write(np.array([300]))
    state.apply_hints(np.array([[296, 8]]))
    backend.start_round(1)
    assert state.dirty_in(300, 301)[0] and not state.is_skip([300])[0]


# ------------------------------------------------------------------ whole migrations

@pytest.mark.parametrize("wp", BACKENDS)
async def test_migration_under_churn_loses_nothing_byte_for_byte(wp, autojump_clock):
    _need(wp)
    with RealMachine(SMALL, wp) as machine:
        run = await migrate_guest(_cfg(wp=wp), machine=machine)
        res = run.result
        assert res.verified and res.lost_pages == 0
        assert res.allocated_pages > 0 and run.workload.stats.allocs > 0
        assert run.wp["backend"] == wp and run.wp["faults"] > 0
        # one meaning of "faults" for every backend: first writes per round, as the host counts them
        assert run.wp["faults"] == run.figures().faults
        if wp == "uffd-async":
            assert run.wp["written_found"] >= run.wp["faults"]  # rewrites after a re-protect count again
        assert res.pages_skipped > 0                          # hinting did something
        alloc = np.flatnonzero(~run.alloc.free_mask)
        # the guest really wrote its pages, and the destination holds exactly those bytes
        assert verify_words(machine.host.words, alloc, run.memory.versions[alloc]).all()
        assert verify_words(machine.dest, alloc, run.memory.versions[alloc]).all()


async def test_tracking_off_in_real_memory_loses_pages(autojump_clock):
    run = await migrate_guest(_cfg(wp="off"))
    assert run.result.lost_pages > 0 and not run.result.verified
    assert run.wp == {"backend": "off", "faults": 0, "protect_calls": 0}


def test_auto_picks_the_best_working_backend_and_reports_it():
    expect = "sim"
    for name in backends.AUTO_ORDER:
        try:
            backends.probe(name)
            expect = name
            break
        except u.UffdUnavailable:
            continue
    rep = run_demo(_cfg(wp="auto", pages=1 << 12, baseline=False))
    assert rep["wp"]["backend"] == expect == rep["config"]["wp"]
    assert rep["migration"]["verified"]


def test_auto_falls_to_next_backend_when_one_is_missing(monkeypatch):
    real_probe = backends.probe

    def probe(backend="uffd"):
        if backend == "uffd-async":
            raise u.UffdUnavailable("the kernel's userfaultfd lacks asynchronous write-protect")
        return real_probe(backend)

    monkeypatch.setattr(backends, "probe", probe)
    _need("uffd")
    assert resolve_backend("auto", "real") == "uffd"
    assert resolve_backend("auto", "sim") == "sim"


def test_missing_backend_asked_by_name_exits_2_with_one_sentence(monkeypatch, capsys):
    def probe(backend="uffd"):
        raise u.UffdUnavailable("userfaultfd is not permitted (EPERM)")

    monkeypatch.setattr(backends, "probe", probe)
    code = main(["demo", "--memory", "real", "--wp", "uffd-async", "--size", "4M", "--json"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "hintpipe: --wp uffd-async is unavailable: userfaultfd is not permitted (EPERM)"


def test_real_backend_without_real_memory_is_a_usage_error(capsys):
    assert main(["demo", "--wp", "uffd", "--size", "4M"]) == 2
    assert "--memory real" in capsys.readouterr().err


def test_cli_demo_real_memory_json(capsys):
    _need("uffd")
    code = main(["demo", "--memory", "real", "--wp", "uffd", "--size", "16M", "--json", "--no-baseline"])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0
    assert rep["config"]["memory"] == "real"
    assert rep["wp"]["backend"] == "uffd" and rep["wp"]["protect_calls"] >= 2
    assert rep["migration"]["verified"] and rep["migration"]["lost_pages"] == 0
