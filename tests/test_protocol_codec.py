"""Codec of wire protocol v1: framing, field checks, range validation, fuzzing."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hintpipe.protocol import (
    MAX_FRAME_PAYLOAD,
    MAX_RANGES_PER_BATCH,
    Ack,
    Bye,
    Done,
    Error,
    ErrorCode,
    Fault,
    FaultDone,
    FrameDecoder,
    Hello,
    Hints,
    LocalProtocolError,
    Ping,
    Pong,
    ProtocolError,
    RoundEnd,
    StartRound,
    StopRound,
    Welcome,
    decode,
    decode_ranges,
    encode,
    encode_ranges,
    validate_pfns,
    validate_ranges,
)

FUZZ = settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# structured values are slow to generate; fewer examples keep the file well under 10 s
FUZZ_STRUCT = settings(FUZZ, max_examples=60)


def raw_frame(obj) -> bytes:
    payload = msgpack.packb(obj, use_bin_type=True)
    return struct.pack("<I", len(payload)) + payload


def code_of(data: bytes) -> ErrorCode:
    with pytest.raises(ProtocolError) as ei:
        decode(data)
    return ei.value.code


R = np.array([[0, 512], [1024, 1], [2048, 1024]], dtype=np.uint64)
SAMPLES = [
    Hello(1, 4096, 1 << 40, 4096, 0xFFFFFFFF, "x" * 64),
    Hello(1, 4096, 1, 1, 0, ""),
    Welcome(1, 4096, 1, 0),
    StartRound(0x80000000),
    StopRound(0xFFFFFFFF),
    Hints(0x80000005, R),
    RoundEnd(0x80000005, 0),
    Ack(4096),
    Fault(0, np.array([0, 1, 2**40 - 1], dtype=np.uint64)),
    FaultDone(0xFFFFFFFF),
    Done(False, {}),
    Done(True, {"a": [1, -2, 2.5, None, True, "s", {"b": 2**64 - 1}], "c": -(2**63)}),
    Error(ErrorCode.INTERNAL, "é" * 4096),
    Bye(""),
    Ping(0),
    Pong(0xFFFFFFFF),
]


# ---- errors -----------------------------------------------------------------------------


def test_error_codes_are_fixed():
    # The numbers travel on the wire; changing one breaks every peer.
    assert {c.name: int(c) for c in ErrorCode} == {
        "MALFORMED_FRAME": 1, "FRAME_TOO_LARGE": 2, "UNKNOWN_MESSAGE": 3, "BAD_VERSION": 4,
        "BAD_FIELD": 5, "RANGE_OUT_OF_BOUNDS": 6, "RANGE_UNALIGNED": 7, "RANGE_OVERLAP": 8,
        "BATCH_TOO_LARGE": 9, "UNEXPECTED_MESSAGE": 10, "CREDIT_EXCEEDED": 11,
        "UNKNOWN_COMMAND_ID": 12, "UNSUPPORTED": 13, "INTERNAL": 14, "TIMEOUT": 15,
    }  # fmt: skip


def test_protocol_error_str():
    e = ProtocolError(ErrorCode.RANGE_OVERLAP, "two ranges")
    assert str(e) == "RANGE_OVERLAP: two ranges"
    assert e.code is ErrorCode.RANGE_OVERLAP and e.message == "two ranges"
    assert isinstance(LocalProtocolError(5, "x"), ProtocolError)


# ---- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_roundtrip(msg):
    data = encode(msg)
    assert struct.unpack_from("<I", data)[0] == len(data) - 4
    back = decode(data)
    assert type(back) is type(msg) and back == msg
    assert encode(back) == data


def test_error_code_decodes_to_enum_and_unknown_code_stays_int():
    assert decode(encode(Error(7, "m"))).code is ErrorCode.RANGE_UNALIGNED
    back = decode(raw_frame([11, 999, "from the future"]))
    assert back.code == 999 and type(back.code) is int


def test_ranges_layout_is_interleaved_little_endian():
    blob = encode_ranges(np.array([[1, 2], [3, 4]], dtype=np.uint64))
    assert blob == struct.pack("<4Q", 1, 2, 3, 4)
    arr = decode_ranges(blob)
    assert arr.dtype == np.uint64 and arr.shape == (2, 2) and arr.tolist() == [[1, 2], [3, 4]]
    assert not arr.flags.writeable  # a decoded message is immutable


def test_messages_are_frozen_and_do_not_alias_caller_arrays():
    src = np.array([[0, 1]], dtype=np.uint64)
    h = Hints(0x80000000, src)
    src[0, 0] = 8
    assert h.ranges[0, 0] == 0
    with pytest.raises(ValueError):
        h.ranges[0, 0] = 5
    with pytest.raises(AttributeError):
        h.cmd_id = 1  # type: ignore[misc]


def test_non_canonical_msgpack_is_accepted():
    # Ack(1) with count as uint64 (0xcf) and the array as array16 (0xdc): valid msgpack.
    payload = b"\xdc\x00\x02" + b"\x07" + b"\xcf" + (1).to_bytes(8, "big")
    assert decode(struct.pack("<I", len(payload)) + payload) == Ack(1)


# ---- malformed frames ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, code",
    [
        (struct.pack("<I", 0), ErrorCode.MALFORMED_FRAME),
        (struct.pack("<I", 1) + b"\xc1", ErrorCode.MALFORMED_FRAME),
        (raw_frame([]), ErrorCode.MALFORMED_FRAME),
        (raw_frame(7), ErrorCode.MALFORMED_FRAME),
        (raw_frame(["7", 1]), ErrorCode.MALFORMED_FRAME),
        (raw_frame([True, 1]), ErrorCode.MALFORMED_FRAME),
        (raw_frame([7, 1])[:-1] + b"\x01\x01", ErrorCode.MALFORMED_FRAME),  # wrong length
        (struct.pack("<I", 3) + b"\x92\x07\x01" + b"", None),
        (struct.pack("<I", 4) + b"\x92\x07\x01\xc0", ErrorCode.MALFORMED_FRAME),  # trailing
        (struct.pack("<I", 6) + b"\xdd\xff\xff\xff\xff\x07", ErrorCode.MALFORMED_FRAME),  # huge array header
        (struct.pack("<I", 6) + b"\x92\x07\xd4\x01\x00\x00"[:6], ErrorCode.MALFORMED_FRAME),  # ext type
        (raw_frame([0]), ErrorCode.UNKNOWN_MESSAGE),
        (raw_frame([15, 1]), ErrorCode.UNKNOWN_MESSAGE),
        (raw_frame([-1]), ErrorCode.UNKNOWN_MESSAGE),
        (raw_frame([7]), ErrorCode.BAD_FIELD),
        (raw_frame([7, 0]), ErrorCode.BAD_FIELD),
        (raw_frame([7, 4097]), ErrorCode.BAD_FIELD),
        (raw_frame([7, 1.0]), ErrorCode.BAD_FIELD),
        (raw_frame([7, False]), ErrorCode.BAD_FIELD),
        (raw_frame([3, -1]), ErrorCode.BAD_FIELD),
        (raw_frame([3, 2**32]), ErrorCode.BAD_FIELD),
        (raw_frame([1, 1, 4096, 0, 1, 0, ""]), ErrorCode.BAD_FIELD),
        (raw_frame([1, 1, 4096, 2**40 + 1, 1, 0, ""]), ErrorCode.BAD_FIELD),
        (raw_frame([1, 1, 4096, 8, 0, 0, ""]), ErrorCode.BAD_FIELD),
        (raw_frame([1, 1, 4096, 8, 4097, 0, ""]), ErrorCode.BAD_FIELD),
        (raw_frame([1, 1, 4096, 8, 1, 0, "x" * 65]), ErrorCode.BAD_FIELD),
        (raw_frame([1, 1, 4096, 8, 1, 0, b"bin-not-str"]), ErrorCode.BAD_FIELD),
        (raw_frame([1, 0, 4096, 8, 1, 0, ""]), ErrorCode.BAD_VERSION),
        (raw_frame([1, 2]), ErrorCode.BAD_VERSION),
        (raw_frame([2, 3, 1, 1, 0]), ErrorCode.BAD_VERSION),
        (raw_frame([1, 1, 8192, 8, 1, 0, ""]), ErrorCode.UNSUPPORTED),
        (raw_frame([2, 1, 4097, 1, 0]), ErrorCode.BAD_FIELD),
        (raw_frame([5, 0x80000000, b""]), ErrorCode.BAD_FIELD),
        (raw_frame([5, 0x80000000, b"\0" * 17]), ErrorCode.BAD_FIELD),
        (raw_frame([5, 0x80000000, b"\0" * 16 * (MAX_RANGES_PER_BATCH + 1)]), ErrorCode.BATCH_TOO_LARGE),
        (raw_frame([8, 1, b""]), ErrorCode.BAD_FIELD),
        (raw_frame([8, 1, b"\0" * 7]), ErrorCode.BAD_FIELD),
        (raw_frame([8, 1, b"\0" * 8 * 65537]), ErrorCode.BAD_FIELD),
        (raw_frame([10, 1, {}]), ErrorCode.BAD_FIELD),
        (raw_frame([10, True, []]), ErrorCode.BAD_FIELD),
        (raw_frame([10, True, {"x": b"bin"}]), ErrorCode.BAD_FIELD),
        (raw_frame([10, True, {b"k": 1}]), ErrorCode.BAD_FIELD),
        (raw_frame([10, True, {1: 1}]), ErrorCode.MALFORMED_FRAME),  # msgpack-level strict keys
        (raw_frame([10, True, {"x": float("nan")}]), ErrorCode.BAD_FIELD),
        (raw_frame([10, True, {"x": [[[[[[[[[1]]]]]]]]]}]), ErrorCode.BAD_FIELD),
        (raw_frame([11, 1, "x" * 4097]), ErrorCode.BAD_FIELD),
        (raw_frame([12, None]), ErrorCode.BAD_FIELD),
    ],
    ids=lambda x: None if isinstance(x, (ErrorCode, type(None))) else x[:24].hex(),
)
def test_malformed(data, code):
    if code is None:
        assert decode(data) == Ack(1)
    else:
        assert code_of(data) is code


def test_deep_nesting_is_a_protocol_error():
    payload = b"\x91" * 100_000 + b"\xc0"
    assert code_of(struct.pack("<I", len(payload)) + payload) is ErrorCode.MALFORMED_FRAME


def test_invalid_utf8_is_malformed():
    payload = b"\x92\x0c\xa2\xff\xfe"
    assert code_of(struct.pack("<I", len(payload)) + payload) is ErrorCode.MALFORMED_FRAME


def test_encode_refuses_invalid_fields():
    for bad in (Ack(0), StartRound(-1), Hello(2, 4096, 1, 1, 0, ""), Bye(None), Hints(1, np.zeros((0, 2), np.uint64))):  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError):
            encode(bad)
    with pytest.raises(LocalProtocolError):
        encode(Done(True, {"x": object()}))


# ---- FrameDecoder ---------------------------------------------------------------------------


def test_oversized_length_rejected_before_payload():
    dec = FrameDecoder()
    dec.feed(struct.pack("<I", MAX_FRAME_PAYLOAD + 1))
    with pytest.raises(ProtocolError) as ei:
        dec.next_message()
    assert ei.value.code is ErrorCode.FRAME_TOO_LARGE
    dec.feed(b"\0" * 1000)  # poisoned: discards input, keeps raising
    assert dec.buffered == 0
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_frame_of_exactly_max_payload_is_accepted():
    strings = ["a" * 15000] * 69
    base = len(msgpack.packb([10, True, {"p": strings + [""]}]))
    strings.append("b" * (MAX_FRAME_PAYLOAD - base - 2))  # str16 header: 2 bytes more than fixstr
    payload = msgpack.packb([10, True, {"p": strings}])
    assert len(payload) == MAX_FRAME_PAYLOAD
    msg = decode(struct.pack("<I", len(payload)) + payload)
    assert msg.summary["p"][-1][0] == "b"
    too_big = payload + b"\xc0"
    assert code_of(struct.pack("<I", len(too_big)) + too_big) is ErrorCode.FRAME_TOO_LARGE


def test_many_frames_any_split():
    frames = [encode(m) for m in SAMPLES]
    stream = b"".join(frames)
    for step in (1, 3, 7, 64, len(stream)):
        dec = FrameDecoder()
        got = []
        for i in range(0, len(stream), step):
            dec.feed(stream[i : i + step])
            while (m := dec.next_message()) is not None:
                got.append(m)
        assert [encode(m) for m in got] == frames
        assert dec.buffered == 0
        dec.eof()


def test_eof_inside_frame():
    dec = FrameDecoder()
    dec.feed(encode(Ack(1))[:-1])
    assert dec.next_message() is None
    with pytest.raises(ProtocolError) as ei:
        dec.eof()
    assert ei.value.code is ErrorCode.MALFORMED_FRAME


# ---- validate_ranges ----------------------------------------------------------------------


def _v(pairs, page_count=1 << 20):
    validate_ranges(np.array(pairs, dtype=np.uint64).reshape(-1, 2), page_count)


@pytest.mark.parametrize(
    "pairs, page_count, code",
    [
        ([[0, 1]], 1, None),
        ([[0, 512], [512, 512]], 1024, None),  # adjacent, not overlapping
        ([[512, 512], [0, 512]], 1024, None),  # unsorted is fine
        ([[0, 1 << 20]], 1 << 20, None),
        ([[0, 0]], 8, ErrorCode.RANGE_UNALIGNED),
        ([[0, 3]], 8, ErrorCode.RANGE_UNALIGNED),
        ([[2, 4]], 8, ErrorCode.RANGE_UNALIGNED),
        ([[0, 1 << 21]], 1 << 22, ErrorCode.RANGE_UNALIGNED),
        ([[8, 1]], 8, ErrorCode.RANGE_OUT_OF_BOUNDS),
        ([[0, 16]], 8, ErrorCode.RANGE_OUT_OF_BOUNDS),
        ([[2**64 - 1, 1]], 8, ErrorCode.RANGE_OUT_OF_BOUNDS),
        ([[2**64 - 2**20, 2**20]], 8, ErrorCode.RANGE_OUT_OF_BOUNDS),  # start+npages wraps u64
        ([[4, 4], [0, 8]], 8, ErrorCode.RANGE_OVERLAP),
        ([[5, 1], [5, 1]], 8, ErrorCode.RANGE_OVERLAP),
        ([[0, 1], [2, 2], [1, 1], [2, 1]], 8, ErrorCode.RANGE_OVERLAP),
    ],
)
def test_validate_ranges(pairs, page_count, code):
    if code is None:
        _v(pairs, page_count)
    else:
        with pytest.raises(ProtocolError) as ei:
            _v(pairs, page_count)
        assert ei.value.code is code


def _reference_error(pairs, page_count):
    """Per-range Python reference of validate_ranges, in the spec's check order."""
    for s, n in pairs:
        if n == 0 or n & (n - 1) or n > 1 << 20 or s % n:
            return ErrorCode.RANGE_UNALIGNED
    for s, n in pairs:
        if s + n > page_count:
            return ErrorCode.RANGE_OUT_OF_BOUNDS
    spans = sorted(pairs)
    for (s0, n0), (s1, _) in zip(spans, spans[1:]):
        if s1 < s0 + n0:
            return ErrorCode.RANGE_OVERLAP
    return None


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 300), st.sampled_from([0, 1, 2, 3, 4, 8, 16, 64])), min_size=1, max_size=12),
    st.integers(1, 320),
)
def test_validate_ranges_matches_reference(pairs, page_count):
    expected = _reference_error(pairs, page_count)
    try:
        _v(pairs, page_count)
        got = None
    except ProtocolError as exc:
        got = exc.code
    assert got == expected


def test_validate_pfns():
    validate_pfns(np.array([0, 7], dtype=np.uint64), 8)
    with pytest.raises(ProtocolError) as ei:
        validate_pfns(np.array([0, 8], dtype=np.uint64), 8)
    assert ei.value.code is ErrorCode.RANGE_OUT_OF_BOUNDS


# ---- fuzzing: nothing but ProtocolError ----------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=5) | st.integers(0, 9), c, max_size=4), max_leaves=12
)


def _decode_all(data: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(data)
    try:
        while dec.next_message() is not None:
            pass
        dec.eof()
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    _decode_all(data)
    _decode_all(struct.pack("<I", len(data)) + data)


@FUZZ_STRUCT
@given(st.integers(0, 14), st.lists(values, max_size=8))
def test_fuzz_random_messages(mtype, fields):
    data = raw_frame([mtype, *fields])
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert decode(encode(msg)) == msg  # whatever decodes re-encodes to an equal message


@FUZZ_STRUCT
@given(values)
def test_fuzz_random_payload(obj):
    _decode_all(raw_frame(obj))
