"""Compare settings from the JSON reports of several runs.

Run: python examples/compare_settings.py [REPORT.json ...]

Each ``hintpipe demo --json`` (or ``replay --json``, or each line of ``hintpipe host --json``)
prints one JSON object on one line. Given files of such lines, this prints one row per run;
given none, it first runs the demo of an idle guest at a few walker batch sizes and minimum
orders (small guests, so it takes seconds). The keys are documented in the README ("What the
figures mean").
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run_demos(folder: Path) -> list[Path]:
    files = []
    for batch, min_order in ((4, 9), (32, 9), (512, 9), (32, 0)):
        out = folder / f"batch{batch}-order{min_order}.json"
        with open(out, "w") as f:
            subprocess.run([sys.executable, "-m", "hintpipe", "demo", "--size", "128M", "--json", "--workload", "idle",
                            "--batch", str(batch), "--min-order", str(min_order)], stdout=f, check=True)
        files.append(out)
    return files


def rows(files):
    for path in files:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                yield Path(path).stem, json.loads(line)


files = sys.argv[1:] or run_demos(Path(tempfile.mkdtemp()))
print(f"{'run':24} {'batch':>5} {'order':>5} {'sent':>9} {'saved':>7} {'time s':>7} {'hold p99 us':>11} {'lost':>5}")
for name, r in rows(files):
    c, m, lock = r["config"], r["migration"], r["lock"]
    print(f"{name:24} {c['batch']:>5} {c['min_order']:>5} {m['pages_sent']:>9,} {m.get('pages_saved_pct') or 0:>6}% "
          f"{m['time_s']:>7.3f} {lock['p99_hold_us']:>11} {m['lost_pages']:>5}")
