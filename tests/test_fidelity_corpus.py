"""The replay model against the kernel: the fidelity corpus in tests/data/corpus.

Each slice is the start of a recording made on this machine with ``hintpipe record
--checkpoints`` while one workload ran (bench/corpus.py made them; tests/data/corpus/README.md
lists how): the raw ring-buffer pages cut at a checkpoint marker, the kpageflags snapshot of
the start, and the /proc/buddyinfo read at that checkpoint as ``buddyinfo.end``. Replaying a
slice through the reader and model a replay uses must end within 0.1 % of the kernel's free
pages.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hintpipe.trace import model as model_mod
from hintpipe.trace.recording import open_trace

CORPUS = Path(__file__).parent / "data" / "corpus"
MANIFEST = json.loads((CORPUS / "corpus.json").read_text())
WORKLOADS = {"make", "fork", "pagecache", "thp", "mmap-churn", "idle", "numpy"}
LIMIT = 0.001  # 0.1 % of the kernel's free pages


def replay_error(name: str) -> tuple[int, int, int]:
    """(events applied, model free pages, kernel free pages) at the end of slice ``name``."""
    tr = open_trace(CORPUS / name)
    assert tr.encoding == "ring-buffer"
    m = tr.model()
    m.run_to_end()
    return m.events_applied, m.nr_free_pages, tr.buddyinfo_end["free_pages"]


def test_the_corpus_has_every_workload_of_the_issue():
    assert {e["name"] for e in MANIFEST} == WORKLOADS


@pytest.mark.parametrize("entry", MANIFEST, ids=lambda e: e["name"])
def test_each_slice_replays_to_within_a_tenth_of_a_percent(entry):
    events, free, ref = replay_error(entry["name"])
    assert events == entry["events"]  # what bench/corpus.py decoded when it made the slice
    assert abs(free - ref) <= LIMIT * ref, f"{entry['name']}: {free - ref:+d} pages ({100 * (free - ref) / ref:+.4f} %)"


def test_a_model_without_per_cpu_lists_fails_the_corpus(monkeypatch):
    """The oracle can fail: if frees went straight to the buddy (no pcp lists), as a naive
    replay assumes, the corpus catches it."""
    monkeypatch.setattr(model_mod, "pcp_allowed_order", lambda order, thp_order=None: order < 0)
    worst = 0.0
    for e in MANIFEST:
        _, free, ref = replay_error(e["name"])
        worst = max(worst, abs(free - ref) / ref)
    assert worst > LIMIT
