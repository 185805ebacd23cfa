"""The state tables of protocols/wire-v1.md section 5, protocol/states.py and the connections agree.

The spec's tables are parsed as written and expanded ("any", "unchanged", several states or
messages in one row) into (role, state, direction, message) -> next state; that must equal
``TRANSITIONS``. Then every connection state of both roles is built and every message type tried,
sent and received: a pair the table does not list must be refused as not allowed in that state,
and a listed pair must never be.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from hintpipe.protocol import (
    CMD_ID_BASE,
    FEATURE_KEEPALIVE,
    Ack,
    ConnState,
    Direction,
    Done,
    ErrorCode,
    Fault,
    FaultDone,
    GuestConnection,
    Hello,
    Hints,
    HostConnection,
    LocalProtocolError,
    MessageType,
    Ping,
    Pong,
    ProtocolError,
    Role,
    RoundEnd,
    StartRound,
    StopRound,
    Welcome,
    encode,
)
from hintpipe.protocol.messages import MESSAGE_CLASSES
from hintpipe.protocol.states import BOTH_WAYS, OPEN_STATES, SENT_BY, TRANSITIONS

SPEC = Path(__file__).parent.parent / "protocols" / "wire-v1.md"
TYPE_BY_NAME = {cls.__name__: mtype for mtype, cls in MESSAGE_CLASSES.items()}
CLOSING = (MessageType.ERROR, MessageType.BYE)


def _spec_tables() -> dict[Role, list[list[str]]]:
    """The rows (cells as text) of the tables under "### 5.1 Host" and "### 5.2 Guest"."""
    text = SPEC.read_text()
    section = text[text.index("## 5. State machines"):text.index("## 6. ")]
    out: dict[Role, list[list[str]]] = {}
    for role, title in ((Role.HOST, "### 5.1 Host"), (Role.GUEST, "### 5.2 Guest")):
        part = section[section.index(title) + len(title):]
        part = part[:part.index("###")] if "###" in part else part
        lines = [ln for ln in part.splitlines() if ln.startswith("|")]
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        assert header[:4] == ["State", "Direction", "Message", "Next state"], header
        assert set(lines[1].replace("|", "").strip()) <= {"-"}
        out[role] = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return out


def _names(cell: str) -> list[str]:
    return [n.strip() for n in cell.split(",") if n.strip()]


def _spec_transitions() -> dict:
    tables = _spec_tables()
    table = {}
    for role, rows in tables.items():
        named = {s for row in rows for s in _names(row[0]) if s != "any"}
        assert named == set(s.name for s in OPEN_STATES[role]), f"{role}: states of the spec table"
        for state_cell, direction, messages, nxt, _check in rows:
            states = OPEN_STATES[role] if state_cell == "any" else [ConnState[s] for s in _names(state_cell)]
            for state in states:
                for name in _names(messages):
                    key = (role, state, Direction(direction), TYPE_BY_NAME[name])
                    assert key not in table, f"the spec lists {key} twice"
                    table[key] = state if nxt == "unchanged" else ConnState[nxt]
    return table


def test_spec_tables_equal_the_transition_table():
    spec = _spec_transitions()
    assert spec == TRANSITIONS, (
        f"only in the spec: {sorted(map(str, spec.keys() - TRANSITIONS.keys()))}; "
        f"only in states.py: {sorted(map(str, TRANSITIONS.keys() - spec.keys()))}; "
        f"different: {sorted(str(k) for k in spec.keys() & TRANSITIONS.keys() if spec[k] != TRANSITIONS[k])}")


def test_table_directions_follow_the_senders():
    for (role, _state, direction, mtype) in TRANSITIONS:
        if mtype not in BOTH_WAYS:
            assert (direction is Direction.SEND) == (mtype in SENT_BY[role])


# ---- the connections follow the table ------------------------------------------------------

PAGES = 1 << 12
A = CMD_ID_BASE
RANGES = np.array([[0, 1]], dtype=np.uint64)

RECEIVED = {  # one well-formed frame of every type, as the peer would send it
    MessageType.HELLO: encode(Hello(1, 4096, PAGES, 4, FEATURE_KEEPALIVE, "g")),
    MessageType.HINTS: encode(Hints(A, RANGES)),
    MessageType.ROUND_END: encode(RoundEnd(A, 0)),
    MessageType.FAULT: encode(Fault(1, np.array([0], dtype=np.uint64))),
    MessageType.WELCOME: encode(Welcome(1, 32, 4, FEATURE_KEEPALIVE)),
    MessageType.START_ROUND: encode(StartRound(A)),
    MessageType.STOP_ROUND: encode(StopRound(A)),
    MessageType.ACK: encode(Ack(1)),
    MessageType.FAULT_DONE: encode(FaultDone(1)),
    MessageType.DONE: encode(Done(True, {})),
    MessageType.PING: encode(Ping(7)),
    MessageType.PONG: encode(Pong(0)),  # answers the Ping the connection under test sent first
}

SENDS = {  # the method that sends each type, called with plausible arguments
    MessageType.WELCOME: lambda c: c.welcome(),
    MessageType.START_ROUND: lambda c: c.start_round(),
    MessageType.STOP_ROUND: lambda c: c.stop_round(),
    MessageType.ACK: lambda c: c.ack(1),
    MessageType.FAULT_DONE: lambda c: c.fault_done(1),
    MessageType.DONE: lambda c: c.done(True),
    MessageType.HELLO: lambda c: c.hello(PAGES, window=4),
    MessageType.HINTS: lambda c: c.hints(A, RANGES),
    MessageType.ROUND_END: lambda c: c.round_end(A),
    MessageType.FAULT: lambda c: c.fault(1, [0]),
    MessageType.PING: lambda c: c.ping(),
    MessageType.PONG: lambda c: c.pong(),  # answers the Ping the connection under test received first
}


def _in_state(role: Role, state: ConnState):
    """A fresh connection of ``role`` driven into ``state`` through the public API."""
    if role is Role.HOST:
        h = HostConnection()
        if state is not ConnState.AWAIT_HELLO:
            h.receive_data(RECEIVED[MessageType.HELLO])
            h.next_event()
        if state in (ConnState.READY, ConnState.DONE):
            h.welcome(features=FEATURE_KEEPALIVE)
        if state is ConnState.DONE:
            h.done(True)
        return h
    g = GuestConnection()
    if state is not ConnState.START:
        g.hello(PAGES, window=4, features=FEATURE_KEEPALIVE)
    for mtype, upto in ((MessageType.WELCOME, (ConnState.READY, ConnState.DONE)), (MessageType.DONE, (ConnState.DONE,))):
        if state in upto:
            g.receive_data(RECEIVED[mtype])
            g.next_event()
    return g


CASES = [(role, state, mtype, direction) for role in Role for state in OPEN_STATES[role]
         for mtype in MessageType if mtype not in CLOSING
         for direction in Direction if mtype in BOTH_WAYS or (direction is Direction.SEND) == (mtype in SENT_BY[role])]


def _prepare(conn, mtype: MessageType, direction: Direction) -> None:
    """Keepalive messages need their other half first where the state allows it: a Pong is sent
    in answer to a received Ping and received in answer to a sent Ping."""
    if mtype is not MessageType.PONG or not conn.established:
        return
    if direction is Direction.SEND:
        conn.receive_data(RECEIVED[MessageType.PING])
        assert isinstance(conn.next_event(), Ping)
    else:
        conn.ping()


@pytest.mark.parametrize("role,state,mtype,direction", CASES, ids=lambda v: getattr(v, "name", v))
def test_connections_follow_the_table(role, state, mtype, direction):
    conn = _in_state(role, state)
    assert conn.state is state
    _prepare(conn, mtype, direction)
    if direction is Direction.SEND:
        allowed = (role, state, Direction.SEND, mtype) in TRANSITIONS
        try:
            SENDS[mtype](conn)
        except LocalProtocolError as e:
            refused = "not allowed in state" in e.message
            assert refused != allowed, e
            assert conn.state is state  # a refused send changes nothing
            return
        assert allowed and conn.state is TRANSITIONS[(role, state, Direction.SEND, mtype)]
        return
    allowed = (role, state, Direction.RECEIVE, mtype) in TRANSITIONS
    conn.receive_data(RECEIVED[mtype])
    try:
        conn.next_event()
    except ProtocolError as e:
        refused = e.code is ErrorCode.UNEXPECTED_MESSAGE and "not allowed in state" in e.message
        assert refused != allowed, e
        return
    assert allowed and conn.state is TRANSITIONS[(role, state, Direction.RECEIVE, mtype)]
