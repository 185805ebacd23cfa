"""Messages of wire protocol v1 (frozen dataclasses) plus the few non-wire connection events.

Each wire message travels as one msgpack array ``[type, field, ...]`` in the field order of the
dataclass (see ``protocols/wire-v1.md``). Range/pfn arrays are numpy ``uint64`` arrays, kept
read-only so the frozen message really is immutable; equality compares array contents.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

# the page size and the guest size limit are the spec's too (section 1, section 3): re-exported here
from hintpipe.units import MAX_PAGE_COUNT, PAGE_SIZE

PROTOCOL_VERSION = 1
"""The only version v1 peers speak."""
MAX_FRAME_PAYLOAD = 1 << 20
"""Largest payload (bytes after the 4-byte length prefix) a receiver accepts: 1 MiB."""
MAX_WINDOW = 4096
"""Largest Hints window (un-acked Hints frames in flight)."""
MAX_RANGES_PER_BATCH = 4096
"""Absolute cap on ranges in one Hints frame (64 KiB of payload); Welcome.max_ranges <= this."""
MAX_RANGE_ORDER = 20
"""Largest range is 2**20 pages = 4 GiB (npages is a power of two up to this order)."""
MAX_FAULT_PFNS = 65536
"""Largest number of pfns in one Fault frame (512 KiB of payload)."""
MAX_OUTSTANDING_FAULTS = 64
"""Fault frames the guest may have without a FaultDone answer."""
MAX_NAME_LEN = 64
"""Hello.name limit, in characters."""
MAX_TEXT_LEN = 4096
"""Error.message and Bye.reason limit, in characters."""
CMD_ID_BASE = 0x80000000
"""First valid round command id (virtio-balloon: 0 = STOP and 1 = DONE are reserved)."""
CMD_ID_MAX = 0xFFFFFFFF
"""Command ids are u32."""
U32_MAX = 0xFFFFFFFF

FEATURE_KEEPALIVE = 0x1
"""Feature bit 0: either side may send Ping and must answer the peer's Ping with Pong (wire-v1
section 9.1), so each side can bound how long a silent peer is waited for."""
KNOWN_FEATURES = FEATURE_KEEPALIVE
"""Every feature bit this implementation knows; a host never enables more than this."""


class MessageType(enum.IntEnum):
    """First element of every frame's msgpack array."""

    HELLO = 1
    WELCOME = 2
    START_ROUND = 3
    STOP_ROUND = 4
    HINTS = 5
    ROUND_END = 6
    ACK = 7
    FAULT = 8
    FAULT_DONE = 9
    DONE = 10
    ERROR = 11
    BYE = 12
    PING = 13
    PONG = 14


def _readonly_u64(values: Any, *, pairs: bool) -> np.ndarray:
    """Normalise an array-like to a read-only native uint64 array ((n, 2) if ``pairs``)."""
    arr = np.asarray(values)
    if arr.dtype != np.uint64:
        if arr.size and arr.dtype.kind not in "ui":
            raise TypeError(f"expected an integer array, got dtype {arr.dtype}")
        if arr.size and arr.dtype.kind == "i" and int(arr.min()) < 0:
            raise ValueError("negative values in a uint64 array")
        arr = arr.astype(np.uint64)
    if pairs:
        arr = arr.reshape(-1, 2) if arr.ndim != 2 else arr
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"ranges must have shape (n, 2), got {arr.shape}")
    elif arr.ndim != 1:
        raise ValueError(f"pfns must be one-dimensional, got shape {arr.shape}")
    if arr.flags.writeable:
        # copy first when the caller still owns a writable view, so freezing cannot surprise it
        arr = arr.copy() if arr.base is not None or arr is values else arr
        arr.flags.writeable = False
    return arr


@dataclass(frozen=True)
class Hello:
    """Guest -> host, first frame: protocol version, guest geometry and requested window."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    version: int
    page_size: int
    page_count: int
    window: int
    features: int
    name: str


@dataclass(frozen=True)
class Welcome:
    """Host -> guest answer to Hello: limits the host accepts for this connection."""

    TYPE: ClassVar[MessageType] = MessageType.WELCOME
    version: int
    max_ranges: int
    window: int
    features: int


@dataclass(frozen=True)
class StartRound:
    """Host -> guest: start a free-page walk and hint under ``cmd_id`` (u32, >= CMD_ID_BASE)."""

    TYPE: ClassVar[MessageType] = MessageType.START_ROUND
    cmd_id: int


@dataclass(frozen=True)
class StopRound:
    """Host -> guest: stop hinting under ``cmd_id``; the guest answers with RoundEnd."""

    TYPE: ClassVar[MessageType] = MessageType.STOP_ROUND
    cmd_id: int


@dataclass(frozen=True, eq=False)
class Hints:
    """Guest -> host: free ranges ``[start_pfn, npages]`` found under round ``cmd_id``.

    ``ranges`` is a read-only ``uint64`` array of shape (n, 2). ``orders`` is not on the wire:
    :class:`~hintpipe.protocol.HostConnection` sets it on the Hints events it delivers, to the
    block order of each range (``log2(npages)``, read-only ``uint8``) its validation computed;
    None on a message that was not validated.
    """

    TYPE: ClassVar[MessageType] = MessageType.HINTS
    cmd_id: int
    ranges: np.ndarray = field(repr=False)
    orders: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranges", _readonly_u64(self.ranges, pairs=True))
        if self.orders is not None:
            orders = np.asarray(self.orders, dtype=np.uint8)
            if orders.shape != (len(self.ranges),):
                raise ValueError(f"{len(self.ranges)} ranges but {orders.shape} orders")
            if orders.flags.writeable:
                orders = orders.copy() if orders.base is not None or orders is self.orders else orders
                orders.flags.writeable = False
            object.__setattr__(self, "orders", orders)

    def __eq__(self, other: object) -> bool:
        if type(other) is not Hints:
            return NotImplemented
        return self.cmd_id == other.cmd_id and np.array_equal(self.ranges, other.ranges)

    __hash__ = None  # type: ignore[assignment]  # arrays are not hashable

    def __repr__(self) -> str:
        return f"Hints(cmd_id={self.cmd_id:#x}, n_ranges={len(self.ranges)})"


@dataclass(frozen=True)
class RoundEnd:
    """Guest -> host: the guest finished (or stopped) round ``cmd_id`` after ``batches`` Hints."""

    TYPE: ClassVar[MessageType] = MessageType.ROUND_END
    cmd_id: int
    batches: int


@dataclass(frozen=True)
class Ack:
    """Host -> guest: the oldest ``count`` un-acked Hints frames are handled (returns credit)."""

    TYPE: ClassVar[MessageType] = MessageType.ACK
    count: int


@dataclass(frozen=True, eq=False)
class Fault:
    """Guest -> host: pages (pfns) the guest is about to write while they are protected.

    ``pfns`` is a read-only one-dimensional ``uint64`` array; ``seq`` (u32) names the request.
    """

    TYPE: ClassVar[MessageType] = MessageType.FAULT
    seq: int
    pfns: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pfns", _readonly_u64(self.pfns, pairs=False))

    def __eq__(self, other: object) -> bool:
        if type(other) is not Fault:
            return NotImplemented
        return self.seq == other.seq and np.array_equal(self.pfns, other.pfns)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Fault(seq={self.seq}, n_pfns={len(self.pfns)})"


@dataclass(frozen=True)
class FaultDone:
    """Host -> guest: the faults of request ``seq`` are handled; the writer may proceed."""

    TYPE: ClassVar[MessageType] = MessageType.FAULT_DONE
    seq: int


@dataclass(frozen=True, eq=False)
class Done:
    """Host -> guest: migration finished; ``summary`` maps str keys to JSON-like values."""

    TYPE: ClassVar[MessageType] = MessageType.DONE
    ok: bool
    summary: dict

    def __eq__(self, other: object) -> bool:
        if type(other) is not Done:
            return NotImplemented
        return self.ok == other.ok and self.summary == other.summary

    __hash__ = None  # type: ignore[assignment]  # summary is a dict


@dataclass(frozen=True)
class Error:
    """Either direction: fatal protocol error ``code`` (an ErrorCode value); sender then closes.

    Unknown codes from a newer peer are kept as plain ints.
    """

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: int
    message: str


@dataclass(frozen=True)
class Bye:
    """Either direction: orderly close with a human-readable ``reason``."""

    TYPE: ClassVar[MessageType] = MessageType.BYE
    reason: str


@dataclass(frozen=True)
class Ping:
    """Either direction, only with KEEPALIVE in force: the sender heard nothing for a while and
    asks whether the peer is alive; the peer answers ``Pong(seq)`` at once."""

    TYPE: ClassVar[MessageType] = MessageType.PING
    seq: int


@dataclass(frozen=True)
class Pong:
    """Either direction: the answer to the peer's ``Ping(seq)``."""

    TYPE: ClassVar[MessageType] = MessageType.PONG
    seq: int


Message = (Hello | Welcome | StartRound | StopRound | Hints | RoundEnd | Ack | Fault | FaultDone | Done | Error | Bye
           | Ping | Pong)
"""Any wire message."""

MESSAGE_CLASSES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (Hello, Welcome, StartRound, StopRound, Hints, RoundEnd, Ack, Fault, FaultDone, Done, Error, Bye,
                Ping, Pong)
}
"""Message type integer -> dataclass."""


# ---- connection events that are not wire messages ------------------------------------------


@dataclass(frozen=True)
class StaleHints:
    """Host-side event: a Hints frame under a round the host already stopped (and whose RoundEnd
    has not arrived). Its ranges were validated and dropped (applying them would be unsafe);
    the frame still holds a credit, so the host must Ack it like any Hints frame."""

    cmd_id: int
    n_ranges: int


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed its byte stream (``receive_data(b"")``) at a frame boundary.

    ``clean`` is True when a Bye or Error frame came first.
    """

    clean: bool


Event = Message | StaleHints | ConnectionClosed
"""Anything ``next_event()`` returns."""
