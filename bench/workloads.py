"""Workloads to record the page allocator under (``python bench/workloads.py NAME [options]``).

Each exercises one allocation pattern; the fidelity corpus (bench/corpus.py) and the recorder's
loss measurements (bench/recorder.py) run them under ``hintpipe record``.

- ``pagecache``: write a file of ``--mb`` MB in ``--bs``-byte writes, read it back, delete it, drop
  the caches (the workload of issue 12: 600 MB by default).
- ``churn``: ``--workers`` processes map ``--map-mb`` MB of anonymous memory with 4 KiB pages
  (MADV_NOHUGEPAGE), touch every page, unmap, for ``--seconds``: the highest event rate.
- ``thp``: map 1 GiB anonymous with MADV_HUGEPAGE, touch, unmap, ``--rounds`` times.
- ``fork``: a shell loop forking ``--count`` short processes.
- ``make``: generate ``--files`` small C files and build them with ``make -j2``.
- ``numpy``: array arithmetic, sorting and temporaries of tens of MB for ``--seconds``.
- ``idle``: sleep ``--seconds`` (the guest's own background activity).
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAGE = mmap.PAGESIZE


def _touch(m: mmap.mmap) -> None:
    import numpy as np
    a = np.frombuffer(m, np.uint8)
    a[::PAGE] = 1  # one write per page: one fault, one page allocation
    del a


def _churn_worker(seconds: float, map_mb: int, out) -> None:
    size = map_mb << 20
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_NOHUGEPAGE)
        _touch(m)
        m.close()
        n += size // PAGE
    out.put(n)


def churn(seconds: float, workers: int, map_mb: int) -> int:
    """Pages touched by ``workers`` processes mapping, touching and unmapping for ``seconds``."""
    q = mp.Queue()
    ps = [mp.Process(target=_churn_worker, args=(seconds, map_mb, q)) for _ in range(workers)]
    for p in ps:
        p.start()
    total = sum(q.get() for _ in ps)
    for p in ps:
        p.join()
    return total


def thp(rounds: int, gib: float = 1.0) -> None:
    """Map, touch and unmap ``gib`` GiB with transparent huge pages, ``rounds`` times."""
    size = int(gib * (1 << 30))
    for _ in range(rounds):
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
        _touch(m)
        m.close()


def pagecache(mb: int, where: str, bs: int = 4096) -> None:
    """Fill the page cache with a file of ``mb`` MB, read it back, delete it, drop caches."""
    # Writes of ``bs`` bytes: ext4 on 6.18 allocates page-cache folios of the write's size, so
    # 4 KiB writes allocate order-0 pages one by one (1 MiB writes take large folios: 30x fewer
    # events).
    f = Path(where) / f"hintpipe-pagecache-{os.getpid()}.bin"
    chunk = os.urandom(1 << 20)  # incompressible, so no filesystem trick skips the pages
    try:
        with open(f, "wb", buffering=0) as out:
            for _ in range(mb):
                for o in range(0, 1 << 20, bs):
                    out.write(chunk[o:o + bs])
        with open(f, "rb", buffering=0) as src:
            while src.read(bs):
                pass
    finally:
        f.unlink(missing_ok=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fork(count: int) -> None:
    """A shell loop running ``count`` short processes."""
    subprocess.run(["sh", "-c", f"i=0; while [ $i -lt {count} ]; do /bin/true; i=$((i+1)); done"], check=True)


def make(files: int, where: str) -> None:
    """Generate ``files`` small C files and build them with ``make -j2``."""
    with tempfile.TemporaryDirectory(dir=where) as d:
        dd = Path(d)
        for i in range(files):
            (dd / f"f{i}.c").write_text(
                "#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n"
                f"struct s{i} {{ int a[{i % 17 + 1}]; double b; char name[32]; }};\n"
                f"int fn{i}(int x) {{ struct s{i} v; memset(&v, 0, sizeof v);\n"
                f"  for (int k = 0; k < x; k++) v.a[k % {i % 17 + 1}] += k * {i};\n"
                f"  snprintf(v.name, sizeof v.name, \"%d\", v.a[0]); return (int)strlen(v.name) + {i}; }}\n")
        (dd / "main.c").write_text("int main(void) { return 0; }\n")
        objs = " ".join(f"f{i}.o" for i in range(files))
        (dd / "Makefile").write_text(f"prog: main.o {objs}\n\tcc -o $@ $^\n%.o: %.c\n\tcc -O2 -c -o $@ $<\n")
        subprocess.run(["make", "-s", "-j2"], cwd=dd, check=True)


def numpy_job(seconds: float) -> None:
    """Array arithmetic, sorts and temporaries of tens of MB for ``seconds``."""
    import numpy as np
    rng = np.random.default_rng(1)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a = rng.random(4_000_000)
        b = np.sort(a)
        c = (a[:, None] * b[:1])[:, 0] + np.cumsum(b)
        m = rng.random((700, 700))
        m = m @ m.T
        del a, b, c, m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=["pagecache", "churn", "thp", "fork", "make", "numpy", "idle"])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--map-mb", type=int, default=64)
    ap.add_argument("--mb", type=int, default=600)
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--where", default=tempfile.gettempdir(), help="folder for the page-cache file and the build")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    if a.name == "pagecache":
        pagecache(a.mb, a.where, a.bs)
    elif a.name == "churn":
        print(f"churn: {churn(a.seconds, a.workers, a.map_mb)} pages touched", file=sys.stderr)
    elif a.name == "thp":
        thp(a.rounds)
    elif a.name == "fork":
        fork(a.count)
    elif a.name == "make":
        make(a.files, a.where)
    elif a.name == "numpy":
        numpy_job(a.seconds)
    else:
        time.sleep(a.seconds)
    print(f"{a.name}: {time.monotonic() - t0:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
