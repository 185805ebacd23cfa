"""Live recordings on this kernel (root, tracefs, /proc/kpageflags); skipped with the reason otherwise.

The recorder works in a private tracing instance, so these tests leave the machine's tracing
settings alone; each checks that they are as they were afterwards and that no instance is left.
The top-level (``--global``) mode changes machine-wide settings for a moment and runs only with
HINTPIPE_TEST_GLOBAL_TRACING=1 (CI sets it).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from hintpipe.cli import main as cli_main
from hintpipe.trace.errors import RecordError
from hintpipe.trace.events import EventBatch
from hintpipe.trace.record import INSTANCE_PREFIX, TRACEFS, TraceTarget, lost_from_stats, record, save_descriptions
from hintpipe.trace.recording import open_trace
from hintpipe.trace.ringbuffer import KMEM_EVENTS, DecodeStats, iter_raw_batches
from hintpipe.trace.tracefs import parse_tracefs

ROOT = Path(__file__).resolve().parents[1]
record_mod = importlib.import_module("hintpipe.trace.record")  # the package re-exports record()


def _why_not() -> str | None:
    if sys.platform != "linux":
        return "recording needs Linux"
    if os.geteuid() != 0:
        return "recording needs root (tracefs and /proc/kpageflags)"
    if not (TRACEFS / "events" / "kmem").is_dir():
        return f"no tracefs with kmem events at {TRACEFS}"
    if not (TRACEFS / "instances").is_dir():
        return "tracefs has no instances"
    try:
        with open("/proc/kpageflags", "rb") as f:
            f.read(8)
    except OSError as e:
        return f"/proc/kpageflags unreadable ({e.strerror})"
    return None


live = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")

# faults in 4 x 2048 pages one by one (no THP), then unmaps them
ALLOC_CMD = [sys.executable, "-c",
             "import mmap\nfor _ in range(4):\n m = mmap.mmap(-1, 8 << 20)\n m.madvise(mmap.MADV_NOHUGEPAGE)\n"
             " for i in range(0, 8 << 20, 4096): m[i] = 1\n m.close()"]
# half a second of the highest page-allocation rate a Python process makes
CHURN_CMD = [sys.executable, "-c",
             "import mmap, time\nend = time.monotonic() + 0.5\nwhile time.monotonic() < end:\n"
             " m = mmap.mmap(-1, 32 << 20)\n m.madvise(mmap.MADV_NOHUGEPAGE)\n"
             " for i in range(0, 32 << 20, 4096): m[i] = 1\n m.close()"]


def _global_state() -> dict:
    ev = TRACEFS / "events" / "kmem"
    return {"tracing_on": (TRACEFS / "tracing_on").read_text(),
            "buffer_size_kb": (TRACEFS / "buffer_size_kb").read_text(),
            "trace_clock": (TRACEFS / "trace_clock").read_text(),
            "enable": {e: (ev / e / "enable").read_text() for e in KMEM_EVENTS}}


def _our_instances() -> list[str]:
    return [p.name for p in (TRACEFS / "instances").iterdir() if p.name == f"{INSTANCE_PREFIX}{os.getpid()}"]


@pytest.fixture
def untouched():
    """The machine's tracing settings are the same after the test, and our instance is gone."""
    before = _global_state()
    yield
    assert _global_state() == before
    assert _our_instances() == []


@live
def test_record_a_command_and_replay_it(tmp_path, untouched, monkeypatch):
    monkeypatch.delenv("HINTPIPE_TRACE_CACHE")  # the recorder writes its cache beside the recording
    s = record(tmp_path / "rec", command=ALLOC_CMD)
    assert s["returncode"] == 0 and s["lost_events"] == 0 and s["lost_in_pages"] == 0 and s["left_unread"] == 0
    assert s["undecoded"] == 0 and s["restore_failed"] == [] and s["instance"].startswith(INSTANCE_PREFIX)
    assert s["events"] >= 8192  # the command alone faults in 4 x 2048 pages
    rec = tmp_path / "rec"
    for name in ("kpageflags.start.zst", "buddyinfo.start", "buddyinfo.end", "zoneinfo.start", "zoneinfo.end",
                 "uname.txt", "workload.txt", "raw/meta.json", "raw/header_page", "raw/header_event",
                 "raw/kmem/mm_page_alloc/format", "raw/cpu0.pages.zst", "trace-v1.cache.hpt"):
        assert (rec / name).exists(), name
    meta = json.loads((rec / "raw" / "meta.json").read_text())
    assert meta["lost_events"] == 0 and meta["format"] == "hintpipe-raw-pages"
    st = DecodeStats()
    ev = EventBatch.concat(list(iter_raw_batches(rec / "raw", st)))
    assert len(ev) == s["events"]
    assert s["kernel_read_events"] == st.records + st.failed_allocations + sum(st.other_records.values())
    for cpu in np.unique(ev.cpu):
        assert np.all(np.diff(ev.ts_ns[ev.cpu == cpu]) >= 0)
    assert np.all(np.diff(ev.ts_ns) >= 0)  # merged by time stamp
    tr = open_trace(rec)
    assert tr.encoding == "ring-buffer"
    m = tr.model()
    m.run_to_end()
    assert m.events_applied == s["events"]
    # fidelity is held to 0.1 % by the corpus tests; here other processes run too: within 2 %
    ref = tr.buddyinfo_end["free_pages"]
    assert abs(m.nr_free_pages - ref) < 0.02 * ref
    # the recorder's cache is valid: a cached open loads it without converting
    said = []
    cached = open_trace(rec, cache=True, log=said.append)
    assert said == [] and cached.source["cache_file"] == str(rec / "trace-v1.cache.hpt")
    assert np.array_equal(cached.events().pfn, ev.pfn)


def _capture(out: Path, command: list[str]) -> None:
    """Raw pages and the kernel's own text of the very same records: tracing stops, the
    instance's non-consuming ``trace`` file is read, and only then is each CPU drained."""
    raw = out / "raw"
    raw.mkdir(parents=True)
    t = TraceTarget.open(TRACEFS, use_instance=True)
    try:
        t.configure(8192, "local")
        save_descriptions(t.dir / "events", raw)
        t.enable(True)
        t.set_tracing(True)
        subprocess.run(command, check=True)
        t.set_tracing(False)
        text = (t.dir / "trace").read_bytes()
        for cpu in t.cpus():
            fd = os.open(t.dir / "per_cpu" / f"cpu{cpu}" / "trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK)
            chunks = []
            try:
                while True:
                    try:
                        b = os.read(fd, 4096)
                    except BlockingIOError:
                        break
                    if not b:
                        break
                    chunks.append(b)
            finally:
                os.close(fd)
            (raw / f"cpu{cpu}.pages.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(chunks)))
        lost = sum(lost_from_stats(t.cpu_stats(c)) for c in t.cpus())
    finally:
        t.restore()
    if lost:
        pytest.skip(f"the kernel lost {lost} events while capturing (8 MiB buffers on a busy machine)")
    lines = [ln for ln in text.splitlines(keepends=True) if not ln.startswith(b"#")]
    (out / "kernel.trace").write_bytes(b"".join(lines))


@live
def test_decoder_matches_the_kernels_text_of_the_same_records(tmp_path, untouched):
    _capture(tmp_path / "g", ALLOC_CMD)
    ev = EventBatch.concat(list(iter_raw_batches(tmp_path / "g" / "raw")))
    text = parse_tracefs(tmp_path / "g" / "kernel.trace")
    failed = (text.etype == 0) & (text.pfn == 0)  # the text prints a failed allocation as pfn=0x0
    text = text.take(~failed)
    assert len(ev) == len(text) > 8192
    for k in ("etype", "pfn", "order", "migratetype", "percpu_refill", "cpu"):
        assert np.array_equal(getattr(ev, k), getattr(text, k)), k
    assert np.array_equal((ev.ts_ns + 500) // 1000 * 1000, text.ts_ns)


@live
def test_a_starved_small_buffer_reports_its_losses_and_fails(tmp_path, untouched, monkeypatch, capsys):
    # 64 KiB per CPU and readers that sleep 1 s between polls cannot keep up with the churn
    s = record(tmp_path / "rec", command=CHURN_CMD, buffer_kb=64, poll_s=1.0)
    assert s["lost_events"] > 0 and s["lost_in_pages"] > 0  # the kernel's counts and the pages' own flags
    assert s["cache_file"] is None  # an incomplete recording gets no cache
    with pytest.raises(Exception, match="lost"):
        open_trace(tmp_path / "rec").events()
    monkeypatch.setattr(record_mod, "POLL_S", 1.0)
    rc = cli_main(["record", str(tmp_path / "r2"), "--buffer-kb", "64", "--", *CHURN_CMD])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "events lost" in out and "the kernel lost" in err and "--buffer-kb" in err


@live
def test_ctrl_c_ends_a_recording_and_puts_everything_back(tmp_path, untouched):
    p = subprocess.Popen([sys.executable, "-m", "hintpipe", "record", str(tmp_path / "rec")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "rec.part" / "buddyinfo.start").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err  # Ctrl-C is how a recording with neither COMMAND nor --duration ends
    assert "Traceback" not in err and "stopped by Ctrl-C" in out and "0 events lost" in out
    assert not list((TRACEFS / "instances").glob(f"{INSTANCE_PREFIX}{p.pid}"))
    assert open_trace(tmp_path / "rec").buddyinfo_end is not None


def test_a_command_that_cannot_start_is_one_sentence_before_anything_starts(tmp_path, capsys):
    with pytest.raises(RecordError, match="cannot run"):
        record(tmp_path / "rec", command=["/nonexistent/command"])
    assert cli_main(["record", str(tmp_path / "rec2"), "--", "/nonexistent/command"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hintpipe: cannot run") and err.count("\n") == 1
    assert not (tmp_path / "rec").exists() and not (tmp_path / "rec2").exists()


def test_record_refuses_without_root(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(RecordError, match="needs root"):
        record(tmp_path / "x", duration=0.1)


@live
@pytest.mark.skipif(os.environ.get("HINTPIPE_TEST_GLOBAL_TRACING") != "1",
                    reason="changes machine-wide tracing settings for a moment; set HINTPIPE_TEST_GLOBAL_TRACING=1")
def test_global_mode_puts_back_every_setting_it_changed(tmp_path):
    ev = TRACEFS / "events" / "kmem"
    before = _global_state()
    # make the found state unlike what the recorder sets, so putting it back is visible
    changed = {"buffer_size_kb": "1408", "trace_clock": "global", "mm_page_free": "1"}
    (TRACEFS / "buffer_size_kb").write_text(changed["buffer_size_kb"])
    (TRACEFS / "trace_clock").write_text(changed["trace_clock"])
    (ev / "mm_page_free" / "enable").write_text(changed["mm_page_free"])
    found = _global_state()
    try:
        s = record(tmp_path / "rec", command=ALLOC_CMD, use_instance=False)
        assert s["instance"] is None and s["events"] >= 8192
        assert _global_state() == found
    finally:
        (TRACEFS / "buffer_size_kb").write_text(before["buffer_size_kb"].split()[0])
        (TRACEFS / "trace_clock").write_text(before["trace_clock"].split("[")[1].split("]")[0])
        (ev / "mm_page_free" / "enable").write_text(before["enable"]["mm_page_free"].strip())
    assert _global_state() == before
