"""Connection state machines of wire protocol v1 (sans-I/O, in the style of h11/wsproto).

Feed received bytes with ``receive_data`` (``b""`` = end of stream), pull events with
``next_event`` until it returns None, and send the bytes the methods return. Bad peer input
raises :class:`ProtocolError`; the connection is then in state ERROR, ``next_event`` keeps
raising the same error, and the adapter should send ``conn.error(err.code, err.message)`` and
close. Misuse of the local API raises :class:`LocalProtocolError` and changes nothing.

Which message may come or go in which state, and where it leads, is the table of
:mod:`hintpipe.protocol.states`; the classes here drive it and add the checks that depend on
more than the state (command ids, credits, ranges, faults). The normative rules are in
``protocols/wire-v1.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .codec import (
    FrameDecoder, as_u64_ranges, encode, encode_ranges, frame, pack_payload, validate_pfns, validate_ranges,
)
from .errors import ErrorCode, LocalProtocolError, ProtocolError
from .states import SENT_BY, ConnState, Direction, Role, transition
from .messages import (
    CMD_ID_BASE,
    CMD_ID_MAX,
    FEATURE_KEEPALIVE,
    KNOWN_FEATURES,
    MAX_OUTSTANDING_FAULTS,
    MAX_RANGES_PER_BATCH,
    MAX_TEXT_LEN,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    U32_MAX,
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

MAX_OPEN_ROUNDS = 16
"""Round ids the host may have issued whose RoundEnd has not arrived yet (bounds host state)."""


def _local(code: ErrorCode, message: str) -> LocalProtocolError:
    return LocalProtocolError(code, message)


class _Connection:
    """Shared receive path, close handling and error poisoning; subclasses give the role and a
    handler per message type they receive (its checks and effects)."""

    _role: Role

    def __init__(self, phase: ConnState) -> None:
        self._decoder = FrameDecoder()
        self._phase = phase  # handshake/round phase: moves only through the transition table
        self._local_close: ConnState | None = None  # CLOSED after sending Bye, ERROR after Error
        self._peer_close: ConnState | None = None  # CLOSED once the peer's Bye or Error arrived
        self._error: ProtocolError | None = None
        self._eof = False
        self._closed_reported = False
        self._page_count: int | None = None
        self._window: int | None = None
        self._max_ranges: int | None = None
        self._features = 0
        self._ping_sent: int | None = None  # seq of this side's Ping the peer has not answered
        self._ping_received: int | None = None  # seq of the peer's Ping this side has not answered
        self._next_ping = 0
        peer = Role.GUEST if self._role is Role.HOST else Role.HOST
        self._inbound = SENT_BY[peer]

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
                return ConnectionClosed(clean=self._peer_close is not None)
            if self._peer_close is not None:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{type(msg).__name__} after the peer's Bye/Error")
            if msg.TYPE not in self._inbound:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{type(msg).__name__} is never sent to the {self._role.value}")
            nxt = transition(self._role, self._phase, Direction.RECEIVE, msg.TYPE)
            if nxt is None:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{type(msg).__name__} not allowed in state {self._phase.name}")
            if msg.TYPE in (MessageType.ERROR, MessageType.BYE):
                self._peer_close = nxt  # closing is kept apart from the phase
                return msg
            ev = self._on_keepalive(msg) if msg.TYPE in (MessageType.PING, MessageType.PONG) else self._receive(msg)
            self._phase = nxt
            return ev
        except ProtocolError as exc:
            self._error = exc
            raise

    def _receive(self, msg: Message) -> Event:
        """Check ``msg`` (allowed in this state) against the connection and apply its effects."""
        raise NotImplementedError

    def _on_keepalive(self, msg: Ping | Pong) -> Event:
        name = type(msg).__name__
        if not self.keepalive:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{name} but the KEEPALIVE feature is not in force")
        if type(msg) is Ping:
            if self._ping_received is not None:
                raise ProtocolError(ErrorCode.CREDIT_EXCEEDED, f"Ping {msg.seq} before Ping {self._ping_received} was answered")
            self._ping_received = msg.seq
        else:
            if self._ping_sent != msg.seq:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"Pong {msg.seq} answers no outstanding Ping")
            self._ping_sent = None
        return msg

    # -- send side -----------------------------------------------------------------------

    def _check_can_send(self, mtype: MessageType) -> ConnState:
        """The state after sending ``mtype`` now; LocalProtocolError if it may not be sent."""
        if self._local_close is not None or self._peer_close is not None or self._error is not None:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, f"only error()/bye() allowed in state {self.state.name}")
        nxt = transition(self._role, self._phase, Direction.SEND, mtype)
        if nxt is None:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, f"not allowed in state {self._phase.name}")
        return nxt

    def error(self, code: int, message: str) -> bytes:
        """Bytes of an Error frame; afterwards this side sends nothing more and closes.

        Allowed in every state (typically right after next_event raised ProtocolError).
        """
        if self._local_close is not None:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, "connection already closed by this side")
        data = encode(Error(int(code), str(message)[:MAX_TEXT_LEN]))
        self._local_close = transition(self._role, self._phase, Direction.SEND, MessageType.ERROR)
        return data

    def ping(self) -> bytes:
        """Bytes of a Ping (KEEPALIVE in force, READY or DONE, the previous Ping answered)."""
        self._check_can_send(MessageType.PING)
        if not self.keepalive:
            raise _local(ErrorCode.UNSUPPORTED, "the KEEPALIVE feature is not in force")
        if self._ping_sent is not None:
            raise _local(ErrorCode.CREDIT_EXCEEDED, f"Ping {self._ping_sent} is not answered yet")
        seq = self._next_ping
        data = encode(Ping(seq))
        self._ping_sent = seq
        self._next_ping = (seq + 1) & U32_MAX
        return data

    def pong(self) -> bytes:
        """Bytes of the Pong that answers the peer's outstanding Ping."""
        self._check_can_send(MessageType.PONG)
        if self._ping_received is None:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, "no Ping of the peer to answer")
        data = encode(Pong(self._ping_received))
        self._ping_received = None
        return data

    def bye(self, reason: str = "") -> bytes:
        """Bytes of a Bye frame (orderly close); afterwards this side sends nothing more."""
        if self._local_close is not None or self._error is not None:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, "after an error or a close only error() is allowed")
        data = encode(Bye(str(reason)[:MAX_TEXT_LEN]))
        self._local_close = transition(self._role, self._phase, Direction.SEND, MessageType.BYE)
        return data

    # -- common properties ---------------------------------------------------------------

    @property
    def state(self) -> ConnState:
        """Current :class:`ConnState`: ERROR after a detected or sent error, CLOSED after a Bye
        (either way), a received Error or end of stream, else the handshake/round phase."""
        if self._error is not None:
            return ConnState.ERROR
        if self._local_close is not None:
            return self._local_close
        if self._peer_close is not None or self._closed_reported:
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
        """Negotiated feature bits (:data:`~hintpipe.protocol.messages.FEATURE_KEEPALIVE`)."""
        return self._features

    @property
    def keepalive(self) -> bool:
        """True once Ping/Pong were agreed (KEEPALIVE in Welcome's features)."""
        return bool(self._features & FEATURE_KEEPALIVE)

    @property
    def ping_outstanding(self) -> bool:
        """True while this side's last Ping has not been answered."""
        return self._ping_sent is not None

    @property
    def ping_to_answer(self) -> bool:
        """True while the peer's last Ping has not been answered with :meth:`pong`."""
        return self._ping_received is not None

    @property
    def local_closed(self) -> bool:
        """True once this side sent Bye or Error."""
        return self._local_close is not None

    @property
    def peer_closed(self) -> bool:
        """True once the peer sent Bye or Error."""
        return self._peer_close is not None


class HostConnection(_Connection):
    """Host (consumer) side: receives Hello, Hints, RoundEnd, Fault; issues rounds and acks.

    Events: Hello, Hints (current round; ranges validated), StaleHints (stopped round: drop the
    ranges, but Ack the frame), RoundEnd, Fault, Ping (answer with :meth:`pong`), Pong, Error,
    Bye, ConnectionClosed.

    ``drop_stale=False`` turns the stale-drop guard off: a frame under a stopped command id comes
    out as Hints, to be applied (wire-v1 section 6.3 forbids it; this exists only to show that the
    loss oracle catches what the guard protects against).
    """

    _role = Role.HOST

    def __init__(self, *, drop_stale: bool = True) -> None:
        super().__init__(ConnState.AWAIT_HELLO)
        self.drop_stale = drop_stale
        self._guest_window: int | None = None
        self._hello: Hello | None = None
        self._current: int | None = None
        self._last_issued: int | None = None
        self._open: dict[int, int] = {}  # issued cmd_id without RoundEnd -> Hints frames seen
        self._unacked = 0
        self._faults: set[int] = set()
        self.hints_frames = 0
        """Hints frames accepted under the active round (with ``drop_stale=False``: any open one)."""
        self.hints_ranges = 0
        """Ranges in those frames."""
        self.hints_pages = 0
        """Pages those ranges cover."""
        self.stale_frames = 0
        """Hints frames dropped because their round was already stopped."""
        self.stale_ranges = 0
        """Ranges in those frames."""
        self.stale_frames_applied = 0
        """Hints frames under a stopped round passed on to be applied (stale-drop turned off)."""
        self.acks_sent = 0
        """Ack frames sent."""
        self.fault_frames = 0
        """Fault frames received."""

    # -- receive ---------------------------------------------------------------------------

    def _receive(self, msg: Message) -> Event:
        t = type(msg)
        if t is Hints:
            return self._on_hints(msg)
        if t is RoundEnd:
            return self._on_round_end(msg)
        if t is Fault:
            return self._on_fault(msg)
        return self._on_hello(msg)

    def _on_hello(self, msg: Hello) -> Event:
        self._hello = msg
        self._page_count = msg.page_count
        self._guest_window = msg.window
        return msg

    def _on_round_end(self, msg: RoundEnd) -> Event:
        seen = self._open.get(msg.cmd_id)
        if seen is None:
            raise ProtocolError(ErrorCode.UNKNOWN_COMMAND_ID, f"RoundEnd for cmd_id {msg.cmd_id:#x}, which is not an open round")
        if msg.batches != seen:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"RoundEnd {msg.cmd_id:#x} says {msg.batches} batches, host received {seen}")
        del self._open[msg.cmd_id]
        if self._current == msg.cmd_id:
            self._current = None  # the guest finished its walk before being stopped
        return msg

    def _on_fault(self, msg: Fault) -> Event:
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
        orders = validate_ranges(msg.ranges, self._page_count, self._max_ranges)
        n = len(msg.ranges)
        self._unacked += 1
        self._open[msg.cmd_id] = seen + 1
        if msg.cmd_id == self._current or not self.drop_stale:
            self.stale_frames_applied += msg.cmd_id != self._current
            self.hints_frames += 1
            self.hints_ranges += n
            self.hints_pages += int(msg.ranges[:, 1].sum())
            # the message was decoded for this event alone: give it its orders in place rather
            # than building (and re-checking) a second Hints per frame
            orders.flags.writeable = False
            object.__setattr__(msg, "orders", orders)
            return msg
        # Issued, stopped, RoundEnd not yet received: the hint may predate a write the host no
        # longer tracks for that round, so applying it is unsafe (wire-v1 section 6.3). Drop, but keep
        # the credit accounting intact.
        self.stale_frames += 1
        self.stale_ranges += n
        return StaleHints(msg.cmd_id, n)

    # -- send ------------------------------------------------------------------------------

    def welcome(self, max_ranges: int = MAX_RANGES_PER_BATCH, window: int | None = None, features: int = 0) -> bytes:
        """Answer the Hello: accept ``window`` (default: the guest's) and ``max_ranges``;
        ``features`` are the bits this host supports, of which those the guest offered (and this
        implementation knows) are put in force."""
        nxt = self._check_can_send(MessageType.WELCOME)
        assert self._hello is not None
        if window is None:
            window = self._guest_window
        if not 1 <= window <= self._guest_window:
            raise _local(ErrorCode.BAD_FIELD, f"window {window} outside [1, guest window {self._guest_window}]")
        if not 1 <= max_ranges <= MAX_RANGES_PER_BATCH:
            raise _local(ErrorCode.BAD_FIELD, f"max_ranges {max_ranges} outside [1, {MAX_RANGES_PER_BATCH}]")
        features &= self._hello.features & KNOWN_FEATURES  # never enable what the guest did not offer
        data = encode(Welcome(PROTOCOL_VERSION, max_ranges, window, features))
        self._window, self._max_ranges, self._features = window, max_ranges, features
        self._phase = nxt
        return data

    def start_round(self, cmd_id: int | None = None) -> bytes:
        """Start a round; ``cmd_id`` defaults to the next id. Needs no active round."""
        self._check_can_send(MessageType.START_ROUND)
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
        self._check_can_send(MessageType.STOP_ROUND)
        if self._current is None:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, "no active round")
        data = encode(StopRound(self._current))
        self._current = None
        return data

    def ack(self, count: int = 1) -> bytes:
        """Return ``count`` credits: the oldest ``count`` un-acked Hints/StaleHints are handled."""
        self._check_can_send(MessageType.ACK)
        if type(count) is not int or not 1 <= count <= self._unacked:
            raise _local(ErrorCode.BAD_FIELD, f"ack count {count!r} outside [1, {self._unacked} un-acked]")
        data = encode(Ack(count))
        self._unacked -= count
        self.acks_sent += 1
        return data

    def fault_done(self, seq: int) -> bytes:
        """Release the writer waiting on Fault ``seq``."""
        self._check_can_send(MessageType.FAULT_DONE)
        if seq not in self._faults:
            raise _local(ErrorCode.BAD_FIELD, f"Fault seq {seq} is not outstanding")
        data = encode(FaultDone(seq))
        self._faults.discard(seq)
        return data

    def done(self, ok: bool, summary: dict[str, Any] | None = None) -> bytes:
        """Migration finished; requires no active round (call stop_round first)."""
        nxt = self._check_can_send(MessageType.DONE)
        if self._current is not None:
            raise _local(ErrorCode.UNEXPECTED_MESSAGE, f"round {self._current:#x} is still active")
        data = encode(Done(bool(ok), dict(summary or {})))
        self._phase = nxt
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

    Events: Welcome, StartRound, StopRound, Ack, FaultDone, Done, Ping (answer with
    :meth:`pong`), Pong, Error, Bye, ConnectionClosed.
    """

    _role = Role.GUEST

    def __init__(self) -> None:
        super().__init__(ConnState.START)
        self._offered_window = 0
        self._offered_features = 0
        self._active: int | None = None
        self._last_started: int | None = None
        self._open: dict[int, int] = {}  # started, RoundEnd not sent -> Hints frames sent
        self._in_flight = 0
        self._faults: set[int] = set()
        self.hints_frames = 0
        """Hints frames sent."""
        self.hints_ranges = 0
        """Ranges in those frames."""
        self.hints_pages = 0
        """Pages those ranges cover."""

    # -- send ------------------------------------------------------------------------------

    def hello(self, page_count: int, window: int = 256, name: str = "", features: int = 0) -> bytes:
        """First frame: guest size in 4 KiB pages, requested window, a name for logs."""
        nxt = self._check_can_send(MessageType.HELLO)
        data = encode(Hello(PROTOCOL_VERSION, PAGE_SIZE, page_count, window, features, name))
        self._page_count, self._offered_window, self._offered_features = page_count, window, features
        self._phase = nxt
        return data

    def hints(self, cmd_id: int, ranges: np.ndarray, *, validate: bool = True) -> bytes:
        """One Hints frame for the active round; consumes one credit.

        ``validate`` checks the ranges as the host will (vectorised; cheap) before encoding them,
        so a buggy producer fails here instead of getting the connection killed by the host.
        """
        self._check_can_send(MessageType.HINTS)
        if self._active is None or cmd_id != self._active:  # (None is no round: found by fuzzing)
            raise _local(ErrorCode.UNKNOWN_COMMAND_ID, f"cmd_id {cmd_id!r} is not the active round ({self._active!r})")
        if self._in_flight >= self._window:
            raise _local(ErrorCode.CREDIT_EXCEEDED, f"no credit: {self._in_flight} frames un-acked, window {self._window}")
        arr = as_u64_ranges(ranges)
        if not 1 <= len(arr) <= self._max_ranges:
            raise _local(ErrorCode.BATCH_TOO_LARGE, f"{len(arr)} ranges outside [1, max_ranges {self._max_ranges}]")
        if validate:
            try:
                validate_ranges(arr, self._page_count, self._max_ranges)
            except ProtocolError as exc:
                raise _local(exc.code, exc.message) from None
        data = frame(pack_payload([int(MessageType.HINTS), cmd_id, encode_ranges(arr)]))
        self._in_flight += 1
        self._open[cmd_id] += 1
        self.hints_frames += 1
        self.hints_ranges += len(arr)
        self.hints_pages += int(arr[:, 1].sum())
        return data

    def round_end(self, cmd_id: int, batches: int | None = None) -> bytes:
        """End round ``cmd_id`` (walk finished, or StopRound obeyed). ``batches`` defaults to
        the Hints frames this connection sent under it; exactly one RoundEnd per round."""
        self._check_can_send(MessageType.ROUND_END)
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
        self._check_can_send(MessageType.FAULT)
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

    def _receive(self, msg: Message) -> Event:
        t = type(msg)
        if t is Ack:
            return self._on_ack(msg)
        if t is FaultDone:
            return self._on_fault_done(msg)
        if t is StartRound:
            return self._on_start_round(msg)
        if t is StopRound:
            return self._on_stop_round(msg)
        if t is Done:
            self._active = None
            return msg
        return self._on_welcome(msg)

    def _on_welcome(self, msg: Welcome) -> Event:
        if msg.window > self._offered_window:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"Welcome window {msg.window} > requested {self._offered_window}")
        if msg.features & ~self._offered_features:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"Welcome enables features {msg.features:#x} not offered")
        self._window, self._max_ranges, self._features = msg.window, msg.max_ranges, msg.features
        return msg

    def _on_ack(self, msg: Ack) -> Event:
        if msg.count > self._in_flight:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"Ack of {msg.count} frames, only {self._in_flight} in flight")
        self._in_flight -= msg.count
        return msg

    def _on_fault_done(self, msg: FaultDone) -> Event:
        if msg.seq not in self._faults:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"FaultDone for seq {msg.seq}, which is not outstanding")
        self._faults.discard(msg.seq)
        return msg

    def _on_start_round(self, msg: StartRound) -> Event:
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

    def _on_stop_round(self, msg: StopRound) -> Event:
        if self._last_started is None or not CMD_ID_BASE <= msg.cmd_id <= self._last_started:
            raise ProtocolError(ErrorCode.UNKNOWN_COMMAND_ID, f"StopRound for cmd_id {msg.cmd_id:#x}, never started")
        if msg.cmd_id in self._open and msg.cmd_id != self._active:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"StopRound {msg.cmd_id:#x} twice")
        if msg.cmd_id == self._active:
            self._active = None  # still open: the application must answer round_end()
        # else: the guest already sent RoundEnd for it (crossed in flight); nothing to do
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

