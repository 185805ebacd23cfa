"""Test-session settings shared by every test module."""

import atexit
import os
import shutil
import tempfile

# Trace caches (hintpipe.trace.cache) of the recordings in tests/data go to a folder of this
# session, not beside the data: tests see the same first-run behaviour every time, and the
# checkout stays clean. Subprocesses inherit the setting.
if "HINTPIPE_TRACE_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="hintpipe-test-cache-")
    os.environ["HINTPIPE_TRACE_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
