"""Cross-process tracking: the guest child creates memfd + uffd, the host (this process) tracks.

The child registers its own mapping (a uffd is tied to its creator's mm), sends
the memfd and the uffd over a Unix socket with SCM_RIGHTS, then closes its uffd
copy (the host's copy keeps the registration alive) and writes pages on demand.
"""

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import hintpipe
import hintpipe.wp as backends
from hintpipe.linux import userfaultfd as u
from hintpipe.linux.fdpass import recv_fds, send_fds
from hintpipe.linux.memfd import GuestRam
from hintpipe.wp.uffd_async import UffdAsyncTracker
from hintpipe.wp.uffd_sync import UffdSyncTracker

N = 128
TIMEOUT_S = 20

CHILD = r"""
import os, socket, struct, sys
import numpy as np
from hintpipe.linux import userfaultfd as u
from hintpipe.linux.fdpass import send_fds
from hintpipe.linux.memfd import GuestRam

sock = socket.socket(fileno=int(sys.argv[1]))
backend, n = sys.argv[2], int(sys.argv[3])
ram = GuestRam(n)
uffd = u.register_wp(ram.addr, ram.size, "uffd-async" if backend == "uffd-async" else "uffd")
send_fds(sock, [ram.fd, uffd.fd], struct.pack("<QQQ", ram.addr, os.getpid(), n))
uffd.close()
while True:
    msg = sock.recv(1 << 20)
    if not msg or msg == b"q":
        break
    (version,) = struct.unpack_from("<Q", msg)
    ram.write_pages(np.frombuffer(msg, dtype="<i8", offset=8), version)
    sock.send(b"ok")
"""


class Guest:
    """Handle on the child guest: its RAM mapped here, its uffd, its pid and address."""

    def __init__(self, backend: str):
        self.parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.parent.settimeout(TIMEOUT_S)
        env = dict(os.environ, PYTHONPATH=str(Path(hintpipe.__file__).resolve().parents[1]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(child.fileno()), backend, str(N)],
            pass_fds=[child.fileno()], env=env)
        child.close()
        payload, fds = recv_fds(self.parent)
        self.memfd, self.uffd_fd = fds
        self.addr, self.pid, n = struct.unpack("<QQQ", payload)
        assert n == N and self.pid == self.proc.pid
        self.ram = GuestRam(N, fd=self.memfd)   # the host's own mapping of guest RAM

    def write(self, pfns, version: int) -> None:
        """Ask the guest to write pages and wait until it has (blocked writes must be woken)."""
        self.parent.send(struct.pack("<Q", version) + np.asarray(pfns, dtype="<i8").tobytes())
        assert self.parent.recv(16) == b"ok"

    def close(self) -> None:
        try:
            self.parent.send(b"q")
        except OSError:
            pass
        self.proc.wait(TIMEOUT_S)
        self.parent.close()
        self.ram.close()
        os.close(self.memfd)
        os.close(self.uffd_fd)


def _need(backend: str) -> None:
    try:
        backends.probe(backend)
    except u.UffdUnavailable as e:
        pytest.skip(f"{backend} unavailable on this kernel: {e.reason}")


def test_send_recv_fds_roundtrip():
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        send_fds(a, [w], b"hello")
        data, fds = recv_fds(b)
        assert data == b"hello" and len(fds) == 1
        os.write(fds[0], b"x")
        assert os.read(r, 1) == b"x"
        os.close(fds[0])
        a.close()
        with pytest.raises(EOFError):
            recv_fds(b)
    finally:
        b.close()
        os.close(r)
        os.close(w)


def test_sync_cross_process():
    _need("uffd")
    g = Guest("uffd")
    seen: list[int] = []
    lock = threading.Lock()

    def on_fault(pfns):
        with lock:
            seen.extend(pfns.tolist())

    tracker = UffdSyncTracker(g.addr, N, g.uffd_fd, on_fault)
    try:
        tracker.protect_all()
        g.write([3, 100], 1)                    # returns only once the handler woke it
        assert sorted(seen) == [3, 100]
        assert g.ram.verify([3, 100], 1).all()  # the host sees the bytes in its mapping
        seen.clear()
        tracker.protect_all()                   # next round
        g.write([100], 2)
        assert seen == [100]
    finally:
        tracker.close()
        g.close()


def test_async_cross_process():
    _need("uffd-async")
    g = Guest("uffd-async")
    tracker = UffdAsyncTracker(g.addr, N, g.uffd_fd, g.pid)
    try:
        tracker.arm()
        g.write([0, 1, 64, 127], 1)
        assert tracker.written_since_last().tolist() == [0, 1, 64, 127]
        g.write([64], 2)
        assert tracker.written_since_last().tolist() == [64]
        assert tracker.written_since_last().size == 0
    finally:
        tracker.close()
        g.close()


@pytest.mark.parametrize("backend", ["uffd", "uffd-async", "disabled"])
def test_mini_migration_byte_check(backend):
    """Copy all pages, let the guest write, resend what the tracker reports, compare bytes.

    With a real backend nothing is lost; with tracking disabled the byte check
    finds exactly the pages written after the copy.
    """
    _need("uffd-async" if backend == "uffd-async" else "uffd")
    g = Guest(backend)
    versions = np.zeros(N, dtype=np.uint64)
    dirty = np.zeros(N, dtype=bool)
    lock = threading.Lock()

    def on_fault(pfns):
        with lock:
            dirty[pfns] = True

    tracker = None  # "disabled": nothing tracks the writes, so nothing is resent
    if backend == "uffd":
        tracker = UffdSyncTracker(g.addr, N, g.uffd_fd, on_fault)
    elif backend == "uffd-async":
        tracker = UffdAsyncTracker(g.addr, N, g.uffd_fd, g.pid)
    try:
        g.write(np.arange(N), 1)
        versions[:] = 1
        # round 0: protect, then copy everything
        if backend == "uffd-async":
            tracker.arm()
        elif tracker is not None:
            tracker.protect_all()
        dest = g.ram.words.copy()
        rng = np.random.default_rng(5)
        written = rng.choice(N, size=20, replace=False)
        for v, chunk in enumerate(np.array_split(written, 4), start=2):
            g.write(chunk, v)
            versions[chunk] = v
        # final round: resend what the tracker says was written
        if backend == "uffd-async":
            resend = tracker.written_since_last()
        else:
            with lock:
                resend = np.flatnonzero(dirty)
        dest[resend] = g.ram.words[resend]
        lost = np.flatnonzero(~_verify(dest, versions))
        if backend == "disabled":
            assert sorted(lost.tolist()) == sorted(written.tolist())
        else:
            assert lost.size == 0
            assert sorted(resend.tolist()) == sorted(written.tolist())
    finally:
        if tracker is not None:
            tracker.close()
        g.close()


def _verify(words, versions):
    from hintpipe.linux.memfd import verify_words
    return verify_words(words, np.arange(len(versions)), versions)
