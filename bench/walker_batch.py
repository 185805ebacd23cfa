"""Measure the free-list walker: blocks/s and per-batch duration by batch size.

Not a test. A 2**20-page guest (4 GiB) is fragmented to ~50% allocated
(mixed orders 0..5), then one full round is walked per batch size with the
walker's own per-batch timer (the time the zone lock would be held).

    python bench/walker_batch.py [--pages 1048576] [--min-order 9] [--isolate]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hintpipe.guest.buddy import BuddyAllocator
from hintpipe.guest.walker import FreeListWalker


def fragment(pages: int, seed: int = 1) -> BuddyAllocator:
    """Allocate ~75% in random small orders, then free random blocks to ~50%."""
    rng = np.random.default_rng(seed)
    a = BuddyAllocator(pages)
    held: list[tuple[int, int]] = []
    orders = rng.integers(0, 6, size=pages)
    i = 0
    while a.nr_free_pages > pages // 4:
        o = int(orders[i % pages])
        i += 1
        p = a.alloc(o)
        if p is not None:
            held.append((p, o))
    for j in rng.permutation(len(held)).tolist():
        if a.nr_free_pages >= pages // 2:
            break
        a.free(*held[j])
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=1 << 20)
    ap.add_argument("--min-order", type=int, default=9)
    ap.add_argument("--budget-us", type=float, default=200.0)
    ap.add_argument("--isolate", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    t = time.perf_counter()
    a = fragment(args.pages)
    counts = a.free_counts()
    print(f"pages={args.pages} free={a.nr_free_pages / args.pages:.1%} "
          f"fragment_s={time.perf_counter() - t:.2f} buddyinfo={counts.tolist()}")
    nblocks = int(counts[args.min_order:].sum())
    print(f"min_order={args.min_order} blocks_per_round={nblocks} budget_us={args.budget_us} "
          f"isolate={args.isolate}")
    print(f"{'batch':>6} {'blocks/s':>12} {'pages/s':>12} {'p50_us':>8} {'p99_us':>8} "
          f"{'max_us':>8} {'batches':>8} {'budget_cut':>10}")
    for batch in (1, 8, 32, 128, 512):
        w = FreeListWalker(a, min_order=args.min_order, batch=batch,
                           time_budget_us=args.budget_us, isolate=args.isolate)
        for _ in range(args.rounds):
            w.start_round()
            while True:
                p, o = w.next_batch()
                if p.size == 0:
                    break
                w.release(p, o)  # isolate mode: immediate ack
        s = w.stats
        busy = float(s.batch_durations().sum())
        pct = s.percentiles()
        print(f"{batch:>6} {s.blocks / busy:>12.0f} {s.pages / busy:>12.0f} "
              f"{pct['p50_us']:>8.1f} {pct['p99_us']:>8.1f} {pct['max_us']:>8.1f} "
              f"{s.batches:>8} {s.budget_stops:>10}")


if __name__ == "__main__":
    main()
