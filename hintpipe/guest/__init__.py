"""The guest side: buddy allocator, free-list walker, hinting producer, workloads, guest memory
and the zone lock."""
