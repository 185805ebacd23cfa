"""Split virtqueue semantics: ring layout, wrap-around, backpressure, EVENT_IDX suppression."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from hintpipe.channel.inproc import inproc_pair
from hintpipe.channel.virtqueue import QueueFull, RingLayout, SplitVirtqueue, VirtqueueError, vring_need_event


def test_need_event_matches_the_spec_formula():
    # the device asked to be notified when idx passes 5: moving 4->6 crosses it, 6->7 does not
    assert vring_need_event(5, 6, 4)
    assert vring_need_event(5, 6, 5)
    assert not vring_need_event(5, 7, 6)
    assert not vring_need_event(5, 5, 4)  # 5 not yet used
    # free-running u16 indices wrap
    assert vring_need_event(0xFFFF, 0x0001, 0xFFFE)
    assert not vring_need_event(0xFFFF, 0x0002, 0x0001)


def test_layout_follows_virtio_split_ring():
    lay = RingLayout(256)
    assert lay.desc == 0
    assert lay.avail == 16 * 256
    assert lay.used % 4 == 0 and lay.used >= lay.avail + 6 + 2 * 256
    assert lay.total == lay.used + 6 + 8 * 256
    with pytest.raises(ValueError):
        RingLayout(100)


def test_roundtrip_in_order_across_index_wraparound():
    vq = SplitVirtqueue(8)
    for i in range(70_000):  # the u16 indices wrap past 65535
        vq.add(i.to_bytes(4, "little"))
        desc, data = vq.pop()
        assert int.from_bytes(data, "little") == i
        vq.push_used(desc, len(data))
        assert vq.reclaim() == 1
    assert vq.free_descriptors == 8


def test_full_queue_is_backpressure():
    vq = SplitVirtqueue(4)
    for i in range(4):
        vq.add(b"x")
    with pytest.raises(QueueFull):
        vq.add(b"y")
    desc, _ = vq.pop()
    vq.push_used(desc)
    vq.reclaim()
    vq.add(b"z")  # one slot came back


def test_event_idx_suppresses_kicks_while_device_is_busy():
    with_idx = SplitVirtqueue(64, event_idx=True)
    without = SplitVirtqueue(64, event_idx=False)
    for vq in (with_idx, without):
        vq.enable_kicks()
        for _ in range(10):
            vq.add(b"frame")
    assert with_idx.stats.kicks == 1 and with_idx.stats.kicks_suppressed == 9
    assert without.stats.kicks == 10


def test_interrupt_suppression_until_driver_reclaims():
    vq = SplitVirtqueue(16)
    ids = []
    for _ in range(5):
        vq.add(b"f")
    while (item := vq.pop()) is not None:
        ids.append(item[0])
    irqs = [vq.push_used(d) for d in ids]
    assert irqs == [True, False, False, False, False]
    vq.reclaim()
    vq.add(b"g")
    d, _ = vq.pop()
    assert vq.push_used(d)  # the driver re-armed used_event when it reclaimed


def test_device_rejects_corrupt_ring():
    vq = SplitVirtqueue(8)
    vq._avail[1] = 100  # a driver claiming 100 buffers in an 8-entry ring
    with pytest.raises(VirtqueueError):
        vq.pop()
    vq2 = SplitVirtqueue(8)
    vq2.add(b"a")
    vq2._avail[2] = 9  # descriptor id out of range
    with pytest.raises(VirtqueueError):
        vq2.pop()


def test_driver_rejects_a_used_id_it_did_not_post():
    vq = SplitVirtqueue(8)
    vq.add(b"a")
    vq.add(b"b")
    desc, _ = vq.pop()
    vq.push_used(desc)
    vq.push_used(desc)  # a broken device returns the same descriptor twice
    with pytest.raises(VirtqueueError, match="not in flight"):
        vq.reclaim()


async def test_inproc_link_blocks_sender_at_queue_size(autojump_clock):
    guest, host = inproc_pair(4)
    sent = 0

    async def sender():
        nonlocal sent
        for i in range(10):
            await guest.send_frame(bytes([i]))
            sent += 1

    async with trio.open_nursery() as n:
        n.start_soon(sender)
        await trio.sleep(1)
        assert sent == 4  # the host has not consumed anything: 4 descriptors in flight
        got = [await host.receive() for _ in range(10)]
        assert got == [bytes([i]) for i in range(10)]
    await guest.aclose()
    assert await host.receive() == b""
