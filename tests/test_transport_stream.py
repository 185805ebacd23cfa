"""Stream transport (unix/tcp sockets): coalescing, bounded send buffer, fd passing, auth,
addresses, the shared guest region and the tcp memory records."""

from __future__ import annotations

import fcntl
import os
import socket

import numpy as np
import pytest
import trio

from hintpipe.channel.address import AddressError, parse_address
from hintpipe.channel.records import RecordEndpoint, record
from hintpipe.channel.stream import AuthError, auth_client, auth_server, open_stream_endpoint
from hintpipe.paired.mirror import FREE, INIT, WORD, MirroredRegion, MirrorReceiver
from hintpipe.paired.region import OFF_BARRIER_ACK, OFF_BARRIER_REQ, RegionError, SharedRegion
from hintpipe.protocol import Error, ErrorCode, ProtocolError


def _pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)


async def test_frames_arrive_in_order_and_writes_coalesce():
    a, b = _pair()
    frames = [i.to_bytes(4, "little") * 8 for i in range(2000)]
    async with open_stream_endpoint(a) as tx, open_stream_endpoint(b) as rx:
        got = bytearray()

        async def reader():
            want = sum(map(len, frames))
            while len(got) < want:
                got.extend(await rx.receive())

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            for f in frames:
                await tx.send_frame(f)
        assert bytes(got) == b"".join(frames)
        assert tx.stats.frames_sent == 2000
        assert tx.stats.writes < tx.stats.frames_sent  # several frames per write


async def test_backlog_is_written_in_large_chunks_and_the_buffer_is_bounded():
    a, b = _pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    frame = b"x" * 1000
    async with open_stream_endpoint(a, max_buffer=256 * 1024) as tx, open_stream_endpoint(b) as rx:
        sent = 0
        with trio.move_on_after(0.3):  # the peer does not read: send_frame must block
            while True:
                await tx.send_frame(frame)
                sent += 1
                assert len(tx._buf) <= 256 * 1024 + len(frame)
        assert sent * len(frame) < 4 << 20  # blocked long before 4 MiB
        writes_before = tx.stats.writes
        bytes_before = tx.stats.bytes_written
        total = 0
        while total < sent * len(frame):
            total += len(await rx.receive())
        await tx.flush()
        big = (tx.stats.bytes_written - bytes_before) / max(1, tx.stats.writes - writes_before)
        assert big >= 64 * 1024  # the queued backlog left in >= 64 KiB writes


async def test_first_write_carries_the_memfd():
    a, b = _pair()
    reg = SharedRegion.create(2048)
    try:
        reg.versions[7] = 1234
        async with open_stream_endpoint(a, first_fds=[reg.fd]) as g, open_stream_endpoint(b, collect_fds=True) as h:
            await g.send_frame(b"hello")
            assert await h.receive() == b"hello"
            fds = h.take_fds()
            assert len(fds) == 1
            other = SharedRegion.attach(fds[0], 2048)
            assert int(other.versions[7]) == 1234
            other.protect_all()
            assert reg.protect.all()
            other.close()
    finally:
        reg.close()


def test_attach_refuses_unsealed_or_mismatched_memory():
    fd = os.memfd_create("plain", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    with pytest.raises(RegionError, match="SEAL_SHRINK"):
        SharedRegion.attach(fd, 16)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    with pytest.raises(RegionError, match="magic"):
        SharedRegion.attach(fd, 16)
    with pytest.raises(RegionError, match="layout needs"):
        SharedRegion.attach(fd, 1 << 20)
    os.close(fd)
    reg = SharedRegion.create(64)
    with pytest.raises(RegionError, match="Hello said"):
        SharedRegion.attach(os.dup(reg.fd), 32)
    reg.close()


@pytest.mark.parametrize("secret,ok", [(b"correct-secret", True), (b"wrong-secret!", False)])
async def test_tcp_challenge_response(secret, ok):
    a, b = _pair()
    with a, b:
        async with trio.open_nursery() as n:
            n.start_soon(auth_client, a, secret)
            if ok:
                await auth_server(b, b"correct-secret")
            else:
                with pytest.raises(AuthError, match="wrong secret"):
                    await auth_server(b, b"correct-secret")


async def test_auth_demands_the_magic():
    a, b = _pair()
    with a, b:
        await a.send(b"\x05\x00\x00\x00junk")
        with pytest.raises(AuthError, match="requires authentication"):
            await auth_server(b, b"correct-secret")


def test_addresses(monkeypatch):
    monkeypatch.setenv("HINTPIPE_RUNTIME_DIR", "/run/x")
    assert parse_address("unix:/tmp/a.sock").path == "/tmp/a.sock"
    t = parse_address("tcp:127.0.0.1:9000")
    assert (t.host, t.port, t.is_loopback()) == ("127.0.0.1", 9000, True)
    assert not parse_address("tcp:0.0.0.0:1").is_loopback()
    assert parse_address("tcp:[::1]:80").host == "::1"
    assert str(parse_address("tcp:7000")) == "tcp:127.0.0.1:7000"
    assert parse_address("shm:vm1").socket_path == "/run/x/hintpipe-vm1.shm.sock"
    assert parse_address("shm:/tmp/s.sock").socket_path == "/tmp/s.sock"
    for bad in ("vm1", "tcp:host", "tcp:h:99999", "shm:a b", "ftp:x", "unix:" + "x" * 200):
        with pytest.raises(AddressError):
            parse_address(bad)


def test_memory_records_mirror_the_guest_and_reject_overreach():
    sent: list[bytes] = []
    guest = MirroredRegion.mirror(4096, role="guest")
    guest.versions[:10] = 5
    guest.free[100:200] = True
    guest.note_written(np.array([1, 2]))  # before the link: covered by the initial sync
    guest.start_sync(sent.append)
    guest.versions[[3, 4000]] = [9, 7]
    guest.note_written(np.array([3, 4000]))
    guest.set_word(OFF_BARRIER_ACK, 42)  # flushes the writes first
    mirror = MirrorReceiver(send=lambda data: None)
    ep = RecordEndpoint(stream=None, handler=mirror)
    ep._buf += b"".join(sent) + record(0, b"v1-bytes")
    assert ep._parse() == b"v1-bytes"
    host = mirror.region
    assert np.array_equal(host.versions, guest.versions)
    assert np.array_equal(host.free, guest.free)
    assert host.word(OFF_BARRIER_ACK) == 42
    for bad in (record(WORD, (OFF_BARRIER_REQ).to_bytes(4, "little") + b"\1\0\0\0"),  # host-owned word
                record(FREE, b"\0"),  # wrong length
                record(INIT, (4096).to_bytes(8, "little")),  # twice
                record(99)):
        ep._buf += bad
        with pytest.raises(ProtocolError) as info:
            ep._parse()
        assert info.value.code == ErrorCode.MALFORMED_FRAME
        ep._buf.clear()
    ep._buf += bytes([0]) + (1 << 30).to_bytes(4, "little")
    with pytest.raises(ProtocolError) as info:
        ep._parse()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    guest.close()
    host.close()


# ---- an in-process host refuses guests whose memory it cannot use -----------------------


def _host_opts(addr: str):
    from hintpipe.channel.address import parse_address
    from hintpipe.paired.host import HostOptions
    from hintpipe.config import RunConfig

    return HostOptions(address=parse_address(addr), cfg=RunConfig(pages=2048), json=True, handshake_timeout_s=5)


async def _error_after_hello(addr: str, tmp_path, fds=(), wrap=lambda b: b, pages=2048) -> "Error":
    from hintpipe.protocol import FrameDecoder, GuestConnection
    from hintpipe.paired.host import GuestServer
    from hintpipe.channel.address import parse_address
    from hintpipe.channel.stream import connect

    server = GuestServer(_host_opts(addr))
    async with trio.open_nursery() as n:
        await n.start(server.serve)
        sock = await connect(parse_address(addr))
        with sock:
            hello = wrap(GuestConnection().hello(pages, window=4, name="t"))
            if fds:
                await sock.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, __import__("array").array("i", fds))])
            else:
                await sock.send(hello)
            data = b""
            with trio.fail_after(5):
                while chunk := await sock.recv(4096):
                    data += chunk
        n.cancel_scope.cancel()
    if addr.startswith("tcp:"):
        data = data[5:]  # inside a V1 record
    dec = FrameDecoder()
    dec.feed(data)
    return dec.next_message(), server


async def test_unix_hello_without_memfd_is_refused(tmp_path):
    err, server = await _error_after_hello(f"unix:{tmp_path}/h.sock", tmp_path)
    assert err.code == ErrorCode.UNSUPPORTED and "memfd" in err.message
    # a guest that said Hello and was refused counts toward --guests, as a failed guest
    assert server.served == 1
    [rep] = server.reports
    assert rep["status"] == "failed" and "memfd" in rep["reason"] and rep["guest"]["name"] == "t"
    assert not os.path.exists(f"{tmp_path}/h.sock")


async def test_oversized_guest_is_refused_before_anything_is_allocated(tmp_path):
    # 2**33 pages would make the host touch >= 8 GiB of page state: refused by the size cap
    err, server = await _error_after_hello(f"unix:{tmp_path}/h.sock", tmp_path, pages=1 << 33)
    assert err.code == ErrorCode.UNSUPPORTED and "exceeds this host's limit" in err.message
    assert [r["status"] for r in server.reports] == ["failed"] and "migration" not in server.reports[0]


async def test_unix_hello_with_a_pipe_instead_of_a_memfd_is_refused(tmp_path):
    r, w = os.pipe()
    try:
        err, _ = await _error_after_hello(f"unix:{tmp_path}/h.sock", tmp_path, fds=[r])
    finally:
        os.close(r)
        os.close(w)
    assert err.code == ErrorCode.UNSUPPORTED and "memfd" in err.message


async def test_tcp_hello_without_memory_records_is_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err, _ = await _error_after_hello(f"tcp:127.0.0.1:{port}", tmp_path, wrap=lambda b: record(0, b))
    # no INIT record before Hello: the host has no memory to migrate
    assert err.code == ErrorCode.UNSUPPORTED and "INIT" in err.message
