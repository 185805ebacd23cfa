"""Host side of one guest connection: handshake, hint consumption, round control.

The session owns the :class:`HostConnection` state machine and the guest's
:class:`HostPageState`. Its ``serve`` task reads frames, applies hints under the active command
id to the skip bitmap, acks every hint frame (stale ones too: credits), records round ends and
answers write faults. The counts of what the guest sent are the connection's
(``conn.hints_frames``, ``conn.stale_frames``, ...); what hints did to the bitmap, the page
state's.
Anything the guest gets wrong ends in a protocol error sent to the guest, a clean close, and
``self.failure`` set: never an exception escaping into the host's other guests.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import numpy as np
import trio

from hintpipe.channel.endpoint import Endpoint
from hintpipe.host.pagestate import HostPageState
from hintpipe.protocol import (
    Bye,
    ErrorCode,
    Error,
    Fault,
    Hello,
    HostConnection,
    Hints,
    LocalProtocolError,
    ProtocolError,
    RoundEnd,
    StaleHints,
)
from hintpipe.protocol.messages import CMD_ID_BASE, MAX_RANGES_PER_BATCH


class GuestGone(Exception):
    """The guest closed the connection or broke the protocol; ``str()`` says which."""


class HostSession:
    """Serve one guest over ``endpoint``."""

    def __init__(self, endpoint: Endpoint, *, max_ranges: int = MAX_RANGES_PER_BATCH, window: int | None = None,
                 first_cmd_id: int = CMD_ID_BASE, send_timeout_s: float = 10.0, drop_stale: bool = True) -> None:
        self.endpoint = endpoint
        self.send_timeout_s = send_timeout_s
        self.conn = HostConnection(drop_stale=drop_stale)  # False only to demonstrate the guard
        self.max_ranges = max_ranges
        self.window = window
        self.state: HostPageState | None = None
        self.hello: Hello | None = None
        self.failure: str | None = None
        self.closed = trio.Event()
        self._round_end = trio.Event()
        self._next_id = first_cmd_id  # a host serving many connections keeps ids host-unique
        self._send_lock = trio.Lock()
        self.fault_handler: Callable[[np.ndarray], Awaitable[None]] | None = None
        """For guests whose write faults cross the link: called with a Fault's pfns, which must be
        marked written before it returns; the session then answers FaultDone."""
        self.on_hints: Callable[[Hints], Awaitable[None]] | None = None
        """Called with each applied Hints frame before it is acked (reclaim: in isolate mode the
        guest keeps the frame's blocks off its free lists until the ack, so a discard made here
        cannot race a write)."""

    async def _send(self, frame: bytes) -> None:
        """Send one frame; a guest that leaves it unread for ``send_timeout_s`` is dropped.

        Without the bound a guest that stops reading would hold this session's tasks (and the
        migration waiting on them) forever once the transport's buffers fill.
        """
        with trio.move_on_after(self.send_timeout_s) as cs:
            async with self._send_lock:
                await self.endpoint.send_frame(frame)
        if cs.cancelled_caught:
            self.failure = self.failure or f"guest stopped reading (a send waited {self.send_timeout_s} s)"
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.endpoint.aclose()
            raise trio.BrokenResourceError(self.failure)

    async def handshake(self, make_state: Callable[[Hello], HostPageState] | None = None) -> Hello:
        """Wait for the guest's ``Hello``, create its page state (``make_state``, which may refuse
        the guest by raising; default: a fresh page state of its size), answer ``Welcome``."""
        while True:
            ev = await self._next_event()
            if isinstance(ev, Hello):
                break
        self.hello = ev
        self.state = make_state(ev) if make_state else HostPageState(ev.page_count)
        await self._send(self.conn.welcome(max_ranges=self.max_ranges, window=self.window))
        return ev

    async def _next_event(self):
        while True:
            ev = self.conn.next_event()
            if ev is not None:
                return ev
            data = await self.endpoint.receive()
            if not data:
                raise GuestGone("guest closed the connection")
            self.conn.receive_data(data)

    async def serve(self) -> None:
        """Consume the guest's frames until it leaves or errs; never raises for guest faults."""
        try:
            while True:
                ev = await self._next_event()
                await self._handle(ev)
        except ProtocolError as e:
            self.failure = f"protocol error from guest: {e}"
            with trio.move_on_after(1) as cs:
                cs.shield = True
                try:
                    await self._send(self.conn.error(e.code, e.message))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        except GuestGone as e:
            self.failure = self.failure or str(e)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.failure = self.failure or f"connection lost: {e}"
        finally:
            self.closed.set()
            self._round_end.set()

    async def _handle(self, ev) -> None:
        if isinstance(ev, Hints):
            self.state.apply_blocks(ev.ranges[:, 0], ev.orders)
            if self.on_hints is not None:
                await self.on_hints(ev)
            await self._ack()
        elif isinstance(ev, StaleHints):
            await self._ack()
        elif isinstance(ev, RoundEnd):
            if ev.cmd_id == self._next_id - 1:  # a late RoundEnd of an earlier round ends nothing now
                self._round_end.set()
        elif isinstance(ev, Fault):
            if self.fault_handler is None:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "Fault on a connection whose faults are handled locally")
            await self.fault_handler(ev.pfns)
            await self.answer_fault(ev.seq)
        elif isinstance(ev, Bye):
            raise GuestGone(f"guest said goodbye: {ev.reason}")
        elif isinstance(ev, Error):
            raise GuestGone(f"guest reported error {ev.code}: {ev.message}")

    async def answer_fault(self, seq: int) -> None:
        """Release the guest writer waiting on Fault ``seq`` (FaultDone)."""
        await self._send(self.conn.fault_done(seq))

    async def _ack(self) -> None:
        await self._send(self.conn.ack(1))

    async def start_round(self) -> int:
        """Publish a new command id (never reused) and return it."""
        cmd_id = self._next_id
        self._next_id += 1
        self._round_end = trio.Event()
        try:
            frame = self.conn.start_round(cmd_id)
        except LocalProtocolError as e:
            # e.g. the guest withheld RoundEnd for MAX_OPEN_ROUNDS rounds: close it with an error
            # (hints are only an optimisation; the migration goes on without them)
            self.failure = self.failure or f"guest broke the round protocol: {e}"
            with trio.move_on_after(1):
                try:
                    await self._send(self.conn.error(ErrorCode.UNEXPECTED_MESSAGE, str(e)))
                except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
                    pass
            raise trio.BrokenResourceError(self.failure) from None
        await self._send(frame)
        return cmd_id

    async def stop_round(self, *, wait_s: float = 0.5) -> bool:
        """Stop hinting now (later hints are stale); wait briefly for ``RoundEnd``."""
        if self.conn.current_cmd_id is None:
            return True  # the guest already ended its walk
        try:
            frame = self.conn.stop_round()
        except LocalProtocolError:
            return False  # the connection already failed; serve() has the reason
        await self._send(frame)
        with trio.move_on_after(wait_s):
            await self._round_end.wait()
            return True
        return False

    async def finish(self, ok: bool, summary: dict) -> None:
        """Tell the guest the migration is over (best effort: it may be gone)."""
        try:
            with trio.move_on_after(1):
                await self._send(self.conn.done(ok, summary))
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            pass  # gone, or the connection already failed: the host's report has the verdict
