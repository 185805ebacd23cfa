"""Helpers of the tests that run hintpipe processes: their environment, a free TCP port, and a
process's resident memory."""

from __future__ import annotations

import os
import socket


def runtime_env(tmp_path) -> dict:
    """This process's environment with hintpipe's runtime folder (sockets, shm names) in ``tmp_path``."""
    return dict(os.environ, HINTPIPE_RUNTIME_DIR=str(tmp_path))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` (VmRSS), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
