"""Columnar page-allocator events: the in-memory form shared by the tracefs parser, the
hintpipe trace-v1 format and the replay model."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class EventType(enum.IntEnum):
    """The five kmem events hintpipe models (values are the trace-v1 wire codes)."""

    ALLOC = 0  # mm_page_alloc: a caller got the block (from a pcp list or from the buddy)
    FREE = 1  # mm_page_free: a caller released the block (to a pcp list or the buddy)
    FREE_BATCHED = 2  # mm_page_free_batched: same page also has an mm_page_free event
    ALLOC_ZONE_LOCKED = 3  # mm_page_alloc_zone_locked: block left the buddy free lists
    PCPU_DRAIN = 4  # mm_page_pcpu_drain: block moved from a pcp list back to the buddy


EVENT_NAMES = {
    EventType.ALLOC: "mm_page_alloc",
    EventType.FREE: "mm_page_free",
    EventType.FREE_BATCHED: "mm_page_free_batched",
    EventType.ALLOC_ZONE_LOCKED: "mm_page_alloc_zone_locked",
    EventType.PCPU_DRAIN: "mm_page_pcpu_drain",
}
NAME_TO_TYPE = {v: k for k, v in EVENT_NAMES.items()}

COLUMNS = {
    "ts_ns": np.dtype("<i8"),
    "etype": np.dtype("u1"),
    "pfn": np.dtype("<u8"),
    "order": np.dtype("u1"),
    "migratetype": np.dtype("i1"),
    "percpu_refill": np.dtype("u1"),
    "cpu": np.dtype("<u2"),
}
"""Column name -> dtype. migratetype is -1 where the event has none; percpu_refill is 0/1 (0
where the event has none)."""


@dataclass(frozen=True)
class EventBatch:
    """A run of consecutive events in trace order, one numpy array per column."""

    ts_ns: np.ndarray
    etype: np.ndarray
    pfn: np.ndarray
    order: np.ndarray
    migratetype: np.ndarray
    percpu_refill: np.ndarray
    cpu: np.ndarray

    def __len__(self) -> int:
        return len(self.etype)

    @classmethod
    def empty(cls) -> "EventBatch":
        """A batch of no events."""
        return cls(**{k: np.empty(0, dt) for k, dt in COLUMNS.items()})

    @classmethod
    def concat(cls, batches: list["EventBatch"]) -> "EventBatch":
        """The events of ``batches`` in order, as one batch."""
        if not batches:
            return cls.empty()
        return cls(**{k: np.concatenate([getattr(b, k) for b in batches]) for k in COLUMNS})

    def take(self, sel) -> "EventBatch":
        """Rows selected by a slice, index array or boolean mask."""
        return EventBatch(**{k: getattr(self, k)[sel] for k in COLUMNS})

    def columns(self) -> dict[str, np.ndarray]:
        """Column name -> array, in the trace format's column order."""
        return {k: getattr(self, k) for k in COLUMNS}

    def outside(self, page_count: int) -> np.ndarray:
        """bool per event: the block reaches past PFN ``page_count - 1`` (beyond the snapshot)."""
        return self.pfn + (np.uint64(1) << self.order.astype(np.uint64)) > np.uint64(page_count)
