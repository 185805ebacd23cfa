"""hintpipe benchmark suite: every benchmark against its same-run baseline; table, JSON, plots.

    python bench/run.py [--quick] [--json OUT] [--plot DIR] [--only NAME[,NAME...]]

Benchmarks (modules bench/b_*.py, each ``run(quick) -> dict``): apply (host skip bitmap),
codec, walker, e2e (two processes per transport), replay (real recordings), load (a
recording's events by path: text, text cached, raw, trace-v1), scale (fresh
process per guest size), migration (outcome with and without hinting), wp (write-protect fault
rates, when bench_wp_rate.py exists). ``--quick`` is sized to finish in under two minutes on a
2-core machine. Top-level JSON keys other tools read: host_apply_mranges_per_s,
host_apply_frames32_mranges_per_s, c_yardstick_mranges_per_s (null without a C compiler),
e2e_unix_mranges_per_s, e2e_walker_unix_mranges_per_s, replay_mevents_per_s,
lock_hold_p99_us_batch32, uffd_sync_faults_per_s_1writer, uffd_sync_faults_per_s_4writers (null
where synchronous userfaultfd is unavailable), scale (list of {pages, wall_s, peak_rss_mib}); the full detail of each
benchmark is under ``benchmarks``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import format_table, machine_info, row, write_json  # noqa: E402

ORDER = ("apply", "codec", "walker", "e2e", "replay", "load", "scale", "migration", "wp")


def run_all(quick: bool, only: list[str] | None = None, log=print, progress=None) -> dict:
    """Run the selected benchmarks; a failing one is recorded and the others still run.
    ``progress`` (a hintpipe.progress.Progress) shows how many are done."""
    names = [n for n in ORDER if not only or n in only]
    res: dict = {"quick": quick, "machine": machine_info(), "benchmarks": {}, "errors": {}}
    rows: list[dict] = []
    t_all = time.perf_counter()
    task = progress.task("benchmarks", total=len(names), unit="benchmarks") if progress is not None else None
    for i, name in enumerate(names):
        if task is not None:
            task.update(i, description=f"benchmark {name}")
        t0 = time.perf_counter()
        log(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            mod = importlib.import_module(f"b_{name}")
            out = mod.run(quick=quick)
        except Exception as e:
            res["errors"][name] = traceback.format_exc(limit=6)
            rows.append(row(name, "FAILED", None, "", baseline=f"{type(e).__name__}: {str(e)[:80]}"))
            log(f"[bench] {name} failed: {e}", file=sys.stderr, flush=True)
            continue
        out["bench_s"] = time.perf_counter() - t0
        rows.extend(out.pop("rows", []))
        res["benchmarks"][name] = out
        log(f"[bench] {name} done in {out['bench_s']:.1f} s", file=sys.stderr, flush=True)
    if task is not None:
        task.close()
    b = res["benchmarks"]
    res["host_apply_mranges_per_s"] = b.get("apply", {}).get("bulk_walker_order", {}).get("mranges_per_s", {}).get("median")
    res["host_apply_frames32_mranges_per_s"] = b.get("apply", {}).get("host_apply_frames32_mranges_per_s")
    res["c_yardstick_mranges_per_s"] = b.get("apply", {}).get("c_yardstick_mranges_per_s")
    res["e2e_unix_mranges_per_s"] = b.get("e2e", {}).get("e2e_unix_mranges_per_s")
    res["e2e_walker_unix_mranges_per_s"] = b.get("e2e", {}).get("e2e_walker_unix_mranges_per_s")
    res["replay_mevents_per_s"] = b.get("replay", {}).get("replay_mevents_per_s")
    res["lock_hold_p99_us_batch32"] = b.get("walker", {}).get("lock_hold_p99_us_batch32")
    res["uffd_sync_faults_per_s_1writer"] = b.get("wp", {}).get("uffd_sync_faults_per_s_1writer")
    res["uffd_sync_faults_per_s_4writers"] = b.get("wp", {}).get("uffd_sync_faults_per_s_4writers")
    res["scale"] = b.get("scale", {}).get("scale", [])
    res["goals"] = {k: b[k].get("goal_met") for k in b if "goal_met" in b[k]}
    res["total_s"] = time.perf_counter() - t_all
    try:
        res["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    res["table"] = rows
    return res


def plot(res: dict, out_dir: str | Path) -> list[str]:
    """PNG charts (matplotlib, Agg) of the benchmarks that ran; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    b = res["benchmarks"]
    files = []

    def save(fig, name):
        p = d / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(str(p))

    def bar(ax, labels, spreads, color=None):
        med = [s["median"] for s in spreads]
        lo = [s["median"] - (s["min"] if s.get("min") is not None else s["median"]) for s in spreads]
        hi = [(s["max"] if s.get("max") is not None else s["median"]) - s["median"] for s in spreads]
        ax.bar(labels, med, yerr=[lo, hi], capsize=4, color=color)

    if "apply" in b:
        a = b["apply"]
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = ["bulk\nwalker order", "bulk\nshuffled", "batches\n4096", "batches\n512", "frames of 32\nstaged",
                  "frames of 32\none call each", "numpy\nexpand", "python\nloop"]
        sp = [a["bulk_walker_order"]["mranges_per_s"], a["bulk_shuffled"]["mranges_per_s"],
              a["batched_walker_order"]["4096"]["mranges_per_s"], a["batched_walker_order"]["512"]["mranges_per_s"],
              a["frames32_staged"]["mranges_per_s"], a["frames32_one_call_each"]["mranges_per_s"],
              a["baseline_numpy_expand"]["mranges_per_s"], a["baseline_python_loop"]["mranges_per_s"]]
        colors = ["C0"] * 6 + ["C7"] * 2
        if a.get("c_yardstick", {}).get("mranges_per_s"):
            labels.append("C loop\n(yardstick)")
            sp.append(a["c_yardstick"]["mranges_per_s"])
            colors.append("C2")
        bar(ax, labels, sp, color=colors)
        ax.axhline(a["goal_mranges_per_s"], ls="--", c="C3", label="goal")
        ax.set_yscale("log")
        ax.set_ylabel("M ranges/s (log)")
        ax.set_title(f"Host apply: {a['blocks'] / 1e6:.1f} M blocks into a 2^24-page skip bitmap")
        ax.legend()
        save(fig, "host_apply.png")
    if "walker" in b:
        w = b["walker"]["by_batch"]
        bs = sorted(int(k) for k in w)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        bar(a1, [str(x) for x in bs], [{k: v / 1e6 for k, v in w[str(x)]["blocks_per_s"].items() if k != "runs"} for x in bs])
        a1.set_xlabel("batch (blocks per lock hold)")
        a1.set_ylabel("M blocks/s")
        a1.set_title("Walker throughput")
        for key, lab in (("p50_us", "p50"), ("p99_us", "p99 (wall)"), ("cpu_p99_us", "p99 (thread CPU)")):
            a2.plot(bs, [w[str(x)][key]["median"] for x in bs], marker="o", label=lab)
        a2.axhline(50, ls="--", c="C3", label="goal p99 @ 32")
        a2.set_xscale("log", base=2)
        a2.set_yscale("log")
        a2.set_xlabel("batch")
        a2.set_ylabel("lock hold per batch (us)")
        a2.legend()
        a2.set_title("Zone-lock hold")
        save(fig, "walker.png")
    if "codec" in b:
        c = b["codec"]["by_size"]
        fig, ax = plt.subplots(figsize=(7, 4))
        sizes = list(c)
        import numpy as np

        x = np.arange(len(sizes))
        for i, k in enumerate(("hintpipe", "msgpack_pairs", "json")):
            ax.bar(x + (i - 1) * 0.27, [c[s][k]["mranges_per_s"]["median"] for s in sizes], 0.27, label=k)
        ax.set_xticks(x, [f"{s} ranges" for s in sizes])
        ax.set_yscale("log")
        ax.set_ylabel("M ranges/s (encode+decode, log)")
        ax.set_title("Codec")
        ax.legend()
        save(fig, "codec.png")
    if "scale" in b and b["scale"]["scale"]:
        s = b["scale"]["scale"]
        fig, a1 = plt.subplots(figsize=(7, 4))
        gib = [p["pages"] * 4096 / 2**30 for p in s]
        a1.plot(gib, [p["wall_s"] for p in s], "o-", c="C0", label="wall s")
        a1.set_xscale("log", base=2)
        a1.set_yscale("log")
        a1.set_xlabel("guest size (GiB)")
        a1.set_ylabel("wall time (s)", color="C0")
        a2 = a1.twinx()
        a2.plot(gib, [p["peak_rss_mib"] for p in s], "s--", c="C1", label="peak RSS MiB")
        a2.set_yscale("log")
        a2.set_ylabel("peak RSS (MiB)", color="C1")
        a1.axhline(60, ls=":", c="C0", lw=1)
        a2.axhline(8192, ls=":", c="C1", lw=1)
        a1.text(gib[0], 60, "goal 60 s at 4 TiB", color="C0", va="bottom", fontsize=8)
        a2.text(gib[0], 8192, "goal 8 GiB", color="C1", va="top", fontsize=8)
        a1.set_title("Scaling: simulated idle migration, hinting on")
        save(fig, "scale.png")
    if "migration" in b:
        cs = b["migration"]["cases"]
        fig, ax = plt.subplots(figsize=(9, 4))
        import numpy as np

        labels = [f"{c['gib']}G {c['workload']}{' fresh' if c.get('history') == 0 else ''}\n{c['gbit']:g} Gb/s"
                  for c in cs]
        x = np.arange(len(cs))
        ax.bar(x - 0.2, [c["time_ms_baseline"] for c in cs], 0.4, label="no hinting", color="C7")
        ax.bar(x + 0.2, [c["time_ms"] for c in cs], 0.4, label="hinting", color="C0")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("migration time (virtual ms, log)")
        ax.set_title("Migration outcome (published 8 GB: idle 2970->620 ms, compile 4502->2273 ms)")
        ax.legend()
        save(fig, "migration.png")
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: under two minutes on 2 cores")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON")
    ap.add_argument("--plot", metavar="DIR", help="write PNG charts into DIR")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(ORDER)}")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    if only and (bad := [o for o in only if o not in ORDER]):
        ap.error(f"unknown benchmark(s) {bad}; choose from {ORDER}")
    if args.plot:  # before any benchmark runs: a missing matplotlib must not cost the whole run
        from hintpipe.charts import ChartsUnavailable, require_matplotlib

        try:
            require_matplotlib("--plot")
        except ChartsUnavailable as e:
            ap.exit(2, f"bench: {e}\n")
    from hintpipe.progress import open_progress

    with open_progress(not args.quiet and sys.stderr.isatty()) as progress:
        res = run_all(args.quick, only, progress=progress)
    print(format_table(res["table"]))
    print(f"\n{'quick' if args.quick else 'full'} run: {res['total_s']:.1f} s; headline: "
          f"host_apply {_f(res['host_apply_mranges_per_s'])} M ranges/s, e2e unix {_f(res['e2e_unix_mranges_per_s'])} "
          f"M ranges/s, replay {_f(res['replay_mevents_per_s'])} M events/s, lock p99 @32 "
          f"{_f(res['lock_hold_p99_us_batch32'])} us; goals met: {res['goals']}")
    if res["errors"]:
        print(f"errors in: {', '.join(res['errors'])} (details in the JSON)")
    if args.json:
        write_json(args.json, res)
    if args.plot:
        for f in plot(res, args.plot):
            print(f"plot: {f}")
    return 1 if res["errors"] else 0


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    from hintpipe.cli import interrupted

    try:
        sys.exit(main())
    except BaseException as e:
        if not interrupted(e):  # Ctrl-C, also inside a trio exception group
            raise
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
