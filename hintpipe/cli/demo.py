"""``hintpipe demo``: one simulated VM migrated in one process, with and without hinting."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from hintpipe.cli.options import UsageError, add_guest_options, add_migration_options, run_config_from
from hintpipe.config import MEMORY_KINDS
from hintpipe.wp import WP_CHOICES

__all__ = ["add_parser", "cmd_demo"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``hintpipe demo``."""
    d = sub.add_parser("demo", help="migrate a simulated VM in one process, with and without hinting")
    add_guest_options(d)
    add_migration_options(d)
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.add_argument("--no-baseline", action="store_true", help="skip the migration without hinting")
    d.add_argument("--memory", choices=MEMORY_KINDS, default="sim",
                   help="sim: page versions only (default); real: guest RAM is a memfd of --size, "
                        "checked byte for byte")
    d.add_argument("--wp", choices=WP_CHOICES, default="auto",
                   help="write tracking: auto (default: best that works, uffd-async > uffd > sim; "
                        "always sim with --memory sim), sim (simulated faults), uffd (sync "
                        "userfaultfd), uffd-async (WP_ASYNC + PAGEMAP_SCAN), off (none: loses pages)")
    d.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; print its report (text or JSON); exit 0 when the migration verified."""
    from hintpipe.inprocess import run_demo
    from hintpipe.report import format_summary
    from hintpipe.wp import UffdUnavailable

    try:
        cfg = replace(run_config_from(args), memory=args.memory, wp=args.wp, baseline=not args.no_baseline)
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
