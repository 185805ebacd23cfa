"""``hintpipe replay | inspect | record | trace convert``: real allocator traces."""

from __future__ import annotations

import argparse
import json
import sys

from hintpipe.cli.options import UsageError, add_migration_options
from hintpipe.config import RACE_MODES

__all__ = ["add_parsers", "cmd_replay", "cmd_inspect", "cmd_record", "cmd_trace_convert"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``hintpipe replay``, ``inspect``, ``record`` and ``trace convert``."""
    r = sub.add_parser("replay", help="replay a real allocator trace through hinting and a migration")
    r.add_argument("trace", help="recording folder (kmem.trace.zst + kpageflags.start.zst ...) or trace-v1 file")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--min-order", type=int, default=9)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--race-mode", choices=RACE_MODES, default="detect",
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


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay a trace through hinting and a migration; exit 0 when it verified."""
    from hintpipe.config import RunConfig
    from hintpipe.host.migration import MigrationConfig
    from hintpipe.report import format_replay
    from hintpipe.trace import TraceError, open_trace
    from hintpipe.trace.replay import replay

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
    except ValueError as e:  # ReplayUsageError included
        raise UsageError(str(e)) from None
    except TraceError as e:
        raise UsageError(f"error: {e}") from None
    if args.skip_bad and rep["trace"]["bad_lines_skipped"]:
        print(f"hintpipe: warning: skipped {rep['trace']['bad_lines_skipped']} bad trace lines", file=sys.stderr)
    print(json.dumps(rep) if args.json else format_replay(rep))
    return 0 if rep["migration"]["verified"] else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    """Summarise a recording or trace-v1 file."""
    from hintpipe.trace.commands import cmd_inspect as run

    return run(args.trace, as_json=args.json, samples=args.samples, skip_bad=args.skip_bad)


def cmd_record(args: argparse.Namespace) -> int:
    """Record this machine's page allocator (optionally while a command runs)."""
    from hintpipe.trace.commands import cmd_record as run

    return run(args.outdir, duration=args.duration, command=args.record_command or None)


def cmd_trace_convert(args: argparse.Namespace) -> int:
    """Write a trace-v1 file from a recording."""
    from hintpipe.trace.commands import cmd_convert as run

    return run(args.src, args.dst, skip_bad=args.skip_bad)
