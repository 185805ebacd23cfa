"""``hintpipe inspect``: what a trace contains and how free memory evolves through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hintpipe.units import NR_ORDERS, PAGE_SIZE

from .events import EVENT_NAMES, EventType
from .recording import open_trace
from .snapshot import count_by_order


def inspect(path: str | Path, samples: int = 50, skip_bad: bool = False, *, cache: bool = False, log=None) -> dict:
    """Summarise a recording folder or trace-v1 file (one pass to count, one model replay).

    Keys: path, kind, page_count, events, by_type {name: n}, by_type_order {name: [11 ints]},
    t_start_s, t_end_s, span_s, initial {free_pages, free_by_order}, final {free_pages,
    free_by_order, reference_free_pages, reference_free_by_order, error_pages, error_pct},
    buddyinfo_start_free_pages, free_over_time [[t_rel_s, free_pages], ...], source. ``cache`` and
    ``log`` as for :func:`~hintpipe.trace.recording.open_trace`.
    """
    tr = open_trace(path, skip_bad=skip_bad, cache=cache, log=log)
    counts = np.zeros((len(EventType), NR_ORDERS), np.int64)
    t0 = t1 = None
    for b in tr.batches():
        if not len(b):
            continue
        np.add.at(counts, (b.etype, np.minimum(b.order, NR_ORDERS - 1)), 1)
        t0 = int(b.ts_ns[0]) if t0 is None else t0
        t1 = int(b.ts_ns[-1])
    model = tr.model()
    initial = {"free_pages": int(tr.initial_free.sum()), "free_by_order": count_by_order(tr.initial_free)}
    series = []
    if t0 is not None:
        for t in np.linspace(t0, t1, max(samples, 2)):
            model.advance_to(int(t))
            series.append([round((int(t) - t0) / 1e9, 6), model.nr_free_pages])
    model.run_to_end()
    ref = tr.buddyinfo_end
    final = {"free_pages": model.nr_free_pages, "free_by_order": model.free_by_order(),
             "reference_free_pages": ref["free_pages"] if ref else None,
             "reference_free_by_order": ref["by_order"] if ref else None}
    if ref:
        final["error_pages"] = final["free_pages"] - ref["free_pages"]
        final["error_pct"] = round(100.0 * final["error_pages"] / max(ref["free_pages"], 1), 4)
    return {
        "path": str(path), "kind": tr.kind, "encoding": tr.encoding, "page_count": tr.page_count,
        "events": int(counts.sum()),
        "by_type": {EVENT_NAMES[t]: int(counts[t].sum()) for t in EventType},
        "by_type_order": {EVENT_NAMES[t]: counts[t].tolist() for t in EventType},
        "t_start_s": t0 / 1e9 if t0 is not None else None, "t_end_s": t1 / 1e9 if t1 is not None else None,
        "span_s": (t1 - t0) / 1e9 if t0 is not None else 0.0,
        "initial": initial, "final": final,
        "buddyinfo_start_free_pages": tr.buddyinfo_start["free_pages"] if tr.buddyinfo_start else None,
        "free_over_time": series, "source": {k: v for k, v in tr.source.items()},
        "skipped_lines": dict(tr.stats.skipped) if tr.kind == "recording" else {},
    }


def render_text(info: dict, width: int = 50) -> str:
    """Human-readable rendering of :func:`inspect`'s dict (with a small free-memory sparkline)."""
    mib = PAGE_SIZE / (1 << 20)
    lines = [f"trace {info['path']} ({info['kind']}), {info['page_count']} pages "
             f"({info['page_count'] * mib:.0f} MiB)"]
    if info["source"].get("workload"):
        lines.append(f"workload: {info['source']['workload']}")
    lines.append(f"events: {info['events']} over {info['span_s']:.3f} s")
    lines.append(f"  {'event':28s} {'total':>9s}  by order 0..10")
    for name, n in info["by_type"].items():
        lines.append(f"  {name:28s} {n:9d}  {' '.join(str(x) for x in info['by_type_order'][name])}")
    ini, fin = info["initial"], info["final"]
    lines.append(f"free at start: {ini['free_pages']} pages ({ini['free_pages'] * mib:.1f} MiB), by order {ini['free_by_order']}")
    if info.get("buddyinfo_start_free_pages") is not None:
        lines.append(f"  buddyinfo.start: {info['buddyinfo_start_free_pages']} pages")
    lines.append(f"free at end:   {fin['free_pages']} pages ({fin['free_pages'] * mib:.1f} MiB), by order {fin['free_by_order']}")
    if fin.get("reference_free_pages") is not None:
        lines.append(f"  buddyinfo.end: {fin['reference_free_pages']} pages, model error {fin['error_pages']:+d} pages "
                     f"({fin['error_pct']:+.4f}%)")
    s = info["free_over_time"]
    if s:
        v = np.array([x[1] for x in s], float)
        lo, hi = v.min(), v.max()
        bars = " .:-=+*#%@"
        idx = np.zeros(len(v), int) if hi == lo else ((v - lo) / (hi - lo) * (len(bars) - 1)).round().astype(int)
        lines.append(f"free over time ({lo * mib:.0f}..{hi * mib:.0f} MiB): [{''.join(bars[i] for i in idx)}]")
    return "\n".join(lines)


def replay_report(tr, model, initial_by_order: list[int] | None = None) -> dict:
    """The trace-side keys of ``hintpipe replay --json`` after ``model`` has replayed ``tr``:
    ``trace.events``, ``initial.free_pages``, ``initial.free_by_order``, ``final.free_pages``,
    ``final.free_by_order``, ``final.reference_free_pages`` (None without buddyinfo.end),
    ``final.error_pages``/``final.error_pct`` (None likewise)."""
    ref = tr.buddyinfo_end["free_pages"] if tr.buddyinfo_end else None
    err = model.nr_free_pages - ref if ref is not None else None
    return {
        "trace": {"path": str(tr.path), "kind": tr.kind, "events": model.events_applied, "page_count": tr.page_count,
                  "span_s": ((model.t_ns - model.first_ts_ns) / 1e9) if model.first_ts_ns is not None and model.t_ns else 0.0,
                  "skipped_lines": dict(tr.stats.skipped) if tr.kind == "recording" else {}},
        "initial": {"free_pages": int(tr.initial_free.sum()),
                    "free_by_order": initial_by_order if initial_by_order is not None else count_by_order(tr.initial_free),
                    "buddyinfo_start_free_pages": tr.buddyinfo_start["free_pages"] if tr.buddyinfo_start else None},
        "final": {"free_pages": model.nr_free_pages, "free_by_order": model.free_by_order(),
                  "reference_free_pages": ref,
                  "reference_free_by_order": tr.buddyinfo_end["by_order"] if tr.buddyinfo_end else None,
                  "error_pages": err, "error_pct": round(100.0 * err / ref, 4) if ref else None},
    }
