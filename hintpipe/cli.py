"""Command line: ``hintpipe demo | guest | host | replay | record | inspect | trace``.

argparse (standard library) rather than click: the commands are few and flat, and one fewer
dependency is one fewer thing to pin. Every user error ends as one sentence on stderr and exit
code 2; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from hintpipe.units import PAGE_SIZE

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class UsageError(Exception):
    """A user-facing error: printed as one sentence, exit status 2."""


def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``1T`` or a plain byte count -> number of 4 KiB pages."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4G, 512M, 1T)")
    nbytes = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    pages = nbytes // PAGE_SIZE
    if pages < 1024:
        raise argparse.ArgumentTypeError(f"size {text!r} is below the 4 MiB minimum")
    return pages


def add_guest_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs a guest: size, workload, walker, race mode."""
    g = p.add_argument_group("guest")
    g.add_argument("--size", type=parse_size, default=1 << 20, metavar="SIZE",
                   help="guest RAM (default 4G = 2^20 pages of 4 KiB)")
    g.add_argument("--workload", choices=("churn", "idle"), default="churn")
    g.add_argument("--seed", type=int, default=1, help="workload random seed (default 1)")
    g.add_argument("--ops-per-s", type=float, default=None, help="churn: alloc+free operations per second")
    g.add_argument("--writes-per-s", type=float, default=None, help="page rewrites per second")
    g.add_argument("--batch", type=int, default=32, help="max blocks per lock hold (default 32)")
    g.add_argument("--min-order", type=int, default=9, help="smallest block order hinted (default 9 = 2 MiB)")
    g.add_argument("--race-mode", choices=("detect", "isolate"), default="detect",
                   help="detect: blocks stay allocatable, write-protect catches reuse (default); "
                        "isolate: blocks leave the free lists until the host acks them")


def add_migration_options(p: argparse.ArgumentParser) -> None:
    """Options of the migration engine."""
    g = p.add_argument_group("migration")
    g.add_argument("--bandwidth", type=float, default=10.0, metavar="GBIT", help="link speed in Gbit/s (default 10)")
    g.add_argument("--max-rounds", type=int, default=30)
    g.add_argument("--downtime-ms", type=float, default=300.0, help="stop-and-copy when the rest fits (default 300)")
    g.add_argument("--queue-size", type=int, default=256, help="virtqueue descriptors (default 256)")
    g.add_argument("--no-event-idx", action="store_true", help="notify on every buffer (no EVENT_IDX suppression)")


def sim_config_from(args: argparse.Namespace):
    """Build a :class:`RunConfig` from parsed options (raises UsageError on bad combinations)."""
    from hintpipe.config import RunConfig
    from hintpipe.guest.workload import WorkloadConfig
    from hintpipe.host.migration import MigrationConfig

    wkw = {"seed": args.seed}
    if args.ops_per_s is not None:
        wkw["ops_per_s"] = args.ops_per_s
    if args.writes_per_s is not None:
        wkw["write_pages_per_s"] = args.writes_per_s
    try:
        wl = WorkloadConfig.idle(**wkw) if args.workload == "idle" else WorkloadConfig(**wkw)
        mig = MigrationConfig(bandwidth_gbit=args.bandwidth, max_rounds=args.max_rounds, downtime_ms=args.downtime_ms)
        return RunConfig(
            pages=args.size,
            workload=wl,
            migration=mig,
            batch=args.batch,
            min_order=args.min_order,
            race_mode=args.race_mode,
            queue_size=args.queue_size,
            event_idx=not args.no_event_idx,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from hintpipe.inprocess import run_demo
    from hintpipe.report import format_summary
    from hintpipe.wp import UffdUnavailable

    try:
        cfg = replace(sim_config_from(args), memory=args.memory, wp=args.wp, baseline=not args.no_baseline)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        rep = run_demo(cfg)
    except UffdUnavailable as e:  # asked for by name and missing here: say what, never fall back
        raise UsageError(e.reason) from None
    if args.json:
        print(json.dumps(rep))
    else:
        print(format_summary(rep))
    return 0 if rep["migration"]["verified"] else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from hintpipe.config import RunConfig
    from hintpipe.host.migration import MigrationConfig
    from hintpipe.report import format_replay
    from hintpipe.trace import TraceError, open_trace
    from hintpipe.trace.replay import ReplayUsageError, replay

    try:
        cfg = RunConfig.for_replay(
            write_rate=args.write_rate, seed=args.seed,
            min_order=args.min_order, batch=args.batch, race_mode=args.race_mode,
            migration=MigrationConfig(bandwidth_gbit=args.bandwidth, max_rounds=args.max_rounds,
                                      downtime_ms=args.downtime_ms),
            queue_size=args.queue_size, event_idx=not args.no_event_idx, baseline=not args.no_baseline,
        )
        trace = open_trace(args.trace, skip_bad=args.skip_bad)
        rep = replay(trace, cfg)
    except (ReplayUsageError, ValueError) as e:
        raise UsageError(str(e)) from None
    except TraceError as e:
        raise UsageError(f"error: {e}") from None
    if args.skip_bad and rep["trace"]["bad_lines_skipped"]:
        print(f"hintpipe: warning: skipped {rep['trace']['bad_lines_skipped']} bad trace lines", file=sys.stderr)
    print(json.dumps(rep) if args.json else format_replay(rep))
    return 0 if rep["migration"]["verified"] else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from hintpipe.trace.commands import cmd_inspect as run

    return run(args.trace, as_json=args.json, samples=args.samples, skip_bad=args.skip_bad)


def cmd_record(args: argparse.Namespace) -> int:
    from hintpipe.trace.commands import cmd_record as run

    return run(args.outdir, duration=args.duration, command=args.record_command or None)


def cmd_trace_convert(args: argparse.Namespace) -> int:
    from hintpipe.trace.commands import cmd_convert as run

    return run(args.src, args.dst, skip_bad=args.skip_bad)


def _secret_from(args: argparse.Namespace) -> bytes | None:
    """``--secret`` (or ``$HINTPIPE_SECRET``) as bytes, None when unset."""
    import os

    text = args.secret if args.secret is not None else os.environ.get("HINTPIPE_SECRET")
    if text is not None and len(text) < 8:
        raise UsageError("--secret must be at least 8 characters")
    return None if text is None else text.encode()


def _address_from(text: str):
    from hintpipe.channel.address import AddressError, parse_address

    try:
        return parse_address(text)
    except AddressError as e:
        raise UsageError(str(e)) from None


def cmd_guest(args: argparse.Namespace) -> int:
    """``hintpipe guest``: run one guest process until its host has migrated it."""
    import os

    import trio

    from hintpipe.paired.guest import GuestOptions, guest_main
    from hintpipe.wp import UffdUnavailable

    opts = GuestOptions(address=_address_from(args.connect), cfg=_paired_config(args, guest=True),
                        name=args.name, secret=_secret_from(args), connect_timeout_s=args.connect_timeout)
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

    addr = _address_from(args.listen)
    secret = _secret_from(args)
    if addr.kind == "tcp" and not addr.is_loopback() and secret is None:
        raise UsageError(f"listening on non-loopback {addr} requires --secret (or $HINTPIPE_SECRET)")
    if args.guests is not None and args.guests < 1:
        raise UsageError("--guests must be >= 1")
    if args.out:
        try:
            open(args.out, "a").close()
        except OSError as e:
            raise UsageError(f"cannot write --out {args.out}: {e.strerror}") from None
    opts = HostOptions(address=addr, cfg=_paired_config(args, guest=False), guests=args.guests, json=args.json,
                       out=args.out, secret=secret, handshake_timeout_s=args.handshake_timeout,
                       barrier_timeout_s=args.guest_timeout, max_guest_pages=args.max_guest_pages)
    try:
        return trio.run(host_main, opts)
    except OSError as e:
        raise UsageError(f"cannot listen on {addr}: {e.strerror or e}") from None


def _paired_config(args: argparse.Namespace, *, guest: bool):
    """The guest's or host's RunConfig with ``--memory``/``--wp`` checked (UsageError otherwise).

    The guest resolves ``--wp`` (``auto``: the best backend its kernel offers; a backend named but
    unavailable: one sentence, exit 2). The host probes a named real backend the same way but keeps
    ``auto``, which accepts whatever the guest chose (protocols/wire-v1.md section 11.5).
    """
    from dataclasses import replace

    from hintpipe.paired.handoff import TCP_REFUSAL
    from hintpipe.wp import UffdUnavailable, resolve_backend

    addr = _address_from(args.connect if guest else args.listen)
    if args.memory == "real" and addr.kind == "tcp":
        raise UsageError(TCP_REFUSAL)
    try:
        wp = resolve_backend(args.wp, args.memory) if guest or args.wp != "auto" else args.wp
        return replace(sim_config_from(args), memory=args.memory, wp=wp)
    except UffdUnavailable as e:
        raise UsageError(e.reason) from None
    except ValueError as e:
        raise UsageError(str(e)) from None


def add_memory_options(p: argparse.ArgumentParser, *, host: bool) -> None:
    """``--memory`` and ``--wp`` for paired processes."""
    g = p.add_argument_group("memory")
    g.add_argument("--memory", choices=("sim", "real"), default="sim",
                   help="sim: page versions only (default); real: guest RAM is a memfd of --size shared "
                        "with the host (unix: and shm: only), checked byte for byte")
    g.add_argument("--wp", choices=("sim", "uffd", "uffd-async", "auto", "off"), default="auto",
                   help=("write tracking the guest must use: auto (default) accepts the guest's choice, "
                         "anything else must match it" if host else
                         "write tracking: auto (default: best that works, uffd-async > uffd > sim; "
                         "always sim with --memory sim), sim (faults over the link), uffd (sync "
                         "userfaultfd, the host handles faults), uffd-async (WP_ASYNC + PAGEMAP_SCAN by "
                         "the host), off (none: loses pages)"))


def add_paired_parsers(sub) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (subcommands register themselves here)."""
    p = argparse.ArgumentParser(prog="hintpipe", description="Free page hinting for live migration.")
    sub = p.add_subparsers(dest="subcommand", required=True)

    d = sub.add_parser("demo", help="migrate a simulated VM in one process, with and without hinting")
    add_guest_options(d)
    add_migration_options(d)
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.add_argument("--no-baseline", action="store_true", help="skip the migration without hinting")
    d.add_argument("--memory", choices=("sim", "real"), default="sim",
                   help="sim: page versions only (default); real: guest RAM is a memfd of --size, "
                        "checked byte for byte")
    d.add_argument("--wp", choices=("sim", "uffd", "uffd-async", "auto", "off"), default="auto",
                   help="write tracking: auto (default: best that works, uffd-async > uffd > sim; "
                        "always sim with --memory sim), sim (simulated faults), uffd (sync "
                        "userfaultfd), uffd-async (WP_ASYNC + PAGEMAP_SCAN), off (none: loses pages)")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("replay", help="replay a real allocator trace through hinting and a migration")
    r.add_argument("trace", help="recording folder (kmem.trace.zst + kpageflags.start.zst ...) or trace-v1 file")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--min-order", type=int, default=9)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--race-mode", choices=("detect", "isolate"), default="detect",
                   help="detect only: a recorded kernel cannot have blocks isolated from it")
    r.add_argument("--write-rate", type=float, default=0.0, metavar="PAGES_PER_S",
                   help="extra writes to allocated pages per second of trace (allocations always write)")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--skip-bad", action="store_true", help="skip malformed/unknown lines with a warning instead of failing")
    r.add_argument("--no-baseline", action="store_true", help="skip the replay without hinting")
    add_migration_options(r)
    r.set_defaults(func=cmd_replay)

    i = sub.add_parser("inspect", help="counts by event type and order, time span, free memory over time")
    i.add_argument("trace")
    i.add_argument("--json", action="store_true")
    i.add_argument("--samples", type=int, default=50)
    i.add_argument("--skip-bad", action="store_true")
    i.set_defaults(func=cmd_inspect)

    rec = sub.add_parser("record", help="record this machine's page allocator (root, tracefs)")
    rec.add_argument("outdir")
    rec.add_argument("--duration", type=float, default=None, metavar="S",
                     help="stop after S seconds; with `-- COMMAND ...` record until the command ends")
    rec.set_defaults(func=cmd_record)

    t = sub.add_parser("trace", help="trace file utilities")
    tsub = t.add_subparsers(dest="trace_command", required=True)
    c = tsub.add_parser("convert", help="write hintpipe's trace-v1 format from a recording")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--skip-bad", action="store_true")
    c.set_defaults(func=cmd_trace_convert)
    add_paired_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hintpipe`` console script."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `hintpipe record OUT [--duration S] -- COMMAND ...`: argparse with subcommands cannot take a
    # trailing command after `--`, so it is split off here
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    args = parser.parse_args(argv)
    if command and args.subcommand != "record":
        parser.error("`-- COMMAND` is only for `hintpipe record`")
    args.record_command = command
    try:
        return args.func(args)
    except UsageError as e:
        print(f"hintpipe: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hintpipe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hintpipe ... | head`: the reader left, nothing more to say
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
