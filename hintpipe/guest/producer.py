"""The guest's hinting driver: answers host rounds with lock-bounded walks of the free lists.

For each ``StartRound(cmd_id)`` it starts one walk (a task in its nursery): take the zone lock,
let the walker pick at most ``batch`` blocks within its time budget, drop the lock, send the
blocks as one ``Hints`` frame, yield, repeat, and finish with ``RoundEnd``. A ``StopRound`` cancels
the walk at its next checkpoint. Credits (``Ack``) bound the frames in flight; in ``isolate`` mode
the blocks of a frame stay off the free lists until the host acks that frame, as Linux free page
reporting keeps reported pages isolated while the host handles them. With an idle bound the
producer offers KEEPALIVE, pings a silent host and gives up on one silent for the whole bound
(wire-v1 section 9.1); it also bounds the wait for Welcome by it.

A workload may act at the points of a round through :class:`ProducerHooks` (the ``race``
workload aims at the windows where hinting can go wrong): when a walk starts, when the walker
has taken a batch (before its frame is encoded; the hook may hold the frame past its round), and
when StopRound arrives (before RoundEnd). With hooks, RoundEnd always waits for StopRound, so
the hooks see every round boundary; the protocol allows it (the host stops every round it
started).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import trio

from hintpipe.channel.endpoint import Endpoint
from hintpipe.guest.walker import Walker
from hintpipe.guest.zonelock import ZoneLock
from hintpipe.units import order_pages
from hintpipe.protocol import (
    FEATURE_KEEPALIVE,
    MAX_OUTSTANDING_FAULTS,
    Ack,
    Bye,
    Done,
    Error,
    ErrorCode,
    FaultDone,
    GuestConnection,
    LocalProtocolError,
    Ping,
    ProtocolError,
    StartRound,
    StopRound,
    Welcome,
)
from hintpipe.protocol.liveness import CONFIRM_PASSES, IdleTimer, IdleVerdict


SEND_SHIELD_S = 5.0
"""How long a Hints frame already counted by the connection may wait to be posted, shielded."""


class MigrationFailed(Exception):
    """The host reported the migration failed, or closed the connection with an error."""


@dataclass
class ProducerStats:
    """The producer's rounds (what it sent is counted by its connection: :meth:`Producer.figures`)."""

    rounds: int = 0
    walks_cancelled: int = 0


class ProducerHooks(Protocol):
    """Points of a round where a guest workload may act (implemented by the race workload).

    No hook runs in the task that reads the host's frames, so a hook may write guest memory
    (a write to a protected page can wait for the host's FaultDone).
    """

    def round_started(self, cmd_id: int) -> None:
        """StartRound ``cmd_id`` arrived (called before its walk starts)."""

    async def walk_starting(self, cmd_id: int) -> None:
        """The walk of round ``cmd_id`` is about to snapshot the free lists."""

    async def batch_taken(self, cmd_id: int, pfns: np.ndarray, orders: np.ndarray) -> bool:
        """The walker took these blocks and dropped the zone lock; their frame is not encoded
        yet. Return True to hold the frame until :meth:`release_held` returns."""

    async def round_stopping(self, cmd_id: int) -> None:
        """StopRound ``cmd_id`` arrived; its RoundEnd waits for this (and for held frames)."""

    async def release_held(self, cmd_id: int) -> None:
        """Return once the frames held in round ``cmd_id`` may go out (its RoundEnd follows)."""


class Producer:
    """Guest side of one connection over ``endpoint``: hello, then one ``walker`` walk per round.

    ``hooks``: a workload's :class:`ProducerHooks`, or None.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        walker: Walker,
        zone: ZoneLock,
        page_count: int,
        *,
        window: int = 256,
        name: str = "guest",
        idle_timeout_s: float | None = None,
        hooks: ProducerHooks | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.walker = walker
        self.zone = zone
        self.page_count = page_count
        self.window = window
        self.name = name
        self.idle_timeout_s = idle_timeout_s
        """Give up on a host that sends no frame for this long (None: wait as long as it takes)."""
        self.conn = GuestConnection()
        self.stats = ProducerStats()
        self.result: Done | None = None
        self._walk_scope: trio.CancelScope | None = None
        self._walk_id: int | None = None
        self._ended: set[int] = set()
        self._credit = trio.Event()
        self._inflight: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self.hooks = hooks
        self._held: list[tuple[int, bytes, np.ndarray, np.ndarray]] = []  # (cmd_id, frame, pfns, orders)
        self._send_lock = trio.Lock()
        # paired-process write faults (wire-v1 section 10): seq -> event set by FaultDone
        self._fault_seq = 0
        self._fault_waiters: dict[int, trio.Event] = {}
        self._fault_slots = trio.Semaphore(MAX_OUTSTANDING_FAULTS)
        self._gone = False
        self._silent: str | None = None  # why the idle bound gave up on the host

    def figures(self) -> dict:
        """Rounds walked and cancelled, and the Hints frames, ranges and pages sent."""
        c = self.conn
        return {"rounds": self.stats.rounds, "frames": c.hints_frames, "ranges": c.hints_ranges,
                "pages": c.hints_pages, "walks_cancelled": self.stats.walks_cancelled}

    async def _send(self, frame: bytes) -> None:
        async with self._send_lock:
            await self.endpoint.send_frame(frame)

    async def run(self) -> Done:
        """Say hello, serve rounds until the host sends ``Done``; return it."""
        features = FEATURE_KEEPALIVE if self.idle_timeout_s is not None else 0
        await self._send(self.conn.hello(self.page_count, window=self.window, name=self.name, features=features))
        idle = IdleTimer(self.idle_timeout_s, trio.current_time()) if self.idle_timeout_s is not None else None
        failure: MigrationFailed | None = None  # raised after the nursery: callers see it unwrapped
        async with trio.open_nursery() as nursery:
            try:
                with trio.CancelScope() as receiving:
                    if idle is not None:
                        nursery.start_soon(self._watch_idle, idle, receiving, nursery)
                    while self.result is None:
                        data = await self.endpoint.receive()
                        if not data:
                            raise MigrationFailed("host closed the connection before the migration finished")
                        self.conn.receive_data(data)
                        while (ev := self.conn.next_event()) is not None:
                            if idle is not None:
                                idle.heard(trio.current_time())
                            await self._handle(ev, nursery)
                            if self.result is not None:
                                break
                if self._silent is not None:
                    await self._send_error(ErrorCode.TIMEOUT, self._silent)
                    raise MigrationFailed(self._silent)
            except ProtocolError as e:
                await self._send_error(e.code, e.message)
                failure = MigrationFailed(f"protocol error from host: {e}")
            except MigrationFailed as e:
                failure = e
            finally:
                nursery.cancel_scope.cancel()
                self._release_all_inflight()
                self._gone = True
                for ev in self._fault_waiters.values():
                    ev.set()  # their fault() calls raise MigrationFailed
        if failure is not None:
            raise failure
        if not self.result.ok:
            raise MigrationFailed(f"host reports the migration failed: {self.result.summary}")
        return self.result

    async def _watch_idle(self, idle: IdleTimer, receiving: trio.CancelScope, nursery: trio.Nursery) -> None:
        """Ping a silent host; stop receiving once it was silent for the whole bound."""
        while True:
            await trio.sleep_until(idle.next_check)
            if self.conn.established and not self.conn.keepalive:
                return  # the host did not agree to KEEPALIVE: wait for it as before (wire-v1 9.1)
            verdict = idle.check(trio.current_time())
            if verdict is IdleVerdict.EXPIRED:
                for _ in range(CONFIRM_PASSES):  # let the reader take what already arrived
                    await trio.sleep(0)
                verdict = idle.check(trio.current_time())
            if verdict is IdleVerdict.PING and self.conn.keepalive and not self.conn.ping_outstanding:
                nursery.start_soon(self._send_ping)  # a blocked send must not stop the clock
            elif verdict is IdleVerdict.EXPIRED:
                what = "answered no Ping" if self.conn.keepalive else "sent no Welcome"
                self._silent = (f"the host sent nothing for {idle.timeout_s:g} s and {what} (idle timeout): "
                                f"it is stopped, stuck or unreachable")
                receiving.cancel()
                return

    async def _send_error(self, code: ErrorCode, message: str) -> None:
        """Best effort: a stopped or gone host reads nothing, so this waits at most 1 s."""
        with trio.move_on_after(1):
            try:
                await self._send(self.conn.error(code, message))
            except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError, OSError):
                pass

    async def _send_ping(self) -> None:
        try:
            frame = self.conn.ping()
        except LocalProtocolError:
            return  # the connection is closing; run() has the reason
        try:
            await self._send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # run() sees the connection end

    async def _handle(self, ev, nursery: trio.Nursery) -> None:
        if isinstance(ev, StartRound):
            await self._stop_walk(nursery)
            self.stats.rounds += 1
            if self.hooks is not None:
                self.hooks.round_started(ev.cmd_id)
            await nursery.start(self._walk, ev.cmd_id)
        elif isinstance(ev, StopRound):
            await self._stop_walk(nursery)
        elif isinstance(ev, Ack):
            await self._on_ack(ev.count)
        elif isinstance(ev, FaultDone):
            waiter = self._fault_waiters.pop(ev.seq, None)
            if waiter is not None:
                waiter.set()
        elif isinstance(ev, Ping):
            await self._send(self.conn.pong())
        elif isinstance(ev, Done):
            self.result = ev
        elif isinstance(ev, Error):
            raise MigrationFailed(f"host closed with error {ev.code}: {ev.message}")
        elif isinstance(ev, Bye):
            raise MigrationFailed(f"host said goodbye before the migration finished: {ev.reason}")
        elif isinstance(ev, Welcome):
            pass

    async def fault(self, pfns: np.ndarray) -> None:
        """Report a write to protected pages; return once the host answered ``FaultDone``.

        At most MAX_OUTSTANDING_FAULTS are in flight; raises MigrationFailed if the connection
        ends first (the write must then not happen as if the host knew of it).
        """
        async with self._fault_slots:
            if self._gone:
                raise MigrationFailed("connection closed while a write was faulting")
            seq = self._fault_seq
            self._fault_seq = (seq + 1) & 0xFFFFFFFF
            done = self._fault_waiters[seq] = trio.Event()
            try:
                frame = self.conn.fault(seq, pfns)
            except LocalProtocolError as e:  # the connection already failed or closed
                del self._fault_waiters[seq]
                raise MigrationFailed(f"cannot report a write fault: {e}") from None
            await self._send(frame)
            await done.wait()
            if seq in self.conn.outstanding_faults:  # woken by the connection ending
                self._fault_waiters.pop(seq, None)
                raise MigrationFailed("connection closed while a write was faulting")

    async def _stop_walk(self, nursery: trio.Nursery) -> None:
        """Cancel a running walk and tell the host it ended (once per command id); with hooks,
        a task ends the round once the hooks are done with it."""
        if self._walk_scope is not None:
            self._walk_scope.cancel()
            self.stats.walks_cancelled += 1
        cmd_id = self._walk_id
        if self.hooks is None or cmd_id is None or cmd_id in self._ended:
            await self._end_round()
            return
        self._ended.add(cmd_id)  # the task below sends its RoundEnd
        self._walk_scope = None
        self._walk_id = None
        nursery.start_soon(self._finish_round, cmd_id)

    async def _finish_round(self, cmd_id: int) -> None:
        """With hooks: let them act on the round boundary, send the frames held in round
        ``cmd_id`` once they may go, then its RoundEnd (which counts them)."""
        await self.hooks.round_stopping(cmd_id)
        held = [h for h in self._held if h[0] == cmd_id]
        if held:
            await self.hooks.release_held(cmd_id)
        try:
            for h in held:
                self._held.remove(h)
                await self._post(h[1], h[2], h[3])
            await self._send(self.conn.round_end(cmd_id))
        except LocalProtocolError:
            pass  # the connection ended meanwhile (run() reports why)

    async def _post(self, frame: bytes, pfns: np.ndarray, orders: np.ndarray) -> None:
        if self.walker.isolate:
            self._inflight.append((pfns, orders))  # before sending: the ack may come at once
        await self._send(frame)

    async def _end_round(self) -> None:
        cmd_id = self._walk_id
        if cmd_id is not None and cmd_id not in self._ended:
            self._ended.add(cmd_id)
            await self._send(self.conn.round_end(cmd_id))  # the frames the connection sent under it
        self._walk_scope = None
        self._walk_id = None

    async def _on_ack(self, count: int) -> None:
        self._credit.set()
        self._credit = trio.Event()
        if not self._inflight:
            return
        done = [self._inflight.popleft() for _ in range(min(count, len(self._inflight)))]
        async with self.zone.allocator():
            for pfns, orders in done:
                self.walker.release(pfns, orders)

    def _release_all_inflight(self) -> None:
        # leaving: blocks isolated for frames the host never acked go back to the free lists.
        # Synchronous, so no other task runs meanwhile; the only holder that awaits inside the
        # zone lock is this producer's own walk (its charged hold), which has ended: the lock's
        # critical sections cannot interleave with this even though it is not taken here.
        while self._inflight:
            self.walker.release(*self._inflight.popleft())
        for _, _, pfns, orders in self._held:  # held frames that never went out
            self.walker.release(pfns, orders)
        self._held.clear()

    async def _walk(self, cmd_id: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._walk_scope = scope
            self._walk_id = cmd_id
            task_status.started()
            if self.hooks is not None:
                await self.hooks.walk_starting(cmd_id)
            async with self.zone.walker(round_start=True):
                self.walker.start_round()
            while True:
                while self.conn.credits_available <= 0:
                    await self._credit.wait()
                # the kernel cannot interrupt a lock holder either: a StopRound lands after the batch
                with trio.CancelScope(shield=True):
                    async with self.zone.walker() as hold:
                        pfns, orders = self.walker.next_batch()
                        hold.found = len(pfns)
                if len(pfns) == 0:
                    if self.walker.done:
                        break
                    await trio.sleep(0)  # budget spent finding nothing: let allocations in
                    continue
                hold = False
                if self.hooks is not None and self.conn.active_cmd_id == cmd_id:
                    try:
                        hold = await self.hooks.batch_taken(cmd_id, pfns, orders)
                    except BaseException:  # stopped meanwhile: the batch is never sent
                        if self.walker.isolate:
                            self.walker.release(pfns, orders)
                        raise
                if self.conn.active_cmd_id != cmd_id:
                    # StopRound arrived while the (shielded) batch was taken: drop the batch; the
                    # pending cancellation lands at the checkpoint
                    if self.walker.isolate:
                        self.walker.release(pfns, orders)
                    await trio.lowlevel.checkpoint()
                    return
                ranges = np.column_stack((pfns.astype(np.uint64), order_pages(orders).astype(np.uint64)))
                # not validated here: the walker returns listed free heads (aligned, in range,
                # distinct) by construction, and the host validates every frame once
                frame = self.conn.hints(cmd_id, ranges, validate=False)
                if hold:  # counted by the connection now, sent by _finish_round later
                    self._held.append((cmd_id, frame, pfns, orders))
                    await trio.sleep(0)
                    continue
                # the connection counted the frame (RoundEnd reports that count, also from a
                # StopRound handled while this send waits), so it must go out: shielded, bounded
                # (a link stuck this long is being torn down anyway)
                with trio.move_on_after(SEND_SHIELD_S) as shield:
                    shield.shield = True
                    await self._post(frame, pfns, orders)
                if shield.cancelled_caught:
                    await trio.lowlevel.checkpoint()  # torn down meanwhile: Cancelled lands here
                    return
                await trio.sleep(0)
        if not scope.cancelled_caught and self._walk_id == cmd_id:
            if self.hooks is None:
                await self._end_round()
            else:
                self._walk_scope = None  # finished: RoundEnd waits for StopRound
