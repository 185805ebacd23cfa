"""The programs in examples/ keep working (users copy from them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# what each example must have printed (besides exiting 0 without a traceback)
SAYS = {
    "compare_settings.py": "batch512-order9",
    "custom_workload.py": "lost 0",
    "embed_in_trio.py": "verified",
    "migrate_small_guest.py": "verified True",
    "record_and_replay.py": "VERIFIED",
    "sansio_roundtrip.py": "ended cleanly",
    "two_processes.py": "'child' migrated",
}


def test_every_example_is_checked():
    assert sorted(p.name for p in EXAMPLES) == sorted(SAYS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    # the checkout's package, not an installed copy: a script's own folder is on sys.path, not ROOT
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert SAYS[path.name] in proc.stdout
