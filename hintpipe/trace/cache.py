"""The trace cache: a recording's events converted once to trace-v1, loaded directly afterwards.

Parsing tracefs text or decoding ring-buffer pages costs about a second per million events;
reading the same events from a trace-v1 file costs a few hundredths. The first
``hintpipe replay``/``inspect`` of a recording folder therefore writes ``trace-v1.cache.hpt``
and later runs read that instead.

Where: beside the recording (:data:`CACHE_NAME` in its folder) when the folder is writable;
otherwise (a read-only folder, or one whose permission bits say nobody writes it, which root
respects here although the kernel would let it write) in the user's cache folder,
``$XDG_CACHE_HOME/hintpipe/traces`` (default ``~/.cache/hintpipe/traces``), named after a hash of
the recording's absolute path. A recording folder is never written to if it is read-only. The
environment variable ``HINTPIPE_TRACE_CACHE`` overrides this: ``off`` disables the cache, a folder
name puts every cache there (and nowhere beside a recording).

Validity: the header's ``derived_from`` map (protocols/trace-v1.md section 2) names the
converter (:data:`CONVERTER`, bumped whenever a reader's output for the same files changes),
the ``skip_bad`` setting and, for every file the trace is made from, its path relative to the
recording, size, modification time and SHA-256. A cache is used only if the converter and
``skip_bad`` match and every file has the same size and either the same modification time or
the same SHA-256 (a copied recording keeps its cache valid); anything else rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from .errors import TraceError
from .format import read_v1_derived_from, write_v1

CACHE_NAME = "trace-v1.cache.hpt"
CONVERTER = "hintpipe-trace-cache-1"
CACHE_LEVEL = 3
"""zstd level of cache files: conversion time matters more than the last 10 % of size."""


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hintpipe/traces`` (``~/.cache/hintpipe/traces`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hintpipe" / "traces"


ENV = "HINTPIPE_TRACE_CACHE"


def cache_disabled() -> bool:
    """``HINTPIPE_TRACE_CACHE=off``."""
    return os.environ.get(ENV, "").strip().lower() == "off"


def cache_paths(folder: Path) -> list[Path]:
    """Where a recording's cache may be, in the order they are tried: beside it, then the
    user's cache folder (only the folder ``HINTPIPE_TRACE_CACHE`` names, when set)."""
    real = folder.resolve()
    name = f"{real.name}-{hashlib.sha256(str(real).encode()).hexdigest()[:16]}.hpt"
    forced = os.environ.get(ENV, "").strip()
    if forced and forced.lower() != "off":
        return [Path(forced) / name]
    return [folder / CACHE_NAME, user_cache_dir() / name]


def folder_writable(folder: Path) -> bool:
    """Whether the cache may be written into ``folder``: the filesystem is mounted read-write,
    the folder has a write permission bit, and this process may write it."""
    try:
        st = os.stat(folder)
        if not st.st_mode & 0o222:
            return False
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def fingerprint(folder: Path, files: list[Path]) -> list[dict]:
    """Per file: path relative to ``folder``, size, mtime_ns and SHA-256."""
    out = []
    for p in files:
        st = p.stat()
        out.append({"name": p.relative_to(folder).as_posix(), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": _sha256(p)})
    return out


def _matches(folder: Path, files: list[Path], skip_bad: bool, derived: dict | None) -> bool:
    if not derived or derived.get("converter") != CONVERTER or derived.get("skip_bad") != skip_bad:
        return False
    recorded = derived.get("files")
    if not isinstance(recorded, list) or len(recorded) != len(files):
        return False
    by_name = {r.get("name"): r for r in recorded if isinstance(r, dict)}
    for p in files:
        r = by_name.get(p.relative_to(folder).as_posix())
        if r is None:
            return False
        st = p.stat()
        if r.get("size") != st.st_size:
            return False
        if r.get("mtime_ns") != st.st_mtime_ns and r.get("sha256") != _sha256(p):
            return False
    return True


def lookup(folder: Path, files: list[Path], skip_bad: bool) -> Path | None:
    """The first valid cache of the recording in ``folder`` made from ``files``, or None."""
    for c in cache_paths(folder):
        if not c.is_file():
            continue
        try:
            if _matches(folder, files, skip_bad, read_v1_derived_from(c)):
                return c
        except (TraceError, OSError):
            continue  # unreadable or damaged: rebuilt below
    return None


def store(folder: Path, trace, files: list[Path], skip_bad: bool,
          log: Callable[[str], None] | None = None) -> Path | None:
    """Convert the opened recording ``trace`` into its cache; return the file, or None if no
    cache location could be written (``log`` says why; the caller reads the recording directly).
    Errors in the recording itself (TraceError) propagate and leave no cache behind."""
    derived = {"converter": CONVERTER, "skip_bad": skip_bad, "recording": str(folder.resolve()),
               "encoding": trace.encoding, "files": fingerprint(folder, files)}
    paths = cache_paths(folder)
    beside = folder / CACHE_NAME
    targets = [p for p in paths if p != beside or folder_writable(folder)]
    for i, target in enumerate(targets):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_v1(target, trace, level=CACHE_LEVEL, derived_from=derived)
            if log is not None:  # said once it worked: a recording that does not parse says only that
                where = "beside it" if target == beside else f"in {target.parent}"
                log(f"converted {folder} ({trace.encoding}) to trace-v1 once, cached {where} as "
                    f"{target.name}; later runs load that")
            return target
        except OSError as e:
            if log is not None:
                log(f"cannot write the trace cache {target} ({e.strerror or e})"
                    + ("; trying the user cache folder" if i + 1 < len(targets) else "; reading the recording directly"))
    return None
