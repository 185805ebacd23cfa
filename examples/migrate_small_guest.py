"""Migrate a small simulated guest with hinting, from Python instead of the CLI.

Run: python examples/migrate_small_guest.py

Shows the configuration objects behind ``hintpipe demo`` and the report it returns.
"""

from hintpipe.config import RunConfig
from hintpipe.guest.workload import WorkloadConfig
from hintpipe.host.migration import MigrationConfig
from hintpipe.inprocess import run_demo

cfg = RunConfig(
    pages=1 << 16,  # 256 MiB
    workload=WorkloadConfig(kind="churn", static_fraction=0.4, churn_fraction=0.2, seed=7),
    migration=MigrationConfig(bandwidth_gbit=10.0, downtime_ms=100.0),
    batch=32,
    min_order=9,
    race_mode="isolate",
)
rep = run_demo(cfg)
m = rep["migration"]
print(f"sent {m['pages_sent']} pages instead of {m['pages_sent_baseline']} ({m['pages_saved_pct']}% saved), "
      f"{m['rounds']} rounds, lost {m['lost_pages']}, verified {m['verified']}")
