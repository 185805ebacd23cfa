"""The host session stages hints and acks them in batches: the frames handled by the time its
receive buffer runs dry are applied together and acked with one Ack(count)."""

from __future__ import annotations

import numpy as np
import trio

from hintpipe.host.session import HostSession
from hintpipe.protocol import Ack, FrameDecoder, GuestConnection, StartRound, Welcome


class ScriptedEndpoint:
    """Hands the session prepared chunks of bytes, one per receive(); records what it sends."""

    def __init__(self) -> None:
        self.incoming: trio.MemorySendChannel
        self.incoming, self._rx = trio.open_memory_channel(100)
        self.sent: list[bytes] = []
        self.frames_sent = trio.Event()

    async def send_frame(self, frame: bytes) -> None:
        self.sent.append(frame)
        self.frames_sent.set()

    async def receive(self) -> bytes:
        return await self._rx.receive()

    async def aclose(self) -> None:
        pass

    def messages(self) -> list:
        dec = FrameDecoder()
        for f in self.sent:
            dec.feed(f)
        out = []
        while (m := dec.next_message()) is not None:
            out.append(m)
        return out


def hints_frames(guest: GuestConnection, cmd_id: int, n_frames: int, per_frame: int) -> tuple[bytes, np.ndarray]:
    """``n_frames`` Hints frames of ``per_frame`` order-3 blocks, pages 0.. in order."""
    starts = np.arange(n_frames * per_frame, dtype=np.uint64) * 8
    out = b"".join(guest.hints(cmd_id, np.column_stack((starts[i:i + per_frame], np.full(per_frame, 8, np.uint64))))
                   for i in range(0, len(starts), per_frame))
    return out, starts


async def _in_a_round(ep: ScriptedEndpoint) -> tuple[HostSession, GuestConnection, int]:
    """A session past its handshake with a round started, and the guest's connection in it."""
    session = HostSession(ep)
    guest = GuestConnection()
    await ep.incoming.send(guest.hello(1 << 16, window=64))
    await session.handshake()
    guest.receive_data(ep.sent[-1])
    assert isinstance(guest.next_event(), Welcome)
    session.state.begin_first_round()
    cmd_id = await session.start_round()
    guest.receive_data(ep.sent[-1])
    assert isinstance(guest.next_event(), StartRound)
    return session, guest, cmd_id


async def test_frames_read_together_are_acked_once_and_applied_before_reads():
    ep = ScriptedEndpoint()
    async with trio.open_nursery() as nursery:
        session, guest, cmd_id = await _in_a_round(ep)
        nursery.start_soon(session.serve)
        n_before = len(ep.sent)
        data, starts = hints_frames(guest, cmd_id, n_frames=10, per_frame=32)
        await ep.incoming.send(data)  # ten frames in one read, as a stream transport delivers them
        with trio.fail_after(5):
            while not any(isinstance(m, Ack) for m in ep.messages()[n_before:]):
                await trio.sleep(0)
        acks = [m for m in ep.messages()[n_before:] if isinstance(m, Ack)]
        assert [a.count for a in acks] == [10]
        assert session.conn.unacked == 0
        guest.receive_data(ep.sent[-1])
        assert guest.next_event() == Ack(10) and guest.in_flight == 0
        state = session.state
        # the ten frames were staged as they were parsed and applied together once the buffer ran
        # dry, before their Ack: a hint waits no longer than its read (staged longer, more hints
        # would be refused for pages the guest writes meanwhile)
        assert state.staged_blocks == 0
        assert state.count_skip() == 320 * 8
        await ep.incoming.send(b"")  # the guest leaves
    assert session.failure == "guest closed the connection"


async def test_frames_read_one_by_one_are_acked_one_by_one():
    ep = ScriptedEndpoint()
    async with trio.open_nursery() as nursery:
        session, guest, cmd_id = await _in_a_round(ep)
        nursery.start_soon(session.serve)
        n_before = len(ep.sent)
        starts = np.arange(3, dtype=np.uint64) * 1024
        for i, s in enumerate(starts):
            await ep.incoming.send(guest.hints(cmd_id, np.array([[s, 1024]], dtype=np.uint64)))
            with trio.fail_after(5):
                while len([m for m in ep.messages()[n_before:] if isinstance(m, Ack)]) < i + 1:
                    await trio.sleep(0)
        assert [m.count for m in ep.messages()[n_before:] if isinstance(m, Ack)] == [1, 1, 1]
        assert session.state.count_skip() == 3 * 1024
        await ep.incoming.send(b"")
