"""Sync fault rate with the writer in another process (the real layout)."""
import os, socket, struct, subprocess, sys, threading, time
import numpy as np
from hintpipe.host.wp_real import UffdSyncTracker, recv_fds
N = int(sys.argv[1]) if len(sys.argv) > 1 else 262144
K = int(sys.argv[2]) if len(sys.argv) > 2 else 50000
THREADS = int(sys.argv[3]) if len(sys.argv) > 3 else 1
CHILD = r'''
import os, socket, struct, sys, ctypes, threading, time
from hintpipe.host import uffd as u
from hintpipe.host.guest_ram import GuestRam
from hintpipe.host.wp_real import send_fds
sock = socket.socket(fileno=int(sys.argv[1])); n = int(sys.argv[2]); k = int(sys.argv[3]); nth = int(sys.argv[4])
ram = GuestRam(n); ram.touch()
uffd = u.register_wp(ram.addr, ram.size, "uffd")
send_fds(sock, [ram.fd, uffd.fd], struct.pack("<QQQ", ram.addr, os.getpid(), n))
sock.recv(8)  # go
def w(lo, hi):
    for p in range(lo, hi):
        ctypes.memset(ram.addr + p * 4096, 1, 1)
step = k // nth
ths = [threading.Thread(target=w, args=(i * step, (i + 1) * step)) for i in range(nth)]
s = time.perf_counter()
for t in ths: t.start()
for t in ths: t.join()
d = time.perf_counter() - s
sock.send(struct.pack("<d", d)); sock.recv(8)
'''
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
p = subprocess.Popen([sys.executable, "-c", CHILD, str(b.fileno()), str(N), str(K), str(THREADS)], pass_fds=[b.fileno()], env=dict(os.environ))
b.close()
payload, (memfd, ufd) = recv_fds(a)
addr, pid, n = struct.unpack("<QQQ", payload)
dirty = np.zeros(N, dtype=bool); lock = threading.Lock()
def on_fault(pf):
    with lock: dirty[pf] = True
tr = UffdSyncTracker(addr, N, ufd, on_fault)
s = time.perf_counter(); tr.protect_all(); print(f"protect_all {N} pages: {(time.perf_counter()-s)*1e3:.1f} ms")
a.send(b"go")
(d,) = struct.unpack("<d", a.recv(8))
print(f"cross-process sync, {THREADS} writer thread(s): {K/d:.0f} faults/s ({K} faults in {d:.2f} s; unprotect ioctls {tr.unprotect_calls}); all seen: {bool(dirty[:K].all())}")
a.send(b"q"); p.wait(); tr.close()
