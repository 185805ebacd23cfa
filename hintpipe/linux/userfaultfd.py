"""userfaultfd(2) bindings: syscall, ioctls, structures, fault messages.

ctypes only (no third-party binding): the surface we need is five ioctls on
fixed-layout structs, and the maintained Python wrappers we know of predate
WP_ASYNC / PAGEMAP_SCAN.  Layouts follow include/uapi/linux/userfaultfd.h
(Linux 6.18); ioctl numbers are *computed* from the struct sizes with the
generic ``_IOC`` encoding (x86_64 and aarch64 share it) and tests check them
against the running kernel (a wrong number fails with ENOTTY/EINVAL).

A userfaultfd belongs to the mm of the process that created it: registration
must be done by that process on its own mapping; any process holding the fd
(e.g. received over a Unix socket with SCM_RIGHTS) can then read fault
messages and issue UFFDIO_WRITEPROTECT / UFFDIO_WAKE on that mm.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

import numpy as np

from hintpipe.linux.fdpass import anon_inode_name
from hintpipe.linux.ioctl import ior, ioctl, iowr

__all__ = [
    "UffdUnavailable", "Userfaultfd", "UffdioApi", "UffdioRange", "UffdioRegister",
    "UffdioWriteprotect", "UFFD_MSG_DTYPE", "parse_messages",
    "UFFDIO_API", "UFFDIO_REGISTER", "UFFDIO_UNREGISTER", "UFFDIO_WAKE",
    "UFFDIO_WRITEPROTECT", "WP_FEATURES_SYNC", "register_wp", "open_uffd",
    "available_features", "feature_names", "writeprotect_fd", "WP_FEATURES_ASYNC",
    "allows_writeprotect", "is_userfaultfd",
]


# ---------------------------------------------------------------- structures
class UffdioApi(ctypes.Structure):
    """struct uffdio_api (24 bytes)."""
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class UffdioRange(ctypes.Structure):
    """struct uffdio_range (16 bytes)."""
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    """struct uffdio_register (32 bytes)."""
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class UffdioWriteprotect(ctypes.Structure):
    """struct uffdio_writeprotect (24 bytes)."""
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64)]


# struct uffd_msg is 32 bytes, packed: event u8 @0, then the union @8.  For
# UFFD_EVENT_PAGEFAULT: flags u64 @8, address u64 @16, ptid u32 @24.
UFFD_MSG_SIZE = 32
UFFD_MSG_DTYPE = np.dtype({
    "names": ["event", "flags", "address", "ptid"],
    "formats": [np.uint8, "<u8", "<u8", "<u4"],
    "offsets": [0, 8, 16, 24],
    "itemsize": UFFD_MSG_SIZE,
})

# ---------------------------------------------------------------- constants
UFFD_API = 0xAA
UFFDIO = 0xAA
_UFFDIO_REGISTER, _UFFDIO_UNREGISTER, _UFFDIO_WAKE = 0x00, 0x01, 0x02
_UFFDIO_WRITEPROTECT, _UFFDIO_API = 0x06, 0x3F

UFFDIO_API = iowr(UFFDIO, _UFFDIO_API, UffdioApi)
UFFDIO_REGISTER = iowr(UFFDIO, _UFFDIO_REGISTER, UffdioRegister)
UFFDIO_UNREGISTER = ior(UFFDIO, _UFFDIO_UNREGISTER, UffdioRange)
UFFDIO_WAKE = ior(UFFDIO, _UFFDIO_WAKE, UffdioRange)
UFFDIO_WRITEPROTECT = iowr(UFFDIO, _UFFDIO_WRITEPROTECT, UffdioWriteprotect)

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16

FEATURE_NAMES = {
    0: "PAGEFAULT_FLAG_WP", 1: "EVENT_FORK", 2: "EVENT_REMAP", 3: "EVENT_REMOVE",
    4: "MISSING_HUGETLBFS", 5: "MISSING_SHMEM", 6: "EVENT_UNMAP", 7: "SIGBUS",
    8: "THREAD_ID", 9: "MINOR_HUGETLBFS", 10: "MINOR_SHMEM", 11: "EXACT_ADDRESS",
    12: "WP_HUGETLBFS_SHMEM", 13: "WP_UNPOPULATED", 14: "POISON", 15: "WP_ASYNC",
    16: "MOVE",
}

# What each backend asks UFFDIO_API for.  WP on a memfd is shmem WP, which
# needs WP_HUGETLBFS_SHMEM.  WP_UNPOPULATED makes UFFDIO_WRITEPROTECT (and the
# PAGEMAP_SCAN arming pass) install markers on never-touched anonymous PTEs;
# shmem gets markers anyway, we ask for it so a never-touched page is tracked
# in every case.  WP_ASYNC turns faults into silent kernel-side resolution.
WP_FEATURES_SYNC = (UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
                    | UFFD_FEATURE_WP_UNPOPULATED)
WP_FEATURES_ASYNC = WP_FEATURES_SYNC | UFFD_FEATURE_WP_ASYNC

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2

UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

UFFD_USER_MODE_ONLY = 1

_SYSCALL_NR = {"x86_64": 323, "amd64": 323, "aarch64": 282, "arm64": 282}

# ---------------------------------------------------------------- libc glue
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class UffdUnavailable(RuntimeError):
    """A userfaultfd backend cannot work here; ``reason`` is one sentence naming what is missing."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def userfaultfd_syscall(flags: int) -> int:
    """Raw userfaultfd(2); returns the fd or raises OSError."""
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"userfaultfd syscall number unknown on {platform.machine()}")
    fd = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(flags))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    return int(fd)


def feature_names(mask: int) -> list[str]:
    """Human-readable names of the UFFD_FEATURE bits set in ``mask``."""
    return [name for bit, name in FEATURE_NAMES.items() if mask >> bit & 1] + \
        [f"bit{b}" for b in range(64) if mask >> b & 1 and b not in FEATURE_NAMES]


class Userfaultfd:
    """One userfaultfd: create (or adopt an fd), API handshake, register, write-protect.

    ``Userfaultfd.create(features)`` makes a new fd (O_CLOEXEC|O_NONBLOCK), trying
    full mode first and falling back to UFFD_USER_MODE_ONLY on EPERM
    (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE).  User-mode-only means
    faults taken *inside the kernel* (e.g. read(2) into protected guest RAM) are
    not delivered: the syscall fails with EFAULT instead.
    ``Userfaultfd(fd)`` adopts an fd that already did its handshake (received from
    the guest over SCM_RIGHTS).
    """

    def __init__(self, fd: int, *, features: int = 0, user_mode_only: bool = False):
        self.fd = fd
        self.features = features  # as reported by UFFDIO_API: all the kernel offers
        self.requested = 0        # what create() asked for (what is enabled)
        self.user_mode_only = user_mode_only

    @classmethod
    def create(cls, features: int, *, nonblock: bool = True) -> "Userfaultfd":
        """New uffd with the UFFDIO_API handshake done for ``features``."""
        fd, umo = open_uffd(nonblock=nonblock)
        self = cls(fd, user_mode_only=umo)
        self.requested = features
        try:
            self.features = self.api(features)
        except BaseException:
            os.close(fd)
            raise
        return self

    def api(self, features: int) -> int:
        """UFFDIO_API handshake; returns the feature mask the kernel reports."""
        arg = UffdioApi(api=UFFD_API, features=features, ioctls=0)
        ioctl(self.fd, UFFDIO_API, arg)
        return int(arg.features)

    def register(self, addr: int, length: int, mode: int = UFFDIO_REGISTER_MODE_WP) -> int:
        """UFFDIO_REGISTER ``[addr, addr+length)``; returns the ioctls bitmask allowed there."""
        arg = UffdioRegister(range=UffdioRange(addr, length), mode=mode, ioctls=0)
        ioctl(self.fd, UFFDIO_REGISTER, arg)
        return int(arg.ioctls)

    def unregister(self, addr: int, length: int) -> None:
        """UFFDIO_UNREGISTER the range."""
        ioctl(self.fd, UFFDIO_UNREGISTER, UffdioRange(addr, length))

    def writeprotect(self, addr: int, length: int, protect: bool, *, wake: bool = True) -> None:
        """UFFDIO_WRITEPROTECT: set (protect=True) or clear WP on the range.

        Clearing wakes threads blocked on a WP fault in the range unless
        ``wake=False`` (DONTWAKE).  EAGAIN (the mm is changing under us, e.g. a
        fork with EVENT_FORK) is retried.
        """
        mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
        if not protect and not wake:
            mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        writeprotect_fd(self.fd, addr, length, mode)

    def wake(self, addr: int, length: int) -> None:
        """UFFDIO_WAKE threads blocked on faults in the range."""
        ioctl(self.fd, UFFDIO_WAKE, UffdioRange(addr, length))

    def close(self) -> None:
        """Close the fd (idempotent).  Closing the last reference unregisters everything."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Userfaultfd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def register_wp(addr: int, length: int, backend: str = "uffd") -> Userfaultfd:
    """Guest side: new uffd for ``backend`` ("uffd" or "uffd-async") with [addr, addr+length) registered in MODE_WP.

    Must run in the process that owns the mapping.  Raises UffdUnavailable.
    """
    want = {"uffd": WP_FEATURES_SYNC, "uffd-async": WP_FEATURES_ASYNC}[backend]
    uffd = Userfaultfd.create(want)
    uffd.requested = want
    try:
        uffd.register(addr, length, UFFDIO_REGISTER_MODE_WP)
    except OSError as e:
        uffd.close()
        raise UffdUnavailable(f"UFFDIO_REGISTER in write-protect mode failed ({os.strerror(e.errno)})") from e
    return uffd


def writeprotect_fd(fd: int, addr: int, length: int, mode: int) -> None:
    """UFFDIO_WRITEPROTECT on a raw fd with ``mode`` bits; retries EAGAIN."""
    arg = UffdioWriteprotect(range=UffdioRange(addr, length), mode=mode)
    while True:
        try:
            ioctl(fd, UFFDIO_WRITEPROTECT, arg)
            return
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise


def open_uffd(*, nonblock: bool = True) -> tuple[int, bool]:
    """Create a userfaultfd; returns (fd, user_mode_only).  Raises UffdUnavailable."""
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
    try:
        return userfaultfd_syscall(flags), False
    except OSError as e:
        if e.errno in (errno.ENOSYS,):
            raise UffdUnavailable("the kernel has no userfaultfd system call (ENOSYS: "
                                  "CONFIG_USERFAULTFD off or blocked by seccomp)") from e
        if e.errno != errno.EPERM:
            raise UffdUnavailable(f"userfaultfd(2) failed: {os.strerror(e.errno)}") from e
    try:
        return userfaultfd_syscall(flags | UFFD_USER_MODE_ONLY), True
    except OSError as e:
        raise UffdUnavailable("userfaultfd is not permitted (EPERM): set sysctl "
                              "vm.unprivileged_userfaultfd=1 or run with CAP_SYS_PTRACE") from e


def parse_messages(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode a read(2) of uffd messages into a UFFD_MSG_DTYPE record array."""
    if len(data) % UFFD_MSG_SIZE:
        raise ValueError(f"uffd read of {len(data)} bytes is not a whole number of messages")
    return np.frombuffer(data, dtype=UFFD_MSG_DTYPE)


def available_features() -> int:
    """Feature mask the kernel offers (UFFDIO_API with features=0 on a scratch fd)."""
    fd, _ = open_uffd()
    try:
        return Userfaultfd(fd).api(0)
    finally:
        os.close(fd)


def allows_writeprotect(register_ioctls: int) -> bool:
    """Does the ioctl mask UFFDIO_REGISTER returned allow UFFDIO_WRITEPROTECT on the range?"""
    return bool(register_ioctls >> _UFFDIO_WRITEPROTECT & 1)


def is_userfaultfd(fd: int) -> bool:
    """Is ``fd`` (of this process) a userfaultfd?"""
    return anon_inode_name(fd) == "userfaultfd"
