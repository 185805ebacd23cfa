"""ioctl(2) through ctypes, and the kernel's generic request-number encoding.

Request numbers are computed from the argument struct's size with ``_IOC`` (include/uapi/
asm-generic/ioctl.h: nr 8 bits, type 8 bits, size 14 bits, dir 2 bits; x86_64 and aarch64 share
it), so a wrong struct layout shows as ENOTTY/EINVAL from the running kernel.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["IOC_NONE", "IOC_WRITE", "IOC_READ", "ioc", "iowr", "ior", "ioctl"]

IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2
"""Direction bits of a request number (as seen from user space)."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """Encode an ioctl request number like the kernel's ``_IOC`` macro."""
    if not 0 <= size < (1 << 14):
        raise ValueError("ioctl argument too large")
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def iowr(type_: int, nr: int, struct_t: type) -> int:
    """``_IOWR(type, nr, struct_t)``: the argument is read and written by the kernel."""
    return ioc(IOC_READ | IOC_WRITE, type_, nr, ctypes.sizeof(struct_t))


def ior(type_: int, nr: int, struct_t: type) -> int:
    """``_IOR(type, nr, struct_t)``."""
    return ioc(IOC_READ, type_, nr, ctypes.sizeof(struct_t))


def ioctl(fd: int, request: int, arg: ctypes.Structure | None) -> int:
    """ioctl(2) releasing the GIL (ctypes does); raises OSError on failure."""
    ptr = ctypes.byref(arg) if arg is not None else None
    rc = _libc.ioctl(fd, request, ptr)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl {request:#x}: {os.strerror(err)}")
    return rc
