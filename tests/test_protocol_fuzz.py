"""Structure-aware fuzzing of wire v1's receivers: nothing a peer sends raises anything but
ProtocolError.

- The decoder gets frames built from every message's fields, with fields replaced by values of
  the wrong type or at and past their limits, fields added or dropped, bytes flipped, cut or
  inserted, length prefixes lied about, all split at arbitrary points.
- Both connection state machines get well-formed messages of every type in any order, with
  fields around their limits, mixed with the local side's own actions: a received message may
  only produce an event or a ProtocolError (after which the connection stays in ERROR), and the
  bounds the checks exist for (credits, open rounds, outstanding faults) hold after every step.
- The tcp record layer and the host's memory mirror get random records.
- The corpus in ``tests/data/malformed`` (every field at and past its limit, msgpack size limits,
  valid messages in refused orders) gives exactly the listed error in its context, and no other
  exception in any context.

Runs are seeded (``derandomize=True``) and bounded (``max_examples``; ``HINTPIPE_FUZZ_SCALE``
multiplies them). With ``HINTPIPE_FUZZ_REPORT=FILE`` the number of frames fuzzed is written to
FILE (the README's figure comes from that).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hintpipe.channel.records import REC, RecordEndpoint
from hintpipe.paired.mirror import MirrorReceiver
from hintpipe.protocol import (
    CMD_ID_BASE,
    FEATURE_KEEPALIVE,
    MAX_OUTSTANDING_FAULTS,
    MAX_OPEN_ROUNDS,
    ConnState,
    ErrorCode,
    FrameDecoder,
    GuestConnection,
    Hello,
    HostConnection,
    LocalProtocolError,
    ProtocolError,
    encode,
)
from hintpipe.protocol.messages import Message, MessageType

CORPUS = Path(__file__).parent / "data" / "malformed"
SCALE = max(1, int(os.environ.get("HINTPIPE_FUZZ_SCALE", "1")))
FRAMES: Counter = Counter()  # frames fed to a receiver, per fuzz test
PAGES = 262144
U32 = 2**32 - 1


def fuzz_settings(n: int):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _report_frames():
    yield
    out = os.environ.get("HINTPIPE_FUZZ_REPORT")
    if out:
        Path(out).write_text(json.dumps({"scale": SCALE, "frames": dict(FRAMES), "total": sum(FRAMES.values())}) + "\n")


# ---- frames from fields ---------------------------------------------------------------------

def _around(*limits: int) -> st.SearchStrategy[int]:
    """Integers at, just below and just past each limit, and anything in between."""
    edges = {v for x in limits for v in (x - 1, x, x + 1)} | {-1, 0, 1, U32, U32 + 1, 2**63, 2**64 - 1}
    edges = sorted(v for v in edges if -(2**63) <= v < 2**64)  # what msgpack can carry
    return st.one_of(st.sampled_from(edges), st.integers(min(edges), max(edges)))


U32_FIELD = _around(0, CMD_ID_BASE, U32)
WRONG = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=24),
                  st.lists(st.integers(0, 10), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
                  st.integers(-(2**63), 2**64 - 1))


def _ranges(max_n: int = 40) -> st.SearchStrategy[bytes]:
    block = st.tuples(st.integers(0, 20), st.integers(0, PAGES)).map(lambda t: (t[1] >> t[0] << t[0], 1 << t[0]))
    raw = st.tuples(_around(0, PAGES, 2**40, 2**64 - 2**20), _around(0, 1, 2**20, 2**21))
    pairs = st.lists(st.one_of(block, raw), min_size=0, max_size=max_n)
    return pairs.map(lambda ps: b"".join(struct.pack("<QQ", s % 2**64, n % 2**64) for s, n in ps))


TEXT = st.one_of(st.text(max_size=70), st.integers(0, 3).map(lambda k: "x" * (4095 + k)))
FIELDS: dict[int, list[st.SearchStrategy]] = {
    1: [st.sampled_from([1, 1, 1, 0, 2]), st.sampled_from([4096, 4096, 8192]), _around(1, PAGES, 2**40),
        _around(1, 4096), st.sampled_from([0, FEATURE_KEEPALIVE, U32, U32 + 1]), st.text(max_size=66)],
    2: [st.sampled_from([1, 1, 2]), _around(1, 32, 4096), _around(1, 4, 4096), st.sampled_from([0, FEATURE_KEEPALIVE, 2, U32])],
    3: [U32_FIELD], 4: [U32_FIELD],
    5: [U32_FIELD, st.one_of(_ranges(), st.binary(max_size=40))],
    6: [U32_FIELD, _around(0, 1, U32)],
    7: [_around(1, 4, 4096)],
    8: [_around(0, 64, U32), st.lists(_around(0, PAGES - 1, PAGES), min_size=0, max_size=8).map(
        lambda v: b"".join(struct.pack("<Q", x % 2**64) for x in v))],
    9: [_around(0, U32)],
    10: [st.booleans(), st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                                               st.floats(), st.text(max_size=4)),
                                     lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=3), c, max_size=3)),
                                     max_leaves=12)],
    11: [_around(1, 15, U32), TEXT], 12: [TEXT],
    13: [_around(0, U32)], 14: [_around(0, U32)],
}


@st.composite
def payload_objects(draw):
    """``[type, *fields]`` of a message type (or an unknown one), fields mostly well-typed."""
    mtype = draw(st.one_of(st.sampled_from(sorted(FIELDS)), _around(0, 15)))
    fields = [draw(s) for s in FIELDS.get(mtype, [])]
    if fields and draw(st.integers(0, 3)) == 0:
        fields[draw(st.integers(0, len(fields) - 1))] = draw(WRONG)
    k = draw(st.integers(0, 9))
    if k == 0:
        fields.append(draw(WRONG))
    elif k == 1 and fields:
        fields.pop()
    return [mtype, *fields]


@st.composite
def frames(draw):
    """One frame's bytes: a packed payload object, maybe damaged, maybe with a lying prefix."""
    payload = msgpack.packb(draw(payload_objects()), use_bin_type=True)
    damage = draw(st.integers(0, 6))
    if damage == 0 and payload:
        i = draw(st.integers(0, len(payload) - 1))
        payload = payload[:i] + bytes([draw(st.integers(0, 255))]) + payload[i + 1:]
    elif damage == 1:
        payload = payload[:draw(st.integers(0, len(payload)))]
    elif damage == 2:
        i = draw(st.integers(0, len(payload)))
        payload = payload[:i] + draw(st.binary(min_size=1, max_size=8)) + payload[i:]
    n = len(payload)
    if draw(st.integers(0, 9)) == 0:
        n = draw(_around(0, n, 1 << 20, U32)) % 2**32
    return struct.pack("<I", n) + payload


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points[:-1], points[1:])]


@fuzz_settings(300)
@given(st.lists(frames(), min_size=1, max_size=5), st.lists(st.integers(0, 10**6), max_size=6))
def test_decoder_raises_only_protocol_errors(stream, cuts):
    data = b"".join(stream)
    FRAMES["decoder"] += len(stream)
    dec = FrameDecoder()
    try:
        for part in _splits(data, cuts):
            dec.feed(part)
            while (msg := dec.next_message()) is not None:
                assert encode(msg)  # whatever decodes is a message the codec can send back
        dec.eof()
    except ProtocolError as e:
        assert isinstance(e.code, ErrorCode)
        with pytest.raises(ProtocolError):  # poisoned: the same error again
            dec.next_message()


# ---- both state machines --------------------------------------------------------------------

def _blocks(max_n: int) -> st.SearchStrategy[bytes]:
    """Aligned, disjoint blocks inside the guest: Hints a host accepts."""
    def pack(picks):
        out, used = [], set()
        for k, i in picks:
            start = (i << k) % PAGES
            if all(start + (1 << k) <= s or e <= start for s, e in used):
                used.add((start, start + (1 << k)))
                out.append(struct.pack("<QQ", start, 1 << k))
        return b"".join(out) or struct.pack("<QQ", 0, 1)
    return st.lists(st.tuples(st.integers(0, 9), st.integers(0, 600)), min_size=1, max_size=max_n).map(pack)


def _frame_of(obj) -> bytes:
    p = msgpack.packb(obj, use_bin_type=True)
    return struct.pack("<I", len(p)) + p


def _bursts() -> st.SearchStrategy[bytes]:
    """Many frames of one kind at once: enough to reach the credit, fault and round limits."""
    cmd = st.integers(CMD_ID_BASE, CMD_ID_BASE + 3)
    return st.one_of(
        st.builds(lambda s, n: b"".join(_frame_of([8, s + i, struct.pack("<Q", i)]) for i in range(n)),
                  st.integers(0, 10), st.sampled_from([2, 63, 64, 65, 80])),
        st.builds(lambda c, r, n: b"".join(_frame_of([5, c, r]) for _ in range(n)), cmd, _blocks(4),
                  st.sampled_from([2, 4, 5, 9])),
        st.builds(lambda c, n: b"".join(_frame_of([3, c + i]) + _frame_of([4, c + i]) for i in range(n)),
                  cmd, st.sampled_from([2, 15, 16, 17])),
        st.builds(lambda n: b"".join(_frame_of([7, 1]) for _ in range(n)), st.sampled_from([2, 4, 5])),
    )


def _valid_frames() -> st.SearchStrategy[bytes]:
    """Well-formed frames of every message type, with cmd ids near the ones a host issues."""
    cmd = st.one_of(st.integers(CMD_ID_BASE, CMD_ID_BASE + 3), st.integers(CMD_ID_BASE, CMD_ID_BASE + 20),
                    U32_FIELD.filter(lambda v: 0 <= v <= U32))
    small_ranges = st.one_of(_blocks(6), _ranges(6).filter(lambda b: len(b) > 0))
    objs = st.one_of(
        st.builds(lambda pc, w, f: [1, 1, 4096, pc, w, f, "g"], st.sampled_from([1, 4096, PAGES, 2**40]),
                  st.integers(1, 8), st.sampled_from([0, FEATURE_KEEPALIVE])),
        st.builds(lambda m, w, f: [2, 1, m, w, f], st.integers(1, 64), st.integers(1, 8), st.sampled_from([0, FEATURE_KEEPALIVE, 2])),
        st.builds(lambda c: [3, c], cmd), st.builds(lambda c: [4, c], cmd),
        st.builds(lambda c, r: [5, c, r], cmd, small_ranges),
        st.builds(lambda c, b: [6, c, b], cmd, st.integers(0, 6)),
        st.builds(lambda n: [7, n], st.integers(1, 6)),
        st.builds(lambda s, p: [8, s, p], st.integers(0, 100), st.lists(st.integers(0, PAGES), min_size=1, max_size=4).map(
            lambda v: b"".join(struct.pack("<Q", x) for x in v))),
        st.builds(lambda s: [9, s], st.integers(0, 70)),
        st.builds(lambda ok: [10, ok, {"lost_pages": 0}], st.booleans()),
        st.builds(lambda c: [11, c, "boom"], st.integers(1, 20)), st.just([12, "bye"]),
        st.builds(lambda s: [13, s], st.integers(0, 3)), st.builds(lambda s: [14, s], st.integers(0, 3)),
    )
    return st.one_of(objs.map(_frame_of), _bursts())


HOST_ACTIONS = ["welcome", "start_round", "stop_round", "ack", "fault_done", "done", "ping", "pong", "bye", "error"]
GUEST_ACTIONS = ["hello", "hints", "round_end", "fault", "ping", "pong", "bye", "error"]


def _local(conn, action: str, arg: int) -> None:
    """One local action with a plausible argument; refusals (LocalProtocolError) are fine."""
    host = isinstance(conn, HostConnection)
    calls = {
        "welcome": lambda: conn.welcome(max_ranges=1 + arg % 64, window=None if arg % 2 else 1,
                                        features=FEATURE_KEEPALIVE if arg % 3 else 0),
        "start_round": lambda: conn.start_round(),
        "stop_round": lambda: conn.stop_round(),
        "ack": lambda: conn.ack(1 + arg % 3),
        "fault_done": lambda: conn.fault_done(min(conn.outstanding_faults, default=arg % 70)),
        "done": lambda: conn.done(bool(arg % 2), {"n": arg}),
        "ping": lambda: conn.ping(),
        "pong": lambda: conn.pong(),
        "bye": lambda: conn.bye("done"),
        "error": lambda: conn.error(ErrorCode.INTERNAL, "local"),
        "hello": lambda: conn.hello(PAGES, window=1 + arg % 8, features=FEATURE_KEEPALIVE if arg % 2 else 0),
        "hints": lambda: conn.hints(conn.active_cmd_id, np.array([[(arg % 512) * 512, 512]], dtype=np.uint64)),
        "round_end": lambda: conn.round_end(min(conn.open_rounds, default=CMD_ID_BASE)),
        "fault": lambda: conn.fault(arg % 70, [arg % PAGES]),
    }
    assert (action in HOST_ACTIONS) if host else (action in GUEST_ACTIONS)
    try:
        calls[action]()
    except LocalProtocolError:
        pass


def _check_bounds(conn) -> None:
    """What the receive checks exist for: the peer can never push these past their limits."""
    if isinstance(conn, HostConnection):
        assert conn.window is None or conn.unacked <= conn.window
        assert len(conn.open_rounds) <= MAX_OPEN_ROUNDS
        assert len(conn.outstanding_faults) <= MAX_OUTSTANDING_FAULTS
    else:
        assert conn.window is None or 0 <= conn.in_flight <= conn.window
        assert len(conn.open_rounds) <= MAX_OPEN_ROUNDS


def _count_frames(data: bytes) -> int:
    n = pos = 0
    while pos + 4 <= len(data):
        pos += 4 + struct.unpack_from("<I", data, pos)[0]
        n += 1
    return n


def _run_machine(conn, steps) -> None:
    err = None
    for kind, value, arg in steps:
        if kind == "local":
            _local(conn, value, arg)
            continue
        FRAMES["connections"] += _count_frames(value)
        conn.receive_data(value)
        try:
            while conn.next_event() is not None:
                pass
        except ProtocolError as e:
            assert conn.state is ConnState.ERROR
            if err is not None:
                assert e is err  # the same error on every later call
            err = e
        _check_bounds(conn)


def _steps(actions: list[str]):
    step = st.one_of(st.tuples(st.just("recv"), _valid_frames(), st.just(0)),
                     st.tuples(st.just("local"), st.sampled_from(actions), st.integers(0, 1000)))
    return st.lists(step, min_size=1, max_size=60)


@fuzz_settings(200)
@given(_steps(HOST_ACTIONS), st.sampled_from(["host_fresh", "host_ready", "host_round"]))
def test_host_connection_raises_only_protocol_errors(steps, start):
    _run_machine(_context(start), steps)  # most interesting orders happen after a handshake


@fuzz_settings(200)
@given(_steps(GUEST_ACTIONS), st.sampled_from(["guest_start", "guest_fresh", "guest_ready", "guest_round"]))
def test_guest_connection_raises_only_protocol_errors(steps, start):
    _run_machine(_context(start), steps)


@fuzz_settings(200)
@given(st.lists(frames(), min_size=1, max_size=4), st.sampled_from(["host_fresh", "host_round", "guest_fresh", "guest_ready"]))
def test_damaged_frames_in_every_connection_state(stream, context):
    conn = _context(context)
    FRAMES["connections"] += len(stream)
    conn.receive_data(b"".join(stream))
    try:
        while conn.next_event() is not None:
            pass
        conn.receive_data(b"")
        while conn.next_event() is not None:
            pass
    except ProtocolError:
        assert conn.state is ConnState.ERROR
    _check_bounds(conn)


# ---- the tcp record layer and the host's mirror --------------------------------------------

class _Bytes:
    """A stream endpoint that yields fixed chunks (the record layer's input)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    async def receive(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


@st.composite
def records(draw):
    rtype = draw(st.one_of(st.integers(0, 8), st.integers(0, 255)))
    body = draw(st.one_of(
        st.binary(max_size=64),
        st.builds(lambda p: struct.pack("<Q", p % 2**64), _around(0, 1, 4096, 1 << 26, 2**40)),
        st.builds(lambda s, n: struct.pack("<Q", s % 2**64) + b"\x01\x00\x00\x00" * n, _around(0, 4096),
                  st.integers(0, 8)),
        st.builds(lambda c, p: struct.pack("<I", c) + struct.pack("<Q", p % 2**64) * c + b"\0\0\0\0" * c,
                  st.integers(0, 3), _around(0, 4096)),
        st.builds(lambda o, v: struct.pack("<II", o, v), st.sampled_from([64, 68, 72, 128, 132, 0, 4095]), st.integers(0, U32)),
    ))
    length = len(body) if draw(st.integers(0, 9)) else draw(_around(0, len(body), (1 << 20) + 64, U32))
    return REC.pack(rtype, length % 2**32) + body


@fuzz_settings(100)
@given(st.lists(records(), min_size=1, max_size=6), st.lists(st.integers(0, 10**5), max_size=4))
def test_record_layer_and_mirror_raise_only_protocol_errors(recs, cuts):
    import trio

    FRAMES["records"] += len(recs)
    admitted = []
    mirror = MirrorReceiver(send=lambda data: None, admit=lambda pages: admitted.append(pages) if pages <= 4096 else (
        _ for _ in ()).throw(ProtocolError(ErrorCode.UNSUPPORTED, "too large")))
    ep = RecordEndpoint(_Bytes(_splits(b"".join(recs), cuts)), mirror)

    async def drain():
        dec = FrameDecoder()
        while data := await ep.receive():
            dec.feed(data)

    try:
        trio.run(drain)
    except ProtocolError:
        pass
    finally:
        if mirror.region is not None:
            assert mirror.region.page_count in admitted  # nothing was mapped without admission
            mirror.region.close()


# ---- the corpus -----------------------------------------------------------------------------

CASES = json.loads((CORPUS / "index.json").read_text())["cases"]
CONTEXTS = ("decoder", "host_fresh", "host_round", "guest_fresh", "guest_ready")


def _context(name: str):
    """A connection in a named state (the corpus's contexts, and a few more to fuzz from)."""
    if name.startswith("host"):
        h = HostConnection()
        if name in ("host_ready", "host_round"):
            h.receive_data(encode(Hello(1, 4096, PAGES, 4, FEATURE_KEEPALIVE, "g")))
            h.next_event()
            h.welcome(max_ranges=32, features=FEATURE_KEEPALIVE)
        if name == "host_round":
            h.start_round(CMD_ID_BASE)
        return h
    g = GuestConnection()
    if name == "guest_start":
        return g
    g.hello(PAGES, window=4, features=FEATURE_KEEPALIVE)
    if name in ("guest_ready", "guest_round"):
        g.receive_data(_frame_of([2, 1, 32, 4, FEATURE_KEEPALIVE]))
        g.next_event()
    if name == "guest_round":
        g.receive_data(_frame_of([3, CMD_ID_BASE]))
        g.next_event()
    return g


def _feed(context: str, data: bytes) -> list[Message]:
    """Feed ``data`` (then end of stream) in ``context``; the events before the error."""
    got = []
    if context == "decoder":
        dec = FrameDecoder()
        dec.feed(data)
        while (m := dec.next_message()) is not None:
            got.append(m)
        dec.eof()
        return got
    conn = _context(context)
    conn.receive_data(data)
    conn.receive_data(b"")
    while (ev := conn.next_event()) is not None:
        got.append(ev)
    return got


def test_corpus_is_the_committed_one():
    assert len(CASES) >= 100
    assert {c["context"] for c in CASES} == set(CONTEXTS)
    for c in CASES:
        assert hashlib.sha256((CORPUS / c["file"]).read_bytes()).hexdigest() == c["sha256"], c["file"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["file"][:-4])
def test_corpus_case_gives_its_error(case):
    data = (CORPUS / case["file"]).read_bytes()
    with pytest.raises(ProtocolError) as ei:
        _feed(case["context"], data)
    assert ei.value.code is ErrorCode[case["error"]], str(ei.value)


def test_corpus_raises_only_protocol_errors_in_every_context():
    for case in CASES:
        data = (CORPUS / case["file"]).read_bytes()
        for context in CONTEXTS:
            FRAMES["corpus"] += 1
            try:
                _feed(context, data)
            except ProtocolError:
                pass


# ---- limits too large for the corpus files --------------------------------------------------

def _frame(obj) -> bytes:
    p = msgpack.packb(obj, use_bin_type=True)
    return struct.pack("<I", len(p)) + p


@pytest.mark.parametrize("data, code", [
    (_frame([8, 1, b"\0" * 8 * 65536]), None),
    (_frame([8, 1, b"\0" * 8 * 65537]), ErrorCode.BAD_FIELD),
    (_frame([5, CMD_ID_BASE, b"".join(struct.pack("<QQ", i, 1) for i in range(4096))]), None),
    (_frame([10, True, {"b": "x" * 16384}]), None),
    (_frame([10, True, {"b": "x" * 16385}]), ErrorCode.MALFORMED_FRAME),
    (_frame([10, True, {"b": [0] * 65536}]), None),
    (_frame([10, True, {"b": [0] * 65537}]), ErrorCode.MALFORMED_FRAME),
    (_frame([10, True, {f"k{i}": 0 for i in range(1024)}]), None),
    # a payload of exactly MAX_FRAME_PAYLOAD passes framing (its Fault then has too many pfns)
    (struct.pack("<I", 1 << 20) + b"\x93\x08\x01\xc6" + struct.pack(">I", (1 << 20) - 8) + b"\0" * ((1 << 20) - 8),
     ErrorCode.BAD_FIELD),
], ids=["fault_at", "fault_past", "hints_at", "str_at", "str_past", "array_at", "array_past", "map_at", "frame_at"])
def test_fields_at_and_past_the_big_limits(data, code):
    dec = FrameDecoder()
    dec.feed(data)
    if code is None:
        assert dec.next_message() is not None and dec.buffered == 0
    else:
        with pytest.raises(ProtocolError) as ei:
            dec.next_message()
        assert ei.value.code is code
