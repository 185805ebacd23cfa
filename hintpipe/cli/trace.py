"""``hintpipe replay | inspect | record | trace convert``: real allocator traces."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys

from hintpipe.choices import POLICY_NAMES, policy_names
from hintpipe.cli.options import (
    NO_BASELINE_HELP, SEED_HELP, UsageError, add_link_options, add_migration_options, add_output_options, add_walker_options,
    command_parser, float_at_least, int_in, migration_config_from, show_progress,
)

__all__ = ["add_parsers", "cmd_replay", "cmd_inspect", "cmd_record", "cmd_trace_convert"]

TRACE_HELP = "a recording folder (as hintpipe record writes it) or a trace-v1 file (.hpt)"
SKIP_BAD_HELP = ("skip malformed or unknown trace lines (counted, with one warning) instead of "
                 "stopping at the first")
FORCE_HELP = "replace the output if it exists"
NO_CACHE_HELP = ("read a recording folder directly; by default its events are converted to trace-v1 once "
                 "and cached (beside it, or in $XDG_CACHE_HOME/hintpipe when the folder is read-only; "
                 "HINTPIPE_TRACE_CACHE=off or =FOLDER changes that)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``hintpipe replay``, ``inspect``, ``record`` and ``trace convert``."""
    r = command_parser(
        sub, "replay", help="replay a real allocator trace through hinting and a migration",
        description="The recorded kernel is the guest: its free pages at the start come from the "
                    "kpageflags snapshot,\nevery recorded allocation and free happens at its trace "
                    "time on a virtual clock while a hinting\npolicy tells the host about free memory "
                    "and the host migrates; the same trace is also migrated\nwithout hints (the none "
                    "policy) as the baseline. Policies run in parallel processes. Exit status 0\n"
                    "when every page holding guest data arrived intact under every policy.",
        example="  hintpipe replay examples/traces/numpy-churn --report replay.html\n"
                "  hintpipe replay mytrace.hpt --policy all\n"
                "  hintpipe replay mytrace.hpt --bandwidth 25 --json")
    r.add_argument("trace", metavar="TRACE", help=TRACE_HELP)
    add_walker_options(r, replay=True)
    w = r.add_argument_group("guest")
    w.add_argument("--write-rate", type=float_at_least(0), default=0.0, metavar="PAGES_PER_S",
                   help="extra writes to allocated pages per second of trace (default 0: allocations "
                        "are the only writes)")
    w.add_argument("--seed", type=int, default=None, help=SEED_HELP)
    add_link_options(r)
    w.add_argument("--policy", action="append", choices=(*POLICY_NAMES, "all"), metavar="NAME",
                   help="hinting policy to replay: hintpipe (default), page-reporting, balloon-hint, none, "
                        "or all; repeat to compare several (docs/policies.md)")
    w.add_argument("--jobs", type=int_in(1, 1024), default=None, metavar="N",
                   help="policies replayed at once, each in a worker process (default: one per usable core)")
    add_migration_options(r)
    add_output_options(r, charts=True)
    r.add_argument("--skip-bad", action="store_true", help=SKIP_BAD_HELP)
    r.add_argument("--no-baseline", action="store_true", help=NO_BASELINE_HELP)
    r.add_argument("--no-cache", action="store_true", help=NO_CACHE_HELP)
    r.set_defaults(func=cmd_replay)

    i = command_parser(
        sub, "inspect", help="summarise a trace: events by type and order, free memory over time",
        description="Counts the events of a recording or trace-v1 file by type and order, replays "
                    "them to show free\nmemory over time and compares the end state with the "
                    "recording's buddyinfo.end.",
        example="  hintpipe inspect examples/traces/numpy-churn --samples 20")
    i.add_argument("trace", metavar="TRACE", help=TRACE_HELP)
    i.add_argument("--samples", type=int_in(2, 100_000), default=50, metavar="N",
                   help="points of the free-memory-over-time series (default 50)")
    i.add_argument("--skip-bad", action="store_true", help=SKIP_BAD_HELP)
    i.add_argument("--no-cache", action="store_true", help=NO_CACHE_HELP)
    add_output_options(i, what="the summary")
    i.set_defaults(func=cmd_inspect)

    rec = command_parser(
        sub, "record", help="record this machine's page allocator (root, tracefs)",
        description="Enables the kernel's five kmem page events in a private tracing instance, drains "
                    "each CPU's\nbinary ring buffer into OUTDIR/raw (protocols/recording-v1.md), "
                    "snapshots /proc/kpageflags and\nbuddyinfo, until COMMAND exits, --duration "
                    "passes or Ctrl-C (whichever comes first; Ctrl-C is\nthe way to stop a "
                    "recording with neither). Says how many events the kernel lost: exit status 1\n"
                    "if any were. OUTDIR appears only once the recording is complete.",
        example="  sudo hintpipe record mytrace -- make -j2\n"
                "  sudo hintpipe record idle --duration 10 && hintpipe replay idle",
        usage="hintpipe record [-h] [--duration S] [--force] [--buffer-kb KB] [--global] [--checkpoints S] "
              "[--json] [-q] OUTDIR [-- COMMAND ...]")
    rec.add_argument("outdir", metavar="OUTDIR", help="folder to create (must not exist unless --force)")
    rec.add_argument("--duration", type=float_at_least(0, strict=True), default=None, metavar="S",
                     help="stop after S seconds (with `-- COMMAND ...`: at the latest)")
    rec.add_argument("--force", action="store_true", help=FORCE_HELP)
    rec.add_argument("--buffer-kb", type=int_in(64, 1 << 22), default=None, metavar="KB",
                     help="ring buffer per CPU while recording (default 65536, less if memory is short)")
    rec.add_argument("--global", dest="use_global", action="store_true",
                     help="record in the top-level tracing buffer (its settings are put back afterwards) "
                          "instead of a private tracing instance")
    rec.add_argument("--checkpoints", type=float_at_least(0, strict=True), default=None, metavar="S",
                     help="every S seconds, mark the trace and save /proc/buddyinfo, so prefixes of the "
                          "recording can be checked against the kernel (raw/checkpoints)")
    add_output_options(rec, what="the summary")
    rec.set_defaults(func=cmd_record)

    t = command_parser(sub, "trace", help="trace file utilities (trace convert)",
                       description="Subcommands: convert.",
                       example="  hintpipe trace convert mytrace mytrace.hpt")
    tsub = t.add_subparsers(dest="trace_command", required=True, metavar="SUBCOMMAND")
    c = command_parser(
        tsub, "convert", help="write hintpipe's trace-v1 format from a recording",
        description="Reads a recording folder (or a trace-v1 file) and writes the same events in "
                    "hintpipe's columnar\ntrace-v1 format (protocols/trace-v1.md): it replays "
                    "identically and parses several times\nfaster. DST appears only once it is "
                    "complete.",
        example="  hintpipe trace convert examples/traces/numpy-churn numpy-churn.hpt")
    c.add_argument("src", metavar="SRC", help=TRACE_HELP)
    c.add_argument("dst", metavar="DST", help="trace-v1 file to write (must not exist unless --force)")
    c.add_argument("--skip-bad", action="store_true", help=SKIP_BAD_HELP)
    c.add_argument("--force", action="store_true", help=FORCE_HELP)
    add_output_options(c, what="the summary")
    c.set_defaults(func=cmd_trace_convert)


def notices(args: argparse.Namespace):
    """Where library code's one-line notices go (the trace cache being made): ``hintpipe: ...``
    on stderr, or nowhere with ``--json`` or ``--quiet`` (as the progress bar)."""
    import sys

    if getattr(args, "json", False) or getattr(args, "quiet", False):
        return None

    def log(msg: str) -> None:
        print(f"hintpipe: {msg}", file=sys.stderr, flush=True)
    return log


def trace_error(e, skip_bad: bool) -> UsageError:
    """A TraceError as one sentence; a bad line suggests ``--skip-bad``."""
    text = str(e)
    if not skip_bad and getattr(e, "code", None) in ("malformed", "unknown-event", "lost-events", "pfn-range"):
        text += "; to skip such lines (counted), rerun with --skip-bad"
    return UsageError(text)


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay a trace through hinting and a migration; exit 0 when it verified."""
    from hintpipe.cli.checks import check_charts, write_charts
    from hintpipe.config import RunConfig

    kw = {k: v for k, v in (("min_order", args.min_order), ("batch", args.batch), ("race_mode", args.race_mode),
                            ("queue_size", args.queue_size), ("seed", args.seed)) if v is not None}
    try:
        cfg = RunConfig.for_replay(write_rate=args.write_rate, migration=migration_config_from(args),
                                   event_idx=not args.no_event_idx, baseline=not args.no_baseline, **kw)
        policies = policy_names(args.policy or ["hintpipe"])
    except ValueError as e:  # ReplayUsageError included
        raise UsageError(str(e)) from None
    check_charts(args)
    from hintpipe.progress import open_progress
    from hintpipe.report import format_policy_table, format_replay
    from hintpipe.trace import TraceError, open_trace
    from hintpipe.trace.replay import replay_outcomes

    try:
        trace = open_trace(args.trace, skip_bad=args.skip_bad, cache=not args.no_cache, log=notices(args))
        with open_progress(show_progress(args)) as progress:
            outs = replay_outcomes(trace, cfg, policies, jobs=args.jobs, progress=progress)
    except TraceError as e:
        raise trace_error(e, args.skip_bad) from None
    rep = outs[0].report
    if args.json:
        print(json.dumps(rep))
    elif len(policies) == 1:
        print(format_replay(rep))
    else:
        print(format_policy_table(rep))
    write_charts(args, outs)
    return 0 if all(p["verified"] for p in rep["policies"]) else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    """Summarise a recording or trace-v1 file."""
    from hintpipe.trace import TraceError
    from hintpipe.trace.summary import inspect, render_text

    try:
        info = inspect(args.trace, samples=args.samples, skip_bad=args.skip_bad, cache=not args.no_cache,
                       log=notices(args))
    except TraceError as e:
        raise trace_error(e, args.skip_bad) from None
    print(json.dumps(info) if args.json else render_text(info))
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """Record this machine's page allocator (optionally while a command runs)."""
    from hintpipe.cli.checks import check_output_path
    from hintpipe.progress import open_progress
    from hintpipe.trace.errors import RecordError
    from hintpipe.trace.record import record

    command = args.record_command or None
    if command and shutil.which(command[0]) is None:
        raise UsageError(f"cannot run {command[0]!r}: no such command (give its path or check its spelling)")
    check_output_path(args.outdir, "OUTDIR", folder=True, force=args.force)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        def on_term(signum, frame):  # a kill ends the recording as Ctrl-C does: settings are put back
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, on_term)
        with open_progress(show_progress(args)) as progress:
            s = record(args.outdir, duration=args.duration, command=command, replace=args.force,
                       progress=progress, buffer_kb=args.buffer_kb, use_instance=not args.use_global,
                       checkpoint_s=args.checkpoints or 0.0)
    except RecordError as e:
        raise UsageError(str(e)) from None
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if args.json:
        print(json.dumps(s))
    elif not args.quiet:
        how = " (stopped by Ctrl-C)" if s["interrupted"] else ""
        print(f"recorded {s['events']:,} events in {s['seconds']} s to {s['outdir']}{how}"
              + (f" (command exit status {s['returncode']})" if s["returncode"] is not None else "")
              + f"; {s['events_per_s']:,} events/s, peak {s['peak_events_per_s']:,}/s; {s['lost_events']:,} events lost")
    if s["restore_failed"]:
        print(f"hintpipe: warning: could not put back tracing settings: {'; '.join(s['restore_failed'])}",
              file=sys.stderr)
    lost = max(s["lost_events"], s["lost_in_pages"])
    if lost:
        print(f"hintpipe: the kernel lost {lost:,} events (a ring buffer overran), so the recording is "
              "incomplete; record again with a larger --buffer-kb or on a less busy machine", file=sys.stderr)
        return 1
    if s["undecoded"]:
        print(f"hintpipe: {s['undecoded']:,} of the {s['kernel_read_events']:,} records the kernel handed out "
              "did not decode, so the recording is incomplete", file=sys.stderr)
        return 1
    # Ctrl-C is how a recording without --duration or COMMAND ends; otherwise it cut it short
    return 130 if s["interrupted"] and (command or args.duration) else 0


def cmd_trace_convert(args: argparse.Namespace) -> int:
    """Write a trace-v1 file from a recording."""
    import time

    from hintpipe.cli.checks import check_output_path
    from hintpipe.progress import open_progress
    from hintpipe.trace import TraceError
    from hintpipe.trace.recording import convert

    check_output_path(args.dst, "DST", force=args.force)
    t0 = time.perf_counter()
    try:
        with open_progress(show_progress(args)) as progress:
            s = convert(args.src, args.dst, skip_bad=args.skip_bad, progress=progress)
    except TraceError as e:
        raise trace_error(e, args.skip_bad) from None
    s = {"dst": args.dst, **s, "seconds": round(time.perf_counter() - t0, 3)}
    if args.json:
        print(json.dumps(s))
    else:
        print(f"wrote {args.dst}: {s['events']:,} events, {s['page_count']:,} pages, {s['bytes']:,} bytes "
              f"in {s['seconds']:.2f} s")
    return 0
