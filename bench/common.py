"""Shared helpers of the benchmark suite: timing, isolated runs for peak RSS, JSON and tables.

Every figure is the median of ``repeat`` timed runs after ``warmup`` untimed ones, reported with
its min and max. Buffers a benchmark needs are allocated and touched by its setup, outside the
timed body (first touch of fresh memory is slow on this machine: hundreds of MB/s).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SHARED_TRACES = ROOT.parent / "shared" / "traces"
TEST_TRACES = ROOT / "tests" / "data" / "traces"


def timeit(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1,
           setup: Callable[[], Any] | None = None) -> dict:
    """Median/min/max wall seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs.

    ``setup()`` (untimed) runs before every run, e.g. to reset a bitmap. ``last`` is the value
    the last run returned.
    """
    out = None
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(max(1, repeat)):
        if setup:
            setup()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "runs": len(times), "last": out}


def rate(count: float, t: dict, scale: float = 1e6) -> dict:
    """``count`` items per second (divided by ``scale``) from a :func:`timeit` result.

    The median rate comes from the median time; min rate from the max time and vice versa.
    """
    return {"median": count / t["median_s"] / scale, "min": count / t["max_s"] / scale,
            "max": count / t["min_s"] / scale, "runs": t["runs"]}


def spread(values: list[float]) -> dict:
    """Median/min/max of measured values (rates, percentiles) from repeated runs."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values)}


def peak_rss_mib() -> float:
    """Peak resident set of this process so far, in MiB.

    VmHWM of /proc/self/status where there is one: ``ru_maxrss`` of a freshly exec'd child
    starts at the RSS its parent had when it forked (Linux keeps the pre-exec high-water mark),
    which would charge the parent's memory to every child.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_bytes(arr) -> int:
    """Bytes of ``arr``'s memory that are mapped in (``mincore``, whole 4 KiB pages): what the
    array costs in RSS. Memory only ever read maps the shared zero page and is counted too."""
    import ctypes

    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    addr = arr.__array_interface__["data"][0]
    if arr.nbytes == 0:
        return 0
    start = addr & ~(page - 1)
    length = addr + arr.nbytes - start
    vec = np.zeros(-(-length // page), dtype=np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(start, length, vec.ctypes.data) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return int(np.count_nonzero(vec & 1)) * page


def run_isolated(module: str, func: str, kwargs: dict, timeout: float = 900.0) -> dict:
    """Run ``module.func(**kwargs)`` in a fresh interpreter; return its JSON result.

    The child adds ``peak_rss_mib`` (its own VmHWM), so every size gets a clean peak. The
    module is imported from bench/ (or anywhere on the path).
    """
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(BENCH_DIR)!r})\n"
        f"import {module} as m\n"
        f"r = m.{func}(**json.loads(sys.argv[1]))\n"
        "import common\nr['peak_rss_mib'] = round(common.peak_rss_mib(), 1)\n"
        "print('@@RESULT@@' + json.dumps(r))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise RuntimeError(f"{module}.{func}({kwargs}) failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")


def machine_info() -> dict:
    """What the figures were measured on."""
    import numpy as np

    info = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
        info["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return info


def row(bench: str, case: str, value: dict | float | None, unit: str, *, baseline: str = "",
        goal: str = "", note: str = "") -> dict:
    """One line of the summary table. ``value`` is a spread dict or a single number."""
    if isinstance(value, dict):
        med, lo, hi = value["median"], value["min"], value["max"]
    else:
        med, lo, hi = value, None, None
    return {"bench": bench, "case": case, "median": med, "min": lo, "max": hi, "unit": unit,
            "baseline": baseline, "goal": goal, "note": note}


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def format_table(rows: list[dict]) -> str:
    """Plain-text table of summary rows (one line per figure)."""
    head = ["bench", "case", "median", "min", "max", "unit", "baseline (same run)", "goal"]
    body = [[r["bench"], r["case"], _fmt(r["median"]), _fmt(r["min"]), _fmt(r["max"]), r["unit"],
             r["baseline"], r["goal"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    widths[-2] = min(widths[-2], 48)
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for b in body:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(b, widths)).rstrip())
    return "\n".join(lines)


def clean_json(obj: Any) -> Any:
    """Make numpy scalars/arrays and tuples JSON-ready; drop timeit's ``last`` payloads."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items() if k != "last"}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON (numpy values converted)."""
    Path(path).write_text(json.dumps(clean_json(data), indent=1) + "\n")


def find_traces() -> tuple[list[Path], str]:
    """The real recordings: ../shared/traces, else the small slices in tests/data (with a note)."""
    for base, note in ((SHARED_TRACES, "shared recordings"),
                       (TEST_TRACES, "../shared/traces absent: small slices from tests/data/traces")):
        if base.is_dir():
            recs = sorted(p for p in base.iterdir() if p.is_dir())
            if recs:
                return recs, note
    return [], "no recordings found (../shared/traces and tests/data/traces absent)"
