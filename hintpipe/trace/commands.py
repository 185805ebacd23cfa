"""Thin command functions for the CLI: print results, turn expected errors into exit status 2."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from .errors import RecordError, TraceError


def _fail(e: Exception, err: TextIO) -> int:
    print(f"hintpipe: error: {e}", file=err)
    return 2


def cmd_inspect(path: str, as_json: bool = False, samples: int = 50, skip_bad: bool = False,
                out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``hintpipe inspect TRACE [--json]``."""
    from .summary import inspect, render_text
    try:
        info = inspect(path, samples=samples, skip_bad=skip_bad)
    except TraceError as e:
        return _fail(e, err)
    print(json.dumps(info, indent=1) if as_json else render_text(info), file=out)
    return 0


def cmd_convert(src: str, dst: str, skip_bad: bool = False, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``hintpipe trace convert RECORDING OUT.hpt``."""
    from .recording import convert
    t0 = time.perf_counter()
    try:
        s = convert(src, dst, skip_bad=skip_bad)
    except TraceError as e:
        return _fail(e, err)
    print(f"wrote {dst}: {s['events']} events, {s['page_count']} pages, {s['bytes']} bytes "
          f"in {time.perf_counter() - t0:.2f} s", file=out)
    return 0


def cmd_record(outdir: str, duration: float | None = None, command: list[str] | None = None,
               out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``hintpipe record OUTDIR [--duration S] [-- COMMAND ...]``."""
    from .record import record
    try:
        s = record(outdir, duration=duration, command=command or None)
    except RecordError as e:
        return _fail(e, err)
    print(f"recorded {s['events']} events in {s['seconds']} s to {s['outdir']}"
          + (f" (command exit status {s['returncode']})" if s["returncode"] is not None else ""), file=out)
    return 0
