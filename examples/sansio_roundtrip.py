"""The wire protocol without any I/O: a guest and a host state machine exchanging bytes.

Run: python examples/sansio_roundtrip.py

This is how to embed hintpipe's protocol in another event loop or language binding: call the
methods that return bytes, move those bytes however you like, feed what arrives to
``receive_data`` and read events with ``next_event``.
"""

import numpy as np

from hintpipe.protocol import GuestConnection, Hints, HostConnection, RoundEnd

guest, host = GuestConnection(), HostConnection()

host.receive_data(guest.hello(page_count=1 << 20, window=64, name="example"))
print("host got:", host.next_event())
guest.receive_data(host.welcome(max_ranges=4096))
print("guest got:", guest.next_event())

guest.receive_data(host.start_round())
start = guest.next_event()
print("guest got:", start)

# two free 2 MiB blocks (order 9) and one 4 MiB block (order 10), as [start_pfn, npages]
ranges = np.array([[512, 512], [4096, 1024], [8192, 512]], dtype=np.uint64)
frame = guest.hints(start.cmd_id, ranges)
print(f"Hints frame: {len(frame)} bytes for {len(ranges)} ranges")
host.receive_data(frame)
ev = host.next_event()
assert isinstance(ev, Hints)
print("host got ranges:", ev.ranges.tolist())
guest.receive_data(host.ack(1))
print("guest got:", guest.next_event(), "credits:", guest.credits_available)

# a bad range (not aligned to its size) is a protocol error with a code, never a crash
bad = np.array([[100, 512]], dtype=np.uint64)
host.receive_data(guest.hints(start.cmd_id, bad, validate=False))
try:
    host.next_event()
except Exception as e:  # ProtocolError
    print("host rejects:", e)
    print("error frame to send back:", host.error(e.code, e.message)[:16].hex(), "...")

# a well-behaved guest ends its round like this (on a fresh pair, since the host above closed)
g2, h2 = GuestConnection(), HostConnection()
h2.receive_data(g2.hello(page_count=1 << 20)); h2.next_event()
g2.receive_data(h2.welcome()); g2.next_event()
g2.receive_data(h2.start_round()); sr = g2.next_event()
h2.receive_data(g2.round_end(sr.cmd_id, 0))
assert isinstance(h2.next_event(), RoundEnd)
print("round", hex(sr.cmd_id), "ended cleanly")
