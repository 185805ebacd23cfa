"""Charts of finished runs: PNG files (``--plot DIR``) or one self-contained HTML page (``--report``).

Everything is drawn from a list of :class:`~hintpipe.report.RunOutcome` (a command's report and
the runs behind it: the hinted run and its baseline, each with the
:class:`~hintpipe.host.timeline.Timeline` the engine filled while it ran), so one page can put
several runs side by side (several settings or policies, each outcome with its ``label``).

The HTML page needs nothing but itself: charts are PNG data URIs, the style sheet is inline and
there is no script. matplotlib is an optional extra (``pip install 'hintpipe[plot]'``):
:func:`require_matplotlib` says how to get it before any work starts. Figures are built with
``matplotlib.figure.Figure`` directly (no pyplot), so nothing global is touched.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hintpipe import __version__
from hintpipe.report import RunOutcome, RunResult, format_replay, format_summary
from hintpipe.units import PAGE_SIZE

__all__ = ["PLOT_EXTRA", "ChartsUnavailable", "require_matplotlib", "Chart", "render_charts",
           "write_pngs", "write_html", "summary_rows"]

PLOT_EXTRA = "pip install 'hintpipe[plot]' (in a clone of the repository: pip install '.[plot]')"
"""How to get what the charts need."""
GIB = 2**30


class ChartsUnavailable(Exception):
    """matplotlib is not installed; the message says how to install it."""


def require_matplotlib(flag: str) -> None:
    """Raise ChartsUnavailable (naming ``flag``) unless matplotlib can be imported."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ChartsUnavailable(f"{flag} draws its charts with matplotlib, which is not installed here: {PLOT_EXTRA}")


@dataclass
class Chart:
    """One drawn chart: a file name, a title, a caption and the PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


def _label(o: RunOutcome, i: int) -> str:
    return o.label or (f"run {i + 1}" if i else "")


def _with(label: str, what: str) -> str:
    return f"{label}: {what}" if label else what


def _runs(outcomes: Sequence[RunOutcome]):
    """(label, run, is_baseline) for every run of every outcome."""
    for i, o in enumerate(outcomes):
        lab = _label(o, i)
        yield _with(lab, "with hinting"), o.run, False
        if o.baseline is not None:
            yield _with(lab, "baseline (no hinting)"), o.baseline, True


def _memory(ax, outcomes) -> str:
    for i, (lab, run, base) in enumerate(_runs(outcomes)):
        tl = run.timeline
        if tl is None or base:
            continue
        s = tl.series()
        line, = ax.plot(s["t_s"], s["free_pages"] * PAGE_SIZE / GIB, label=_with(lab, "free"))
        ax.plot(s["t_s"], s["hinted_pages"] * PAGE_SIZE / GIB, ls="--", color=line.get_color(),
                label=_with(lab, "hinted (in the skip bitmap)"))
        for r in tl.rounds:
            ax.axvline(r["t_start_s"], color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("migration time (s, virtual)")
    ax.set_ylabel("GiB")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return ("The guest's free memory and the part of it the host knows is free (hinted, so not sent), "
            "sampled by the migration engine; grey lines mark round starts.")


def _per_round(run: RunResult, key: str):
    return [getattr(r, key, None) for r in run.migration.round_reports]


def _sent(ax, outcomes) -> str:
    runs = list(_runs(outcomes))
    in_bytes = all(v is not None for _, run, _ in runs for v in _per_round(run, "bytes_sent"))
    width = 0.8 / max(1, len(runs))
    for k, (lab, run, base) in enumerate(runs):
        vals = np.array(_per_round(run, "bytes_sent" if in_bytes else "sent"), dtype=float)
        vals = vals / GIB if in_bytes else vals
        x = np.arange(len(vals)) + (k - (len(runs) - 1) / 2) * width
        ax.bar(x, vals, width, label=lab, color="0.6" if base and len(runs) == 2 else None)
    ax.set_xlabel("round (the last is the stop-and-copy)")
    ax.set_ylabel("GiB sent" if in_bytes else "pages sent")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    return ("What each round put on the link, with hinting and without (the baseline migrates the same "
            "seeded guest)" + (" in bytes." if in_bytes else " in 4 KiB pages."))


def _sent_over_time(ax, outcomes) -> str:
    for lab, run, base in _runs(outcomes):
        if run.timeline is None:
            continue
        s = run.timeline.series()
        ax.plot(s["t_s"], s["sent_pages"] * PAGE_SIZE / GIB, label=lab, ls=":" if base else "-")
    ax.set_xlabel("migration time (s, virtual)")
    ax.set_ylabel("GiB on the link so far")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return "Pages sent since the migration began; where a line ends, that migration ended."


def _faults(ax, outcomes) -> str:
    runs = list(_runs(outcomes))
    width = 0.8 / max(1, len(runs))
    for k, (lab, run, base) in enumerate(runs):
        if run.timeline is None:
            continue
        vals = [r["faults"] for r in run.timeline.rounds]
        x = np.arange(len(vals)) + (k - (len(runs) - 1) / 2) * width
        ax.bar(x, vals, width, label=lab, color="0.6" if base and len(runs) == 2 else None)
    ax.set_xlabel("round")
    ax.set_ylabel("write faults (first writes to protected pages)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    return ("Guest writes to write-protected pages in each round: each dirties its page for the next "
            "round and, if the page was hinted, takes it out of the skip bitmap.")


def _lock(axes, outcomes) -> str:
    hold_ax, wait_ax = axes
    notes = []
    for lab, run, base in _runs(outcomes):
        if base:
            continue
        hold = run.lock_samples_us.get("hold", np.empty(0))
        wait = run.lock_samples_us.get("alloc_wait", np.empty(0))
        if len(hold):
            bins = np.logspace(np.log10(max(hold.min(), 0.1)), np.log10(hold.max() * 1.01 + 0.1), 40)
            hold_ax.hist(hold, bins=bins, histtype="step", lw=1.5, label=f"{lab} ({len(hold):,} holds)")
        waited = wait[wait > 0]
        notes.append(f"{lab or 'run'}: {len(waited):,} of {len(wait):,} allocations waited")
        if len(waited):
            bins = np.logspace(np.log10(max(waited.min(), 0.01)), np.log10(waited.max() * 1.01 + 0.01), 30)
            wait_ax.hist(waited, bins=bins, histtype="step", lw=1.5, label=lab or None)
    for ax, what in ((hold_ax, "zone-lock hold per walker batch (us)"), (wait_ax, "allocation wait for the zone lock (us)")):
        ax.set_xscale("log")
        ax.set_xlabel(what)
        ax.set_ylabel("count")
    if hold_ax.has_data():
        hold_ax.legend(fontsize=8)
    for ax, what in ((hold_ax, "no walker batch (no hinting, or no free block of --min-order)"),
                     (wait_ax, "no allocation waited for the lock")):
        if not ax.has_data():
            ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="0.4")
    wait_ax.set_title("; ".join(notes), fontsize=8)
    return ("How long the walker held the zone lock per batch, and how long allocations waited for it "
            "(allocations that did not wait are counted in the title); recent samples, at most 65,536 each.")


_CHARTS: tuple[tuple[str, str, int, Callable], ...] = (
    ("memory", "Free and hinted memory over time", 1, _memory),
    ("sent_per_round", "Pages sent per round, with and without hinting", 1, _sent),
    ("sent_over_time", "Pages on the link over time", 1, _sent_over_time),
    ("faults_per_round", "Write faults per round", 1, _faults),
    ("lock", "Zone lock: walker holds and allocation waits", 2, _lock),
)


def render_charts(outcomes: Sequence[RunOutcome], *, dpi: int = 100) -> list[Chart]:
    """Draw every chart of ``outcomes`` (see the module doc); needs matplotlib."""
    from matplotlib.figure import Figure

    charts = []
    for name, title, panels, draw in _CHARTS:
        fig = Figure(figsize=(8 if panels == 1 else 11, 4), layout="constrained")
        axes = fig.subplots(1, panels)
        caption = draw(axes, outcomes)
        fig.suptitle(title)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        charts.append(Chart(name, title, caption, buf.getvalue()))
    return charts


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a ``.part`` file renamed into place)."""
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_pngs(outcomes: Sequence[RunOutcome], folder: str | Path) -> list[Path]:
    """``--plot DIR``: every chart as ``DIR/NAME.png`` (the folder is created); returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for c in render_charts(outcomes, dpi=110):
        _atomic_write(folder / f"{c.name}.png", c.png)
        out.append(folder / f"{c.name}.png")
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def summary_rows(rep: dict) -> list[tuple[str, str]]:
    """The summary table of one report: (figure, value) pairs, the text summary's figures."""
    c, m, h, lk = rep["config"], rep["migration"], rep["hints"], rep["lock"]
    rows = []
    if "trace" in rep:
        t = rep["trace"]
        rows += [("trace", f"{t['path']} ({t['kind']})"), ("events", _fmt(t["events"])),
                 ("trace span (s)", _fmt(t["span_s"])),
                 ("guest", f"{t['pages'] * PAGE_SIZE / GIB:.1f} GiB ({t['pages']:,} pages)")]
    else:
        rows += [("guest", f"{c['gib']} GiB ({c['pages']:,} pages), workload {c['workload']}")]
    rows += [
        ("memory, write tracking", f"{c.get('memory', 'sim')}, {c.get('wp', 'sim')}"),
        ("link", f"{c['bandwidth_gbit']} Gbit/s"),
        ("walker", f"batch {c['batch']}, min order {c['min_order']}, race mode {c['race_mode']}"),
        ("pages sent", _fmt(m["pages_sent"])),
        ("pages sent without hinting", _fmt(m.get("pages_sent_baseline"))),
        ("saved", f"{m['pages_saved_pct']}%" if m.get("pages_saved_pct") is not None else "-"),
        ("pages skipped", _fmt(m["pages_skipped"])),
        ("skip efficiency", _fmt(m["skip_efficiency"])),
        ("rounds", _fmt(m["rounds"])),
        ("migration time (s, virtual)", _fmt(m["time_s"])),
        ("migration time without hinting (s)", _fmt(m.get("time_s_baseline"))),
        ("downtime (ms)", _fmt(m["downtime_ms"])),
        ("hints", f"{h['messages']:,} messages, {h['ranges']:,} ranges, {h['pages']:,} pages"),
        ("write faults", _fmt(rep["faults"])),
        ("zone lock max hold (us)", _fmt(lk.get("max_hold_us"))),
        ("zone lock p99 hold per batch (us)", _fmt(lk.get("p99_hold_us"))),
        ("max allocation wait (us)", _fmt(lk.get("max_alloc_wait_us"))),
        ("allocated pages checked", _fmt(m["allocated_pages"])),
        ("lost pages", _fmt(m["lost_pages"])),
        ("verified", "VERIFIED" if m["verified"] else "LOSS DETECTED"),
    ]
    return rows


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f4f4}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
pre{background:#f8f8f8;padding:1em;overflow-x:auto;font-size:.85em}.ok{color:#070}.bad{color:#b00;font-weight:bold}
"""


def write_html(outcomes: Sequence[RunOutcome], path: str | Path, *, title: str = "hintpipe report",
               command: str | None = None) -> Path:
    """``--report FILE``: one HTML page (charts as data URIs, inline style, no script) with the
    summary table of every outcome side by side, the charts and each text summary."""
    path = Path(path)
    charts = render_charts(outcomes)
    e = html.escape
    labels = [o.label or (f"run {i + 1}" if len(outcomes) > 1 else "value") for i, o in enumerate(outcomes)]
    tables = [dict(summary_rows(o.report)) for o in outcomes]
    keys = list(dict.fromkeys(k for t in tables for k in t))
    head = "".join(f"<th>{e(lab)}</th>" for lab in labels)
    body = []
    for k in keys:
        cells = []
        for t in tables:
            v = t.get(k, "-")
            cls = ' class="ok"' if v == "VERIFIED" else ' class="bad"' if v == "LOSS DETECTED" else ' class="n"'
            cells.append(f"<td{cls}>{e(v)}</td>")
        body.append(f"<tr><th>{e(k)}</th>{''.join(cells)}</tr>")
    figs = "".join(
        f'<figure><h2>{e(c.title)}</h2><img alt="{e(c.title)}" '
        f'src="data:image/png;base64,{base64.b64encode(c.png).decode()}"><figcaption>{e(c.caption)}</figcaption></figure>'
        for c in charts)
    texts = "".join(f"<h3>{e(lab)}</h3><pre>{e(format_replay(o.report) if 'trace' in o.report else format_summary(o.report))}</pre>"
                    for lab, o in zip(labels, outcomes))
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>{e(title)}</h1>\n"
            f"<p>Made {made} by hintpipe {e(__version__)}" + (f": <code>{e(command)}</code>" if command else "") + ". "
            "Times are virtual: the link is modelled at its bandwidth on a virtual clock. The baseline "
            "migrates the same seeded guest without hinting.</p>\n"
            f"<h2>Summary</h2><table><tr><th>figure</th>{head}</tr>{''.join(body)}</table>\n"
            f"{figs}\n<h2>Text summary</h2>{texts}\n</body></html>\n")
    _atomic_write(path, page.encode())
    return path
