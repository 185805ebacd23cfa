"""The README's figures on races and guards: every guard's count with ``--workload race``, and
the pages lost with each guard broken, per write-protect backend; then what uffd-async's
per-chunk scans cost and buy.

``python bench/b_guards.py [--runs 3] [--size 1G]`` runs each ``hintpipe demo`` command below
``--runs`` times (as a subprocess, exactly as printed) and prints min-max of each figure, then
compares uffd-async migrations with and without the scan before each chunk (same seed and size,
in process: the switch is not a command-line option). Real backends the kernel lacks are skipped
with the reason.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from figures import hintpipe, rng  # noqa: E402  (bench/: a demo as a subprocess, a min-max cell)

GUARD_KEYS = ("refused_written_pages", "stale_hint_messages", "skips_invalidated", "scan_caught_pages")


def _available(wp: str) -> str | None:
    if wp == "sim":
        return None
    from hintpipe.wp import UffdUnavailable, probe
    try:
        probe(wp)
        return None
    except UffdUnavailable as e:
        return e.reason


def guards_table(size: str, runs: int) -> None:
    print(f"load average {os.getloadavg()[0]:.1f}; {runs} runs each; min-max")
    print("| command | refused written pages | stale frames dropped | skips invalidated | scan caught pages | lost pages | exit |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for wp in ("sim", "uffd", "uffd-async"):
        why = _available(wp)
        if why:
            print(f"| --wp {wp} | skipped: {why} | | | | | |")
            continue
        mem = [] if wp == "sim" else ["--memory", "real", "--wp", wp]
        guards = ["refuse-written", "stale-drop", "invalidate"] + (["scan-before-send"] if wp == "uffd-async" else [])
        for brk in [None, *guards]:
            args = ["--workload", "race", "--size", size, *mem] + ([] if brk is None else ["--break", brk, "--no-baseline"])
            reps = [hintpipe("demo", *args, "--json") for _ in range(runs)]
            g = [r["guards"] for r in reps]
            cells = [rng([x[k] for x in g]) for k in GUARD_KEYS]
            lost = rng([r["migration"]["lost_pages"] for r in reps])
            codes = ",".join(sorted({str(r["_exit"]) for r in reps}))
            print(f"| `hintpipe demo {' '.join(args)}` | {' | '.join(cells)} | {lost} | {codes} |", flush=True)


def chunk_scans(size_pages: int, runs: int) -> None:
    """uffd-async with and without per-chunk scans: pages sent, scans, lost, wall time."""
    import trio
    import trio.testing

    from hintpipe.config import RunConfig
    from hintpipe.guest.workload import WorkloadConfig
    from hintpipe.inprocess import migrate_guest
    from hintpipe.wp.uffd_async import AsyncUffdBackend

    why = _available("uffd-async")
    if why:
        print(f"uffd-async skipped: {why}")
        return
    print("\n| uffd-async, workload | scans before each chunk | pages sent | scans | pages caught by chunk scans | lost | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind in ("churn", "race"):
        for on in (True, False):
            AsyncUffdBackend.scan_chunks = on
            rows = []
            for seed in range(1, runs + 1):
                cfg = RunConfig(pages=size_pages, memory="real", wp="uffd-async",
                                workload=WorkloadConfig(kind=kind, seed=seed), baseline=False)

                async def go():
                    return await migrate_guest(cfg)

                run = trio.run(go, clock=trio.testing.MockClock(autojump_threshold=0))
                rows.append((run.result.pages_sent, run.wp["scans"], run.wp["scan_caught_by"]["chunk"],
                             run.result.lost_pages, run.wall_s))
            print(f"| {kind} (seeds 1-{runs}) | {'yes' if on else 'no'} | {rng([r[0] for r in rows])} | "
                  f"{rng([r[1] for r in rows])} | {rng([r[2] for r in rows])} | {rng([r[3] for r in rows])} | "
                  f"{min(r[4] for r in rows):.1f}-{max(r[4] for r in rows):.1f} |", flush=True)
    AsyncUffdBackend.scan_chunks = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--only", choices=("guards", "scans"), default=None)
    a = ap.parse_args()
    from hintpipe.cli.options import parse_size

    if a.only in (None, "guards"):
        guards_table(a.size, a.runs)
    if a.only in (None, "scans"):
        chunk_scans(parse_size(a.size), a.runs)


if __name__ == "__main__":
    main()
