"""``hintpipe guest`` and ``hintpipe host``: paired processes migrated in real time."""

from __future__ import annotations

import argparse
import json
import os
import sys

from hintpipe.cli.options import (
    UsageError, add_guest_options, add_memory_options, add_migration_options, address_from,
    paired_config, secret_from,
)

__all__ = ["add_parsers", "cmd_guest", "cmd_host"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``hintpipe guest`` and ``hintpipe host`` (paired processes, real time)."""
    g = sub.add_parser("guest", help="run a simulated guest process that a `hintpipe host` migrates")
    g.add_argument("--connect", required=True, metavar="ADDR", help="unix:PATH, tcp:HOST:PORT or shm:NAME")
    g.add_argument("--name", default="guest", help="name in the host's report")
    g.add_argument("--secret", default=None, help="shared secret for tcp hosts that require it")
    g.add_argument("--connect-timeout", type=float, default=10.0, metavar="S")
    g.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    add_guest_options(g)
    add_migration_options(g)
    add_memory_options(g, host=False)
    g.set_defaults(func=cmd_guest)

    h = sub.add_parser("host", help="accept guest processes and migrate each (one report per guest)")
    h.add_argument("--listen", required=True, metavar="ADDR", help="unix:PATH, tcp:HOST:PORT or shm:NAME")
    h.add_argument("--guests", type=int, default=None, metavar="N", help="exit after N guests (default: serve until interrupted)")
    h.add_argument("--json", action="store_true", help="one JSON object per guest, one a line")
    h.add_argument("--out", default=None, metavar="FILE", help="also append each report to FILE")
    h.add_argument("--secret", default=None, help="require guests to prove this secret (needed off loopback)")
    h.add_argument("--handshake-timeout", type=float, default=10.0, metavar="S")
    h.add_argument("--max-guest-pages", type=int, default=1 << 26, metavar="N",
                   help="refuse guests larger than N pages (default 2^26 = 256 GiB): a Hello is untrusted")
    h.add_argument("--guest-timeout", type=float, default=30.0, metavar="S",
                   help="fail a guest that does not answer a round barrier or pause within S seconds")
    add_guest_options(h)
    add_migration_options(h)
    add_memory_options(h, host=True)
    h.set_defaults(func=cmd_host)


def cmd_guest(args: argparse.Namespace) -> int:
    """``hintpipe guest``: run one guest process until its host has migrated it."""
    import trio

    from hintpipe.paired.guest import GuestOptions, guest_main
    from hintpipe.wp import UffdUnavailable

    opts = GuestOptions(address=address_from(args.connect), cfg=paired_config(args, guest=True),
                        name=args.name, secret=secret_from(args), connect_timeout_s=args.connect_timeout)
    try:
        out = trio.run(guest_main, opts)
    except UffdUnavailable as e:  # registering the guest's RAM failed: say what, never fall back
        raise UsageError(e.reason) from None
    except Exception as e:  # a bug, not a user error: one line unless HINTPIPE_DEBUG is set
        if os.environ.get("HINTPIPE_DEBUG"):
            raise
        print(f"hintpipe guest: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": out.ok, "reason": out.reason, "summary": out.summary}))
    else:
        print(f"hintpipe guest: {out.reason}", file=sys.stdout if out.ok else sys.stderr)
    return 0 if out.ok else 1


def cmd_host(args: argparse.Namespace) -> int:
    """``hintpipe host``: serve guests on an address, migrate each, print one report per guest."""
    import trio

    from hintpipe.paired.host import HostOptions, host_main

    addr = address_from(args.listen)
    secret = secret_from(args)
    if addr.kind == "tcp" and not addr.is_loopback() and secret is None:
        raise UsageError(f"listening on non-loopback {addr} requires --secret (or $HINTPIPE_SECRET)")
    if args.guests is not None and args.guests < 1:
        raise UsageError("--guests must be >= 1")
    if args.out:
        try:
            open(args.out, "a").close()
        except OSError as e:
            raise UsageError(f"cannot write --out {args.out}: {e.strerror}") from None
    opts = HostOptions(address=addr, cfg=paired_config(args, guest=False), guests=args.guests, json=args.json,
                       out=args.out, secret=secret, handshake_timeout_s=args.handshake_timeout,
                       barrier_timeout_s=args.guest_timeout, max_guest_pages=args.max_guest_pages)
    try:
        return trio.run(host_main, opts)
    except OSError as e:
        raise UsageError(f"cannot listen on {addr}: {e.strerror or e}") from None
