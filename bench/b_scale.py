"""Benchmark 6: scaling, one simulated migration per guest size, each in a fresh process.

Idle workload (cheap: the figure is the pipeline's own cost), hinting on, no baseline migration
(``run_demo`` with ``baseline=False``), 10 Gbit/s. Each size runs in a new interpreter so its peak
RSS (``ru_maxrss``) is its own; wall time is measured inside the child around ``run_demo`` and
for the whole child (interpreter start and imports included). Sizes: 2**18..2**24 pages (1 GiB
to 64 GiB) in --quick, up to 2**30 (4 TiB) in the full run. Goal: 4 TiB in <= 60 s, <= 8 GiB peak
RSS, and wall and RSS growing close to 4x per x4 in size.
The idle workload ticks every 20 ms of virtual time here (``TICK_S``; the default is 2 ms).
"""

from __future__ import annotations

import time

from common import row, run_isolated

QUICK_SIZES = (18, 20, 22, 24)
FULL_SIZES = (18, 20, 22, 24, 26, 28, 30)
GOAL_WALL_S = 60.0
GOAL_RSS_MIB = 8192.0
GOAL_PAGES = 1 << 30  # 4 TiB
# The idle guest's vCPU loop wakes every tick of virtual time; over the ~266 s of virtual time a
# 1 TiB migration takes at 10 Gbit/s, the default 2 ms tick is 133k wake-ups that cost about
# half the wall time while writing almost nothing. 20 ms keeps the same write rate per second.
TICK_S = 0.02


def one_size(pages: int, tick_s: float = TICK_S) -> dict:
    """Child body: one idle hinted migration of ``pages`` pages; the figures the table needs, and
    what each per-page structure holds at the end (nominal and resident bytes per page)."""
    import trio
    import trio.testing

    from hintpipe.config import RunConfig
    from hintpipe.guest.workload import WorkloadConfig
    from hintpipe.inprocess import migrate_guest
    from hintpipe.progress import MigrationObserver

    from common import resident_bytes

    class Keep(MigrationObserver):
        """Keeps the engine (its destination is a per-page structure) and times the rounds."""

        def __init__(self) -> None:
            self.engine = None
            self.rounds: list[float] = []
            self.t_first = None

        def round_started(self, engine, index, live) -> None:
            self.engine = engine
            self.rounds.append(time.perf_counter())

    keep = Keep()
    cfg = RunConfig(pages=pages, workload=WorkloadConfig.idle(tick_s=tick_s), baseline=False)
    t0, c0 = time.perf_counter(), time.process_time()
    run = trio.run(lambda: migrate_guest(cfg, hinting=True, observers=(keep,)),
                   clock=trio.testing.MockClock(autojump_threshold=0))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = run.result
    structures = {
        "guest: buddy head (order + 1)": run.alloc.head,
        "guest: buddy meta (migratetype, flags)": run.alloc.meta,
        "guest: free mask": run.alloc.free_mask,
        "guest: page versions": run.memory.versions,
        "host: destination copy": keep.engine.dest,
        **{f"host: page state {k}": a for k, a in run.state.arrays().items()},
    }
    per_page = {k: {"bytes_per_page": a.nbytes / pages, "resident_bytes_per_page": resident_bytes(a) / pages}
                for k, a in structures.items()}
    per_page["host: engine round sets (free at start, skipped; freed after each round)"] = {
        "bytes_per_page": 2 / 8, "resident_bytes_per_page": None}
    return {"pages": pages, "gib": pages * 4096 / 2**30, "wall_s": wall, "cpu_s": cpu, "tick_s": tick_s,
            "setup_s": keep.rounds[0] - t0 if keep.rounds else None,
            "pages_sent": m.pages_sent, "pages_skipped": m.pages_skipped, "rounds": m.rounds,
            "lost_pages": m.lost_pages, "virtual_time_s": m.time_s,
            "hint_messages": run.session.conn.hints_frames, "hint_ranges": run.session.conn.hints_ranges,
            "structures": per_page}


def run(quick: bool = True, sizes: tuple[int, ...] | None = None) -> dict:
    """Every size in a fresh process; wall time, peak RSS and their growth per size step."""
    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    points = []
    for k in sizes:
        reps = 3 if k <= 24 else 1  # every run is a fresh (cold) process: its whole cost counts
        runs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            try:
                r = run_isolated("b_scale", "one_size", {"pages": 1 << k}, timeout=1800)
            except Exception as e:
                runs.append({"pages": 1 << k, "error": str(e)[-500:]})
                break
            r["process_wall_s"] = time.perf_counter() - t0
            runs.append(r)
        if any("error" in r for r in runs):
            points.append(next(r for r in runs if "error" in r))
            continue
        walls = sorted(r["wall_s"] for r in runs)
        med = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        points.append({**med, "runs": len(runs), "wall_s_min": walls[0], "wall_s_max": walls[-1],
                       "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs)})
    ok = [p for p in points if "error" not in p]
    for a, b in zip(ok, ok[1:]):
        f = b["pages"] / a["pages"]
        b["wall_growth"] = b["wall_s"] / a["wall_s"]
        b["rss_growth"] = b["peak_rss_mib"] / a["peak_rss_mib"]
        b["size_growth"] = f
    scale = [{"pages": p["pages"], "wall_s": p["wall_s"], "peak_rss_mib": p["peak_rss_mib"]} for p in ok]
    out: dict = {"points": points, "scale": scale}
    rows = []
    for p in ok:
        w = {"median": p["wall_s"], "min": p["wall_s_min"], "max": p["wall_s_max"]} if p["runs"] > 1 else p["wall_s"]
        rows.append(row("scale", f"2^{p['pages'].bit_length() - 1} pages ({p['gib']:g} GiB) wall", w, "s",
                        baseline=f"peak RSS {p['peak_rss_mib']:.0f} MiB; {p['rss_growth']:.1f}x RSS, {p['wall_growth']:.1f}x wall per x{p['size_growth']:.0f}"
                        if "wall_growth" in p else f"peak RSS {p['peak_rss_mib']:.0f} MiB",
                        goal=f"<= {GOAL_WALL_S:g} s, <= {GOAL_RSS_MIB / 1024:g} GiB" if p["pages"] == GOAL_PAGES else ""))
    # per-page cost of the largest size measured, extrapolated to the goal's size when it was not run
    if ok:
        big = ok[-1]
        f = GOAL_PAGES / big["pages"]
        out["extrapolated_2_30"] = {"from_pages": big["pages"], "wall_s": big["wall_s"] * f,
                                    "peak_rss_mib": big["peak_rss_mib"] * f, "linear": True}
        top = next((p for p in ok if p["pages"] == GOAL_PAGES), None)
        if top:
            out["goal_met"] = top["wall_s"] <= GOAL_WALL_S and top["peak_rss_mib"] <= GOAL_RSS_MIB
        else:
            e = out["extrapolated_2_30"]
            rows.append(row("scale", "2^30 (4 TiB), linear extrapolation", e["wall_s"], "s",
                            baseline=f"peak RSS ~{e['peak_rss_mib']:.0f} MiB (from 2^{big['pages'].bit_length() - 1})",
                            goal=f"<= {GOAL_WALL_S:g} s, <= {GOAL_RSS_MIB / 1024:g} GiB"))
    out["rows"] = rows
    return out
