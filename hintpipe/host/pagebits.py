"""One bit per guest page: the representation of the host's page sets (skip, written, dirty and
the migration's per-round sets).

A :class:`PageBits` keeps page ``p`` in bit ``p & 7`` of byte ``p >> 3`` of a numpy ``uint8``
array (``np.packbits(..., bitorder="little")`` order), so page ``p`` is also bit ``p & 63`` of
little-endian ``uint64`` word ``p >> 6``. The array is padded to a whole number of
:data:`ALIGN_PAGES` pages and the padding stays clear: a naturally aligned block of ``2**k >= 8``
pages is then exactly ``2**(k - 3)`` whole bytes of it (``bytes.reshape(-1, 2**(k - 3))[pfn >> k]``),
whatever the page count. Readers get ranges unpacked to ``bool`` arrays and counts; only the page
state's hint kernels work on the bytes themselves.
"""

from __future__ import annotations

import numpy as np

from hintpipe.units import MAX_ORDER, distinct

ALIGN_PAGES = 1 << MAX_ORDER
"""Pages per padding unit: the largest block (order MAX_ORDER, 128 bytes of bits)."""
BYTES_PER_PAGE = 1 / 8
"""Bytes a :class:`PageBits` holds per page (padding aside)."""


def nbytes_for(page_count: int) -> int:
    """Bytes of one :class:`PageBits` of ``page_count`` pages (padding included)."""
    return -(-page_count // ALIGN_PAGES) * (ALIGN_PAGES >> 3)


class PageBits:
    """A set of pages of a guest of ``page_count`` pages, one bit each (``fill``: all in)."""

    __slots__ = ("page_count", "bytes")

    def __init__(self, page_count: int, fill: bool = False) -> None:
        self.page_count = int(page_count)
        self.bytes = np.zeros(nbytes_for(self.page_count), dtype=np.uint8)
        """The bits (read-only for everyone but :class:`~hintpipe.host.pagestate.HostPageState`)."""
        if fill:
            self.fill(True)

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> "PageBits":
        """The pages where the ``bool`` array ``mask`` is true."""
        bits = cls(len(mask))
        packed = np.packbits(mask, bitorder="little")
        bits.bytes[:len(packed)] = packed
        return bits

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.bytes.nbytes

    def fill(self, value: bool) -> None:
        """Put every page in (``True``) or take every page out; the padding stays clear."""
        if not value:
            self.bytes.fill(0)
            return
        n = self.page_count
        self.bytes[:n >> 3] = 0xFF
        if n & 7:
            self.bytes[n >> 3] = (1 << (n & 7)) - 1
        self.bytes[(n + 7) >> 3:] = 0

    def get(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Pages ``[start, stop)`` as a new ``bool`` array (``stop`` defaults to the page count)."""
        stop = self.page_count if stop is None else min(stop, self.page_count)
        if stop <= start:
            return np.zeros(0, dtype=bool)
        a = start >> 3
        out = np.unpackbits(self.bytes[a:(stop + 7) >> 3], bitorder="little")
        return out[start - (a << 3):stop - (a << 3)].view(bool)

    def gather(self, pfns: np.ndarray) -> np.ndarray:
        """Membership of each of ``pfns`` (in-range page numbers), as ``bool``."""
        pfns = np.asarray(pfns, dtype=np.int64)
        return ((self.bytes[pfns >> 3] >> (pfns & 7).astype(np.uint8)) & 1).view(bool)

    def count(self, start: int = 0, stop: int | None = None) -> int:
        """Pages in the set (within ``[start, stop)``)."""
        if start == 0 and stop is None:
            return popcount(self.bytes)
        return int(np.count_nonzero(self.get(start, stop)))

    def add(self, pfns: np.ndarray) -> None:
        """Put ``pfns`` (in range; any order, repeats allowed) into the set."""
        b, m, _ = bit_masks(distinct(pfns))
        np.add.at(self.bytes, b, m & ~self.bytes[b])

    def add_mask(self, start: int, mask: np.ndarray) -> None:
        """Put page ``start + i`` into the set for every true ``mask[i]``."""
        if start & 7 == 0:
            packed = np.packbits(mask, bitorder="little")
            self.bytes[start >> 3:(start >> 3) + len(packed)] |= packed
        else:
            self.add(np.flatnonzero(mask) + start)

    def swap(self, other: "PageBits") -> None:
        """Exchange contents with ``other`` (same page count) without copying."""
        self.bytes, other.bytes = other.bytes, self.bytes


def popcount(a: np.ndarray) -> int:
    """Set bits in the contiguous unsigned integer array ``a``, counted eight bytes at a time
    (summing one small count per byte is several times slower)."""
    b = a.reshape(-1).view(np.uint8)
    n = len(b) & ~7
    c = int(np.bitwise_count(b[:n].view(np.uint64)).sum(dtype=np.int64)) if n else 0
    if n < len(b):
        c += int(np.bitwise_count(b[n:]).sum(dtype=np.int64))
    return c


def bit_masks(starts: np.ndarray, order: int = 0) -> tuple[np.ndarray, np.ndarray, bool]:
    """Aligned blocks of ``2**order <= 8`` pages at ``starts`` (int64) as (byte index, bits of
    the block in that byte (``uint8``), whether the blocks are distinct: strictly ascending).

    Distinct blocks have disjoint bits, so ``np.add.at`` / ``np.subtract.at`` on the bytes set /
    clear them correctly even where several share a byte (and run several times faster than
    ``np.bitwise_or.at``); otherwise the OR/AND forms must be used.
    """
    distinct = len(starts) < 2 or bool((starts[1:] > starts[:-1]).all())
    pos = np.bitwise_and(starts, 7, dtype=np.uint8, casting="unsafe")  # one pass, no int64 temporary
    return starts >> 3, np.left_shift(_LOW[order], pos), distinct


# The bits of a block of 1, 2, 4 or 8 pages at bit 0 of a byte.
_LOW = np.array([0x1, 0x3, 0xF, 0xFF], dtype=np.uint8)
