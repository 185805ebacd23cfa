"""The host's safety guards, each shown acting and each shown necessary, in whole migrations.

Every migration here runs the production path: :func:`hintpipe.inprocess.migrate_guest` drives
the :class:`~hintpipe.host.migration.MigrationEngine` (and its oracle, which compares every
allocated page at the destination with the source) while the real buddy allocator, walker,
producer, in-process virtqueue, host session and page state run, under trio's virtual clock.
The guest runs the ``race`` workload, which aims at the windows where hinting can go wrong
(:class:`~hintpipe.guest.workload.RaceWorkload`). A guard is turned off exactly as
``hintpipe demo --break GUARD`` does it (``RunConfig.broken``).

* With every guard in force nothing is lost, and each guard's counter is positive across the
  examples (``isolate`` mode: reported blocks cannot be reallocated while their frame is in
  flight, so refuse-written acts there only on pages written and freed before the walk; a stale
  frame is still dropped, but applying it loses nothing: its blocks stay isolated until acked).
* With one guard off, the oracle finds lost pages; with sim write-protect, sync userfaultfd and
  uffd-async (real guest memory, compared byte for byte).
* uffd-async: safety rests on the full scan before each round's swap; without the per-chunk
  scans nothing is lost.
* A paired guest process running the race workload over ``unix:`` is migrated byte-exact, and
  no guest can turn a guard off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hintpipe.wp as backends
from hintpipe.cli import main
from hintpipe.config import RunConfig
from hintpipe.guest.workload import WorkloadConfig
from hintpipe.host.migration import MigrationConfig
from hintpipe.inprocess import InProcessRun, migrate_guest
from hintpipe.linux import userfaultfd as u
from hintpipe.wp.uffd_async import AsyncUffdBackend

from procs import runtime_env

PAGES = 1 << 13  # 32 MiB
SIM_GUARDS = ("refuse-written", "stale-drop", "invalidate")


def WORKLOAD(seed: int) -> WorkloadConfig:
    """The race workload at a quarter of churn's rates, in 5 ms ticks: a quicker test."""
    return WorkloadConfig.race(seed=seed, ops_per_s=2_500.0, write_pages_per_s=10_000.0, tick_s=0.005)


def _cfg(seed: int, *, race_mode: str = "detect", broken=(), wp: str = "sim", batch: int = 8,
         min_order: int = 5) -> RunConfig:
    """A race migration with two live rounds (a 30 ms downtime target is never met, the round
    limit ends them), so a frame held in the first reaches the host in the second; fixed lock
    charges and no wall-clock walker budget, so the interleaving depends on the seed only."""
    return RunConfig(pages=PAGES, workload=WORKLOAD(seed=seed), race_mode=race_mode,
                     migration=MigrationConfig(bandwidth_gbit=1.0, max_rounds=2, downtime_ms=30),
                     batch=batch, min_order=min_order, fixed_hold_s=1e-5, time_budget_us=1e9,
                     memory="sim" if wp == "sim" else "real", wp=wp, broken=frozenset(broken))


def _migrate(cfg: RunConfig) -> InProcessRun:
    async def go():
        return await migrate_guest(cfg)

    return trio.run(go, clock=trio.testing.MockClock(autojump_threshold=0))


def _lost_with(guard: str, seeds, **kw) -> int:
    """Lost pages of the first of ``seeds`` whose migration with ``guard`` off loses any."""
    for seed in seeds:
        run = _migrate(_cfg(seed, broken=[guard], **kw))
        assert not run.result.verified  # a broken run is never verified, lost pages or not
        if run.result.lost_pages:
            return run.result.lost_pages
    return 0


def _need(backend: str) -> None:
    try:
        backends.probe(backend)
    except u.UffdUnavailable as e:
        pytest.skip(f"{backend} unavailable on this kernel: {e.reason}")


# ------------------------------------------------------------------ every guard acts, nothing lost

@pytest.mark.parametrize("race_mode", ["detect", "isolate"])
def test_race_migrations_lose_nothing_and_every_guard_acts(race_mode):
    totals: Counter = Counter()

    @settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(seed=st.integers(0, 2**16), batch=st.sampled_from([4, 8, 32]), min_order=st.integers(4, 6))
    def migrate(seed, batch, min_order):
        run = _migrate(_cfg(seed, race_mode=race_mode, batch=batch, min_order=min_order))
        assert run.result.lost_pages == 0 and run.result.verified
        run.alloc.check_invariants()
        g = run.figures().guards
        assert g.broken == [] and g.stale_hints_applied == 0 and g.scan_caught_pages is None
        totals.update(refused=g.refused_written_pages, stale=g.stale_hint_messages,
                      invalidated=g.skips_invalidated, examples=1)

    migrate()
    assert totals["examples"] >= 3
    assert totals["refused"] > 0 and totals["stale"] > 0 and totals["invalidated"] > 0, totals


# ------------------------------------------------------------------ each guard is necessary (sim)

@pytest.mark.parametrize("guard", SIM_GUARDS)
def test_breaking_a_guard_loses_pages(guard):
    assert _lost_with(guard, seeds=(1, 2, 3)) > 0


@pytest.mark.parametrize("guard", ["refuse-written", "invalidate"])
def test_breaking_a_guard_loses_pages_in_isolate_mode(guard):
    assert _lost_with(guard, seeds=(1, 2, 3), race_mode="isolate") > 0


def test_in_isolate_mode_a_stale_hint_is_harmless():
    # blocks stay isolated until their frame is acked, so nothing can be written under a stale
    # hint before it is applied: applying it anyway (stale-drop off) loses nothing
    applied = 0
    for seed in (1, 2, 3):
        run = _migrate(_cfg(seed, race_mode="isolate", broken=["stale-drop"], batch=4))
        assert run.result.lost_pages == 0
        applied += run.figures().guards.stale_hints_applied
    assert applied > 0


# ------------------------------------------------------------------ real memory, real write-protect

@pytest.mark.parametrize("wp", ["uffd", "uffd-async"])
def test_real_memory_race_loses_nothing_and_guards_act(wp):
    _need(wp)
    run = _migrate(_cfg(1, wp=wp))
    assert run.result.lost_pages == 0 and run.result.verified and run.result.allocated_pages > 0
    g = run.figures().guards
    assert g.refused_written_pages > 0 and g.stale_hint_messages > 0 and g.skips_invalidated > 0, g
    assert (g.scan_caught_pages or 0) > 0 if wp == "uffd-async" else g.scan_caught_pages is None


@pytest.mark.parametrize("wp,guard", [("uffd", g) for g in SIM_GUARDS]
                         + [("uffd-async", g) for g in (*SIM_GUARDS, "scan-before-send")])
def test_real_memory_breaking_a_guard_loses_pages(wp, guard):
    _need(wp)
    # uffd-async refuses a hint only when a scan saw the write first, which the guest can aim at
    # but not see: try more seeds there
    seeds = range(1, 9) if (wp, guard) == ("uffd-async", "refuse-written") else (1, 2, 3)
    assert _lost_with(guard, seeds=seeds, wp=wp) > 0


def test_uffd_async_needs_no_per_chunk_scans(monkeypatch):
    """The scan before each round's swap is what uffd-async's safety rests on: without the scans
    before each chunk nothing is lost (a page written after its hint is found by the next full
    scan and sent next round); only fewer pages are sent in the round they were written."""
    _need("uffd-async")
    sent = {}
    for chunks in (True, False):
        monkeypatch.setattr(AsyncUffdBackend, "scan_chunks", chunks)
        run = _migrate(_cfg(1, wp="uffd-async"))
        assert run.result.lost_pages == 0 and run.result.verified
        sent[chunks] = (run.result.pages_sent, run.wp["scans"], run.wp["scan_caught_by"]["chunk"])
    assert sent[False][1] < sent[True][1] and sent[False][2] == 0 and sent[True][2] > 0


# ------------------------------------------------------------------ the command line

def test_demo_break_exits_1_never_verified_and_names_the_guard(capsys):
    assert main(["demo", "--size", "64M", "--workload", "race", "--no-baseline", "--break", "invalidate"]) == 1
    out = capsys.readouterr().out
    assert "VERIFIED" not in out.replace("NOT VERIFIED", "")
    assert "BROKEN: invalidate" in out and "broken on purpose" in out
    assert main(["demo", "--size", "64M", "--workload", "race", "--no-baseline", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    g = rep["guards"]
    assert set(g) >= {"broken", "refused_written_pages", "stale_hint_messages", "skips_invalidated",
                      "scan_caught_pages"} and g["broken"] == []
    assert rep["hints"]["pages_refused_written"] == g["refused_written_pages"]
    assert rep["hints"]["stale_messages"] == g["stale_hint_messages"]


def test_scan_before_send_exists_only_with_uffd_async(capsys):
    assert main(["demo", "--size", "64M", "--break", "scan-before-send"]) == 2
    assert "uffd-async" in capsys.readouterr().err


# ------------------------------------------------------------------ paired processes


def test_guest_has_no_break_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["guest", "--connect", "unix:/nonexistent", "--break", "stale-drop"])
    assert e.value.code == 2 and "--break" in capsys.readouterr().err


def test_paired_race_guest_over_unix_verified_byte_for_byte(tmp_path):
    addr = f"unix:{tmp_path}/race.sock"
    env = runtime_env(tmp_path)
    # --wp auto: the best write-protect this kernel has (sim faults over the link at worst)
    common = ["--memory", "real", "--wp", "auto", "--bandwidth", "2", "--max-rounds", "2", "--downtime-ms", "30"]
    host = subprocess.Popen([sys.executable, "-m", "hintpipe", "host", "--listen", addr, "--json", "--guests", "1",
                             *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(addr[5:]):
            assert host.poll() is None and time.monotonic() < deadline, host.stderr.read()
            time.sleep(0.05)
        guest = subprocess.run([sys.executable, "-m", "hintpipe", "guest", "--connect", addr, "--size", "64M",
                                "--workload", "race", "--min-order", "6", "--batch", "8", *common],
                               capture_output=True, text=True, env=env, timeout=120)
        out, err = host.communicate(timeout=120)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    rep = json.loads(out.splitlines()[-1])
    assert guest.returncode == 0 and host.returncode == 0, (guest.stderr, err)
    m, g = rep["migration"], rep["guards"]
    assert rep["status"] == "migrated" and rep["config"]["workload"] == "race" and rep["config"]["memory"] == "real"
    assert m["lost_pages"] == 0 and m["verified"] and m["allocated_pages"] > 0 and m["rounds"] == 3
    assert g["broken"] == [] and g["stale_hint_messages"] > 0 and g["skips_invalidated"] > 0
    assert rep["workload"]["race_frames_held"] > 0


async def test_a_guest_cannot_turn_a_guard_off(tmp_path, monkeypatch):
    """Nothing a guest sends reaches the guards: a race guest that claims broken guards in every
    field it controls (its configuration snapshot, its name, Hello's feature bits) is served with
    every guard in force, and the stale frames it sends are dropped."""
    import hintpipe.paired.guest as pg
    from hintpipe.channel.address import parse_address
    from hintpipe.guest.producer import Producer
    from hintpipe.paired.guest import GuestOptions, run_guest
    from hintpipe.paired.host import GuestServer, HostOptions

    every = sorted(["refuse-written", "stale-drop", "invalidate", "scan-before-send"])
    real_dict = pg.guest_config_dict
    monkeypatch.setattr(pg, "guest_config_dict",
                        lambda cfg: {**real_dict(cfg), "broken": every, "break": every, "drop_stale": False})
    real_hello = Producer.run

    async def run(self):
        hello = self.conn.hello
        self.conn.hello = lambda *a, **kw: hello(*a, **{**kw, "features": 0xFFFF, "name": "--break stale-drop"})
        return await real_hello(self)

    monkeypatch.setattr(Producer, "run", run)
    addr = parse_address(f"unix:{tmp_path}/g.sock")
    mig = MigrationConfig(bandwidth_gbit=2.0, max_rounds=2, downtime_ms=30)
    host_cfg = RunConfig(pages=1 << 12, migration=mig)
    guest_cfg = RunConfig(pages=1 << 12, migration=mig, workload=WorkloadConfig.race(seed=2), min_order=4, batch=4)
    server = GuestServer(HostOptions(address=addr, cfg=host_cfg, guests=1))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            outcome = await run_guest(GuestOptions(address=addr, cfg=guest_cfg))
    rep = server.reports[0]
    assert outcome.ok, outcome.reason
    assert rep["guards"]["broken"] == [] and rep["status"] == "migrated" and rep["migration"]["verified"]
    assert rep["guards"]["stale_hint_messages"] > 0 and rep["guards"]["stale_hints_applied"] == 0
