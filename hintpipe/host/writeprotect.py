"""Simulated write-protect for an in-process guest.

At the start of each round the host protects every page (``HostPageState.begin_round`` clears
``written``); a guest write to a page not yet written this round is a fault. The handler runs
before the write completes, as a vCPU waits for its fault to be resolved: it marks the page
written (dirty for the next round), clears its skip bit and thereby unprotects it.
"""

from __future__ import annotations

import numpy as np

from hintpipe.host.pagestate import HostPageState


class SimWriteProtect:
    """Write tracker whose fault handler is the host's page state, called synchronously."""

    name = "sim"

    def __init__(self, state: HostPageState) -> None:
        self.state = state
        self.fault_events = 0

    async def before_write(self, pfns: np.ndarray) -> None:
        """Deliver faults for the protected pages among ``pfns``; no checkpoint, so atomic."""
        protected = ~self.state.written[pfns]
        if protected.any():
            self.fault_events += 1
            self.state.on_written(pfns[protected])
