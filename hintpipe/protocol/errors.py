"""Error codes and exceptions of wire protocol v1 (see ``protocols/wire-v1.md``, "Errors").

The numbers are part of the wire format (they travel in ``Error`` frames) and never change
meaning; new codes are only ever appended.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Protocol error codes carried by ``Error(code, message)`` frames."""

    MALFORMED_FRAME = 1
    """Not a valid frame: empty/truncated payload, invalid msgpack, trailing bytes, not an array."""
    FRAME_TOO_LARGE = 2
    """Announced payload length above MAX_FRAME_PAYLOAD (checked before buffering the payload)."""
    UNKNOWN_MESSAGE = 3
    """The message type integer is not defined in this version."""
    BAD_VERSION = 4
    """Hello/Welcome carries a protocol version other than 1."""
    BAD_FIELD = 5
    """Wrong field count, wrong field type, or a value out of its documented range."""
    RANGE_OUT_OF_BOUNDS = 6
    """A hinted range (or faulted pfn) reaches past the guest's page_count."""
    RANGE_UNALIGNED = 7
    """npages is zero, not a power of two, above 2**MAX_RANGE_ORDER, or start % npages != 0."""
    RANGE_OVERLAP = 8
    """Two ranges of one Hints batch share a page."""
    BATCH_TOO_LARGE = 9
    """A Hints batch holds more ranges than the negotiated max_ranges."""
    UNEXPECTED_MESSAGE = 10
    """A well-formed message that is not allowed in the receiver's current state."""
    CREDIT_EXCEEDED = 11
    """More un-acked Hints frames (or outstanding Faults) than the window allows."""
    UNKNOWN_COMMAND_ID = 12
    """A cmd_id never issued by the host, or one whose RoundEnd was already sent."""
    UNSUPPORTED = 13
    """A valid but unsupported parameter (e.g. page_size != 4096)."""
    INTERNAL = 14
    """The sender failed internally; not the receiver's fault."""
    TIMEOUT = 15
    """The peer sent no frame within the sender's idle bound (with KEEPALIVE: not even a Pong)."""


class ProtocolError(Exception):
    """Bad input from the peer (or, as LocalProtocolError, bad use of the local API).

    ``code`` is an :class:`ErrorCode`, ``message`` a short human-readable reason;
    ``str(err)`` is ``"CODE_NAME: message"``. Every malformed or disallowed input raises this
    type and no other, so an adapter can send ``error(err.code, err.message)`` and close.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = ErrorCode(code)
        self.message = str(message)
        super().__init__(self.code, self.message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


class LocalProtocolError(ProtocolError):
    """The local application asked for something the protocol forbids (e.g. Hints without
    credit, a non-increasing cmd_id). Raised by the send-side methods; nothing was emitted and
    the connection state is unchanged, so the caller may retry later."""
