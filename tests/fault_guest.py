"""``hintpipe guest`` that SIGKILLs itself at a chosen point of the protocol (for the fault tests).

    python tests/fault_guest.py KILL_AT GUEST_ARGS...

``KILL_AT`` is ``batch:N`` (half of the guest's N-th Hints frame is on the wire, the rest never
follows) or ``round:N`` (the N-th StartRound has arrived: the host is sending that round's pages).
Everything else is the real guest (:func:`hintpipe.cli.main` with ``guest GUEST_ARGS``); only its
endpoint is wrapped, so the kill lands at the same protocol point on every transport and run.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hintpipe, not an installed one

import hintpipe.paired.guest as guest_mod  # noqa: E402
from hintpipe.cli import main  # noqa: E402
from hintpipe.protocol import FrameDecoder, StartRound  # noqa: E402


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillingEndpoint:
    """The guest's endpoint, killing the process at ``kind``:``n``."""

    def __init__(self, ep, kind: str, n: int) -> None:
        self._ep = ep
        self._kind = kind
        self._n = n
        self._seen = 0
        self._dec = FrameDecoder()

    def __getattr__(self, name):
        return getattr(self._ep, name)

    async def send_frame(self, frame: bytes) -> None:
        if self._kind == "batch" and frame[4:6] == b"\x93\x05":  # [5 = Hints, cmd_id, ranges]
            self._seen += 1
            if self._seen == self._n:
                await self._ep.send_frame(frame[:len(frame) // 2])
                await trio.sleep(0.2)  # the transport's writer puts the half frame on the wire
                _die()
        await self._ep.send_frame(frame)

    async def receive(self) -> bytes:
        data = await self._ep.receive()
        if self._kind == "round" and data:
            self._dec.feed(data)
            while (msg := self._dec.next_message()) is not None:
                if isinstance(msg, StartRound):
                    self._seen += 1
                    if self._seen == self._n:
                        _die()
        return data


def run(kill_at: str, argv: list[str]) -> int:
    kind, n = kill_at.split(":")
    opened = guest_mod._open_endpoint

    async def open_killing(*args, **kw):
        return KillingEndpoint(await opened(*args, **kw), kind, int(n))

    guest_mod._open_endpoint = open_killing
    return main(["guest", *argv])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
