"""Real guest and host processes (``python -m hintpipe guest|host``) over unix, tcp and shm.

Per transport, one host serves: a garbage-sending peer (it gets an Error frame), a guest that is
SIGKILLed mid-migration (reported failed, or migrated and verified), and two guests at once (both
migrated, verified, 0 lost pages); then it exits by itself (``--guests 3``). A second test
interrupts a host mid-migration with SIGINT: clean exit, no traceback, no socket file left.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import trio

from hintpipe.channel.shm import open_shm_guest
from hintpipe.protocol import ErrorCode, FrameDecoder
from hintpipe.protocol.messages import Error

from procs import free_port, runtime_env

TRANSPORTS = ["unix", "tcp", "shm"]
SIZE = "64M"


def _address(kind: str, tmp_path) -> str:
    if kind == "unix":
        return f"unix:{tmp_path}/hp.sock"
    if kind == "shm":
        return "shm:testlink"  # bare name: lives in $HINTPIPE_RUNTIME_DIR
    return f"tcp:127.0.0.1:{free_port()}"


class Proc:
    """A hintpipe subprocess whose stderr lines are collected by a thread."""

    def __init__(self, args, env) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "hintpipe", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        for line in self.p.stderr:
            self.err.append(line)
            self.lines.put(line)

    def wait_line(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.p.poll() is not None and self.lines.empty():
                    break
                continue
            if needle in line:
                return line
        raise AssertionError(f"no {needle!r} on stderr; got {''.join(self.err)!r}")

    def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        out = self.p.stdout.read() if self.p.wait(timeout) is not None else ""
        self._t.join(5)
        return self.p.returncode, out, "".join(self.err)


def _socket_path(addr: str, tmp_path) -> str | None:
    if addr.startswith("unix:"):
        return addr[5:]
    if addr.startswith("shm:"):
        return f"{tmp_path}/hintpipe-{addr[4:]}.shm.sock"
    return None


def _wait_listening(addr: str, tmp_path, host: Proc) -> None:
    deadline = time.monotonic() + 20
    path = _socket_path(addr, tmp_path)
    while time.monotonic() < deadline:
        assert host.p.poll() is None, "".join(host.err)
        if path is not None:
            if os.path.exists(path):
                return
        else:
            hostname, port = addr[4:].rsplit(":", 1)
            try:
                socket.create_connection((hostname, int(port)), timeout=0.2).close()
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError("host did not start listening")


def _silent_peer(addr: str, tmp_path) -> socket.socket:
    path = _socket_path(addr, tmp_path)
    if path is not None:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        return s
    hostname, port = addr[4:].rsplit(":", 1)
    return socket.create_connection((hostname, int(port)))


def _garbage_peer(kind: str, addr: str, tmp_path) -> Error:
    """Connect, write junk, return the Error frame the host answers with."""
    if kind == "shm":
        return trio.run(_shm_garbage_peer, _socket_path(addr, tmp_path))
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX)
        s.connect(addr[5:])
    else:
        hostname, port = addr[4:].rsplit(":", 1)
        s = socket.create_connection((hostname, int(port)))
    with s:
        s.settimeout(10)
        # tcp speaks the record layer: a V1 record (type 0) with junk inside it
        junk = b"\x05\x00\x00\x00\xc1\xc1\xc1\xc1\xc1"
        s.sendall(b"\x00" + len(junk).to_bytes(4, "little") + junk if kind == "tcp" else junk)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    if kind == "tcp":
        assert data[:1] == b"\x00"
        data = data[5:]
    dec = FrameDecoder()
    dec.feed(data)
    msg = dec.next_message()
    assert isinstance(msg, Error), msg
    return msg


async def _shm_garbage_peer(path: str) -> Error:
    """A peer that sets the shm link up correctly, then posts a junk frame into the ring."""
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.connect(path)
    ram = os.memfd_create("dummy-ram")
    try:
        async with open_shm_guest(sock, [ram], size=8) as ep:
            await ep.send_frame(b"\x05\x00\x00\x00\xc1\xc1\xc1\xc1\xc1")
            dec = FrameDecoder()
            with trio.fail_after(10):
                while (data := await ep.receive()):
                    dec.feed(data)
            msg = dec.next_message()
    finally:
        os.close(ram)
    assert isinstance(msg, Error), msg
    return msg


def _guest(addr: str, env, name: str, *extra: str) -> Proc:
    return Proc(["guest", "--connect", addr, "--size", SIZE, "--name", name, *extra], env)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_host_serves_garbage_killed_and_concurrent_guests(kind, tmp_path):
    env = runtime_env(tmp_path)
    addr = _address(kind, tmp_path)
    # 64 MiB at 1 Gbit/s: about 0.5 s per round, long enough to kill a guest mid-migration
    host = Proc(["host", "--listen", addr, "--guests", "3", "--json", "--bandwidth", "1",
                 "--out", str(tmp_path / "reports.jsonl")], env)
    _wait_listening(addr, tmp_path, host)

    silent = _silent_peer(addr, tmp_path)  # connects and never says anything: must stall nobody
    err = _garbage_peer(kind, addr, tmp_path)
    assert err.code == ErrorCode.MALFORMED_FRAME

    victim = _guest(addr, env, "victim")
    host.wait_line("'victim' connected")
    time.sleep(0.3)
    victim.p.send_signal(signal.SIGKILL)
    victim.finish()

    a = _guest(addr, env, "a")
    b = _guest(addr, env, "b", "--workload", "idle")
    for g in (a, b):
        rc, out, errtext = g.finish()
        assert rc == 0, errtext
        assert "Traceback" not in errtext
    rc, out, errtext = host.finish()
    assert "Traceback" not in errtext
    reports = {r["guest"]["name"]: r for r in map(json.loads, out.splitlines())}
    assert set(reports) == {"victim", "a", "b"}
    for name in ("a", "b"):
        r = reports[name]
        assert r["status"] == "migrated" and r["transport"] == kind
        assert r["migration"]["verified"] is True and r["migration"]["lost_pages"] == 0
        assert r["migration"]["allocated_pages"] > 0 and r["wp"]["barriers"] >= 2
    v = reports["victim"]
    # a killed guest is never reported as silently fine: failed, or completed and verified
    assert v["status"] == "failed" or v["migration"]["verified"] is True
    assert rc == (1 if v["status"] == "failed" else 0)
    assert len((tmp_path / "reports.jsonl").read_text().splitlines()) == 3
    assert reports["b"]["hints"]["pages_marked"] > 0  # idle guest: hints really skipped pages
    path = _socket_path(addr, tmp_path)
    assert path is None or not os.path.exists(path)
    silent.close()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_sigint_stops_host_cleanly_mid_migration(kind, tmp_path):
    env = runtime_env(tmp_path)
    addr = _address(kind, tmp_path)
    host = Proc(["host", "--listen", addr, "--json", "--bandwidth", "0.5"], env)
    _wait_listening(addr, tmp_path, host)
    path = _socket_path(addr, tmp_path)
    if path is not None:
        assert os.stat(path).st_mode & 0o777 == 0o600  # only this user may connect
    guest = _guest(addr, env, "g")
    host.wait_line("'g' connected")
    time.sleep(0.2)
    host.p.send_signal(signal.SIGINT)
    rc, out, errtext = host.finish(timeout=20)
    assert rc == 0, errtext
    assert "Traceback" not in errtext and "SIGINT" in errtext
    path = _socket_path(addr, tmp_path)
    assert path is None or not os.path.exists(path)
    grc, _, gerr = guest.finish(timeout=20)
    assert grc != 0 and "Traceback" not in gerr
    assert gerr.strip()  # the guest says why it failed


def test_tcp_secret_is_required_and_accepted(tmp_path):
    env = runtime_env(tmp_path)
    addr = _address("tcp", tmp_path)
    host = Proc(["host", "--listen", addr, "--guests", "1", "--json", "--bandwidth", "20",
                 "--secret", "correct-horse"], env)
    _wait_listening(addr, tmp_path, host)
    intruder = _guest(addr, env, "intruder")  # no secret
    rc, _, err = intruder.finish()
    assert rc != 0 and "requires authentication" in err and "Traceback" not in err
    wrong = _guest(addr, env, "wrong", "--secret", "battery-staple")
    rc, _, err = wrong.finish()
    assert rc != 0 and "wrong secret" in err
    friend = _guest(addr, env, "friend", "--secret", "correct-horse")
    rc, _, err = friend.finish()
    assert rc == 0, err
    rc, out, _ = host.finish()
    (rep,) = map(json.loads, out.splitlines())
    assert rep["guest"]["name"] == "friend" and rep["migration"]["verified"] is True


def test_a_stopped_guest_times_out_without_stalling_another(tmp_path):
    env = runtime_env(tmp_path)
    addr = _address("unix", tmp_path)
    host = Proc(["host", "--listen", addr, "--guests", "2", "--json", "--bandwidth", "1",
                 "--guest-timeout", "1"], env)
    _wait_listening(addr, tmp_path, host)
    frozen = _guest(addr, env, "frozen")
    host.wait_line("'frozen' connected")
    frozen.p.send_signal(signal.SIGSTOP)  # alive, connected, answers nothing
    try:
        other = _guest(addr, env, "other")
        rc, _, err = other.finish()
        assert rc == 0, err
        rc, out, _ = host.finish()
    finally:
        frozen.p.send_signal(signal.SIGKILL)
        frozen.finish()
    reports = {r["guest"]["name"]: r for r in map(json.loads, out.splitlines())}
    assert reports["other"]["status"] == "migrated" and reports["other"]["migration"]["verified"]
    assert reports["frozen"]["status"] == "failed" and "did not answer" in reports["frozen"]["reason"]
    assert rc == 1


def test_each_side_decides_its_own_options_and_says_what_it_ignores(tmp_path):
    env = runtime_env(tmp_path)
    addr = _address("unix", tmp_path)
    # the same options given to both: size and workload are the guest's, bandwidth the host's
    both = ["--size", "1G", "--workload", "idle", "--bandwidth", "40"]
    host = Proc(["host", "--listen", addr, "--guests", "1", "--json", *both], env)
    host.wait_line("--size, --workload are decided by the guest; ignored here")
    _wait_listening(addr, tmp_path, host)
    guest = Proc(["guest", "--connect", addr, "--name", "g", "--size", SIZE, "--bandwidth", "1"], env)
    rc, _, gerr = guest.finish()
    assert rc == 0 and "--bandwidth is decided by the host; ignored here" in gerr
    rc, out, _ = host.finish()
    [rep] = map(json.loads, out.splitlines())
    assert rep["config"]["pages"] == 64 * 256 and rep["config"]["workload"] == "churn"  # the guest's
    assert rep["config"]["bandwidth_gbit"] == 40.0  # the host's
    assert rep["config"]["wp"] == "sim" and rep["wp"]["backend"] == "sim" and rep["wp"]["guest_ram"] == "shared"


def test_a_second_host_on_a_live_socket_is_refused_and_costs_no_guest_id(tmp_path):
    env = runtime_env(tmp_path)
    addr = _address("unix", tmp_path)
    first = Proc(["host", "--listen", addr, "--guests", "1", "--json", "--bandwidth", "40"], env)
    _wait_listening(addr, tmp_path, first)
    second = subprocess.run([sys.executable, "-m", "hintpipe", "host", "--listen", addr], capture_output=True,
                            text=True, env=env, timeout=60)
    assert second.returncode == 2 and "another process" in second.stderr and "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    rc, _, err = _guest(addr, env, "g").finish()
    assert rc == 0, err
    rc, out, _ = first.finish()
    [rep] = map(json.loads, out.splitlines())
    assert rep["guest"]["id"] == 1 and rep["status"] == "migrated"


def test_ctrl_c_stops_a_guest_with_130_and_a_host_with_guests_left_with_130(tmp_path):
    env = runtime_env(tmp_path)
    addr = _address("unix", tmp_path)
    host = Proc(["host", "--listen", addr, "--guests", "2", "--json", "--bandwidth", "0.5"], env)
    _wait_listening(addr, tmp_path, host)
    guest = _guest(addr, env, "g")
    host.wait_line("'g' connected")
    guest.p.send_signal(signal.SIGINT)
    rc, _, gerr = guest.finish(timeout=30)
    assert rc == 130 and "Traceback" not in gerr and "interrupted by SIGINT" in gerr
    host.p.send_signal(signal.SIGINT)
    rc, _, herr = host.finish(timeout=30)
    assert rc == 130 and "Traceback" not in herr and "SIGINT, shutting down" in herr
