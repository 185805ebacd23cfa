"""Guest and host as two processes, driven from Python.

Run: python examples/two_processes.py

The host (this process) listens on a unix socket and migrates one guest; the guest runs in a
child process, as a VM would run apart from its VMM. They share the guest's RAM (a memfd passed
over the socket) and speak wire protocol v1 (protocols/wire-v1.md). The same from the shell:
``hintpipe host --listen unix:PATH --guests 1`` and ``hintpipe guest --connect unix:PATH``.
"""

import multiprocessing
import tempfile
from dataclasses import replace

import trio

from hintpipe.channel.address import parse_address
from hintpipe.config import RunConfig
from hintpipe.guest.workload import WorkloadConfig
from hintpipe.paired.guest import GuestOptions, guest_main
from hintpipe.paired.host import GuestServer, HostOptions



def guest_process(address: str, size_pages: int) -> None:
    """The child: a guest that runs until its host has migrated it (or gives up)."""
    cfg = RunConfig(pages=size_pages, workload=WorkloadConfig.idle(seed=3))
    outcome = trio.run(guest_main, GuestOptions(address=parse_address(address), cfg=cfg, name="child"))
    print(f"guest: {outcome.reason}")
    raise SystemExit(0 if outcome.ok else 1)


async def host() -> dict:
    address = f"unix:{tempfile.mkdtemp()}/hintpipe.sock"
    # the host decides the migration: link speed, rounds; the guest decides its size and workload
    cfg = replace(RunConfig(), migration=replace(RunConfig().migration, bandwidth_gbit=20.0))
    server = GuestServer(HostOptions(address=parse_address(address), cfg=cfg, guests=1, json=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)  # listening from here on; serve() returns after 1 guest
        child = multiprocessing.get_context("spawn").Process(target=guest_process, args=(address, 1 << 15))
        child.start()
        await trio.to_thread.run_sync(child.join)
        with trio.move_on_after(5):  # the report follows the guest's exit at once; never wait forever
            while not server.reports:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    if not server.reports:
        raise SystemExit("the guest never reached the host")
    return server.reports[0]


if __name__ == "__main__":
    rep = trio.run(host)
    m = rep["migration"]
    print(f"host: guest {rep['guest']['name']!r} {rep['status']}: {m['pages_sent']:,} pages sent, "
          f"{m['pages_skipped']:,} skipped as free, {m['lost_pages']} lost")
    raise SystemExit(0 if rep["status"] == "migrated" else 1)
