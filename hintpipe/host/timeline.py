"""A migration's figures over time, sampled from the running engine into bounded arrays.

:class:`Timeline` is a :class:`~hintpipe.progress.MigrationObserver`: the engine calls it at each
round's start and end and after each chunk of pages, and it samples the guest's free pages, the
pages in the host's skip bitmap (hinted free), the pages sent and skipped so far and the write
faults so far, on the migration's clock. It is what ``--report`` and ``--plot`` draw.

Cheap by construction: a sample is two ``count_nonzero`` passes (no Python per page); chunk
samples are spaced so a round gets at most ``chunk_samples`` of them, and skipped altogether
while sampling has cost more than ``max_cost`` of the wall time since the migration began (round
boundaries are always sampled). The table holds at most ``capacity`` rows: when full, every other
row is dropped and chunk samples are spaced twice as far.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import trio

from hintpipe.progress import MigrationObserver

__all__ = ["Timeline"]

COLUMNS = ("t_s", "round", "free_pages", "hinted_pages", "sent_pages", "skipped_pages", "faults")
"""Columns of :meth:`Timeline.series`: virtual time since the migration began, the round, the
guest's free pages, the pages in the skip bitmap, pages sent and skipped since the migration
began, write faults since the migration began."""


class Timeline(MigrationObserver):
    """Samples of one migration (``series()``) and one record per round (``rounds``).

    ``free_pages`` counts the guest's free pages cheaply where the guest keeps a counter (the
    buddy allocator does); by default the engine's free mask is counted.
    """

    def __init__(self, *, capacity: int = 2048, chunk_samples: int = 16, max_cost: float = 0.03,
                 free_pages: Callable[[], int] | None = None) -> None:
        self.capacity = capacity
        self.chunk_samples = chunk_samples
        self.max_cost = max_cost
        self.free_pages = free_pages
        self._rows = np.zeros((capacity, len(COLUMNS)), dtype=np.float64)
        self._n = 0
        self._stride = 1  # chunk samples: every ``_stride``-th chunk of a round
        self._spacing = 1  # doubled each time the table is thinned
        self._chunk = 0
        self._t0: float | None = None
        self._clock = trio.current_time
        self._wall0 = 0.0
        self._cost = 0.0
        self._sent_before = 0
        self._skipped_before = 0
        self._round_start: dict = {}
        self.rounds: list[dict] = []
        """Per round: ``index``, ``live``, ``t_start_s``, ``t_end_s``, ``sent``, ``skipped``,
        ``to_send``, ``hinted``, ``faults`` (first writes during the round) and ``bytes_sent``
        (bytes on the link, as the engine counts them)."""

    # ---- MigrationObserver -----------------------------------------------------------------
    def round_started(self, engine, index, live) -> None:
        if self._t0 is None:
            self._clock = engine.now  # the migration's clock: the link's oversleep is not charged
            self._t0 = self._clock()
            self._wall0 = time.perf_counter()
        n = engine.state.page_count
        chunks = -(-n // engine.cfg.chunk_for(n))
        self._stride = max(1, chunks // self.chunk_samples) * self._spacing
        self._chunk = 0
        self._round_start = {"index": index, "live": live, "t_start_s": self._now(),
                             "faults": engine.state.faults}
        self._sample(engine, index, 0, 0)

    def chunk_done(self, engine, index, scanned, sent, skipped) -> None:
        self._chunk += 1
        if self._chunk % self._stride:
            return
        if self._cost > self.max_cost * (time.perf_counter() - self._wall0):
            return  # sampling would cost more than its share of the run
        self._sample(engine, index, sent, skipped)

    def round_ended(self, engine, report) -> None:
        self._sample(engine, report.index, report.sent, report.skipped)
        start = self._round_start
        self.rounds.append({
            "index": report.index, "live": start["live"], "t_start_s": start["t_start_s"], "t_end_s": self._now(),
            "sent": report.sent, "skipped": report.skipped, "to_send": report.to_send, "hinted": report.hinted,
            "faults": engine.state.faults - start["faults"],
            "bytes_sent": report.bytes_sent,
        })
        self._sent_before += report.sent
        self._skipped_before += report.skipped

    # ---- samples -----------------------------------------------------------------------------
    def _now(self) -> float:
        return self._clock() - (self._t0 or 0.0)

    def _sample(self, engine, index: int, sent: int, skipped: int) -> None:
        t = time.perf_counter()
        free = self.free_pages() if self.free_pages is not None else int(np.count_nonzero(engine.free_mask()))
        hinted = engine.state.count_skip()
        if self._n == self.capacity:  # full: keep every other row, sample chunks half as often
            kept = self._rows[: self._n : 2].copy()
            self._n = len(kept)
            self._rows[: self._n] = kept
            self._spacing *= 2
            self._stride *= 2
        self._rows[self._n] = (self._now(), index, free, hinted, self._sent_before + sent,
                               self._skipped_before + skipped, engine.state.faults)
        self._n += 1
        self._cost += time.perf_counter() - t

    def __getstate__(self) -> dict:
        # a finished timeline goes from a replay's worker process to the report: without the
        # engine's clock (a bound method of the engine), which it no longer needs
        state = dict(self.__dict__)
        state["_clock"] = trio.current_time
        return state

    def series(self) -> dict[str, np.ndarray]:
        """The samples as columns (:data:`COLUMNS`), oldest first."""
        rows = self._rows[: self._n]
        return {name: rows[:, i].copy() for i, name in enumerate(COLUMNS)}

    @property
    def sampling_s(self) -> float:
        """Wall time spent sampling (what the timeline cost the run)."""
        return self._cost
