"""The guest zone lock, instrumented: walker hold times and allocator wait times.

Time in the simulation is trio's clock (virtual in ``hintpipe demo``). The walker's critical
section is real Python work; its duration is charged to the clock *while the lock is held*, the
way a vCPU spends that long inside ``zone->lock``. A hold's duration is the CPU time of the
holding thread (``time.thread_time``): a kernel holds a spinlock with preemption off, while this
process, on a busy machine, is preempted for whole scheduler ticks (4 ms here) in the middle of
a hold. The wall time of each hold is kept too (``max_hold_wall_us``). An allocation that wants the lock
meanwhile waits, and that wait, in clock time, is the allocation stall it saw.

A hold that found no block (the walker spent its budget on blocks no longer free, or on the
pfn space between free blocks) is an empty hold: it is counted apart from batches, and its
time is in the hold percentiles like any other hold, since an allocation waits behind it just
the same. Python's garbage collector is kept from running inside a hold: a kernel's zone lock
holder is never paused by one, and a full collection here takes milliseconds.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from dataclasses import dataclass
from contextlib import asynccontextmanager
from typing import AsyncIterator

import numpy as np
import trio


def percentiles_us(samples_s: list[float]) -> dict[str, float]:
    """p50/p99/max of a list of durations in seconds, as microseconds (zeros when empty)."""
    if not samples_s:
        return {"p50_us": 0.0, "p99_us": 0.0, "max_us": 0.0, "count": 0}
    a = np.asarray(samples_s) * 1e6
    return {
        "p50_us": round(float(np.percentile(a, 50)), 2),
        "p99_us": round(float(np.percentile(a, 99)), 2),
        "max_us": round(float(a.max()), 2),
        "count": len(a),
    }


class Samples:
    """Durations in seconds: exact count and max, percentiles over the most recent ``keep``.

    Bounded so a guest that runs for days does not grow a list per lock section.
    """

    def __init__(self, keep: int = 1 << 16) -> None:
        self._recent: deque[float] = deque(maxlen=keep)
        self.count = 0
        self.max = 0.0

    def append(self, seconds: float) -> None:
        """Record one duration."""
        self._recent.append(seconds)
        self.count += 1
        self.max = max(self.max, seconds)

    def recent_us(self) -> np.ndarray:
        """The most recent samples (at most ``keep``), in microseconds."""
        return np.fromiter(self._recent, dtype=np.float64, count=len(self._recent)) * 1e6

    def summary_us(self) -> dict:
        """p50/p99 (recent samples), max and count (all samples), in microseconds."""
        out = percentiles_us(list(self._recent))
        out["max_us"] = round(self.max * 1e6, 2)
        out["count"] = self.count
        return out


@dataclass
class WalkerHold:
    """What the holder tells the lock about one hold: how many blocks it found."""

    found: int = 0


class ZoneLock:
    """A trio lock standing for ``zone->lock``, measuring the walker's holds and the waits of the
    allocations it delays."""

    def __init__(self, *, charge_holds: bool = True, fixed_hold_s: float | None = None) -> None:
        self._lock = trio.Lock()
        self.charge_holds = charge_holds
        # a fixed charge instead of the measured one: reproducible clock time for tests
        self.fixed_hold_s = fixed_hold_s
        self.walker_holds = Samples()
        self.round_start_holds = Samples()
        self.alloc_waits = Samples()
        self.empty_holds = 0
        self.max_hold_wall_s = 0.0

    @asynccontextmanager
    async def walker(self, *, round_start: bool = False) -> AsyncIterator[WalkerHold]:
        """Hold the lock for one walker batch (or a walk's start); the body's wall time is
        recorded and charged. The body sets ``found`` on the yielded :class:`WalkerHold`; a
        batch that found nothing counts as an empty hold. Starts are kept apart: they are not
        batches."""
        async with self._lock:
            hold = WalkerHold()
            gc_on = gc.isenabled()
            gc.disable()
            w0 = time.perf_counter()
            t0 = time.thread_time()
            try:
                yield hold
            finally:
                dt = time.thread_time() - t0
                self.max_hold_wall_s = max(self.max_hold_wall_s, time.perf_counter() - w0)
                if gc_on:
                    gc.enable()
            if round_start:
                self.round_start_holds.append(dt)
            else:
                self.walker_holds.append(dt)
                if hold.found == 0:
                    self.empty_holds += 1
            if self.charge_holds:
                await trio.sleep(dt if self.fixed_hold_s is None else self.fixed_hold_s)

    @asynccontextmanager
    async def allocator(self) -> AsyncIterator[None]:
        """Hold the lock for allocator work; the time spent waiting for it is recorded."""
        t0 = trio.current_time()
        async with self._lock:
            self.alloc_waits.append(trio.current_time() - t0)
            yield

    def samples_us(self) -> dict[str, np.ndarray]:
        """Recent walker holds and allocation waits in microseconds (the report's distributions)."""
        return {"hold": self.walker_holds.recent_us(), "alloc_wait": self.alloc_waits.recent_us()}

    def summary(self) -> dict:
        """Hold and wait figures as JSON-ready numbers."""
        hold = self.walker_holds.summary_us()
        wait = self.alloc_waits.summary_us()
        start = self.round_start_holds.summary_us()
        return {
            "batches": hold["count"] - self.empty_holds,
            "empty_holds": self.empty_holds,
            "p50_hold_us": hold["p50_us"],
            "p99_hold_us": hold["p99_us"],
            # the worst hold an allocation could meet: batches and walk starts alike
            "max_hold_us": max(hold["max_us"], start["max_us"]),
            "max_round_start_hold_us": start["max_us"],
            # the same holds in wall time: preemption of this process included
            "max_hold_wall_us": round(self.max_hold_wall_s * 1e6, 2),
            "alloc_sections": wait["count"],
            "p99_alloc_wait_us": wait["p99_us"],
            "max_alloc_wait_us": wait["max_us"],
        }
