"""Write-protect for a guest in its own process (``--wp sim`` in paired processes): faults over the link.

The protection bitmap is ``region.protect``, shared with the host. A guest write checks it;
protected pages are reported with ``Fault(seq, pfns)`` and written only after ``FaultDone(seq)``,
by which time the host has marked them written (dirty, skip cleared) and cleared their
protection. A round barrier (:mod:`hintpipe.paired.barrier`) closes the tracker's gate so that
no write straddles the host's page-state swap.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import numpy as np
import trio

from hintpipe.paired.region import SharedRegion
from hintpipe.protocol.messages import MAX_FAULT_PFNS

__all__ = ["SharedWriteProtect"]


class SharedWriteProtect:
    """Guest write tracker (``GuestMemory.tracker``): faults protected pages over the link.

    ``fault(pfns)`` sends one Fault and returns once its FaultDone arrived (the producer does it).
    """

    name = "shared"

    def __init__(self, region: SharedRegion, fault: Callable[[np.ndarray], Awaitable[None]]) -> None:
        self.region = region
        self._fault = fault
        self._gate_open = True
        self._gate_event = trio.Event()
        self._inside = 0
        self._drained = trio.Event()
        self.fault_events = 0

    async def before_write(self, pfns: np.ndarray) -> None:
        """Return with no protected page left in ``pfns``; the caller writes without yielding."""
        while not self._gate_open:
            await self._gate_event.wait()
        self._inside += 1
        try:
            prot = self.region.protect
            while True:
                hit = pfns[prot[pfns] != 0]
                if len(hit) == 0:
                    self.region.note_written(pfns)
                    return  # no checkpoint between this check and the caller's write
                for i in range(0, len(hit), MAX_FAULT_PFNS):
                    self.fault_events += 1
                    part = hit[i:i + MAX_FAULT_PFNS]
                    await self._fault(part)
                    # the host cleared these bits too (shared) or will never tell us (tcp mirror);
                    # no barrier can re-protect them while this writer is inside
                    prot[part] = 0
        finally:
            self._inside -= 1
            if self._inside == 0:
                self._drained.set()

    async def quiesce(self) -> None:
        """Close the gate and wait until no writer is between its check and its write."""
        self._gate_open = False
        self._gate_event = trio.Event()
        while self._inside:
            self._drained = trio.Event()
            await self._drained.wait()

    def reopen(self) -> None:
        """Let writers through again."""
        self._gate_open = True
        self._gate_event.set()
