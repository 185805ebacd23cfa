"""The shm transport in one process: setup checks, frames split over slots, EVENT_IDX kick
suppression, a corrupted ring, the peer closing."""

from __future__ import annotations

import os
import socket
from contextlib import asynccontextmanager

import pytest
import trio

from hintpipe.channel.shm import SETUP, SETUP_MAGIC, ShmSetupError, open_shm_guest, open_shm_host
from hintpipe.protocol import ErrorCode, ProtocolError


@asynccontextmanager
async def _link(size=16, slot=4096, event_idx=True):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ga, hb = trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)
    ram = os.memfd_create("ram")
    async with trio.open_nursery() as n:
        host_ep: list = []
        ready = trio.Event()
        done = trio.Event()

        async def host():
            async with open_shm_host(hb) as ep:
                host_ep.append(ep)
                ready.set()
                await done.wait()

        n.start_soon(host)
        async with open_shm_guest(ga, [ram], size=size, slot=slot, event_idx=event_idx) as g:
            await ready.wait()
            try:
                yield g, host_ep[0]
            finally:
                done.set()
    os.close(ram)


async def _read(ep, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await ep.receive()
        assert data, "unexpected end of stream"
        buf += data
    return bytes(buf)


async def test_frames_both_ways_including_frames_longer_than_a_slot():
    async with _link(size=8, slot=4096) as (g, h):
        big = os.urandom(3 * 4096 + 17)  # spans four descriptors
        small = b"abc"
        async with trio.open_nursery() as n:
            n.start_soon(g.send_frame, big)
            assert await _read(h, len(big)) == big
        await h.send_frame(small)
        assert await _read(g, 3) == small
        assert [fd for fd in h.take_fds()]  # the RAM fd came along


@pytest.mark.parametrize("event_idx", [True, False])
async def test_event_idx_suppresses_kicks_of_a_burst(event_idx):
    async with _link(size=128, event_idx=event_idx) as (g, h):
        for i in range(64):  # the host is not reading: the burst fits the queue
            await g.send_frame(i.to_bytes(2, "little"))
        assert await _read(h, 128) == b"".join(i.to_bytes(2, "little") for i in range(64))
        st = g.notify_stats()
        assert st["kicks"] + st["kicks_suppressed"] == 64
        if event_idx:
            assert st["kicks"] == 1  # only the first crossed avail_event
        else:
            assert st["kicks"] == 64 and st["kicks_suppressed"] == 0


async def test_queue_full_blocks_until_the_peer_consumes():
    async with _link(size=4) as (g, h):
        with trio.move_on_after(0.2) as cs:
            for i in range(5):
                await g.send_frame(b"f%d" % i)
        assert cs.cancelled_caught  # the fifth frame had no descriptor
        assert await _read(h, 8) == b"f0f1f2f3"


async def test_corrupted_available_index_is_a_protocol_error():
    async with _link(size=8) as (g, h):
        g._tx._avail[1] = 1000  # the guest (driver) jumps avail.idx far past the queue size
        with pytest.raises(ProtocolError) as info:
            await h.receive()
        assert info.value.code == ErrorCode.MALFORMED_FRAME


async def test_bad_descriptor_length_is_a_protocol_error():
    async with _link(size=8, slot=4096) as (g, h):
        await g.send_frame(b"ok")
        g._tx._desc[0]["len"] = 5000  # longer than a slot
        with pytest.raises(ProtocolError):
            await h.receive()


async def test_peer_close_is_end_of_stream():
    async with _link() as (g, h):
        await g.send_frame(b"last")
        await g.aclose()
        assert await _read(h, 4) == b"last"
        assert await h.receive() == b""


async def test_host_refuses_a_setup_without_the_right_descriptors():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ga, hb = trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)
    with ga:
        await ga.send(SETUP.pack(SETUP_MAGIC, 1, 8, 4096, 1))  # no fds at all
        with pytest.raises(ShmSetupError, match="exactly 6"):
            async with open_shm_host(hb):
                pass
        assert (await ga.recv(100)).startswith(b"HPSHMERR")
