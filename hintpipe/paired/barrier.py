"""Round barriers and the pause across the process boundary, on the region's control words.

The guest's writes to protected pages are faulted over the link
(:class:`~hintpipe.wp.shared.SharedWriteProtect`): a write checks ``region.protect`` and reports
protected pages with ``Fault(seq, pfns)``, writing them only after ``FaultDone(seq)``.

The check-then-write race
-------------------------
A guest task that found page X unprotected and is about to write it must not straddle the
host's round boundary (swap of dirty/written + re-protecting every page): the write would land
in the new round unprotected and unrecorded, and if X was already sent this round it is lost.
Instead of a cross-process seqlock (a Dekker-style "store flag, load other flag" handshake,
which x86-TSO may reorder without fences), a round starts with a *barrier* on single-writer
control words in the shared control page:

1. host: ``barrier_req = k``.
2. guest: closes its write gate (new writers wait), waits until no writer is between its check
   and its write (writers that wait for a FaultDone are inside; the host keeps answering faults
   while it waits, so they finish), then ``barrier_ack = k``.
3. host (sees ``barrier_ack == k``): swaps its page state and sets ``protect[:] = 1``, then
   ``barrier_done = k``.
4. guest (sees ``barrier_done == k``): opens the gate. Writers re-check the protect bits.

Every write therefore happens entirely before or entirely after the host's swap. Pause (for
stop-and-copy) is the same shape: ``pause_req = k``, guest parks its vCPUs and publishes its stats,
``pause_ack = k``. Both sides poll the words (``POLL_S``); the host gives up after a timeout or
as soon as the guest's connection is gone.

A guest writing stray values into these words can only stall or break its own migration.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import trio

from hintpipe.paired.region import (
    OFF_BARRIER_ACK,
    OFF_BARRIER_DONE,
    OFF_BARRIER_REQ,
    OFF_PAUSE_ACK,
    OFF_PAUSE_REQ,
    SharedRegion,
)
from hintpipe.wp.base import GatedTracker

POLL_S = 0.0005
"""Polling interval of the control words (both sides)."""


class GuestStuck(Exception):
    """The guest did not answer a barrier or pause in time."""


class GuestLeft(Exception):
    """The guest's connection ended while the host waited for it."""


# ---- guest side ---------------------------------------------------------------------------


async def guest_control_loop(region: SharedRegion, tracker: GatedTracker,
                             pause: Callable[[], Awaitable[None]], stats: Callable[[], dict]) -> None:
    """Guest task: answer the host's barrier and pause requests (runs until cancelled)."""
    last_barrier = region.word(OFF_BARRIER_REQ)
    last_pause = region.word(OFF_PAUSE_REQ)
    while True:
        await trio.sleep(POLL_S)
        req = region.word(OFF_BARRIER_REQ)
        if req != last_barrier:
            await tracker.quiesce()
            region.set_word(OFF_BARRIER_ACK, req)
            while region.word(OFF_BARRIER_DONE) != req:
                await trio.sleep(POLL_S)
            tracker.reopen()
            last_barrier = req
        req = region.word(OFF_PAUSE_REQ)
        if req != last_pause:
            await pause()
            region.write_stats(stats())
            region.set_word(OFF_PAUSE_ACK, req)
            last_pause = req


# ---- host side ----------------------------------------------------------------------------


class HostControl:
    """Host half of the barrier/pause handshakes for one guest region."""

    def __init__(self, region: SharedRegion, gone: trio.Event, *, timeout_s: float = 30.0) -> None:
        self.region = region
        self.gone = gone
        self.timeout_s = timeout_s
        self._k = region.word(OFF_BARRIER_REQ)
        self._p = region.word(OFF_PAUSE_REQ)
        self.barriers = 0

    async def _wait(self, off: int, value: int, what: str) -> None:
        with trio.move_on_after(self.timeout_s):
            while self.region.word(off) != value:
                if self.gone.is_set():
                    raise GuestLeft(f"guest left during {what}")
                await trio.sleep(POLL_S)
            return
        raise GuestStuck(f"guest did not answer {what} within {self.timeout_s} s")

    async def barrier(self, begin: Callable[[], None]) -> None:
        """Run ``begin`` (the page-state swap) with the guest's writers quiesced, then protect all."""
        self._k = (self._k + 1) & 0xFFFFFFFF
        self.region.set_word(OFF_BARRIER_REQ, self._k)
        await self._wait(OFF_BARRIER_ACK, self._k, "a round barrier")
        begin()
        self.region.protect_all()
        self.region.set_word(OFF_BARRIER_DONE, self._k)  # after the protect bits (x86-TSO store order)
        self.barriers += 1

    async def pause(self) -> None:
        """Ask the guest to park its vCPUs; return once it has (and published its stats)."""
        self._p = (self._p + 1) & 0xFFFFFFFF
        self.region.set_word(OFF_PAUSE_REQ, self._p)
        await self._wait(OFF_PAUSE_ACK, self._p, "the pause request")
