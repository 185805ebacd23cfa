"""Memory the host could reclaim over a replay: discards of guest pages, undone by guest touches.

A page is *discarded* from the moment the host would drop its backing (how a policy tells the
host, and when the host acts, is the policy's: :mod:`hintpipe.trace.policies`) until the guest
next touches it (a recorded allocation writes its pages, and so does a ``--write-rate`` write);
a discarded page the guest frees again stays discarded. Two backings are counted side by side:

- 4 KiB pages: every discarded page is reclaimed memory.
- 2 MiB huge pages: the unit is an aligned block of 512 pages. A discard frees a unit only if it
  covers the whole unit (QEMU skips ranges not aligned to the RAM block's page size,
  hw/virtio/virtio-balloon.c:387-390 @ QEMU 10.2, and a hole punched into part of a hugetlbfs
  page frees nothing); smaller discards are counted as ``hints_too_small`` (pages). A touch of
  any page of a discarded unit repopulates the whole unit.

The counts are kept incrementally (a gather per discard and per touch, no scan of the guest) and
sampled once per replay step, so the series is what an HTML report plots.
"""

from __future__ import annotations

import numpy as np

from hintpipe.units import PAGE_SIZE

HUGE_ORDER = 9
"""2 MiB huge pages are 2**9 base pages of 4 KiB on x86-64."""
MAX_SERIES_POINTS = 1000
"""Points kept in a reported series (evenly downsampled); a plot needs no more."""

_MIB = 2**20 / PAGE_SIZE  # pages per MiB


class ReclaimTracker:
    """Discarded pages of a guest of ``page_count`` pages at 4 KiB and 2 MiB backing, over time."""

    def __init__(self, page_count: int) -> None:
        self.page_count = page_count
        self.pages = np.zeros(page_count, bool)
        self.units = np.zeros(-(-page_count // (1 << HUGE_ORDER)), bool)
        self.n_pages = 0
        self.n_units = 0
        self.discards = 0
        """Discard operations (blocks) the host performed."""
        self.pages_discarded = 0
        """Pages newly discarded, summed over the run (a page discarded twice counts twice)."""
        self.hints_too_small = 0
        """Discarded pages in blocks smaller than a huge page: nothing reclaimed at 2 MiB."""
        self.times: list[float] = []
        self.series_4k: list[int] = []
        self.series_2m: list[int] = []
        self._t_last: float | None = None
        self._area_4k = 0.0
        self._area_2m = 0.0
        self._peak_4k = 0
        self._peak_2m = 0

    def discard(self, pfns: np.ndarray, orders: np.ndarray) -> None:
        """The host dropped the backing of the blocks ``(pfns[i], orders[i])`` (aligned)."""
        if not len(pfns):
            return
        pfns = np.asarray(pfns, np.int64)
        orders = np.asarray(orders, np.int64)
        self.discards += len(pfns)
        for k in (np.unique(orders).tolist() if len(orders) > 1 else [int(orders[0])]):
            sel = pfns if len(orders) == 1 else pfns[orders == k]
            new = self._mark(self.pages, sel, k)
            self.n_pages += new
            self.pages_discarded += new
            if k >= HUGE_ORDER:
                self.n_units += self._mark(self.units, sel >> HUGE_ORDER, k - HUGE_ORDER)
            else:
                self.hints_too_small += len(sel) << k
        self._peaks()

    @staticmethod
    def _mark(bits: np.ndarray, starts: np.ndarray, k: int) -> int:
        """Set the aligned blocks of ``2**k`` entries at ``starts``; return how many were unset."""
        if len(starts) == 1:  # the common case (a balloon's block, one report entry): a slice
            a = int(starts[0])
            seg = bits[a:a + (1 << k)]
            new = len(seg) - int(np.count_nonzero(seg))
            seg[:] = True
            return new
        m = len(bits) >> k
        rows = bits[: m << k].reshape(m, 1 << k)
        idx = starts >> k
        new = rows[idx].size - int(np.count_nonzero(rows[idx]))
        rows[idx] = True
        return new

    def touch(self, pages: np.ndarray) -> None:
        """The guest wrote ``pages``: they (and at 2 MiB their whole units) are backed again."""
        if not len(pages) or not (self.n_pages or self.n_units):
            return
        if self.n_pages:
            hit = self.pages[pages]
            if hit.any():
                self.n_pages -= int(np.count_nonzero(np.unique(pages[hit])))
                self.pages[pages] = False
        if self.n_units:
            units = np.asarray(pages, np.int64) >> HUGE_ORDER
            hit = self.units[units]
            if hit.any():
                self.n_units -= len(np.unique(units[hit]))
                self.units[units] = False

    def _peaks(self) -> None:
        self._peak_4k = max(self._peak_4k, self.n_pages)
        self._peak_2m = max(self._peak_2m, self.n_units)

    def sample(self, t: float) -> None:
        """Record the counts at time ``t`` (seconds since the replay began) and integrate."""
        if self._t_last is not None and t > self._t_last:
            dt = t - self._t_last
            self._area_4k += self.series_4k[-1] * dt
            self._area_2m += self.series_2m[-1] * dt
        self._t_last = t
        self.times.append(t)
        self.series_4k.append(self.n_pages)
        self.series_2m.append(self.n_units << HUGE_ORDER)
        self._peaks()

    def figures(self) -> dict:
        """``reclaim`` of a policy's report: means, peaks and finals in MiB, counts, and the
        series (``t_s``, ``mib_4k``, ``mib_2m``), downsampled to at most MAX_SERIES_POINTS."""
        span = (self.times[-1] - self.times[0]) if len(self.times) > 1 else 0.0
        idx = np.unique(np.linspace(0, len(self.times) - 1, min(len(self.times), MAX_SERIES_POINTS)).astype(int)) \
            if self.times else np.empty(0, int)

        def mib(pages: float) -> float:
            return round(pages / _MIB, 2)

        return {
            "span_s": round(span, 3),
            "mib_mean_4k": mib(self._area_4k / span) if span else 0.0,
            "mib_mean_2m": mib(self._area_2m / span) if span else 0.0,
            "mib_peak_4k": mib(self._peak_4k),
            "mib_peak_2m": mib(self._peak_2m << HUGE_ORDER),
            "mib_final_4k": mib(self.n_pages),
            "mib_final_2m": mib(self.n_units << HUGE_ORDER),
            "discards": self.discards,
            "pages_discarded": self.pages_discarded,
            "hints_too_small": self.hints_too_small,
            "series": {
                "t_s": [round(self.times[i], 3) for i in idx.tolist()],
                "mib_4k": [mib(self.series_4k[i]) for i in idx.tolist()],
                "mib_2m": [mib(self.series_2m[i]) for i in idx.tolist()],
            },
        }
