"""Allocator snapshots: /proc/kpageflags (BUDDY pages and the flags that say what a PFN is),
/proc/buddyinfo, /proc/zoneinfo.

From kernel 6.x KPF_BUDDY is set on every page of a free buddy block, so the free blocks are
recovered by splitting each run of BUDDY pages into maximal naturally aligned power-of-two
blocks (order at most MAX_ORDER), all with array operations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from hintpipe.units import MAX_ORDER, NR_ORDERS

from .errors import TraceError
from .stream import iter_raw

# Bits of /proc/kpageflags (include/uapi/linux/kernel-page-flags.h)
KPF_UPTODATE = 3
"""PG_uptodate; on the head of a free buddy block it is PG_reported (include/linux/page-flags.h:
``PG_reported = PG_uptodate``): free page reporting has handed the block to the host."""
KPF_BUDDY = 10
"""Set on pages that sit in a buddy free list."""
KPF_NOPAGE = 20
"""No struct page at this PFN (a hole without memmap, or an offline memory block)."""
KPF_OFFLINE = 23
"""PG_offline: logically offline, e.g. inflated into a balloon or unplugged by virtio-mem."""
KPAGEFLAGS = Path("/proc/kpageflags")


def snapshot_kpageflags(out: str | Path, src: str | Path = KPAGEFLAGS, level: int = 3) -> int:
    """Stream ``/proc/kpageflags`` into a zstd file without holding it in memory; returns the
    bytes read (8 per PFN). The kernel computes each entry as it is read: about 1.1-1.7 s for
    6.5 M PFNs on the development machine (two readers in parallel were no faster)."""
    n = 0
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
    with open(src, "rb", buffering=0) as f, open(out, "wb") as dst, cctx.stream_writer(dst) as z:
        while b := f.read(4 << 20):
            z.write(b)
            n += len(b)
    return n


def buddy_only_kpageflags(src: str | Path, out: str | Path, level: int = 19) -> int:
    """Copy a kpageflags snapshot keeping only KPF_BUDDY (the free pages: a replay of it counts
    every PFN as RAM, the page kinds need the other flags), which compresses
    several times smaller; returns the bytes written. Used for test data."""
    parts = []
    carry = b""
    for piece in iter_raw(src):
        data = carry + piece
        cut = len(data) - len(data) % 8
        carry = data[cut:]
        parts.append(np.frombuffer(data, "<u8", count=cut // 8) & np.uint64(1 << KPF_BUDDY))
    Path(out).write_bytes(zstandard.ZstdCompressor(level=level, write_checksum=True).compress(np.concatenate(parts).tobytes()))
    return Path(out).stat().st_size


def read_kpageflags_buddy(path: str | Path) -> np.ndarray:
    """Return bool[page_count]: True where KPF_BUDDY is set in a kpageflags snapshot (zstd/gzip/plain).

    Streams the file: only the byte holding bit 10 (byte 1 of each little-endian u64) is kept,
    so memory is one byte per page, not eight.
    """
    parts: list[np.ndarray] = []
    carry = b""
    for piece in iter_raw(path):
        data = carry + piece if carry else piece
        cut = len(data) - len(data) % 8
        carry = data[cut:]
        if cut:
            b1 = np.frombuffer(data, np.uint8, count=cut)[1::8]
            parts.append((b1 & (1 << (KPF_BUDDY - 8))) != 0)
    if carry:
        raise TraceError("corrupt", "kpageflags snapshot is not a whole number of 8-byte entries", str(path))
    if not parts:
        raise TraceError("corrupt", "kpageflags snapshot is empty", str(path))
    return np.concatenate(parts)


@dataclass
class PageFlags:
    """The /proc/kpageflags bits a replay needs, one bool per PFN (a byte each, not eight)."""

    buddy: np.ndarray
    uptodate: np.ndarray
    nopage: np.ndarray
    offline: np.ndarray
    no_flags: np.ndarray
    """Not one flag set: a page whose struct page was never initialised (memory the kernel has
    not given to the buddy allocator yet), a hole with a memmap, or a page on a per-CPU list."""

    def __len__(self) -> int:
        return len(self.buddy)


def read_kpageflags(path: str | Path) -> PageFlags:
    """Read a kpageflags snapshot (zstd/gzip/plain) into :class:`PageFlags`, streaming."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("buddy", "uptodate", "nopage", "offline", "no_flags")}
    carry = b""
    for piece in iter_raw(path):
        data = carry + piece if carry else piece
        cut = len(data) - len(data) % 8
        carry = data[cut:]
        if cut:
            w = np.frombuffer(data, np.uint64, count=cut // 8)
            b = np.frombuffer(data, np.uint8, count=cut)
            parts["uptodate"].append((b[0::8] & (1 << KPF_UPTODATE)) != 0)
            parts["buddy"].append((b[1::8] & (1 << (KPF_BUDDY - 8))) != 0)
            b2 = b[2::8]
            parts["nopage"].append((b2 & (1 << (KPF_NOPAGE - 16))) != 0)
            parts["offline"].append((b2 & (1 << (KPF_OFFLINE - 16))) != 0)
            parts["no_flags"].append(w == 0)
    if carry:
        raise TraceError("corrupt", "kpageflags snapshot is not a whole number of 8-byte entries", str(path))
    if not parts["buddy"]:
        raise TraceError("corrupt", "kpageflags snapshot is empty", str(path))
    return PageFlags(**{k: np.concatenate(v) for k, v in parts.items()})


def _levels(mask: np.ndarray, max_order: int) -> list[np.ndarray]:
    """levels[k][i] is True iff the aligned order-k block i (pages i*2^k ..) is entirely set.
    Each level is built from the one below with one AND of its even and odd entries, so all
    levels together cost about two passes over the mask."""
    levels = [np.asarray(mask, bool)]
    for _ in range(max_order):
        prev = levels[-1]
        m = len(prev) // 2
        levels.append(prev[0:2 * m:2] & prev[1:2 * m:2])
    return levels


def decompose(mask: np.ndarray, min_order: int = 0, max_order: int = MAX_ORDER) -> tuple[np.ndarray, np.ndarray]:
    """Split the True pages of ``mask`` into maximal naturally aligned power-of-two blocks.

    Returns (pfns uint64, orders uint8), highest order first, only blocks of order >= min_order.
    A block of order k is maximal when all its pages are set and its aligned parent of order
    k+1 is not entirely set (or k is max_order); this equals the buddy allocator's merge of a
    run of free pages.
    """
    levels = _levels(mask, max_order)
    pfns_out, orders_out = [], []
    for k in range(max_order, min_order - 1, -1):
        lk = levels[k]
        if k == max_order:
            sel = lk
        else:
            parent = np.zeros(len(lk), bool)
            up = levels[k + 1]
            parent[: 2 * len(up)] = np.repeat(up, 2)
            sel = lk & ~parent
        idx = np.flatnonzero(sel)
        if len(idx):
            pfns_out.append(idx.astype(np.uint64) << np.uint64(k))
            orders_out.append(np.full(len(idx), k, np.uint8))
    if not pfns_out:
        return np.empty(0, np.uint64), np.empty(0, np.uint8)
    return np.concatenate(pfns_out), np.concatenate(orders_out)


def count_by_order(mask: np.ndarray) -> list[int]:
    """Number of maximal aligned free blocks per order 0..MAX_ORDER (buddyinfo's view)."""
    _, orders = decompose(mask)
    return np.bincount(orders, minlength=NR_ORDERS).tolist()


_BUDDY_RE = re.compile(r"^Node\s+(\d+),\s+zone\s+(\S+)\s+((?:\d+\s*)+)$")


def parse_buddyinfo(text: str, path: str = "buddyinfo") -> dict:
    """Parse /proc/buddyinfo. Returns {"zones": {"Normal": [11 ints], ...}, "by_order": [11 ints],
    "free_pages": int} with zones summed per order."""
    zones: dict[str, list[int]] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _BUDDY_RE.match(line.strip())
        if not m:
            raise TraceError("malformed", f"not a buddyinfo line: {line!r}", path, i)
        counts = [int(x) for x in m.group(3).split()]
        zones[f"{m.group(1)}:{m.group(2)}"] = counts
    width = max((len(c) for c in zones.values()), default=NR_ORDERS)
    by_order = [sum(c[k] for c in zones.values() if k < len(c)) for k in range(width)]
    free = sum(n << k for k, n in enumerate(by_order))
    return {"zones": zones, "by_order": by_order, "free_pages": free}


def read_buddyinfo(path: str | Path) -> dict:
    """:func:`parse_buddyinfo` of the file at ``path``."""
    return parse_buddyinfo(Path(path).read_text(), str(path))


def parse_zoneinfo(text: str) -> list[dict]:
    """Zones from /proc/zoneinfo, in file order: [{"node", "zone", "start_pfn", "spanned",
    "present", "managed", "free", "min", "low", "high", "protection"}] (the watermarks in pages,
    ``protection`` the lowmem_reserve array); keys a zone's text lacks are absent."""
    zones: list[dict] = []
    cur: dict | None = None
    for line in text.splitlines():
        m = re.match(r"^Node\s+(\d+),\s+zone\s+(\S+)", line)
        if m:
            cur = {"node": int(m.group(1)), "zone": m.group(2)}
            zones.append(cur)
            continue
        if cur is None:
            continue
        s = line.split()
        if len(s) >= 2 and s[0] in ("spanned", "present", "managed", "min", "low", "high") and s[1].isdigit():
            cur.setdefault(s[0], int(s[1]))  # the first one: per-cpu sections repeat some names
        elif len(s) >= 3 and s[0] == "pages" and s[1] == "free":
            cur["free"] = int(s[2])
        elif len(s) >= 2 and s[0] == "start_pfn:":
            cur["start_pfn"] = int(s[1])
        elif s and s[0] == "protection:":
            cur["protection"] = [int(x) for x in re.findall(r"\d+", line)]
    return zones
