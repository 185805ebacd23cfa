"""Embed the hinting pipeline in your own trio program, and watch it round by round.

Run: python examples/embed_in_trio.py

``migrate_guest`` is an ordinary trio coroutine: it boots a simulated guest, migrates it with
hinting and checks every allocated page at the destination. Here it runs in a nursery beside a
task of our own, under trio's MockClock so link time is virtual (a 1 GiB guest over 10 Gbit/s
takes about a second of virtual time and well under that of wall time). A MigrationObserver
sees each round as the engine finishes it, the same hook the progress bar and the report's
charts use.
"""

import trio
import trio.testing

from hintpipe.config import RunConfig
from hintpipe.inprocess import migrate_guest
from hintpipe.progress import MigrationObserver


class RoundPrinter(MigrationObserver):
    """Called by the migration engine; keep it quick (it runs on the engine's task)."""

    def round_ended(self, engine, report):
        print(f"  round {report.index}: sent {report.sent:,} pages, skipped {report.skipped:,} "
              f"as hinted free, {report.duration_s * 1e3:.0f} ms of link time")


async def heartbeat():
    """Something else your program does meanwhile: here, a tick every 250 ms of virtual time."""
    while True:
        await trio.sleep(0.25)
        print(f"  [t={trio.current_time():.2f} s] still migrating")


async def main():
    cfg = RunConfig(pages=1 << 18, batch=32, min_order=9)  # 1 GiB of 4 KiB pages
    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat)
        with trio.fail_after(60):  # a deadline in virtual seconds
            run = await migrate_guest(cfg, observers=[RoundPrinter()])
        nursery.cancel_scope.cancel()  # the migration is done: stop the heartbeat
    res = run.result
    print(f"migrated in {res.rounds} rounds, {res.time_s:.2f} s of link time, "
          f"{res.lost_pages} pages lost: {'verified' if res.verified else 'LOSS'}")
    return res.verified


if __name__ == "__main__":
    ok = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    raise SystemExit(0 if ok else 1)
