"""``hintpipe record``: record this machine's page-allocator activity in the recording layout.

Needs root, tracefs and /proc/kpageflags. The tracing state found at start (the five kmem event
enables, tracing_on, buffer_size_kb) is restored in a ``finally``, whatever happens. A disk that
fills up (or a file-size limit, or a quota) stops the recording at once: the files it wrote are
removed (a recording without its whole trace would replay wrong) and the error says so.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import zstandard

from .errors import RecordError
from .events import EVENT_NAMES

TRACEFS = Path("/sys/kernel/tracing")
KPAGEFLAGS = Path("/proc/kpageflags")
EVENTS = tuple(EVENT_NAMES.values())
BUFFER_KB = 16384
"""Per-CPU ring buffer size while recording; the default (1.4 MB) overruns under heavy churn."""
READ_SIZE = 1 << 20  # large reads: fewer syscalls while the whole machine's events stream in
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
"""Write errors that mean no room is left for the recording."""


def _check(tracefs: Path) -> None:
    if os.geteuid() != 0:
        raise RecordError("hintpipe record needs root: tracefs and /proc/kpageflags are readable by root only.")
    if not (tracefs / "events").is_dir():
        tracefs.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracefs)], capture_output=True, text=True)
        if r.returncode != 0 or not (tracefs / "events").is_dir():
            raise RecordError(f"tracefs is not available at {tracefs} and mounting it failed "
                              f"({(r.stderr or '').strip() or 'no tracefs in this kernel'}).")
    missing = [e for e in EVENTS if not (tracefs / "events" / "kmem" / e / "enable").exists()]
    if missing:
        raise RecordError(f"this kernel has no kmem trace event(s) {', '.join(missing)} in {tracefs}.")
    try:
        with open(KPAGEFLAGS, "rb") as f:
            f.read(8)
    except OSError as e:
        raise RecordError(f"/proc/kpageflags is not readable ({e.strerror}); the initial free pages cannot be snapshotted.")


def _buffer_kb(saved: str) -> str:
    """The size to write back: "7 (expanded: 1408)" means the buffer is really 1408 KB."""
    if "expanded:" in saved:
        return saved.split("expanded:")[1].strip(" )")
    return saved.split()[0]


def _snapshot_kpageflags(out: Path) -> int:
    """Stream /proc/kpageflags into a zstd file without holding it in memory; returns bytes read."""
    n = 0
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    try:
        with open(KPAGEFLAGS, "rb", buffering=0) as src, open(out, "wb") as dst, cctx.stream_writer(dst) as z:
            while True:
                b = src.read(1 << 20)
                if not b:
                    break
                z.write(b)
                n += len(b)
    except OSError as e:
        e.filename = e.filename or str(out)  # the compressor's writes do not name their file
        raise
    return n


def _copy(src: str, dst: Path) -> None:
    try:
        text = Path(src).read_text()
    except OSError:
        return  # optional snapshots (pagetypeinfo may be root-only or absent)
    dst.write_text(text)  # a write error (a full disk) is the recording's failure


class _PipeReader(threading.Thread):
    """Drains trace_pipe into a zstd file until told to stop (then empties what is buffered)."""

    def __init__(self, pipe: Path, out: Path):
        super().__init__(daemon=True)
        self.fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
        self.out = out
        self.stop = threading.Event()
        self.lines = 0
        self.bytes = 0
        self.lost_lines = 0  # "CPU:N [LOST M EVENTS]" lines: the ring buffer overran
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(self.out, "wb") as dst, zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(dst) as z:
                idle_after_stop = 0
                while True:
                    try:
                        b = os.read(self.fd, READ_SIZE)
                    except BlockingIOError:
                        b = None
                    except OSError as e:
                        if e.errno != errno.EAGAIN:
                            raise
                        b = None
                    if b:
                        z.write(b)
                        self.lines += b.count(b"\n")
                        self.bytes += len(b)
                        self.lost_lines += b.count(b" EVENTS]")
                        continue
                    if self.stop.is_set():
                        idle_after_stop += 1
                        if idle_after_stop >= 3:  # a few empty reads after stop: drained
                            break
                    time.sleep(0.02)
        except BaseException as e:  # reported by record()
            if isinstance(e, OSError):
                e.filename = e.filename or str(self.out)
            self.error = e
        finally:
            os.close(self.fd)


def record(outdir: str | Path, duration: float | None = None, command: list[str] | str | None = None,
           tracefs: str | Path = TRACEFS, buffer_kb: int = BUFFER_KB, *, replace: bool = False,
           progress=None) -> dict:
    """Record kmem page events into ``outdir`` (created) until ``command`` exits, ``duration``
    seconds pass, or Ctrl-C (whichever first; with neither, until Ctrl-C).

    The recording is written into ``OUTDIR.part`` and renamed to ``outdir`` once complete, so
    ``outdir`` never holds a partial recording (a failure removes ``OUTDIR.part``). An existing
    ``outdir`` is refused (RecordError) unless ``replace``. ``progress`` (a
    :class:`~hintpipe.progress.Progress`) shows the time recorded and the events so far.

    ``buffer_kb`` is the per-CPU ring buffer size while recording (restored afterwards). The
    whole machine's page events are recorded; if the reader falls behind, the kernel writes
    ``[LOST N EVENTS]`` lines (counted in ``lost_lines``; replay then needs skip_bad).

    Returns a summary dict: outdir, events (event lines written), seconds, returncode (of the
    command, or None), interrupted, lost_lines. Raises RecordError (one sentence) where
    recording is impossible.
    """
    tracefs = Path(tracefs)
    final = Path(outdir)
    if final.exists() and not replace and not (final.is_dir() and not any(final.iterdir())):
        raise RecordError(f"{final} exists; choose another folder or replace it (--force).")
    _check(tracefs)
    out = final.with_name(final.name + ".part")
    try:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    except OSError as e:
        raise RecordError(f"cannot create the output folder {out}: {e.strerror or e}.") from None
    try:
        try:
            s = _record(out, duration, command, tracefs, buffer_kb, progress)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            where = f" writing {Path(e.filename).name}" if e.filename else ""
            raise RecordError(f"the recording ran out of disk space{where} ({e.strerror or e}): it was stopped, "
                              f"tracing restored and the partial recording removed.") from None
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        out.rename(final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return {**s, "outdir": str(final)}


def _record(out: Path, duration: float | None, command, tracefs: Path, buffer_kb: int, progress) -> dict:
    if isinstance(command, str):
        command = shlex.split(command)
    (out / "uname.txt").write_text(os.uname().release + "\n")
    (out / "workload.txt").write_text((shlex.join(command) if command else f"(idle for {duration} s)") + "\n")
    ev_dir = tracefs / "events" / "kmem"
    saved_enable = {e: (ev_dir / e / "enable").read_text().strip() for e in EVENTS}
    saved_on = (tracefs / "tracing_on").read_text().strip()
    saved_buf = (tracefs / "buffer_size_kb").read_text().strip()
    reader: _PipeReader | None = None
    task = None
    proc: subprocess.Popen | None = None
    interrupted = False
    rc = None
    end_error: OSError | None = None
    t_start = time.monotonic()
    try:
        if saved_buf.split()[0] != str(buffer_kb):
            (tracefs / "buffer_size_kb").write_text(str(buffer_kb))
        (tracefs / "trace").write_text("")  # drop stale buffered events
        reader = _PipeReader(tracefs / "trace_pipe", out / "kmem.trace.zst")
        reader.start()
        for e in EVENTS:
            (ev_dir / e / "enable").write_text("1")
        (tracefs / "tracing_on").write_text("1")
        # Snapshot *after* tracing is on: every page that changes while the snapshot is read
        # has an event in the trace, and replaying an event whose effect the snapshot already
        # shows is harmless (events set or clear a page's state, they never count), so each
        # page's state after its last event is exact.
        _snapshot_kpageflags(out / "kpageflags.start.zst")
        _copy("/proc/buddyinfo", out / "buddyinfo.start")
        _copy("/proc/zoneinfo", out / "zoneinfo.start")
        _copy("/proc/pagetypeinfo", out / "pagetypeinfo.start")
        t_start = time.monotonic()
        task = progress.task("recording" + (f" {shlex.join(command)}" if command else ""), total=duration,
                             unit="s") if progress is not None else None
        try:
            if command:
                try:
                    proc = subprocess.Popen(command)
                except OSError as e:
                    raise RecordError(f"cannot run {command[0]!r}: {e.strerror or e}.") from None
            # wait in short steps: the bar moves, Ctrl-C is seen at once, and so is a trace that
            # can no longer be written (a full disk): the recording stops then
            while (proc is None or proc.poll() is None) and reader.error is None:
                elapsed = time.monotonic() - t_start
                if duration is not None and elapsed >= duration:
                    break
                if task is not None:
                    task.update(round(elapsed, 1), description=f"recording: {reader.lines:,} events")
                time.sleep(0.1 if duration is None else min(0.1, max(0.0, duration - elapsed)))
            if proc is not None:
                if proc.poll() is None:
                    proc.terminate()
                rc = proc.wait()
        except KeyboardInterrupt:
            interrupted = True
            if proc is not None and proc.poll() is None:
                proc.terminate()
                rc = proc.wait()
    finally:
        for e, v in saved_enable.items():
            try:
                (ev_dir / e / "enable").write_text(v if v in ("0", "1") else "0")
            except OSError:
                pass
        # Read the end state at once: anything the recorder does from here on is not traced.
        try:
            _copy("/proc/buddyinfo", out / "buddyinfo.end")
            _copy("/proc/zoneinfo", out / "zoneinfo.end")
        except OSError as e:  # raised once the tracing state is restored
            end_error = e
        if reader is not None:
            reader.stop.set()
            reader.join(timeout=30)
        try:
            (tracefs / "tracing_on").write_text(saved_on)
            if saved_buf.split()[0] != str(buffer_kb):
                (tracefs / "buffer_size_kb").write_text(_buffer_kb(saved_buf))
        except OSError:
            pass
    if task is not None:
        task.close()
    if reader is not None and reader.error is not None:
        if isinstance(reader.error, OSError) and reader.error.errno in DISK_FULL:
            raise reader.error  # record() removes the partial recording
        raise RecordError(f"reading trace_pipe failed: {reader.error}")
    if end_error is not None:
        raise end_error
    lost = reader.lost_lines if reader else 0
    return {"outdir": str(out), "events": (reader.lines - lost) if reader else 0,
            "seconds": round(time.monotonic() - t_start, 3), "returncode": rc, "interrupted": interrupted,
            "lost_lines": lost}
