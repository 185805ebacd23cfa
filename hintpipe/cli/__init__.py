"""Command line: ``hintpipe demo | guest | host | replay | record | inspect | trace``.

One module per command family: :mod:`~hintpipe.cli.demo`, :mod:`~hintpipe.cli.paired` (guest and
host processes) and :mod:`~hintpipe.cli.trace` (replay, inspect, record, trace convert), on the
shared options of :mod:`~hintpipe.cli.options`. argparse (standard library) rather than click:
the commands are few and flat, and one fewer dependency is one fewer thing to pin. Every user
error ends as one sentence on stderr and exit code 2; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import sys

from hintpipe.cli import demo, paired, trace
from hintpipe.cli.options import UsageError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (each command family registers its subcommands)."""
    p = argparse.ArgumentParser(prog="hintpipe", description="Free page hinting for live migration.")
    sub = p.add_subparsers(dest="subcommand", required=True)
    demo.add_parser(sub)
    trace.add_parsers(sub)
    paired.add_parsers(sub)
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
