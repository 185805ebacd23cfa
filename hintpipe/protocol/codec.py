"""Frame codec of wire protocol v1: bytes <-> messages, no I/O, no connection state.

Frame = u32 little-endian payload length N, then N bytes holding exactly one msgpack array
``[type, field, ...]``. Decoding checks everything that does not depend on the connection:
framing, msgpack well-formedness under strict size limits, message type, field count, field
types and geometry-independent value ranges. Checks that need the negotiated geometry
(page_count, max_ranges, credits, command ids) live in :mod:`hintpipe.protocol.connection`,
which calls :func:`validate_ranges` / :func:`validate_pfns` from here.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Callable

import msgpack
import numpy as np

from .errors import ErrorCode, LocalProtocolError, ProtocolError
from .messages import (
    MAX_FAULT_PFNS,
    MAX_FRAME_PAYLOAD,
    MAX_NAME_LEN,
    MAX_PAGE_COUNT,
    MAX_RANGE_ORDER,
    MAX_RANGES_PER_BATCH,
    MAX_TEXT_LEN,
    MAX_WINDOW,
    MESSAGE_CLASSES,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    U32_MAX,
    Ack,
    Bye,
    Done,
    Error,
    Fault,
    FaultDone,
    Hello,
    Hints,
    Message,
    MessageType,
    Ping,
    Pong,
    RoundEnd,
    StartRound,
    StopRound,
    Welcome,
)

LENGTH_PREFIX = struct.Struct("<I")
"""The 4-byte little-endian payload length in front of every frame."""

_LE_U64 = np.dtype("<u8")
_MAX_RANGE_NPAGES = np.uint64(1 << MAX_RANGE_ORDER)
_ONE = np.uint64(1)
_MAX_SUMMARY_DEPTH = 8
_MAX_STR_BYTES = 4 * MAX_TEXT_LEN  # utf-8 bytes; the character limits are checked after decoding

# Limits handed to msgpack so a small payload can never announce a huge allocation.
_UNPACK_LIMITS = dict(
    raw=False,
    strict_map_key=True,
    use_list=True,
    max_bin_len=MAX_FRAME_PAYLOAD,
    max_str_len=_MAX_STR_BYTES,
    max_array_len=MAX_FAULT_PFNS,
    max_map_len=1024,
    max_ext_len=0,
)


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_FIELD, message)


# ---- ranges / pfns -------------------------------------------------------------------------


def encode_ranges(ranges: Any) -> bytes:
    """(n, 2) array-like of [start_pfn, npages] -> interleaved little-endian u64 bytes."""
    return _u64_bytes(as_u64_ranges(ranges))


def as_u64_ranges(ranges: Any) -> np.ndarray:
    """An (n, 2) array-like of [start_pfn, npages] as a uint64 array (the local side's input:
    LocalProtocolError for a wrong shape, non-integers or negative values)."""
    arr = np.asarray(ranges)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, f"ranges must have shape (n, 2), got {arr.shape}")
    return _as_u64(arr)


def _as_u64(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint64:
        if arr.size and arr.dtype.kind not in "ui":
            raise LocalProtocolError(ErrorCode.BAD_FIELD, f"expected integers, got dtype {arr.dtype}")
        if arr.size and arr.dtype.kind == "i" and int(arr.min()) < 0:
            raise LocalProtocolError(ErrorCode.BAD_FIELD, "negative value in a u64 array")
        arr = arr.astype(np.uint64)
    return arr


def _u64_bytes(arr: np.ndarray) -> bytes:
    return _as_u64(arr).astype(_LE_U64, copy=False).tobytes()  # C order: start0, npages0, start1, ...


def decode_ranges(data: bytes) -> np.ndarray:
    """Interleaved little-endian u64 bytes -> read-only (n, 2) uint64 array (n may be 0).

    Raises BAD_FIELD when the length is not a multiple of 16 bytes.
    """
    if len(data) % 16:
        raise _bad(f"ranges bin length {len(data)} is not a multiple of 16")
    return np.frombuffer(data, dtype=_LE_U64).astype(np.uint64, copy=False).reshape(-1, 2)


def decode_pfns(data: bytes) -> np.ndarray:
    """Little-endian u64 bytes -> read-only one-dimensional uint64 array."""
    if len(data) % 8:
        raise _bad(f"pfns bin length {len(data)} is not a multiple of 8")
    return np.frombuffer(data, dtype=_LE_U64).astype(np.uint64, copy=False)


def validate_ranges(ranges: np.ndarray, page_count: int,
                    max_ranges: int = MAX_RANGES_PER_BATCH) -> np.ndarray:
    """Check one batch of [start_pfn, npages] ranges against a guest of ``page_count`` pages
    that accepts ``max_ranges`` per frame; return each range's block order (uint8,
    ``log2(npages)``), which the checks compute anyway.

    Vectorised (no Python loop per range). Raises ProtocolError, checks in this order:
    BATCH_TOO_LARGE (more than ``max_ranges``), RANGE_UNALIGNED (npages zero, not a power of two,
    above 2**MAX_RANGE_ORDER, or start % npages != 0), RANGE_OUT_OF_BOUNDS (start + npages >
    page_count), RANGE_OVERLAP.
    """
    if ranges.ndim != 2 or ranges.shape[1] != 2 or ranges.dtype != np.uint64:
        raise _bad("ranges must be a uint64 array of shape (n, 2)")
    if len(ranges) > max_ranges:
        raise ProtocolError(ErrorCode.BATCH_TOO_LARGE, f"{len(ranges)} ranges > max_ranges {max_ranges}")
    if len(ranges) == 0:
        return np.empty(0, dtype=np.uint8)
    starts = ranges[:, 0]
    npages = ranges[:, 1]
    # Few numpy calls on the fast path: per-call overhead dominates for 32-range batches.
    # m = npages - 1 wraps to 2**64-1 for npages == 0, so one compare rejects both zero and
    # too-large sizes; (npages | start) & m is zero iff npages is a power of two (or zero)
    # and start is a multiple of it.
    m = npages - _ONE
    if (m >= _MAX_RANGE_NPAGES).any() or ((npages | starts) & m).any():
        bad = (m >= _MAX_RANGE_NPAGES) | (((npages | starts) & m) != 0)
        i = int(np.argmax(bad))
        raise ProtocolError(
            ErrorCode.RANGE_UNALIGNED,
            f"range {i} [{int(starts[i])}, {int(npages[i])}]: npages must be a power of two "
            f"<= 2**{MAX_RANGE_ORDER} and start a multiple of npages",
        )
    orders = np.bitwise_count(m)  # popcount(npages - 1) = log2(npages) for a power of two
    ends = starts + npages
    # test the starts first: once all starts < page_count <= 2**40, ends cannot have wrapped
    if int(starts.max()) >= page_count or int(ends.max()) > page_count:
        i = int(np.argmax((starts >= np.uint64(page_count)) | (ends > np.uint64(page_count))))
        raise ProtocolError(
            ErrorCode.RANGE_OUT_OF_BOUNDS,
            f"range {i} [{int(starts[i])}, {int(npages[i])}] ends past page_count {page_count}",
        )
    if len(ranges) > 1 and (starts[1:] < ends[:-1]).any():
        # Not ascending, or overlapping (when no start is below its predecessor's end, the
        # batch is ascending and disjoint: the common case needs no sort).
        order = np.argsort(starts, kind="stable")
        s, e = starts[order], ends[order]
        hit = s[1:] < e[:-1]
        if hit.any():
            i = int(np.argmax(hit))
            raise ProtocolError(
                ErrorCode.RANGE_OVERLAP,
                f"ranges starting at pfn {int(s[i])} and {int(s[i + 1])} overlap",
            )
    return orders


def validate_pfns(pfns: np.ndarray, page_count: int) -> None:
    """Check faulted pfns: 1..MAX_FAULT_PFNS entries, each < page_count (RANGE_OUT_OF_BOUNDS)."""
    if pfns.ndim != 1 or pfns.dtype != np.uint64:
        raise _bad("pfns must be a one-dimensional uint64 array")
    if not 1 <= len(pfns) <= MAX_FAULT_PFNS:
        raise _bad(f"a Fault carries 1..{MAX_FAULT_PFNS} pfns, got {len(pfns)}")
    if np.any(pfns >= np.uint64(page_count)):
        i = int(np.argmax(pfns >= np.uint64(page_count)))
        raise ProtocolError(ErrorCode.RANGE_OUT_OF_BOUNDS, f"pfn {int(pfns[i])} >= page_count {page_count}")


# ---- field checkers (decode side; each returns the value to store) ------------------------


def _int(name: str, lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int:  # bool is a subclass of int: excluded on purpose
            raise _bad(f"{name} must be an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise _bad(f"{name}={v} outside [{lo}, {hi}]")
        return v

    return check


def _str(name: str, max_chars: int) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if type(v) is not str:
            raise _bad(f"{name} must be a string, got {type(v).__name__}")
        if len(v) > max_chars:
            raise _bad(f"{name} longer than {max_chars} characters")
        return v

    return check


def _bool(name: str) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if type(v) is not bool:
            raise _bad(f"{name} must be a boolean, got {type(v).__name__}")
        return v

    return check


def _ranges_bin(v: Any) -> np.ndarray:
    if type(v) is not bytes:
        raise _bad(f"ranges must be a msgpack bin, got {type(v).__name__}")
    n = len(v) // 16
    if n > MAX_RANGES_PER_BATCH:
        raise ProtocolError(ErrorCode.BATCH_TOO_LARGE, f"{n} ranges > {MAX_RANGES_PER_BATCH}")
    arr = decode_ranges(v)
    if n == 0:
        raise _bad("a Hints frame carries at least one range")
    return arr


def _pfns_bin(v: Any) -> np.ndarray:
    if type(v) is not bytes:
        raise _bad(f"pfns must be a msgpack bin, got {type(v).__name__}")
    arr = decode_pfns(v)
    if not 1 <= len(arr) <= MAX_FAULT_PFNS:
        raise _bad(f"a Fault carries 1..{MAX_FAULT_PFNS} pfns, got {len(arr)}")
    return arr


def _json_like(v: Any, depth: int) -> None:
    """JSON-like: None, bool, int (i64/u64), finite float, str, list, map with str keys."""
    t = type(v)
    if v is None or t is bool or t is int or t is str:
        return
    if t is float:
        if not math.isfinite(v):
            raise _bad("summary floats must be finite")
        return
    if depth >= _MAX_SUMMARY_DEPTH:
        raise _bad(f"summary nested deeper than {_MAX_SUMMARY_DEPTH}")
    if t is list:
        for x in v:
            _json_like(x, depth + 1)
    elif t is dict:
        for k, x in v.items():
            if type(k) is not str:
                raise _bad("summary keys must be strings")
            _json_like(x, depth + 1)
    else:
        raise _bad(f"summary value of type {t.__name__} is not JSON-like")


def _summary(v: Any) -> dict:
    if type(v) is not dict:
        raise _bad(f"summary must be a map, got {type(v).__name__}")
    _json_like(v, 0)
    return v


def _version(v: Any) -> int:
    v = _int("version", 0, U32_MAX)(v)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {v} is not supported (want {PROTOCOL_VERSION})")
    return v


def _page_size(v: Any) -> int:
    v = _int("page_size", 0, U32_MAX)(v)
    if v != PAGE_SIZE:
        raise ProtocolError(ErrorCode.UNSUPPORTED, f"page_size {v} is not supported (want {PAGE_SIZE})")
    return v


_u32 = lambda name: _int(name, 0, U32_MAX)  # noqa: E731

_FIELDS: dict[int, tuple[Callable[[Any], Any], ...]] = {
    MessageType.HELLO: (
        _version,
        _page_size,
        _int("page_count", 1, MAX_PAGE_COUNT),
        _int("window", 1, MAX_WINDOW),
        _u32("features"),
        _str("name", MAX_NAME_LEN),
    ),
    MessageType.WELCOME: (
        _version,
        _int("max_ranges", 1, MAX_RANGES_PER_BATCH),
        _int("window", 1, MAX_WINDOW),
        _u32("features"),
    ),
    MessageType.START_ROUND: (_u32("cmd_id"),),
    MessageType.STOP_ROUND: (_u32("cmd_id"),),
    MessageType.HINTS: (_u32("cmd_id"), _ranges_bin),
    MessageType.ROUND_END: (_u32("cmd_id"), _u32("batches")),
    MessageType.ACK: (_int("count", 1, MAX_WINDOW),),
    MessageType.FAULT: (_u32("seq"), _pfns_bin),
    MessageType.FAULT_DONE: (_u32("seq"),),
    MessageType.DONE: (_bool("ok"), _summary),
    MessageType.ERROR: (_u32("code"), _str("message", MAX_TEXT_LEN)),
    MessageType.BYE: (_str("reason", MAX_TEXT_LEN),),
    MessageType.PING: (_u32("seq"),),
    MessageType.PONG: (_u32("seq"),),
}


# ---- payload <-> message -----------------------------------------------------------------


def decode_payload(payload: bytes) -> Message:
    """Decode one frame payload (without the length prefix) into a message."""
    if not payload:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "empty frame payload")
    try:
        obj = msgpack.unpackb(payload, **_UNPACK_LIMITS)
    except msgpack.ExtraData:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "trailing bytes after the msgpack value") from None
    except Exception as exc:  # msgpack raises many types (ValueError, UnicodeDecodeError, ...)
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"invalid msgpack: {type(exc).__name__}") from None
    if type(obj) is not list or not obj:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "payload is not a non-empty msgpack array")
    mtype = obj[0]
    if type(mtype) is not int:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"message type must be an integer, got {type(mtype).__name__}")
    checkers = _FIELDS.get(mtype)
    if checkers is None:
        raise ProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"unknown message type {mtype}")
    cls = MESSAGE_CLASSES[mtype]
    # Hello/Welcome: check the version before the arity so a future version's longer Hello
    # still gets BAD_VERSION rather than BAD_FIELD.
    if mtype in (MessageType.HELLO, MessageType.WELCOME) and len(obj) >= 2:
        _version(obj[1])
    if len(obj) - 1 != len(checkers):
        raise _bad(f"{cls.__name__} has {len(checkers)} fields, got {len(obj) - 1}")
    values = [check(v) for check, v in zip(checkers, obj[1:])]
    if mtype == MessageType.ERROR and values[0] in _KNOWN_CODES:
        values[0] = ErrorCode(values[0])  # unknown codes (newer peer) stay plain ints
    return cls(*values)


_KNOWN_CODES = frozenset(int(c) for c in ErrorCode)


def _fields_of(msg: Message) -> list:
    t = type(msg)
    if t is Hints:
        return [msg.cmd_id, encode_ranges(msg.ranges)]
    if t is Fault:
        return [msg.seq, _u64_bytes(msg.pfns)]
    if t is Hello:
        return [msg.version, msg.page_size, msg.page_count, msg.window, msg.features, msg.name]
    if t is Welcome:
        return [msg.version, msg.max_ranges, msg.window, msg.features]
    if t in (StartRound, StopRound):
        return [msg.cmd_id]
    if t is RoundEnd:
        return [msg.cmd_id, msg.batches]
    if t is Ack:
        return [msg.count]
    if t in (FaultDone, Ping, Pong):
        return [msg.seq]
    if t is Done:
        return [msg.ok, msg.summary]
    if t is Error:
        return [int(msg.code), msg.message]
    if t is Bye:
        return [msg.reason]
    raise LocalProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"not a wire message: {t.__name__}")


def encode_payload(msg: Message) -> bytes:
    """Encode a message to its msgpack payload (no length prefix), checking every field with
    the same rules the receiver applies; invalid fields raise LocalProtocolError."""
    fields = _fields_of(msg)
    try:
        for check, v in zip(_FIELDS[msg.TYPE], fields):
            check(v)
    except ProtocolError as exc:
        raise LocalProtocolError(exc.code, exc.message) from None
    return pack_payload([int(msg.TYPE), *fields])


def pack_payload(obj: Any) -> bytes:
    """msgpack-encode ``obj`` the canonical v1 way (shortest forms, str as str, bytes as bin)."""
    return msgpack.packb(obj, use_bin_type=True)


def frame(payload: bytes) -> bytes:
    """Prefix a payload with its u32 little-endian length."""
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise LocalProtocolError(ErrorCode.FRAME_TOO_LARGE, f"payload {len(payload)} > {MAX_FRAME_PAYLOAD} bytes")
    return LENGTH_PREFIX.pack(len(payload)) + payload


def encode(msg: Message) -> bytes:
    """Message -> complete frame bytes (length prefix included)."""
    return frame(encode_payload(msg))


def decode(data: bytes) -> Message:
    """Decode exactly one complete frame (prefix included); anything else is an error."""
    dec = FrameDecoder()
    dec.feed(data)
    msg = dec.next_message()
    if msg is None:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "truncated frame")
    if dec.buffered:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "bytes after the frame")
    return msg


class FrameDecoder:
    """Incremental frame splitter + decoder: ``feed`` bytes, then call ``next_message`` until
    it returns None (needs more bytes).

    Memory is bounded: a length prefix above MAX_FRAME_PAYLOAD raises FRAME_TOO_LARGE as soon
    as its 4 bytes are buffered, before any payload is waited for. After an error the decoder
    is poisoned: ``next_message`` re-raises the same error and ``feed`` discards its input.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # consumed prefix of _buf; compacted lazily to keep feeding O(n)
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed by a returned message."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Append received bytes (any split; b"" is a no-op)."""
        if self._error is None and data:
            if self._pos and self._pos * 2 >= len(self._buf):
                del self._buf[: self._pos]
                self._pos = 0
            self._buf += data

    def next_message(self) -> Message | None:
        """Return the next complete message, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            self._pos = 0
            raise

    def _next(self) -> Message | None:
        avail = len(self._buf) - self._pos
        if avail < 4:
            return None
        (n,) = LENGTH_PREFIX.unpack_from(self._buf, self._pos)
        if n > MAX_FRAME_PAYLOAD:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"announced payload {n} > {MAX_FRAME_PAYLOAD} bytes")
        if avail < 4 + n:
            return None
        start = self._pos + 4
        # decode straight from the buffer (msgpack copies what it keeps); the views must be
        # released before the bytearray may be resized again
        with memoryview(self._buf) as mv, mv[start : start + n] as payload:
            msg = decode_payload(payload)
        self._pos = start + n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        return msg

    def eof(self) -> None:
        """Declare end of stream: raises MALFORMED_FRAME if a partial frame is buffered."""
        if self._error is not None:
            raise self._error
        if self.buffered:
            self._error = ProtocolError(ErrorCode.MALFORMED_FRAME, f"stream ended inside a frame ({self.buffered} bytes)")
            raise self._error
