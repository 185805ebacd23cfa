"""hintpipe: free page hinting for live migration.

A guest-side producer walks the buddy allocator's free lists in lock-bounded batches and sends
PFN ranges (wire protocol v1, ``protocols/wire-v1.md``) to a host consumer, which keeps a skip
bitmap of pages it need not send; write-protect faults invalidate skips of pages the guest reuses.
"""

__version__ = "0.1.0"
