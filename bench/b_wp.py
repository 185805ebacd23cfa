"""Benchmark 8: write-protect, faults handled per second for sim, uffd (sync) and uffd-async.

Runs ``bench/bench_wp_rate.py --json`` (owned by the write-protect work) in a child process and
picks its figures; when that script is absent the section is skipped with a note. One run per
figure (the script's own methodology: warm memfd, cold first touch reported apart).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from common import BENCH_DIR, ROOT, row

SCRIPT = BENCH_DIR / "bench_wp_rate.py"


def run(quick: bool = True) -> dict:
    """Fault rates per backend, or a skip note."""
    if not SCRIPT.exists():
        note = "bench/bench_wp_rate.py not present: write-protect section skipped"
        return {"skipped": note, "rows": [row("wp", "skipped", None, "", baseline=note)]}
    faults = 5000 if quick else 100_000
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    try:
        p = subprocess.run([sys.executable, str(SCRIPT), "--json", "--faults", str(faults)], capture_output=True,
                           text=True, timeout=600, env=env, cwd=str(ROOT))
        res = json.loads(p.stdout.strip().splitlines()[-1])
    except Exception as e:  # someone else's script: report its failure, do not fail the suite
        note = f"bench_wp_rate.py failed: {type(e).__name__}: {str(e)[:200]}"
        return {"skipped": note, "rows": [row("wp", "failed", None, "", baseline=note)]}
    rows = []
    sim = res.get("sim", {})
    if "faults_per_s_1page_calls" in sim:
        rows.append(row("wp", "sim: 1 page per fault call", sim["faults_per_s_1page_calls"] / 1e3, "k faults/s",
                        baseline=f"4096-page calls: {sim.get('faults_per_s_4096page_calls', 0) / 1e6:.1f} M pages/s"))
    uf = res.get("uffd", {})
    if "unavailable" in uf:
        rows.append(row("wp", "uffd sync", None, "", baseline=f"unavailable: {uf['unavailable']}"))
    elif uf:
        k = "faults_per_s_1byte_writer_thread"
        rows.append(row("wp", "uffd sync: writer thread, 1-byte stores", uf.get(k, 0) / 1e3, "k faults/s",
                        baseline=f"no WP: {uf.get('baseline_1byte_writes_per_s_no_wp', 0) / 1e3:.0f} k writes/s"))
        k2 = "faults_per_s_other_process_1_writer_threads"
        if k2 in uf:
            rows.append(row("wp", "uffd sync: writer in another process", uf[k2] / 1e3, "k faults/s"))
    ua = res.get("uffd_async", {})
    if "unavailable" in ua:
        rows.append(row("wp", "uffd-async", None, "", baseline=f"unavailable: {ua['unavailable']}"))
    elif ua:
        rows.append(row("wp", "uffd-async: kernel-resolved faults", ua.get("kernel_resolved_faults_per_s_1byte", 0) / 1e3,
                        "k faults/s", baseline=f"no WP: {ua.get('baseline_1byte_writes_per_s_no_wp', 0) / 1e3:.0f} k writes/s; "
                                               f"PAGEMAP_SCAN {ua.get('full_scan_found_pages_per_s', 0) / 1e6:.1f} M pages/s"))
    return {"faults": faults, "result": res, "runs_per_figure": 1, "rows": rows}
