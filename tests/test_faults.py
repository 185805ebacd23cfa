"""Faults a host and its guests survive, each ending in a verified migration (0 lost pages) or a
migration reported failed, never a silently wrong one, with the host serving its other guests.

- A guest SIGKILLed mid-batch (half a Hints frame on the wire) and mid-round (right after a
  StartRound), over unix, tcp and shm, and with real memory under each write-protect backend.
- The host stopped (SIGSTOP) or killed while guests wait: the guests leave within their idle
  bound (or at once on end of stream), exit non-zero and say why.
- The connection cut between a Hints frame and its Ack (a tcp proxy that drops the Ack and
  closes both sides; in process, a link that breaks there).
- A destination slower than the source (the link at low bandwidth): no convergence, the round
  limit, stop-and-copy, verified.
- The disk filling up while ``hintpipe record`` writes a trace (a file-size rlimit): one sentence,
  exit 2, no partial files, tracing restored.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

import hintpipe.inprocess as inprocess
import hintpipe.wp as backends
from hintpipe.channel.records import REC, V1
from hintpipe.config import RunConfig
from hintpipe.guest.workload import WorkloadConfig
from hintpipe.host.migration import MigrationConfig
from hintpipe.linux import userfaultfd as uffd
from hintpipe.protocol import Ack, FrameDecoder, Hints

from procs import free_port, runtime_env

ROOT = Path(__file__).resolve().parents[1]
FAULT_GUEST = str(Path(__file__).with_name("fault_guest.py"))
SIZE = "64M"
# 1 Gbit/s and a downtime no round meets: four live rounds of a 64 MiB guest, so a guest can be
# killed in the middle of the second one
ROUNDS = ["--bandwidth", "1", "--downtime-ms", "0.001", "--max-rounds", "4"]
WAIT_S = 120  # how long a process may take before the test calls it hung


class Proc:
    """A subprocess whose stderr is collected line by line."""

    def __init__(self, args: list[str], env: dict, *, module: bool = True) -> None:
        argv = [sys.executable, "-m", "hintpipe", *args] if module else [sys.executable, *args]
        self.p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self.out: list[str] = []
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()
        self._t_out = threading.Thread(target=lambda: self.out.extend(self.p.stdout), daemon=True)
        self._t_out.start()

    def _pump(self) -> None:
        for line in self.p.stderr:
            self.err.append(line)
            self.lines.put(line)

    def wait_line(self, needle: str, timeout: float = 60.0) -> None:
        """Wait until a line with ``needle`` was printed (now or before)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in list(self.err)):
                return
            try:
                self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.p.poll() is not None:
                    break
        raise AssertionError(f"no {needle!r} on stderr: {''.join(self.err)!r}")

    def finish(self, timeout: float = WAIT_S) -> tuple[int, str, str]:
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"process still running after {timeout} s: {''.join(self.err)[-2000:]}") from None
        self._t.join(5)
        self._t_out.join(5)
        return self.p.returncode, "".join(self.out), "".join(self.err)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGCONT)
            self.p.kill()
            self.p.wait()


def _address(kind: str, tmp_path) -> str:
    return {"unix": f"unix:{tmp_path}/h.sock", "shm": f"shm:{tmp_path}/h.shm",
            "tcp": f"tcp:127.0.0.1:{free_port()}"}[kind]


def _host(addr: str, env: dict, *args: str) -> Proc:
    host = Proc(["host", "--listen", addr, "--json", *args], env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert host.p.poll() is None, "".join(host.err)
        if addr.startswith("tcp:"):
            try:
                socket.create_connection(("127.0.0.1", int(addr.rsplit(":", 1)[1])), timeout=0.2).close()
                return host
            except OSError:
                pass
        elif os.path.exists(addr.split(":", 1)[1]):
            return host
        time.sleep(0.05)
    raise AssertionError("host did not start listening")


def _guest(addr: str, env: dict, name: str, *extra: str, kill_at: str | None = None) -> Proc:
    args = ["--connect", addr, "--size", SIZE, "--name", name, *extra]
    if kill_at is None:
        return Proc(["guest", *args], env)
    return Proc([FAULT_GUEST, kill_at, *args], env, module=False)


def _reports(out: str) -> dict[str, dict]:
    return {r["guest"]["name"]: r for r in map(json.loads, out.splitlines())}


def _healthy(rep: dict) -> None:
    m = rep["migration"]
    assert rep["status"] == "migrated" and m["verified"] is True and m["lost_pages"] == 0, rep["reason"]
    assert m["allocated_pages"] > 0


def _reported_failed(rep: dict) -> None:
    # never silently wrong: a migration whose guest died is reported failed, with the reason
    assert rep["status"] == "failed" and rep["reason"], rep
    assert not (rep["migration"]["verified"] and rep["status"] == "migrated")


# ---- guests killed --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unix", "tcp", "shm"])
def test_guests_killed_mid_batch_and_mid_round(kind, tmp_path):
    env = runtime_env(tmp_path)
    addr = _address(kind, tmp_path)
    host = _host(addr, env, "--guests", "3", *ROUNDS)
    try:
        ok = _guest(addr, env, "ok")
        batch = _guest(addr, env, "batch", kill_at="batch:1")
        round_ = _guest(addr, env, "round", kill_at="round:2")
        for victim in (batch, round_):
            rc, _, err = victim.finish()
            assert rc == -signal.SIGKILL, err  # it died where it was meant to, not after
        rc, _, err = ok.finish()
        assert rc == 0 and "Traceback" not in err, err
        rc, out, err = host.finish()
    finally:
        host.kill()
    reps = _reports(out)
    _healthy(reps["ok"])
    _reported_failed(reps["batch"])
    _reported_failed(reps["round"])
    assert rc == 1 and "Traceback" not in err  # a migration failed; the host did not


def _need_real(backend: str) -> None:
    if backend == "sim":
        return
    try:
        backends.probe(backend)
    except uffd.UffdUnavailable as e:
        pytest.skip(f"{backend} unavailable here: {e.reason}")


@pytest.mark.parametrize("backend", ["uffd", "uffd-async", "sim"])
def test_real_memory_guests_killed_mid_batch_and_mid_round(backend, tmp_path):
    _need_real(backend)
    env = runtime_env(tmp_path)
    addr = _address("unix", tmp_path)
    real = ["--memory", "real", "--wp", backend]
    host = _host(addr, env, "--guests", "3", *ROUNDS, "--memory", "real", "--wp", "auto")
    try:
        ok = _guest(addr, env, "ok", *real)
        batch = _guest(addr, env, "batch", *real, kill_at="batch:1")
        round_ = _guest(addr, env, "round", *real, kill_at="round:2")
        for victim in (batch, round_):
            rc, _, err = victim.finish()
            assert rc == -signal.SIGKILL, err
        rc, _, err = ok.finish()
        assert rc == 0 and "Traceback" not in err, err
        rc, out, err = host.finish()
    finally:
        host.kill()
    reps = _reports(out)
    _healthy(reps["ok"])
    assert reps["ok"]["wp"]["backend"] == backend
    _reported_failed(reps["batch"])
    _reported_failed(reps["round"])
    assert rc == 1 and "Traceback" not in err


# ---- the host stopped or killed -------------------------------------------------------------


def test_guests_leave_a_stopped_host_within_their_idle_bound(tmp_path):
    env = runtime_env(tmp_path)
    addr = _address("unix", tmp_path)
    host = _host(addr, env, "--bandwidth", "0.2")  # a slow migration: the guests are mid-way
    try:
        a = _guest(addr, env, "a", "--idle-timeout", "2")
        b = _guest(addr, env, "b", "--idle-timeout", "2", "--workload", "idle")
        host.wait_line("'a' connected")
        host.wait_line("'b' connected")
        time.sleep(0.5)
        host.p.send_signal(signal.SIGSTOP)
        late = _guest(addr, env, "late", "--idle-timeout", "2")  # connects, says Hello, gets nothing
        for g, why in ((a, "answered no Ping"), (b, "answered no Ping"), (late, "sent no Welcome")):
            rc, _, err = g.finish(timeout=60)  # 2 s bound; a hung guest would never exit
            assert rc == 1 and "the host sent nothing for 2 s" in err and why in err, err
            assert "Traceback" not in err
    finally:
        host.kill()


@pytest.mark.parametrize("kind", ["unix", "tcp", "shm"])
def test_guests_exit_when_the_host_is_killed(kind, tmp_path):
    env = runtime_env(tmp_path)
    addr = _address(kind, tmp_path)
    host = _host(addr, env, "--bandwidth", "0.2")
    try:
        guests = [_guest(addr, env, f"g{i}", "--idle-timeout", "5") for i in range(2)]
        for i in range(2):
            host.wait_line(f"'g{i}' connected")
        time.sleep(0.5)
        host.p.kill()
        for g in guests:
            rc, _, err = g.finish(timeout=60)
            assert rc == 1 and "Traceback" not in err, err
            assert "host" in err or "connection" in err  # one sentence saying what happened
    finally:
        host.kill()


# ---- the connection cut between a hint and its ack ------------------------------------------


class AckCutter:
    """A tcp proxy between a guest and its host that cuts both connections when the host's
    first Ack after a Hints frame would reach the guest (the Ack is never delivered)."""

    def __init__(self, upstream_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream = upstream_port
        self.hint_seen = threading.Event()
        self.cut = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        guest, _ = self.listener.accept()
        host = socket.create_connection(("127.0.0.1", self.upstream))
        threading.Thread(target=self._pump, args=(guest, host, Hints), daemon=True).start()
        self._pump(host, guest, Ack)

    def _pump(self, src: socket.socket, dst: socket.socket, watch: type) -> None:
        buf, dec = b"", FrameDecoder()
        try:
            while not self.cut.is_set() and (data := src.recv(65536)):
                buf += data
                out = b""
                while len(buf) >= REC.size:  # tcp speaks records: whole ones are parsed
                    rtype, length = REC.unpack_from(buf)
                    if len(buf) < REC.size + length:
                        break
                    rec, buf = buf[:REC.size + length], buf[REC.size + length:]
                    if rtype == V1:
                        dec.feed(rec[REC.size:])
                        while (msg := dec.next_message()) is not None:
                            if isinstance(msg, Hints):
                                self.hint_seen.set()
                            elif isinstance(msg, Ack) and self.hint_seen.is_set():
                                dst.sendall(out)
                                self._cut(src, dst)
                                return
                    out += rec
                dst.sendall(out)
        except OSError:
            pass
        finally:
            self._cut(src, dst)

    def _cut(self, *socks: socket.socket) -> None:
        self.cut.set()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_connection_cut_between_a_hint_and_its_ack(tmp_path):
    env = runtime_env(tmp_path)
    port = free_port()
    host = _host(f"tcp:127.0.0.1:{port}", env, "--guests", "2", *ROUNDS)
    try:
        proxy = AckCutter(port)
        cut = _guest(f"tcp:127.0.0.1:{proxy.port}", env, "cut")
        rc, _, err = cut.finish()
        assert proxy.hint_seen.is_set() and proxy.cut.is_set()
        assert rc == 1 and "Traceback" not in err, err  # the guest knows it was not migrated
        ok = _guest(f"tcp:127.0.0.1:{port}", env, "ok")  # the host goes on serving
        rc, _, err = ok.finish()
        assert rc == 0, err
        rc, out, err = host.finish()
    finally:
        host.kill()
    reps = _reports(out)
    _reported_failed(reps["cut"])
    _healthy(reps["ok"])


class _CutAfterHint:
    """An in-process endpoint pair whose host side breaks the link instead of sending the Ack
    of the first Hints frame it received."""

    def __init__(self, guest_end, host_end) -> None:
        self.guest_end, self.host_end = guest_end, host_end
        self.hint_seen = False
        self.cut = False

    def host(self):
        outer = self

        class HostEnd:
            async def receive(self) -> bytes:
                data = await outer.host_end.receive()
                if data[4:6] == b"\x93\x05":
                    outer.hint_seen = True
                return data

            async def send_frame(self, frame: bytes) -> None:
                if outer.hint_seen and frame[4:6] == b"\x92\x07":  # [7 = Ack, count]
                    outer.cut = True
                    await outer.host_end.aclose()
                    raise trio.BrokenResourceError("link cut between a hint and its ack")
                await outer.host_end.send_frame(frame)

            async def aclose(self) -> None:
                await outer.host_end.aclose()

            def __getattr__(self, name):  # counters
                return getattr(outer.host_end, name)

        return HostEnd()


async def test_in_process_link_cut_between_a_hint_and_its_ack(autojump_clock, monkeypatch):
    cutters = []

    def pair(size, event_idx=True):
        g, h = inprocess_pair(size, event_idx=event_idx)
        c = _CutAfterHint(g, h)
        cutters.append(c)
        return g, c.host()

    inprocess_pair = inprocess.inproc_pair
    monkeypatch.setattr(inprocess, "inproc_pair", pair)
    cfg = RunConfig(pages=1 << 15, workload=WorkloadConfig(seed=5), migration=MigrationConfig(bandwidth_gbit=2.0))
    run = await inprocess.migrate_guest(cfg)
    (c,) = cutters
    assert c.hint_seen and c.cut
    # the in-process guest's memory is still there: the migration goes on without hints, and the
    # hint applied before the cut stays valid (its round's write tracking catches later writes)
    assert run.result.verified and run.result.lost_pages == 0
    assert "link cut" in run.session.failure and run.state.pages_marked > 0


# ---- a destination slower than the source ---------------------------------------------------


def test_slow_destination_never_converges_and_still_verifies():
    # 0.05 Gbit/s moves about 1,500 pages a second; the guest rewrites 5,000
    cfg = RunConfig(pages=1 << 12, workload=WorkloadConfig(seed=2, write_pages_per_s=5000.0, tick_s=0.02),
                    migration=MigrationConfig(bandwidth_gbit=0.05, max_rounds=4), baseline=False)
    rep = inprocess.run_demo(cfg)
    m = rep["migration"]
    assert m["converged"] is False and m["rounds"] == 4 + 1  # the round limit, then stop-and-copy
    assert all(r["sent"] > 0 for r in m["per_round"])
    assert m["verified"] is True and m["lost_pages"] == 0


# ---- the disk full while recording ----------------------------------------------------------


def _recording_impossible() -> str | None:
    if os.geteuid() != 0:
        return "recording needs root"
    if not os.access("/proc/kpageflags", os.R_OK):
        return "/proc/kpageflags is not readable"
    if not Path("/sys/kernel/tracing").exists():
        return "no tracefs mount point"
    return None


@pytest.mark.skipif(_recording_impossible() is not None, reason=_recording_impossible() or "")
@pytest.mark.parametrize("limit", [64 << 10, 2 << 20], ids=["snapshot", "trace"])
def test_disk_full_while_recording(limit, tmp_path):
    # RLIMIT_FSIZE makes every write past ``limit`` bytes fail with EFBIG, as a full disk does
    # with ENOSPC (Python ignores SIGXFSZ): 64 KiB fails in the kpageflags snapshot (600 KB here),
    # 2 MiB in the trace stream of a command that churns the allocator
    enable = Path("/sys/kernel/tracing/events/kmem/mm_page_alloc/enable")
    before = enable.read_text()
    out = tmp_path / "rec"
    churn = "import numpy as np\nfor _ in range(400): a = np.ones(1 << 22)"

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "hintpipe", "record", str(out), "--", sys.executable, "-c", churn],
                       cwd=ROOT, capture_output=True, text=True, preexec_fn=limit_files, timeout=WAIT_S)
    if r.returncode == 0:
        pytest.skip(f"the recording fit in {limit} bytes here")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "disk" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())  # no partial recording left behind
    assert enable.read_text() == before  # the tracing state found is restored
