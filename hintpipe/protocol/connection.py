"""Connection state machines of wire protocol v1 (sans-I/O, in the style of h11/wsproto).

Feed received bytes with ``receive_data`` (``b""`` = end of stream), pull events with
``next_event`` until it returns None, and send the bytes the methods return. Bad peer input
raises :class:`ProtocolError`; the connection is then in state ERROR, ``next_event`` keeps
raising the same error, and the adapter should send ``conn.error(err.code, err.message)`` and
close. Misuse of the local API raises :class:`LocalProtocolError` and changes nothing.

The normative rules (states, command ids, credits) are in ``protocols/wire-v1.md``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

import numpy as np

from .codec import FrameDecoder, encode, encode_ranges, frame, pack_payload, validate_pfns, validate_ranges
from .errors import ErrorCode, LocalProtocolError, ProtocolError
from .messages import (
    CMD_ID_BASE,
    CMD_ID_MAX,
    MAX_OUTSTANDING_FAULTS,
    MAX_RANGES_PER_BATCH,
    MAX_TEXT_LEN,
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
    RoundEnd,
    StaleHints,
    StartRound,
    StopRound,
    Welcome,
)

MAX_OPEN_ROUNDS = 16
"""Round ids the host may have issued whose RoundEnd has not arrived yet (bounds host state)."""


class ConnState(enum.Enum):
    """Connection states (host and guest share the enum; see wire-v1.md "State machines")."""

    START = "START"
    """Guest only: Hello not sent yet."""
    AWAIT_HELLO = "AWAIT_HELLO"
    """Host only: waiting for the guest's Hello."""
    HELLO_RECEIVED = "HELLO_RECEIVED"
    """Host only: Hello received, the application must call welcome()."""
    AWAIT_WELCOME = "AWAIT_WELCOME"
    """Guest only: Hello sent, waiting for Welcome."""
    READY = "READY"
    """Handshake done: rounds, hints, acks and faults flow."""
    DONE = "DONE"
    """Done sent (host) / received (guest): no new rounds; in-flight traffic drains."""
    CLOSED = "CLOSED"
    """Bye sent or received, Error received, or end of stream."""
    ERROR = "ERROR"
    """A protocol error was detected locally or error() was sent."""




def _local(code: ErrorCode, message: str) -> LocalProtocolError:
    return LocalProtocolError(code, message)


class _Connection:
    """Shared receive path, close handling and error poisoning."""

    _role = "?"
    _inbound: frozenset[int] = frozenset()  # message types this side may receive

    def __init__(self, phase: ConnState) -> None:
        self._decoder = FrameDecoder()
        self._phase = phase  # handshake/round phase; closing and errors are tracked apart
        self._error: ProtocolError | None = None
        self._eof = False
        self._closed_reported = False
        self._peer_closed = False  # Bye or Error received
        self._local_closed = False  # Bye or Error sent
        self._error_sent = False
        self._page_count: int | None = None
        self._window: int | None = None
        self._max_ranges: int | None = None
        self._features = 0

    # -- receive side --------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed the stream."""
        if not data:
            self._eof = True
        else:
            self._decoder.feed(data)

    def next_event(self) -> Event | None:
        """Next event, or None when more bytes are needed (or after ConnectionClosed).

        Raises ProtocolError on bad peer input, and again on every later call.
        """
        if self._error is not None:
            raise self._error
        try:
            msg = self._decoder.next_message()
            if msg is None:
                if not self._eof or self._closed_reported:
                    return None
                self._decoder.eof()  # raises on a truncated frame
                self._closed_reported = True
                return ConnectionClosed(clean=self._peer_closed)
            if self._peer_closed:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{type(msg).__name__} after the peer's Bye/Error")
            if isinstance(msg, (Error, Bye)):
                self._peer_closed = True
                return msg
            if msg.TYPE not in self._inbound:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{type(msg).__name__} is never sent to the {self._role}")
            return self._handle(msg)
        except ProtocolError as exc:
            self._error = exc
            raise

    def _handle(self, msg: Message) -> Event:
        raise NotImplementedError

    def _unexpected(self, msg: Message) -> ProtocolError:
        return ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{type(msg).__name__} not allowed in state {self._phase.name}")

    # -- send side -----------------------------------------------------------------------

    def _check_can_send(self, *allowed: ConnState) -> None:
        if self._local_closed or self._peer_closed or self._error is not None:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, f"only error()/bye() allowed in state {self.state.name}")
        if self._phase not in allowed:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, f"not allowed in state {self._phase.name}")

    def error(self, code: int, message: str) -> bytes:
        """Bytes of an Error frame; afterwards this side sends nothing more and closes.

        Allowed in every state (typically right after next_event raised ProtocolError).
        """
        if self._local_closed:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, "connection already closed by this side")
        data = encode(Error(int(code), str(message)[:MAX_TEXT_LEN]))
        self._local_closed = True
        self._error_sent = True
        return data

    def bye(self, reason: str = "") -> bytes:
        """Bytes of a Bye frame (orderly close); afterwards this side sends nothing more."""
        if self._local_closed or self._error is not None:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, "after an error or a close only error() is allowed")
        data = encode(Bye(str(reason)[:MAX_TEXT_LEN]))
        self._local_closed = True
        return data

    # -- common properties ---------------------------------------------------------------

    @property
    def state(self) -> ConnState:
        """Current :class:`ConnState`: ERROR after a detected or sent error, CLOSED after a Bye
        (either way), a received Error or end of stream, else the handshake/round phase."""
        if self._error is not None or self._error_sent:
            return ConnState.ERROR
        if self._local_closed or self._peer_closed or self._closed_reported:
            return ConnState.CLOSED
        return self._phase

    @property
    def established(self) -> bool:
        """True once Welcome was sent (host) / received (guest)."""
        return self._phase in (ConnState.READY, ConnState.DONE)

    @property
    def page_count(self) -> int | None:
        """Guest size in 4 KiB pages (from Hello), None before the handshake."""
        return self._page_count

    @property
    def window(self) -> int | None:
        """Negotiated Hints window (from Welcome), None before it."""
        return self._window

    @property
    def max_ranges(self) -> int | None:
        """Negotiated max ranges per Hints frame (from Welcome), None before it."""
        return self._max_ranges

    @property
    def features(self) -> int:
        """Negotiated feature bits (v1 defines none)."""
        return self._features

    @property
    def local_closed(self) -> bool:
        """True once this side sent Bye or Error."""
        return self._local_closed

    @property
    def peer_closed(self) -> bool:
        """True once the peer sent Bye or Error."""
        return self._peer_closed


class HostConnection(_Connection):
    """Host (consumer) side: receives Hello, Hints, RoundEnd, Fault; issues rounds and acks.

    Events: Hello, Hints (current round; ranges validated), StaleHints (stopped round: drop the
    ranges, but Ack the frame), RoundEnd, Fault, Error, Bye, ConnectionClosed.
    """

    _role = "host"
    _inbound = frozenset({MessageType.HELLO, MessageType.HINTS, MessageType.ROUND_END, MessageType.FAULT})

    def __init__(self) -> None:
        super().__init__(ConnState.AWAIT_HELLO)
        self._guest_window: int | None = None
        self._hello: Hello | None = None
        self._current: int | None = None
        self._last_issued: int | None = None
        self._open: dict[int, int] = {}  # issued cmd_id without RoundEnd -> Hints frames seen
        self._unacked = 0
        self._faults: set[int] = set()
        self.hints_frames = 0
        """Hints frames accepted under the active round."""
        self.hints_ranges = 0
        """Ranges in those frames."""
        self.hints_pages = 0
        """Pages those ranges cover."""
        self.stale_frames = 0
        """Hints frames dropped because their round was already stopped."""
        self.stale_ranges = 0
        """Ranges in those frames."""
        self.acks_sent = 0
        """Ack frames sent."""
        self.fault_frames = 0
        """Fault frames received."""

    # -- receive ---------------------------------------------------------------------------

    def _handle(self, msg: Message) -> Event:
        st = self._phase
        t = type(msg)
        if st is ConnState.AWAIT_HELLO:
            if t is not Hello:
                raise self._unexpected(msg)
            self._hello = msg
            self._page_count = msg.page_count
            self._guest_window = msg.window
            self._phase = ConnState.HELLO_RECEIVED
            return msg
        if not self.established or t is Hello:
            raise self._unexpected(msg)
        if t is Hints:
            return self._on_hints(msg)
        if t is RoundEnd:
            seen = self._open.get(msg.cmd_id)
            if seen is None:
                raise ProtocolError(ErrorCode.UNKNOWN_COMMAND_ID, f"RoundEnd for cmd_id {msg.cmd_id:#x}, which is not an open round")
            if msg.batches != seen:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"RoundEnd {msg.cmd_id:#x} says {msg.batches} batches, host received {seen}")
            del self._open[msg.cmd_id]
            if self._current == msg.cmd_id:
                self._current = None  # the guest finished its walk before being stopped
            return msg
        # Fault
        if len(self._faults) >= MAX_OUTSTANDING_FAULTS:
            raise ProtocolError(ErrorCode.CREDIT_EXCEEDED, f"more than {MAX_OUTSTANDING_FAULTS} outstanding Fault frames")
        if msg.seq in self._faults:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"Fault seq {msg.seq} is already outstanding")
        validate_pfns(msg.pfns, self._page_count)
        self._faults.add(msg.seq)
        self.fault_frames += 1
        return msg

    def _on_hints(self, msg: Hints) -> Event:
        if self._unacked >= self._window:
            raise ProtocolError(ErrorCode.CREDIT_EXCEEDED, f"more than window={self._window} un-acked Hints frames")
        seen = self._open.get(msg.cmd_id)
        if seen is None:
            raise ProtocolError(ErrorCode.UNKNOWN_COMMAND_ID, f"Hints under cmd_id {msg.cmd_id:#x}, which is not an open round")
        n = len(msg.ranges)
        if n > self._max_ranges:
            raise ProtocolError(ErrorCode.BATCH_TOO_LARGE, f"{n} ranges > max_ranges {self._max_ranges}")
        validate_ranges(msg.ranges, self._page_count)
        self._unacked += 1
        self._open[msg.cmd_id] = seen + 1
        if msg.cmd_id == self._current:
            self.hints_frames += 1
            self.hints_ranges += n
            self.hints_pages += int(msg.ranges[:, 1].sum())
            return msg
        # Issued, stopped, RoundEnd not yet received: the hint may predate a write the host no
        # longer tracks for that round, so applying it is unsafe (invariant 2). Drop, but keep
        # the credit accounting intact.
        self.stale_frames += 1
        self.stale_ranges += n
        return StaleHints(msg.cmd_id, n)

    # -- send ------------------------------------------------------------------------------

    def welcome(self, max_ranges: int = MAX_RANGES_PER_BATCH, window: int | None = None, features: int = 0) -> bytes:
        """Answer the Hello: accept ``window`` (default: the guest's) and ``max_ranges``."""
        self._check_can_send(ConnState.HELLO_RECEIVED)
        assert self._hello is not None
        if window is None:
            window = self._guest_window
        if not 1 <= window <= self._guest_window:
            raise _local(ErrorCode.BAD_FIELD, f"window {window} outside [1, guest window {self._guest_window}]")
        if not 1 <= max_ranges <= MAX_RANGES_PER_BATCH:
            raise _local(ErrorCode.BAD_FIELD, f"max_ranges {max_ranges} outside [1, {MAX_RANGES_PER_BATCH}]")
        features &= self._hello.features  # never enable what the guest did not offer
        data = encode(Welcome(PROTOCOL_VERSION, max_ranges, window, features))
        self._window, self._max_ranges, self._features = window, max_ranges, features
        self._phase = ConnState.READY
        return data

    def start_round(self, cmd_id: int | None = None) -> bytes:
        """Start a round; ``cmd_id`` defaults to the next id. Needs no active round."""
        self._check_can_send(ConnState.READY)
        if self._current is not None:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, f"round {self._current:#x} is still active")
        if cmd_id is None:
            cmd_id = CMD_ID_BASE if self._last_issued is None else self._last_issued + 1
        if type(cmd_id) is not int or not CMD_ID_BASE <= cmd_id <= CMD_ID_MAX:
            raise _local(ErrorCode.BAD_FIELD, f"cmd_id {cmd_id!r} outside [{CMD_ID_BASE:#x}, {CMD_ID_MAX:#x}]")
        if self._last_issued is not None and cmd_id <= self._last_issued:
            raise _local(ErrorCode.BAD_FIELD, f"cmd_id {cmd_id:#x} not above the last issued {self._last_issued:#x}")
        if len(self._open) >= MAX_OPEN_ROUNDS:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, f"{MAX_OPEN_ROUNDS} rounds still await RoundEnd")
        data = encode(StartRound(cmd_id))
        self._current = self._last_issued = cmd_id
        self._open[cmd_id] = 0
        return data

    def stop_round(self) -> bytes:
        """Stop the active round; later Hints under it arrive as StaleHints until RoundEnd."""
        self._check_can_send(ConnState.READY)
        if self._current is None:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, "no active round")
        data = encode(StopRound(self._current))
        self._current = None
        return data

    def ack(self, count: int = 1) -> bytes:
        """Return ``count`` credits: the oldest ``count`` un-acked Hints/StaleHints are handled."""
        self._check_can_send(ConnState.READY, ConnState.DONE)
        if type(count) is not int or not 1 <= count <= self._unacked:
            raise _local(ErrorCode.BAD_FIELD, f"ack count {count!r} outside [1, {self._unacked} un-acked]")
        data = encode(Ack(count))
        self._unacked -= count
        self.acks_sent += 1
        return data

    def fault_done(self, seq: int) -> bytes:
        """Release the writer waiting on Fault ``seq``."""
        self._check_can_send(ConnState.READY, ConnState.DONE)
        if seq not in self._faults:
            raise _local(ErrorCode.BAD_FIELD, f"Fault seq {seq} is not outstanding")
        data = encode(FaultDone(seq))
        self._faults.discard(seq)
        return data

    def done(self, ok: bool, summary: dict[str, Any] | None = None) -> bytes:
        """Migration finished; requires no active round (call stop_round first)."""
        self._check_can_send(ConnState.READY)
        if self._current is not None:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, f"round {self._current:#x} is still active")
        data = encode(Done(bool(ok), dict(summary or {})))
        self._phase = ConnState.DONE
        return data

    # -- properties ------------------------------------------------------------------------

    @property
    def current_cmd_id(self) -> int | None:
        """Id of the active round, None if none (not started, stopped, or ended by the guest)."""
        return self._current

    @property
    def open_rounds(self) -> frozenset[int]:
        """Issued ids whose RoundEnd has not arrived (includes the active one)."""
        return frozenset(self._open)

    @property
    def unacked(self) -> int:
        """Hints frames received (incl. stale) and not yet acked."""
        return self._unacked

    @property
    def outstanding_faults(self) -> frozenset[int]:
        """Fault seqs received without a FaultDone yet."""
        return frozenset(self._faults)

    @property
    def hello(self) -> Hello | None:
        """The guest's Hello, once received."""
        return self._hello


class GuestConnection(_Connection):
    """Guest (producer) side: sends Hello, Hints, RoundEnd, Fault; tracks credits and rounds.

    Events: Welcome, StartRound, StopRound, Ack, FaultDone, Done, Error, Bye, ConnectionClosed.
    """

    _role = "guest"
    _inbound = frozenset(
        {MessageType.WELCOME, MessageType.START_ROUND, MessageType.STOP_ROUND, MessageType.ACK, MessageType.FAULT_DONE, MessageType.DONE}
    )

    def __init__(self) -> None:
        super().__init__(ConnState.START)
        self._offered_window = 0
        self._offered_features = 0
        self._active: int | None = None
        self._last_started: int | None = None
        self._open: dict[int, int] = {}  # started, RoundEnd not sent -> Hints frames sent
        self._in_flight = 0
        self._faults: set[int] = set()

    # -- send ------------------------------------------------------------------------------

    def hello(self, page_count: int, window: int = 256, name: str = "", features: int = 0) -> bytes:
        """First frame: guest size in 4 KiB pages, requested window, a name for logs."""
        self._check_can_send(ConnState.START)
        data = encode(Hello(PROTOCOL_VERSION, PAGE_SIZE, page_count, window, features, name))
        self._page_count, self._offered_window, self._offered_features = page_count, window, features
        self._phase = ConnState.AWAIT_WELCOME
        return data

    def hints(self, cmd_id: int, ranges: np.ndarray, *, validate: bool = True) -> bytes:
        """One Hints frame for the active round; consumes one credit.

        ``validate`` re-checks the ranges locally (vectorised; cheap) so a buggy producer
        fails here instead of getting the connection killed by the host.
        """
        self._check_can_send(ConnState.READY)
        if cmd_id != self._active:
            raise _local(ErrorCode.UNKNOWN_COMMAND_ID, f"cmd_id {cmd_id!r} is not the active round ({self._active!r})")
        if self._in_flight >= self._window:
            raise _local(ErrorCode.CREDIT_EXCEEDED, f"no credit: {self._in_flight} frames un-acked, window {self._window}")
        arr = np.asarray(ranges)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise _local(ErrorCode.BAD_FIELD, f"ranges must have shape (n, 2), got {arr.shape}")
        if not 1 <= len(arr) <= self._max_ranges:
            raise _local(ErrorCode.BATCH_TOO_LARGE, f"{len(arr)} ranges outside [1, max_ranges {self._max_ranges}]")
        blob = encode_ranges(arr)
        if validate:
            try:
                validate_ranges(np.frombuffer(blob, dtype="<u8").astype(np.uint64, copy=False).reshape(-1, 2), self._page_count)
            except ProtocolError as exc:
                raise _local(exc.code, exc.message) from None
        data = frame(pack_payload([int(MessageType.HINTS), cmd_id, blob]))
        self._in_flight += 1
        self._open[cmd_id] += 1
        return data

    def round_end(self, cmd_id: int, batches: int | None = None) -> bytes:
        """End round ``cmd_id`` (walk finished, or StopRound obeyed). ``batches`` defaults to
        the Hints frames this connection sent under it; exactly one RoundEnd per round."""
        self._check_can_send(ConnState.READY, ConnState.DONE)
        sent = self._open.get(cmd_id)
        if sent is None:
            raise _local(ErrorCode.UNKNOWN_COMMAND_ID, f"cmd_id {cmd_id!r} is not an open round")
        if batches is None:
            batches = sent
        if batches != sent:
            raise _local(ErrorCode.BAD_FIELD, f"batches {batches} != {sent} Hints frames sent")
        data = encode(RoundEnd(cmd_id, batches))
        del self._open[cmd_id]
        if self._active == cmd_id:
            self._active = None
        return data

    def fault(self, seq: int, pfns: Iterable[int] | np.ndarray) -> bytes:
        """Report pages about to be written; wait for FaultDone(seq) before writing them."""
        self._check_can_send(ConnState.READY, ConnState.DONE)
        if len(self._faults) >= MAX_OUTSTANDING_FAULTS:
            raise _local(ErrorCode.CREDIT_EXCEEDED, f"{MAX_OUTSTANDING_FAULTS} Faults outstanding")
        if seq in self._faults:
            raise _local(ErrorCode.BAD_FIELD, f"Fault seq {seq} already outstanding")
        try:
            msg = Fault(seq, np.asarray(pfns))
            validate_pfns(msg.pfns, self._page_count)
        except ProtocolError as exc:
            raise _local(exc.code, exc.message) from None
        except (TypeError, ValueError) as exc:
            raise _local(ErrorCode.BAD_FIELD, str(exc)) from None
        data = encode(msg)
        self._faults.add(seq)
        return data

    # -- receive ---------------------------------------------------------------------------

    def _handle(self, msg: Message) -> Event:
        st = self._phase
        t = type(msg)
        if st is ConnState.AWAIT_WELCOME:
            if t is not Welcome:
                raise self._unexpected(msg)
            if msg.window > self._offered_window:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"Welcome window {msg.window} > requested {self._offered_window}")
            if msg.features & ~self._offered_features:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"Welcome enables features {msg.features:#x} not offered")
            self._window, self._max_ranges, self._features = msg.window, msg.max_ranges, msg.features
            self._phase = ConnState.READY
            return msg
        if not self.established or t is Welcome:
            raise self._unexpected(msg)
        if t is Ack:
            if msg.count > self._in_flight:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"Ack of {msg.count} frames, only {self._in_flight} in flight")
            self._in_flight -= msg.count
            return msg
        if t is FaultDone:
            if msg.seq not in self._faults:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"FaultDone for seq {msg.seq}, which is not outstanding")
            self._faults.discard(msg.seq)
            return msg
        if st is not ConnState.READY:  # StartRound / StopRound / Done after Done
            raise self._unexpected(msg)
        if t is StartRound:
            if msg.cmd_id < CMD_ID_BASE:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"StartRound cmd_id {msg.cmd_id:#x} below {CMD_ID_BASE:#x}")
            if self._last_started is not None and msg.cmd_id <= self._last_started:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"StartRound cmd_id {msg.cmd_id:#x} not above {self._last_started:#x}")
            if self._active is not None:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"StartRound while round {self._active:#x} is active")
            if len(self._open) >= MAX_OPEN_ROUNDS:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"more than {MAX_OPEN_ROUNDS} rounds without RoundEnd")
            self._active = self._last_started = msg.cmd_id
            self._open[msg.cmd_id] = 0
            return msg
        if t is StopRound:
            if self._last_started is None or not CMD_ID_BASE <= msg.cmd_id <= self._last_started:
                raise ProtocolError(ErrorCode.UNKNOWN_COMMAND_ID, f"StopRound for cmd_id {msg.cmd_id:#x}, never started")
            if msg.cmd_id in self._open and msg.cmd_id != self._active:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"StopRound {msg.cmd_id:#x} twice")
            if msg.cmd_id == self._active:
                self._active = None  # still open: the application must answer round_end()
            # else: the guest already sent RoundEnd for it (crossed in flight); nothing to do
            return msg
        # Done
        self._active = None
        self._phase = ConnState.DONE
        return msg

    # -- properties ------------------------------------------------------------------------

    @property
    def active_cmd_id(self) -> int | None:
        """Round the guest may hint under now (started, not stopped, not ended)."""
        return self._active

    @property
    def open_rounds(self) -> frozenset[int]:
        """Started rounds still owed a RoundEnd (the active one and stopped ones)."""
        return frozenset(self._open)

    @property
    def in_flight(self) -> int:
        """Hints frames sent and not yet acked."""
        return self._in_flight

    @property
    def credits_available(self) -> int:
        """Hints frames that may be sent now without exceeding the window (0 before Welcome)."""
        return 0 if self._window is None else self._window - self._in_flight

    @property
    def can_send_hints(self) -> bool:
        """True when hints() would not fail for lack of credit, round or state."""
        return (
            self.state is ConnState.READY
            and self._active is not None
            and self.credits_available > 0
        )

    @property
    def outstanding_faults(self) -> frozenset[int]:
        """Fault seqs sent without FaultDone yet."""
        return frozenset(self._faults)

