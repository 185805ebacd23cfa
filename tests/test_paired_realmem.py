"""Paired guest/host processes with real guest memory (``--memory real``) and real write-protect.

End to end with ``python -m hintpipe host|guest`` subprocesses: for each real backend over unix
(and one over shm) a churning guest is migrated with 0 lost pages by byte comparison and real
faults; with tracking off the byte check finds lost pages and the guest exits non-zero. In
process: an unavailable backend (simulated by monkeypatching the probe) exits 2 with one
sentence, tcp is refused, and the host's validation of the RAM handoff refuses bad handoffs.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import trio

import hintpipe.wp as backends
from hintpipe import cli
from hintpipe.cli.options import paired_config
from hintpipe.linux import userfaultfd as u
from hintpipe.paired.handoff import (
    HANDOFF_MAGIC, TCP_REFUSAL, GuestRealRam, RamHandoff, RealMemoryError, check_backend,
    receive_handoff, send_handoff,
)

from procs import runtime_env

SIZE = "64M"
FAST = ["--bandwidth", "40"]  # 64 MiB in ~15 ms of link time per round: the test is quick
TIMEOUT_S = 120


def _need(backend: str) -> None:
    try:
        backends.probe(backend)
    except u.UffdUnavailable as e:
        pytest.skip(f"{backend} unavailable here: {e.reason}")


def _socket_path(addr: str, tmp_path) -> str:
    return addr[5:] if addr.startswith("unix:") else f"{tmp_path}/hintpipe-{addr[4:]}.shm.sock"


def _pair(tmp_path, addr: str, host_wp: str, guest_wp: str, *, guests: int | None = 1):
    """Run one host and one guest; return (host rc, host reports, guest rc, guest stderr)."""
    env = runtime_env(tmp_path)
    h_args = ["host", "--listen", addr, "--json", "--memory", "real", "--wp", host_wp, *FAST]
    if guests is not None:
        h_args += ["--guests", str(guests)]
    host = subprocess.Popen([sys.executable, "-m", "hintpipe", *h_args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        path = _socket_path(addr, tmp_path)
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert host.poll() is None and time.monotonic() < deadline, host.stderr.read()
            time.sleep(0.05)
        guest = subprocess.run([sys.executable, "-m", "hintpipe", "guest", "--connect", addr, "--size", SIZE,
                                "--memory", "real", "--wp", guest_wp, *FAST],
                               capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
        if guests is None:
            host.send_signal(2)
        out, err = host.communicate(timeout=TIMEOUT_S)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return host.returncode, reports, guest.returncode, guest.stderr + guest.stdout, err


# both backends over unix; shm carries the same handoff on its control socket: one run there;
# sim: real bytes, faults over the link with round barriers (what auto falls back to)
@pytest.mark.parametrize(("backend", "kind"), [("uffd", "unix"), ("uffd-async", "unix"), ("uffd", "shm"),
                                               ("sim", "unix")])
def test_real_backend_migrates_churning_guest_byte_exact(backend, kind, tmp_path):
    if backend != "sim":
        _need(backend)
    addr = f"unix:{tmp_path}/hp.sock" if kind == "unix" else "shm:rm"
    hrc, reports, grc, gerr, herr = _pair(tmp_path, addr, backend, backend)
    assert hrc == 0 and grc == 0, (gerr, herr)
    [rep] = reports
    mig = rep["migration"]
    assert rep["status"] == "migrated" and rep["transport"] == kind
    assert rep["config"]["memory"] == "real" and rep["config"]["wp"] == backend
    assert mig["verified"] is True and mig["lost_pages"] == 0
    assert mig["allocated_pages"] > 0 and rep["workload"]["pages_written"] > 0  # it churned
    assert rep["wp"]["backend"] == backend
    assert rep["wp"]["faults"] > 0            # real faults (sync) / written pages found by scans
    if backend == "sim":
        assert rep["wp"]["barriers"] > 0 and rep["wp"]["fault_messages"] > 0
    else:
        assert rep["wp"]["barriers"] == 0     # the kernel protects: no round barrier needed
    assert "migrated and verified" in gerr


def test_tracking_off_loses_pages_and_the_byte_check_says_so(tmp_path):
    hrc, reports, grc, gerr, herr = _pair(tmp_path, f"unix:{tmp_path}/hp.sock", "off", "off")
    [rep] = reports
    assert rep["wp"]["backend"] == "off" and rep["wp"]["faults"] == 0
    assert rep["migration"]["lost_pages"] > 0 and rep["migration"]["verified"] is False
    assert rep["status"] == "failed" and "lost pages" in rep["reason"]
    assert grc != 0 and hrc != 0
    assert "failed" in gerr


def test_host_refuses_a_guest_with_another_backend(tmp_path):
    _need("uffd")
    _need("uffd-async")
    # the refused guest counts toward --guests 1: the host reports it and exits instead of waiting
    hrc, reports, grc, gerr, herr = _pair(tmp_path, f"unix:{tmp_path}/hp.sock", "uffd", "uffd-async")
    [rep] = reports
    assert rep["status"] == "failed" and "--wp uffd-async but this host" in rep["reason"]
    assert hrc == 1 and grc != 0
    assert "--wp uffd-async but this host was started with --wp uffd" in gerr
    assert "--wp uffd-async but this host" in herr


@pytest.mark.parametrize("command", ["guest", "host"])
def test_unavailable_backend_exits_2_with_one_sentence(command, monkeypatch, capsys, tmp_path):
    def probe(backend="uffd"):
        raise u.UffdUnavailable("userfaultfd is blocked by seccomp (simulated)")

    monkeypatch.setattr(backends, "probe", probe)
    where = ["--connect"] if command == "guest" else ["--listen"]
    rc = cli.main([command, *where, f"unix:{tmp_path}/never.sock", "--memory", "real", "--wp", "uffd-async"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "--wp uffd-async is unavailable" in err and "seccomp" in err
    assert not os.path.exists(f"{tmp_path}/never.sock")


def test_auto_falls_back_to_sim_when_nothing_real_works(monkeypatch):
    def probe(backend="uffd"):
        raise u.UffdUnavailable("no userfaultfd (simulated)")

    monkeypatch.setattr(backends, "probe", probe)
    assert paired_config(cli.build_parser().parse_args(
        ["guest", "--connect", "unix:/x", "--memory", "real", "--wp", "auto"]), guest=True).wp == "sim"


@pytest.mark.parametrize("command", ["guest", "host"])
def test_tcp_refuses_real_memory(command, capsys):
    where = ["--connect"] if command == "guest" else ["--listen"]
    rc = cli.main([command, *where, "tcp:127.0.0.1:9", "--memory", "real", "--wp", "off"])
    assert rc == 2 and capsys.readouterr().err.strip() == f"hintpipe: {TCP_REFUSAL}"


# ---- the host's validation of the handoff, in process ---------------------------------------


async def _handoff(data: bytes, fds: list[int]):
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        await a.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
        return await receive_handoff(b, timeout_s=5)


async def test_handoff_round_trip_and_refusals():
    _need("uffd")
    real = GuestRealRam(1024, "uffd")
    try:
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            await send_handoff(a, real)
            rx = await receive_handoff(b, timeout_s=5)
        try:
            assert rx.info.backend == "uffd" and rx.info.pid == os.getpid() and rx.info.page_count == 1024
            assert rx.info.addr == real.ram.addr and rx.uffd_fd is not None
        finally:
            rx.close()
        good = real.handoff()
        body = good[len(HANDOFF_MAGIC):]
        info = RamHandoff.from_bytes(body)

        with pytest.raises(RealMemoryError, match="sent no RAM handoff"):
            await _handoff(b"\x05\x00\x00\x00" + b"\xc1" * 44, [])            # a frame, not a handoff
        with trio.fail_after(3), pytest.raises(RealMemoryError, match="sent no RAM handoff"):
            await _handoff(b"\x05\x00\x00\x00\xc1", [])  # a short Hello-like frame: refused at once
        with pytest.raises(RealMemoryError, match="must carry 2 file descriptor"):
            await _handoff(good, [real.ram.fd])
        with pytest.raises(RealMemoryError, match="peer is pid"):
            other = RamHandoff(info.addr, 1, info.page_count, "uffd").to_bytes()
            await _handoff(HANDOFF_MAGIC + other, [real.ram.fd, real.uffd.fd])
        r, w = os.pipe()
        try:
            with pytest.raises(RealMemoryError, match="not a userfaultfd"):
                await _handoff(good, [real.ram.fd, r])
        finally:
            os.close(r)
            os.close(w)
        loose = os.memfd_create("unsealed")
        os.ftruncate(loose, 1024 * 4096)
        try:
            with pytest.raises(RealMemoryError, match="F_SEAL_SHRINK"):
                await _handoff(good, [loose, real.uffd.fd])
        finally:
            os.close(loose)
        with pytest.raises(RealMemoryError, match="unknown backend"):
            await _handoff(good[:-16] + b"nope".ljust(16, b"\0"), [real.ram.fd, real.uffd.fd])
    finally:
        real.close()


def test_check_backend():
    check_backend("auto", "uffd")
    check_backend("uffd-async", "uffd-async")
    with pytest.raises(RealMemoryError, match="started with --wp uffd$"):
        check_backend("uffd", "off")
