"""What every command line shares: option groups, checked values, the run configuration, errors.

Options mean the same in every command that takes them. Who decides an option given to both
paired processes: the guest decides its own size, workload, walker and link (``--size``,
``--workload``, ``--seed``, ``--ops-per-s``, ``--writes-per-s``, ``--history``, ``--batch``,
``--min-order``, ``--race-mode``, ``--queue-size``, ``--no-event-idx``, ``--memory``, ``--wp``); the
host decides the migration (``--bandwidth``, ``--max-rounds``, ``--downtime-ms``). Either process
still accepts the other side's options, so one list of options can be given to both, but says once
that it ignores them.

Nothing here imports numpy or trio at module level: building the parser stays fast.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import replace
from importlib import metadata

from hintpipe import __version__
from hintpipe.choices import BACKINGS, GUARDS, MEMORY_KINDS, RACE_MODES, WORKLOADS, WP_CHOICES

__all__ = ["UsageError", "CommandFailed", "version_text", "command_parser", "parse_size", "int_in",
           "float_at_least", "add_guest_options", "add_walker_options", "add_link_options",
           "add_migration_options", "add_output_options", "SEED_HELP", "NO_BASELINE_HELP", "RECLAIM_HELP", "RECLAIM_FOR_HELP", "add_backing_options", "add_memory_options", "warn_other_side",
           "run_config_from", "paired_config", "address_from", "secret_from", "show_progress", "add_break_option",
           "GUEST_DECIDES", "HOST_DECIDES"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
MIN_GUEST_BYTES = 4 << 20
SEED_HELP = "seed of the guest's random choices (default 1): same seed, same run"
NO_BASELINE_HELP = "skip the second run, without hinting, that the figures are compared with"
RECLAIM_HELP = ("discard hinted free pages from the guest's RAM memfd while it runs, so the host's memory "
                "use drops; needs --memory real, refused with --wp off and with --wp uffd-async unless "
                "the guest isolates hinted blocks (README: Reclaim)")
RECLAIM_FOR_HELP = ("with --reclaim: before migrating, reclaim for S seconds of the guest's time through "
                    "hinting rounds of the host's own while the guest runs (default 0: only during the migration)")
BACKING_HELP = ("what backs real guest RAM: shmem (4 KiB pages, default), hugetlb (2 MiB pages from "
                "/proc/sys/vm/nr_hugepages), thp (shmem with transparent huge pages, where the kernel "
                "allows them)")
RESERVE_HELP = ("with --backing hugetlb: reserve the huge pages the guest needs for this run (as root) "
                "and put nr_hugepages back afterwards")


def add_backing_options(g) -> None:
    """``--backing`` and ``--reserve-huge-pages`` (the side that creates guest RAM)."""
    g.add_argument("--backing", choices=BACKINGS, default="shmem", help=BACKING_HELP)
    g.add_argument("--reserve-huge-pages", action="store_true", help=RESERVE_HELP)


class UsageError(Exception):
    """A user-facing error: printed as one sentence, exit status 2."""


class CommandFailed(Exception):
    """A command that could not do its work (not a usage mistake): one sentence, exit status 1."""


def version_text() -> str:
    """``hintpipe --version``: hintpipe's version and those of what it runs on."""
    def v(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"
    py = ".".join(map(str, sys.version_info[:3]))
    return f"hintpipe {__version__} (Python {py}, trio {v('trio')}, numpy {v('numpy')}, {os.uname().sysname} {os.uname().release})"


def command_parser(sub: argparse._SubParsersAction, name: str, *, help: str, description: str,
                   example: str, usage: str | None = None) -> argparse.ArgumentParser:
    """A subcommand's parser: one line for ``hintpipe --help``, a description and an example for
    its own ``--help``."""
    p = sub.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}.\n\n{description}",
                       epilog=f"example:\n{example}", usage=usage,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(command_parser=p)
    return p


# ---- checked values: a bad one is an argparse error naming the flag, before any work -----------

def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``1T`` or a plain byte count -> number of 4 KiB pages (4 MiB at least,
    the guest size limit at most)."""
    from hintpipe.units import MAX_PAGE_COUNT, PAGE_SIZE

    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4G, 512M, 1T)")
    nbytes = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if nbytes < MIN_GUEST_BYTES:
        raise argparse.ArgumentTypeError(f"{text!r} is below the 4M minimum")
    pages = nbytes // PAGE_SIZE
    if pages > MAX_PAGE_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r} is above the {MAX_PAGE_COUNT * PAGE_SIZE >> 50}P maximum")
    return pages


def int_in(lo: int, hi=None):
    """An argparse type: an integer in ``lo..hi`` (``hi`` may be a function, called when parsing,
    so a limit defined beside numpy code is read only when the option is given)."""
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        top = hi() if callable(hi) else hi
        if value < lo or (top is not None and value > top):
            raise argparse.ArgumentTypeError(
                f"must be {'at least ' + str(lo) if top is None else f'in {lo}..{top}'}, got {value}")
        return value
    return check


def float_at_least(lo: float, *, strict: bool = False):
    """An argparse type: a number ``>= lo`` (``> lo`` with ``strict``)."""
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value != value or value < lo or (strict and value == lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lo:g}, got {text}")
        return value
    return check


def _max_batch() -> int:
    from hintpipe.protocol import MAX_RANGES_PER_BATCH

    return MAX_RANGES_PER_BATCH


def _max_order() -> int:
    from hintpipe.units import MAX_ORDER

    return MAX_ORDER


def _fraction(text: str) -> float:
    value = float_at_least(0)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in 0..1, got {text}")
    return value


def _power_of_two(text: str) -> int:
    value = int_in(1, 1 << 15)(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
    return value


# ---- option groups ---------------------------------------------------------------------------

GUEST_DECIDES = ("size", "workload", "seed", "ops_per_s", "writes_per_s", "history", "batch", "min_order",
                 "race_mode", "queue_size", "no_event_idx")
"""Options of the guest (given to ``hintpipe host`` they are ignored: the guest decides them)."""
HOST_DECIDES = ("bandwidth", "max_rounds", "downtime_ms")
"""Options of the migration (given to ``hintpipe guest`` they are ignored: the host decides them)."""


def _adder(p: argparse.ArgumentParser, title: str, hidden: bool):
    """``add(flag, help=..., **kw)`` for one option group. Every default is None: the
    configuration classes hold the defaults. Hidden options (the other side's, see the module
    doc) are stored as ``ignored_NAME`` and left out of ``--help``."""
    g = p if hidden else p.add_argument_group(title)

    def add(flag: str, *, help: str, **kw) -> None:
        if hidden:
            kw["dest"] = "ignored_" + flag[2:].replace("-", "_")
            help = argparse.SUPPRESS
        if kw.get("action") != "store_true":
            kw.setdefault("default", None)
        g.add_argument(flag, help=help, **kw)
    return add


def add_guest_options(p: argparse.ArgumentParser, *, hidden: bool = False) -> None:
    """The simulated guest: size and workload (``hidden``: accepted but ignored, see module doc)."""
    add = _adder(p, "guest (decided by the guest)", hidden)
    add("--size", type=parse_size, metavar="SIZE", help="guest RAM: 4G (default), 512M, 1T ... (4 KiB pages)")
    add("--workload", choices=WORKLOADS,
        help="churn: allocations, frees and rewrites (default); idle: resident memory and a trickle of writes; "
             "race: churn plus a guest that aims at hinting's races on purpose (README: Races and guards)")
    add("--seed", type=int, help=SEED_HELP)
    add("--ops-per-s", type=float_at_least(0), metavar="N",
        help="churn: allocations + frees per second of guest time (default 10000)")
    add("--writes-per-s", type=float_at_least(0), metavar="N",
        help="page rewrites per second of guest time (default 40000; idle 2000)")
    add("--history", type=_fraction, metavar="F",
        help="share of the pages free at migration start that hold old data: 1 (default) a guest "
             "that has run a while, 0 a freshly booted one (its free pages are zero)")


def add_walker_options(p: argparse.ArgumentParser, *, replay: bool = False, hidden: bool = False) -> None:
    """The guest's free-list walker: ``--batch``, ``--min-order``, ``--race-mode``."""
    add = _adder(p, "hinting (decided by the guest)", hidden)
    add("--batch", type=int_in(1, _max_batch), metavar="N",
        help="most free blocks reported per zone-lock hold (default 32)")
    add("--min-order", type=int_in(0, _max_order), metavar="K",
        help="smallest block hinted: 2^K pages (default 9 = 2 MiB)")
    add("--race-mode", choices=("detect",) if replay else RACE_MODES,
        help="detect only: the recorded kernel decided every allocation, so blocks cannot be isolated "
             "from it" if replay else
             "detect: hinted blocks stay allocatable, write-protect catches their reuse (default); "
             "isolate: they leave the free lists until the host acks them")


def add_link_options(p: argparse.ArgumentParser, *, hidden: bool = False) -> None:
    """The virtqueue between guest and host."""
    add = _adder(p, "link (decided by the guest)", hidden)
    add("--queue-size", type=_power_of_two, metavar="N", help="virtqueue descriptors, a power of two (default 256)")
    add("--no-event-idx", action="store_true", help="notify on every buffer (no EVENT_IDX suppression)")


def add_migration_options(p: argparse.ArgumentParser, *, hidden: bool = False) -> None:
    """The migration: link speed, rounds, downtime target."""
    add = _adder(p, "migration (decided by the host)", hidden)
    add("--bandwidth", type=float_at_least(0, strict=True), metavar="GBIT", help="link speed in Gbit/s (default 10)")
    add("--max-rounds", type=int_in(1), metavar="N", help="most pre-copy rounds before stop-and-copy (default 30)")
    add("--downtime-ms", type=float_at_least(0), metavar="MS",
        help="stop and copy the rest once it fits in MS of link time (default 300)")


def add_output_options(p: argparse.ArgumentParser, *, what: str = "the report", charts: bool = False) -> None:
    """``--json``, ``--quiet`` and (with ``charts``) ``--report`` and ``--plot``."""
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help=f"print {what} as one JSON object on one line (no progress bar)")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar (there is none anyway when stderr is not a terminal)")
    if charts:
        g.add_argument("--report", metavar="FILE.html", default=None,
                       help="also write one self-contained HTML page with charts and the summary "
                            "(needs matplotlib: pip install 'hintpipe[plot]')")
        g.add_argument("--plot", metavar="DIR", default=None,
                       help="also write the report's charts as PNG files into DIR (needs matplotlib)")


def add_memory_options(p: argparse.ArgumentParser, *, host: bool) -> None:
    """``--memory`` and ``--wp`` for paired processes."""
    g = p.add_argument_group("memory" + ("" if host else " (decided by the guest)"))
    g.add_argument("--memory", choices=MEMORY_KINDS, default="sim",
                   help="sim: page versions only (default); real: guest RAM is a memfd of --size shared "
                        "with the host (unix: and shm: only), checked byte for byte")
    g.add_argument("--wp", choices=WP_CHOICES, default="auto",
                   help=("write tracking the guest must use: auto (default) accepts the guest's choice, "
                         "anything else must match it" if host else
                         "write tracking: auto (default: best that works, uffd-async > uffd > sim; "
                         "always sim with --memory sim), sim (faults over the link), uffd (sync "
                         "userfaultfd, the host handles faults), uffd-async (WP_ASYNC + PAGEMAP_SCAN by "
                         "the host), off (none: loses pages)"))
    if not host:
        add_backing_options(g)


def warn_other_side(args: argparse.Namespace, names: tuple[str, ...], *, me: str, decider: str) -> None:
    """One line on stderr for options this process accepts but the other side decides."""
    given = ["--" + n.replace("_", "-") for n in names if getattr(args, "ignored_" + n, None) not in (None, False)]
    if given:
        one = len(given) == 1
        print(f"hintpipe {me}: {', '.join(given)} {'is' if one else 'are'} decided by the {decider}; ignored "
              f"here (give {'it' if one else 'them'} to hintpipe {decider})", file=sys.stderr)


def show_progress(args: argparse.Namespace) -> bool:
    """Whether a live progress bar is wanted: a terminal on stderr, and neither --json nor --quiet."""
    return not getattr(args, "json", False) and not getattr(args, "quiet", False) and sys.stderr.isatty()


# ---- from options to configuration -----------------------------------------------------------

def _given(args: argparse.Namespace, **names: str) -> dict:
    """``{field: value}`` of the options given (``names``: field -> option dest)."""
    return {f: getattr(args, d) for f, d in names.items() if getattr(args, d, None) is not None}


def add_break_option(p: argparse.ArgumentParser) -> None:
    """``--break GUARD`` (repeatable): the host's guards only; a demonstration, never a setting."""
    p.add_argument("--break", dest="break_guards", action="append", choices=tuple(GUARDS), default=[],
                   metavar="GUARD",
                   help="DEMONSTRATION ONLY: turn off one of the host's safety guards (" + ", ".join(GUARDS)
                        + "; repeatable) to show that the final check catches what it protects against; "
                        "such a run is never verified and exits 1")


def run_config_from(args: argparse.Namespace):
    """Build a :class:`~hintpipe.config.RunConfig` from the guest, walker, link and migration
    options this command has (options not given keep the configuration's defaults; UsageError
    on a combination that cannot run)."""
    from hintpipe.config import RunConfig
    from hintpipe.guest.workload import WorkloadConfig

    wkw = _given(args, seed="seed", ops_per_s="ops_per_s", write_pages_per_s="writes_per_s", history="history")
    kw = _given(args, pages="size", batch="batch", min_order="min_order", race_mode="race_mode",
                queue_size="queue_size")
    if getattr(args, "no_event_idx", False):
        kw["event_idx"] = False
    try:
        kind = getattr(args, "workload", None) or "churn"
        wl = WorkloadConfig.idle(**wkw) if kind == "idle" else WorkloadConfig(kind=kind, **wkw)
        return RunConfig(workload=wl, migration=migration_config_from(args), **kw)
    except ValueError as e:
        raise UsageError(str(e)) from None


def migration_config_from(args: argparse.Namespace):
    """The :class:`~hintpipe.host.migration.MigrationConfig` of ``--bandwidth``, ``--max-rounds``
    and ``--downtime-ms`` (defaults for those not given)."""
    from hintpipe.host.migration import MigrationConfig

    return MigrationConfig(**_given(args, bandwidth_gbit="bandwidth", max_rounds="max_rounds",
                                    downtime_ms="downtime_ms"))


def paired_config(args: argparse.Namespace, *, guest: bool):
    """The guest's or host's RunConfig with ``--memory``/``--wp`` checked (UsageError otherwise).

    The guest resolves ``--wp`` (``auto``: the best backend its kernel offers; a backend named but
    unavailable: one sentence, exit 2). The host probes a named real backend the same way but keeps
    ``auto``, which accepts whatever the guest chose (protocols/wire-v1.md section 11.5). Options
    the other side decides keep their defaults here.
    """
    from hintpipe.paired.handoff import TCP_REFUSAL
    from hintpipe.wp import UffdUnavailable, resolve_backend

    addr = address_from(args.connect if guest else args.listen)
    if args.memory == "real" and addr.kind == "tcp":
        raise UsageError(TCP_REFUSAL)
    try:
        wp = resolve_backend(args.wp, args.memory) if guest or args.wp != "auto" else args.wp
        # --break is the host's alone (the guest has no such option: it cannot turn a guard off)
        broken = frozenset(() if guest else args.break_guards)
        return replace(run_config_from(args), memory=args.memory, wp=wp, broken=broken,
                       reclaim=not guest and getattr(args, "reclaim", False),
                       reclaim_for_s=0.0 if guest else getattr(args, "reclaim_for", 0.0),
                       backing=getattr(args, "backing", "shmem"))
    except UffdUnavailable as e:
        raise UsageError(e.reason) from None
    except ValueError as e:
        raise UsageError(str(e)) from None


def secret_from(args: argparse.Namespace) -> bytes | None:
    """``--secret`` (or ``$HINTPIPE_SECRET``) as bytes, None when unset."""
    text = args.secret if args.secret is not None else os.environ.get("HINTPIPE_SECRET")
    if text is not None and len(text) < 8:
        raise UsageError("--secret must be at least 8 characters")
    return None if text is None else text.encode()


def address_from(text: str):
    """A ``unix:``/``tcp:``/``shm:`` address, or UsageError with the parser's sentence."""
    from hintpipe.channel.address import AddressError, parse_address

    try:
        return parse_address(text)
    except AddressError as e:
        raise UsageError(str(e)) from None
