"""Whole simulated migrations (guest, in-process virtqueue, host) under trio's virtual clock."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hintpipe.cli import main
from hintpipe.config import RunConfig
from hintpipe.guest.workload import WorkloadConfig
from hintpipe.host.migration import MigrationConfig
from hintpipe.inprocess import migrate_guest, run_demo

SMALL = 1 << 15


def _cfg(**kw) -> RunConfig:
    base = dict(pages=SMALL, workload=WorkloadConfig(seed=3), migration=MigrationConfig(bandwidth_gbit=2.0))
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("race_mode", ["detect", "isolate"])
def test_hinted_migration_verifies_and_sends_less(race_mode):
    rep = run_demo(_cfg(race_mode=race_mode))
    m = rep["migration"]
    assert m["verified"] and m["lost_pages"] == 0
    assert m["lost_pages_baseline"] == 0
    assert m["pages_sent"] < m["pages_sent_baseline"]
    assert rep["hints"]["ranges"] > 0 and rep["faults"] > 0
    assert m["allocated_pages"] > 0


def test_idle_guest_saves_most_of_its_free_memory():
    rep = run_demo(_cfg(workload=WorkloadConfig.idle(seed=1), min_order=9))
    m = rep["migration"]
    free = 1 - 0.30  # idle boots 30% resident
    assert m["verified"]
    assert m["pages_skipped"] >= 0.9 * free * SMALL
    assert m["skip_efficiency"] > 0.9


async def test_oracle_catches_loss_without_write_tracking(autojump_clock):
    run = await migrate_guest(_cfg(wp="off"))
    assert run.result.lost_pages > 0 and not run.result.verified


async def test_oracle_catches_loss_without_invalidation(autojump_clock):
    run = await migrate_guest(_cfg(broken={"invalidate"}, charge_holds=False))  # as --break invalidate
    assert run.result.lost_pages > 0 and not run.result.verified


async def test_walker_batches_respect_the_bound(autojump_clock):
    run = await migrate_guest(_cfg(batch=4, min_order=3))
    assert run.walker.stats.max_batch_len <= 4
    assert run.result.verified


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    race_mode=st.sampled_from(["detect", "isolate"]),
    batch=st.sampled_from([1, 3, 32]),
    min_order=st.integers(0, 10),
    ops=st.sampled_from([5_000.0, 40_000.0, 150_000.0]),
    bandwidth=st.sampled_from([0.5, 5.0, 50.0]),
    hold=st.sampled_from([1e-5, 1e-3]),
)
def test_randomized_migrations_never_lose_a_page(seed, race_mode, batch, min_order, ops, bandwidth, hold):
    cfg = RunConfig(
        pages=1 << 14,
        workload=WorkloadConfig(seed=seed, ops_per_s=ops, write_pages_per_s=ops),
        migration=MigrationConfig(bandwidth_gbit=bandwidth, max_rounds=6),
        batch=batch,
        min_order=min_order,
        race_mode=race_mode,
        # fixed lock charges and no wall-clock budget: the interleaving depends on the example only
        fixed_hold_s=hold,
        time_budget_us=1e9,
    )

    async def go():
        return await migrate_guest(cfg)

    run = trio.run(go, clock=trio.testing.MockClock(autojump_threshold=0))
    assert run.result.lost_pages == 0
    run.alloc.check_invariants()


def test_demo_json_has_the_documented_keys(capsys):
    assert main(["demo", "--size", "64M", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("pages_total", "pages_sent", "pages_sent_baseline", "pages_skipped", "rounds",
                "lost_pages", "verified", "bytes_sent", "bytes_sent_baseline", "zero_pages_sent",
                "zero_pages_sent_baseline", "bytes_saved_pct", "sleep_overshoot_s"):
        assert key in rep["migration"]
    for key in ("messages", "ranges", "pages"):
        assert key in rep["hints"]
    assert isinstance(rep["faults"], int)
    assert "max_hold_us" in rep["lock"] and "max_alloc_wait_us" in rep["lock"]
    assert rep["lock"]["batches"] + rep["lock"]["empty_holds"] > 0
    assert rep["config"]["history"] == 1.0 and rep["workload_baseline"]["ticks"] > 0
    assert rep["migration"]["pages_total"] == 64 * 256
    assert rep["migration"]["verified"] is True


def test_demo_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--size", "64M", "--min-order", "12"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "hintpipe demo: --min-order: must be in 0..10, got 12 (see hintpipe demo --help)"
