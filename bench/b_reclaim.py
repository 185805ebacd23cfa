"""The README's reclaim figures: the host's memory for a guest before, at its lowest and after
reclaim, pages discarded and refused, lost pages, per backing and race mode.

``python bench/b_reclaim.py [--runs 3] [--size 1G] [--hugetlb]`` runs each ``hintpipe demo``
command below ``--runs`` times (as a subprocess, exactly as printed, with a different ``--seed``
each run) and prints min-max of each figure and the load average before and after. ``--hugetlb``
adds the hugetlb rows, with ``--reserve-huge-pages`` (root: the pool is put back after each run);
``--small-hints`` runs only the plain rows (shmem, and hugetlb with ``--hugetlb``) with hints down
to 64 KiB (``--min-order 4``), to show what hints smaller than a backing page leave.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from figures import hintpipe, rng  # noqa: E402  (bench/: a demo as a subprocess, a min-max cell)

KEYS = ("host_rss_before_mib", "host_rss_min_mib", "host_rss_after_mib", "pages_discarded",
        "discards_refused_written", "hints_too_small", "reclaimed_fraction", "isolate_wait_ms")


FMT = {"host_rss_before_mib": "{:,.1f}", "host_rss_min_mib": "{:,.1f}", "host_rss_after_mib": "{:,.1f}",
       "reclaimed_fraction": "{:.3f}", "isolate_wait_ms": "{:,.1f}"}
"""How each figure is printed (the others are page counts)."""


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--hugetlb", action="store_true", help="also hugetlb backing (reserves huge pages as root)")
    ap.add_argument("--small-hints", action="store_true",
                    help="only the rows with hints down to 64 KiB (--min-order 4), per backing")
    a = ap.parse_args()
    rows = [["--memory", "real", "--wp", "uffd", "--reclaim", "--size", a.size],
            ["--memory", "real", "--wp", "uffd", "--reclaim", "--size", a.size, "--race-mode", "isolate"],
            ["--memory", "real", "--wp", "uffd", "--reclaim", "--size", a.size, "--workload", "race"]]
    if a.hugetlb:
        rows += [["--memory", "real", "--wp", "uffd", "--reclaim", "--size", a.size, "--backing", "hugetlb",
                  "--reserve-huge-pages"]]
    if a.small_hints:
        rows = [[*r, "--min-order", "4"] for r in (rows[0], *rows[3:])]
    print(f"load average before {os.getloadavg()}; {a.runs} runs each (seeds 1..{a.runs}); min-max")
    print("| hintpipe demo ... --json | host memory before / min / after (MiB) | pages discarded | refused written "
          "| too small | reclaimed fraction | isolate wait (ms) | lost pages | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for args in rows:
        got = [hintpipe("demo", *args, "--seed", str(seed), "--json") for seed in range(1, a.runs + 1)]
        rs = [r["reclaim"] for r in got]
        col = {k: rng([r[k] for r in rs], FMT.get(k, "{:,}")) for k in KEYS}
        lost = rng([r["migration"]["lost_pages"] for r in got])
        wall = rng([r["_wall_s"] for r in got], "{:.1f}")
        print(f"| `{' '.join(args)}` | {col['host_rss_before_mib']} / {col['host_rss_min_mib']} / "
              f"{col['host_rss_after_mib']} | {col['pages_discarded']} | {col['discards_refused_written']} | "
              f"{col['hints_too_small']} | {col['reclaimed_fraction']} | {col['isolate_wait_ms']} | {lost} | {wall} |")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
