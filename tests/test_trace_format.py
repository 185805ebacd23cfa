"""hintpipe trace-v1: round trip, replay equality, inspect, bad files."""

import numpy as np
import pytest

from hintpipe.trace.errors import TraceError
from hintpipe.trace.events import COLUMNS, EventBatch
from hintpipe.trace.format import MAGIC
from hintpipe.trace.recording import convert, open_trace
from hintpipe.trace.summary import inspect, render_text
from test_trace_helpers import NUMPY


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("v1") / "numpy.hpt"
    summary = convert(NUMPY, out)
    return out, summary


def test_round_trip_columns(converted):
    out, summary = converted
    a = EventBatch.concat(list(open_trace(NUMPY).batches()))
    tr = open_trace(out)
    b = EventBatch.concat(list(tr.batches()))
    assert summary["events"] == len(a) == len(b)
    for k in COLUMNS:
        assert np.array_equal(getattr(a, k), getattr(b, k)) and getattr(b, k).dtype == COLUMNS[k]
    rec = open_trace(NUMPY)
    assert np.array_equal(tr.initial_free, rec.initial_free)
    assert tr.buddyinfo_end == rec.buddyinfo_end and tr.buddyinfo_start == rec.buddyinfo_start
    assert tr.source["workload"] == rec.source["workload"]


def test_converted_replay_equals_recording_replay(converted):
    out, _ = converted
    ma, mb = open_trace(NUMPY).model(), open_trace(out).model()
    t = ma.peek_first_ts_ns()
    assert t == mb.peek_first_ts_ns()
    while not ma.done:
        t += 20_000_000
        ra, rb = ma.advance_to(t), mb.advance_to(t)
        assert all(np.array_equal(x, y) for x, y in zip(ra, rb))
    assert mb.done and np.array_equal(ma.free_mask, mb.free_mask)


def test_inspect(converted):
    out, _ = converted
    a, b = inspect(NUMPY, samples=10), inspect(out, samples=10)
    for k in ("events", "by_type", "by_type_order", "span_s", "initial", "final", "free_over_time"):
        assert a[k] == b[k], k
    assert a["events"] == 40000 and len(a["free_over_time"]) == 10
    assert a["final"]["reference_free_pages"] == 875726
    assert sum(a["by_type"].values()) == a["events"]
    txt = render_text(a)
    assert "mm_page_pcpu_drain" in txt and "buddyinfo.end" in txt


def test_bad_v1_files(converted, tmp_path):
    out, _ = converted
    raw = out.read_bytes()
    (tmp_path / "trunc.hpt").write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(TraceError) as ei:
        list(open_trace(tmp_path / "trunc.hpt").batches())
    assert ei.value.code == "truncated" and "trunc.hpt" in str(ei.value)
    (tmp_path / "magic.hpt").write_bytes(b"NOTMAGIC" + raw[8:])
    with pytest.raises(TraceError) as ei:
        open_trace(tmp_path / "magic.hpt")
    assert ei.value.code == "format"
    bad = bytearray(raw)
    bad[len(raw) // 2: len(raw) // 2 + 32] = bytes(32)
    (tmp_path / "corrupt.hpt").write_bytes(bytes(bad))
    with pytest.raises(TraceError) as ei:
        list(open_trace(tmp_path / "corrupt.hpt").batches())
    assert ei.value.code in ("corrupt", "format", "truncated")


def test_missing_snapshot_and_trace(tmp_path):
    (tmp_path / "kmem.trace").write_bytes(b"")
    with pytest.raises(TraceError) as ei:
        open_trace(tmp_path)
    assert ei.value.code == "missing" and "kpageflags" in str(ei.value) and str(tmp_path) in str(ei.value)
    with pytest.raises(TraceError) as ei:
        open_trace(tmp_path / "nope")
    assert ei.value.code == "missing"


def test_pfn_beyond_snapshot_in_recording(tmp_path):
    import shutil
    import zstandard
    shutil.copy(NUMPY / "kpageflags.start.zst", tmp_path)
    line = b"            date-6264    [000] ...2.   582.427294: mm_page_free: page=000000001c3a8c5c pfn=0x%x order=0\n"
    data = line % 5 + line % 6 + line % 6553600
    (tmp_path / "kmem.trace.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    with pytest.raises(TraceError) as ei:
        list(open_trace(tmp_path).batches())
    assert ei.value.code == "pfn-range" and ei.value.line == 3 and "kmem.trace.zst" in str(ei.value)


def _build_v1(path, records, frames=1):
    """Write a trace-v1 file by hand from the spec (independent of the writer)."""
    import msgpack
    import zstandard
    body = b"".join(msgpack.packb(r, use_bin_type=True) for r in records)
    cut = len(body) // 2
    parts = [body] if frames == 1 else [body[:cut], body[cut:]]
    path.write_bytes(MAGIC + b"".join(zstandard.ZstdCompressor(write_checksum=True).compress(p) for p in parts))


SPEC_HEADER = {"type": "header", "magic": "hintpipe-trace", "version": 1, "page_size": 4096, "page_count": 2,
               "initial_free": {"encoding": "bitmap-le", "data": b"\x02"}, "buddyinfo_start": None,
               "buddyinfo_end": None, "source": {},
               "columns": [["ts_ns", "<i8"], ["etype", "|u1"], ["pfn", "<u8"], ["order", "|u1"],
                           ["migratetype", "|i1"], ["percpu_refill", "|u1"], ["cpu", "<u2"]]}
SPEC_BATCH = {"type": "batch", "n": 1, "ts_ns": b"\x00\xca\x9a\x3b\x00\x00\x00\x00", "etype": b"\x03",
              "pfn": b"\x01\x00\x00\x00\x00\x00\x00\x00", "order": b"\x00", "migratetype": b"\x01",
              "percpu_refill": b"\x01", "cpu": b"\x00\x00"}


@pytest.mark.parametrize("frames", [1, 2])
def test_spec_example_reads_as_specified(tmp_path, frames):
    p = tmp_path / "spec.hpt"
    _build_v1(p, [SPEC_HEADER, {"type": "future-record", "x": 1}, SPEC_BATCH, {"type": "end", "events": 1}], frames)
    tr = open_trace(p)
    assert tr.page_count == 2 and tr.initial_free.tolist() == [False, True]
    b = EventBatch.concat(list(tr.batches()))
    assert b.ts_ns.tolist() == [10**9] and b.etype.tolist() == [3] and b.pfn.tolist() == [1]
    m = tr.model()
    m.run_to_end()
    assert m.nr_free_pages == 0


@pytest.mark.parametrize("bad", [
    dict(SPEC_HEADER, version=2),
    dict(SPEC_HEADER, page_count="2"),
    dict(SPEC_HEADER, columns=[["ts_ns", "<i4"]]),
    dict(SPEC_HEADER, columns=7),
    dict(SPEC_HEADER, initial_free={"encoding": "bitmap-le", "data": b"\x02\x00"}),
    dict(SPEC_HEADER, buddyinfo_end={"free_pages": "x"}),
    [1, 2, 3],
])
def test_bad_headers_are_format_errors(tmp_path, bad):
    p = tmp_path / "bad.hpt"
    _build_v1(p, [bad, {"type": "end", "events": 0}])
    with pytest.raises(TraceError) as ei:
        open_trace(p)
    assert ei.value.code == "format"


@pytest.mark.parametrize("bad,code", [
    (dict(SPEC_BATCH, n=2), "format"),
    (dict(SPEC_BATCH, n="1"), "format"),
    (dict(SPEC_BATCH, etype=b"\x07"), "format"),
    (dict(SPEC_BATCH, pfn=b"\x02\x00\x00\x00\x00\x00\x00\x00"), "pfn-range"),
    (dict(SPEC_BATCH, order=b"\x0b"), "format"),
])
def test_bad_batches(tmp_path, bad, code):
    p = tmp_path / "bad.hpt"
    _build_v1(p, [SPEC_HEADER, bad, {"type": "end", "events": 1}])
    with pytest.raises(TraceError) as ei:
        list(open_trace(p).batches())
    assert ei.value.code == code


def test_wrong_end_count(tmp_path):
    p = tmp_path / "bad.hpt"
    _build_v1(p, [SPEC_HEADER, SPEC_BATCH, {"type": "end", "events": 5}])
    with pytest.raises(TraceError, match="end record says 5"):
        list(open_trace(p).batches())


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, derandomize=True, deadline=None)
@given(st.data())
def test_mutated_v1_never_crashes(tmp_path_factory, data):
    """Any byte flips in a small trace-v1 file give a TraceError or a valid read, nothing else."""
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "f.hpt"
    _build_v1(p, [SPEC_HEADER, SPEC_BATCH, SPEC_BATCH, {"type": "end", "events": 2}])
    raw = bytearray(p.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    p.write_bytes(bytes(raw))
    try:
        tr = open_trace(p)
        m = tr.model()
        m.run_to_end()
    except TraceError:
        pass


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.data())
def test_mutated_tracefs_lines_never_crash(tmp_path_factory, data):
    """Byte mutations of real lines: a TraceError naming a line, or events, never another error."""
    from hintpipe.trace.tracefs import parse_chunk
    from test_trace_helpers import text
    lines = text(NUMPY)[:20000]
    lines = bytearray(lines[: lines.rfind(b"\n") + 1])
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(lines) - 1))
        lines[i] = data.draw(st.sampled_from([0x20, 0x30, 0x39, 0x61, 0x7A, 0x3A, 0x2E, 0x0A, 0x5D, 0xFF, 0x00]))
    try:
        b = parse_chunk(bytes(lines), page_count=6553600)
        assert (b.order <= 10).all() and (b.etype <= 4).all()
    except TraceError as e:
        assert e.line is not None and e.line >= 1
