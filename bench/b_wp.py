"""Benchmark 8: write-protect, faults handled per second for sim, uffd (sync) and uffd-async.

Synchronous uffd, writers in other processes (headline keys ``uffd_sync_faults_per_s_1writer``
and ``uffd_sync_faults_per_s_4writers``): each writer is a guest process (``uffd_writers``) that
stores one byte into each of its write-protected pages, in order, so its faults are serialized;
four writers fault concurrently. The host handles them with hintpipe's handler
(``UffdSyncTracker`` recording into ``HostPageState.on_written``, one thread for every guest
uffd) and, in the same run and interleaved, with a C handler that only reads and unprotects
(``bench/c/uffd_yardstick.c``, built when a compiler is present: what the kernel and the machine
allow). Each hintpipe figure is also taken with the host busy (another thread of this process
running Python and small numpy operations, as the host's trio loop does). After each hintpipe
run every page written is checked to have been recorded. Median [min-max] over the runs.

The other figures come from ``bench/bench_wp_rate.py --json`` in a child process (one run per
figure: warm memfd, cold first touch reported apart).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import shutil
import tempfile
import threading
import time

import numpy as np

from common import BENCH_DIR, ROOT, row, spread

SCRIPT = BENCH_DIR / "bench_wp_rate.py"
C_HANDLER = BENCH_DIR / "c" / "uffd_yardstick.c"
GOAL_1WRITER = 40_000.0  # faults/s, one writer process
GOAL_4WRITERS = 100_000.0  # faults/s, four writer processes


class HostWork:
    """A thread of this process doing what the host's trio loop does: Python and small numpy."""

    def __init__(self) -> None:
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-work", daemon=True)

    def _run(self) -> None:
        a = np.arange(4096)
        while not self._stop.is_set():
            s = 0
            for i in range(100):
                s += i
            np.count_nonzero(a[::7] > s)
            self.count += 1

    def __enter__(self) -> "HostWork":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def build_c_handler(tmp: str) -> tuple[str | None, str]:
    """Compile the C yardstick handler; (executable or None, how it was built or why not)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler (cc, gcc or clang) on PATH: C yardstick not measured"
    exe = os.path.join(tmp, "uffd_yardstick")
    try:
        subprocess.run([cc, "-O2", "-o", exe, str(C_HANDLER)], check=True, capture_output=True, text=True,
                       timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the C compiler {cc} failed: {(getattr(e, 'stderr', None) or str(e)).strip()[:200]}"
    return exe, f"{os.path.basename(cc)} -O2"


def _one(g, handler: str, busy: bool, per_writer: int, value: int, cexe: str | None) -> float:
    """Faults/s of one measurement: every writer of group ``g`` writes ``per_writer`` pages."""
    from uffd_writers import rate, region_plists, written_pages

    from hintpipe.host.pagestate import HostPageState
    from hintpipe.linux.userfaultfd import UFFDIO_WRITEPROTECT_MODE_WP, writeprotect_fd
    from hintpipe.units import PAGE_SIZE
    from hintpipe.wp.uffd_sync import UffdSyncTracker

    ws, n = g.writers, g.page_count
    plists = region_plists(len(ws), per_writer)
    if handler == "C":
        proc = subprocess.Popen([cexe] + [f"{w.uffd_fd}:{w.addr}" for w in ws], stdin=subprocess.PIPE,
                                pass_fds=[w.uffd_fd for w in ws])
        try:
            for w in ws:
                writeprotect_fd(w.uffd_fd, w.addr, n * PAGE_SIZE, UFFDIO_WRITEPROTECT_MODE_WP)
            g.start(plists, "page", value)
            return rate(g.wait())
        finally:
            for w in ws:
                writeprotect_fd(w.uffd_fd, w.addr, n * PAGE_SIZE, 0)
            proc.stdin.close()
            proc.wait(10)
    state = HostPageState(n)
    tracker = UffdSyncTracker(ws[0].addr, n, ws[0].uffd_fd, state.on_written, start=False)
    for w in ws[1:]:
        tracker.attach(w.uffd_fd, w.addr)
    tracker.start()
    try:
        tracker.new_round(state.begin_round)
        work = HostWork().__enter__() if busy else None
        try:
            g.start(plists, "page", value)
            times = g.wait()
        finally:
            if work is not None:
                work.__exit__()
        for pl, t in zip(plists, times):
            if not state.is_written(written_pages(pl, t)).all():
                raise AssertionError("a page written was not recorded by the fault handler")
        return rate(times)
    finally:
        tracker.close()


def sync_fault_rates(per_writer: int, runs: int) -> dict:
    """Synchronous uffd faults/s for 1 and 4 writer processes: hintpipe's handler (idle and busy
    host) and the C yardstick, interleaved run by run."""
    from uffd_writers import WriterGroup

    tmp = tempfile.mkdtemp(prefix="hintpipe-uffd-yardstick-")
    try:
        cexe, note = build_c_handler(tmp)
        handlers = [("hintpipe", False), ("hintpipe", True)] + ([("C", False)] if cexe else [])
        res: dict = {}
        load0 = os.getloadavg()
        groups = {nw: WriterGroup(nw * per_writer, nw) for nw in (1, 4)}
        value = 1
        try:
            for g in groups.values():
                g.__enter__()
            for _ in range(runs):
                for nw, g in groups.items():
                    for h, busy in handlers:
                        value = value % 250 + 1
                        r = _one(g, h, busy, per_writer, value, cexe)
                        res.setdefault(f"{h}{'_busy_host' if busy else ''}_{nw}w", []).append(r)
        finally:
            for g in groups.values():
                g.__exit__()
        out = {k: spread(v) for k, v in res.items()}
        out.update(c_yardstick_note=note, c_built=cexe is not None, per_writer=per_writer, runs=runs,
                   loadavg_before=load0[:3], loadavg_after=os.getloadavg()[:3])
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(quick: bool = True) -> dict:
    """Fault rates per backend (and the sync-uffd headline keys), or a skip note."""
    import hintpipe.wp as backends
    from hintpipe.linux.userfaultfd import UffdUnavailable

    rows: list = []
    sync: dict = {}
    try:
        backends.probe("uffd")
        sync = sync_fault_rates(3000 if quick else 20_000, 3 if quick else 5)
    except UffdUnavailable as e:
        sync = {"unavailable": e.reason}
    out = {"uffd_sync_writer_processes": sync,
           "uffd_sync_faults_per_s_1writer": sync.get("hintpipe_1w", {}).get("median"),
           "uffd_sync_faults_per_s_4writers": sync.get("hintpipe_4w", {}).get("median")}
    if "unavailable" in sync:
        rows.append(row("wp", "uffd sync, writer processes", None, "", baseline=f"unavailable: {sync['unavailable']}"))
    else:
        k = lambda d: {x: (y / 1e3 if isinstance(y, float) else y) for x, y in d.items()}  # noqa: E731
        for nw, goal in ((1, GOAL_1WRITER), (4, GOAL_4WRITERS)):
            c = sync.get(f"C_{nw}w")
            busy = sync[f"hintpipe_busy_host_{nw}w"]
            rows.append(row("wp", f"uffd sync: {nw} writer process{'es' if nw > 1 else ''}", k(sync[f"hintpipe_{nw}w"]),
                            "k faults/s", goal=f">= {goal / 1e3:g}",
                            baseline=(f"C handler {c['median'] / 1e3:.1f} [{c['min'] / 1e3:.1f}-{c['max'] / 1e3:.1f}]"
                                      if c else sync["c_yardstick_note"])
                            + f"; busy host {busy['median'] / 1e3:.1f} [{busy['min'] / 1e3:.1f}-{busy['max'] / 1e3:.1f}]"))
        out["goal_met"] = bool(out["uffd_sync_faults_per_s_1writer"] >= GOAL_1WRITER
                               and out["uffd_sync_faults_per_s_4writers"] >= GOAL_4WRITERS)
    rest = _wp_rate_script(quick)
    rows.extend(rest.pop("rows"))
    return {**rest, **out, "rows": rows}


def _wp_rate_script(quick: bool) -> dict:
    """The other backends' figures, from bench_wp_rate.py in a child process."""
    if not SCRIPT.exists():
        note = "bench/bench_wp_rate.py not present: write-protect section skipped"
        return {"skipped": note, "rows": [row("wp", "skipped", None, "", baseline=note)]}
    faults = 5000 if quick else 100_000
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    try:
        p = subprocess.run([sys.executable, str(SCRIPT), "--json", "--faults", str(faults)], capture_output=True,
                           text=True, timeout=600, env=env, cwd=str(ROOT))
        res = json.loads(p.stdout.strip().splitlines()[-1])
    except Exception as e:  # someone else's script: report its failure, do not fail the suite
        note = f"bench_wp_rate.py failed: {type(e).__name__}: {str(e)[:200]}"
        return {"skipped": note, "rows": [row("wp", "failed", None, "", baseline=note)]}
    rows = []
    sim = res.get("sim", {})
    if "faults_per_s_1page_calls" in sim:
        rows.append(row("wp", "sim: 1 page per fault call", sim["faults_per_s_1page_calls"] / 1e3, "k faults/s",
                        baseline=f"4096-page calls: {sim.get('faults_per_s_4096page_calls', 0) / 1e6:.1f} M pages/s"))
    uf = res.get("uffd", {})
    if "unavailable" in uf:
        rows.append(row("wp", "uffd sync", None, "", baseline=f"unavailable: {uf['unavailable']}"))
    elif uf:
        k = "faults_per_s_1byte_writer_thread"
        rows.append(row("wp", "uffd sync: writer thread, 1-byte stores", uf.get(k, 0) / 1e3, "k faults/s",
                        baseline=f"no WP: {uf.get('baseline_1byte_writes_per_s_no_wp', 0) / 1e3:.0f} k writes/s"))
        k2 = "faults_per_s_other_process_1_writer_threads"
        if k2 in uf:
            rows.append(row("wp", "uffd sync: writer in another process", uf[k2] / 1e3, "k faults/s"))
    ua = res.get("uffd_async", {})
    if "unavailable" in ua:
        rows.append(row("wp", "uffd-async", None, "", baseline=f"unavailable: {ua['unavailable']}"))
    elif ua:
        rows.append(row("wp", "uffd-async: kernel-resolved faults", ua.get("kernel_resolved_faults_per_s_1byte", 0) / 1e3,
                        "k faults/s", baseline=f"no WP: {ua.get('baseline_1byte_writes_per_s_no_wp', 0) / 1e3:.0f} k writes/s; "
                                               f"PAGEMAP_SCAN {ua.get('full_scan_found_pages_per_s', 0) / 1e6:.1f} M pages/s"))
    return {"faults": faults, "result": res, "runs_per_figure": 1, "rows": rows}
