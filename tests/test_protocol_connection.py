"""Host/guest state machines of wire protocol v1: handshake, rounds and command ids, credits,
faults, close and error flow, fuzzing."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hintpipe.protocol import (
    CMD_ID_BASE,
    MAX_OUTSTANDING_FAULTS,
    Ack,
    Bye,
    ConnectionClosed,
    ConnState,
    Done,
    Error,
    ErrorCode,
    Fault,
    FaultDone,
    GuestConnection,
    Hello,
    Hints,
    HostConnection,
    LocalProtocolError,
    ProtocolError,
    RoundEnd,
    StaleHints,
    StartRound,
    StopRound,
    Welcome,
    decode,
    encode,
)

PAGES = 1 << 18  # 1 GiB guest
A = CMD_ID_BASE
RANGES = np.array([[0, 512], [1024, 512]], dtype=np.uint64)


def raw_frame(obj) -> bytes:
    payload = msgpack.packb(obj, use_bin_type=True)
    return struct.pack("<I", len(payload)) + payload


def hints_frame(cmd_id: int, pairs) -> bytes:
    return encode(Hints(cmd_id, np.array(pairs, dtype=np.uint64)))


def events(conn, data: bytes) -> list:
    conn.receive_data(data)
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def fails(conn, data: bytes) -> ErrorCode:
    conn.receive_data(data)
    with pytest.raises(ProtocolError) as ei:
        while conn.next_event() is not None:
            pass
    assert conn.state is ConnState.ERROR
    return ei.value.code


def pair(window: int = 4, max_ranges: int = 32) -> tuple[GuestConnection, HostConnection]:
    g, h = GuestConnection(), HostConnection()
    assert [type(e) for e in events(h, g.hello(PAGES, window=window, name="vm"))] == [Hello]
    assert h.state is ConnState.HELLO_RECEIVED
    assert events(g, h.welcome(max_ranges=max_ranges)) == [Welcome(1, max_ranges, window, 0)]
    assert g.state is ConnState.READY and h.state is ConnState.READY
    return g, h


def host_ready(window: int = 4, max_ranges: int = 32) -> HostConnection:
    h = HostConnection()
    events(h, encode(Hello(1, 4096, PAGES, window, 0, "raw")))
    h.welcome(max_ranges=max_ranges)
    return h


# ---- handshake -----------------------------------------------------------------------------


def test_handshake_and_window_negotiation():
    g, h = GuestConnection(), HostConnection()
    events(h, g.hello(PAGES, window=64, features=0b101))
    with pytest.raises(LocalProtocolError):
        h.welcome(window=65)  # larger than the guest asked for
    events(g, h.welcome(max_ranges=128, window=16, features=0b111))
    # the guest's offer and the host's, intersected; bit 2 is no feature of v1, so never in force
    assert (g.window, g.max_ranges, g.features) == (16, 128, 0b001)
    assert g.keepalive and h.keepalive
    assert (h.window, h.page_count) == (16, PAGES)
    assert g.credits_available == 16 and not g.can_send_hints  # no round yet


@pytest.mark.parametrize(
    "first",
    [encode(Ack(1)), hints_frame(A, [[0, 1]]), encode(RoundEnd(A, 0)), encode(Welcome(1, 1, 1, 0))],
)
def test_anything_before_hello_is_unexpected(first):
    assert fails(HostConnection(), first) is ErrorCode.UNEXPECTED_MESSAGE


def test_bad_version_and_page_size():
    assert fails(HostConnection(), raw_frame([1, 2, 4096, PAGES, 4, 0, ""])) is ErrorCode.BAD_VERSION
    assert fails(HostConnection(), raw_frame([1, 1, 2 << 20, PAGES, 4, 0, ""])) is ErrorCode.UNSUPPORTED


def test_traffic_before_welcome_is_unexpected():
    h = HostConnection()
    events(h, encode(Hello(1, 4096, PAGES, 4, 0, "")))
    assert fails(h, encode(Hello(1, 4096, PAGES, 4, 0, ""))) is ErrorCode.UNEXPECTED_MESSAGE
    g = GuestConnection()
    g.hello(PAGES)
    assert fails(g, encode(StartRound(A))) is ErrorCode.UNEXPECTED_MESSAGE


def test_guest_rejects_bad_welcome():
    g = GuestConnection()
    g.hello(PAGES, window=8)
    assert fails(g, encode(Welcome(1, 32, 9, 0))) is ErrorCode.BAD_FIELD
    g = GuestConnection()
    g.hello(PAGES, window=8)
    assert fails(g, encode(Welcome(1, 32, 8, 1))) is ErrorCode.BAD_FIELD  # feature not offered


def test_wrong_direction_is_unexpected():
    g, h = pair()
    assert fails(h, encode(StartRound(A))) is ErrorCode.UNEXPECTED_MESSAGE
    assert fails(g, hints_frame(A, [[0, 1]])) is ErrorCode.UNEXPECTED_MESSAGE


# ---- rounds and command ids -----------------------------------------------------------------


def test_full_round():
    g, h = pair()
    assert events(g, h.start_round()) == [StartRound(A)]
    assert g.active_cmd_id == A and h.current_cmd_id == A and g.can_send_hints
    [ev] = events(h, g.hints(A, RANGES))
    assert ev == Hints(A, RANGES)
    assert (h.hints_frames, h.hints_ranges) == (1, 2)
    assert events(g, h.ack(1)) == [Ack(1)]
    assert events(h, g.round_end(A)) == [RoundEnd(A, 1)]
    assert h.current_cmd_id is None and g.active_cmd_id is None and not h.open_rounds
    events(g, h.start_round())
    assert g.active_cmd_id == A + 1


def test_stale_hints_are_reported_and_still_need_an_ack():
    g, h = pair()
    events(g, h.start_round())
    in_flight = [g.hints(A, RANGES), g.hints(A, RANGES[:1])]  # sent before StopRound arrives
    stop = h.stop_round()
    assert h.current_cmd_id is None and A in h.open_rounds
    assert [type(e) for e in events(h, in_flight[0] + in_flight[1])] == [StaleHints, StaleHints]
    assert (h.stale_frames, h.stale_ranges, h.hints_frames) == (2, 3, 0)
    assert h.unacked == 2
    assert events(g, stop) == [StopRound(A)]
    assert g.active_cmd_id is None and g.open_rounds == {A}
    with pytest.raises(LocalProtocolError) as ei:
        g.hints(A, RANGES)  # stopped: nothing more under A
    assert ei.value.code is ErrorCode.UNKNOWN_COMMAND_ID
    assert events(h, g.round_end(A)) == [RoundEnd(A, 2)]
    assert events(g, h.ack(2)) == [Ack(2)] and g.in_flight == 0


def test_stale_hints_are_still_validated():
    g, h = pair()
    events(g, h.start_round())
    h.stop_round()
    assert fails(h, hints_frame(A, [[PAGES, 1]])) is ErrorCode.RANGE_OUT_OF_BOUNDS


def test_never_issued_id_rejected():
    g, h = pair()
    events(g, h.start_round())
    assert fails(h, hints_frame(A + 1, [[0, 1]])) is ErrorCode.UNKNOWN_COMMAND_ID
    _, h = pair()
    assert fails(h, hints_frame(A, [[0, 1]])) is ErrorCode.UNKNOWN_COMMAND_ID


def test_hints_after_round_end_rejected():
    g, h = pair()
    events(g, h.start_round())
    events(h, g.hints(A, RANGES))
    events(h, g.round_end(A))
    assert fails(h, hints_frame(A, [[0, 1]])) is ErrorCode.UNKNOWN_COMMAND_ID


def test_round_end_checks():
    g, h = pair()
    events(g, h.start_round())
    assert fails(h, encode(RoundEnd(A + 7, 0))) is ErrorCode.UNKNOWN_COMMAND_ID
    g, h = pair()
    events(g, h.start_round())
    events(h, g.hints(A, RANGES))
    assert fails(h, encode(RoundEnd(A, 2))) is ErrorCode.BAD_FIELD  # host saw 1 batch
    g, h = pair()
    events(g, h.start_round())
    events(h, g.round_end(A))
    assert fails(h, encode(RoundEnd(A, 0))) is ErrorCode.UNKNOWN_COMMAND_ID  # twice


def test_ids_must_increase():
    g, h = pair()
    events(g, h.start_round(A + 10))
    h.stop_round()
    for bad in (A + 10, A + 3, 5, 2**32):
        with pytest.raises(LocalProtocolError):
            h.start_round(bad)
    h.start_round(A + 11)
    with pytest.raises(LocalProtocolError):
        h.start_round(A + 12)  # previous round still active
    # guest side: a host that reuses or lowers ids is rejected
    g2, _ = pair()
    events(g2, encode(StartRound(A + 5)))
    events(g2, encode(StopRound(A + 5)))
    assert fails(g2, encode(StartRound(A + 5))) is ErrorCode.BAD_FIELD
    g3, _ = pair()
    assert fails(g3, encode(StartRound(1))) is ErrorCode.BAD_FIELD


def test_stop_round_crossing_round_end():
    g, h = pair()
    events(g, h.start_round())
    end = g.round_end(A)  # guest finished its walk ...
    stop = h.stop_round()  # ... while the host stops the round
    assert events(g, stop) == [StopRound(A)]  # harmless; no second RoundEnd owed
    assert not g.open_rounds
    with pytest.raises(LocalProtocolError):
        g.round_end(A)
    assert events(h, end) == [RoundEnd(A, 0)]
    assert not h.open_rounds


def test_guest_rejects_stop_of_unknown_round():
    g, _ = pair()
    assert fails(g, encode(StopRound(A))) is ErrorCode.UNKNOWN_COMMAND_ID


def test_open_rounds_are_bounded():
    g, h = pair()
    for _ in range(16):
        h.start_round()
        h.stop_round()
    with pytest.raises(LocalProtocolError):
        h.start_round()


# ---- credits -------------------------------------------------------------------------------


def test_guest_credit_limit_is_local():
    g, h = pair(window=2)
    events(g, h.start_round())
    frames = [g.hints(A, RANGES), g.hints(A, RANGES)]
    assert g.credits_available == 0 and not g.can_send_hints
    with pytest.raises(LocalProtocolError) as ei:
        g.hints(A, RANGES)
    assert ei.value.code is ErrorCode.CREDIT_EXCEEDED
    events(h, b"".join(frames))
    events(g, h.ack(1))
    assert g.credits_available == 1
    g.hints(A, RANGES)


def test_host_detects_credit_exceeded():
    h = host_ready(window=2)
    h.start_round()
    two = hints_frame(A, [[0, 1]]) * 2
    assert len(events(h, two)) == 2
    assert fails(h, hints_frame(A, [[0, 1]])) is ErrorCode.CREDIT_EXCEEDED


def test_ack_accounting():
    h = host_ready(window=4)
    h.start_round()
    events(h, hints_frame(A, [[0, 1]]))
    with pytest.raises(LocalProtocolError):
        h.ack(2)
    g, _ = pair()
    assert fails(g, encode(Ack(1))) is ErrorCode.BAD_FIELD  # nothing in flight


def test_batch_too_large():
    h = host_ready(max_ranges=2)
    h.start_round()
    assert fails(h, hints_frame(A, [[0, 1], [1, 1], [2, 1]])) is ErrorCode.BATCH_TOO_LARGE
    g, h = pair(max_ranges=2)
    events(g, h.start_round())
    with pytest.raises(LocalProtocolError) as ei:
        g.hints(A, np.array([[0, 1], [1, 1], [2, 1]], dtype=np.uint64))
    assert ei.value.code is ErrorCode.BATCH_TOO_LARGE


def test_guest_validates_ranges_locally():
    g, h = pair()
    events(g, h.start_round())
    with pytest.raises(LocalProtocolError) as ei:
        g.hints(A, np.array([[1, 2]], dtype=np.uint64))
    assert ei.value.code is ErrorCode.RANGE_UNALIGNED
    assert g.in_flight == 0  # nothing was emitted


# ---- faults and done ---------------------------------------------------------------------


def test_fault_flow():
    g, h = pair()
    [ev] = events(h, g.fault(1, [3, 9]))
    assert ev == Fault(1, np.array([3, 9], dtype=np.uint64))
    assert h.outstanding_faults == {1}
    assert events(g, h.fault_done(1)) == [FaultDone(1)]
    assert not g.outstanding_faults and not h.outstanding_faults
    with pytest.raises(LocalProtocolError):
        g.fault(2, [PAGES])
    assert fails(g, encode(FaultDone(5))) is ErrorCode.UNEXPECTED_MESSAGE


def test_fault_checks_on_host():
    h = host_ready()
    assert fails(h, encode(Fault(1, np.array([PAGES], dtype=np.uint64)))) is ErrorCode.RANGE_OUT_OF_BOUNDS
    h = host_ready()
    events(h, encode(Fault(1, np.array([0], dtype=np.uint64))))
    assert fails(h, encode(Fault(1, np.array([0], dtype=np.uint64)))) is ErrorCode.BAD_FIELD
    h = host_ready()
    many = b"".join(encode(Fault(i, np.array([i], dtype=np.uint64))) for i in range(MAX_OUTSTANDING_FAULTS))
    assert len(events(h, many)) == MAX_OUTSTANDING_FAULTS
    assert fails(h, encode(Fault(999, np.array([0], dtype=np.uint64)))) is ErrorCode.CREDIT_EXCEEDED


def test_done_flow():
    g, h = pair()
    events(g, h.start_round())
    with pytest.raises(LocalProtocolError):
        h.done(True, {})  # round still active
    stop = h.stop_round()
    done = h.done(True, {"pages_sent": 10})
    assert h.state is ConnState.DONE
    with pytest.raises(LocalProtocolError):
        h.start_round()
    assert events(g, stop + done) == [StopRound(A), Done(True, {"pages_sent": 10})]
    assert g.state is ConnState.DONE and not g.can_send_hints
    assert events(h, g.round_end(A)) == [RoundEnd(A, 0)]  # still owed after Done
    assert events(h, g.bye("done")) == [Bye("done")]
    assert events(h, b"") == [ConnectionClosed(clean=True)]
    assert h.next_event() is None and h.state is ConnState.CLOSED


# ---- close and errors ----------------------------------------------------------------------


def test_error_flow():
    g, h = pair()
    with pytest.raises(ProtocolError) as ei:
        events(h, raw_frame([99]))
    # the connection stays poisoned ...
    for _ in range(2):
        with pytest.raises(ProtocolError):
            h.next_event()
    with pytest.raises(LocalProtocolError):
        h.start_round()
    # ... and the adapter sends Error then closes
    out = h.error(ei.value.code, ei.value.message)
    assert decode(out) == Error(ErrorCode.UNKNOWN_MESSAGE, ei.value.message)
    with pytest.raises(LocalProtocolError):
        h.error(1, "twice")
    assert events(g, out) == [Error(ErrorCode.UNKNOWN_MESSAGE, ei.value.message)]
    assert g.state is ConnState.CLOSED and g.peer_closed
    assert fails(g, encode(Ack(1))) is ErrorCode.UNEXPECTED_MESSAGE  # nothing after Error


def test_bye_then_eof():
    g, h = pair()
    assert events(g, h.bye("shutting down")) == [Bye("shutting down")]
    with pytest.raises(LocalProtocolError):
        h.start_round()
    with pytest.raises(LocalProtocolError):
        g.hints(A, RANGES)
    g.bye("ok")
    assert events(g, b"") == [ConnectionClosed(clean=True)]
    assert g.next_event() is None


def test_eof_without_bye_and_truncated():
    g, h = pair()
    assert events(h, b"") == [ConnectionClosed(clean=False)]
    g, h = pair()
    h.receive_data(g.bye("x")[:-1])
    assert fails(h, b"") is ErrorCode.MALFORMED_FRAME


def test_one_byte_at_a_time_session():
    g, h = pair(window=8)
    stream = [h.start_round()]
    g.receive_data(stream[0])
    g.next_event()
    gdata = g.hints(A, RANGES) + g.hints(A, RANGES[1:]) + g.fault(3, [1, 2]) + g.round_end(A) + g.bye("b")
    got = []
    for i in range(len(gdata)):
        h.receive_data(gdata[i : i + 1])
        while (ev := h.next_event()) is not None:
            got.append(ev)
    assert [type(e) for e in got] == [Hints, Hints, Fault, RoundEnd, Bye]
    assert got[3] == RoundEnd(A, 2)


# ---- fuzzing: a hostile guest gets ProtocolError and nothing else ---------------------------

FUZZ = settings(max_examples=80, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])

field = st.one_of(
    st.integers(-2, 2**33),
    st.sampled_from([A, A + 1, 0, 1, 2**40]),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
    st.binary(max_size=64),
    st.lists(st.integers(0, 9), max_size=3),
)
frames = st.lists(
    st.one_of(
        st.builds(lambda t, f: raw_frame([t, *f]), st.integers(0, 13), st.lists(field, max_size=7)),
        st.builds(
            lambda c, pairs: hints_frame(c, pairs),
            st.sampled_from([A, A + 1]),
            st.lists(st.tuples(st.integers(0, PAGES + 8), st.sampled_from([1, 2, 3, 512])), min_size=1, max_size=5),
        ),
        st.binary(max_size=24),
    ),
    max_size=8,
)


@FUZZ
@given(frames, st.booleans(), st.booleans())
def test_fuzz_host_only_protocol_errors(seq, handshake, eof):
    h = host_ready(window=3) if handshake else HostConnection()
    if handshake:
        h.start_round()
    try:
        for data in seq:
            h.receive_data(data)
            while h.next_event() is not None:
                pass
        if eof:
            events(h, b"")
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert h.state is ConnState.ERROR
        decode(h.error(exc.code, exc.message))  # the answer is always encodable


@FUZZ
@given(frames)
def test_fuzz_guest_only_protocol_errors(seq):
    g, _ = pair()
    try:
        for data in seq:
            events(g, data)
    except ProtocolError:
        assert g.state is ConnState.ERROR


@settings(max_examples=40, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(["start", "stop", "hint", "end", "ack"]), max_size=40))
def test_random_valid_sessions_stay_in_sync(ops):
    """Any sequence of allowed calls keeps both sides' bookkeeping equal once delivered."""
    g, h = pair(window=3)
    for op in ops:
        if op == "start" and h.current_cmd_id is None and len(h.open_rounds) < 16:
            events(g, h.start_round())
        elif op == "stop" and h.current_cmd_id is not None:
            events(g, h.stop_round())
        elif op == "hint" and g.can_send_hints:
            events(h, g.hints(g.active_cmd_id, RANGES))
        elif op == "end" and g.open_rounds:
            events(h, g.round_end(min(g.open_rounds)))
        elif op == "ack" and h.unacked:
            events(g, h.ack(h.unacked))
        assert g.in_flight == h.unacked
        assert g.open_rounds == h.open_rounds
        assert g.active_cmd_id == h.current_cmd_id


def test_hints_without_an_active_round_is_refused_locally():
    # found by fuzzing: hints(None, ...) with no round used to raise KeyError
    g = GuestConnection()
    g.hello(PAGES, window=4)
    events(g, encode(Welcome(1, 32, 4, 0)))
    with pytest.raises(LocalProtocolError) as ei:
        g.hints(None, [[0, 1]])
    assert ei.value.code is ErrorCode.UNKNOWN_COMMAND_ID
