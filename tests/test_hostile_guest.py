"""A guest that misbehaves at the session level is dropped cleanly, never hangs its host."""

from __future__ import annotations

import numpy as np
import trio

from hintpipe.channel.inproc import inproc_pair
from hintpipe.host.session import HostSession
from hintpipe.protocol import Error, GuestConnection, Hints, StartRound, StopRound, encode
from hintpipe.protocol.codec import FrameDecoder


async def _hello(guest_end, page_count=1 << 12):
    conn = GuestConnection()
    await guest_end.send_frame(conn.hello(page_count, window=8))
    return conn


async def test_guest_that_stops_reading_is_dropped(autojump_clock):
    guest_end, host_end = inproc_pair(16)
    session = HostSession(host_end, send_timeout_s=5)
    async with trio.open_nursery() as n:
        await _hello(guest_end)
        await session.handshake()
        n.start_soon(session.serve)
        await session.start_round()
        cmd_id = session.conn.current_cmd_id
        ranges = np.array([[0, 1]], dtype=np.uint64)
        # never read a single Ack: the host's queue toward us fills, then its send times out
        with trio.move_on_after(60):
            try:
                while not session.closed.is_set():
                    await guest_end.send_frame(encode(Hints(cmd_id, ranges)))
            except trio.ClosedResourceError:
                pass  # the host closed the link on us
            await session.closed.wait()
        assert session.closed.is_set()
    assert "stopped reading" in session.failure
    assert 0 < session.conn.acks_sent <= 16  # bounded by the 16-slot queue toward the guest


async def test_guest_that_withholds_round_end_gets_an_error(autojump_clock):
    guest_end, host_end = inproc_pair(64)
    session = HostSession(host_end)
    got = []

    async def guest():
        dec = FrameDecoder()
        while (data := await guest_end.receive()):
            dec.feed(data)
            while (msg := dec.next_message()) is not None:
                got.append(msg)

    async with trio.open_nursery() as n:
        await _hello(guest_end)
        await session.handshake()
        n.start_soon(session.serve)
        n.start_soon(guest)
        started = 0
        try:
            for _ in range(40):
                await session.start_round()
                started += 1
                await session.stop_round(wait_s=0.01)
        except trio.BrokenResourceError:
            pass
        await trio.sleep(1)
        n.cancel_scope.cancel()
    assert started == 16  # MAX_OPEN_ROUNDS rounds without RoundEnd, then the guest is dropped
    assert "round protocol" in session.failure
    assert sum(isinstance(m, StartRound) for m in got) == 16
    assert sum(isinstance(m, StopRound) for m in got) == 16
    assert isinstance(got[-1], Error)
