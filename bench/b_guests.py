"""Benchmark: many guest processes migrated at once by one ``hintpipe host`` process.

    python bench/b_guests.py [--guests 64] [--size 4G] [--runs 3] [--transport unix] [--json OUT]

One host (``hintpipe host --listen ADDR --json``) and N guests (``hintpipe guest --connect ADDR
--size SIZE``, churn workload, 10 Gbit/s), all started at once. The host's memory is sampled from
``/proc/PID/status`` every 20 ms: VmRSS (and its parts RssAnon, the host's own memory, and
RssShmem, guest memory the host maps), VmHWM (the kernel's exact peak) at the end; its idle RSS is
read before the guests start and again once every guest has left (the host stays up until then).
Reported per run: wall time from starting the guests to the last one's exit, guests migrated and
verified, pages lost (the sum of every report's ``lost_pages``), guests that exited non-zero, host
RSS idle / peak / after, and the memory the host's budget reserved at its peak. Goal (issue 13):
64 x 4 GiB, all verified, host peak RSS <= 512 MiB and back to its idle size after they leave.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_PEAK_MIB = 512
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssShmem", "RssFile")


def _status(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(val.split()[0]) / 1024
    return out


def _address(kind: str, tmp: str) -> str:
    if kind == "unix":
        return f"unix:{tmp}/host.sock"
    if kind == "shm":
        return f"shm:{tmp}/host.shm"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp:127.0.0.1:{s.getsockname()[1]}"


def one_run(guests: int, size: str, kind: str = "unix", extra: tuple[str, ...] = ()) -> dict:
    """Start a host, N guests at once; the figures of one run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="hp-guests-") as tmp:
        env["HINTPIPE_RUNTIME_DIR"] = tmp
        addr = _address(kind, tmp)
        host = subprocess.Popen([sys.executable, "-m", "hintpipe", "host", "--listen", addr, "--json", *extra],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            sock = addr.split(":", 1)[1]
            deadline = time.monotonic() + 30
            while kind != "tcp" and not os.path.exists(sock) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0 if kind != "tcp" else 2.0)
            idle = _status(host.pid)
            peak: dict[str, float] = {}
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    try:
                        for k, v in _status(host.pid).items():
                            peak[k] = max(peak.get(k, 0.0), v)
                    except OSError:
                        return
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            reports: list[dict] = []

            def read_reports() -> None:
                for line in host.stdout:
                    if line.startswith("{"):
                        reports.append(json.loads(line))

            threading.Thread(target=read_reports, daemon=True).start()
            t0 = time.monotonic()
            procs = [subprocess.Popen([sys.executable, "-m", "hintpipe", "guest", "--connect", addr, "--size", size,
                                       "--name", f"g{i}"], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for i in range(guests)]
            outcomes = [p.communicate()[1].strip().splitlines()[-1:] for p in procs]
            rcs = [p.returncode for p in procs]
            wall = time.monotonic() - t0
            deadline = time.monotonic() + 60  # a guest that never got in has no report
            while len(reports) < guests and time.monotonic() < deadline:
                time.sleep(0.1)
            reports = list(reports)
            time.sleep(1.0)  # the last connection's task releases what it held after its report
            stop.set()
            sampler.join()
            after = _status(host.pid)
            host.send_signal(signal.SIGINT)
            host.wait(timeout=60)
        finally:
            if host.poll() is None:
                host.kill()
                host.wait()
    mem = [r.get("memory", {}) for r in reports]
    return {
        "guests": guests, "size": size, "transport": kind, "wall_s": round(wall, 1),
        "migrated": sum(r["status"] == "migrated" and r["migration"]["verified"] for r in reports),
        "reports": len(reports), "guests_failed": sum(1 for rc in rcs if rc != 0),
        "guest_failures": sorted({o[0] for o, rc in zip(outcomes, rcs) if rc != 0 and o}),
        "host_failures": sorted({str(r.get("reason")) for r in reports if r["status"] != "migrated"}),
        "lost_pages": sum(r["migration"]["lost_pages"] for r in reports),
        "host_idle_mib": round(idle["VmRSS"], 1), "host_peak_mib": round(max(peak.get("VmHWM", 0), peak.get("VmRSS", 0)), 1),
        "host_peak_anon_mib": round(peak.get("RssAnon", 0), 1), "host_peak_shmem_mib": round(peak.get("RssShmem", 0), 1),
        "host_after_mib": round(after["VmRSS"], 1),
        "budget_peak_mib": round(max((m.get("budget_peak_bytes", 0) for m in mem), default=0) / 2**20, 1),
        "reserved_per_guest_mib": round(max((m.get("reserved_bytes", 0) for m in mem), default=0) / 2**20, 2),
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }


def run(quick: bool = True, guests: int | None = None, size: str | None = None, runs: int | None = None,
        kind: str = "unix") -> dict:
    """``runs`` runs (quick: 1 run of 16 x 1 GiB; full: 3 runs of 64 x 4 GiB) and their range."""
    guests = guests or (16 if quick else 64)
    size = size or ("1G" if quick else "4G")
    runs = runs or (1 if quick else 3)
    out = [one_run(guests, size, kind) for _ in range(runs)]

    def rng(key: str) -> dict:
        vals = [r[key] for r in out]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    summary = {k: rng(k) for k in ("wall_s", "host_peak_mib", "host_peak_anon_mib", "host_peak_shmem_mib",
                                   "host_idle_mib", "host_after_mib")}
    return {"runs": out, "summary": summary, "guests": guests, "size": size,
            "all_verified": all(r["migrated"] == guests for r in out),
            "lost_pages": sum(r["lost_pages"] for r in out),
            "goal_met": all(r["migrated"] == guests and r["host_peak_mib"] <= GOAL_PEAK_MIB for r in out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=64)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--transport", choices=("unix", "tcp", "shm"), default="unix")
    ap.add_argument("--json", default=None, metavar="OUT")
    a = ap.parse_args()
    res = run(quick=False, guests=a.guests, size=a.size, runs=a.runs, kind=a.transport)
    for r in res["runs"]:
        print(json.dumps(r))
    print(json.dumps({"summary": res["summary"], "all_verified": res["all_verified"],
                      "lost_pages": res["lost_pages"], "goal_met": res["goal_met"]}))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
