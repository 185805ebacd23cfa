"""Checks a command makes before any work starts, and the writing of its charts afterwards.

Memory: a run that cannot fit is refused with the size it needs, what the machine has and the
largest ``--size`` that would fit, instead of being killed by the kernel's OOM killer minutes
later. The needs are measured (README, "Real memory and real write-protect"): peak drop of
MemAvailable over a whole ``hintpipe demo``, both migrations, on the development machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from pathlib import Path

from hintpipe.cli.options import UsageError

__all__ = ["huge_pages", "MEMORY_NEEDS", "memory_needed", "mem_available", "check_memory", "check_output_path",
           "check_charts", "write_charts"]

MEMORY_NEEDS = {
    # (bytes per guest byte, fixed bytes), from the peak drop of MemAvailable measured here:
    # demo --memory real 1G/2G/4G: 2.5/3.7/7.9 GiB (guest memfd + destination copy + temporaries)
    ("demo", "real"): (2.0, 768 << 20),
    # demo --memory sim 16G/64G/256G: 0.29/0.52/2.4 GiB (about 40 bytes per 4 KiB page, both runs)
    ("demo", "sim"): (0.01, 256 << 20),
    # guest --memory real 1G with its host on the same machine: 3.1 GiB together; the guest's own
    # share is its RAM memfd (the host's destination copy is the host's)
    ("guest", "real"): (1.2, 256 << 20),
    ("guest", "sim"): (0.01, 256 << 20),
}
"""What a run needs: ``factor * guest bytes + fixed``, by command and ``--memory``."""


def memory_needed(what: str, memory: str, guest_bytes: int) -> int:
    """Bytes of memory a ``what`` run (demo, guest) of ``guest_bytes`` needs at its peak."""
    factor, fixed = MEMORY_NEEDS[(what, memory)]
    return int(factor * guest_bytes + fixed)


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size(nbytes: float) -> str:
    for unit, scale in (("T", 2**40), ("G", 2**30), ("M", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f}{unit}"
    return f"{nbytes / 2**20:.2f}M"


def check_memory(cfg, *, what: str, available: int | None = None) -> None:
    """UsageError, naming ``--size``, when ``cfg``'s guest would not fit in the memory available."""
    from hintpipe.units import PAGE_SIZE

    available = mem_available() if available is None else available
    if available is None:
        return
    guest = cfg.pages * PAGE_SIZE
    need = memory_needed(what, cfg.memory, guest)
    if need <= available:
        return
    factor, fixed = MEMORY_NEEDS[(what, cfg.memory)]
    fits = max(0.0, (available - fixed) / factor)
    hint = f"at most --size {_size(fits)} fits now" if fits >= 4 << 20 else "free some memory first"
    raise UsageError(f"--size {_size(guest)} with --memory {cfg.memory} needs about {_size(need)} of memory "
                     f"but this machine has {_size(available)} available; {hint}")


@contextlib.contextmanager
def huge_pages(cfg, *, reserve: bool = False):
    """Around a run: ``--backing thp`` refused with a sentence where the kernel gives shmem no huge
    pages; ``--backing hugetlb`` refused, naming how many huge pages to reserve, when too few are
    free, unless ``reserve`` (``--reserve-huge-pages``): then the missing ones are reserved for the
    run and ``nr_hugepages`` is put back afterwards."""
    from hintpipe.linux.backing import NR_HUGEPAGES, huge_pages_needed, hugetlb_pool, reserve_huge_pages, thp_unavailable
    from hintpipe.units import PAGE_SIZE

    if cfg.backing == "thp" and (why := thp_unavailable()):
        raise UsageError(why)
    if cfg.backing != "hugetlb":
        if reserve:
            raise UsageError("--reserve-huge-pages applies to --backing hugetlb only")
        yield
        return
    need = huge_pages_needed(cfg.pages * PAGE_SIZE)
    pool = hugetlb_pool()
    short = need - pool["available"]
    if short <= 0:
        yield
        return
    if not reserve:
        raise UsageError(f"--backing hugetlb needs {need} free 2M huge pages for this guest but {pool['available']} "
                         f"are free; reserve them as root with `echo {pool['total'] + short} > {NR_HUGEPAGES}` "
                         "(and put the old value back afterwards), or add --reserve-huge-pages")
    try:
        ctx = reserve_huge_pages(short)
        ctx.__enter__()
    except PermissionError:
        raise UsageError(f"--reserve-huge-pages needs root to write {NR_HUGEPAGES}") from None
    except OSError as e:
        raise UsageError(f"could not reserve {short} huge pages: {e}") from None
    try:
        yield
    finally:
        ctx.__exit__(None, None, None)


def check_output_path(path: str, flag: str, *, folder: bool = False, force: bool = False,
                      append: bool = False) -> None:
    """UsageError unless ``path`` can be written: its folder exists and is writable, it is not a
    folder (or, with ``folder``, a file), and it does not exist unless ``force`` or ``append``."""
    p = Path(path)
    parent = p.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {flag} {path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {flag} {path}: the folder {parent} is not writable")
    if p.is_dir() and not folder:
        raise UsageError(f"cannot write {flag} {path}: it is a folder; give a file name")
    if p.exists() and folder and not p.is_dir():
        raise UsageError(f"cannot write {flag} {path}: a file of that name exists")
    if p.exists() and not force and not append and not (folder and p.is_dir() and not any(p.iterdir())):
        raise UsageError(f"{flag} {path} exists; choose another name or add --force to replace it")
    if append and p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"cannot write {flag} {path}: permission denied")


def check_charts(args: argparse.Namespace) -> None:
    """Before any work: ``--report``/``--plot`` need matplotlib and somewhere to write."""
    flags = [f for f, v in (("--report", args.report), ("--plot", args.plot)) if v]
    if not flags:
        return
    from hintpipe.charts import ChartsUnavailable, require_matplotlib

    try:
        require_matplotlib(" and ".join(flags))
    except ChartsUnavailable as e:
        raise UsageError(str(e)) from None
    if args.report:
        check_output_path(args.report, "--report", force=True)
    if args.plot:
        check_output_path(args.plot, "--plot", folder=True, force=True)


def write_charts(args: argparse.Namespace, outcomes: list) -> None:
    """Write ``--report`` and ``--plot`` (after the run; each file whole or not at all)."""
    if not (args.report or args.plot):
        return
    from hintpipe.charts import write_html, write_pngs

    done = []
    if args.report:
        cmd = shlex.join(["hintpipe", *args.argv]) if getattr(args, "argv", None) else None
        done.append(str(write_html(outcomes, args.report, title=f"hintpipe {args.subcommand}", command=cmd)))
    if args.plot:
        done += [str(p) for p in write_pngs(outcomes, args.plot)]
    if not args.json:
        print(f"wrote {', '.join(done)}", file=sys.stderr)
