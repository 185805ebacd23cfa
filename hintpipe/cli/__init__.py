"""Command line: ``hintpipe demo | replay | inspect | record | trace convert | guest | host``.

One module per command family: :mod:`~hintpipe.cli.demo`, :mod:`~hintpipe.cli.paired` (guest and
host processes) and :mod:`~hintpipe.cli.trace` (replay, inspect, record, trace convert), on the
shared options of :mod:`~hintpipe.cli.options`. argparse (standard library) rather than click:
the commands are few and flat, and one fewer dependency is one fewer thing to pin.

Building the parser imports neither numpy nor trio (each command imports what it runs), so
``hintpipe --help`` and ``hintpipe --version`` answer at once. Every user error ends as one
sentence on stderr and exit status 2, a failed run as exit status 1, Ctrl-C as ``hintpipe:
interrupted`` and exit status 130; no traceback reaches the user (``HINTPIPE_DEBUG=1`` shows the
traceback of an internal error).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from hintpipe.cli import demo, paired, trace
from hintpipe.cli.options import CommandFailed, UsageError, version_text

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Free page hinting for live migration: a guest reports its free memory to the host, which then
skips those pages when it copies the guest's RAM. Every run ends with a check of every allocated
page at the destination.

first steps:
  hintpipe demo                                 migrate a simulated 4 GiB guest, with and without hinting
  hintpipe replay examples/traces/numpy-churn   replay a real allocator recording
  hintpipe COMMAND --help                       what a command does, its options and an example
"""


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line: what is wrong and where to read more."""

    def error(self, message: str):
        message = message[len("argument "):] if message.startswith("argument ") else message
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (each command family registers its subcommands)."""
    p = Parser(prog="hintpipe", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=version_text(),
                   help="print hintpipe's version (and Python's, trio's, numpy's) and exit")
    sub = p.add_subparsers(dest="subcommand", required=True, metavar="COMMAND", title="commands")
    demo.add_parser(sub)
    trace.add_parsers(sub)
    paired.add_parsers(sub)
    return p


def interrupted(exc: BaseException) -> bool:
    """True for Ctrl-C, also when trio delivers it inside an exception group."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    return isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning (e.g. lines skipped by --skip-bad) as one line, without source code."""
    print(f"hintpipe: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hintpipe`` console script."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    full_argv = list(argv)
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
    args.argv = full_argv
    args.parser = args.command_parser  # each subcommand's own parser, for its usage errors
    try:
        return args.func(args)
    except UsageError as e:
        print(f"hintpipe: {e}", file=sys.stderr)
        return 2
    except CommandFailed as e:
        print(f"hintpipe: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `hintpipe ... | head`: the reader left, nothing more to say
        sys.stderr.close()
        return 0
    except BaseException as e:
        if interrupted(e):
            print("hintpipe: interrupted", file=sys.stderr)
            return 130
        if isinstance(e, (SystemExit, GeneratorExit)) or not isinstance(e, Exception) or os.environ.get("HINTPIPE_DEBUG"):
            raise
        print(f"hintpipe: internal error: {type(e).__name__}: {e} (set HINTPIPE_DEBUG=1 for the traceback, "
              "and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
