"""How long a side waits for a silent peer (wire-v1 section 9.1), without I/O or a clock.

A side that has heard no frame from its peer for ``ping_after_s`` sends one ``Ping`` (when
KEEPALIVE is in force); a peer that sent nothing at all, not even the ``Pong``, for
``timeout_s`` is gone: the side closes the connection with ``Error(TIMEOUT)``. Every bound is the
receiving side's own, so the two sides need not agree on them. The adapter passes in the time
(trio's clock, so tests run it on a ``MockClock``) and does the sending.
"""

from __future__ import annotations

import enum

__all__ = ["IdleVerdict", "IdleTimer", "PING_FRACTION", "CONFIRM_PASSES"]

CONFIRM_PASSES = 3
"""Scheduling passes an adapter lets its reader run before it acts on EXPIRED: a starved process
wakes its timer and its reader together, and a frame may be waiting unread."""

PING_FRACTION = 0.25
"""A Ping goes out after this fraction of the idle bound without a frame: the peer then has the
other three quarters to answer it."""


class IdleVerdict(enum.Enum):
    """What :meth:`IdleTimer.check` asks the adapter to do."""

    WAIT = "wait"
    """The peer was heard recently enough: check again at :attr:`IdleTimer.next_check`."""
    PING = "ping"
    """Silent for ``ping_after_s``: send one Ping (if KEEPALIVE is in force)."""
    EXPIRED = "expired"
    """Silent for ``timeout_s``: the peer is gone or stopped."""


class IdleTimer:
    """The idle bound one side keeps on its peer; times are seconds on the adapter's clock."""

    def __init__(self, timeout_s: float, now: float, *, ping_fraction: float = PING_FRACTION) -> None:
        if not timeout_s > 0:
            raise ValueError(f"idle timeout must be positive, got {timeout_s!r}")
        if not 0 < ping_fraction < 1:
            raise ValueError(f"ping_fraction must be in (0, 1), got {ping_fraction!r}")
        self.timeout_s = float(timeout_s)
        self.ping_after_s = self.timeout_s * ping_fraction
        self.last_heard = now
        self._pinged = False
        self._checked_at = now

    def heard(self, now: float) -> None:
        """A frame arrived from the peer (any frame: it is alive)."""
        self.last_heard = max(self.last_heard, now)
        self._pinged = False

    @property
    def silent_since(self) -> float:
        """When the peer was last heard."""
        return self.last_heard

    @property
    def next_check(self) -> float:
        """When to call :meth:`check` next: when a Ping falls due, or, while a Ping is
        unanswered, at the bound (and at least every ``ping_after_s``, so a Pong heard meanwhile
        lets the next Ping go out on time)."""
        if self._pinged:
            return min(self.last_heard + self.timeout_s, self._checked_at + self.ping_after_s)
        return self.last_heard + self.ping_after_s

    def check(self, now: float) -> IdleVerdict:
        """The verdict at ``now``; a PING is given once per silence (the adapter sends it)."""
        self._checked_at = now
        silent = now - self.last_heard
        if silent >= self.timeout_s:
            return IdleVerdict.EXPIRED
        if silent >= self.ping_after_s and not self._pinged:
            self._pinged = True
            return IdleVerdict.PING
        return IdleVerdict.WAIT
