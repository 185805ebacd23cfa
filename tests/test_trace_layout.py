"""What each PFN of a recording was at its start: free, used, zero or balloon, not RAM."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard

from hintpipe.trace import TraceError, convert, open_trace
from hintpipe.trace.format import MAGIC
from hintpipe.trace.layout import PAGES_PER_SECTION, PageKind, Zone, classify, reported_blocks
from hintpipe.trace.snapshot import PageFlags, parse_zoneinfo

DATA = Path(__file__).parent / "data" / "traces"
S = PAGES_PER_SECTION


def _flags(n: int) -> PageFlags:
    z = lambda: np.zeros(n, bool)  # noqa: E731
    return PageFlags(buddy=z(), uptodate=z(), nopage=z(), offline=z(), no_flags=z())


def test_classify_holes_untouched_memory_balloon_and_missing_struct_pages():
    n = 8 * S
    f = _flags(n)
    used = np.ones(n, bool)
    # zone A [1, 4S): its top section is a hole (spanned - present = S), flag-less
    # zone B [4S, 8S): the top 2 sections were never initialised (present - managed = 2S)
    a = Zone("A", 1, 4 * S - 1, 3 * S - 1, 3 * S - 1)
    b = Zone("B", 4 * S, 4 * S, 4 * S, 2 * S)
    used[3 * S:4 * S] = used[6 * S:] = False
    used[6 * S - 10:6 * S] = False  # flag-less pages just below the tail: not whole sections
    f.no_flags[:] = ~used
    f.buddy[S:S + 1024] = True
    f.no_flags[S:S + 1024] = False
    f.offline[5 * S:5 * S + 512] = True  # a balloon's pages
    f.nopage[2 * S:2 * S + 8] = True
    lay = classify(f, [a, b])
    k = lay.kind
    assert k[0] == PageKind.NOT_RAM  # before the first zone
    assert (k[3 * S:4 * S] == PageKind.NOT_RAM).all()
    assert (k[6 * S:] == PageKind.ZERO).all() and (k[6 * S - 10:6 * S] == PageKind.USED).all()
    assert (k[5 * S:5 * S + 512] == PageKind.ZERO).all()
    assert (k[2 * S:2 * S + 8] == PageKind.NOT_RAM).all()
    assert (k[S:S + 1024] == PageKind.FREE).all()
    by = lay.pages_by_kind()
    assert by == {"free": 1024, "used": n - 1024 - (S + 1 + 8) - (2 * S + 512), "zero_or_balloon": 2 * S + 512,
                  "not_ram": S + 1 + 8}
    assert not lay.notes  # both zones' counts matched what was found


def test_shared_recordings_kinds(tmp_path):
    trace = open_trace(DATA / "tar-gzip")
    lay = trace.layout
    assert lay.pages_by_kind() == {"free": 1_087_144, "used": 125_271, "zero_or_balloon": 5_079_040,
                                   "not_ram": 262_145}
    assert lay.kind[0] == PageKind.NOT_RAM  # before the DMA zone
    hole = lay.kind[786432:1048576]  # the 3-4 GiB PCI hole at the top of DMA32
    assert (hole == PageKind.NOT_RAM).all()
    normal = next(z for z in lay.zones if z.name == "Normal")
    assert int(np.count_nonzero(lay.kind == PageKind.ZERO)) == normal.present - normal.managed
    assert [z.name for z in lay.zones] == ["DMA", "DMA32", "Normal"] and normal.low == 7480
    assert any("97 hole pages" in note for note in lay.notes)
    # the blocks the recorded guest's reporting had handed to the host: 109 of order 9, 867 of 10
    rep = lay.reported
    assert rep is not None and int(np.count_nonzero(rep & ~trace.initial_free)) == 0
    # and they survive trace-v1
    out = tmp_path / "t.hpt"
    convert(DATA / "tar-gzip", out)
    lay2 = open_trace(out).layout
    assert np.array_equal(lay2.kind, lay.kind) and np.array_equal(lay2.reported, lay.reported)
    assert lay2.zones == lay.zones and lay2.notes == lay.notes


def test_reported_blocks_follow_the_head_page():
    buddy = np.zeros(4096, bool)
    buddy[1024:3072] = True  # two order-10 blocks
    buddy[3072:3584] = True  # one order-9 block
    up = np.zeros(4096, bool)
    up[2048] = up[3072] = True  # the second order-10 head and the order-9 head are Reported
    up[1500] = True  # a tail page's flag says nothing
    rep = reported_blocks(buddy, up)
    assert not rep[1024:2048].any() and rep[2048:3584].all() and not rep[3584:].any()


def test_zoneinfo_watermarks_and_protection():
    text = (DATA / "tar-gzip" / "zoneinfo.start").read_text()
    dma32 = next(z for z in parse_zoneinfo(text) if z["zone"] == "DMA32")
    assert (dma32["min"], dma32["low"], dma32["high"]) == (10857, 13571, 16285)
    assert dma32["protection"] == [0, 0, 1664, 1664, 1664] and dma32["start_pfn"] == 4096


def _rewrite_header(src: Path, dst: Path, change) -> None:
    data = src.read_bytes()[len(MAGIC):]
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 30)
    unpacker.feed(raw)
    recs = list(unpacker)
    change(recs[0])
    body = b"".join(msgpack.packb(r, use_bin_type=True) for r in recs)
    dst.write_bytes(MAGIC + zstandard.ZstdCompressor().compress(body))


def test_trace_v1_without_a_layout_counts_every_pfn_as_ram_and_a_bad_one_is_refused(tmp_path):
    src = tmp_path / "t.hpt"
    convert(DATA / "numpy-churn", src)
    old = tmp_path / "old.hpt"
    _rewrite_header(src, old, lambda h: [h.pop(k) for k in ("zones", "not_ram", "zero_at_start",
                                                             "reported_at_start", "layout_notes")])
    trace = open_trace(old)
    assert trace.known_layout is None
    by = trace.layout.pages_by_kind()
    assert by["not_ram"] == by["zero_or_balloon"] == 0 and by["free"] == int(trace.initial_free.sum())
    bad = tmp_path / "bad.hpt"
    _rewrite_header(src, bad, lambda h: h.update(not_ram={"encoding": "bitmap-le", "data": b"\x00"}))
    with pytest.raises(TraceError, match="not_ram"):
        open_trace(bad)
    far = tmp_path / "far.hpt"
    _rewrite_header(src, far, lambda h: h["zones"].append({**h["zones"][-1], "start_pfn": 1 << 30}))
    with pytest.raises(TraceError, match="outside"):
        open_trace(far)


def test_replay_reports_pages_by_kind_and_keeps_not_ram_off_the_link():
    from hintpipe.config import RunConfig
    from hintpipe.host.migration import MigrationConfig
    from hintpipe.trace.replay import replay

    trace = open_trace(DATA / "numpy-churn")
    rep = replay(trace, RunConfig.for_replay(migration=MigrationConfig(bandwidth_gbit=100.0)), ["none"], jobs=1)
    by = rep["trace"]["pages_by_kind"]
    assert by == trace.layout.pages_by_kind()
    # round 0 sends all RAM and nothing else
    assert rep["migration"]["per_round"][0]["sent"] == rep["trace"]["pages"] - by["not_ram"]
    # stale free pages go in full: only never-touched RAM is zero
    assert rep["migration"]["zero_pages_sent"] <= by["zero_or_balloon"]
    assert rep["trace"]["reported_blocks_by_order"][9:] == [15, 811]
    # the same with the layout gone: every PFN counts as RAM
    bare = replace(trace, known_layout=None)
    rep2 = replay(bare, RunConfig.for_replay(migration=MigrationConfig(bandwidth_gbit=100.0)), ["none"], jobs=1)
    assert rep2["migration"]["per_round"][0]["sent"] == rep2["trace"]["pages"]
