"""``hintpipe demo``: one simulated VM migrated in one process, with and without hinting."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from hintpipe.choices import MEMORY_KINDS, WP_CHOICES
from hintpipe.cli.options import (
    NO_BASELINE_HELP, RECLAIM_FOR_HELP, RECLAIM_HELP, CommandFailed, add_backing_options, UsageError, add_break_option, add_guest_options, add_link_options, add_migration_options,
    add_output_options, add_walker_options, command_parser, float_at_least, run_config_from, show_progress,
)

__all__ = ["add_parser", "cmd_demo"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``hintpipe demo``."""
    d = command_parser(
        sub, "demo", help="migrate a simulated VM in one process, with and without hinting",
        description="The guest (buddy allocator, workload, free-list walker) and the host (skip bitmap, "
                    "write-protect,\nmigration over a modelled link) run in one process on a virtual "
                    "clock; the same seeded guest\nis migrated once more without hinting as the "
                    "baseline. Exit status 0 when every allocated page\narrived intact, 1 when the "
                    "check found a lost page.",
        example="  hintpipe demo --size 1G --workload idle --report demo.html\n"
                "  hintpipe demo --memory real --wp uffd-async --size 1G --json")
    add_guest_options(d)
    add_walker_options(d)
    add_link_options(d)
    add_migration_options(d)
    m = d.add_argument_group("memory")
    m.add_argument("--memory", choices=MEMORY_KINDS, default="sim",
                   help="sim: page versions only (default); real: guest RAM is a memfd of --size, "
                        "checked byte for byte (needs about 3x --size of free memory)")
    m.add_argument("--wp", choices=WP_CHOICES, default="auto",
                   help="write tracking: auto (default: best that works, uffd-async > uffd > sim; "
                        "always sim with --memory sim), sim (simulated faults), uffd (sync "
                        "userfaultfd), uffd-async (WP_ASYNC + PAGEMAP_SCAN), off (none: loses pages)")
    m.add_argument("--reclaim", action="store_true", help=RECLAIM_HELP)
    m.add_argument("--reclaim-for", type=float_at_least(0), default=0.0, metavar="S", help=RECLAIM_FOR_HELP)
    add_backing_options(m)
    add_output_options(d, charts=True)
    d.add_argument("--no-baseline", action="store_true", help=NO_BASELINE_HELP)
    add_break_option(d)
    d.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; print its report (text or JSON); exit 0 when the migration verified (never
    with ``--break``)."""
    from hintpipe.cli.checks import check_charts, check_memory, write_charts

    try:
        cfg = replace(run_config_from(args), memory=args.memory, wp=args.wp, baseline=not args.no_baseline,
                      broken=frozenset(args.break_guards), reclaim=args.reclaim, backing=args.backing,
                      reclaim_for_s=args.reclaim_for)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_charts(args)  # before any work: matplotlib there, --report and --plot writable
    check_memory(cfg, what="demo")
    from hintpipe.cli.checks import huge_pages
    with huge_pages(cfg, reserve=args.reserve_huge_pages):
        return _run_demo(args, cfg)


def _run_demo(args: argparse.Namespace, cfg) -> int:
    from hintpipe.cli.checks import write_charts
    from hintpipe.inprocess import demo_outcome
    from hintpipe.progress import open_progress
    from hintpipe.report import format_summary
    from hintpipe.wp import UffdUnavailable, resolve_backend

    try:
        if "scan-before-send" in cfg.broken:  # only uffd-async scans: resolve --wp auto first
            cfg = replace(cfg, wp=resolve_backend(cfg.wp, cfg.memory))
            if cfg.wp != "uffd-async":
                raise UsageError(f"the scan-before-send guard exists only with --wp uffd-async "
                                 f"(--wp auto picked {cfg.wp} here)")
        if cfg.reclaim:  # refused combinations: one sentence before any memory is touched
            from hintpipe.host.reclaim import reclaim_refusal

            wp = "uffd" if cfg.wp == "auto" and cfg.memory == "real" and cfg.race_mode == "detect" else cfg.wp
            cfg = replace(cfg, wp=resolve_backend(wp, cfg.memory))
            if why := reclaim_refusal(memory=cfg.memory, wp=cfg.wp, race_mode=cfg.race_mode):
                raise UsageError(why)
        with open_progress(show_progress(args)) as progress:
            out = demo_outcome(cfg, progress=progress)
    except UffdUnavailable as e:  # asked for by name and missing here: say what, never fall back
        raise UsageError(e.reason) from None
    except MemoryError:
        raise CommandFailed(f"ran out of memory migrating a {args.size} guest; choose a smaller --size") from None
    rep = out.report
    print(json.dumps(rep) if args.json else format_summary(rep))
    write_charts(args, [out])
    return 0 if rep["migration"]["verified"] else 1
