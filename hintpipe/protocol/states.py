"""The state machines of wire protocol v1 as data: which message moves a connection where.

One table per role (the way h11's ``_state.py`` keeps its transitions): for a connection of
``role`` in ``state``, sending or receiving a message of ``type`` leads to the next state; a
(role, state, direction, type) not in :data:`TRANSITIONS` is not allowed (received, it is
``UNEXPECTED_MESSAGE``; sent, the sending method refuses). :data:`ROWS` are the rows of the
tables in ``protocols/wire-v1.md`` section 5, one for one (a test compares them); ``None`` as the
next state means "unchanged". The checks that depend on more than the state (command ids,
credits, ranges) stay with :mod:`hintpipe.protocol.connection`, which drives this table.

Ping and Pong (keepalive, both directions) are listed like any message; that the KEEPALIVE
feature is in force is one of the connection's checks. Error and Bye are allowed in every open
state, in both directions: received they close the
connection (CLOSED), sent they close this side (Bye: CLOSED, Error: ERROR). The connection keeps
that closing apart from the phase (handshake and rounds), so input that arrives after this side
sent Bye is still judged by the phase.
"""

from __future__ import annotations

import enum

from .messages import MessageType

__all__ = ["ConnState", "Role", "Direction", "OPEN_STATES", "SENT_BY", "BOTH_WAYS", "ROWS", "TRANSITIONS",
           "transition"]


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


class Role(enum.Enum):
    """The side a connection object speaks for."""

    HOST = "host"
    GUEST = "guest"


class Direction(enum.Enum):
    """Whether this side sends the message or receives it."""

    SEND = "send"
    RECEIVE = "receive"


_S = ConnState
_T = MessageType
_HOST, _GUEST = Role.HOST, Role.GUEST
_SEND, _RECV = Direction.SEND, Direction.RECEIVE

OPEN_STATES: dict[Role, tuple[ConnState, ...]] = {
    _HOST: (_S.AWAIT_HELLO, _S.HELLO_RECEIVED, _S.READY, _S.DONE),
    _GUEST: (_S.START, _S.AWAIT_WELCOME, _S.READY, _S.DONE),
}
"""The states of each role before it closes (what "any" stands for in the tables)."""

SENT_BY: dict[Role, frozenset[MessageType]] = {
    _HOST: frozenset({_T.WELCOME, _T.START_ROUND, _T.STOP_ROUND, _T.ACK, _T.FAULT_DONE, _T.DONE,
                      _T.ERROR, _T.BYE, _T.PING, _T.PONG}),
    _GUEST: frozenset({_T.HELLO, _T.HINTS, _T.ROUND_END, _T.FAULT, _T.ERROR, _T.BYE, _T.PING, _T.PONG}),
}
"""Message types each role may send; a type a role never receives is a direction error."""

BOTH_WAYS: frozenset[MessageType] = frozenset({_T.ERROR, _T.BYE, _T.PING, _T.PONG})
"""Message types both roles send and receive."""

_READY_DONE = (_S.READY, _S.DONE)

ROWS: tuple[tuple[Role, tuple[ConnState, ...], Direction, tuple[MessageType, ...], ConnState | None], ...] = (
    # 5.1 Host
    (_HOST, (_S.AWAIT_HELLO,), _RECV, (_T.HELLO,), _S.HELLO_RECEIVED),
    (_HOST, (_S.HELLO_RECEIVED,), _SEND, (_T.WELCOME,), _S.READY),
    (_HOST, (_S.READY,), _SEND, (_T.START_ROUND, _T.STOP_ROUND), None),
    (_HOST, (_S.READY,), _SEND, (_T.DONE,), _S.DONE),
    (_HOST, _READY_DONE, _RECV, (_T.HINTS,), None),
    (_HOST, _READY_DONE, _RECV, (_T.ROUND_END,), None),
    (_HOST, _READY_DONE, _RECV, (_T.FAULT,), None),
    (_HOST, _READY_DONE, _SEND, (_T.ACK, _T.FAULT_DONE), None),
    (_HOST, _READY_DONE, _SEND, (_T.PING, _T.PONG), None),
    (_HOST, _READY_DONE, _RECV, (_T.PING, _T.PONG), None),
    (_HOST, OPEN_STATES[_HOST], _RECV, (_T.ERROR, _T.BYE), _S.CLOSED),
    (_HOST, OPEN_STATES[_HOST], _SEND, (_T.BYE,), _S.CLOSED),
    (_HOST, OPEN_STATES[_HOST], _SEND, (_T.ERROR,), _S.ERROR),
    # 5.2 Guest
    (_GUEST, (_S.START,), _SEND, (_T.HELLO,), _S.AWAIT_WELCOME),
    (_GUEST, (_S.AWAIT_WELCOME,), _RECV, (_T.WELCOME,), _S.READY),
    (_GUEST, (_S.READY,), _RECV, (_T.START_ROUND,), None),
    (_GUEST, (_S.READY,), _RECV, (_T.STOP_ROUND,), None),
    (_GUEST, (_S.READY,), _RECV, (_T.DONE,), _S.DONE),
    (_GUEST, _READY_DONE, _RECV, (_T.ACK,), None),
    (_GUEST, _READY_DONE, _RECV, (_T.FAULT_DONE,), None),
    (_GUEST, (_S.READY,), _SEND, (_T.HINTS,), None),
    (_GUEST, _READY_DONE, _SEND, (_T.ROUND_END, _T.FAULT), None),
    (_GUEST, _READY_DONE, _SEND, (_T.PING, _T.PONG), None),
    (_GUEST, _READY_DONE, _RECV, (_T.PING, _T.PONG), None),
    (_GUEST, OPEN_STATES[_GUEST], _RECV, (_T.ERROR, _T.BYE), _S.CLOSED),
    (_GUEST, OPEN_STATES[_GUEST], _SEND, (_T.BYE,), _S.CLOSED),
    (_GUEST, OPEN_STATES[_GUEST], _SEND, (_T.ERROR,), _S.ERROR),
)
"""The rows of wire-v1.md section 5: (role, states, direction, message types, next state)."""


def _expand(rows) -> dict[tuple[Role, ConnState, Direction, MessageType], ConnState]:
    table: dict[tuple[Role, ConnState, Direction, MessageType], ConnState] = {}
    for role, states, direction, types, nxt in rows:
        for state in states:
            for mtype in types:
                key = (role, state, direction, mtype)
                if key in table:
                    raise ValueError(f"two transitions for {key}")
                if (direction is _SEND) != (mtype in SENT_BY[role]) and mtype not in BOTH_WAYS:
                    raise ValueError(f"{role.value} cannot {direction.value} {mtype.name}")
                table[key] = state if nxt is None else nxt
    return table


TRANSITIONS: dict[tuple[Role, ConnState, Direction, MessageType], ConnState] = _expand(ROWS)
"""(role, state, direction, message type) -> next state, for every allowed pair."""


def transition(role: Role, state: ConnState, direction: Direction, mtype: MessageType) -> ConnState | None:
    """The state after ``role`` sends or receives ``mtype`` in ``state``; None if not allowed."""
    return TRANSITIONS.get((role, state, direction, mtype))
