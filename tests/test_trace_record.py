"""Live recording on this machine (root + tracefs + /proc/kpageflags), then a replay of it."""

import os
import sys
from pathlib import Path

import pytest

from hintpipe.trace.errors import RecordError
from hintpipe.trace.record import record


def _why_not() -> str | None:
    if sys.platform != "linux":
        return "recording needs Linux"
    if os.geteuid() != 0:
        return "recording needs root"
    if not os.access("/proc/kpageflags", os.R_OK):
        return "/proc/kpageflags is not readable"
    if not Path("/sys/kernel/tracing").exists() and not Path("/sys/kernel/debug/tracing").exists():
        return "no tracefs mount point"
    return None


@pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")
def test_record_and_replay(tmp_path):
    from hintpipe.trace.recording import open_recording
    ev = Path("/sys/kernel/tracing/events/kmem/mm_page_alloc/enable")
    before = ev.read_text() if ev.exists() else "0\n"
    try:
        s = record(tmp_path / "rec", command=[sys.executable, "-c", "a = bytearray(20_000_000); del a"])
    except RecordError as e:  # e.g. a container where tracefs cannot be mounted
        pytest.skip(f"recording impossible here: {e}")
    assert s["returncode"] == 0 and s["events"] > 1000
    assert ev.read_text() == before  # the tracing state we found is restored
    for name in ("kmem.trace.zst", "kpageflags.start.zst", "buddyinfo.start", "buddyinfo.end", "zoneinfo.start",
                 "uname.txt", "workload.txt"):
        assert (tmp_path / "rec" / name).exists(), name
    lost = s["lost_lines"] > 0  # the machine is shared: the reader may fall behind under load
    tr = open_recording(tmp_path / "rec", skip_bad=lost)
    m = tr.model()
    if lost:
        with pytest.warns(UserWarning, match="lost by the kernel"):
            m.run_to_end()
    else:
        m.run_to_end()
    assert m.events_applied == s["events"]
    ref = tr.buddyinfo_end["free_pages"]
    if not lost:
        # Fidelity is measured, not asserted tightly (other processes run): within 2 %.
        assert abs(m.nr_free_pages - ref) < 0.02 * ref


def test_record_refuses_without_root(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(RecordError, match="needs root"):
        record(tmp_path / "x", duration=0.1)


@pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")
def test_record_missing_command_is_a_clear_error(tmp_path):
    ev = Path("/sys/kernel/tracing/events/kmem/mm_page_free/enable")
    with pytest.raises(RecordError) as ei:
        record(tmp_path / "rec", command=["/nonexistent/command"])
    if "cannot run" not in str(ei.value):
        pytest.skip(f"recording impossible here: {ei.value}")
    assert ev.read_text().strip() == "0"  # enabled for the attempt, disabled again
