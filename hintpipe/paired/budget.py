"""What a guest costs ``hintpipe host`` in memory, and the host-wide budget guests are admitted on.

A host allocates or maps memory per guest page, and every guest input that sizes it (the shm
setup, a tcp INIT record, ``Hello.page_count``, the RAM handoff) is untrusted. So before anything
is mapped or allocated for a guest, its cost is computed here, in one place, from the per-page
cost of each structure the host will hold for it, and reserved against one budget shared by all
guests (``hintpipe host --max-memory``); a guest that does not fit is refused with an Error naming
the budget and the ask (wire-v1 section 11.6.1). What is charged is what the host's resident
memory can grow by while serving the guest:

- ``page_state``: the skip bitmap and write tracking (:meth:`HostPageState.nbytes_for`, so it
  follows that structure's representation);
- ``destination``: the migrated pages (a u32 version a page in simulation, 4 KiB of real bytes
  with ``--memory real``);
- ``round_masks``: what a live round of the migration engine keeps for its statistics
  (:meth:`MigrationEngine.round_nbytes_for`: the guest's free pages when the round began and the
  pages it skipped, a bit a page each);
- ``guest_memory``: the guest region of wire-v1 11.4 (versions, protect and free bytes), mapped
  from the guest's memfd on unix and shm, mirrored privately on tcp; the host reads and writes
  all of it;
- ``real_memory``: with ``--memory real``, the host's mapping of guest RAM, read in full;
- ``ring``: on shm, the two virtqueues the host maps;
- ``buffers``: the connection's bounded buffers (a queued send and a partial frame received, up to
  ``MAX_FRAME_PAYLOAD`` each), whatever the guest's size.

The reservation is released when the guest's connection ends, after everything it held was
released.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from hintpipe.host.migration import MigrationEngine
from hintpipe.host.pagestate import HostPageState
from hintpipe.paired.region import VERSION_DTYPE, region_layout
from hintpipe.protocol import MAX_FRAME_PAYLOAD
from hintpipe.units import PAGE_SIZE

__all__ = ["GuestCost", "BudgetExceeded", "MemoryBudget", "Reservation",
           "DEFAULT_FRACTION", "default_limit", "mib"]

DEFAULT_FRACTION = 0.5
"""Default ``--max-memory``: this fraction of MemAvailable when the host starts."""


def mib(nbytes: int) -> str:
    """``nbytes`` as a short MiB/GiB figure for messages."""
    if nbytes >= 10 << 30:
        return f"{nbytes / (1 << 30):.1f} GiB"
    return f"{nbytes / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class GuestCost:
    """Bytes of host memory one guest needs, by structure (module docstring)."""

    page_state: int = 0
    destination: int = 0
    round_masks: int = 0
    guest_memory: int = 0
    real_memory: int = 0
    ring: int = 0
    buffers: int = 0

    @classmethod
    def of(cls, page_count: int, *, memory: str = "sim") -> "GuestCost":
        """The cost of a guest of ``page_count`` pages (``memory``: ``sim`` or ``real``)."""
        real = memory == "real"
        return cls(
            page_state=HostPageState.nbytes_for(page_count),
            destination=page_count * (PAGE_SIZE if real else VERSION_DTYPE.itemsize),
            round_masks=MigrationEngine.round_nbytes_for(page_count),
            guest_memory=region_layout(page_count)[3],
            real_memory=page_count * PAGE_SIZE if real else 0,
            buffers=2 * MAX_FRAME_PAYLOAD,
        )

    @property
    def total(self) -> int:
        """All of it, in bytes."""
        return sum(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        """``page state 3.0 MiB, destination 4.0 MiB, ...`` (the non-zero parts)."""
        return ", ".join(f"{f.name.replace('_', ' ')} {mib(getattr(self, f.name))}"
                         for f in fields(self) if getattr(self, f.name))


class BudgetExceeded(Exception):
    """A guest's memory does not fit in the host's budget; ``str()`` names the budget and the ask."""


class Reservation:
    """One guest's share of a :class:`MemoryBudget`; grows as the guest announces more, and is
    returned by :meth:`release` (idempotent)."""

    def __init__(self, budget: "MemoryBudget") -> None:
        self._budget = budget
        self.nbytes = 0
        self.parts: dict[str, int] = {}

    def grow(self, nbytes: int, what: str) -> None:
        """Reserve ``nbytes`` more for ``what``; :class:`BudgetExceeded` (nothing reserved) if
        the budget cannot hold it."""
        self._budget._take(self, nbytes, what)
        self.nbytes += nbytes
        self.parts[what] = self.parts.get(what, 0) + nbytes

    def release(self) -> None:
        """Return everything reserved to the budget."""
        self._budget._give(self)
        self.nbytes = 0
        self.parts.clear()

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class MemoryBudget:
    """The memory a host may commit to all its guests together (``limit`` bytes)."""

    def __init__(self, limit: int, *, source: str = "--max-memory") -> None:
        if limit < 1:
            raise ValueError("the memory budget must be positive")
        self.limit = int(limit)
        self.source = source
        """Where the limit came from (for messages)."""
        self.used = 0
        self.peak = 0
        self._holders: set[Reservation] = set()

    @property
    def free(self) -> int:
        """Bytes not reserved by any guest."""
        return self.limit - self.used

    def reservation(self) -> Reservation:
        """An empty reservation for one guest."""
        return Reservation(self)

    def _take(self, res: Reservation, nbytes: int, what: str) -> None:
        if nbytes > self.free:
            others = len(self._holders - {res})
            raise BudgetExceeded(
                f"{what}: {mib(nbytes)} of host memory asked, but this host's memory budget "
                f"({self.source}) has {mib(self.free)} free ({mib(self.used)} held by {others} "
                f"other guest{'s' if others != 1 else ''})")
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        self._holders.add(res)

    def _give(self, res: Reservation) -> None:
        if res in self._holders:
            self.used -= res.nbytes
            self._holders.discard(res)


def mem_available(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes, None where the kernel does not say."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_limit() -> tuple[int, str]:
    """The default budget and how it was chosen: half of MemAvailable at start (else half of
    physical memory)."""
    avail = mem_available()
    if avail is not None:
        return int(avail * DEFAULT_FRACTION), f"default: half of MemAvailable at start, {mib(avail)}"
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * DEFAULT_FRACTION), f"default: half of physical memory, {mib(total)}"
