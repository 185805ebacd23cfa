"""A workload of your own: what the guest's vCPUs do to memory while it is being migrated.

Run: python examples/custom_workload.py

This guest behaves like a cache that grows to most of memory, then drops half of it every
50 ms of guest time (say, a checkpoint). A workload is a subclass of ``hintpipe.guest.workload.Workload``;
``run()`` is its vCPU loop. The rules that keep the loss check meaningful:

* allocate and free inside ``async with self.zone.allocator()`` (the zone lock the walker takes);
* write every page you allocate, after the lock is dropped (``await self.memory.write(pages)``):
  a write to a hinted page is what write-protect must catch;
* call ``await self.gate.checkpoint()`` each step, so stop-and-copy can pause the vCPU.
"""

import numpy as np
import trio
import trio.testing

from hintpipe.config import RunConfig
from hintpipe.guest.workload import Workload, WorkloadConfig
from hintpipe.inprocess import migrate_guest
from hintpipe.units import block_pages

ORDER = 9  # 2 MiB blocks


class CheckpointingCache(Workload):
    async def run(self):
        blocks: list[int] = []
        target = int(self.alloc.page_count * 0.6) >> ORDER
        last_checkpoint = trio.current_time()
        self.gate.vcpus += 1
        try:
            while True:
                await trio.sleep(0.005)
                await self.gate.checkpoint()
                async with self.zone.allocator():
                    new = []
                    for _ in range(4):  # grow by 8 MiB per step while below the target
                        if len(blocks) >= target:
                            break
                        pfn = self.alloc.alloc(ORDER)
                        if pfn is None:
                            break
                        new.append(pfn)
                    if trio.current_time() - last_checkpoint > 0.05:  # checkpoint: drop half
                        for pfn in blocks[::2]:
                            self.alloc.free(pfn, ORDER)
                        self.stats.frees += len(blocks[::2])
                        blocks = blocks[1::2]
                        last_checkpoint = trio.current_time()
                blocks += new
                self.stats.allocs += len(new)
                if new:  # an allocation is a write: fill the new blocks
                    pages = block_pages(np.array(new), np.full(len(new), ORDER))
                    await self.memory.write(pages)
                    self.stats.pages_written += len(pages)
        finally:
            self.gate.vcpus -= 1


async def main():
    # static_fraction: memory allocated at boot and never freed (kernel, page cache); the rest is ours
    cfg = RunConfig(pages=1 << 17, workload=WorkloadConfig(static_fraction=0.1, churn_fraction=0.0))
    for hinting in (True, False):
        run = await migrate_guest(cfg, hinting=hinting, workload=CheckpointingCache)
        r = run.result
        print(f"{'with hinting' if hinting else 'no hinting  '}: {r.pages_sent:,} pages sent in {r.rounds} rounds, "
              f"{r.time_s * 1e3:.0f} ms; {run.workload.stats.allocs} blocks allocated, "
              f"{run.workload.stats.frees} freed; lost {r.lost_pages}")
        assert r.verified


if __name__ == "__main__":
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
