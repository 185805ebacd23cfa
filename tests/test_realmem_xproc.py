"""Backend adapters built the way a host process builds them: from fds received over SCM_RIGHTS.

The child is the guest: it creates its RAM (memfd) and uffd, registers its own mapping, sends
``[memfd, uffd]`` with a :class:`RamHandoff`, then writes pages on demand through
``write_pages_nogil``. This process is the host: ``make_backend`` from the received uffd and the
handoff (pid for PAGEMAP_SCAN), a :class:`HostPageState`, and its own mapping of the memfd.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hintpipe
import hintpipe.wp as backends
from hintpipe.host.pagestate import HostPageState
from hintpipe.linux import userfaultfd as u
from hintpipe.linux.fdpass import recv_fds
from hintpipe.linux.memfd import GuestRam, verify_words
from hintpipe.paired.handoff import RamHandoff
from hintpipe.protocol.errors import ProtocolError
from hintpipe.wp import make_backend

N = 256
TIMEOUT_S = 20

CHILD = r"""
import os, socket, struct, sys
import numpy as np
from hintpipe.linux import userfaultfd as u
from hintpipe.linux.fdpass import send_fds
from hintpipe.linux.memfd import GuestRam
from hintpipe.linux.memfd import write_pages_nogil
from hintpipe.paired.handoff import RamHandoff

sock = socket.socket(fileno=int(sys.argv[1]))
backend, n = sys.argv[2], int(sys.argv[3])
ram = GuestRam(n)
ram.touch()
uffd = u.register_wp(ram.addr, ram.size, backend)
send_fds(sock, [ram.fd, uffd.fd], RamHandoff(ram.addr, os.getpid(), n, backend).to_bytes())
uffd.close()  # the host's copy keeps the registration alive
while True:
    msg = sock.recv(1 << 20)
    if not msg or msg == b"q":
        break
    (version,) = struct.unpack_from("<Q", msg)
    write_pages_nogil(ram, np.frombuffer(msg, dtype="<i8", offset=8), version)
    sock.send(b"ok")
"""


def _need(backend: str) -> None:
    try:
        backends.probe(backend)
    except u.UffdUnavailable as e:
        pytest.skip(f"{backend} unavailable on this kernel: {e.reason}")


@pytest.fixture(params=["uffd", "uffd-async"])
def paired(request):
    backend = request.param
    _need(backend)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent.settimeout(TIMEOUT_S)
    env = dict(os.environ, PYTHONPATH=str(Path(hintpipe.__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(child.fileno()), backend, str(N)],
                            pass_fds=[child.fileno()], env=env)
    child.close()
    payload, (memfd, uffd_fd) = recv_fds(parent)
    info = RamHandoff.from_bytes(payload)
    assert info.pid == proc.pid and info.backend == backend and info.page_count == N
    host_ram = GuestRam(N, fd=memfd)
    state = HostPageState(N)
    be = make_backend(info.backend, state, ram_addr=info.addr, page_count=info.page_count,
                      uffd_fd=uffd_fd, pid=info.pid)

    def write(pfns, version):
        parent.send(struct.pack("<Q", version) + np.asarray(pfns, dtype="<i8").tobytes())
        assert parent.recv(16) == b"ok"   # a sync write returns only once the handler woke it

    yield be, state, host_ram, write
    be.close()
    parent.send(b"q")
    proc.wait(TIMEOUT_S)
    parent.close()
    host_ram.close()
    os.close(memfd)
    os.close(uffd_fd)


async def test_host_adapter_sees_guest_writes_across_processes(paired):
    be, state, host_ram, write = paired
    be.start_round(0)
    state.apply_hints(np.array([[8, 8]]))
    write([9, 200], 1)
    await be.before_chunk(0, N)
    assert state.is_written([9, 200]).all() and state.count_written() == 2
    assert not state.is_skip([9])[0] and state.is_skip([8])[0]
    assert verify_words(host_ram.words, [9, 200], [1, 1]).all()
    be.start_round(1)
    assert state.dirty_in()[[9, 200]].all()
    write([200], 2)                        # protected again in the new round
    await be.before_chunk(192, 256)
    assert state.is_written([200])[0] and not state.is_written([9])[0]
    assert be.stats()["faults"] == 3


def test_handoff_rejects_garbage():
    good = RamHandoff(1 << 30, 42, N, "uffd").to_bytes()
    for bad in (good[:-1], good[:-16] + b"nope".ljust(16, b"\0"),
                RamHandoff(12345, 42, N, "uffd").to_bytes(), RamHandoff(1 << 30, 42, 0, "uffd").to_bytes()):
        with pytest.raises(ProtocolError) as ei:
            RamHandoff.from_bytes(bad)
        assert ei.value.code.name == "BAD_FIELD"
