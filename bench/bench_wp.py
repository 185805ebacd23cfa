"""Measure real WP backends on a 1 GiB memfd. Usage: python bench_wp.py [GiB]"""
import ctypes, os, sys, threading, time
import numpy as np
from hintpipe.host import uffd as u
from hintpipe.host.guest_ram import GuestRam
from hintpipe.host.wp_real import UffdSyncTracker, UffdAsyncTracker

GIB = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
N = int(GIB * (1 << 30)) // 4096
MB = N * 4096 / 1e6
def t(f, *a):
    s = time.perf_counter(); r = f(*a); return time.perf_counter() - s, r

print(f"N={N} pages ({MB:.0f} MB)")
# ---------------- guest RAM fill rates
ram = GuestRam(N)
d, _ = t(ram.write_pages, np.arange(N), 1); print(f"write_pages contiguous COLD (first touch): {MB/d:8.0f} MB/s")
d, _ = t(ram.write_pages, np.arange(N), 2); print(f"write_pages contiguous WARM:               {MB/d:8.0f} MB/s")
perm = np.random.default_rng(0).permutation(N)
d, _ = t(ram.write_pages, perm, 3); print(f"write_pages scattered WARM:                {MB/d:8.0f} MB/s")
d, ok = t(ram.verify, perm, 3); assert ok.all(); print(f"verify scattered:                          {MB/d:8.0f} MB/s")

# ---------------- async
uf = u.register_wp(ram.addr, ram.size, "uffd-async")
tr = UffdAsyncTracker(ram.addr, N, uf.fd, os.getpid())
d, _ = t(tr.arm); print(f"async arm (all populated, all 'written'):  {d*1e3:7.1f} ms  {N/d/1e6:6.2f} Mpages/s")
d, p = t(tr.written_since_last); assert p.size == 0
print(f"async scan, nothing written:               {d*1e3:7.1f} ms  {N/d/1e6:6.2f} Mpages/s")
ram.write_pages(np.arange(N), 4)
d, p = t(tr.written_since_last); assert p.size == N
print(f"async scan, all written (1 range):         {d*1e3:7.1f} ms  {N/d/1e6:6.2f} Mpages/s")
sc = perm[: N // 10]; ram.write_pages(sc, 5)
d, p = t(tr.written_since_last); assert p.size == len(sc)
print(f"async scan, 10% scattered written:         {d*1e3:7.1f} ms  {N/d/1e6:6.2f} Mpages/s scanned, {len(sc)/d/1e6:.2f} M written pages/s ({tr._scanner.ioctl_calls} ioctls total)")
d, _ = t(ram.write_pages, np.arange(N), 6); print(f"write_pages contiguous under async WP (every page faults once): {MB/d:6.0f} MB/s, {N/d/1e6:.2f} Mfaults/s")
tr.close(); uf.close(); ram.close()

# ---------------- async cold: fresh memfd, never touched
ram = GuestRam(N)
uf = u.register_wp(ram.addr, ram.size, "uffd-async")
tr = UffdAsyncTracker(ram.addr, N, uf.fd, os.getpid())
d, _ = t(tr.arm); print(f"async arm COLD (unpopulated memfd):        {d*1e3:7.1f} ms  {N/d/1e6:6.2f} Mpages/s")
d, p = t(tr.written_since_last); print(f"async scan COLD, nothing written:          {d*1e3:7.1f} ms  {N/d/1e6:6.2f} Mpages/s")
d, _ = t(ram.write_pages, np.arange(N), 1); print(f"write_pages COLD under async WP:           {MB/d:8.0f} MB/s")
d, p = t(tr.written_since_last); assert p.size == N; print(f"async scan after cold fill, all written:   {d*1e3:7.1f} ms  {N/d/1e6:6.2f} Mpages/s")
tr.close(); uf.close(); ram.close()

# ---------------- sync
ram = GuestRam(N); ram.touch()
uf = u.register_wp(ram.addr, ram.size, "uffd")
dirty = np.zeros(N, dtype=bool); lock = threading.Lock()
def on_fault(p):
    with lock: dirty[p] = True
tr = UffdSyncTracker(ram.addr, N, uf.fd, on_fault)
d, _ = t(tr.protect_all); print(f"sync protect_all (populated):              {d*1e3:7.1f} ms  {N/d/1e6:6.2f} Mpages/s")
K = min(N, 100_000)
pages = np.arange(K)
def writer():  # one byte per page, GIL released in memset
    base = ram.addr
    for p in pages.tolist():
        ctypes.memset(base + p * 4096, 1, 1)
th = threading.Thread(target=writer)
s = time.perf_counter(); th.start(); th.join(); d = time.perf_counter() - s
assert dirty[:K].all()
print(f"sync faults, 1 writer thread in-process:   {K/d:8.0f} faults/s ({K} faults, {tr.unprotect_calls} unprotect ioctls)")
tr.protect_all()
dirty[:] = False
s = time.perf_counter(); ram.write_pages(np.arange(N), 9); d = time.perf_counter() - s
assert dirty.all()
print(f"sync faults, numpy write_pages all {N} pages: {N/d:8.0f} faults/s  {MB/d:.0f} MB/s")
# baseline: same memset writer without protection
s = time.perf_counter(); th = threading.Thread(target=writer); th.start(); th.join(); d = time.perf_counter() - s
print(f"baseline same writer, no WP:               {K/d:8.0f} writes/s")
tr.close(); uf.close(); ram.close()
