"""Paired processes: a guest and its host as two processes, the way a VM and its VMM are.

:mod:`~hintpipe.paired.guest` (``hintpipe guest``) and :mod:`~hintpipe.paired.host`
(``hintpipe host``) drive them; :mod:`~hintpipe.paired.region` is the guest RAM they share (a
sealed memfd), :mod:`~hintpipe.paired.barrier` the round barrier and pause handshakes on its
control words, :mod:`~hintpipe.paired.handoff` the real-memory handoff (RAM memfd and
userfaultfd over SCM_RIGHTS) and :mod:`~hintpipe.paired.mirror` the copy of the region a tcp host
keeps from the guest's memory records.
"""
