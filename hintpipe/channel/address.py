"""Transport addresses: ``unix:PATH``, ``tcp:HOST:PORT`` (``tcp:PORT`` = loopback) and ``shm:NAME``.

``shm:NAME`` names a shared-memory link whose rendezvous is a unix control socket: a NAME with a
``/`` is that socket's path; a bare NAME (letters, digits, ``.-_``) lives in the runtime directory
(``$HINTPIPE_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR``, else ``/tmp``) as ``hintpipe-NAME.shm.sock``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class AddressError(ValueError):
    """A malformed address (the message says which form was expected)."""


@dataclass(frozen=True)
class Address:
    """A parsed address; ``kind`` is ``unix``, ``tcp`` or ``shm``."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0
    name: str = ""

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        if self.kind == "shm":
            return f"shm:{self.name}"
        return f"unix:{self.path}"

    @property
    def socket_path(self) -> str:
        """The unix socket path (unix: the data socket; shm: the control socket)."""
        return self.path

    def is_loopback(self) -> bool:
        """True for unix/shm addresses and for tcp on a loopback host."""
        if self.kind != "tcp":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def runtime_dir() -> str:
    """Directory of bare-named shm control sockets."""
    return os.environ.get("HINTPIPE_RUNTIME_DIR") or os.environ.get("XDG_RUNTIME_DIR") or "/tmp"


def parse_address(text: str) -> Address:
    """Parse ``unix:PATH``, ``tcp:HOST:PORT`` (``[v6]:PORT`` for IPv6) or ``shm:NAME``."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise AddressError(f"bad address {text!r}: expected unix:PATH, tcp:HOST:PORT or shm:NAME")
    if kind == "unix":
        if len(os.fsencode(rest)) > 107:
            raise AddressError(f"unix socket path too long (max 107 bytes): {rest!r}")
        return Address("unix", path=rest)
    if kind == "tcp":
        if rest.isdigit():  # tcp:PORT = loopback
            rest = f"127.0.0.1:{rest}"
        if rest.startswith("["):
            host, _, port = rest[1:].partition("]:")
        else:
            host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise AddressError(f"bad tcp address {text!r}: expected tcp:HOST:PORT")
        return Address("tcp", host=host, port=int(port))
    if kind == "shm":
        if "/" in rest:
            path = rest
        elif _NAME_RE.match(rest):
            path = os.path.join(runtime_dir(), f"hintpipe-{rest}.shm.sock")
        else:
            raise AddressError(f"bad shm name {rest!r}: letters, digits and ._- (or a socket path)")
        if len(os.fsencode(path)) > 107:
            raise AddressError(f"shm control socket path too long (max 107 bytes): {path!r}")
        return Address("shm", path=path, name=rest)
    raise AddressError(f"unknown address kind {kind!r}: expected unix:, tcp: or shm:")
