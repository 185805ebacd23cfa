"""Thin typed bindings of what the Linux kernel offers hintpipe, with no policy in them.

:mod:`~hintpipe.linux.userfaultfd` (userfaultfd(2) and its write-protect ioctls),
:mod:`~hintpipe.linux.pagemap` (the PAGEMAP_SCAN ioctl), :mod:`~hintpipe.linux.memfd` (guest RAM
in a memfd, page patterns, stores that never hold the GIL), :mod:`~hintpipe.linux.backing`
(memfd backings, huge pages, punching holes, resident size), :mod:`~hintpipe.linux.fdpass`
(SCM_RIGHTS and peer credentials on unix sockets) and :mod:`~hintpipe.linux.ioctl` (request
encoding). Guest and host code alike build on them; which backend to use is decided in
:mod:`hintpipe.wp`.
"""
