"""What every PFN of a recorded guest was at the start, and the zones it lay in.

A VMM transfers guest RAM, not a PFN range: a replay that priced every PFN of the kpageflags
snapshot as a full page would charge a 24 GiB guest with 4.6 GiB of managed memory for 19 GiB it
never held. Each PFN is one :class:`PageKind`:

- ``FREE``: buddy-free (KPF_BUDDY). Linux does not zero freed pages, so a free page holds stale,
  non-zero data: a VMM without hints sends it in full.
- ``USED``: RAM the kernel has handed out (anything else inside a zone that is not below).
- ``ZERO``: RAM the guest never touched, or gave to a balloon: a VMM sends it as a zero page
  (QEMU's ``save_zero_page``: a header, no payload). Recognised as KPF_OFFLINE pages (balloon,
  virtio-mem) and as the flag-less whole memory sections at the top of a zone whose struct pages
  the kernel has not initialised yet (deferred struct page init: ``present - managed`` of the
  zone, which these sections match exactly in the shared recordings).
- ``NOT_RAM``: outside every zone, a hole (``spanned - present`` of a zone, found as the
  flag-less whole sections at the top of the zone: the x86 PCI hole below 4 GiB), or no struct
  page at all (KPF_NOPAGE: a hole without memmap or an offline memory block). Never transferred.

Holes a zone's counts announce but that do not lie at its top (the BIOS area below 1 MiB, whose
pages carry PG_reserved) are not located; they stay ``USED`` and :attr:`Layout.notes` says how
many. Without a zoneinfo snapshot every PFN is RAM and only the kpageflags bits decide.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field

import numpy as np

from hintpipe.units import MAX_ORDER

from .snapshot import PageFlags, decompose

PAGES_PER_SECTION = 1 << 15
"""x86-64 memory section: SECTION_SIZE_BITS 27 - PAGE_SHIFT 12 (arch/x86/include/asm/sparsemem.h);
memory is initialised, hot-plugged and onlined in whole sections."""


class PageKind(enum.IntEnum):
    """What a PFN was at the start of a recording (values are stored per page as uint8)."""

    FREE = 0
    USED = 1
    ZERO = 2
    NOT_RAM = 3


KIND_KEYS = {PageKind.FREE: "free", PageKind.USED: "used", PageKind.ZERO: "zero_or_balloon",
             PageKind.NOT_RAM: "not_ram"}
"""The names of ``trace.pages_by_kind`` in a replay report."""


@dataclass(frozen=True)
class Zone:
    """One memory zone of /proc/zoneinfo: its PFN span, page counts and watermarks (pages)."""

    name: str
    start_pfn: int
    spanned: int
    present: int
    managed: int
    min: int = 0
    low: int = 0
    high: int = 0
    protection: tuple[int, ...] = ()
    """lowmem_reserve: pages this zone keeps back from allocations that could use a higher zone,
    indexed by the highest zone the allocation may use."""

    @property
    def end_pfn(self) -> int:
        """First PFN after the zone's span."""
        return self.start_pfn + self.spanned

    @classmethod
    def from_dict(cls, d: dict) -> "Zone":
        """From a :func:`~hintpipe.trace.snapshot.parse_zoneinfo` entry or a trace-v1 header map."""
        return cls(name=str(d.get("zone", d.get("name"))), start_pfn=int(d["start_pfn"]), spanned=int(d["spanned"]),
                   present=int(d["present"]), managed=int(d["managed"]), min=int(d.get("min", 0)),
                   low=int(d.get("low", 0)), high=int(d.get("high", 0)),
                   protection=tuple(int(x) for x in d.get("protection", ())))

    def as_dict(self) -> dict:
        """JSON/msgpack-ready fields."""
        d = asdict(self)
        d["protection"] = list(self.protection)
        return d


def zones_from_zoneinfo(entries: list[dict]) -> list[Zone]:
    """The zones with pages (spanned > 0) of a parsed zoneinfo, in PFN order."""
    zs = [Zone.from_dict(e) for e in entries if e.get("spanned") and "start_pfn" in e]
    return sorted(zs, key=lambda z: z.start_pfn)


@dataclass
class Layout:
    """The kind of every PFN at the start of a recording, its zones, and its reported blocks."""

    kind: np.ndarray
    """uint8 per PFN: a :class:`PageKind`."""
    zones: list[Zone] = field(default_factory=list)
    reported: np.ndarray | None = None
    """bool per PFN, or None when unknown: the page lies in a free block whose head carried
    PG_reported (KPF_UPTODATE on a buddy head), i.e. free page reporting had given it to the
    host, which discarded it."""
    notes: list[str] = field(default_factory=list)
    _ram: np.ndarray | None = field(default=None, repr=False, compare=False)
    _content: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def page_count(self) -> int:
        """PFNs covered."""
        return len(self.kind)

    @property
    def ram(self) -> np.ndarray:
        """bool per PFN: guest RAM a VMM transfers (computed once; do not modify)."""
        if self._ram is None:
            self._ram = self.kind != PageKind.NOT_RAM
        return self._ram

    def pages_by_kind(self) -> dict[str, int]:
        """PFNs of each kind (``free``, ``used``, ``zero_or_balloon``, ``not_ram``)."""
        return {KIND_KEYS[k]: int(np.count_nonzero(self.kind == k)) for k in PageKind}

    def initial_content(self) -> tuple[np.ndarray, np.ndarray]:
        """What a replay's guest memory starts from (computed once; callers copy): content
        version per PFN (1: data, in use or stale in a free page; 0: a zero page or not RAM) and
        the pages whose content the guest does not need (free pages and PFNs that are not RAM;
        untouched RAM must go on reading as zeros)."""
        if self._content is None:
            held = (self.kind == PageKind.FREE) | (self.kind == PageKind.USED)
            dead = (self.kind == PageKind.FREE) | (self.kind == PageKind.NOT_RAM)
            self._content = (held.astype(np.uint32), dead)
        return self._content

    def zone_index(self, pfns: np.ndarray) -> np.ndarray:
        """Index into :attr:`zones` of each PFN (-1 outside every zone)."""
        if not self.zones:
            return np.zeros(len(pfns), np.int64)
        starts = np.array([z.start_pfn for z in self.zones], np.int64)
        ends = np.array([z.end_pfn for z in self.zones], np.int64)
        p = np.asarray(pfns, np.int64)
        i = np.searchsorted(starts, p, side="right") - 1
        ok = (i >= 0) & (p < ends[np.maximum(i, 0)])
        return np.where(ok, i, -1)

    @classmethod
    def all_ram(cls, initial_free: np.ndarray) -> "Layout":
        """The layout of a trace that carries no page kinds: every PFN RAM, free or used."""
        kind = np.where(initial_free, np.uint8(PageKind.FREE), np.uint8(PageKind.USED)).astype(np.uint8)
        return cls(kind, notes=["the trace carries no page kinds (no zoneinfo or kpageflags details): "
                                "every PFN is counted as RAM"])


def _top_flagless_run(no_flags: np.ndarray, z: Zone) -> int:
    """Start PFN of the whole sections of flag-less pages that end the zone (its end if none)."""
    end = min(z.end_pfn, len(no_flags))
    seg = no_flags[z.start_pfn:end]
    used = np.flatnonzero(~seg)
    first = z.start_pfn + (int(used[-1]) + 1 if len(used) else 0)
    first = -(-first // PAGES_PER_SECTION) * PAGES_PER_SECTION  # whole sections only
    return min(first, end)


def classify(flags: PageFlags, zones: list[Zone]) -> Layout:
    """The :class:`Layout` of a kpageflags snapshot and its zones (see the module docstring)."""
    n = len(flags)
    notes: list[str] = []
    kind = np.full(n, PageKind.USED, np.uint8)
    if (flags.no_flags | flags.buddy).all() and not flags.uptodate.any():
        # a snapshot cut down to KPF_BUDDY (compact test data): flag-less says nothing here
        kind[flags.buddy] = PageKind.FREE
        return Layout(kind, list(zones), None,
                      ["the kpageflags snapshot holds KPF_BUDDY only: every PFN is counted as RAM"])
    if zones:
        in_zone = np.zeros(n, bool)
        for z in zones:
            in_zone[z.start_pfn:min(z.end_pfn, n)] = True
        kind[~in_zone] = PageKind.NOT_RAM
        unlocated = 0
        for z in zones:
            end = min(z.end_pfn, n)
            top = _top_flagless_run(flags.no_flags, z)
            hole = z.spanned - z.present
            hole_here = min(hole, end - top)
            kind[end - hole_here:end] = PageKind.NOT_RAM
            unlocated += hole - hole_here
            never = end - hole_here - top
            if never > 0:
                kind[top:top + never] = PageKind.ZERO
                unmanaged = z.present - z.managed
                if never != unmanaged:
                    notes.append(f"zone {z.name}: {never} never-initialised pages at its top, "
                                 f"present - managed = {unmanaged}")
        if unlocated:
            notes.append(f"{unlocated} hole pages of the zones' counts (spanned - present) could not be "
                         "located; they are counted as used")
    else:
        notes.append("no zoneinfo snapshot: zones, holes and never-initialised memory unknown")
    kind[flags.offline] = PageKind.ZERO
    kind[flags.nopage] = PageKind.NOT_RAM
    kind[flags.buddy & (kind != PageKind.NOT_RAM)] = PageKind.FREE
    return Layout(kind, list(zones), reported_blocks(flags.buddy, flags.uptodate), notes)


def reported_blocks(buddy: np.ndarray, uptodate: np.ndarray) -> np.ndarray:
    """bool per PFN: in a maximal free block whose head page has PG_reported (KPF_UPTODATE)."""
    pfns, orders = decompose(buddy, 0, MAX_ORDER)
    heads = pfns.astype(np.int64)
    rep = uptodate[heads]
    out = np.zeros(len(buddy), bool)
    for k in np.unique(orders[rep]).tolist():
        sel = heads[rep & (orders == k)]
        m = len(buddy) >> k
        out[: m << k].reshape(m, 1 << k)[sel >> k] = True
    return out


def reported_by_order(layout: Layout, pfns: np.ndarray, orders: np.ndarray) -> list[int]:
    """Of the free blocks ``(pfns, orders)`` at the start (:func:`decompose` of the initial free
    pages), the Reported ones per order 0..MAX_ORDER (empty when unknown)."""
    if layout.reported is None:
        return []
    rep = layout.reported[pfns.astype(np.int64)]
    return np.bincount(orders[rep], minlength=MAX_ORDER + 1).tolist()
