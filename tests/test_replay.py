"""Replaying real recordings (slices in tests/data) through hinting and a migration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hintpipe.cli import main
from hintpipe.config import RunConfig
from hintpipe.host.migration import MigrationConfig
from hintpipe.trace import EventBatch, convert, open_trace
from hintpipe.trace.model import ReplayModel
from hintpipe.trace.replay import ReplayUsageError, TraceWalker, replay, replay_migration

DATA = Path(__file__).parent / "data" / "traces"
FAST = RunConfig.for_replay(migration=MigrationConfig(bandwidth_gbit=100.0))


@pytest.mark.parametrize("name", ["numpy-churn", "tar-gzip"])
def test_replay_of_real_recording_loses_nothing(name):
    rep = replay(open_trace(DATA / name), FAST)
    facts = json.loads((DATA / f"{name}.facts.json").read_text())
    assert rep["initial"]["free_pages"] == facts["initial_free_pages"]
    assert rep["initial"]["free_by_order"] == facts["initial_free_by_order"]
    assert rep["migration"]["verified"] and rep["migration"]["lost_pages"] == 0
    assert rep["migration"]["lost_pages_baseline"] == 0
    assert rep["migration"]["pages_sent"] < rep["migration"]["pages_sent_baseline"]
    assert rep["hints"]["ranges"] > 0 and rep["faults"] > 0
    assert rep["trace"]["events"] > 10_000


def test_converted_trace_replays_identically(tmp_path):
    src = DATA / "numpy-churn"
    out = tmp_path / "churn.hpt"
    convert(src, out)
    cfg = RunConfig.for_replay(migration=MigrationConfig(bandwidth_gbit=100.0), baseline=False)
    a, b = replay(open_trace(src), cfg), replay(open_trace(out), cfg)
    for key in ("events", "span_s", "pages"):
        assert a["trace"][key] == b["trace"][key]
    assert a["initial"] == b["initial"]
    assert a["final"]["free_pages"] == b["final"]["free_pages"]
    assert a["migration"]["lost_pages"] == b["migration"]["lost_pages"] == 0


def test_trace_walker_reports_only_free_blocks_once_per_round():
    trace = open_trace(DATA / "tar-gzip")
    model = ReplayModel(trace.initial_free, [])
    w = TraceWalker(model, min_order=3, batch=16, time_budget_us=1e9)
    w.start_round()
    seen = set()
    victims = np.random.default_rng(5).permutation(np.flatnonzero(model.free_mask))
    while not w.done:
        pfns, orders = w.next_batch()
        assert len(pfns) <= 16
        assert model.is_free_block(pfns, orders).all()
        for p in pfns.tolist():
            assert p not in seen
            seen.add(p)
        # the guest allocates some free pages between batches
        model.free_mask[victims[:200]] = False
        victims = victims[200:]
    assert seen


def test_isolate_is_refused_with_a_reason():
    with pytest.raises(ReplayUsageError, match="detect mode only"):
        RunConfig.for_replay(race_mode="isolate")


async def test_replay_with_extra_writes_still_verifies(autojump_clock):
    trace = open_trace(DATA / "numpy-churn")
    events = EventBatch.concat(list(trace.batches()))
    cfg = RunConfig.for_replay(migration=MigrationConfig(bandwidth_gbit=50.0), write_rate=200_000, baseline=False)
    run = await replay_migration(trace, events, cfg)
    assert run.result.lost_pages == 0
    assert run.workload.pages_written > 0


def test_cli_replay_json_and_bad_input(tmp_path, capsys):
    assert main(["replay", str(DATA / "numpy-churn"), "--json", "--bandwidth", "100", "--no-baseline"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("events",):
        assert key in rep["trace"]
    assert len(rep["initial"]["free_by_order"]) == 11
    assert rep["final"]["reference_free_pages"] is not None
    assert "elapsed_s" in rep and "pages_sent" in rep["migration"]
    # a recording without its kpageflags snapshot: one sentence, exit 2
    bad = tmp_path / "rec"
    bad.mkdir()
    (bad / "kmem.trace.zst").write_bytes((DATA / "numpy-churn" / "kmem.trace.zst").read_bytes())
    assert main(["replay", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "kpageflags" in err and "Traceback" not in err
