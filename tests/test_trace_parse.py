"""tracefs kmem text parsing: fast path vs a brute-force regex, slow path, bad input."""

import gzip

import numpy as np
import pytest
import zstandard

from hintpipe.trace.errors import TraceError
from hintpipe.trace.events import COLUMNS, EVENT_NAMES, EventType
from hintpipe.trace.tracefs import ParseStats, parse_chunk, parse_tracefs
from test_trace_helpers import NUMPY, TAR, regex_rows, text


@pytest.mark.parametrize("rec", [NUMPY, TAR], ids=lambda p: p.name)
def test_parse_matches_regex(rec):
    data = text(rec)
    rows = np.array(regex_rows(data), dtype=object)
    st = ParseStats()
    b = parse_tracefs(rec / "kmem.trace.zst", stats=st, chunk_size=1 << 20)  # several chunks
    assert len(b) == len(rows) == data.count(b"\n")
    for i, k in enumerate(COLUMNS):
        assert np.array_equal(getattr(b, k).astype(np.int64), rows[:, i].astype(np.int64)), k
    # Counts by type equal a brute-force count of event names.
    for t in EventType:
        assert int((b.etype == t).sum()) == data.count(f": {EVENT_NAMES[t]}: ".encode())
    assert st.slow_lines < len(b) // 100  # almost everything takes the vectorised path


def test_plain_and_gzip_equal_zstd(tmp_path):
    data = text(NUMPY)[:2_000_000]
    data = data[: data.rfind(b"\n") + 1]
    (tmp_path / "a.txt").write_bytes(data)
    (tmp_path / "a.gz").write_bytes(gzip.compress(data))
    (tmp_path / "a.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    ref = parse_tracefs(tmp_path / "a.zst")
    for name in ("a.txt", "a.gz"):
        b = parse_tracefs(tmp_path / name)
        assert all(np.array_equal(getattr(b, k), getattr(ref, k)) for k in COLUMNS)


ODD = (b"          <idle>-0       [001] dNs4. 123456.000001: mm_page_free: page=0000000012345678 pfn=0x10 order=10\n"
       b"  kworker/u4:1-12345678 [000] .....     5.123456: mm_page_alloc: page=0000000012345678 pfn=0xabcdef order=0 migratetype=-1 gfp_flags=GFP_KERNEL\n"
       b" a b: mm_page_x-1    [000] .....     5.123457: mm_page_pcpu_drain: page=0000000012345678 pfn=0x1 order=1 migratetype=12\n")


def test_odd_lines_take_slow_path_correctly():
    st = ParseStats()
    b = parse_chunk(ODD, stats=st)
    assert b.etype.tolist() == [EventType.FREE, EventType.ALLOC, EventType.PCPU_DRAIN]
    assert b.order.tolist() == [10, 0, 1]
    assert b.pfn.tolist() == [0x10, 0xABCDEF, 1]
    assert b.migratetype.tolist() == [-1, -1, 12]
    assert b.ts_ns.tolist() == [123456_000_001_000, 5_123_456_000, 5_123_457_000]
    assert b.cpu.tolist() == [1, 0, 0]
    assert st.slow_lines >= 2


GOOD = b"            date-6264    [000] ...2.   582.427294: mm_page_free: page=000000001c3a8c5c pfn=0x1226d5 order=0\n"


@pytest.mark.parametrize("bad,code", [
    (b"            date-6264    [000] ...2.   582.427294: sched_switch: prev_comm=x\n", "unknown-event"),
    (b"garbage line\n", "malformed"),
    (b"            date-6264    [000] ...2.   582.427294: mm_page_free: page=000000001c3a8c5c pfn=0x1226d5\n", "malformed"),
    (b"CPU:1 [LOST 42 EVENTS]\n", "lost-events"),
])
def test_bad_line_names_file_and_line(bad, code, tmp_path):
    p = tmp_path / "kmem.trace"
    p.write_bytes(GOOD * 3 + bad + GOOD)
    with pytest.raises(TraceError) as ei:
        parse_tracefs(p)
    assert ei.value.code == code and ei.value.line == 4 and ei.value.path == str(p)
    assert f"{p}:4:" in str(ei.value)
    st = ParseStats()
    with pytest.warns(UserWarning, match="skipped 1 bad lines"):
        b = parse_tracefs(p, skip_bad=True, stats=st)
    assert len(b) == 4 and st.skipped == {code: 1}


def test_pfn_beyond_snapshot(tmp_path):
    p = tmp_path / "kmem.trace"
    p.write_bytes(GOOD * 2 + GOOD.replace(b"pfn=0x1226d5", b"pfn=0x7fffff"))
    with pytest.raises(TraceError) as ei:
        parse_tracefs(p, page_count=0x200000)
    assert ei.value.code == "pfn-range" and ei.value.line == 3
    st = ParseStats()
    with pytest.warns(UserWarning):
        b = parse_tracefs(p, page_count=0x200000, skip_bad=True, stats=st)
    assert len(b) == 2 and st.skipped == {"pfn-range": 1}


def test_truncated_and_corrupt_zstd(tmp_path):
    raw = (NUMPY / "kmem.trace.zst").read_bytes()
    (tmp_path / "t.zst").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TraceError) as ei:
        parse_tracefs(tmp_path / "t.zst")
    assert ei.value.code in ("truncated", "malformed") and "t.zst" in str(ei.value)
    bad = bytearray(raw)
    bad[len(raw) // 3: len(raw) // 3 + 64] = bytes(64)
    (tmp_path / "c.zst").write_bytes(bytes(bad))
    with pytest.raises(TraceError) as ei:
        parse_tracefs(tmp_path / "c.zst")
    assert ei.value.code in ("corrupt", "malformed") and "c.zst" in str(ei.value)


def test_truncated_zstd_at_line_boundary_is_still_truncated(tmp_path):
    data = GOOD * 1000
    comp = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "t.zst").write_bytes(comp[:-4])  # drop the frame's checksum only
    with pytest.raises(TraceError) as ei:
        parse_tracefs(tmp_path / "t.zst")
    assert ei.value.code in ("truncated", "corrupt")


def test_parsing_chunks_in_parallel_equals_parsing_them_in_turn():
    seq_st, par_st = ParseStats(), ParseStats()
    seq = parse_tracefs(TAR / "kmem.trace.zst", stats=seq_st, chunk_size=1 << 16, workers=1)
    par = parse_tracefs(TAR / "kmem.trace.zst", stats=par_st, chunk_size=1 << 16, workers=2)
    assert len(seq) == 30_000 and seq_st == par_st
    assert all(np.array_equal(getattr(seq, k), getattr(par, k)) for k in COLUMNS)


def test_parallel_parsing_reports_the_first_bad_line_in_file_order(tmp_path):
    lines = text(TAR).splitlines(keepends=True)[:5000]
    lines[3000] = b"garbage line\n"  # a later chunk, possibly parsed first
    lines[1200] = b"CPU:0 [LOST 3 EVENTS]\n"
    p = tmp_path / "kmem.trace"
    p.write_bytes(b"".join(lines))
    with pytest.raises(TraceError) as ei:
        parse_tracefs(p, chunk_size=1 << 14, workers=2)
    assert ei.value.code == "lost-events" and ei.value.line == 1201
    st = ParseStats()
    with pytest.warns(UserWarning, match="skipped 2 bad lines"):
        b = parse_tracefs(p, skip_bad=True, stats=st, chunk_size=1 << 14, workers=2)
    assert len(b) == 4998 and st.skipped == {"lost-events": 1, "malformed": 1} and st.lost_events == 3
