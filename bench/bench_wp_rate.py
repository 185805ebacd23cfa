"""Fault-handling rate of each write-protect backend: sim, uffd (sync), uffd-async.

Not a test. Every real measurement runs on a memfd that was touched first (warm); cold first
touch is reported apart. The fault handler is the one the migration uses
(``HostPageState.on_written`` behind the backend adapters of ``hintpipe.wp``).

    python bench/bench_wp_rate.py [--pages 262144] [--faults 100000] [--json]

Sections (each prints one line, and one key of the --json object):

* ``sim``: simulated faults (``SimWriteProtect.before_write``), one page per call and 4096 per call;
* ``uffd``: sync faults handled by the handler thread; writer = a thread of this process (1-byte
  stores, and 4 KiB pattern stores through ``write_pages_nogil``), then a writer in another
  process (the paired-process layout: uffd sent over SCM_RIGHTS), 1 and 2 writer threads;
* ``uffd_async``: stores under WP_ASYNC (the kernel resolves each first write), their unprotected
  baseline, and PAGEMAP_SCAN: whole-guest scans (nothing / 10 % scattered written) and 256-page
  chunk scans as the migration engine issues them.

Supersedes the ad-hoc bench_wp.py and bench_sync_xproc.py (their measurements are all here).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np

import hintpipe.wp as backends
from hintpipe.host.pagestate import HostPageState
from hintpipe.linux import userfaultfd as u
from hintpipe.linux.fdpass import recv_fds
from hintpipe.linux.memfd import GuestRam, write_pages_nogil
from hintpipe.wp.sim import SimWriteProtect
from hintpipe.wp.uffd_async import AsyncUffdBackend
from hintpipe.wp.uffd_sync import SyncUffdBackend

PAGE = 4096


def _clock(fn, *a):
    t = time.perf_counter()
    r = fn(*a)
    return time.perf_counter() - t, r


def _run_coro(coro) -> None:
    """Drive a coroutine that never suspends (SimWriteProtect.before_write has no checkpoint)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    raise RuntimeError("coroutine suspended")


def _memset_each(addr: int, pfns: list[int]) -> None:
    """One 1-byte store per page, GIL released in each C call."""
    memset = ctypes.memset
    for p in pfns:
        memset(addr + p * PAGE, 1, 1)


def _in_thread(fn, *args) -> float:
    th = threading.Thread(target=fn, args=args)
    t = time.perf_counter()
    th.start()
    th.join()
    return time.perf_counter() - t


def bench_sim(n: int, k: int) -> dict:
    state = HostPageState(n)
    wp = SimWriteProtect(state)
    state.begin_first_round()
    pf = np.random.default_rng(0).permutation(n)[:k]
    singles = [pf[i:i + 1] for i in range(k)]
    t = time.perf_counter()
    for s in singles:
        _run_coro(wp.before_write(s))
    d1 = time.perf_counter() - t
    state.begin_round()
    t = time.perf_counter()
    for i in range(0, k, 4096):
        _run_coro(wp.before_write(pf[i:i + 4096]))
    d2 = time.perf_counter() - t
    return {"faults_per_s_1page_calls": k / d1, "faults_per_s_4096page_calls": k / d2}


def bench_sync_inproc(n: int, k: int) -> dict:
    out = {}
    ram = GuestRam(n)
    d, _ = _clock(ram.touch)
    out["memfd_first_touch_MBps"] = n * PAGE / d / 1e6
    uffd = u.register_wp(ram.addr, ram.size, "uffd")
    state = HostPageState(n)
    be = SyncUffdBackend(state, ram.addr, n, uffd.fd)
    try:
        d, _ = _clock(be.start_round, 0)
        out["protect_all_ms"] = d * 1e3
        pfns = np.random.default_rng(1).permutation(n)[:k]
        d = _in_thread(_memset_each, ram.addr, pfns.tolist())
        assert state.is_written(pfns).all() and state.faults == k
        out["faults_per_s_1byte_writer_thread"] = k / d
        be.start_round(1)
        d = _in_thread(_memset_each, ram.addr, pfns.tolist())
        out["faults_per_s_1byte_writer_thread_round2"] = k / d
        be.start_round(2)
        # 4 KiB pattern stores, scattered pages (one memmove each), as the demo's guest writes
        d = _in_thread(write_pages_nogil, ram, np.sort(pfns), 7)
        out["faults_per_s_4k_pattern_scattered"] = k / d
        be.start_round(3)
        lo = min(n, k)
        d = _in_thread(write_pages_nogil, ram, np.arange(lo), 8)  # one memmove, one fault per page
        out["faults_per_s_4k_pattern_contiguous"] = lo / d
        out["unprotect_calls"] = be.tracker.unprotect_calls
    finally:
        be.close()
        uffd.close()
    d = _in_thread(_memset_each, ram.addr, np.arange(min(n, k)).tolist())
    out["baseline_1byte_writes_per_s_no_wp"] = min(n, k) / d
    ram.close()
    return out


_CHILD = r'''
import ctypes, os, socket, struct, sys, threading, time
from hintpipe.linux import userfaultfd as u
from hintpipe.linux.fdpass import send_fds
from hintpipe.linux.memfd import GuestRam
sock = socket.socket(fileno=int(sys.argv[1])); n, k, nth = map(int, sys.argv[2:5])
ram = GuestRam(n); ram.touch()
uffd = u.register_wp(ram.addr, ram.size, "uffd")
send_fds(sock, [ram.fd, uffd.fd], struct.pack("<QQQ", ram.addr, os.getpid(), n))
sock.recv(8)  # go
def w(lo, hi):
    memset = ctypes.memset
    for p in range(lo, hi):
        memset(ram.addr + p * 4096, 1, 1)
step = k // nth
ths = [threading.Thread(target=w, args=(i * step, (i + 1) * step)) for i in range(nth)]
t = time.perf_counter()
for th in ths: th.start()
for th in ths: th.join()
sock.send(struct.pack("<d", time.perf_counter() - t)); sock.recv(8)
'''


def bench_sync_xproc(n: int, k: int, threads: int) -> float:
    """Faults/s with the writer in a child process; this process is the host."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p = subprocess.Popen([sys.executable, "-c", _CHILD, str(b.fileno()), str(n), str(k), str(threads)],
                         pass_fds=[b.fileno()])
    b.close()
    try:
        payload, fds = recv_fds(a)
        addr, _pid, npages = struct.unpack("<QQQ", payload)
        state = HostPageState(npages)
        be = SyncUffdBackend(state, addr, npages, fds[1])
        be.start_round(0)
        a.send(b"go")
        (d,) = struct.unpack("<d", a.recv(8))
        k_done = (k // threads) * threads
        assert state.written_in(0, k_done).all()
        a.send(b"q")
        p.wait(30)
        be.close()
        for fd in fds:
            os.close(fd)
        return k_done / d
    finally:
        if p.poll() is None:
            p.kill()
        a.close()


def bench_async(n: int, k: int) -> dict:
    out = {}
    ram = GuestRam(n)
    ram.touch()
    uffd = u.register_wp(ram.addr, ram.size, "uffd-async")
    state = HostPageState(n)
    be = AsyncUffdBackend(state, ram.addr, n, uffd.fd, os.getpid())
    tr = be.tracker
    try:
        d, _ = _clock(be.start_round, 0)
        out["arm_ms"] = d * 1e3
        d, p = _clock(tr.written_since_last)
        assert p.size == 0
        out["full_scan_nothing_written_ms"] = d * 1e3
        pfns = np.random.default_rng(2).permutation(n)[:k]
        d = _in_thread(_memset_each, ram.addr, pfns.tolist())
        out["kernel_resolved_faults_per_s_1byte"] = k / d
        d, p = _clock(tr.written_since_last)
        assert p.size == k
        out["full_scan_found_pages_per_s"] = k / d
        out["full_scan_ms_with_found"] = d * 1e3
        # chunked as the engine does: scan 256 pages, hand them to the page state
        _in_thread(_memset_each, ram.addr, pfns.tolist())
        t = time.perf_counter()
        found = 0
        for a in range(0, n, 256):
            q = tr.written_in(a, min(n, a + 256))
            if len(q):
                state.on_written(q)
            found += len(q)
        d = time.perf_counter() - t
        assert found == k
        out["chunk256_scan_us_per_chunk"] = d / -(-n // 256) * 1e6
        out["chunk256_found_pages_per_s"] = k / d
    finally:
        be.close()
        uffd.close()
    d = _in_thread(_memset_each, ram.addr, pfns.tolist())
    out["baseline_1byte_writes_per_s_no_wp"] = k / d
    ram.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=1 << 18, help="guest RAM pages (default 1 GiB)")
    ap.add_argument("--faults", type=int, default=100_000, help="pages written per measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n, k = args.pages, min(args.faults, args.pages)
    res: dict = {"pages": n, "faults": k, "sim": bench_sim(n, k)}
    for name, fn in (("uffd", lambda: bench_sync_inproc(n, k)), ("uffd_async", lambda: bench_async(n, k))):
        try:
            backends.probe("uffd" if name == "uffd" else "uffd-async")
        except u.UffdUnavailable as e:
            res[name] = {"unavailable": e.reason}
            continue
        res[name] = fn()
    if "unavailable" not in res["uffd"]:
        for th in (1, 2):
            res["uffd"][f"faults_per_s_other_process_{th}_writer_threads"] = bench_sync_xproc(n, k, th)
    if args.json:
        print(json.dumps(res))
        return
    for sec, vals in res.items():
        if isinstance(vals, dict):
            for key, v in vals.items():
                print(f"{sec:10s} {key:48s} {v:14,.1f}" if isinstance(v, float) else f"{sec:10s} {key:48s} {v}")
        else:
            print(f"{sec:10s} {vals}")


if __name__ == "__main__":
    main()
