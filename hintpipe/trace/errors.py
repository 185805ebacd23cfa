"""Errors raised while reading, converting or recording page-allocator traces."""

from __future__ import annotations


class TraceError(Exception):
    """A trace or snapshot could not be read; the message names the file (and line if known).

    ``code`` is a short stable identifier other tools can match on:

    - ``truncated``: a compressed stream ends before its frame does
    - ``corrupt``: the compressed stream or container fails to decode
    - ``unknown-event``: a line is a well-formed trace line for an event we do not model
    - ``malformed``: a line that is not a tracefs kmem event line
    - ``lost-events``: the kernel dropped events (``[LOST N EVENTS]``), replay would drift
    - ``pfn-range``: a pfn (plus its order) lies beyond the kpageflags snapshot
    - ``missing``: a required file of a recording is absent
    - ``format``: a hintpipe trace-v1 file violates protocols/trace-v1.md
    """

    def __init__(self, code: str, message: str, path: str | None = None, line: int | None = None):
        self.code = code
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message} [{code}]")


class RecordError(Exception):
    """Live recording is impossible here (not root, no tracefs, no /proc/kpageflags, ...).

    The message is one sentence meant for the user; the CLI exits with status 2.
    """
