"""The trace cache: a recording converted to trace-v1 once, loaded directly afterwards, rebuilt
whenever what it was made from changes, never written into a read-only recording folder."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from hintpipe.cli import main
from hintpipe.trace import cache
from hintpipe.trace.errors import TraceError
from hintpipe.trace.events import COLUMNS
from hintpipe.trace.recording import open_trace
from test_trace_helpers import NUMPY, text


@pytest.fixture
def rec(tmp_path, monkeypatch):
    """A writable copy of the numpy-churn slice; caches go to their default places (beside it,
    or a user cache folder under tmp_path)."""
    monkeypatch.delenv("HINTPIPE_TRACE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    d = tmp_path / "numpy-churn"
    shutil.copytree(NUMPY, d)
    return d


def _open(d, **kw):
    said: list[str] = []
    tr = open_trace(d, cache=True, log=said.append, **kw)
    return tr, said


def _same(a, b):
    ea, eb = a.events(), b.events()
    assert all(np.array_equal(getattr(ea, k), getattr(eb, k)) for k in COLUMNS)
    assert np.array_equal(a.initial_free, b.initial_free)
    assert a.buddyinfo_start == b.buddyinfo_start and a.buddyinfo_end == b.buddyinfo_end
    assert a.source["workload"] == b.source["workload"]


def test_first_open_converts_and_says_so_later_opens_load_the_cache(rec):
    first, said = _open(rec)
    assert len(said) == 1 and "converted" in said[0] and "beside it" in said[0]
    assert (rec / cache.CACHE_NAME).is_file()
    second, said2 = _open(rec)
    assert said2 == [] and second.encoding == "trace-v1" and second.kind == "recording" and second.path == rec
    assert second.source["cache_file"] == str(rec / cache.CACHE_NAME)
    _same(second, open_trace(rec))  # the cache holds exactly what the recording holds
    assert len(second.events()) == 40_000


def test_a_touched_file_keeps_the_cache_a_changed_file_rebuilds_it(rec):
    _open(rec)
    st = (rec / "workload.txt").stat()
    os.utime(rec / "workload.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same content: hash matches
    assert _open(rec)[1] == []
    # same size, new content: a pfn changed in the text (the cache must not hide it)
    data = text(rec)
    line = data[:data.index(b"\n")]
    i = line.index(b"pfn=0x") + len(b"pfn=0x")
    digit = line[i:i + 1]
    new = line[:i] + (b"2" if digit != b"2" else b"3") + line[i + 1:]
    import zstandard
    (rec / "kmem.trace.zst").write_bytes(zstandard.ZstdCompressor().compress(new + data[len(line):]))
    tr, said = _open(rec)
    assert len(said) == 1 and "converted" in said[0]
    _same(tr, open_trace(rec))
    assert int(tr.events().pfn[0]) == int(new.split(b"pfn=0x")[1].split()[0], 16)


@pytest.mark.parametrize("change", ["size", "converter", "skip_bad", "damaged"])
def test_anything_else_that_differs_rebuilds(rec, change, monkeypatch):
    _open(rec)
    kw = {}
    if change == "size":
        (rec / "buddyinfo.end").write_text((rec / "buddyinfo.end").read_text().replace(" 1 ", " 2 ", 1) + "\n")
    elif change == "converter":
        monkeypatch.setattr(cache, "CONVERTER", cache.CONVERTER + "-next")
    elif change == "skip_bad":
        kw["skip_bad"] = True
    else:
        f = rec / cache.CACHE_NAME
        f.write_bytes(f.read_bytes()[:1000])
    tr, said = _open(rec, **kw)
    assert len(said) == 1 and "converted" in said[0]
    _same(tr, open_trace(rec))


def test_a_read_only_recording_folder_is_never_written(rec, tmp_path):
    before = sorted(p.name for p in rec.iterdir())
    os.chmod(rec, 0o555)  # root could still write into it; the permission bits are respected
    try:
        tr, said = _open(rec)
        assert sorted(p.name for p in rec.iterdir()) == before
        cached = list((tmp_path / "xdg" / "hintpipe" / "traces").glob("numpy-churn-*.hpt"))
        assert len(cached) == 1 and str(cached[0].parent) in said[0]
        again, said2 = _open(rec)
        assert said2 == [] and again.source["cache_file"] == str(cached[0])
        _same(again, open_trace(rec))
    finally:
        os.chmod(rec, 0o755)


def test_nowhere_to_write_reads_the_recording_directly(rec, tmp_path, monkeypatch):
    os.chmod(rec, 0o555)
    (tmp_path / "xdg").write_text("a file where the cache folder would be")
    try:
        tr, said = _open(rec)
        assert tr.encoding == "tracefs-text" and "reading the recording directly" in said[-1]
        assert len(tr.events()) == 40_000
    finally:
        os.chmod(rec, 0o755)
    assert not list(tmp_path.rglob("*.part"))


def test_a_recording_that_does_not_parse_leaves_no_cache(rec):
    data = text(rec)
    import zstandard
    (rec / "kmem.trace.zst").write_bytes(zstandard.ZstdCompressor().compress(data + b"garbage line\n"))
    with pytest.raises(TraceError) as ei:
        _open(rec)
    assert ei.value.code == "malformed"
    assert not (rec / cache.CACHE_NAME).exists() and not list(rec.glob("*.part"))


def test_what_skip_bad_skipped_is_reported_again_from_the_cache(rec):
    data = text(rec)
    import zstandard
    (rec / "kmem.trace.zst").write_bytes(zstandard.ZstdCompressor().compress(
        data + b"CPU:1 [LOST 12 EVENTS]\n" + b"garbage line\n"))
    with pytest.warns(UserWarning, match="skipped 2 bad lines"):  # the text parser's, while converting
        first, _ = _open(rec, skip_bad=True)
    n = len(first.events())  # read from the cache just written
    assert n == 40_000 and first.stats.skipped == {"lost-events": 1, "malformed": 1} and first.stats.lost_events == 12
    second, said = _open(rec, skip_bad=True)
    assert said == [] and len(second.events()) == 40_000
    assert second.stats.skipped == {"lost-events": 1, "malformed": 1} and second.stats.lost_events == 12


def test_the_environment_can_turn_the_cache_off_or_move_it(rec, tmp_path, monkeypatch):
    monkeypatch.setenv("HINTPIPE_TRACE_CACHE", "off")
    tr, said = _open(rec)
    assert said == [] and tr.encoding == "tracefs-text" and not (rec / cache.CACHE_NAME).exists()
    monkeypatch.setenv("HINTPIPE_TRACE_CACHE", str(tmp_path / "elsewhere"))
    _open(rec)
    assert not (rec / cache.CACHE_NAME).exists() and len(list((tmp_path / "elsewhere").glob("*.hpt"))) == 1


def test_replay_cli_uses_the_cache_and_says_so_once(rec, capsys):
    args = ["replay", str(rec), "--bandwidth", "100", "--no-baseline"]
    assert main(args) == 0
    out1, err1 = capsys.readouterr()
    assert err1.count("\n") == 1 and err1.startswith("hintpipe: converted") and "VERIFIED" in out1
    assert main(args + ["--json"]) == 0
    out2, err2 = capsys.readouterr()
    assert err2 == ""
    a = json.loads(out2)
    assert a["trace"]["events"] == 40_000
    assert main(args + ["--json", "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["final"] == a["final"]


def test_json_and_quiet_keep_the_notice_off_stderr(rec, capsys):
    assert main(["inspect", str(rec), "--json", "--samples", "3"]) == 0
    assert capsys.readouterr().err == ""
    assert (rec / cache.CACHE_NAME).is_file()  # converted all the same
