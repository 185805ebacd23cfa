"""Simulated write-protect for an in-process guest (``--wp sim``).

At the start of each round the host protects every page (``HostPageState.begin_round`` clears
``written``); a guest write to a page not yet written this round is a fault. The handler runs
before the write completes, as a vCPU waits for its fault to be resolved: it marks the page
written (dirty for the next round), clears its skip bit and thereby unprotects it.
"""

from __future__ import annotations

import numpy as np

from hintpipe.host.pagestate import HostPageState
from hintpipe.wp.base import WpBackend

__all__ = ["SimWriteProtect", "SimBackend"]


class SimWriteProtect:
    """Write tracker whose fault handler is the host's page state, called synchronously."""

    name = "sim"

    def __init__(self, state: HostPageState) -> None:
        self.state = state
        self.fault_events = 0

    async def before_write(self, pfns: np.ndarray) -> None:
        """Deliver faults for the protected pages among ``pfns``; no checkpoint, so atomic."""
        protected = ~self.state.is_written(pfns)
        if protected.any():
            self.fault_events += 1
            self.state.on_written(pfns[protected])


class SimBackend(WpBackend):
    """Simulated faults delivered by the in-process guest's memory before each write."""

    name = "sim"

    def __init__(self, state: HostPageState) -> None:
        super().__init__(state)
        self.guest_tracker = SimWriteProtect(state)

    def stats(self) -> dict:
        """Faults = first writes per round; one (simulated) protect per round."""
        return {"backend": self.name, "faults": self.state.faults, "protect_calls": self.rounds,
                "fault_events": self.guest_tracker.fault_events}
