"""Chunked decompression of trace text: zstd, gzip or plain, detected by magic bytes.

Memory stays bounded: the caller receives decompressed chunks of about ``chunk_size`` bytes, each
ending on a line boundary (except possibly the very last one).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import zstandard

from .errors import TraceError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
READ_SIZE = 1 << 18
"""Compressed bytes read per step; small enough to stream, large enough to amortise calls."""


def detect_compression(path: str | Path) -> str:
    """Return ``"zstd"``, ``"gzip"`` or ``"plain"`` from the first bytes of ``path``."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    return "plain"


def iter_zstd_fileobj(f, name: str) -> Iterator[bytes]:
    """Yield the decompressed bytes of the (possibly multi-frame) zstd stream read from ``f``.

    Raises TraceError ``corrupt`` on a decoding error and ``truncated`` if the last frame does
    not end (zstandard's stream reader would silently stop there).
    """
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    pending = b""
    while True:
        comp = pending or f.read(READ_SIZE)
        pending = b""
        if not comp:
            break
        try:
            out = dobj.decompress(comp)
        except zstandard.ZstdError as e:
            raise TraceError("corrupt", f"zstd stream is corrupt ({e})", name) from None
        if out:
            yield out
        if dobj.eof:
            # Concatenated frames are legal zstd: start a new frame with what is left.
            pending = dobj.unused_data
            dobj = dctx.decompressobj()
            if not pending:
                nxt = f.read(READ_SIZE)
                if not nxt:
                    return
                pending = nxt
    if not dobj.eof:
        raise TraceError("truncated", "zstd stream is truncated (the last frame does not end)", name)


def _zstd_raw(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from iter_zstd_fileobj(f, str(path))


def _gzip_raw(path: Path) -> Iterator[bytes]:
    try:
        with gzip.open(path, "rb") as f:
            while True:
                b = f.read(READ_SIZE * 4)
                if not b:
                    return
                yield b
    except EOFError:
        raise TraceError("truncated", "gzip stream is truncated", str(path)) from None
    except (OSError, zlib.error) as e:
        raise TraceError("corrupt", f"gzip stream is corrupt ({e})", str(path)) from None


def _plain_raw(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while True:
            b = f.read(READ_SIZE * 4)
            if not b:
                return
            yield b


def iter_raw(path: str | Path) -> Iterator[bytes]:
    """Yield the decompressed bytes of ``path`` in pieces of unspecified size."""
    p = Path(path)
    if not p.exists():
        raise TraceError("missing", "file does not exist", str(p))
    kind = detect_compression(p)
    return {"zstd": _zstd_raw, "gzip": _gzip_raw, "plain": _plain_raw}[kind](p)


def read_all(path: str | Path) -> bytes:
    """Decompress a whole (small or medium) file into memory, e.g. a kpageflags snapshot."""
    return b"".join(iter_raw(path))


def iter_line_chunks(path: str | Path, chunk_size: int = 4 << 20) -> Iterator[bytes]:
    """Yield chunks of about ``chunk_size`` bytes that each end with a newline.

    A final piece without a trailing newline is yielded as is (the parser decides whether the
    unterminated last line is an error).
    """
    carry = b""
    buf: list[bytes] = []
    size = 0
    for piece in iter_raw(path):
        buf.append(piece)
        size += len(piece)
        if size < chunk_size:
            continue
        data = carry + b"".join(buf)
        buf, size = [], 0
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            continue
        carry = data[cut:]
        yield data[:cut]
    data = carry + b"".join(buf)
    if data:
        yield data


def prefetched(gen: Iterator, depth: int = 2, name: str = "hintpipe-prefetch") -> Iterator:
    """Run the iterator ``gen`` in a helper thread up to ``depth`` items ahead of the consumer
    (zstd and numpy release the GIL, so on 2+ cores the producer's work overlaps the consumer's).
    At most ``depth`` items wait in the queue, so memory stays bounded; the producer's errors are
    re-raised in the consumer; a consumer that stops early stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    th = threading.Thread(target=produce, daemon=True, name=name)
    th.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        th.join(timeout=5)


def iter_line_chunks_threaded(path: str | Path, chunk_size: int = 4 << 20, depth: int = 2,
                              prepare=None) -> Iterator:
    """:func:`iter_line_chunks` decompressed in a helper thread (:func:`prefetched`).
    ``prepare(chunk)``, if given, also runs in the helper thread and its result is yielded
    instead of the chunk."""
    chunks = iter_line_chunks(path, chunk_size)
    if prepare is not None:
        chunks = (prepare(c) for c in chunks)
    return prefetched(chunks, depth, "hintpipe-trace-decompress")
