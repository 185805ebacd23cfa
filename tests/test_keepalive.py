"""Keepalive (wire-v1 section 9.1): Ping/Pong in the connections, the idle bound of each side,
and the first-frame Bye/Error that closes a connection at once.

Time-dependent tests run on trio's MockClock (``autojump_clock``): a silent peer is given up at
exactly the idle bound, a peer that answers Pings is never given up, and without the feature
nothing changes after the handshake.
"""

from __future__ import annotations

import pytest
import trio

from hintpipe.channel.inproc import inproc_pair
from hintpipe.guest.buddy import BuddyAllocator
from hintpipe.guest.producer import MigrationFailed, Producer
from hintpipe.guest.walker import FreeListWalker
from hintpipe.guest.zonelock import ZoneLock
from hintpipe.host.session import GuestGone, HostSession
from hintpipe.protocol import (
    FEATURE_KEEPALIVE,
    Bye,
    Error,
    ErrorCode,
    GuestConnection,
    Hello,
    HostConnection,
    LocalProtocolError,
    Ping,
    Pong,
    ProtocolError,
    Welcome,
    encode,
)
from hintpipe.protocol.liveness import IdleTimer, IdleVerdict

PAGES = 1 << 12
T = 8.0  # the idle bound of the tests, in (virtual) seconds


def _pair(host_features: int = FEATURE_KEEPALIVE, guest_features: int = FEATURE_KEEPALIVE):
    g, h = GuestConnection(), HostConnection()
    h.receive_data(g.hello(PAGES, window=4, features=guest_features))
    assert isinstance(h.next_event(), Hello)
    g.receive_data(h.welcome(features=host_features))
    assert isinstance(g.next_event(), Welcome)
    return g, h


# ---- the connections ----------------------------------------------------------------------


def test_ping_pong_both_ways():
    g, h = _pair()
    assert g.keepalive and h.keepalive
    for a, b in ((g, h), (h, g)):
        for expect in (0, 1):
            b.receive_data(a.ping())
            assert a.ping_outstanding
            ev = b.next_event()
            assert ev == Ping(expect) and b.ping_to_answer
            a.receive_data(b.pong())
            assert a.next_event() == Pong(expect)
            assert not a.ping_outstanding and not b.ping_to_answer


def test_keepalive_needs_both_sides():
    for host_f, guest_f in ((0, FEATURE_KEEPALIVE), (FEATURE_KEEPALIVE, 0)):
        g, h = _pair(host_f, guest_f)
        assert not g.keepalive and not h.keepalive
        with pytest.raises(LocalProtocolError):
            g.ping()
        h.receive_data(encode(Ping(0)))
        with pytest.raises(ProtocolError) as ei:
            h.next_event()
        assert ei.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_one_ping_at_a_time():
    g, h = _pair()
    g.ping()
    with pytest.raises(LocalProtocolError):
        g.ping()  # the previous one is not answered
    h.receive_data(encode(Ping(5)) + encode(Ping(6)))
    assert h.next_event() == Ping(5)
    with pytest.raises(ProtocolError) as ei:
        h.next_event()
    assert ei.value.code is ErrorCode.CREDIT_EXCEEDED


def test_pong_must_answer_the_outstanding_ping():
    g, h = _pair()
    g.receive_data(encode(Pong(0)))  # the guest sent no Ping
    with pytest.raises(ProtocolError) as ei:
        g.next_event()
    assert ei.value.code is ErrorCode.UNEXPECTED_MESSAGE
    g, h = _pair()
    h.ping()  # seq 0
    h.receive_data(encode(Pong(1)))
    with pytest.raises(ProtocolError) as ei:
        h.next_event()
    assert ei.value.code is ErrorCode.UNEXPECTED_MESSAGE
    with pytest.raises(LocalProtocolError):
        _pair()[0].pong()  # no Ping to answer


def test_idle_timer_verdicts():
    t = IdleTimer(8.0, now=100.0)
    assert t.next_check == 102.0
    assert t.check(101.9) is IdleVerdict.WAIT
    assert t.check(102.0) is IdleVerdict.PING
    assert t.check(103.0) is IdleVerdict.WAIT  # one Ping per silence
    assert t.next_check == 105.0  # checked every quarter bound while the Ping is unanswered
    assert t.check(107.0) is IdleVerdict.WAIT and t.next_check == 108.0  # ... and at the bound
    t.heard(104.0)
    assert t.next_check == 106.0 and t.check(106.0) is IdleVerdict.PING
    assert t.check(111.99) is IdleVerdict.WAIT
    assert t.check(112.0) is IdleVerdict.EXPIRED
    with pytest.raises(ValueError):
        IdleTimer(0, now=0)


# ---- the adapters on a virtual clock ------------------------------------------------------


def _producer(ep, idle: float | None) -> Producer:
    alloc = BuddyAllocator(PAGES)
    walker = FreeListWalker(alloc, min_order=0, batch=8)
    return Producer(ep, walker, ZoneLock(charge_holds=False), PAGES, window=4, idle_timeout_s=idle)


class FakeHost:
    """A host driven by hand from the test: answers Hello, then Pings only while ``answer``."""

    def __init__(self, ep, features: int = FEATURE_KEEPALIVE) -> None:
        self.ep = ep
        self.conn = HostConnection()
        self.features = features
        self.answer = True
        self.got: list = []

    async def run(self, *, welcome: bool = True) -> None:
        while data := await self.ep.receive():
            self.conn.receive_data(data)
            while (ev := self.conn.next_event()) is not None:
                self.got.append((trio.current_time(), ev))
                if isinstance(ev, Hello) and welcome:
                    await self.ep.send_frame(self.conn.welcome(features=self.features))
                elif isinstance(ev, Ping) and self.answer:
                    await self.ep.send_frame(self.conn.pong())


async def test_guest_gives_up_on_a_silent_host_at_the_bound(autojump_clock):
    guest_end, host_end = inproc_pair(16)
    host = FakeHost(host_end)
    host.answer = False  # a stopped host: it read the Hello, then nothing more
    producer = _producer(guest_end, T)
    async with trio.open_nursery() as n:
        n.start_soon(host.run)
        t0 = trio.current_time()
        with pytest.raises(BaseException) as ei:
            await producer.run()
        await trio.sleep(1)  # the fake host reads what the guest sent last
        n.cancel_scope.cancel()
    reason = str(_unwrap(ei.value))
    assert "sent nothing for 8 s" in reason and "idle timeout" in reason
    pings = [t for t, ev in host.got if isinstance(ev, Ping)]
    assert pings == [t0 + T / 4]  # pinged once, after a quarter of the bound
    errors = [(t, ev) for t, ev in host.got if isinstance(ev, Error)]
    assert errors and errors[0][0] == t0 + T and errors[0][1].code == ErrorCode.TIMEOUT


async def test_guest_stays_with_a_live_host_however_long_it_is_quiet(autojump_clock):
    guest_end, host_end = inproc_pair(16)
    host = FakeHost(host_end)
    producer = _producer(guest_end, T)
    ended: list = []

    async def guest():
        try:
            await producer.run()
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            ended.append((trio.current_time(), _unwrap(e)))

    async with trio.open_nursery() as n:
        n.start_soon(host.run)
        n.start_soon(guest)
        await trio.sleep(20 * T)  # no StartRound, no Done: only Pings and Pongs
        assert not ended
        pings = [t for t, ev in host.got if isinstance(ev, Ping)]
        assert len(pings) >= 20 * 4 - 2
        host.answer = False  # now the host stops answering: the guest leaves within the bound
        t_stop = trio.current_time()
        await trio.sleep(T + 0.01)
        (t_end, exc), = ended
        assert t_end <= t_stop + T and "idle timeout" in str(exc)
        n.cancel_scope.cancel()


async def test_guest_bounds_the_wait_for_welcome(autojump_clock):
    guest_end, host_end = inproc_pair(16)
    host = FakeHost(host_end)
    producer = _producer(guest_end, T)
    async with trio.open_nursery() as n:
        n.start_soon(lambda: host.run(welcome=False))
        t0 = trio.current_time()
        with pytest.raises(BaseException) as ei:
            await producer.run()
        assert trio.current_time() - t0 == T
        n.cancel_scope.cancel()
    assert "sent no Welcome" in str(_unwrap(ei.value))


async def test_without_keepalive_the_guest_waits_as_before(autojump_clock):
    guest_end, host_end = inproc_pair(16)
    host = FakeHost(host_end, features=0)  # an old host: no KEEPALIVE
    producer = _producer(guest_end, T)
    async with trio.open_nursery() as n:
        n.start_soon(host.run)
        n.start_soon(producer.run)
        await trio.sleep(50 * T)
        assert producer._silent is None and not any(isinstance(ev, Ping) for _, ev in host.got)
        n.cancel_scope.cancel()


async def _fake_guest(ep, *, answer: bool, features: int = FEATURE_KEEPALIVE, got: list):
    conn = GuestConnection()
    await ep.send_frame(conn.hello(PAGES, window=4, features=features))
    while data := await ep.receive():
        conn.receive_data(data)
        while (ev := conn.next_event()) is not None:
            got.append((trio.current_time(), ev))
            if isinstance(ev, Ping) and answer:
                await ep.send_frame(conn.pong())


@pytest.mark.parametrize("answer", [True, False])
async def test_host_drops_a_silent_guest_at_the_bound(autojump_clock, answer):
    guest_end, host_end = inproc_pair(16)
    session = HostSession(host_end, idle_timeout_s=T)
    got: list = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: _fake_guest(guest_end, answer=answer, got=got))
        await session.handshake()
        t0 = trio.current_time()
        n.start_soon(session.serve)
        await trio.sleep(10 * T)
        if answer:  # a quiet guest that answers Pings is kept
            assert session.failure is None and not session.closed.is_set()
            assert sum(isinstance(ev, Ping) for _, ev in got) >= 10 * 4 - 2
        else:
            assert session.closed.is_set() and "sent nothing for 8 s" in session.failure
            (t_err, err), = [(t, ev) for t, ev in got if isinstance(ev, Error)]
            assert err.code == ErrorCode.TIMEOUT and t_err == t0 + T
        n.cancel_scope.cancel()


async def test_host_keeps_an_old_guest_without_keepalive(autojump_clock):
    guest_end, host_end = inproc_pair(16)
    session = HostSession(host_end, idle_timeout_s=T)
    got: list = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: _fake_guest(guest_end, answer=False, features=0, got=got))
        await session.handshake()
        assert not session.conn.keepalive
        n.start_soon(session.serve)
        await trio.sleep(50 * T)
        assert session.failure is None and not got[1:]  # Welcome only: no Ping, no Error
        n.cancel_scope.cancel()


@pytest.mark.parametrize("first", [Bye("changed my mind"), Error(ErrorCode.INTERNAL, "guest broke")])
async def test_first_frame_bye_or_error_closes_at_once(autojump_clock, first):
    guest_end, host_end = inproc_pair(16)
    session = HostSession(host_end)
    await guest_end.send_frame(encode(first))
    t0 = trio.current_time()
    with pytest.raises(GuestGone, match="before its Hello"):
        await session.handshake()
    assert trio.current_time() == t0  # no timeout was waited for
    assert session.state is None  # nothing was allocated for it


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    assert isinstance(exc, MigrationFailed), repr(exc)
    return exc


async def test_a_trickle_of_bytes_is_not_a_sign_of_life(autojump_clock):
    # silence is measured in complete frames: a guest that sends one byte of a frame now and
    # then, and never a whole one, is dropped at the bound all the same
    guest_end, host_end = inproc_pair(64)
    session = HostSession(host_end, idle_timeout_s=T)
    conn = GuestConnection()
    await guest_end.send_frame(conn.hello(PAGES, window=4, features=FEATURE_KEEPALIVE))
    await session.handshake()
    t0 = trio.current_time()
    partial = encode(Bye("x" * 100))
    async with trio.open_nursery() as n:
        n.start_soon(session.serve)
        for i in range(40):
            await trio.sleep(T / 8)
            if session.closed.is_set():
                break
            await guest_end.send_frame(partial[i:i + 1])
        assert session.closed.is_set() and "sent nothing for 8 s" in session.failure
        assert trio.current_time() - t0 <= T + T / 8
        n.cancel_scope.cancel()
