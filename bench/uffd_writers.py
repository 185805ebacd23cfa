"""Writer processes touching write-protected guest RAM: the guests of the uffd fault-rate bench and tests.

Each writer is a separate process (its own mm, as a guest would be).  It maps the shared memfd,
populates its mapping, creates its own userfaultfd, registers its mapping in write-protect mode
and sends the uffd and its mapping address to the host over a Unix socket (SCM_RIGHTS).  Then,
for each command the host sends, it writes one byte into each page of its page list, in order,
and reports the CLOCK_MONOTONIC times at which it started and finished and how many pages it
wrote (it stops early, at a 256-page boundary, once a time budget is spent).

Write modes (what a store looks like to the fault handler):

* ``page``: one ``ctypes.memset(addr, value, 1)`` per page from a Python loop (one C call per
  page), each timed (the writer reports the median, 99th percentile and maximum store latency);
* ``stride``: one numpy strided assignment per 256 pages over their first bytes (the writer adds
  no Python work between faults);
* ``count``: writer i stores its running store count (u64, 1, 2, 3, ... over its lifetime) at
  byte offset 8*i of each page: every store changes the page (for the tests' oracles).

Faults of one writer are serialized: its next store happens only once the previous fault was
resolved.  Several writers fault concurrently.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # hintpipe is imported from here
PAGE = 4096

_CHILD = r'''
import ctypes, mmap, os, socket, struct, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from hintpipe.linux import userfaultfd as u
memfd, sockfd, npages, cpu, index = map(int, sys.argv[2:7])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
sock = socket.socket(fileno=sockfd)
m = mmap.mmap(memfd, npages * 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
anchor = ctypes.c_char.from_buffer(m); addr = ctypes.addressof(anchor); del anchor
pages = np.frombuffer(m, dtype=np.uint8).reshape(npages, 4096)
pages[:, 0] = pages[:, 0]            # populate this mapping's PTEs (reads and writes)
uf = u.register_wp(addr, npages * 4096, "uffd")
socket.send_fds(sock, [struct.pack("<QQ", addr, os.getpid())], [uf.fd])
memset, memmove = ctypes.memset, ctypes.memmove
cell = ctypes.c_uint64(0)          # the 'count' mode's store source
cell_addr = ctypes.addressof(cell)
seq = 0
mono = __import__("time").clock_gettime
CLK = __import__("time").CLOCK_MONOTONIC
CHUNK = 256
tick = __import__("time").perf_counter


def write(plist, mode, value, budget, out):
    """Store into the pages of plist (see the module docstring); append (t0, t1, done, lat)."""
    global seq
    lst = (addr + plist * 4096).tolist()
    done = 0
    lat = []
    t0 = mono(CLK)
    deadline = t0 + budget
    for c in range(0, len(plist), CHUNK):
        if mode == b"c":
            # an 8-byte store of this writer's running count at offset 8*index
            for a in lst[c:c + CHUNK]:
                seq += 1
                cell.value = seq
                memmove(a + 8 * index, cell_addr, 8)
        elif mode == b"s":
            # one strided store per page of the chunk (one numpy call for the whole chunk)
            pl = plist[c:c + CHUNK]
            step = int(pl[1] - pl[0]) if len(pl) > 1 else 1
            if step > 0 and int(pl[-1] - pl[0]) == step * (len(pl) - 1):
                pages[int(pl[0]):int(pl[-1]) + 1:step, 0] = value
            else:
                pages[pl, 0] = value
        else:
            for a in lst[c:c + CHUNK]:
                t = tick()
                memset(a, value, 1)   # releases the GIL: other writer threads run meanwhile
                lat.append(tick() - t)
        done = min(len(plist), c + CHUNK)
        if mono(CLK) > deadline:
            break
    out.append((t0, mono(CLK), done, lat))


while True:
    hdr = sock.recv(1 << 21)
    if not hdr or hdr[:1] == b"q":
        break
    mode, value, nthreads = hdr[:1], hdr[1], hdr[2]
    (budget,) = struct.unpack_from("<d", hdr, 3)
    plist = np.frombuffer(hdr[11:], dtype=np.int64)
    out = []
    parts = np.array_split(plist, max(1, nthreads))
    if nthreads <= 1:
        write(plist, mode, value, budget, out)
    else:  # threads of one process (vCPUs of one guest): one uffd, concurrent faults
        import threading
        outs = [[] for _ in parts]
        ths = [threading.Thread(target=write, args=(p, mode, value, budget, o)) for p, o in zip(parts, outs)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        out = [o[0] for o in outs]
    lat = [x for o in out for x in o[3]]
    q = np.percentile(lat, [50, 99, 100]) if lat else (0.0, 0.0, 0.0)
    dones = [o[2] for o in out][:16]
    sock.send(struct.pack("<ddqddd16q", min(o[0] for o in out), max(o[1] for o in out),
                          sum(dones), *q, *(dones + [0] * (16 - len(dones)))))
'''


@dataclass
class Writer:
    """One writer process: its uffd (a copy in this process), mapping address and pid."""

    proc: subprocess.Popen
    sock: socket.socket
    uffd_fd: int
    addr: int
    pid: int


@dataclass
class WriterGroup:
    """``n`` writer processes sharing one memfd of ``page_count`` pages."""

    page_count: int
    n: int
    cpus: list[int] | None = None
    memfd: int = -1
    writers: list[Writer] = field(default_factory=list)

    def __enter__(self) -> "WriterGroup":
        self.memfd = os.memfd_create("hintpipe-writers-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, self.page_count * PAGE)
        try:
            for i in range(self.n):
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                cpu = self.cpus[i % len(self.cpus)] if self.cpus else -1
                p = subprocess.Popen([sys.executable, "-c", _CHILD, ROOT, str(self.memfd), str(b.fileno()),
                                      str(self.page_count), str(cpu), str(i)],
                                     pass_fds=[self.memfd, b.fileno()])
                b.close()
                data, fds, _, _ = socket.recv_fds(a, 64, 1)
                if not fds:
                    p.kill()
                    raise RuntimeError("writer process failed to set up userfaultfd")
                addr, pid = struct.unpack("<QQ", data)
                self.writers.append(Writer(p, a, fds[0], addr, pid))
        except BaseException:
            self.__exit__()
            raise
        return self

    def host_view(self) -> np.ndarray:
        """(page_count, 4096) uint8 view of the RAM through a mapping of this process (not
        registered with any uffd: reading it never faults; it shows a store once it landed)."""
        import mmap
        m = mmap.mmap(self.memfd, self.page_count * PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
        return np.frombuffer(m, dtype=np.uint8).reshape(self.page_count, PAGE)

    def start(self, plists: list[np.ndarray], mode: str = "page", value: int = 1,
              budget_s: float = 1e9, threads: int = 1) -> None:
        """Tell writer i to store ``value`` into the first byte of each page of ``plists[i]``, in
        order, stopping at the first 256-page boundary after ``budget_s`` seconds.  With
        ``threads`` > 1 each writer process splits its list among that many threads (``page``
        mode), which fault concurrently on the process's one uffd."""
        for w, pl in zip(self.writers, plists):
            w.sock.send(({"page": b"p", "stride": b"s", "count": b"c"}[mode]) + bytes([value, threads])
                        + struct.pack("<d", budget_s) + np.asarray(pl, dtype=np.int64).tobytes())

    def wait(self, timeout: float = 120.0) -> list[tuple]:
        """(t_start, t_end, pages written, p50, p99, max store latency, per-thread counts) of each
        writer's last command.  Times are CLOCK_MONOTONIC (comparable across processes); store
        latencies (seconds, ``page`` mode only, else 0) are those of single stores, fault
        included.  Thread i of a writer wrote the first ``counts[i]`` pages of its part
        (``np.array_split(plist, threads)[i]``); with one thread, the first ``pages written``."""
        out = []
        for w in self.writers:
            w.sock.settimeout(timeout)
            v = struct.unpack("<ddqddd16q", w.sock.recv(176))
            out.append(v[:6] + (list(v[6:]),))
            w.sock.settimeout(None)
        return out

    def __exit__(self, *exc) -> None:
        for w in self.writers:
            try:
                w.sock.send(b"q")
            except OSError:
                pass
        for w in self.writers:
            try:
                w.proc.wait(10)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.sock.close()
            os.close(w.uffd_fd)
        self.writers.clear()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


def written_pages(plist: np.ndarray, result: tuple, threads: int = 1) -> np.ndarray:
    """The pages a writer reported as written (its ``wait()`` tuple) for ``plist``."""
    parts = np.array_split(np.asarray(plist), max(1, threads))
    return np.concatenate([p[:c] for p, c in zip(parts, result[6])])


def region_plists(n_writers: int, per_writer: int) -> list[np.ndarray]:
    """Writer i writes the contiguous block [i*per_writer, (i+1)*per_writer): its faults are on
    consecutive pages, but faults of different writers are never adjacent."""
    return [np.arange(i * per_writer, (i + 1) * per_writer, dtype=np.int64) for i in range(n_writers)]


def rate(times: list[tuple]) -> float:
    """Aggregate stores/s (= faults/s when every page was protected) from the earliest start to
    the latest end."""
    return sum(t[2] for t in times) / (max(t[1] for t in times) - min(t[0] for t in times))


