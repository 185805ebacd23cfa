"""Guest RAM shared between a guest process and its host process (a sealed memfd).

The guest creates the region, the host maps the same memfd (received with SCM_RIGHTS) the way a
VMM maps guest RAM. Layout (normative copy in ``protocols/wire-v1.md`` section 11.4; all integers
little-endian; ``align`` rounds up to 4096)::

    0      control page: magic "HPGRAM01", u64 page_count, u32 layout version (=1),
           host-written words at 64.., guest-written words at 128..
    4096   guest stats: u32 length + UTF-8 JSON (at most 4092 bytes), written by the guest
    8192   versions  u32 x page_count       guest-written page contents (simulation)
    P      protect   u8  x page_count       1 = write-protected (host sets, host clears on Fault)
    F      free      u8  x page_count       1 = free in the guest's allocator (guest-written)

    P = 8192 + align(4 * page_count), F = P + align(page_count), size = F + align(page_count)

Each control word has exactly one writer, so no cross-process atomic read-modify-write is needed:
the host writes ``barrier_req``, ``barrier_done`` and ``pause_req``; the guest writes
``barrier_ack`` and ``pause_ack`` (see :mod:`hintpipe.paired.barrier` for the handshakes).

The memfd must carry ``F_SEAL_SHRINK``: a guest that truncated a mapped memfd would make the
host's next access die with SIGBUS; with the seal the kernel refuses the truncation.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os

import numpy as np

from hintpipe.linux.memfd import sealed_memfd
from hintpipe.units import align_up

MAGIC = b"HPGRAM01"
LAYOUT_VERSION = 1
CTRL_SIZE = 4096
STATS_OFFSET = 4096
STATS_MAX = 4092
VERSIONS_OFFSET = 8192

# control word offsets (bytes)
OFF_PAGE_COUNT = 8
OFF_LAYOUT = 16
OFF_BARRIER_REQ = 64  # host
OFF_BARRIER_DONE = 68  # host
OFF_PAUSE_REQ = 72  # host
OFF_BARRIER_ACK = 128  # guest
OFF_PAUSE_ACK = 132  # guest
VERSION_DTYPE = np.dtype(np.uint32)
"""A page's content in simulation: its version (and what the host's destination holds a page)."""


class RegionError(Exception):
    """The guest's memory region is unusable (bad magic, size, seals, geometry)."""


def region_layout(page_count: int) -> tuple[int, int, int, int]:
    """``(versions, protect, free, total)`` byte offsets of a region for ``page_count`` pages."""
    v = VERSIONS_OFFSET
    p = v + align_up(4 * page_count)
    f = p + align_up(page_count)
    return v, p, f, f + align_up(page_count)


class SharedRegion:
    """One mapping of a guest region (either side); numpy views over the shared pages."""

    def __init__(self, fd: int, page_count: int, *, owner: bool) -> None:
        self.fd = fd
        self.page_count = page_count
        self.owner = owner
        self._closed = False
        v, p, f, total = region_layout(page_count)
        self.size = total
        self._mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        buf = memoryview(self._mm)
        self._buf = buf
        self.ctrl = np.frombuffer(buf, dtype="<u4", count=CTRL_SIZE // 4, offset=0)
        self.versions = np.frombuffer(buf, dtype=VERSION_DTYPE, count=page_count, offset=v)
        self.protect = np.frombuffer(buf, dtype=np.uint8, count=page_count, offset=p)
        self.free = np.frombuffer(buf, dtype=np.bool_, count=page_count, offset=f)

    # -- guest side ------------------------------------------------------------------------
    @classmethod
    def create(cls, page_count: int, name: str = "hintpipe-guest-ram", **kw) -> "SharedRegion":
        """Guest: a new zeroed, shrink-sealed memfd region for ``page_count`` pages (``kw`` goes
        to the constructor of a subclass)."""
        total = region_layout(page_count)[3]
        fd = sealed_memfd(total, name)
        try:
            reg = cls(fd, page_count, owner=True, **kw)
        except BaseException:
            os.close(fd)
            raise
        reg._mm[0:8] = MAGIC
        reg._mm[OFF_PAGE_COUNT:OFF_PAGE_COUNT + 8] = page_count.to_bytes(8, "little")
        reg.ctrl[OFF_LAYOUT // 4] = LAYOUT_VERSION
        return reg

    def write_stats(self, stats: dict) -> None:
        """Guest: publish a small JSON snapshot (lock/workload figures) for the host's report."""
        data = json.dumps(stats, separators=(",", ":")).encode()[:STATS_MAX]
        self._mm[STATS_OFFSET + 4:STATS_OFFSET + 4 + len(data)] = data
        self._mm[STATS_OFFSET:STATS_OFFSET + 4] = len(data).to_bytes(4, "little")

    # -- host side -------------------------------------------------------------------------
    @classmethod
    def attach(cls, fd: int, page_count: int) -> "SharedRegion":
        """Host: validate and map a region received from a guest that said ``page_count``.

        Raises :class:`RegionError` (never SIGBUS later): the fd must be a memfd sealed against
        shrinking, large enough for the layout, with the right magic and page count. The region
        owns ``fd`` only on success; on failure the caller still does.
        """
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as e:
            raise RegionError(f"guest memory fd is not a sealable memfd ({e.strerror})") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise RegionError("guest memory memfd is not sealed with F_SEAL_SHRINK")
        total = region_layout(page_count)[3]
        size = os.fstat(fd).st_size
        if size < total:
            raise RegionError(f"guest memory memfd holds {size} bytes, layout needs {total}")
        reg = cls(fd, page_count, owner=False)
        if bytes(reg._mm[0:8]) != MAGIC:
            reg._unmap()
            raise RegionError("guest memory region has a bad magic")
        got = int.from_bytes(reg._mm[OFF_PAGE_COUNT:OFF_PAGE_COUNT + 8], "little")
        layout = int(reg.ctrl[OFF_LAYOUT // 4])
        if got != page_count or layout != LAYOUT_VERSION:
            reg._unmap()
            raise RegionError(f"guest memory region says {got} pages / layout {layout}, "
                              f"Hello said {page_count} / layout {LAYOUT_VERSION}")
        return reg

    def read_stats(self) -> dict:
        """Host: the guest's stats snapshot ({} when absent or malformed: it is untrusted)."""
        n = int.from_bytes(self._mm[STATS_OFFSET:STATS_OFFSET + 4], "little")
        if not 0 < n <= STATS_MAX:
            return {}
        try:
            obj = json.loads(bytes(self._mm[STATS_OFFSET + 4:STATS_OFFSET + 4 + n]))
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}

    # -- control words ---------------------------------------------------------------------
    def word(self, off: int) -> int:
        """Read the u32 control word at byte offset ``off``."""
        return int(self.ctrl[off // 4])

    def set_word(self, off: int, value: int) -> None:
        """Write the u32 control word at byte offset ``off`` (only its owner does)."""
        self.ctrl[off // 4] = value & 0xFFFFFFFF

    def protect_all(self) -> None:
        """Host: write-protect every page (at a round barrier)."""
        self.protect[:] = 1

    def note_written(self, pfns) -> None:
        """Guest: pages about to be written (a mirrored region syncs them; shared: nothing)."""

    def close(self) -> None:
        """Drop the views and the mapping, close the fd (once: the number may be reused)."""
        if self._closed:
            return
        self._closed = True
        self._unmap()
        try:
            os.close(self.fd)
        except OSError:
            pass

    def _unmap(self) -> None:
        for name in ("ctrl", "versions", "protect", "free"):
            self.__dict__.pop(name, None)
        try:
            self._buf.release()
            self._mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes with the process
            pass
