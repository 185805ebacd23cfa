"""The hinting policies of ``hintpipe replay --policy``: each verifies on real recordings, each
keeps the constants that define it, and a broken policy makes the oracle fail."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hintpipe.cli import main
from hintpipe.config import RunConfig
from hintpipe.host.migration import NORMAL_PAGE_BYTES, ZERO_PAGE_BYTES, MigrationConfig
from hintpipe.trace import EventBatch, open_trace
from hintpipe.trace.layout import PageKind
from hintpipe.trace.policies import (
    PAGE_REPORTING_BUDGET_LISTS,
    PAGE_REPORTING_CAPACITY,
    PAGE_REPORTING_DELAY_S,
    POLICY_NAMES,
    VIRTIO_BALLOON_HINT_BLOCK_ORDER,
    policy_names,
)
from hintpipe.trace.replay import replay, replay_migration

DATA = Path(__file__).parent / "data" / "traces"
DOCS = Path(__file__).parents[1] / "docs" / "policies.md"
# a fixed charge per zone-lock hold: the virtual timeline does not depend on this machine's speed
CFG = RunConfig.for_replay(migration=MigrationConfig(bandwidth_gbit=10.0), fixed_hold_s=20e-6)


def _load(name: str):
    trace = open_trace(DATA / name)
    return trace, EventBatch.concat(list(trace.batches()))


@pytest.fixture(scope="module")
def tar():
    return _load("tar-gzip")


@pytest.fixture(scope="module")
def churn():
    return _load("numpy-churn")


@pytest.mark.parametrize("policy", POLICY_NAMES)
async def test_each_policy_verifies_with_nothing_lost(autojump_clock, churn, policy):
    trace, events = churn
    run = await replay_migration(trace, events, CFG, policy=policy)
    m = run.result
    assert m.verified and m.lost_pages == 0
    assert run.policy.figures()["pages_destroyed"] == 0
    assert m.allocated_pages > 0 and m.pages_sent > 0


def test_report_lists_every_policy_with_the_documented_keys(churn):
    trace, _ = churn
    rep = replay(trace, CFG, ["all"], jobs=1)
    doc = DOCS.read_text()
    table = doc[doc.index("<!-- policy-keys -->"):doc.index("<!-- /policy-keys -->")]
    keys = re.findall(r"^\| `([a-z_.0-9]+)` \|", table, re.M)
    assert "bytes_sent" in keys and "lock.p99_hold_us" in keys
    assert [p["name"] for p in rep["policies"]] == list(POLICY_NAMES)
    for entry in rep["policies"]:
        flat = {k for k, v in entry.items() if not isinstance(v, dict)}
        flat |= {f"{k}.{kk}" for k, v in entry.items() if isinstance(v, dict) and k != "details"
                 for kk in v if k != "reclaim" or kk != "series"} | {k for k, v in entry.items() if isinstance(v, dict)}
        assert set(keys) <= flat, set(keys) - flat
        assert entry["verified"] and entry["lost_pages"] == 0
    base = rep["policies"][-1]
    assert base["name"] == "none" and base["bytes_saved_pct"] == 0.0
    # today's keys stay, for the first policy (hintpipe), with the none run as their baseline
    assert rep["migration"]["bytes_sent_baseline"] == base["bytes_sent"]
    assert rep["migration"]["pages_sent"] == rep["policies"][0]["pages_sent"]
    assert sum(rep["trace"]["pages_by_kind"].values()) == rep["trace"]["pages"]


async def test_none_sends_every_ram_page_and_prices_zero_pages_as_headers(autojump_clock, churn):
    trace, events = churn
    run = await replay_migration(trace, events, CFG, policy="none")
    m = run.result
    kinds = trace.layout.kind
    first = m.round_reports[0]
    assert first.sent == int(np.count_nonzero(kinds != PageKind.NOT_RAM))  # all RAM, nothing else
    assert m.pages_skipped == 0 and run.session is None
    assert m.bytes_sent == m.zero_pages_sent * ZERO_PAGE_BYTES + (m.pages_sent - m.zero_pages_sent) * NORMAL_PAGE_BYTES
    # free pages hold stale data (sent in full); never-touched RAM is all there is of zero pages
    assert m.zero_pages_sent <= int(np.count_nonzero(kinds == PageKind.ZERO))
    assert m.pages_sent - m.zero_pages_sent >= int(np.count_nonzero(kinds == PageKind.FREE))


def test_single_hintpipe_replay_matches_the_none_policy_as_its_baseline(churn):
    trace, _ = churn
    one = replay(trace, CFG, ["hintpipe"], jobs=1)
    assert one["policy"] == "hintpipe" and [p["name"] for p in one["policies"]] == ["hintpipe"]
    none = replay(trace, CFG, ["none"], jobs=1)
    assert one["migration"]["bytes_sent_baseline"] == none["policies"][0]["bytes_sent"]
    assert one["migration"]["bytes_saved_pct"] == one["policies"][0]["bytes_saved_pct"] > 0


async def _reporting_run(trace, events, **kw):
    """page-reporting on a guest whose recording shows no block Reported yet (so its passes have
    work), over a link slow enough for several passes."""
    layout = replace(trace.layout, reported=None)
    trace = replace(trace, known_layout=layout)
    cfg = replace(CFG, migration=MigrationConfig(bandwidth_gbit=1.0))
    return await replay_migration(trace, events, cfg, policy="page-reporting", policy_kw=kw)


async def test_page_reporting_keeps_its_order_capacity_delay_and_budget(autojump_clock, tar):
    trace, events = tar
    run = await _reporting_run(*tar)
    pol = run.policy
    assert run.result.verified and run.result.lost_pages == 0
    reports = [h for h in pol.history if h[0] == "report"]
    passes = [h for h in pol.history if h[0] == "pass"]
    lists = [h for h in pol.history if h[0] == "list"]
    assert len(passes) >= 2 and len(reports) > len(passes)
    for _, _, orders in reports:
        assert 1 <= len(orders) <= PAGE_REPORTING_CAPACITY
        assert min(orders) >= pol.order
    for _, start, end, due in passes:
        assert start >= due + PAGE_REPORTING_DELAY_S - 1e-9
    for _, zone, order, nr_free, budget, full in lists:
        assert budget == -(-nr_free // (PAGE_REPORTING_CAPACITY * PAGE_REPORTING_BUDGET_LISTS))
        assert full <= budget + 1
    # the budget cut at least one list short, so a pass asked for the next one
    assert any(full == budget + 1 for *_, budget, full in lists)
    assert all(zone != 0 for _, zone, *_ in lists)  # DMA never clears the watermark gate
    f = run.policy.figures()
    assert f["pages_hinted"] == sum(1 << o for *_, orders in reports for o in orders)
    # reported pages are sent as zero pages: fewer full pages than without reporting
    none = await replay_migration(trace, events, replace(CFG, migration=MigrationConfig(bandwidth_gbit=1.0)),
                                  policy="none")
    assert run.result.bytes_sent < none.result.bytes_sent


async def test_page_reporting_respects_a_higher_order(autojump_clock, tar):
    run = await _reporting_run(*tar, order=10)
    orders = [o for h in run.policy.history if h[0] == "report" for o in h[2]]
    assert orders and set(orders) == {10}


def _synthetic(pages: int, events: list[tuple[float, int, int, int]]):
    """A guest of ``pages`` free pages in one zone and a trace of (t_s, type, pfn, order) events."""
    from hintpipe.trace.events import COLUMNS
    from hintpipe.trace.layout import Layout, Zone
    from hintpipe.trace.recording import Trace

    free = np.ones(pages, bool)
    zone = Zone("Normal", 0, pages, pages, pages, min=64, low=80, high=96)
    layout = Layout(np.full(pages, PageKind.FREE, np.uint8), [zone], None)
    cols = {k: np.zeros(len(events), dt) for k, dt in COLUMNS.items()}
    for i, (t, etype, pfn, order) in enumerate(events):
        cols["ts_ns"][i], cols["etype"][i], cols["pfn"][i], cols["order"][i] = int(t * 1e9), etype, pfn, order
    return Trace(Path("synthetic"), "trace-v1", free, known_layout=layout), EventBatch(**cols)


async def test_a_discard_of_a_page_the_guest_reuses_fails_the_oracle(autojump_clock):
    # 256 MiB, all free: the pass 2 s in isolates every 4 MiB block, 32 per report, block 0 in
    # the first; the trace allocates a page of block 0 while that report is with the host
    trace, events = _synthetic(1 << 16, [(0.0, 3, 60000, 0), (2.01, 0, 5, 0), (2.5, 1, 5, 0)])
    cfg = replace(CFG, migration=MigrationConfig(bandwidth_gbit=0.5))
    good = await replay_migration(trace, events, cfg, policy="page-reporting")
    f = good.policy.figures()
    assert f["alloc_conflicts"] == 1 and f["pages_released_on_conflict"] == 1 << 10
    assert good.result.verified and f["pages_destroyed"] == 0
    first = next(h for h in good.policy.history if h[0] == "report")
    assert first[1] == pytest.approx(PAGE_REPORTING_DELAY_S, abs=1e-3) and len(first[2]) == PAGE_REPORTING_CAPACITY
    # without the withdrawal Linux's isolation stands for, the host discards the page in use
    broken = await replay_migration(trace, events, cfg, policy="page-reporting", policy_kw={"withdraw": False})
    assert broken.policy.figures()["pages_destroyed"] == 1
    assert not broken.result.verified


async def test_balloon_hint_holds_order_10_blocks_until_done(autojump_clock, churn):
    trace, events = churn
    run = await replay_migration(trace, events, CFG, policy="balloon-hint")
    pol, conn = run.policy, run.session.conn
    f = pol.figures()
    size = 1 << VIRTIO_BALLOON_HINT_BLOCK_ORDER
    assert run.result.verified and run.result.lost_pages == 0
    # the host saw one 4 MiB block per hint, and applied them under the round's command id
    assert conn.hints_ranges == pol.walker.blocks > 0 and conn.hints_pages == size * conn.hints_ranges
    assert conn.hints_frames == conn.hints_ranges
    d = f["details"]
    released_early = f["pages_released_on_conflict"] // size + d["shrinker_returns"]
    assert d["blocks_allocated"] == d["returned_at_done"] + released_early
    assert d["returned_at_done"] > 0 and pol.side.n_taken == 0
    # page-seconds: the held pages integrated over the replay, up to the pause
    hist = pol.side.history
    held, area = 0, 0.0
    for (t, dp), (t_next, _) in zip(hist, hist[1:] + [(hist[-1][0], 0)]):
        held += dp
        area += held * (t_next - t)
    assert f["page_seconds_held"] == pytest.approx(area, rel=1e-6) and area > 0
    assert f["max_pages_held"] == max(np.cumsum([dp for _, dp in hist]))


async def test_balloon_hint_with_write_tracking_broken_loses_pages(autojump_clock, churn):
    trace, events = churn
    run = await replay_migration(trace, events, replace(CFG, broken={"invalidate"}), policy="balloon-hint")
    assert run.policy.figures()["alloc_conflicts"] > 0  # the trace reused held blocks
    assert run.result.lost_pages > 0 and not run.result.verified


async def test_hintpipe_with_write_tracking_broken_loses_pages(autojump_clock, churn):
    trace, events = churn
    run = await replay_migration(trace, events, replace(CFG, broken={"invalidate"}), policy="hintpipe")
    assert run.result.lost_pages > 0 and not run.result.verified


def test_policy_names():
    assert policy_names(["all"]) == list(POLICY_NAMES)
    assert policy_names(["none", "hintpipe", "none"]) == ["none", "hintpipe"]
    with pytest.raises(ValueError, match="page-reporting"):
        policy_names(["reporting"])


def test_cli_policy_table_and_errors(capsys, tmp_path):
    path = str(DATA / "numpy-churn")
    assert main(["replay", path, "--policy", "hintpipe", "--policy", "none", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("hintpipe ", "none "))]
    assert len(rows) == 2 and "VERIFIED" in out
    for bad, what in ((["--policy", "nope"], "--policy: invalid choice"), (["--jobs", "0"], "--jobs")):
        with pytest.raises(SystemExit) as exit_:
            main(["replay", path, *bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert what in err and "Traceback" not in err


def test_cli_json_policies_in_parallel_workers(capsys):
    assert main(["replay", str(DATA / "numpy-churn"), "--policy", "page-reporting", "--policy", "none",
                 "--json", "--jobs", "2"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in rep["policies"]] == ["page-reporting", "none"]
    assert all(p["verified"] for p in rep["policies"])
    series = rep["policies"][0]["reclaim"]["series"]
    assert len(series["t_s"]) == len(series["mib_4k"]) == len(series["mib_2m"]) > 1
