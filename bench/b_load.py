"""Benchmark: loading a recording's events, by path (issue 12, "Speed": the loading side).

Paths, each min-max over the runs: **text cold** (tracefs text parsed, no cache), **text first
run** (parse + write the trace-v1 cache, what the first ``hintpipe replay`` of a folder pays),
**text cached** (the cache loaded), **raw** (ring-buffer pages decoded, no cache), **raw cached**
and **trace-v1** (a converted file). Figures: events per second of ``open_trace(...).events()``
in this process, and wall time of the whole ``python -m hintpipe replay REC --json`` process on
the same path (hinting, migration and baseline included: the replay loop is measured by
b_replay). Same-run baseline: the naive replay of b_replay (regex parse + numpy apply).

Text recordings: ``../shared/traces`` (else the small slices in tests/data). A raw recording of
at least 0.5 M events: ``--raw DIR``, else one is recorded here of the page-cache workload
(bench/workloads.py; root and tracefs needed, otherwise the raw rows are skipped, said so).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, find_traces, row, spread

HERE = Path(__file__).resolve().parent
GOAL = 2.0  # M events/s for the whole replay process (issue 12)


def _load(path: Path, cache: bool, cache_dir: Path) -> tuple[float, int]:
    from hintpipe.trace.recording import open_trace

    before = os.environ.get("HINTPIPE_TRACE_CACHE")
    os.environ["HINTPIPE_TRACE_CACHE"] = str(cache_dir)
    try:
        t0 = time.perf_counter()
        n = len(open_trace(path, cache=cache).events())
        return time.perf_counter() - t0, n
    finally:
        if before is None:
            del os.environ["HINTPIPE_TRACE_CACHE"]
        else:
            os.environ["HINTPIPE_TRACE_CACHE"] = before


def _process(path: Path, args: list[str], cache_dir: Path) -> float:
    env = dict(os.environ, HINTPIPE_TRACE_CACHE=str(cache_dir),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "hintpipe", "replay", str(path), "--json", *args],
                       capture_output=True, text=True, env=env, cwd=str(ROOT))
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"hintpipe replay {path} failed: {r.stderr[-500:]}")
    return dt


def _raw_recording(work: Path, given: str | None) -> tuple[Path | None, str]:
    if given:
        return Path(given), "given"
    from hintpipe.trace.errors import RecordError
    from hintpipe.trace.record import record

    out = work / "raw-pagecache"
    try:
        s = record(out, command=[sys.executable, str(HERE / "workloads.py"), "pagecache", "--mb", "300",
                                 "--where", str(work)], write_cache=False)
    except RecordError as e:
        return None, f"no raw recording: {e}"
    if s["lost_events"]:
        return None, f"the raw recording lost {s['lost_events']} events"
    return out, f"recorded here: page-cache workload, {s['events']} events"


def measure(path: Path, paths: list[str], runs: int, process_runs: int, work: Path) -> dict:
    """Load and whole-process figures of one recording on each of ``paths``."""
    from hintpipe.trace.recording import convert

    out: dict = {"recording": str(path), "paths": {}}
    v1 = work / f"{path.name}.hpt"
    convert(path, v1)
    for p in paths:
        loads, procs, n = [], [], 0
        for _ in range(runs):
            cdir = work / f"cache-{p}"
            if p in ("text cold", "raw", "text first run") or not cdir.exists():
                shutil.rmtree(cdir, ignore_errors=True)
                cdir.mkdir(parents=True)
            if p in ("text cached", "raw cached") and not any(cdir.iterdir()):
                _load(path, True, cdir)  # make the cache (untimed)
            src = v1 if p == "trace-v1" else path
            dt, n = _load(src, p in ("text first run", "text cached", "raw cached"), cdir)
            loads.append(n / dt / 1e6)
        for _ in range(process_runs):
            cdir = work / f"cache-{p}"
            if p == "text first run":
                shutil.rmtree(cdir, ignore_errors=True)
                cdir.mkdir(parents=True)
            src = v1 if p == "trace-v1" else path
            args = ["--no-cache"] if p in ("text cold", "raw") else []
            procs.append(_process(src, args, cdir))
        out["paths"][p] = {"events": n, "load_mevents_per_s": spread(loads),
                           "process_s": spread(procs) if procs else None,
                           "process_mevents_per_s": spread([n / t / 1e6 for t in procs]) if procs else None}
    return out


def run(quick: bool = True, recordings: list[str] | None = None, raw: str | None = None) -> dict:
    """Loading figures for the text recordings and one raw recording."""
    from b_replay import naive_replay

    runs = 3
    process_runs = 1 if quick else 3
    recs, note = ([Path(r) for r in recordings], "given") if recordings else find_traces()
    out: dict = {"source": note, "recordings": [], "goal_mevents_per_s": GOAL, "loadavg_start": os.getloadavg()}
    rows = []
    work = Path(tempfile.mkdtemp(prefix="hintpipe-bench-load-"))
    try:
        for rec in recs:
            tn = [naive_replay(rec) for _ in range(runs)]
            naive = spread([t["events"] / t["total_s"] / 1e6 for t in tn])
            r = measure(rec, ["text cold", "text first run", "text cached", "trace-v1"], runs, process_runs, work)
            r["naive_mevents_per_s"] = naive
            out["recordings"].append(r)
            for p, f in r["paths"].items():
                rows.append(row("load", f"{rec.name} ({f['events'] / 1e6:.2f}M ev): {p}", f["load_mevents_per_s"],
                                "M events/s", baseline=f"naive regex+numpy replay {naive['median']:.2f}"))
                if f["process_mevents_per_s"]:
                    rows.append(row("load", f"{rec.name}: hintpipe replay --json, {p}", f["process_mevents_per_s"],
                                    "M events/s", goal=f">= {GOAL:g}", note="whole process"))
        rawrec, why = _raw_recording(work, raw)
        out["raw_source"] = why
        if rawrec is None:
            rows.append(row("load", "raw recording", None, "", baseline=why))
        else:
            r = measure(rawrec, ["raw", "raw cached", "trace-v1"], runs, process_runs, work)
            r["source"] = why
            out["recordings"].append(r)
            for p, f in r["paths"].items():
                rows.append(row("load", f"raw {rawrec.name} ({f['events'] / 1e6:.2f}M ev): {p}",
                                f["load_mevents_per_s"], "M events/s"))
                if f["process_mevents_per_s"]:
                    rows.append(row("load", f"raw {rawrec.name}: hintpipe replay --json, {p}",
                                    f["process_mevents_per_s"], "M events/s", goal=f">= {GOAL:g}", note="whole process"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["loadavg_end"] = os.getloadavg()
    out["rows"] = rows
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's hintpipe, as bench/run.py does
    args = sys.argv[1:]
    raw_arg = args[args.index("--raw") + 1] if "--raw" in args else None
    recs = [a for a in args if not a.startswith("--") and a != raw_arg]
    res = run(quick="--quick" in args, recordings=recs or None, raw=raw_arg)
    from common import format_table
    print(format_table(res.pop("rows")))
    print(json.dumps({k: v for k, v in res.items() if k != "recordings"}))
    for r in res["recordings"]:
        print(json.dumps(r))
