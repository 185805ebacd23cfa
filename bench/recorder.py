"""Does ``hintpipe record`` keep up? Events lost on the issue's workloads, several runs each.

    python bench/recorder.py OUT [--runs 3] [NAME ...]        (root)

Workloads (bench/workloads.py): ``pagecache``, the workload of issue 12 (600 MB written in 4 KiB
writes, read back, deleted, caches dropped), and ``churn``, two processes faulting in and
unmapping anonymous 4 KiB pages for 10 s, the highest event rate this machine makes (goal: no
loss at >= 500 k events/s). Each run records with the defaults of ``hintpipe record`` (private
instance, 64 MiB per CPU) and prints one JSON line: load average before, events, span, mean
and peak events per second (the most in any whole second), events lost by the kernel, bytes
written. The recording is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hintpipe.trace.record import record  # noqa: E402

HERE = Path(__file__).resolve().parent
W = [sys.executable, str(HERE / "workloads.py")]
WORKLOADS = {
    "pagecache": W + ["pagecache", "--mb", "600"],
    "churn": W + ["churn", "--seconds", "10", "--workers", "2"],
}


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 3
    names = [a for a in argv[1:] if a in WORKLOADS] or list(WORKLOADS)
    worst = 0
    for name in names:
        for i in range(runs):
            d = out / f"{name}-{i}"
            shutil.rmtree(d, ignore_errors=True)
            load = os.getloadavg()
            cmd = WORKLOADS[name] + (["--where", str(out)] if name == "pagecache" else [])
            s = record(d, command=cmd, write_cache=False)
            print(json.dumps({"workload": name, "run": i, "load": [round(x, 2) for x in load],
                              **{k: s[k] for k in ("events", "span_s", "events_per_s", "peak_events_per_s",
                                                   "lost_events", "lost_in_pages", "undecoded", "bytes_written",
                                                   "returncode")}}), flush=True)
            worst = max(worst, s["lost_events"], s["lost_in_pages"])
            if "--keep" not in argv:
                shutil.rmtree(d, ignore_errors=True)
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
