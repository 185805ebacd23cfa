"""What every command line shares: option groups, sizes, addresses, the run configuration, and
:class:`UsageError` (one sentence on stderr, exit status 2)."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import replace

from hintpipe.channel.address import Address, AddressError, parse_address
from hintpipe.config import RACE_MODES, RunConfig
from hintpipe.guest.workload import WorkloadConfig
from hintpipe.host.migration import MigrationConfig
from hintpipe.units import PAGE_SIZE

__all__ = ["UsageError", "parse_size", "add_guest_options", "add_migration_options",
           "add_memory_options", "run_config_from", "paired_config", "address_from", "secret_from"]

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
    g.add_argument("--race-mode", choices=RACE_MODES, default="detect",
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


def add_memory_options(p: argparse.ArgumentParser, *, host: bool) -> None:
    """``--memory`` and ``--wp`` for paired processes."""
    from hintpipe.config import MEMORY_KINDS
    from hintpipe.wp import WP_CHOICES

    g = p.add_argument_group("memory")
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


def run_config_from(args: argparse.Namespace) -> RunConfig:
    """Build a :class:`RunConfig` from the guest and migration options (UsageError on bad ones)."""
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


def paired_config(args: argparse.Namespace, *, guest: bool) -> RunConfig:
    """The guest's or host's RunConfig with ``--memory``/``--wp`` checked (UsageError otherwise).

    The guest resolves ``--wp`` (``auto``: the best backend its kernel offers; a backend named but
    unavailable: one sentence, exit 2). The host probes a named real backend the same way but keeps
    ``auto``, which accepts whatever the guest chose (protocols/wire-v1.md section 11.5).
    """
    from hintpipe.paired.handoff import TCP_REFUSAL
    from hintpipe.wp import UffdUnavailable, resolve_backend

    addr = address_from(args.connect if guest else args.listen)
    if args.memory == "real" and addr.kind == "tcp":
        raise UsageError(TCP_REFUSAL)
    try:
        wp = resolve_backend(args.wp, args.memory) if guest or args.wp != "auto" else args.wp
        return replace(run_config_from(args), memory=args.memory, wp=wp)
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


def address_from(text: str) -> Address:
    """A ``unix:``/``tcp:``/``shm:`` address, or UsageError with the parser's sentence."""
    try:
        return parse_address(text)
    except AddressError as e:
        raise UsageError(str(e)) from None
