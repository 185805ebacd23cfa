"""File descriptors across processes: SCM_RIGHTS on unix sockets, peer credentials, fd kinds.

The guest hands its RAM memfd, its userfaultfd and the shm transport's ring and doorbells to the
host this way. :func:`scm_rights` builds the ancillary item a ``sendmsg`` carries and
:func:`received_fds` takes the fds out of what a ``recvmsg`` returned, for trio and blocking
sockets alike; :func:`send_fds`/:func:`recv_fds` are the blocking one-call forms.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct

__all__ = ["scm_rights", "received_fds", "send_fds", "recv_fds", "peer_pid", "anon_inode_name"]

_FD = array.array("i").itemsize


def scm_rights(fds: list[int]) -> tuple[int, int, array.array]:
    """The ancillary data item of a ``sendmsg`` that passes ``fds``."""
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Every fd in the SCM_RIGHTS items of a ``recvmsg``'s ancillary data (the caller owns them)."""
    fds: list[int] = []
    for level, typ, payload in ancdata:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % _FD])
            fds.extend(got)
    return fds


def send_fds(sock: socket.socket, fds: list[int], payload: bytes = b"\0") -> None:
    """Send ``fds`` with SCM_RIGHTS along with a small non-empty ``payload``."""
    if not payload:
        raise ValueError("payload must be non-empty (SCM_RIGHTS rides on data)")
    socket.send_fds(sock, [payload], fds)


def recv_fds(sock: socket.socket, maxfds: int = 4, bufsize: int = 4096) -> tuple[bytes, list[int]]:
    """Receive (payload, fds) sent by :func:`send_fds`.  Raises EOFError on a closed peer."""
    data, fds, flags, _ = socket.recv_fds(sock, bufsize, maxfds)
    if not data and not fds:
        raise EOFError("peer closed the socket before sending fds")
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EMSGSIZE, "SCM_RIGHTS control data truncated (too many fds)")
    return data, fds


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of a connected unix socket's peer (SO_PEERCRED; a trio socket does as well), None
    if the kernel will not say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", raw)[0]


def anon_inode_name(fd: int) -> str | None:
    """``"eventfd"``, ``"userfaultfd"``, ... for an anonymous-inode fd of this process, else None."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    if target.startswith("anon_inode:[") and target.endswith("]"):
        return target[len("anon_inode:["):-1]
    return None
