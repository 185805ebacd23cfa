"""Real guest memory for the in-process demo (``--memory real``): bytes in a memfd, not versions.

:class:`RealMachine` holds what outlives one migration run: the guest's mapping (registered with
userfaultfd when a real backend is used), the host's own mapping of the same memfd (reads never
fault, writes are untracked) and the destination buffer, all allocated and touched once before
anything is timed. The guest writes through :class:`~hintpipe.guest.memory.RealGuestMemory`.
"""

from __future__ import annotations

import os

import numpy as np

from hintpipe.linux.memfd import WORDS_PER_PAGE, GuestRam
from hintpipe.linux.userfaultfd import Userfaultfd, register_wp

__all__ = ["RealMachine"]


class RealMachine:
    """Guest RAM, its userfaultfd registration, the host's mapping and the destination buffer.

    ``backend`` is a resolved ``--wp`` name; for ``uffd``/``uffd-async`` the guest side registers
    its mapping (:func:`hintpipe.linux.userfaultfd.register_wp`, raising ``UffdUnavailable``) and
    :attr:`uffd` holds the fd a host adapter is built from (``pid`` = this process).
    """

    def __init__(self, page_count: int, backend: str) -> None:
        self.page_count = page_count
        self.backend = backend
        self.guest = GuestRam(page_count)
        self.uffd: Userfaultfd | None = None
        self.host: GuestRam | None = None
        try:
            self.guest.touch()  # first touch is slow: pay it here, not inside the migration
            self.host = GuestRam(page_count, fd=self.guest.fd)
            self.dest = np.empty((page_count, WORDS_PER_PAGE), dtype=np.uint64)
            self.dest.fill(0)   # touched, so the first round does not pay page faults either
            if backend in ("uffd", "uffd-async"):
                self.uffd = register_wp(self.guest.addr, self.guest.size, backend)
        except BaseException:
            self.close()
            raise
        self.pid = os.getpid()

    def reset_dest(self) -> None:
        """Zero the destination before a run (a stale copy must not hide a lost write)."""
        self.dest.fill(0)

    def read_source(self, idx: np.ndarray) -> np.ndarray:
        """Source bytes of pages ``idx`` as (len(idx), 512) words, read through the host mapping."""
        return self.host.words[idx]

    def backend_kwargs(self) -> dict:
        """What :func:`hintpipe.wp.make_backend` needs for a real backend."""
        return {"ram_addr": self.guest.addr, "page_count": self.page_count,
                "uffd_fd": self.uffd.fd if self.uffd else None, "pid": self.pid}

    def close(self) -> None:
        """Close the uffd (unregisters), then both mappings (idempotent)."""
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        for ram in (self.host, self.guest):
            if ram is not None:
                ram.close()
        self.dest = None

    def __enter__(self) -> "RealMachine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
