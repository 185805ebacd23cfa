"""The host's memory: a budget every guest is admitted on before anything is mapped or allocated
for it, on every transport, and everything a guest held handed back when it leaves.

- The cost model (:mod:`hintpipe.paired.budget`) reads the page state's size from the page state
  and covers what a migration really allocates (measured with tracemalloc).
- A guest over the budget gets an Error naming the budget and the ask (unix, tcp at its INIT
  record, shm at its ring setup, real memory), and the host goes on serving others.
- A host process with the garbage collector disabled serves large guests that migrate a round and
  leave: its RSS climbs by hundreds of MiB and comes back to within a few MiB of where it started.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
import weakref

import numpy as np
import pytest
import trio
import trio.testing

from hintpipe.channel.address import parse_address
from hintpipe.channel.records import V1, record
from hintpipe.channel.stream import connect, open_stream_endpoint
from hintpipe.host.migration import MigrationConfig, MigrationEngine
from hintpipe.host.pagestate import HostPageState
from hintpipe.paired.budget import BudgetExceeded, GuestCost, MemoryBudget
from hintpipe.paired.mirror import INIT, MirrorReceiver
from hintpipe.paired.region import OFF_BARRIER_ACK, OFF_BARRIER_REQ, OFF_PAUSE_REQ, SharedRegion
from hintpipe.protocol import Error, ErrorCode, FrameDecoder, GuestConnection, ProtocolError

from procs import free_port, rss_mib, runtime_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the cost model ------------------------------------------------------------------------


@pytest.mark.parametrize("pages", [1, 1000, 1 << 16])
def test_page_state_says_what_it_holds(pages):
    # the budget charges HostPageState.nbytes_for: it must be the size of its arrays, whatever
    # their representation (a bit a page each)
    st = HostPageState(pages)
    held = sum(a.nbytes for a in st.arrays().values())
    assert held == st.nbytes
    assert held == HostPageState.nbytes_for(pages)


def test_cost_model_covers_what_a_migration_allocates():
    pages = 1 << 22
    cost = GuestCost.of(pages)
    versions = np.arange(pages, dtype=np.uint32)  # the guest's memory: not the host's allocation
    free = np.zeros(pages, dtype=bool)
    free[::3] = True

    async def pause() -> None:
        pass

    async def run() -> int:
        state = HostPageState(pages)
        engine = MigrationEngine(MigrationConfig(bandwidth_gbit=1000.0, max_rounds=3), state,
                                 read_source=lambda idx: versions[idx], free_mask=lambda: free, pause_guest=pause)
        res = await engine.run()
        return res.lost_pages

    tracemalloc.start()
    try:
        lost = trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    private = cost.page_state + cost.destination + cost.round_masks
    assert lost == 0
    # what the engine allocates per page is in the model; a few MiB of bounded step temporaries
    # (chunks of 2**18 pages) are not per page and stay under the connection buffers' share
    assert peak <= private + cost.buffers + (8 << 20), (peak, cost)
    assert peak >= 0.8 * private  # and the model is not far above it either


def test_budget_reserves_releases_and_names_the_ask():
    budget = MemoryBudget(64 << 20, source="--max-memory 64.0 MiB")
    a, b = budget.reservation(), budget.reservation()
    a.grow(40 << 20, "guest a")
    with pytest.raises(BudgetExceeded) as ei:
        b.grow(30 << 20, "a guest of 7 pages (page state 1 MiB)")
    msg = str(ei.value)
    assert "a guest of 7 pages" in msg and "30.0 MiB of host memory asked" in msg
    assert "--max-memory 64.0 MiB" in msg and "24.0 MiB free" in msg and "1 other guest" in msg
    assert b.nbytes == 0 and budget.used == 40 << 20  # a refused ask reserves nothing
    b.grow(24 << 20, "guest b")
    a.release()
    a.release()  # idempotent
    assert budget.used == 24 << 20 and budget.peak == 64 << 20
    with b:
        pass
    assert budget.used == 0


def test_guest_cost_by_memory_kind():
    sim, real = GuestCost.of(1 << 20), GuestCost.of(1 << 20, memory="real")
    assert sim.page_state == HostPageState.nbytes_for(1 << 20)
    assert sim.destination == 4 << 20 and real.destination == 4 << 30
    assert sim.real_memory == 0 and real.real_memory == 4 << 30
    assert "page state 0.4 MiB" in sim.describe() and "real memory" not in sim.describe()


def test_tcp_init_is_admitted_before_the_mirror_is_made():
    asked = []

    def refuse(pages: int) -> None:
        asked.append(pages)
        raise ProtocolError(ErrorCode.UNSUPPORTED, "over budget")

    rx = MirrorReceiver(send=lambda data: None, admit=refuse)
    with pytest.raises(ProtocolError) as ei:
        rx.on_record(INIT, struct.pack("<Q", 1 << 26))
    assert ei.value.code is ErrorCode.UNSUPPORTED and asked == [1 << 26]
    assert rx.region is None  # nothing was mapped for the refused guest


# ---- refusals over every transport ---------------------------------------------------------


def _start_host(tmp_path, addr: str, *args: str, gc_off: bool = False) -> subprocess.Popen:
    pre = (["-c", "import gc, sys; gc.disable(); from hintpipe.cli import main; sys.exit(main())"]
           if gc_off else ["-m", "hintpipe"])
    host = subprocess.Popen([sys.executable, *pre, "host", "--listen", addr, "--json", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=runtime_env(tmp_path))
    deadline = time.monotonic() + 20
    path = addr[5:] if addr.startswith("unix:") else (addr[4:] if addr.startswith("shm:") else None)
    while time.monotonic() < deadline:
        assert host.poll() is None, host.stderr.read()
        if path is not None and os.path.exists(path):
            return host
        if path is None:
            try:
                socket.create_connection(("127.0.0.1", int(addr.rsplit(":", 1)[1])), timeout=0.2).close()
                return host
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError("host did not start listening")


def _read_error(sock: socket.socket, *, records: bool) -> Error:
    sock.settimeout(20)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    if records:  # tcp: one V1 record holds the frame
        assert data[:1] == bytes([V1])
        data = data[5:]
    dec = FrameDecoder()
    dec.feed(data)
    msg = dec.next_message()
    assert isinstance(msg, Error), msg
    return msg


def _guest(addr: str, tmp_path, size: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hintpipe", "guest", "--connect", addr, "--size", size, *extra],
                          cwd=ROOT, capture_output=True, text=True, env=runtime_env(tmp_path), timeout=120)


@pytest.mark.parametrize("kind", ["unix", "tcp", "shm"])
def test_guest_over_the_budget_is_refused_with_the_figures(kind, tmp_path):
    addr = {"unix": f"unix:{tmp_path}/h.sock", "tcp": f"tcp:127.0.0.1:{free_port()}", "shm": f"shm:{tmp_path}/h.shm"}[kind]
    # 8 MiB: a 64 MiB guest (about 1 MiB of host memory with its shm rings of 2 x 8 x 4 KiB...)
    # fits; a 2**26-page guest (about 1 GiB) does not
    host = _start_host(tmp_path, addr, "--guests", "2", "--max-memory", "8M", "--bandwidth", "20")
    try:
        if kind == "tcp":
            with socket.create_connection(("127.0.0.1", int(addr.rsplit(":", 1)[1]))) as s:
                s.sendall(record(INIT, struct.pack("<Q", 1 << 26)))  # only the INIT record: no Hello
                err = _read_error(s, records=True)
        else:
            err = trio.run(_big_hello, addr, kind)
        assert err.code == ErrorCode.UNSUPPORTED
        assert "a guest of 67108864 pages" in err.message and "memory budget (--max-memory 8.0 MiB)" in err.message
        assert "of host memory asked" in err.message and "page state 24.0 MiB" in err.message
        ok = _guest(addr, tmp_path, "64M", "--queue-size", "8")  # the host goes on serving
        assert ok.returncode == 0, ok.stderr
        out, errtext = host.communicate(timeout=60)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    refused, rep = [json.loads(line) for line in out.splitlines()]
    assert refused["status"] == "failed" and refused["reason"] == err.message  # reported, counted
    assert refused["guest"]["pages"] == 1 << 26
    assert rep["status"] == "migrated" and rep["migration"]["verified"]
    assert 0 < rep["memory"]["reserved_bytes"] <= rep["memory"]["budget_bytes"] == 8 << 20
    assert "Traceback" not in errtext


async def _big_hello(addr: str, kind: str) -> Error:
    """A guest that shares a (sparse) region of 2**26 pages and says Hello for it."""
    pages = 1 << 26
    region = SharedRegion.create(pages)
    try:
        sock = await connect(parse_address(addr))
        if kind == "shm":
            from hintpipe.channel.shm import open_shm_guest

            ctx = open_shm_guest(sock, [region.fd], size=8, slot=4096)
        else:
            ctx = open_stream_endpoint(sock, first_fds=[region.fd])
        async with ctx as ep:
            conn = GuestConnection()
            await ep.send_frame(conn.hello(pages, window=8))
            dec = FrameDecoder()
            with trio.fail_after(20):
                while (data := await ep.receive()):
                    dec.feed(data)
                    if (msg := dec.next_message()) is not None:
                        return msg
        raise AssertionError("no answer")
    finally:
        region.close()


def test_shm_rings_over_the_budget_are_refused_before_they_are_mapped(tmp_path):
    addr = f"shm:{tmp_path}/h.shm"
    host = _start_host(tmp_path, addr, "--guests", "1", "--max-memory", "8M", "--bandwidth", "20")
    try:
        # the default rings (256 slots of 128 KiB each way, 64 MiB) do not fit in 8 MiB
        big = _guest(addr, tmp_path, "64M")
        assert big.returncode == 1 and "host refused the shm link" in big.stderr
        assert "the guest's shm rings (64.0 MiB)" in big.stderr and "--max-memory 8.0 MiB" in big.stderr
        ok = _guest(addr, tmp_path, "64M", "--queue-size", "8")
        assert ok.returncode == 0, ok.stderr
        host.communicate(timeout=60)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


def test_real_memory_guest_over_the_budget_is_refused(tmp_path):
    addr = f"unix:{tmp_path}/h.sock"
    host = _start_host(tmp_path, addr, "--guests", "2", "--max-memory", "64M", "--memory", "real",
                       "--wp", "sim", "--bandwidth", "20")
    try:
        # 64 MiB of real memory costs the host its destination and its mapping: 128 MiB and more
        big = _guest(addr, tmp_path, "64M", "--memory", "real", "--wp", "sim")
        assert big.returncode == 1 and "real memory 64.0 MiB" in big.stderr and "--max-memory 64.0 MiB" in big.stderr
        ok = _guest(addr, tmp_path, "16M", "--memory", "real", "--wp", "sim")
        assert ok.returncode == 0, ok.stderr
        out, _ = host.communicate(timeout=60)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    refused, rep = [json.loads(line) for line in out.splitlines()]
    assert refused["status"] == "failed" and "--max-memory 64.0 MiB" in refused["reason"]
    assert rep["status"] == "migrated" and rep["migration"]["verified"]


# ---- memory handed back --------------------------------------------------------------------


async def _large_guest_leaves_after_a_round(path: str, pages: int) -> None:
    """A guest that shares a region of ``pages`` pages, lets the host run round 0 (it answers
    the first barrier) and leaves when the host asks for the second barrier or the pause."""
    region = SharedRegion.create(pages)
    try:
        sock = await connect(parse_address(f"unix:{path}"))
        async with open_stream_endpoint(sock, first_fds=[region.fd]) as ep:
            await ep.send_frame(GuestConnection().hello(pages, window=8))
            with trio.fail_after(120):
                while region.word(OFF_BARRIER_REQ) != 1:
                    await trio.sleep(0.005)
                region.set_word(OFF_BARRIER_ACK, 1)
                # round 0 is sent when the host asks for the next barrier or for the pause
                while region.word(OFF_BARRIER_REQ) != 2 and region.word(OFF_PAUSE_REQ) != 1:
                    await trio.sleep(0.005)
    finally:
        region.close()


def test_host_rss_returns_after_large_guests_leave(tmp_path):
    pages = 1 << 24  # 64 GiB guests: round 0 reads 64 MiB of versions and writes 64 MiB of destination
    path = f"{tmp_path}/h.sock"
    host = _start_host(tmp_path, f"unix:{path}", "--guests", "4", "--bandwidth", "2000", gc_off=True)
    try:
        time.sleep(0.5)
        start = rss_mib(host.pid)
        peaks, after = [], []
        for _ in range(4):
            peak = [0.0]

            async def guest_and_sample():
                async with trio.open_nursery() as n:
                    async def sample():
                        while True:
                            peak[0] = max(peak[0], rss_mib(host.pid))
                            await trio.sleep(0.01)
                    n.start_soon(sample)
                    await _large_guest_leaves_after_a_round(path, pages)
                    n.cancel_scope.cancel()

            trio.run(guest_and_sample)
            line = host.stdout.readline()  # the host's report: the guest is done with
            assert json.loads(line)["status"] == "failed"
            deadline = time.monotonic() + 10
            while rss_mib(host.pid) > start + 4 and time.monotonic() < deadline:
                time.sleep(0.05)  # the connection's task finishes just after the report
            peaks.append(peak[0])
            after.append(rss_mib(host.pid))
        host.communicate(timeout=30)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    assert min(peaks) - start > 150, (start, peaks)  # each guest made the host hold a lot ...
    assert max(after) - start <= 4, (start, after)  # ... and all of it came back, gc or not


def test_nothing_of_a_guest_outlives_its_connection_without_gc(tmp_path):
    # the same in process: no reference cycle keeps a session, page state, engine or region alive
    from hintpipe.config import RunConfig
    from hintpipe.paired import host as host_mod
    from hintpipe.paired.host import GuestServer, HostOptions

    alive: list[weakref.ref] = []
    originals = {}
    for cls in (HostPageState, host_mod.HostSession, SharedRegion, host_mod.HostControl):
        originals[cls] = cls.__init__

        def init(self, *a, __orig=cls.__init__, **k):
            __orig(self, *a, **k)
            alive.append(weakref.ref(self))
        cls.__init__ = init
    path = f"{tmp_path}/h.sock"

    async def main():
        srv = GuestServer(HostOptions(address=parse_address(f"unix:{path}"), cfg=RunConfig(pages=1 << 20),
                                      guests=2, json=True))
        srv.emit = lambda rep: None
        async with trio.open_nursery() as n:
            await n.start(srv.serve)
            for _ in range(2):
                await _large_guest_leaves_after_a_round(path, 1 << 16)
                with trio.fail_after(30):
                    while srv.served < _ + 1:
                        await trio.sleep(0.01)
                await trio.sleep(0.1)

    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        trio.run(main)
        assert len(alive) >= 8 and [r() for r in alive if r() is not None] == []
    finally:
        for cls, orig in originals.items():
            cls.__init__ = orig
        if was:
            gc.enable()
