"""Real page-allocator traces: recording folders (protocols/recording-v1.md: ring-buffer pages or
tracefs text, kpageflags snapshots), the live recorder, hintpipe trace-v1 (protocols/trace-v1.md)
and its cache of recordings, and a replay model of the buddy allocator.

Entry points::

    tr = open_trace("recording-folder-or-file.hpt", cache=True)   # Trace (cache: recordings only)
    events = tr.events()                               # EventBatch, all events in trace order
    model = tr.model()                                 # ReplayModel
    allocated, freed = model.advance_to(t_ns)
    convert(recording_dir, "out.hpt"); inspect(path); record(outdir, duration, command)
"""

from .errors import RecordError, TraceError
from .events import COLUMNS, EVENT_NAMES, EventBatch, EventType
from .summary import inspect, render_text, replay_report
from .model import ReplayModel
from .record import record
from .recording import Trace, convert, open_recording, open_trace
from .snapshot import count_by_order, decompose, parse_buddyinfo, read_kpageflags_buddy

__all__ = [
    "COLUMNS", "EVENT_NAMES", "EventBatch", "EventType", "RecordError", "ReplayModel", "Trace", "TraceError",
    "convert", "count_by_order", "decompose", "inspect", "open_recording", "open_trace", "parse_buddyinfo",
    "read_kpageflags_buddy", "record", "render_text", "replay_report",
]
