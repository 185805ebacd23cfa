"""What a finished run reports: one typed result, its JSON object and its text summary.

:class:`RunResult` holds the figures of one migration run, whoever ran it (``hintpipe demo``,
``hintpipe replay`` or ``hintpipe host``); :func:`run_report` and :func:`replay_run_report` turn
it into the JSON objects the README documents, :func:`format_summary` and :func:`format_replay`
into text. The hint counters are read where they are kept: frames, ranges and pages by the
host's :class:`~hintpipe.protocol.HostConnection`, what they did to the bitmap by the
:class:`~hintpipe.host.pagestate.HostPageState`; so are the guards' (:class:`GuardFigures`), and
what scans caught by the write-protect backend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from hintpipe.config import RunConfig
from hintpipe.host.migration import MigrationResult
from hintpipe.host.pagestate import HostPageState
from hintpipe.protocol import HostConnection
from hintpipe.units import PAGE_SIZE

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from hintpipe.host.timeline import Timeline

__all__ = ["HintFigures", "GuardFigures", "RunResult", "RunOutcome", "migration_figures", "run_report",
           "replay_run_report", "format_summary", "format_replay", "format_policy_table", "guards_line",
           "reclaim_line"]


@dataclass
class HintFigures:
    """What hinting did in one run (the ``hints`` object of a report)."""

    messages: int = 0
    """Hints frames applied (under the active round)."""
    ranges: int = 0
    """Blocks those frames carried."""
    pages: int = 0
    """Pages those blocks cover."""
    pages_marked: int = 0
    """Pages newly put into the skip bitmap."""
    pages_refused_written: int = 0
    """Hinted pages refused because they were written this round."""
    stale_messages: int = 0
    """Frames that arrived under a stopped round and were dropped."""
    stale_ranges: int = 0
    """Blocks in those frames."""

    @classmethod
    def of(cls, conn: HostConnection | None, state: HostPageState) -> "HintFigures":
        """Read the figures where they are kept (no connection: a run without hinting)."""
        if conn is None:
            return cls(pages_marked=state.pages_marked, pages_refused_written=state.pages_refused_written)
        return cls(conn.hints_frames, conn.hints_ranges, conn.hints_pages, state.pages_marked,
                   state.pages_refused_written, conn.stale_frames, conn.stale_ranges)


@dataclass
class GuardFigures:
    """How often each of the host's guards acted in one run (the ``guards`` object of a report)."""

    broken: list[str] = field(default_factory=list)
    """Guards turned off for this run (``--break``, a demonstration): never verified."""
    refused_written_pages: int = 0
    """Hinted pages refused because they were written after their round began (page state)."""
    stale_hint_messages: int = 0
    """Hints frames dropped because they arrived under a stopped command id (connection)."""
    stale_hints_applied: int = 0
    """Hints frames under a stopped command id applied anyway (only with stale-drop broken)."""
    skips_invalidated: int = 0
    """Skip bits cleared by a write: a fault, or a scan that found the page written (page state)."""
    scan_caught_pages: int | None = None
    """uffd-async: pages a scan found written while their skip bit was set, so the scan cleared
    it (backend); None with a backend that does not scan."""

    @classmethod
    def of(cls, broken, conn: HostConnection | None, state: HostPageState, wp: dict) -> "GuardFigures":
        """Read the counters where they are kept (``wp``: the backend's ``stats()``)."""
        return cls(sorted(broken), state.pages_refused_written, conn.stale_frames if conn else 0,
                   conn.stale_frames_applied if conn else 0, state.skips_invalidated,
                   wp.get("scan_caught_pages"))


@dataclass
class RunResult:
    """One finished migration run as its reports show it."""

    migration: MigrationResult
    hints: HintFigures
    faults: int
    """First writes to protected pages seen by the host's page state."""
    wp: dict
    """The write-tracking backend's figures (``backend``, ``faults``, ``protect_calls``, ...)."""
    lock: dict
    """The guest's zone lock figures (:meth:`~hintpipe.guest.zonelock.ZoneLock.summary`)."""
    guards: GuardFigures = field(default_factory=GuardFigures)
    """How often the host's guards acted."""
    notifications: dict = field(default_factory=dict)
    """Kicks and interrupts of the link."""
    workload: dict = field(default_factory=dict)
    """What the guest's workload did."""
    wall_s: float = 0.0
    """Wall time the run took."""
    timeline: "Timeline | None" = None
    """The run's figures over time, when it was sampled (the charts of ``--report``)."""
    lock_samples_us: "dict[str, np.ndarray]" = field(default_factory=dict)
    """Recent zone lock samples in microseconds: ``hold`` (walker holds, empty ones included), ``alloc_wait``."""
    reclaim: dict | None = None
    """What reclaim did (:class:`~hintpipe.host.reclaim.ReclaimFigures`), None without ``--reclaim``."""


@dataclass
class RunOutcome:
    """What one command run leaves: its report (the JSON object) and the runs behind it, which
    the charts of ``--report`` and ``--plot`` are drawn from. ``label`` names it beside others
    (several outcomes compare settings in one report)."""

    report: dict
    run: RunResult
    baseline: RunResult | None = None
    label: str = ""


def migration_figures(run: MigrationResult, baseline: MigrationResult | None) -> dict:
    """``migration.*`` of a report: the hinted run's figures and its baseline's next to them."""
    mig = run.as_dict()
    mig["pages_sent_baseline"] = baseline.pages_sent if baseline else None
    mig["zero_pages_sent_baseline"] = baseline.zero_pages_sent if baseline else None
    mig["bytes_sent_baseline"] = baseline.bytes_sent if baseline else None
    mig["time_s_baseline"] = round(baseline.time_s, 4) if baseline else None
    mig["lost_pages_baseline"] = baseline.lost_pages if baseline else None
    if baseline and baseline.pages_sent:
        mig["pages_saved_pct"] = round(100 * (1 - run.pages_sent / baseline.pages_sent), 2)
    if baseline and baseline.bytes_sent:
        mig["bytes_saved_pct"] = round(100 * (1 - run.bytes_sent / baseline.bytes_sent), 2)
    return mig


def run_report(cfg: RunConfig, run: RunResult, baseline: RunResult | None) -> dict:
    """The JSON object of ``hintpipe demo --json`` and of each guest of ``hintpipe host`` (keys
    documented in the README); ``config.wp`` is the backend that tracked writes."""
    lock = run.lock
    rep = {
        "config": {
            "pages": cfg.pages,
            "gib": round(cfg.pages * PAGE_SIZE / 2**30, 3),
            "workload": cfg.workload.kind,
            "batch": cfg.batch,
            "min_order": cfg.min_order,
            "race_mode": cfg.race_mode,
            "bandwidth_gbit": cfg.migration.bandwidth_gbit,
            "queue_size": cfg.queue_size,
            "event_idx": cfg.event_idx,
            "wp": run.wp.get("backend", cfg.wp),
            "memory": cfg.memory,
            "seed": cfg.workload.seed,
            "history": cfg.workload.history,
        },
        "migration": migration_figures(run.migration, baseline.migration if baseline else None),
        "hints": asdict(run.hints),
        "guards": asdict(run.guards),
        "faults": run.faults,
        "wp": {**run.wp, "faults_baseline": baseline.wp.get("faults") if baseline else None},
        "lock": {"max_hold_us": lock["max_hold_us"], "max_alloc_wait_us": lock["max_alloc_wait_us"], **lock},
        "notifications": run.notifications,
        "workload": run.workload,
        # the baseline runs the same seeded workload, but its rounds last longer, so it writes more
        "workload_baseline": baseline.workload if baseline else None,
        "wall_s": round(run.wall_s + (baseline.wall_s if baseline else 0.0), 3),
    }
    if run.reclaim is not None or cfg.backing != "shmem":
        rep["config"]["backing"] = cfg.backing
    if run.reclaim is not None:
        rep["reclaim"] = run.reclaim
    return rep


def replay_run_report(cfg: RunConfig, run: RunResult, baseline: RunResult | None, *, trace: dict,
                      initial: dict, final: dict, parse_s: float, elapsed_s: float) -> dict:
    """The JSON object of ``hintpipe replay --json``: the trace's own figures (``trace``,
    ``initial``, ``final``) around the migration's."""
    h = run.hints
    return {
        "trace": trace,
        "config": {"min_order": cfg.min_order, "batch": cfg.batch, "race_mode": cfg.race_mode,
                   "bandwidth_gbit": cfg.migration.bandwidth_gbit,
                   "write_rate": cfg.workload.write_pages_per_s,
                   "memory": cfg.memory, "wp": run.wp.get("backend", cfg.wp)},
        "initial": initial,
        "final": final,
        "migration": migration_figures(run.migration, baseline.migration if baseline else None),
        "hints": {"messages": h.messages, "ranges": h.ranges, "pages": h.pages,
                  "pages_refused_written": h.pages_refused_written, "stale_messages": h.stale_messages},
        "guards": asdict(run.guards),
        "faults": run.faults,
        "lock": run.lock,
        "parse_s": round(parse_s, 3),
        "elapsed_s": round(elapsed_s, 3),
        "events_per_s": round(trace["events"] / elapsed_s) if elapsed_s else None,
    }


def format_summary(rep: dict) -> str:
    """Human-readable summary of a migration report (the same figures as --json)."""
    c, m, h, lk = rep["config"], rep["migration"], rep["hints"], rep["lock"]
    base = m.get("pages_sent_baseline")
    bbase = m.get("bytes_sent_baseline")
    hist = f", history {c['history']}" if c.get("history") is not None else ""
    lines = [
        f"guest {c['gib']} GiB ({c['pages']} pages), workload {c['workload']}{hist}, "
        f"link {c['bandwidth_gbit']} Gbit/s, race mode {c['race_mode']}, batch {c['batch']}, min order {c['min_order']}, "
        f"memory {c.get('memory', 'sim')}, write tracking {c.get('wp', 'sim')}",
        f"bytes sent        {_gib(m['bytes_sent']):>12}"
        + (f"   (baseline without hinting {_gib(bbase)}, saved {m.get('bytes_saved_pct', 0)}%)" if bbase else ""),
        f"pages sent        {m['pages_sent']:>12,}   {m['zero_pages_sent']:,} of them zero (header only)"
        + (f"; baseline {base:,}, {m['zero_pages_sent_baseline']:,} zero, pages saved {m.get('pages_saved_pct', 0)}%" if base else ""),
        f"pages skipped     {m['pages_skipped']:>12,}   skip efficiency {m['skip_efficiency']}",
        f"rounds            {m['rounds']:>12}   migration time {m['time_s']:.3f} s"
        + (f" (baseline {m['time_s_baseline']:.3f} s)" if m.get("time_s_baseline") is not None else "")
        + f", downtime {m['downtime_ms']:.1f} ms",
        f"hints             {h['messages']:>12,} messages, {h['ranges']:,} ranges, {h['pages']:,} pages"
        f" ({h['stale_messages']} stale dropped)",
        f"write faults      {rep['faults']:>12,}",
    ]
    if "guards" in rep:
        lines.append(guards_line(rep["guards"]))
    if rep.get("reclaim"):
        lines.append(reclaim_line(rep["reclaim"]))
    lines += [
        f"zone lock         max hold {lk['max_hold_us']} us (p99 {lk['p99_hold_us']} us over {lk.get('batches', 0):,} "
        f"batches and {lk.get('empty_holds', 0):,} empty holds, walk start {lk.get('max_round_start_hold_us', 0)} us), "
        f"max allocation wait {lk['max_alloc_wait_us']} us",
        f"verification      {m['allocated_pages']:,} allocated pages checked, lost {m['lost_pages']}: "
        + _verdict(m, rep.get("guards", {}).get("broken") or []),
    ]
    return "\n".join(lines)


def reclaim_line(r: dict) -> str:
    """The text summary's ``reclaim`` line: the host's memory for the guest, and what was discarded."""
    frac = "" if r.get("reclaimed_fraction") is None else f" ({100 * r['reclaimed_fraction']:.1f}% of hinted)"
    return (f"reclaim           host memory for the guest {r['host_rss_before_mib']:,.1f} -> min "
            f"{r['host_rss_min_mib']:,.1f} -> {r['host_rss_after_mib']:,.1f} MiB ({r['backing']}); discarded "
            f"{r['pages_discarded']:,} pages{frac}, refused {r['discards_refused_written']:,} written, "
            f"{r['hints_too_small']:,} in hints smaller than a backing page"
            + (f"; {r['rounds_before_migration']} rounds before the migration, which began at "
               f"{r['host_rss_at_migration_mib']:,.1f} MiB" if r.get("rounds_before_migration") else ""))


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.3f} GiB"


def guards_line(g: dict) -> str:
    """The text summary's ``guards`` line: how often each guard acted, and which were broken."""
    scan = "" if g.get("scan_caught_pages") is None else f", scans caught {g['scan_caught_pages']:,} pages"
    line = (f"guards            refused {g['refused_written_pages']:,} written pages, dropped "
            f"{g['stale_hint_messages']:,} stale frames, invalidated {g['skips_invalidated']:,} skips{scan}")
    if g.get("broken"):
        line += f"; BROKEN: {', '.join(g['broken'])}"
        if g.get("stale_hints_applied"):
            line += f" ({g['stale_hints_applied']} stale frames applied)"
    return line


def _verdict(m: dict, broken: list[str]) -> str:
    if broken:  # --break is a demonstration: never "VERIFIED"
        what = "LOSS DETECTED" if m["lost_pages"] else "no loss seen, NOT VERIFIED"
        return f"{what} (guard {', '.join(broken)} broken on purpose: a demonstration)"
    return "VERIFIED" if m["verified"] else "LOSS DETECTED"


def format_replay(rep: dict) -> str:
    """Human-readable summary of ``hintpipe replay``."""
    t, i, f = rep["trace"], rep["initial"], rep["final"]
    head = [
        f"trace {t['path']} ({t['kind']}): {t['events']:,} events over {t['span_s']:.3f} s, {t['pages']:,} pages",
        f"initial free pages {i['free_pages']:,} (buddyinfo.start {i['reference_free_pages']}), "
        f"by order {i['free_by_order']}",
        f"final free pages   {f['free_pages']:,} (buddyinfo.end {f['reference_free_pages']}, "
        f"error {f['error_pages']} pages = {f['error_pct']}%)",
    ]
    if t.get("pages_by_kind"):
        head.insert(1, "PFNs at the start " + _kinds(t["pages_by_kind"]))
    rep2 = {"config": {"gib": round(t["pages"] * PAGE_SIZE / 2**30, 2), "pages": t["pages"], "workload": "replay",
                       **rep["config"]}, **{k: rep[k] for k in ("migration", "hints", "faults", "lock", "guards") if k in rep}}
    rep2["hints"].setdefault("stale_messages", 0)
    tail = f"replayed in {rep['elapsed_s']} s wall ({rep['events_per_s']:,} events/s; parse {rep['parse_s']} s)"
    return "\n".join(head) + "\n" + format_summary(rep2) + "\n" + tail


_POLICY_COLUMNS = (
    # heading, width, value of a ``policies`` entry
    ("policy", 14, lambda p: p["name"]),
    ("sent GiB", 8, lambda p: f"{p['bytes_sent'] / 2**30:.3f}"),
    ("saved", 7, lambda p: "-" if p["bytes_saved_pct"] is None else f"{p['bytes_saved_pct']:.1f}%"),
    ("pages sent", 10, lambda p: f"{p['pages_sent']:,}"),
    ("zero pages", 10, lambda p: f"{p['zero_pages_sent']:,}"),
    ("lost", 5, lambda p: f"{p['lost_pages'] + p['pages_destroyed']}"),
    ("time s", 7, lambda p: f"{p['migration_time_s']:.2f}"),
    ("down ms", 7, lambda p: f"{p['downtime_ms']:.0f}"),
    ("hint msgs", 9, lambda p: f"{p['hint_messages']:,}"),
    ("pages hinted", 12, lambda p: f"{p['pages_hinted']:,}"),
    ("held GiB*s", 10, lambda p: f"{p['page_seconds_held'] * PAGE_SIZE / 2**30:.2f}"),
    ("alloc fail/stall", 16, lambda p: f"{p['alloc_failures']}/{p['alloc_stalls']}"),
    ("lock p99/max us", 15, lambda p: f"{p['lock']['p99_hold_us']:.0f}/{p['lock']['max_hold_us']:.0f}"),
    ("reclaim 4K/2M MiB", 17, lambda p: f"{p['reclaim']['mib_mean_4k']:.0f}/{p['reclaim']['mib_mean_2m']:.0f}"),
)


def _kinds(by_kind: dict) -> str:
    return ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in by_kind.items())


def format_policy_table(rep: dict) -> str:
    """``hintpipe replay --policy ...``: the trace in three lines, then one row per policy."""
    t = rep["trace"]
    kinds = t.get("pages_by_kind") or {}
    head = [
        f"trace {t['path']} ({t['kind']}): {t['events']:,} events over {t['span_s']:.3f} s, {t['pages']:,} PFNs: "
        + _kinds(kinds),
        f"link {rep['config']['bandwidth_gbit']} Gbit/s; saved = bytes on the link relative to "
        f"{rep.get('baseline_policy') or 'no baseline'}; lost = pages lost or destroyed; reclaim = mean "
        "memory the host could reclaim over the replay at 4 KiB / 2 MiB backing",
    ]
    cols = _POLICY_COLUMNS
    rows = [" ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w, _) in enumerate(cols))]
    for p in rep["policies"]:
        rows.append(" ".join(str(f(p)).rjust(w) if i else str(f(p)).ljust(w) for i, (_, w, f) in enumerate(cols)))
    verdict = "every policy VERIFIED" if all(p["verified"] for p in rep["policies"]) else "LOSS DETECTED"
    tail = f"{verdict}; replayed in {rep['elapsed_s']} s wall ({rep['events_per_s']:,} events/s)"
    return "\n".join(head + rows + [tail])

