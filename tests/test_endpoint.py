"""Every transport implements the one Endpoint protocol the producer and the session use."""

from __future__ import annotations

import pytest

from hintpipe.channel.endpoint import Endpoint, FdEndpoint
from hintpipe.channel.inproc import FrameEndpoint, inproc_pair
from hintpipe.channel.records import RecordEndpoint
from hintpipe.channel.shm import ShmEndpoint
from hintpipe.channel.stream import StreamEndpoint


@pytest.mark.parametrize("cls", [FrameEndpoint, StreamEndpoint, ShmEndpoint, RecordEndpoint])
def test_transports_are_endpoints(cls):
    assert issubclass(cls, Endpoint)


@pytest.mark.parametrize("cls", [StreamEndpoint, ShmEndpoint, RecordEndpoint])
def test_fd_carrying_transports_hand_over_fds(cls):
    assert issubclass(cls, FdEndpoint)


def test_the_in_process_link_carries_no_fds():
    guest_end, _ = inproc_pair(4)
    assert isinstance(guest_end, Endpoint) and not isinstance(guest_end, FdEndpoint)
