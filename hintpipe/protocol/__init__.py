"""hintpipe wire protocol v1 (sans-I/O): messages, codec and connection state machines.

Normative spec: ``protocols/wire-v1.md``. Nothing here does I/O or imports trio: feed bytes in,
get events out, send the bytes the methods return.
"""

from .codec import (
    FrameDecoder,
    decode,
    decode_payload,
    decode_pfns,
    decode_ranges,
    encode,
    encode_payload,
    encode_ranges,
    validate_pfns,
    validate_ranges,
)
from .connection import MAX_OPEN_ROUNDS, GuestConnection, HostConnection
from .errors import ErrorCode, LocalProtocolError, ProtocolError
from .messages import (
    CMD_ID_BASE,
    CMD_ID_MAX,
    FEATURE_KEEPALIVE,
    KNOWN_FEATURES,
    MAX_FAULT_PFNS,
    MAX_FRAME_PAYLOAD,
    MAX_NAME_LEN,
    MAX_OUTSTANDING_FAULTS,
    MAX_PAGE_COUNT,
    MAX_RANGE_ORDER,
    MAX_RANGES_PER_BATCH,
    MAX_TEXT_LEN,
    MAX_WINDOW,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    ConnectionClosed,
    Done,
    Error,
    Event,
    Fault,
    FaultDone,
    Hello,
    Hints,
    Message,
    MessageType,
    Ping,
    Pong,
    RoundEnd,
    StaleHints,
    StartRound,
    StopRound,
    Welcome,
)
from .states import ConnState, Direction, Role

__all__ = [
    "FrameDecoder", "decode", "decode_payload", "decode_pfns", "decode_ranges", "encode",
    "encode_payload", "encode_ranges", "validate_pfns", "validate_ranges",
    "MAX_OPEN_ROUNDS", "ConnState", "Direction", "Role", "GuestConnection", "HostConnection",
    "ErrorCode", "LocalProtocolError", "ProtocolError",
    "CMD_ID_BASE", "CMD_ID_MAX", "FEATURE_KEEPALIVE", "KNOWN_FEATURES", "MAX_FAULT_PFNS", "MAX_FRAME_PAYLOAD", "MAX_NAME_LEN",
    "MAX_OUTSTANDING_FAULTS", "MAX_PAGE_COUNT", "MAX_RANGE_ORDER", "MAX_RANGES_PER_BATCH",
    "MAX_TEXT_LEN", "MAX_WINDOW", "PAGE_SIZE", "PROTOCOL_VERSION",
    "Ack", "Bye", "ConnectionClosed", "Done", "Error", "Event", "Fault", "FaultDone", "Hello",
    "Hints", "Message", "MessageType", "Ping", "Pong", "RoundEnd", "StaleHints", "StartRound", "StopRound", "Welcome",
]
