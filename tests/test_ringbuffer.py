"""The ring-buffer decoder: pages built from the kernel's parsed descriptions, and real pages
checked against the kernel's own text of the same records."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zstandard

from hintpipe.trace.errors import TraceError
from hintpipe.trace.events import COLUMNS, EventBatch, EventType
from hintpipe.trace.recording import open_trace
from hintpipe.trace.ringbuffer import (FAILED_PFN, TS_MSB, DecodeStats, RingBufferDecoder, iter_raw_batches,
                                       merge_by_time, parse_format, parse_header_event, parse_header_page)
from hintpipe.trace.tracefs import parse_tracefs
from ringbuffer_pages import Rec, page, payload
from test_trace_helpers import DATA, NUMPY

GOLDEN = DATA.parent / "ringbuffer" / "golden"
DESCRIPTIONS = GOLDEN / "raw"
ALLOC, FREE, BATCHED, ZLOCKED, DRAIN = (EventType.ALLOC, EventType.FREE, EventType.FREE_BATCHED,
                                        EventType.ALLOC_ZONE_LOCKED, EventType.PCPU_DRAIN)


@pytest.fixture
def dec():
    return RingBufferDecoder.from_dir(DESCRIPTIONS)


def alloc(dec, pfn, order=0, mt=1, **kw):
    return payload(dec.formats["mm_page_alloc"], pfn=pfn, order=order, migratetype=mt, gfp_flags=0xcc0, **kw)


def free(dec, pfn, order=0, **kw):
    return payload(dec.formats["mm_page_free"], pfn=pfn, order=order, **kw)


def mk(dec, ts, recs, **kw):
    return page(dec.layout, dec.header, ts, recs, **kw)


def read_all(raw_dir, **kw) -> EventBatch:
    return EventBatch.concat(list(iter_raw_batches(raw_dir, **kw)))


# -- descriptions -------------------------------------------------------------------------------

def test_descriptions_parse_as_the_kernel_prints_them():
    lay = parse_header_page((DESCRIPTIONS / "header_page").read_text())
    assert (lay.ts_offset, lay.commit_offset, lay.commit_size, lay.data_offset, lay.page_size) == (0, 8, 8, 16, 4096)
    h = parse_header_event((DESCRIPTIONS / "header_event").read_text())
    assert (h.padding, h.time_extend, h.time_stamp, h.data_max) == (29, 30, 31, 28)
    f = parse_format((DESCRIPTIONS / "kmem" / "mm_page_alloc_zone_locked" / "format").read_text())
    assert f.id == int((DESCRIPTIONS / "kmem" / "mm_page_alloc_zone_locked" / "id").read_text())
    assert (f.fields["pfn"].offset, f.fields["percpu_refill"].offset, f.fields["migratetype"].signed) == (8, 24, True)


def test_offsets_come_from_the_format_not_from_constants(tmp_path):
    # move mm_page_free's fields: a decoder with built-in offsets would misread them
    d = tmp_path / "raw"
    shutil.copytree(DESCRIPTIONS, d)
    p = d / "kmem" / "mm_page_free" / "format"
    text = p.read_text().replace("field:unsigned int order;\toffset:16;", "field:unsigned int order;\toffset:20;")
    text = text.replace("field:unsigned long pfn;\toffset:8;", "field:unsigned long pfn;\toffset:24;")
    p.write_text(text)
    dec = RingBufferDecoder.from_dir(d)
    pl = payload(dec.formats["mm_page_free"], pfn=0xABCDE, order=3)
    assert pl[24:32] == (0xABCDE).to_bytes(8, "little") and pl[20] == 3
    ev = dec.decode_pages(mk(dec, 1000, [Rec("data", 5, pl)]), cpu=0)
    assert (int(ev.pfn[0]), int(ev.order[0])) == (0xABCDE, 3)


def test_an_id_file_that_contradicts_the_format_is_refused(tmp_path):
    d = tmp_path / "raw"
    shutil.copytree(DESCRIPTIONS, d)
    (d / "kmem" / "mm_page_free" / "id").write_text("1\n")
    with pytest.raises(TraceError, match="id file") as ei:
        RingBufferDecoder.from_dir(d)
    assert ei.value.code == "format"


def test_a_missing_description_is_named(tmp_path):
    d = tmp_path / "raw"
    shutil.copytree(DESCRIPTIONS, d)
    (d / "header_event").unlink()
    with pytest.raises(TraceError, match="lacks header_event") as ei:
        RingBufferDecoder.from_dir(d)
    assert ei.value.code == "missing"


# -- record types -------------------------------------------------------------------------------

def test_every_kmem_event_decodes_with_its_fields_and_time_stamps(dec):
    recs = [
        Rec("data", 0, alloc(dec, 0x1234, order=2, mt=1)),
        Rec("data", 10, free(dec, 0x1235, order=1)),
        Rec("data", 20, payload(dec.formats["mm_page_free_batched"], pfn=0x1236)),
        Rec("data", 30, payload(dec.formats["mm_page_alloc_zone_locked"], pfn=0x1238, order=3, migratetype=2,
                                percpu_refill=1)),
        Rec("data", 40, payload(dec.formats["mm_page_pcpu_drain"], pfn=0x1240, order=0, migratetype=0)),
    ]
    ev = dec.decode_pages(mk(dec, 5_000_000_000, recs), cpu=3)
    assert ev.etype.tolist() == [ALLOC, FREE, BATCHED, ZLOCKED, DRAIN]
    assert ev.pfn.tolist() == [0x1234, 0x1235, 0x1236, 0x1238, 0x1240]
    assert ev.order.tolist() == [2, 1, 0, 3, 0]
    assert ev.migratetype.tolist() == [1, -1, -1, 2, 0]
    assert ev.percpu_refill.tolist() == [0, 0, 0, 1, 0]
    assert ev.ts_ns.tolist() == [5_000_000_000 + d for d in (0, 10, 30, 60, 100)]
    assert ev.cpu.tolist() == [3] * 5
    assert all(getattr(ev, k).dtype == dt for k, dt in COLUMNS.items())


def test_negative_migratetype_is_sign_extended(dec):
    ev = dec.decode_pages(mk(dec, 1, [Rec("data", 1, alloc(dec, 5, mt=-1))]), 0)
    assert ev.migratetype.tolist() == [-1]


def test_a_failed_allocation_is_counted_and_left_out(dec):
    st = DecodeStats()
    ev = dec.decode_pages(mk(dec, 1, [Rec("data", 1, alloc(dec, -1, order=9)), Rec("data", 1, free(dec, 7))]), 0, st)
    assert ev.pfn.tolist() == [7] and ev.etype.tolist() == [FREE]
    assert st.failed_allocations == 1 and st.records == 1 and FAILED_PFN == 2**64 - 1


def test_time_extend_adds_its_59_bit_delta(dec):
    big = (5 << 27) + 123  # needs the extension word
    recs = [Rec("data", 1, free(dec, 1)), Rec("ext", value=big), Rec("data", 7, free(dec, 2))]
    ev = dec.decode_pages(mk(dec, 1000, recs), 0)
    assert ev.ts_ns.tolist() == [1001, 1001 + big + 7]


def test_absolute_time_stamp_replaces_the_running_stamp(dec):
    recs = [Rec("data", 1, free(dec, 1)), Rec("abs", value=987_654_321_000), Rec("data", 0, free(dec, 2)),
            Rec("data", 4, free(dec, 3))]
    ev = dec.decode_pages(mk(dec, 1000, recs), 0)
    assert ev.ts_ns.tolist() == [1001, 987_654_321_000, 987_654_321_004]


def test_absolute_time_stamp_takes_its_top_five_bits_from_the_running_stamp(dec):
    # a clock with a top bit set (rb_fix_abs_ts): the record holds only the low 59 bits
    top = 1 << 59
    assert top & TS_MSB
    ev = dec.decode_pages(mk(dec, top | 1000, [Rec("abs", value=5000), Rec("data", 0, free(dec, 1))]), 0)
    assert int(ev.ts_ns.view(np.uint64)[0]) == top | 5000
    # low bits below the running stamp's: the top bits have moved on by one
    ev = dec.decode_pages(mk(dec, top | 6000, [Rec("abs", value=10), Rec("data", 0, free(dec, 1))]), 0)
    assert int(ev.ts_ns.view(np.uint64)[0]) == (2 << 59) | 10


def test_type_len_zero_reads_the_length_from_the_next_word(dec):
    # the kernel uses type_len 0 for payloads over 112 bytes (or always, on some arches)
    pl = alloc(dec, 0x42, order=1) + bytes(120)
    ev = dec.decode_pages(mk(dec, 100, [Rec("big", 3, pl), Rec("data", 2, free(dec, 0x43))]), 0)
    assert ev.pfn.tolist() == [0x42, 0x43] and ev.ts_ns.tolist() == [103, 105] and ev.order.tolist() == [1, 0]


def test_padding_is_skipped_and_a_null_padding_ends_the_page(dec):
    recs = [Rec("data", 1, free(dec, 1)), Rec("pad", 50, value=24), Rec("data", 2, free(dec, 2)),
            Rec("null"), Rec("raw", data=b"\xff" * 64)]  # garbage after the null padding
    st = DecodeStats()
    ev = dec.decode_pages(mk(dec, 0, recs), 0, st)
    assert ev.pfn.tolist() == [1, 2]
    assert ev.ts_ns.tolist() == [1, 3]  # a discarded record's delta does not count
    assert st.paddings == 1


def test_missed_events_flags_are_reported_with_their_counts(dec):
    p1 = mk(dec, 10, [Rec("data", 1, free(dec, 1))])
    p2 = mk(dec, 20, [Rec("data", 1, free(dec, 2)), Rec("data", 1, free(dec, 3))], missed=True, missed_count=42)
    p3 = mk(dec, 30, [Rec("data", 1, free(dec, 4))], missed=True)  # flagged, count not stored
    st = DecodeStats()
    ev = dec.decode_pages(p1 + p2 + p3, 5, st)
    assert ev.pfn.tolist() == [1, 2, 3, 4]
    assert st.losses == [(5, 21, 42), (5, 31, -1)]
    assert (st.lost_events, st.lost_unknown) == (42, 1)


def test_pages_of_different_lengths_come_out_in_page_then_record_order(dec):
    rng = np.random.default_rng(7)
    pages, want = [], []
    pfn = 0
    for i in range(40):
        recs = []
        for _ in range(int(rng.integers(0, 120))):
            recs.append(Rec("data", 1, free(dec, pfn)))
            want.append(pfn)
            pfn += 1
            if rng.random() < 0.05:
                recs.append(Rec("ext", value=int(rng.integers(1 << 27, 1 << 40))))
            if rng.random() < 0.03:
                recs.append(Rec("pad", 1, value=8))
        pages.append(mk(dec, 1000 * i, recs))
    st = DecodeStats()
    ev = dec.decode_pages(b"".join(pages), 0, st)
    assert ev.pfn.tolist() == want
    assert st.empty_pages == sum(1 for p in pages if p[8:16] == bytes(8))


def test_records_of_other_events_are_counted_and_left_out(dec):
    other = bytearray(free(dec, 9))
    other[0:2] = (999).to_bytes(2, "little")
    st = DecodeStats()
    ev = dec.decode_pages(mk(dec, 0, [Rec("data", 1, bytes(other)), Rec("data", 1, free(dec, 5))]), 0, st)
    assert ev.pfn.tolist() == [5] and st.other_records == {999: 1}


# -- malformed input ----------------------------------------------------------------------------

def test_a_record_running_past_the_committed_data_is_refused(dec):
    short = bytearray(mk(dec, 0, [Rec("data", 1, free(dec, 1)), Rec("data", 1, free(dec, 2))]))
    rec_len = 4 + len(free(dec, 1))
    short[8:16] = (rec_len + 12).to_bytes(8, "little")  # the commit cuts the second record
    with pytest.raises(TraceError, match="runs past") as ei:
        dec.decode_pages(bytes(short), 0)
    assert ei.value.code == "corrupt"
    lenient = RingBufferDecoder(dec.layout, dec.header, dec.formats, strict=False)
    st = DecodeStats()
    assert lenient.decode_pages(bytes(short), 0, st).pfn.tolist() == [1] and st.bad_pages == 1


def test_a_commit_larger_than_the_page_is_refused(dec):
    p = bytearray(mk(dec, 0, [Rec("data", 1, free(dec, 1))]))
    p[8:16] = (5000).to_bytes(8, "little")
    with pytest.raises(TraceError, match="commit word"):
        dec.decode_pages(bytes(p), 0)


def test_a_bad_length_word_is_refused(dec):
    p = mk(dec, 0, [Rec("raw", data=(0).to_bytes(4, "little") + (6).to_bytes(4, "little") + bytes(8))])
    with pytest.raises(TraceError, match="length word"):
        dec.decode_pages(p, 0)


def test_a_record_shorter_than_its_format_is_refused(dec):
    with pytest.raises(TraceError, match="fewer than its format needs"):
        dec.decode_pages(mk(dec, 0, [Rec("data", 1, free(dec, 1)[:12])]), 0)


def test_bytes_that_are_not_whole_pages_are_refused(dec):
    with pytest.raises(TraceError, match="whole number"):
        dec.decode_pages(bytes(5000), 0)


# -- recordings: CPUs merged, losses, damaged files -----------------------------------------------

def write_raw(folder, dec, per_cpu_pages, meta=None):
    """A raw/ folder with the golden descriptions and the given pages per CPU."""
    raw = folder / "raw"
    shutil.copytree(DESCRIPTIONS, raw)
    for f in raw.glob("cpu*.pages.zst"):
        f.unlink()
    for cpu, pages in per_cpu_pages.items():
        (raw / f"cpu{cpu}.pages.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(pages)))
    if meta is not None:
        (raw / "meta.json").write_text(json.dumps({"format": "hintpipe-raw-pages", "version": 1, **meta}))
    return raw


def test_cpus_merge_by_time_stamp_with_ties_to_the_lower_cpu(tmp_path, dec):
    c0 = [mk(dec, 100, [Rec("data", 0, free(dec, 1)), Rec("data", 20, free(dec, 2))])]
    c1 = [mk(dec, 100, [Rec("data", 0, free(dec, 11)), Rec("data", 10, free(dec, 12))])]
    ev = read_all(write_raw(tmp_path, dec, {1: c1, 0: c0}))
    assert ev.pfn.tolist() == [1, 11, 12, 2] and ev.cpu.tolist() == [0, 1, 1, 0]


def test_a_clock_step_back_falls_back_to_a_stable_sort(dec):
    a = dec.decode_pages(mk(dec, 100, [Rec("data", 0, free(dec, 1)), Rec("abs", value=50), Rec("data", 0, free(dec, 2))]), 0)
    b = dec.decode_pages(mk(dec, 60, [Rec("data", 0, free(dec, 3))]), 1)
    assert merge_by_time([a, b]).pfn.tolist() == [2, 3, 1]


def test_streamed_merge_equals_the_whole_merge(tmp_path, dec):
    rng = np.random.default_rng(3)
    per_cpu = {}
    for cpu in range(3):
        ts, pages = 0, []
        for _ in range(30):
            recs = [Rec("data", int(rng.integers(0, 1000)), free(dec, int(rng.integers(0, 1 << 20))))
                    for _ in range(int(rng.integers(1, 100)))]
            pages.append(mk(dec, ts, recs))
            ts += 200_000
        per_cpu[cpu] = pages
    raw = write_raw(tmp_path, dec, per_cpu)
    small = list(iter_raw_batches(raw, chunk_pages=4))
    whole = EventBatch.concat([dec.decode_pages(b"".join(per_cpu[c]), c) for c in range(3)])
    whole = whole.take(np.argsort(whole.ts_ns, kind="stable"))
    got = EventBatch.concat(small)
    assert len(small) > 3
    assert np.array_equal(got.ts_ns, whole.ts_ns) and np.array_equal(got.pfn, whole.pfn)


def _recording(tmp_path, dec, per_cpu, meta=None):
    """A recording folder: raw pages plus the numpy-churn slice's snapshot."""
    rec = tmp_path / "rec"
    rec.mkdir()
    write_raw(rec, dec, per_cpu, meta)
    shutil.copy(NUMPY / "kpageflags.start.zst", rec)
    return rec


def test_a_raw_recording_with_lost_events_is_refused_unless_skip_bad(tmp_path, dec):
    pages = [mk(dec, 10, [Rec("data", 1, free(dec, 1))]),
             mk(dec, 20, [Rec("data", 1, free(dec, 2))], missed=True, missed_count=7)]
    rec = _recording(tmp_path, dec, {0: pages})
    with pytest.raises(TraceError, match="lost 7 events on CPU 0") as ei:
        open_trace(rec).events()
    assert ei.value.code == "lost-events"
    tr = open_trace(rec, skip_bad=True)
    assert tr.events().pfn.tolist() == [1, 2]
    assert tr.stats.lost_events == 7 and tr.stats.skipped["lost-events"] == 1


def test_the_recorders_own_loss_count_is_enough_to_refuse(tmp_path, dec):
    rec = _recording(tmp_path, dec, {0: [mk(dec, 10, [Rec("data", 1, free(dec, 1))])]}, meta={"lost_events": 3})
    with pytest.raises(TraceError, match="recorder lost 3 events"):
        open_trace(rec).events()
    assert open_trace(rec, skip_bad=True).events().pfn.tolist() == [1]


def test_a_block_beyond_the_snapshot_is_a_pfn_range_error(tmp_path, dec):
    n = open_trace(NUMPY).page_count
    rec = _recording(tmp_path, dec, {0: [mk(dec, 10, [Rec("data", 1, free(dec, n - 1, order=1))])]})
    with pytest.raises(TraceError, match="beyond the snapshot") as ei:
        open_trace(rec).events()
    assert ei.value.code == "pfn-range"


@pytest.mark.parametrize("damage, code", [("truncate", "truncated"), ("flip", "corrupt"), ("stray", "truncated")])
def test_a_damaged_page_file_is_a_clear_error(tmp_path, dec, damage, code):
    pages = [mk(dec, 10 * i, [Rec("data", 1, free(dec, i))]) for i in range(50)]
    raw = write_raw(tmp_path, dec, {0: pages})
    f = raw / "cpu0.pages.zst"
    b = bytearray(f.read_bytes())
    if damage == "truncate":
        b = b[:len(b) // 2]
    elif damage == "flip":
        b[len(b) // 2] ^= 0xFF
    else:
        b = bytearray(zstandard.ZstdCompressor().compress(b"".join(pages) + b"xyz"))
    f.write_bytes(bytes(b))
    with pytest.raises(TraceError) as ei:
        read_all(raw)
    assert ei.value.code == code and "cpu0.pages.zst" in str(ei.value)


def test_raw_pages_are_preferred_over_text_in_one_folder(tmp_path, dec):
    rec = _recording(tmp_path, dec, {0: [mk(dec, 10, [Rec("data", 1, free(dec, 1))])]})
    shutil.copy(NUMPY / "kmem.trace.zst", rec)
    tr = open_trace(rec)
    assert tr.encoding == "ring-buffer" and tr.events().pfn.tolist() == [1]


# -- real pages against the kernel's own text -----------------------------------------------------

def test_real_pages_decode_to_what_the_kernel_printed():
    """A golden pair recorded on Linux 6.18: each CPU's pages, and the kernel's own text of the
    same records (the instance's ``trace`` file read before the pages were drained). The text
    goes through hintpipe's text parser, so the two readers check each other."""
    st = DecodeStats()
    ev = read_all(DESCRIPTIONS, stats=st)
    text = parse_tracefs(GOLDEN / "kernel.trace.zst")
    assert len(ev) == len(text) == 20_831 and st.steps > 100  # full pages: many records per page
    for k in ("etype", "pfn", "order", "migratetype", "percpu_refill", "cpu"):
        assert np.array_equal(getattr(ev, k), getattr(text, k)), k
    assert np.array_equal((ev.ts_ns + 500) // 1000 * 1000, text.ts_ns)  # the text rounds to the microsecond
    assert {0, 1, 2, 3} <= set(np.unique(ev.etype).tolist())


def test_the_specs_example_page_decodes_as_the_spec_says():
    """protocols/recording-v1.md section 8, read from the spec itself."""
    import re
    from pathlib import Path
    spec = (Path(__file__).resolve().parents[1] / "protocols" / "recording-v1.md").read_text()
    block = spec.split("## 8.")[1].split("```")[1]
    page_bytes = bytearray(4096)
    for line in block.strip().splitlines():
        m = re.match(r"([0-9a-f]{2}): ((?:[0-9a-f]{2} )+)", line)
        off = int(m.group(1), 16)
        data = bytes.fromhex(m.group(2))
        page_bytes[off:off + len(data)] = data
    dec = RingBufferDecoder.from_dir(DESCRIPTIONS)
    ev = dec.decode_pages(bytes(page_bytes), cpu=0)
    assert ev.etype.tolist() == [FREE] and ev.pfn.tolist() == [0x1234] and ev.order.tolist() == [2]
    assert ev.ts_ns.tolist() == [1_000_000_008]


def test_cutting_pages_at_a_time_keeps_exactly_the_records_up_to_it(dec):
    rng = np.random.default_rng(11)
    pages, ts = [], 0
    for _ in range(6):
        recs = [Rec("data", int(rng.integers(1, 50)), free(dec, int(rng.integers(0, 1 << 20))))
                for _ in range(int(rng.integers(20, 140)))]
        pages.append(mk(dec, ts, recs))
        ts += 10_000
    whole = dec.decode_pages(b"".join(pages), 0)
    for cut in [int(whole.ts_ns[0]) - 1, int(whole.ts_ns[0]), int(whole.ts_ns[137]), int(whole.ts_ns[-1])]:
        part = dec.cut_pages(b"".join(pages), cut)
        got = dec.decode_pages(part, 0)
        want = whole.take(whole.ts_ns <= cut)
        assert np.array_equal(got.pfn, want.pfn) and np.array_equal(got.ts_ns, want.ts_ns)
        assert len(part) <= len(b"".join(pages)) and len(part) % 4096 == 0


def test_a_raw_recording_converts_to_trace_v1_and_inspects(tmp_path, capsys):
    from hintpipe.cli import main
    from hintpipe.trace.recording import convert
    rec = DATA.parent / "corpus" / "idle"
    s = convert(rec, tmp_path / "idle.hpt")
    a, b = open_trace(rec).events(), open_trace(tmp_path / "idle.hpt").events()
    assert s["events"] == len(a) == len(b) > 10_000
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in COLUMNS)
    assert main(["inspect", str(rec), "--json", "--samples", "5"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["events"] == len(a) and info["encoding"] == "trace-v1"  # through the cache
    assert main(["inspect", str(rec), "--json", "--samples", "5", "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["encoding"] == "ring-buffer"
