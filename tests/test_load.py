"""Load: many small guests at once on one host process, every one migrated and verified.

The 64 x 4 GiB run is a benchmark (``python bench/b_guests.py``, figures in the README); here 16
guests of 8 MiB, half churning and half idle, start together against one ``hintpipe host``. Every
guest exits 0, every report says migrated, verified, 0 lost pages; the host's budget held many of
them at once and was all handed back; the host's RSS ends where it started, give or take a few MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from procs import rss_mib

ROOT = Path(__file__).resolve().parents[1]
GUESTS = 16


def test_many_guests_at_once_all_verified(tmp_path):
    env = dict(os.environ, HINTPIPE_RUNTIME_DIR=str(tmp_path))
    sock = tmp_path / "h.sock"
    host = subprocess.Popen([sys.executable, "-m", "hintpipe", "host", "--listen", f"unix:{sock}", "--json",
                             "--bandwidth", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert host.poll() is None and time.monotonic() < deadline, host.stderr.read()
            time.sleep(0.05)
        time.sleep(0.3)
        idle_rss = rss_mib(host.pid)
        guests = [subprocess.Popen([sys.executable, "-m", "hintpipe", "guest", "--connect", f"unix:{sock}",
                                    "--size", "8M", "--name", f"g{i}", "--seed", str(i + 1),
                                    "--workload", "churn" if i % 2 else "idle"],
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for i in range(GUESTS)]
        for g in guests:
            _, err = g.communicate(timeout=300)
            assert g.returncode == 0 and "Traceback" not in err, err
        reports = []
        while len(reports) < GUESTS:
            line = host.stdout.readline()
            assert line, "the host stopped before reporting every guest"
            reports.append(json.loads(line))
        deadline = time.monotonic() + 10
        while rss_mib(host.pid) > idle_rss + 4 and time.monotonic() < deadline:
            time.sleep(0.1)  # the last guests' tasks release their memory just after their reports
        end_rss = rss_mib(host.pid)
    finally:
        host.kill()
        host.wait()
    assert sorted(r["guest"]["name"] for r in reports) == sorted(f"g{i}" for i in range(GUESTS))
    for r in reports:
        m = r["migration"]
        assert r["status"] == "migrated" and m["verified"] is True and m["lost_pages"] == 0, r["reason"]
        assert m["allocated_pages"] > 0
    each = max(r["memory"]["reserved_bytes"] for r in reports)
    peak = max(r["memory"]["budget_peak_bytes"] for r in reports)
    assert peak >= 8 * each  # at least half of them were admitted at the same time
    assert end_rss <= idle_rss + 4, (idle_rss, end_rss)
