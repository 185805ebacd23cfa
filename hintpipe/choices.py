"""The names a user chooses between: race modes, memory kinds, write-tracking backends, workloads.

Plain tuples with no imports, so the command line can offer them (``--help``, argument checks)
without loading numpy or trio; the modules that act on a choice import them from here.
"""

RACE_MODES = ("detect", "isolate")
"""``detect``: hinted blocks stay allocatable, write-protect catches their reuse; ``isolate``:
they leave the free lists until the host acks them (as Linux free page reporting does)."""
MEMORY_KINDS = ("sim", "real")
"""``sim``: a version per page; ``real``: page bytes in a memfd, compared byte for byte."""
WP_CHOICES = ("sim", "uffd", "uffd-async", "auto", "off")
"""Values of ``--wp``."""
WORKLOADS = ("churn", "idle")
"""Synthetic guest workloads (``replay`` is a recorded kernel, chosen by ``hintpipe replay``)."""
