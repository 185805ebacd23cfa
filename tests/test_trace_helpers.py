"""Shared helpers (no tests here) for tests/test_trace_*.py: data paths and slow reference models."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import zstandard

DATA = Path(__file__).parent / "data" / "traces"
NUMPY = DATA / "numpy-churn"
TAR = DATA / "tar-gzip"

LINE = re.compile(rb"\[(\d+)\] \S+ +(\d+)\.(\d+): (mm_page_\w+): page=\S+ pfn=0x([0-9a-f]+) order=(\d+)"
                  rb"(?: migratetype=(-?\d+))?(?: gfp_flags=\S+)?(?: percpu_refill=(\d))?$")
TYPES = {b"mm_page_alloc": 0, b"mm_page_free": 1, b"mm_page_free_batched": 2,
         b"mm_page_alloc_zone_locked": 3, b"mm_page_pcpu_drain": 4}


def text(rec: Path) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(open(rec / "kmem.trace.zst", "rb")).read()


def regex_rows(data: bytes) -> list[tuple]:
    """Brute-force per-line regex parse: (ts_ns, type, pfn, order, mt, refill, cpu) per line."""
    rows = []
    for line in data.splitlines():
        m = LINE.search(line)
        assert m, line
        cpu, sec, frac, ev, pfn, order, mt, pr = m.groups()
        rows.append((int(sec) * 10**9 + int(frac) * 1000, TYPES[ev], int(pfn, 16), int(order),
                     int(mt) if mt is not None else -1, int(pr or 0), int(cpu)))
    return rows


def reference_replay(initial_free: np.ndarray, rows) -> np.ndarray:
    """Obviously-correct per-event model (kernel semantics, one Python step per event)."""
    free = initial_free.copy()
    for _ts, t, pfn, order, *_ in rows:
        pages = slice(pfn, pfn + (1 << order))
        if t in (0, 3):  # alloc, alloc_zone_locked: not buddy-free
            free[pages] = False
        elif t == 4:  # pcpu drain: back to the buddy
            free[pages] = True
        elif t == 1 and not (order <= 3 or order == 9):  # free of an order pcp lists refuse
            free[pages] = True
        # free of a pcp order (goes to a pcp list) and free_batched: no change
    return free
