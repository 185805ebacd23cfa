"""The names a user chooses between: race modes, memory kinds, write-tracking backends, workloads,
replay policies, the host guards ``--break`` can turn off.

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
BACKINGS = ("shmem", "hugetlb", "thp")
"""What backs real guest RAM (``--backing``): 4 KiB shmem pages, 2 MiB hugetlbfs pages, or shmem
advised to use transparent huge pages (:mod:`hintpipe.linux.backing`)."""
WORKLOADS = ("churn", "idle", "race")
"""Synthetic guest workloads (``replay`` is a recorded kernel, chosen by ``hintpipe replay``);
``race`` is churn plus a guest aiming at hinting's races (:class:`~hintpipe.guest.workload.RaceWorkload`)."""
GUARDS = {
    "refuse-written": "the page state refuses a hint for a page written since its round began",
    "stale-drop": "the host connection drops Hints frames that arrive under a stopped command id",
    "invalidate": "a write fault (or a scan that finds a write) clears the page's skip bit",
    "scan-before-send": "uffd-async: the full scan of written pages before each round's send set "
                        "is taken (the final one with the guest paused)",
    "reclaim-check": "--reclaim: a backing page is discarded only while every page of it is hinted and "
                     "unwritten since, checked under the lock write faults take",
}
"""The host's safety guards, by the name ``--break`` takes, and what each does. Turning one off
(``RunConfig.broken``) is a demonstration that the loss oracle catches what it protects against,
never a setting: such a run is never reported verified."""
POLICY_NAMES = ("hintpipe", "page-reporting", "balloon-hint", "none")
"""Hinting policies ``hintpipe replay --policy`` compares (hintpipe/trace/policies.py), in the
order ``--policy all`` runs and reports them."""


def policy_names(requested: list[str] | tuple[str, ...]) -> list[str]:
    """Expand ``all`` and drop repeats (``all`` in the order of :data:`POLICY_NAMES`);
    ValueError with the choices for an unknown name."""
    out: list[str] = []
    for name in requested:
        for n in POLICY_NAMES if name == "all" else (name,):
            if n not in POLICY_NAMES:
                raise ValueError(f"unknown policy {n!r}: choose from {', '.join(POLICY_NAMES)} or all")
            if n not in out:
                out.append(n)
    return out
