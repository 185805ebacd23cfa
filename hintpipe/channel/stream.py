"""Stream transports (unix and tcp sockets) for wire protocol v1 frames.

Frames travel unchanged, back to back. Sending goes through a bounded buffer that a writer task
flushes: whatever queued while the previous write was in the kernel goes out in one ``send``
(so frames coalesce into large writes under load and a lone frame leaves at once when idle).
``send_frame`` waits while the buffer holds ``max_buffer`` bytes, so a peer that does not read
cannot make this side's memory grow (the wire protocol's credits bound the guest's Hints; this
bounds everything else). Receiving returns whatever bytes arrived (any split of frames): the
sans-I/O connections reassemble frames and reject a length prefix above MAX_FRAME_PAYLOAD before
buffering its payload.

Unix sockets can carry file descriptors (SCM_RIGHTS): the guest attaches its RAM memfd to its
first write (the bytes of ``Hello``), and the host collects fds from every read.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import socket
import stat
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import trio

from hintpipe.channel.address import Address
from hintpipe.linux.fdpass import received_fds, scm_rights

READ_SIZE = 256 * 1024
"""Bytes asked for per receive."""
COALESCE_MAX = 1 << 20
"""Largest single write."""
MAX_FDS = 8
"""File descriptors accepted per connection; more are closed on arrival."""
AUTH_MAGIC = b"HPAUTH1\0"
AUTH_NONCE = 32
AUTH_CONTEXT = b"hintpipe-auth-v1"


class AuthError(Exception):
    """The TCP challenge-response failed (wrong or missing secret)."""


@dataclass
class StreamStats:
    """Write/read counters (coalescing is ``bytes_written / writes``)."""

    frames_sent: int = 0
    writes: int = 0
    bytes_written: int = 0
    reads: int = 0
    bytes_read: int = 0
    max_buffered: int = 0

    def as_dict(self) -> dict:
        """JSON-ready counters."""
        d = dict(self.__dict__)
        d["avg_write_bytes"] = round(self.bytes_written / self.writes, 1) if self.writes else 0
        return d


class StreamEndpoint:
    """Frame endpoint over a connected trio socket (``send_frame``/``receive``/``aclose``).

    Use :func:`open_stream_endpoint`, which runs the writer task. ``first_fds`` are attached to
    the first write; ``collect_fds`` makes receives pick up SCM_RIGHTS fds (``received_fds``).
    """

    def __init__(self, sock: trio.socket.SocketType, *, max_buffer: int = 1 << 20, first_fds: list[int] | None = None,
                 collect_fds: bool = False) -> None:
        self.sock = sock
        self.max_buffer = max_buffer
        self.stats = StreamStats()
        self.received_fds: list[int] = []
        self._first_fds = list(first_fds or [])
        self._collect = collect_fds
        self._buf = bytearray()
        self._data = trio.Event()
        self._room = trio.Event()
        self._flushed = trio.Event()
        self._flushed.set()
        self._broken: BaseException | None = None
        self._closed = False
        self._eof_sent = False

    # -- sending ---------------------------------------------------------------------------
    async def send_frame(self, frame: bytes) -> None:
        """Queue one frame; wait while ``max_buffer`` bytes are already queued."""
        while True:
            if self._closed:
                raise trio.ClosedResourceError("endpoint closed")
            if self._broken is not None:
                raise trio.BrokenResourceError(f"connection broken: {self._broken}")
            if len(self._buf) < self.max_buffer:
                break
            self._room = trio.Event()
            await self._room.wait()
        self._buf += frame
        self.stats.frames_sent += 1
        self.stats.max_buffered = max(self.stats.max_buffered, len(self._buf))
        self._flushed = trio.Event() if self._flushed.is_set() else self._flushed
        self._data.set()
        # queued = sent: a cancellation now must not make the caller believe it was not
        await trio.lowlevel.cancel_shielded_checkpoint()

    def queue_nowait(self, data: bytes) -> None:
        """Queue bytes without waiting for room (for traffic the caller bounds itself)."""
        if self._closed:
            raise trio.ClosedResourceError("endpoint closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"connection broken: {self._broken}")
        self._buf += data
        self.stats.max_buffered = max(self.stats.max_buffered, len(self._buf))
        self._flushed = trio.Event() if self._flushed.is_set() else self._flushed
        self._data.set()

    async def run_writer(self) -> None:
        """Writer task: flush the buffer, coalescing everything queued meanwhile."""
        try:
            while True:
                if not self._buf:
                    self._flushed.set()
                    self._data = trio.Event()
                    await self._data.wait()
                    await trio.lowlevel.checkpoint()  # let senders that run now join this write
                chunk = bytes(self._buf[:COALESCE_MAX])
                if self._first_fds:
                    fds, self._first_fds = self._first_fds, []
                    n = await self.sock.sendmsg([chunk], [scm_rights(fds)])
                else:
                    n = await self.sock.send(chunk)
                del self._buf[:n]
                self.stats.writes += 1
                self.stats.bytes_written += n
                self._room.set()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._broken = e
        finally:
            self._room.set()
            self._flushed.set()

    # -- receiving -------------------------------------------------------------------------
    async def receive(self) -> bytes:
        """Some bytes from the peer (any frame split), ``b""`` at end of stream."""
        try:
            if self._collect:
                data, anc, flags, _ = await self.sock.recvmsg(READ_SIZE, socket.CMSG_SPACE(4 * MAX_FDS))
                self._take_fds(anc, flags)
            else:
                data = await self.sock.recv(READ_SIZE)
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            return b""
        except OSError as e:
            if e.errno == errno.EBADF:
                raise trio.ClosedResourceError("endpoint closed") from None
            return b""
        self.stats.reads += 1
        self.stats.bytes_read += len(data)
        return data

    def _take_fds(self, anc, flags: int) -> None:
        for fd in received_fds(anc):
            if len(self.received_fds) < MAX_FDS and not flags & socket.MSG_CTRUNC:
                self.received_fds.append(fd)
            else:
                os.close(fd)

    def take_fds(self) -> list[int]:
        """Hand over the fds received so far (the caller closes them)."""
        fds, self.received_fds = self.received_fds, []
        return fds

    # -- closing ---------------------------------------------------------------------------
    async def flush(self, timeout_s: float = 1.0) -> None:
        """Wait (bounded) until the queued bytes are written."""
        with trio.move_on_after(timeout_s):
            while self._buf and self._broken is None:
                await self._flushed.wait()
                if self._buf:
                    await trio.sleep(0.001)

    async def aclose(self) -> None:
        """Flush briefly, close the socket and any fds still held."""
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            await self.flush()
        self._closed = True
        self._room.set()
        self._data.set()
        for fd in self.take_fds():
            os.close(fd)
        self.sock.close()
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_stream_endpoint(sock: trio.socket.SocketType, **kw) -> AsyncIterator[StreamEndpoint]:
    """A :class:`StreamEndpoint` with its writer task running; closed on exit."""
    ep = StreamEndpoint(sock, **kw)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ep.run_writer)
        try:
            yield ep
        finally:
            await ep.aclose()
            nursery.cancel_scope.cancel()


# ---- sockets ------------------------------------------------------------------------------


class ListenError(Exception):
    """An address this process cannot listen on; the message says why and what to do."""


def _prepare_unix_path(addr: Address) -> None:
    """Check a unix socket path can be bound: its folder exists and is writable; a stale socket
    file (nobody listening) is removed; anything else there is refused (ListenError)."""
    path = addr.socket_path
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ListenError(f"cannot listen on {addr}: the folder {folder} does not exist; create it or "
                          "choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ListenError(f"cannot listen on {addr}: the folder {folder} is not writable; choose another path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"cannot listen on {addr}: {path} exists and is not a socket; remove it or "
                          "choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: left by a process that died
        return
    finally:
        probe.close()
    raise ListenError(f"cannot listen on {addr}: another process (another hintpipe host?) is listening "
                      "there; stop it or choose another path")


async def open_listener(addr: Address, backlog: int = 64):
    """A listening trio socket for ``addr`` (unix and shm: mode 0600, stale file replaced).
    Raises ListenError, one sentence naming the address, when that is impossible."""
    if addr.kind in ("unix", "shm"):
        _prepare_unix_path(addr)
    sock = None
    tmp = addr.socket_path
    try:
        if addr.kind in ("unix", "shm"):
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # bound under a temporary name and renamed once listening, so whoever sees the path
            # can connect at once (no window between bind and listen); direct if too long
            path = addr.socket_path
            tmp = f"{path}.{os.getpid()}.tmp"
            if len(os.fsencode(tmp)) > 107:
                tmp = path
            old = os.umask(0o177)  # the socket file is created 0600: only this user may connect
            try:
                await sock.bind(tmp)
            finally:
                os.umask(old)
            os.chmod(tmp, 0o600)
            sock.listen(backlog)
            if tmp != path:
                os.rename(tmp, path)
        else:
            try:
                infos = await trio.socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise ListenError(f"cannot listen on {addr}: the host name does not resolve ({e.strerror})") from None
            family, _, _, _, sockaddr = infos[0]
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind(sockaddr)
            sock.listen(backlog)
    except OSError as e:
        if sock is not None:
            sock.close()
            if addr.kind in ("unix", "shm") and tmp != addr.socket_path:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        why = {errno.EADDRINUSE: "the address is in use (another hintpipe host?); choose another port or stop it",
               errno.EACCES: "permission denied; choose another address (ports below 1024 need root)",
               errno.EADDRNOTAVAIL: "no interface of this machine has that address"}.get(
                   e.errno, f"{e.strerror or e}")
        raise ListenError(f"cannot listen on {addr}: {why}") from None
    return sock


async def connect(addr: Address):
    """A connected trio socket to ``addr`` (the shm kind connects to its control socket)."""
    if addr.kind in ("unix", "shm"):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(addr.socket_path)
        except BaseException:
            sock.close()
            raise
        return sock
    infos = await trio.socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    family, _, _, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect(sockaddr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


async def recv_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    """Read exactly ``n`` bytes (raises EOFError if the stream ends first)."""
    buf = bytearray()
    while len(buf) < n:
        data = await sock.recv(n - len(buf))
        if not data:
            raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


async def sendall(sock: trio.socket.SocketType, data: bytes) -> None:
    """Write all of ``data``."""
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


def auth_mac(secret: bytes, nonce: bytes) -> bytes:
    """HMAC-SHA256 over ``"hintpipe-auth-v1" + nonce`` with the shared secret."""
    return hmac.new(secret, AUTH_CONTEXT + nonce, hashlib.sha256).digest()


async def auth_client(sock: trio.socket.SocketType, secret: bytes) -> None:
    """Guest side of the TCP challenge-response (before any v1 frame)."""
    await sendall(sock, AUTH_MAGIC)
    nonce = await recv_exactly(sock, AUTH_NONCE)
    await sendall(sock, auth_mac(secret, nonce))


async def auth_server(sock: trio.socket.SocketType, secret: bytes) -> None:
    """Host side: demand the magic, send a fresh nonce, check the MAC. Raises AuthError."""
    try:
        magic = await recv_exactly(sock, len(AUTH_MAGIC))
        if magic != AUTH_MAGIC:
            raise AuthError("this host requires authentication (guest needs --secret)")
        nonce = os.urandom(AUTH_NONCE)
        await sendall(sock, nonce)
        mac = await recv_exactly(sock, 32)
    except EOFError as e:
        raise AuthError(f"authentication aborted: {e}") from None
    if not hmac.compare_digest(mac, auth_mac(secret, nonce)):
        raise AuthError("authentication failed (wrong secret)")
