"""Host side of one guest connection: handshake, hint consumption, round control.

The session owns the :class:`HostConnection` state machine and the guest's
:class:`HostPageState`. Its ``serve`` task reads frames, stages hints under the active command
id for the skip bitmap (the page state applies staged hints together, always within their round),
acks every hint frame (stale ones too: credits) with one ``Ack(count)`` for all the frames handled
each time its receive buffer runs dry, records round ends and answers write faults. The counts of what the guest sent are the connection's
(``conn.hints_frames``, ``conn.stale_frames``, ...); what hints did to the bitmap, the page
state's.
Anything the guest gets wrong ends in a protocol error sent to the guest, a clean close, and
``self.failure`` set: never an exception escaping into the host's other guests. With an idle bound
(``idle_timeout_s``) the session offers KEEPALIVE: it pings a silent guest and drops one that
stays silent for the bound (wire-v1 section 9.1).
"""

from __future__ import annotations

from typing import Awaitable, Callable

import numpy as np
import trio

from hintpipe.channel.endpoint import Endpoint
from hintpipe.host.pagestate import HostPageState
from hintpipe.protocol import (
    FEATURE_KEEPALIVE,
    Bye,
    ErrorCode,
    Error,
    Fault,
    Hello,
    HostConnection,
    Hints,
    LocalProtocolError,
    Ping,
    ProtocolError,
    RoundEnd,
    StaleHints,
)
from hintpipe.protocol.liveness import CONFIRM_PASSES, IdleTimer, IdleVerdict
from hintpipe.protocol.messages import CMD_ID_BASE, MAX_RANGES_PER_BATCH


class GuestGone(Exception):
    """The guest closed the connection or broke the protocol; ``str()`` says which."""


class HostSession:
    """Serve one guest over ``endpoint``."""

    def __init__(self, endpoint: Endpoint, *, max_ranges: int = MAX_RANGES_PER_BATCH, window: int | None = None,
                 first_cmd_id: int = CMD_ID_BASE, send_timeout_s: float = 10.0,
                 idle_timeout_s: float | None = None, drop_stale: bool = True) -> None:
        self.endpoint = endpoint
        self.send_timeout_s = send_timeout_s
        self.idle_timeout_s = idle_timeout_s
        """Drop a guest that sends no frame for this long (None: no bound; needs KEEPALIVE)."""
        self._idle: IdleTimer | None = None
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
        ev = await self._next_event()
        if isinstance(ev, (Bye, Error)):  # the only other frames allowed first: the guest leaves now
            what = f"said goodbye ({ev.reason})" if isinstance(ev, Bye) else f"reported error {ev.code} ({ev.message})"
            raise GuestGone(f"guest {what} before its Hello")
        self.hello = ev
        self.state = make_state(ev) if make_state else HostPageState(ev.page_count)
        features = FEATURE_KEEPALIVE if self.idle_timeout_s is not None else 0
        await self._send(self.conn.welcome(max_ranges=self.max_ranges, window=self.window, features=features))
        if self.conn.keepalive:
            self._idle = IdleTimer(self.idle_timeout_s, trio.current_time())
        return ev

    async def _next_event(self):
        while True:
            ev = self.conn.next_event()
            if ev is not None:
                if self._idle is not None:
                    self._idle.heard(trio.current_time())
                return ev
            if self.state is not None and self.state.staged_blocks:
                # every frame received so far is handled: their hints go into the skip bitmap now
                # (applied together; staged longer, more of them would be refused for pages the
                # guest writes meanwhile)
                self.state.flush()
            if self.conn.unacked:
                # ... and one Ack returns all their credits
                await self._send(self.conn.ack(self.conn.unacked))
            data = await self.endpoint.receive()
            if not data:
                raise GuestGone("guest closed the connection")
            self.conn.receive_data(data)

    async def serve(self) -> None:
        """Consume the guest's frames until it leaves or errs; never raises for guest faults."""
        async with trio.open_nursery() as nursery:
            if self._idle is not None:
                nursery.start_soon(self._watch_idle, nursery)
            await self._serve_frames()
            nursery.cancel_scope.cancel()

    async def _watch_idle(self, nursery: trio.Nursery) -> None:
        """Ping a silent guest; close on one silent for the whole idle bound (wire-v1 9.1)."""
        idle = self._idle
        while True:
            await trio.sleep_until(idle.next_check)
            verdict = idle.check(trio.current_time())
            if verdict is IdleVerdict.EXPIRED:
                for _ in range(CONFIRM_PASSES):  # let the reader take what already arrived
                    await trio.sleep(0)
                verdict = idle.check(trio.current_time())
            if verdict is IdleVerdict.PING and not self.conn.ping_outstanding:
                try:
                    frame = self.conn.ping()
                except LocalProtocolError:
                    return  # closing already: serve() has the reason
                nursery.start_soon(self._send_quietly, frame)  # a blocked send must not stop the clock
            elif verdict is IdleVerdict.EXPIRED:
                self.failure = self.failure or (f"guest sent nothing for {idle.timeout_s:g} s (idle timeout): "
                                                f"it is stopped, stuck or unreachable")
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(1):  # best effort: a stopped guest reads nothing
                        try:
                            await self._send(self.conn.error(ErrorCode.TIMEOUT, self.failure))
                        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
                            pass
                    with trio.move_on_after(1):
                        await self.endpoint.aclose()  # serve() sees the close and ends
                return

    async def _send_quietly(self, frame: bytes) -> None:
        try:
            await self._send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # serve() reports the connection's end

    async def _serve_frames(self) -> None:
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
            self.state.stage_hints(ev.ranges)  # acked once the buffer is drained
            if self.on_hints is not None:  # e.g. reclaim: done before the frame's ack goes out
                await self.on_hints(ev)
        elif isinstance(ev, StaleHints):
            pass  # dropped; acked with the others
        elif isinstance(ev, RoundEnd):
            if ev.cmd_id == self._next_id - 1:  # a late RoundEnd of an earlier round ends nothing now
                self._round_end.set()
        elif isinstance(ev, Fault):
            if self.fault_handler is None:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "Fault on a connection whose faults are handled locally")
            await self.fault_handler(ev.pfns)
            await self.answer_fault(ev.seq)
        elif isinstance(ev, Ping):
            await self._send(self.conn.pong())
        elif isinstance(ev, Bye):
            raise GuestGone(f"guest said goodbye: {ev.reason}")
        elif isinstance(ev, Error):
            raise GuestGone(f"guest reported error {ev.code}: {ev.message}")

    async def answer_fault(self, seq: int) -> None:
        """Release the guest writer waiting on Fault ``seq`` (FaultDone)."""
        await self._send(self.conn.fault_done(seq))

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
        """Tell the guest the migration is over (best effort: it may be gone; a live guest gets
        the send timeout, so a busy host still delivers the verdict)."""
        try:
            with trio.move_on_after(self.send_timeout_s):
                await self._send(self.conn.done(ok, summary))
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            pass  # gone, or the connection already failed: the host's report has the verdict
