"""One run configuration for every way hintpipe migrates a guest.

:class:`RunConfig` configures ``hintpipe demo`` (one in-process guest and its host), ``hintpipe
replay`` (a recorded kernel as the guest: :meth:`RunConfig.for_replay`) and both paired processes
(``hintpipe guest`` / ``hintpipe host``). The workload's knobs are a
:class:`~hintpipe.guest.workload.WorkloadConfig`, the link's and the rounds' a
:class:`~hintpipe.host.migration.MigrationConfig`; everything else is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hintpipe.guest.workload import WorkloadConfig
from hintpipe.host.migration import MigrationConfig
from hintpipe.protocol import MAX_RANGES_PER_BATCH
from hintpipe.units import MAX_ORDER
from hintpipe.choices import BACKINGS, GUARDS, MEMORY_KINDS, RACE_MODES, WP_CHOICES
from hintpipe.wp import REAL_BACKENDS

__all__ = ["RACE_MODES", "MEMORY_KINDS", "GUARDS", "RunConfig", "ReplayUsageError"]


class ReplayUsageError(ValueError):
    """An option that cannot apply to a replay (e.g. isolate mode)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one migration run depends on; invalid combinations raise ValueError."""

    pages: int = 1 << 20
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    batch: int = 32
    min_order: int = 9
    race_mode: str = "detect"
    time_budget_us: float = 200.0
    queue_size: int = 256
    event_idx: bool = True
    max_ranges: int = MAX_RANGES_PER_BATCH
    wp: str = "sim"  # sim, uffd, uffd-async, auto, or off (no write tracking: for the oracle test)
    memory: str = "sim"
    broken: frozenset[str] = frozenset()  # host guards turned off (GUARDS): a demonstration only
    charge_holds: bool = True
    fixed_hold_s: float | None = None  # charge this per walker hold instead of the measured time
    baseline: bool = True  # also migrate the same guest without hinting, for comparison
    reclaim: bool = False  # discard hinted free pages from the guest's memfd (hintpipe.host.reclaim)
    reclaim_for_s: float = 0.0  # guest time the host reclaims before the migration starts (hinting rounds of its own)
    backing: str = "shmem"  # what backs real guest RAM (BACKINGS)

    def __post_init__(self) -> None:
        if self.workload.kind == "replay" and self.race_mode != "detect":
            raise ReplayUsageError(
                "replay runs in detect mode only: the recorded kernel decided every allocation, "
                "so hinted blocks cannot be isolated from it")
        if self.pages < 1:
            raise ValueError("pages must be >= 1")
        if self.race_mode not in RACE_MODES:
            raise ValueError(f"race mode must be one of {RACE_MODES}, got {self.race_mode!r}")
        if not 0 <= self.min_order <= MAX_ORDER:
            raise ValueError(f"min_order must be in 0..{MAX_ORDER}")
        if not 1 <= self.batch <= self.max_ranges:
            raise ValueError(f"batch must be in 1..{self.max_ranges}")
        if self.queue_size < 1 or self.queue_size & (self.queue_size - 1):
            raise ValueError("queue size must be a power of two")
        if self.memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be 'sim' or 'real', got {self.memory!r}")
        if self.wp not in WP_CHOICES:
            raise ValueError(f"wp must be one of {', '.join(WP_CHOICES)}, got {self.wp!r}")
        if self.wp in REAL_BACKENDS and self.memory != "real":
            raise ValueError(f"--wp {self.wp} write-protects real memory: use it with --memory real")
        object.__setattr__(self, "broken", frozenset(self.broken))  # any collection of names
        unknown = self.broken - set(GUARDS)
        if unknown:
            raise ValueError(f"unknown guard {sorted(unknown)[0]!r} (one of {', '.join(GUARDS)})")
        if self.backing not in BACKINGS:
            raise ValueError(f"backing must be one of {', '.join(BACKINGS)}, got {self.backing!r}")
        if self.backing != "shmem" and self.memory != "real":
            raise ValueError(f"--backing {self.backing} backs real guest RAM: use it with --memory real")
        if self.backing == "hugetlb" and self.pages % 512:
            raise ValueError("--backing hugetlb needs a guest size that is a multiple of 2M")
        if self.reclaim_for_s < 0 or (self.reclaim_for_s and not self.reclaim):
            raise ValueError("--reclaim-for needs --reclaim and a time of 0 s or more")
        if "reclaim-check" in self.broken and not self.reclaim:
            raise ValueError("the reclaim-check guard exists only with --reclaim")
        if "scan-before-send" in self.broken and (self.memory != "real" or self.wp not in ("uffd-async", "auto")):
            raise ValueError("the scan-before-send guard exists only with --memory real --wp uffd-async")

    def guard_on(self, name: str) -> bool:
        """Whether the host guard ``name`` (a key of :data:`GUARDS`) is in force."""
        if name not in GUARDS:
            raise ValueError(f"unknown guard {name!r}")
        return name not in self.broken

    @classmethod
    def for_replay(cls, *, write_rate: float = 0.0, seed: int = 1, tick_s: float = 0.02,
                   **kw) -> "RunConfig":
        """A replay's configuration: the recorded trace is the workload, ``write_rate`` extra
        page writes per second of trace go to allocated pages (``seed`` picks them), the trace
        advances every ``tick_s`` of guest time; ``kw`` are the other fields. The guest size
        comes from the trace."""
        return cls(workload=WorkloadConfig.replay(write_pages_per_s=write_rate, seed=seed, tick_s=tick_s), **kw)
