"""Record your own VM's page allocator, then replay it through hinting and a migration.

Run (inside the VM you want to evaluate, as root, to record it):
    sudo python examples/record_and_replay.py [OUTDIR]

Recording needs root, tracefs and /proc/kpageflags; where those are missing this program says
why and replays the recording shipped in examples/traces/ instead. The same steps from the
shell: ``sudo hintpipe record OUTDIR -- COMMAND``, then ``hintpipe replay OUTDIR``.
"""

import os
import sys
import tempfile
from pathlib import Path

from hintpipe.config import RunConfig
from hintpipe.host.migration import MigrationConfig
from hintpipe.report import format_replay
from hintpipe.trace import RecordError, convert, open_trace, record
from hintpipe.trace.replay import replay_outcome

SHIPPED = Path(__file__).parent / "traces" / "numpy-churn"
# what to record: a short burst of allocation (use your real workload here)
WORKLOAD = [sys.executable, "-c", "blocks = [bytearray(8 << 20) for _ in range(12)]; del blocks"]

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "my-recording"
try:
    summary = record(out, command=WORKLOAD)
    print(f"recorded {summary['events']:,} events in {summary['seconds']} s into {out}")
    trace_path = out
except RecordError as e:  # not root, no tracefs, ...: one sentence says which
    print(f"cannot record here ({e}); replaying {SHIPPED} instead")
    trace_path = SHIPPED

# trace-v1 is hintpipe's own columnar format: smaller, and several times faster to read
hpt = Path(tempfile.mkdtemp()) / "trace.hpt"
convert(trace_path, hpt, skip_bad=True)  # a busy machine may drop events: skip what is damaged
print(f"converted to {hpt} ({os.path.getsize(hpt):,} bytes)")

cfg = RunConfig.for_replay(migration=MigrationConfig(bandwidth_gbit=10.0))
out = replay_outcome(open_trace(hpt), cfg)
print(format_replay(out.report))
raise SystemExit(0 if out.report["migration"]["verified"] else 1)
