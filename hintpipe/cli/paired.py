"""``hintpipe guest`` and ``hintpipe host``: paired processes migrated in real time.

The guest decides its size, workload, walker, link and memory; the host decides the migration
(link speed, rounds, downtime). Each process accepts the other's options too (so one list can be
given to both) and says once that it ignores them.
"""

from __future__ import annotations

import argparse
import json
import sys

from hintpipe.cli.options import (
    GUEST_DECIDES, HOST_DECIDES, RECLAIM_FOR_HELP, RECLAIM_HELP, UsageError, add_break_option, add_guest_options, add_link_options, add_memory_options,
    add_migration_options, add_output_options, add_walker_options, address_from, command_parser,
    float_at_least, int_in, paired_config, parse_size, secret_from, show_progress, warn_other_side,
)

__all__ = ["add_parsers", "cmd_guest", "cmd_host"]

ADDRESS_HELP = "unix:PATH, tcp:HOST:PORT (tcp:PORT = loopback) or shm:NAME"
IDLE_HELP = ("give up on the other side when it sends nothing for S seconds (it is pinged after S/4): "
             "the guest exits 1, the host reports that guest failed (default 30; 0: no bound)")
SIDES = ("Who decides what: the guest its size, workload, walker, link and memory (--size, "
         "--workload,\n--batch, --min-order, --race-mode, --queue-size, --memory, --wp ...); the "
         "host the migration\n(--bandwidth, --max-rounds, --downtime-ms). Either process accepts "
         "the other's options and\nignores them, with one warning.")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``hintpipe guest`` and ``hintpipe host`` (paired processes, real time)."""
    g = command_parser(
        sub, "guest", help="run a simulated guest process that a `hintpipe host` migrates",
        description="Boots a simulated VM (its RAM in a memfd it shares with the host), connects to "
                    "the host, runs\nits workload and hints its free pages until the host has "
                    "migrated and verified it. Exit\nstatus 0 when migrated and verified, 1 with "
                    "the reason otherwise.\n\n" + SIDES,
        example="  hintpipe host --listen unix:/tmp/hp.sock --guests 1 &\n"
                "  hintpipe guest --connect unix:/tmp/hp.sock --size 1G --workload idle")
    g.add_argument("--connect", required=True, metavar="ADDR", help=ADDRESS_HELP)
    g.add_argument("--name", default="guest", help="this guest's name in the host's report (default guest)")
    g.add_argument("--secret", default=None, help="shared secret for tcp hosts that require it ($HINTPIPE_SECRET)")
    g.add_argument("--connect-timeout", type=float_at_least(0, strict=True), default=10.0, metavar="S",
                   help="give up if the host does not answer within S seconds (default 10)")
    g.add_argument("--idle-timeout", type=float_at_least(0), default=30.0, metavar="S", help=IDLE_HELP)
    add_guest_options(g)
    add_walker_options(g)
    add_link_options(g)
    add_memory_options(g, host=False)
    add_migration_options(g, hidden=True)
    add_output_options(g, what="the outcome")
    g.set_defaults(func=cmd_guest)

    h = command_parser(
        sub, "host", help="accept guest processes and migrate each (one report per guest)",
        description="Listens on ADDR and migrates every guest that connects, each in its own task "
                    "(a failing or\nhostile guest stalls nobody else); prints one report per guest, "
                    "the keys of hintpipe demo\n--json plus status, reason, transport and guest. "
                    "Serves until --guests guests are done or\nCtrl-C/SIGTERM. Exit status 0 "
                    "unless a migration failed.\n\n" + SIDES,
        example="  hintpipe host --listen unix:/tmp/hp.sock --guests 2 --json --out reports.jsonl")
    h.add_argument("--listen", required=True, metavar="ADDR", help=ADDRESS_HELP)
    h.add_argument("--guests", type=int_in(1), default=None, metavar="N",
                   help="exit after N guests, refused ones included (default: serve until interrupted)")
    h.add_argument("--out", default=None, metavar="FILE", help="also append each report to FILE")
    h.add_argument("--secret", default=None,
                   help="require guests to prove this secret (needed off loopback; $HINTPIPE_SECRET)")
    h.add_argument("--handshake-timeout", type=float_at_least(0, strict=True), default=10.0, metavar="S",
                   help="refuse a guest that has not said Hello within S seconds (default 10)")
    h.add_argument("--max-guest-pages", type=int_in(1), default=1 << 26, metavar="N",
                   help="refuse guests larger than N pages (default 2^26 = 256 GiB): a Hello is untrusted")
    h.add_argument("--max-memory", type=parse_size, default=None, metavar="SIZE",
                   help="memory all guests together may cost this host, e.g. 8G (default: half of "
                        "MemAvailable at start); a guest that does not fit is refused with the figures")
    h.add_argument("--guest-timeout", type=float_at_least(0, strict=True), default=30.0, metavar="S",
                   help="fail a guest that does not answer a round barrier or pause within S seconds (default 30)")
    h.add_argument("--idle-timeout", type=float_at_least(0), default=30.0, metavar="S", help=IDLE_HELP)
    add_migration_options(h)
    add_memory_options(h, host=True)
    h.add_argument("--reclaim", action="store_true", help=RECLAIM_HELP)
    h.add_argument("--reclaim-for", type=float_at_least(0), default=0.0, metavar="S", help=RECLAIM_FOR_HELP)
    add_guest_options(h, hidden=True)
    add_walker_options(h, hidden=True)
    add_link_options(h, hidden=True)
    add_output_options(h, what="each guest's report")
    add_break_option(h)
    h.set_defaults(func=cmd_host)


def cmd_guest(args: argparse.Namespace) -> int:
    """``hintpipe guest``: run one guest process until its host has migrated it."""
    warn_other_side(args, HOST_DECIDES, me="guest", decider="host")
    from hintpipe.cli.checks import check_memory

    cfg = paired_config(args, guest=True)
    check_memory(cfg, what="guest")
    from hintpipe.cli.checks import huge_pages

    with huge_pages(cfg, reserve=args.reserve_huge_pages):
        return _run_guest(args, cfg)


def _run_guest(args: argparse.Namespace, cfg) -> int:
    import trio

    from hintpipe.paired.guest import GuestOptions, guest_main
    from hintpipe.wp import UffdUnavailable

    opts = GuestOptions(address=address_from(args.connect), cfg=cfg, name=args.name, secret=secret_from(args),
                        connect_timeout_s=args.connect_timeout, idle_timeout_s=args.idle_timeout or None)
    try:
        out = trio.run(guest_main, opts)
    except UffdUnavailable as e:  # registering the guest's RAM failed: say what, never fall back
        raise UsageError(e.reason) from None
    if args.json:
        print(json.dumps({"ok": out.ok, "reason": out.reason, "summary": out.summary}))
    else:
        print(f"hintpipe guest: {out.reason}", file=sys.stdout if out.ok else sys.stderr)
    if out.signal is not None:
        return 128 + out.signal
    return 0 if out.ok else 1


def cmd_host(args: argparse.Namespace) -> int:
    """``hintpipe host``: serve guests on an address, migrate each, print one report per guest."""
    warn_other_side(args, GUEST_DECIDES, me="host", decider="guest")
    from hintpipe.cli.checks import check_output_path

    addr = address_from(args.listen)
    secret = secret_from(args)
    if addr.kind == "tcp" and not addr.is_loopback() and secret is None:
        raise UsageError(f"listening on non-loopback {addr} requires --secret (or $HINTPIPE_SECRET)")
    if args.out:
        check_output_path(args.out, "--out", append=True)
    if args.reclaim:  # the guest's race mode is its own: refuse what is unsafe in either mode
        from hintpipe.host.reclaim import reclaim_refusal

        if args.wp in ("uffd-async", "off") or args.memory != "real":
            raise UsageError(reclaim_refusal(memory=args.memory, wp=args.wp, race_mode="detect"))
    cfg = paired_config(args, guest=False)
    import trio

    from hintpipe.channel.stream import ListenError
    from hintpipe.paired.host import HostOptions, host_main
    from hintpipe.units import PAGE_SIZE
    from hintpipe.progress import open_progress

    opts = HostOptions(address=addr, cfg=cfg, guests=args.guests, json=args.json,
                       out=args.out, secret=secret, handshake_timeout_s=args.handshake_timeout,
                       barrier_timeout_s=args.guest_timeout, max_guest_pages=args.max_guest_pages,
                       idle_timeout_s=args.idle_timeout or None,
                       max_memory=None if args.max_memory is None else args.max_memory * PAGE_SIZE)
    try:
        with open_progress(show_progress(args)) as progress:
            return trio.run(host_main, opts, progress)
    except ListenError as e:
        raise UsageError(str(e)) from None
