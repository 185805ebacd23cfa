"""``hintpipe record``: record this machine's page allocator from the kernel's binary ring buffers.

One reader thread per CPU drains ``per_cpu/cpuN/trace_pipe_raw`` a sub-buffer ("page") per read,
so the kernel never formats text, and writes the pages zstd-compressed to ``raw/cpuN.pages.zst``
beside the kernel's own descriptions needed to decode them (``header_page``, ``header_event``,
each kmem event's ``format`` and ``id``). The rest of the folder is the recording layout of
protocols/recording-v1.md: kpageflags.start.zst, buddyinfo.start/end, zoneinfo.start/end,
pagetypeinfo.start, uname.txt, workload.txt, and ``raw/meta.json``.

By default the recorder works in a tracing instance of its own (``instances/hintpipe-record-PID``,
created and removed), so it changes none of the machine's tracing settings and can run beside
another tracer. With ``use_instance=False`` it uses the top-level buffer and puts back what it
found (tracing_on, buffer_size_kb, trace_clock, the kmem event enables) in a ``finally``.

At the end each CPU's ``stats`` file says how many events the ring buffer overwrote
(``overrun``), could not commit (``commit overrun``) or refused (``dropped events``): their sum
is the number of events lost, 0 when the readers kept up. The pages are then decoded once to
count the events, and (nothing lost) written to the recording's trace cache, so the first
replay loads fast.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import errno

import numpy as np
import zstandard

from .errors import RecordError, TraceError
from .ringbuffer import KMEM_EVENTS, META_FILE, META_FORMAT, META_VERSION, RAW_DIR, parse_header_page
from .snapshot import KPAGEFLAGS, snapshot_kpageflags

TRACEFS = Path("/sys/kernel/tracing")
BUFFER_KB = 65536
"""Per-CPU ring buffer while recording: 64 MiB hold about 1.5 M kmem records (about 44 bytes each
with its header), 3 s of 500 k events/s landing on one CPU while its reader is starved."""
MIN_BUFFER_KB = 4096
POLL_S = 0.005
"""Sleep of a reader that found its buffer empty; the buffer absorbs what arrives meanwhile."""
ZSTD_LEVEL = 1
"""kmem pages compress about 5x even at level 1, and the readers must stay cheap."""
INSTANCE_PREFIX = "hintpipe-record-"
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
"""Write errors that mean no room is left for the recording (a full disk, a file-size limit, a quota)."""


def _disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


def _read(p: Path) -> str:
    return p.read_text().strip()


def _write(p: Path, value: str) -> None:
    with open(p, "w") as f:
        f.write(value)


def _selected(text: str) -> str:
    """The bracketed choice of a tracefs selector file ("[local] global ..." -> "local")."""
    m = re.search(r"\[(\S+)\]", text)
    return m.group(1) if m else text.split()[0]


def _buffer_kb(saved: str) -> str:
    """The size to write back: "7 (expanded: 1408)" means the buffer is really 1408 KB."""
    if "expanded:" in saved:
        return saved.split("expanded:")[1].strip(" )")
    return saved.split()[0]


def parse_cpu_stats(text: str) -> dict[str, int]:
    """``per_cpu/cpuN/stats`` as {"entries": .., "overrun": .., "commit overrun": .., "dropped
    events": .., "read events": .., ...} (the integer fields; time stamps are left out)."""
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        v = v.strip()
        if v.isdigit():
            out[k.strip()] = int(v)
    return out


def lost_from_stats(st: dict[str, int]) -> int:
    """Events the ring buffer lost on one CPU: overwritten, not committed, or dropped."""
    return st.get("overrun", 0) + st.get("commit overrun", 0) + st.get("dropped events", 0)


def default_buffer_kb(ncpus: int) -> int:
    """:data:`BUFFER_KB`, or less where the machine cannot spare it: all CPUs' buffers together
    take at most an eighth of MemAvailable (never below :data:`MIN_BUFFER_KB` per CPU)."""
    try:
        avail_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return BUFFER_KB
    return max(MIN_BUFFER_KB, min(BUFFER_KB, avail_kb // (8 * max(ncpus, 1))))


# ----------------------------------------------------------------------------------------------
# Where the events go: a private instance or the top-level buffer
# ----------------------------------------------------------------------------------------------

def _remove_stale_instances(root: Path) -> None:
    """Remove instances left by recorders that died without cleaning up (their pid is gone)."""
    for d in (root / "instances").glob(INSTANCE_PREFIX + "*"):
        pid = d.name.rsplit("-", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            try:
                d.rmdir()
            except OSError:
                pass


@dataclass
class TraceTarget:
    """A tracefs buffer to record into, and what must be put back afterwards."""

    root: Path  # tracefs mount
    dir: Path  # the instance folder, or root itself
    instance: str | None
    saved: dict = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path, use_instance: bool) -> "TraceTarget":
        """Create a private instance (``use_instance``) or take the top-level buffer, saving its
        settings; tracing is off in it on return."""
        if not use_instance:
            t = cls(root, root, None)
            ev = root / "events" / "kmem"
            t.saved = {
                "tracing_on": _read(root / "tracing_on"),
                "buffer_size_kb": _read(root / "buffer_size_kb"),
                "trace_clock": _selected(_read(root / "trace_clock")),
                "enable": {e: _read(ev / e / "enable") for e in KMEM_EVENTS},
            }
            _write(root / "tracing_on", "0")
            return t
        if not (root / "instances").is_dir():
            raise RecordError(f"this kernel's tracefs has no instances ({root / 'instances'}); "
                              "record in the top-level buffer with --global.")
        _remove_stale_instances(root)
        d = root / "instances" / f"{INSTANCE_PREFIX}{os.getpid()}"
        try:
            d.mkdir()
        except OSError as e:
            raise RecordError(f"cannot create the tracing instance {d}: {e.strerror or e}.") from None
        t = cls(root, d, d.name)
        _write(d / "tracing_on", "0")  # a new instance starts with tracing on
        return t

    def configure(self, buffer_kb: int, clock: str) -> None:
        """Set the clock and the per-CPU buffer size, and empty the buffer (and its statistics)."""
        clocks = _read(self.dir / "trace_clock")
        if clock not in clocks.replace("[", " ").replace("]", " ").split():
            raise RecordError(f"trace clock {clock!r} is not offered by this kernel ({clocks}).")
        _write(self.dir / "trace_clock", clock)
        if _buffer_kb(_read(self.dir / "buffer_size_kb")) != str(buffer_kb):
            try:
                _write(self.dir / "buffer_size_kb", str(buffer_kb))
            except OSError as e:
                raise RecordError(f"cannot size the ring buffer to {buffer_kb} KiB per CPU: {e.strerror or e}.") from None
        _write(self.dir / "trace", "")

    def enable(self, on: bool) -> None:
        """Switch the five kmem events on or off in this buffer."""
        for e in KMEM_EVENTS:
            _write(self.dir / "events" / "kmem" / e / "enable", "1" if on else "0")

    def set_tracing(self, on: bool) -> None:
        """Start or stop writing into this buffer."""
        _write(self.dir / "tracing_on", "1" if on else "0")

    def cpus(self) -> list[int]:
        """The CPUs this buffer has a ring for."""
        return sorted(int(p.name[3:]) for p in (self.dir / "per_cpu").glob("cpu*") if p.name[3:].isdigit())

    def cpu_stats(self, cpu: int) -> dict[str, int]:
        """One CPU's ring-buffer statistics (:func:`parse_cpu_stats`)."""
        return parse_cpu_stats((self.dir / "per_cpu" / f"cpu{cpu}" / "stats").read_text())

    def restore(self) -> list[str]:
        """Put everything back (best effort, each step on its own); returns what failed."""
        failed: list[str] = []

        def attempt(what, fn):
            try:
                fn()
            except OSError as e:
                failed.append(f"{what}: {e.strerror or e}")

        if self.instance is not None:
            attempt("tracing_on", lambda: self.set_tracing(False))
            attempt("events", lambda: self.enable(False))
            for _ in range(50):  # rmdir is refused while a reader still holds a file open
                try:
                    self.dir.rmdir()
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        failed.append(f"rmdir {self.dir}: {e.strerror or e}")
                        break
                    time.sleep(0.1)
            else:
                failed.append(f"rmdir {self.dir}: still busy")
            return failed
        s = self.saved
        ev = self.root / "events" / "kmem"
        for e, v in s.get("enable", {}).items():
            attempt(f"{e}/enable", lambda e=e, v=v: _write(ev / e / "enable", v if v in ("0", "1") else "0"))
        if "trace_clock" in s:
            attempt("trace_clock", lambda: _write(self.root / "trace_clock", s["trace_clock"]))
        if "buffer_size_kb" in s and _buffer_kb(_read(self.root / "buffer_size_kb")) != _buffer_kb(s["buffer_size_kb"]):
            attempt("buffer_size_kb", lambda: _write(self.root / "buffer_size_kb", _buffer_kb(s["buffer_size_kb"])))
        if "tracing_on" in s:
            attempt("tracing_on", lambda: _write(self.root / "tracing_on", s["tracing_on"]))
        return failed


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------

class CpuReader(threading.Thread):
    """Drains one CPU's trace_pipe_raw, a page per read, into a zstd file until told to stop;
    then reads until the buffer is empty (tracing is off by then, so empty means drained)."""

    def __init__(self, cpu: int, pipe: Path, out: Path, page_size: int, poll_s: float = POLL_S):
        super().__init__(daemon=True, name=f"hintpipe-record-cpu{cpu}")
        self.cpu = cpu
        self.fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
        self.out = out
        self.page_size = page_size
        self.poll_s = poll_s
        self.stop = threading.Event()
        self.pages = 0
        self.empty_polls = 0
        self.max_burst = 0  # most pages read back to back without finding the buffer empty
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
            with open(self.out, "wb") as dst, cctx.stream_writer(dst) as z:
                burst = 0
                while True:
                    try:
                        b = os.read(self.fd, self.page_size)
                    except BlockingIOError:
                        b = b""
                    if b:
                        if len(b) != self.page_size:
                            raise OSError(errno.EIO, f"short read of {len(b)} bytes from {self.out.name}")
                        z.write(b)
                        self.pages += 1
                        burst += 1
                        continue
                    self.max_burst = max(self.max_burst, burst)
                    burst = 0
                    if self.stop.is_set():
                        break
                    self.empty_polls += 1
                    time.sleep(self.poll_s)
        except BaseException as e:  # reported by record()
            self.error = e
        finally:
            os.close(self.fd)


CHECKPOINT_RE = re.compile(r"hintpipe-checkpoint (\d+) (begin|end)")


class Checkpointer(threading.Thread):
    """At once and then every ``interval`` seconds: a trace_marker record ``hintpipe-checkpoint N
    begin``, a read of /proc/buddyinfo into ``raw/checkpoints/N.buddyinfo``, a record ``...
    N end``. The free pages at checkpoint N then lie between the allocator's states at the two
    records' time stamps, so a prefix of the recording (its events up to "begin") can be checked
    against the kernel; the records between "begin" and "end" bound the uncertainty."""

    def __init__(self, marker: Path, out: Path, interval: float):
        super().__init__(daemon=True, name="hintpipe-record-checkpoints")
        self.marker = marker
        self.out = out
        self.interval = interval
        self.stop = threading.Event()
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.marker, os.O_WRONLY)
            try:
                while True:
                    n = self.count
                    os.write(fd, f"hintpipe-checkpoint {n} begin".encode())
                    with open("/proc/buddyinfo") as f:
                        text = f.read()
                    os.write(fd, f"hintpipe-checkpoint {n} end".encode())
                    (self.out / f"{n}.buddyinfo").write_text(text)
                    self.count += 1
                    if self.stop.wait(self.interval):
                        break
            finally:
                os.close(fd)
        except BaseException as e:  # reported in the summary; checkpoints are optional
            self.error = e


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------

def _check(tracefs: Path) -> None:
    if os.geteuid() != 0:
        raise RecordError("hintpipe record needs root: tracefs and /proc/kpageflags are readable by root only.")
    if not (tracefs / "events").is_dir():
        tracefs.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracefs)], capture_output=True, text=True)
        if r.returncode != 0 or not (tracefs / "events").is_dir():
            raise RecordError(f"tracefs is not available at {tracefs} and mounting it failed "
                              f"({(r.stderr or '').strip() or 'no tracefs in this kernel'}).")
    missing = [e for e in KMEM_EVENTS if not (tracefs / "events" / "kmem" / e / "format").exists()]
    if missing:
        raise RecordError(f"this kernel has no kmem trace event(s) {', '.join(missing)} in {tracefs}.")
    try:
        with open(KPAGEFLAGS, "rb") as f:
            f.read(8)
    except OSError as e:
        raise RecordError(f"/proc/kpageflags is not readable ({e.strerror}); the initial free pages cannot be snapshotted.")


def _copy(src: str | Path, dst: Path) -> None:
    try:
        dst.write_text(Path(src).read_text())
    except OSError:
        pass  # optional snapshots (pagetypeinfo may be absent)


def save_descriptions(events_dir: Path, raw: Path) -> None:
    """Copy the kernel's descriptions a decoder needs (header_page, header_event, the kmem
    formats and ids, and ftrace/print/format for checkpoint markers) into ``raw``."""
    for name in ("header_page", "header_event"):
        (raw / name).write_text((events_dir / name).read_text())
    pf = events_dir / "ftrace" / "print" / "format"
    if pf.exists():
        (raw / "ftrace" / "print").mkdir(parents=True, exist_ok=True)
        (raw / "ftrace" / "print" / "format").write_text(pf.read_text())
    for e in KMEM_EVENTS:
        d = raw / "kmem" / e
        d.mkdir(parents=True, exist_ok=True)
        for name in ("format", "id"):
            (d / name).write_text((events_dir / "kmem" / e / name).read_text())


class _PeakRate:
    """Most events in any whole second (1 s bins from the first event)."""

    def __init__(self):
        self.t0: int | None = None
        self.bins: dict[int, int] = {}

    def add(self, ts: np.ndarray) -> None:
        if not len(ts):
            return
        if self.t0 is None:
            self.t0 = int(ts[0])
        u, c = np.unique((ts - self.t0) // 1_000_000_000, return_counts=True)
        for k, v in zip(u.tolist(), c.tolist()):
            self.bins[k] = self.bins.get(k, 0) + v

    @property
    def peak(self) -> int:
        return max(self.bins.values(), default=0)


def count_events(outdir: Path, lost: int, write_cache: bool = True) -> dict:
    """Decode a finished raw recording once: events, span, rates and what the decoder saw. With
    nothing lost (and ``write_cache``) that pass writes the recording's trace cache, and the
    counting reads the cache."""
    from .cache import store
    from .recording import open_recording, open_v1, recording_files

    tr = open_recording(outdir, skip_bad=lost > 0)
    cache = store(outdir, tr, recording_files(outdir).all(), False) if write_cache and lost == 0 else None
    src = open_v1(cache) if cache is not None else tr
    peak = _PeakRate()
    first = last = None
    n = 0
    for b in src.batches():
        if len(b):
            first = int(b.ts_ns[0]) if first is None else first
            last = int(b.ts_ns[-1])
            n += len(b)
            peak.add(b.ts_ns)
    ds = tr.reader.decode_stats
    span = (last - first) / 1e9 if n > 1 else 0.0
    return {"events": n, "span_s": round(span, 3), "events_per_s": round(n / span) if span > 0 else 0,
            "peak_events_per_s": peak.peak, "decode": ds.as_dict(), "cache_file": str(cache) if cache else None,
            "decoded_records": ds.records + ds.failed_allocations + sum(ds.other_records.values())}


def record(outdir: str | Path, duration: float | None = None, command: list[str] | str | None = None, *,
           tracefs: str | Path = TRACEFS, buffer_kb: int | None = None, clock: str = "local",
           use_instance: bool = True, poll_s: float | None = None, checkpoint_s: float = 0.0,
           progress=None, write_cache: bool = True, replace: bool = False) -> dict:
    """Record kmem page events into ``outdir`` until ``command`` exits, ``duration`` seconds
    pass, or Ctrl-C (whichever first; with neither, until Ctrl-C).

    The recording is written into ``OUTDIR.part`` and renamed to ``outdir`` once complete, so
    ``outdir`` never holds a partial recording (a failure removes ``OUTDIR.part``); an existing
    ``outdir`` is refused (RecordError) unless ``replace``. ``buffer_kb`` is the per-CPU ring
    buffer (default :func:`default_buffer_kb`); ``use_instance`` records in a private tracing
    instance (default) rather than the top-level buffer; ``poll_s`` is how long a reader that
    found its buffer empty sleeps (default :data:`POLL_S`); ``checkpoint_s`` > 0 takes buddyinfo
    checkpoints at that interval (:class:`Checkpointer`); ``progress`` (a
    :class:`~hintpipe.progress.Progress`) shows the time recorded, the pages read and the events
    lost so far; ``write_cache`` writes the trace cache as the recording is counted.

    Returns a summary: outdir, events, seconds (wall time of the workload), span_s,
    events_per_s, peak_events_per_s, returncode (of the command, or None), interrupted,
    lost_events (the kernel's per-CPU counts), lost_in_pages (the pages' own flags), undecoded
    (records the kernel handed out that did not decode: 0), pages, bytes_written,
    restore_failed, checkpoints, cache_file. Raises RecordError (one sentence) where recording
    is impossible.
    """
    tracefs = Path(tracefs)
    poll_s = POLL_S if poll_s is None else poll_s
    if isinstance(command, str):
        command = shlex.split(command)
    if command and shutil.which(command[0]) is None:
        raise RecordError(f"cannot run {command[0]!r}: no such command (give its path or check its spelling).")
    final = Path(outdir)
    if final.exists() and not replace and not (final.is_dir() and not any(final.iterdir())):
        raise RecordError(f"{final} exists; choose another folder or replace it (--force).")
    _check(tracefs)
    out = final.with_name(final.name + ".part")
    try:
        shutil.rmtree(out, ignore_errors=True)
        (out / RAW_DIR).mkdir(parents=True)
    except OSError as e:
        raise RecordError(f"cannot create the output folder {out}: {e.strerror or e}.") from None
    try:
        try:
            s = _record(out, duration, command, tracefs, buffer_kb, clock, use_instance, poll_s, checkpoint_s, progress)
        except OSError as e:
            if not _disk_full(e):
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
    try:
        counted = count_events(final, s["lost_events"], write_cache)
    except TraceError as e:
        raise RecordError(f"the recording in {final} does not decode ({e}).") from None
    ds = counted["decode"]
    return {
        "outdir": str(final), "events": counted["events"], "seconds": s["seconds"], "span_s": counted["span_s"],
        "events_per_s": counted["events_per_s"], "peak_events_per_s": counted["peak_events_per_s"],
        "returncode": s["returncode"], "interrupted": s["interrupted"], "lost_events": s["lost_events"],
        "lost_in_pages": ds["lost_events"] + ds["lost_unknown"], "left_unread": s["left_unread"],
        "kernel_read_events": s["kernel_read_events"], "undecoded": s["kernel_read_events"] - counted["decoded_records"],
        "failed_allocations": ds["failed_allocations"], "pages": s["pages"],
        "bytes_written": sum(p.stat().st_size for p in (final / RAW_DIR).glob("cpu*.pages.zst")),
        "buffer_kb": s["buffer_kb"], "instance": s["instance"], "restore_failed": s["restore_failed"],
        "checkpoints": s["checkpoints"], "cache_file": counted["cache_file"],
    }


def _record(out: Path, duration: float | None, command: list[str] | None, tracefs: Path, buffer_kb: int | None,
            clock: str, use_instance: bool, poll_s: float, checkpoint_s: float, progress) -> dict:
    """The recording itself, into ``out`` (its raw/ folder exists); returns what the kernel and
    the readers said (events are counted afterwards, from the pages)."""
    raw = out / RAW_DIR
    (out / "uname.txt").write_text(os.uname().release + "\n")
    (out / "workload.txt").write_text((shlex.join(command) if command else
                                       f"(idle for {duration} s)" if duration is not None else "(idle)") + "\n")
    target = TraceTarget.open(tracefs, use_instance)
    readers: list[CpuReader] = []
    checkpointer: Checkpointer | None = None
    proc = None
    rc = None
    interrupted = False
    t_run = 0.0
    stats_end: dict[int, dict[str, int]] = {}
    restore_failed: list[str] = []
    task = None
    try:
        if buffer_kb is None:
            buffer_kb = default_buffer_kb(len(target.cpus()))
        target.configure(buffer_kb, clock)
        save_descriptions(target.dir / "events", raw)
        page_size = parse_header_page((raw / "header_page").read_text()).page_size
        for cpu in target.cpus():
            readers.append(CpuReader(cpu, target.dir / "per_cpu" / f"cpu{cpu}" / "trace_pipe_raw",
                                     raw / f"cpu{cpu}.pages.zst", page_size, poll_s))
        for r in readers:
            r.start()
        target.enable(True)
        target.set_tracing(True)
        # Snapshot after tracing is on: a page that changes while the snapshot is read has an
        # event in the trace, and replaying an event whose effect the snapshot already shows is
        # harmless (events set or clear a page's state), so each page's last state is exact.
        snapshot_kpageflags(out / "kpageflags.start.zst")
        _copy("/proc/buddyinfo", out / "buddyinfo.start")
        _copy("/proc/zoneinfo", out / "zoneinfo.start")
        _copy("/proc/pagetypeinfo", out / "pagetypeinfo.start")
        if checkpoint_s > 0:
            if not (target.dir / "trace_marker").exists():
                raise RecordError("this tracefs has no trace_marker; checkpoints are impossible here.")
            checkpointer = Checkpointer(target.dir / "trace_marker", raw / "checkpoints", checkpoint_s)
            checkpointer.start()
        t0 = time.monotonic()
        deadline = None if duration is None else t0 + duration
        if progress is not None:
            task = progress.task("recording" + (f" {shlex.join(command)}" if command else ""), total=duration, unit="s")
        try:
            if command:
                try:
                    proc = subprocess.Popen(command)
                except OSError as e:
                    raise RecordError(f"cannot run {command[0]!r}: {e.strerror or e}.") from None
            while True:
                step = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
                if proc is not None:
                    try:
                        rc = proc.wait(timeout=step)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                else:
                    time.sleep(step)
                if task is not None:
                    lost = 0
                    for cpu in target.cpus():
                        try:
                            lost += lost_from_stats(target.cpu_stats(cpu))
                        except OSError:
                            pass
                    task.update(round(time.monotonic() - t0, 1), description=(
                        f"recording: {sum(r.pages for r in readers):,} ring-buffer pages, {lost:,} events lost"))
                stop = next((r.error for r in readers if r.error is not None), None)
                if stop is not None or (deadline is not None and time.monotonic() >= deadline):
                    # a reader that cannot write (a full disk) ends the recording at once
                    if proc is not None and proc.poll() is None:
                        proc.terminate()
                        rc = proc.wait()
                    break
        except KeyboardInterrupt:
            interrupted = True
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    rc = proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
        t_run = time.monotonic() - t0
    finally:
        if checkpointer is not None:
            checkpointer.stop.set()
            checkpointer.join(timeout=10)
        try:
            target.set_tracing(False)
        except OSError:
            pass
        # the end state at once: from here on nothing is traced
        end_error: OSError | None = None
        try:
            _copy("/proc/buddyinfo", out / "buddyinfo.end")
            _copy("/proc/zoneinfo", out / "zoneinfo.end")
        except OSError as e:  # raised once the tracing state is restored
            end_error = e
        for r in readers:
            r.stop.set()
        for r in readers:
            r.join(timeout=60)
        for cpu in target.cpus():
            try:
                stats_end[cpu] = target.cpu_stats(cpu)
            except OSError:
                pass
        restore_failed = target.restore()
        if task is not None:
            task.close()
    if end_error is not None:
        raise end_error
    for r in readers:
        if r.error is not None and _disk_full(r.error):
            raise r.error  # record() says so and removes the partial recording
    errors = [f"{r.name}: {r.error}" for r in readers if r.error is not None]
    if errors:
        raise RecordError(f"reading the ring buffer failed ({'; '.join(errors)}).")
    per_cpu = {}
    for r in readers:
        st = stats_end.get(r.cpu, {})
        per_cpu[str(r.cpu)] = {"pages": r.pages, "max_burst_pages": r.max_burst, "empty_polls": r.empty_polls,
                               "stats": st, "lost": lost_from_stats(st), "left_unread": st.get("entries", 0)}
    lost = sum(v["lost"] for v in per_cpu.values())
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "page_size": readers[0].page_size if readers else None,
        "trace_clock": clock,
        "buffer_kb": buffer_kb,
        "instance": target.instance,
        "kernel": os.uname().release,
        "cpus": [r.cpu for r in readers],
        "lost_events": lost,
        "left_unread": sum(v["left_unread"] for v in per_cpu.values()),
        "per_cpu": per_cpu,
        "workload_seconds": round(t_run, 3),
        "checkpoints": checkpointer.count if checkpointer else 0,
        "restore_failed": restore_failed,
    }
    (raw / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return {"seconds": round(t_run, 3), "returncode": rc, "interrupted": interrupted, "lost_events": lost,
            "left_unread": meta["left_unread"], "pages": sum(v["pages"] for v in per_cpu.values()),
            "kernel_read_events": sum(v["stats"].get("read events", 0) for v in per_cpu.values()),
            "buffer_kb": buffer_kb, "instance": target.instance, "restore_failed": restore_failed,
            "checkpoints": meta["checkpoints"]}
