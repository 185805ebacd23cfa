"""Transports of v1 frames: the split virtqueue, the in-process link, unix and tcp streams, the
shared-memory rings, the tcp record layer and addresses, all behind one Endpoint protocol."""
