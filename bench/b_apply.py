"""Benchmark 1: host apply, hinted ranges into the skip bitmap of a 2**24-page (64 GiB) guest.

The standard set: 1.7 M naturally aligned blocks, orders 0..10 drawn with P(k) ~ 2**-k
(seeded), packed into randomly placed 1024-page superblocks, so they are disjoint and spread over
the whole guest (about 9.3 M pages, 55 % of it). The main figure feeds them, as
``(starts, orders)`` the way Hints events carry them, in the order hintpipe's walker sends them
(top order first, ascending pfn) to ``HostPageState.apply_blocks`` in one call; a shuffled copy is
the worst case (the kernel's free lists are in no order). Frames: the first 200 k blocks cut into
frames of 32 (the walker's default batch) and fed as the host session does, staged frame by frame
(``stage_hints``) and applied together (``flush``); beside it, one ``apply_blocks`` call per
frame.

Yardsticks in the same run: a C loop doing the same marking on the same bitmaps
(``bench/c/apply_yardstick.c``, built here with the system compiler at ``-O2 -march=native``;
without a compiler the figure is null and the table says why), runs interleaved with numpy's so
both see the same machine load; a pure-Python loop per range (timed on a subset and
extrapolated) and the obvious numpy one (expand every block to its pages, one scatter), both on
byte-per-page arrays of their own.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from common import BENCH_DIR, rate, row, timeit

from hintpipe.host.pagebits import PageBits
from hintpipe.host.pagestate import HostPageState
from hintpipe.units import pages_order

PAGES = 1 << 24
N_BLOCKS = 1_700_000
GOAL = 50.0  # M ranges/s, bulk
GOAL_C_RATIO = 0.5  # bulk apply / the C loop, same run
GOAL_FRAMES32 = 10.0  # M ranges/s, 32-range frames as the session stages them
FRAME = 32
FRAMES_BLOCKS = 200_000
C_SOURCE = BENCH_DIR / "c" / "apply_yardstick.c"


def standard_set(n: int = N_BLOCKS, pages: int = PAGES, seed: int = 1, max_order: int = 10) -> np.ndarray:
    """(n, 2) uint64 [start, npages], walker order (top order first, ascending start)."""
    rng = np.random.default_rng(seed)
    p = 0.5 ** np.arange(max_order + 1)
    orders = np.sort(rng.choice(max_order + 1, size=n, p=p / p.sum()))[::-1].astype(np.int64)
    sizes = np.int64(1) << orders
    off = np.cumsum(sizes) - sizes  # descending sizes: every offset is aligned to its size
    sb = off >> max_order
    nsb = pages >> max_order
    if sb[-1] >= nsb:
        raise ValueError("blocks do not fit the guest")
    slot = rng.permutation(nsb)[: sb[-1] + 1]
    starts = (slot[sb] << max_order) | (off & ((1 << max_order) - 1))
    idx = np.lexsort((starts, -orders))
    return np.stack([starts[idx], sizes[idx]], 1).astype(np.uint64)


def build_c_yardstick() -> tuple[object | None, str]:
    """Compile and load the C yardstick; (apply function or None, how it was built or why not)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler (cc, gcc or clang) on PATH: C yardstick not measured"
    with tempfile.TemporaryDirectory(prefix="hintpipe-yardstick-") as tmp:
        lib_path = Path(tmp) / "apply_yardstick.so"
        err = ""
        for flags in (["-O2", "-march=native"], ["-O2"]):
            cmd = [cc, *flags, "-shared", "-fPIC", "-o", str(lib_path), str(C_SOURCE)]
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:
                err = getattr(e, "stderr", None) or str(e)
                continue
            lib = ctypes.CDLL(str(lib_path))  # loaded: the file may go
            fn = lib.apply_blocks
            p = ctypes.c_void_p
            fn.argtypes = [p, p, p, p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]
            fn.restype = None
            return fn, f"{Path(cc).name} {' '.join(flags)}"
    return None, f"the C compiler {cc} failed: {err.strip()[:200]}"


def c_apply(fn, skip: np.ndarray, written: np.ndarray, starts: np.ndarray, orders: np.ndarray) -> tuple[int, int]:
    """Run the C yardstick on bitmap bytes ``skip`` (modified) and ``written``; (marked, refused)."""
    marked, refused = ctypes.c_int64(), ctypes.c_int64()
    fn(skip.ctypes.data, written.ctypes.data, starts.ctypes.data, orders.ctypes.data, len(starts),
       ctypes.byref(marked), ctypes.byref(refused))
    return marked.value, refused.value


def python_loop(skip: np.ndarray, written: np.ndarray, ranges: np.ndarray) -> int:
    """The baseline: one slice operation per range on byte-per-page ``bool`` arrays, the same
    semantics as apply_hints."""
    marked = 0
    for s, n in ranges.tolist():
        ok = ~written[s:s + n]
        marked += int(np.count_nonzero(ok & ~skip[s:s + n]))
        skip[s:s + n] |= ok
    return marked


def numpy_expand(skip: np.ndarray, written: np.ndarray, ranges: np.ndarray) -> int:
    """The obvious vectorised baseline: expand every block to its pages, gather and scatter."""
    starts = ranges[:, 0].astype(np.int64)
    sizes = ranges[:, 1].astype(np.int64)
    first = np.cumsum(sizes) - sizes
    pages = np.repeat(starts - first, sizes) + np.arange(int(sizes.sum()))
    ok = ~written[pages]
    marked = int(np.count_nonzero(ok & ~skip[pages]))
    skip[pages[ok]] = True
    return marked


def run(quick: bool = True, n_blocks: int = N_BLOCKS, pages: int = PAGES) -> dict:
    """Measure apply in bulk (beside the C yardstick), frames of 32 staged as the session stages
    them, protocol-sized batches, and both baselines."""
    repeat = 5 if quick else 11
    t0 = time.perf_counter()
    ranges = standard_set(n_blocks, pages)
    rng = np.random.default_rng(2)
    perm = rng.permutation(len(ranges))
    shuffled = ranges[perm]
    starts = np.ascontiguousarray(ranges[:, 0])
    orders = pages_order(ranges[:, 1]).astype(np.uint8)
    starts_sh, orders_sh = starts[perm], orders[perm]
    gen_s = time.perf_counter() - t0
    state = HostPageState(pages)
    state.begin_first_round()  # touches written and dirty; clear_skip touches skip
    # a few pages written this round, so the written check refuses some (as in a live round)
    state.on_written(rng.integers(0, pages, size=pages >> 8))
    written = state.written_in()
    n = len(ranges)
    npages = int(ranges[:, 1].sum())
    reset = state.clear_skip

    out: dict = {"pages": pages, "blocks": n, "block_pages": npages, "gen_s": gen_s,
                 "bytes_per_page": HostPageState.BYTES_PER_PAGE,
                 "blocks_by_order": np.bincount(orders).tolist()}
    # cold: the first call in this process (numpy's first-use costs, fresh temporaries)
    reset()
    t = time.perf_counter()
    marked = state.apply_blocks(starts, orders)
    out["cold_s"] = time.perf_counter() - t
    out["cold_mranges_per_s"] = n / out["cold_s"] / 1e6
    out["marked_pages"] = marked
    out["refused_pages"] = int(npages - marked)
    # bulk, interleaved with the C yardstick on copies of the same bitmaps
    c_fn, c_note = build_c_yardstick()
    out["c_yardstick"] = {"built": c_fn is not None, "note": c_note}
    c_skip = PageBits(pages)
    c_written = PageBits.from_mask(written)
    np_times, c_times = [], []
    for i in range(repeat + 1):
        reset()
        t = time.perf_counter()
        state.apply_blocks(starts, orders)
        dt = time.perf_counter() - t
        if c_fn is not None:
            c_skip.fill(False)
            t = time.perf_counter()
            cm, cr = c_apply(c_fn, c_skip.bytes, c_written.bytes, starts, orders)
            dc = time.perf_counter() - t
            if i == 0:  # the same marking: same bitmap, same counts
                if not (cm == marked and cr == npages - marked and np.array_equal(c_skip.get(), state.skip_in())):
                    raise AssertionError("C yardstick and HostPageState disagree")
            else:
                c_times.append(dc)
        if i:
            np_times.append(dt)
    t = _times(np_times)
    out["bulk_walker_order"] = {**t, "mranges_per_s": rate(n, t)}
    if c_times:
        tc = _times(c_times)
        out["c_yardstick"].update(tc, mranges_per_s=rate(n, tc))
        ratios = [c / p for p, c in zip(np_times, c_times)]
        out["c_ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                          "runs": len(ratios)}
    t = timeit(lambda: state.apply_blocks(starts_sh, orders_sh), repeat=repeat, setup=reset)
    out["bulk_shuffled"] = {**t, "mranges_per_s": rate(n, t)}
    # frames of 32 as the session receives them: staged one by one, applied together
    m = min(n, FRAMES_BLOCKS)
    frames = [(ranges[i:i + FRAME], starts[i:i + FRAME], orders[i:i + FRAME]) for i in range(0, m, FRAME)]

    def staged():
        for r, _, _ in frames:
            state.stage_hints(r)
        state.flush()

    def one_call_each():
        for _, s, o in frames:
            state.apply_blocks(s, o)

    t = timeit(staged, repeat=repeat, setup=reset)
    out["frames32_staged"] = {**t, "ranges": m, "mranges_per_s": rate(m, t)}
    t = timeit(one_call_each, repeat=max(3, repeat // 2), setup=reset)
    out["frames32_one_call_each"] = {**t, "ranges": m, "mranges_per_s": rate(m, t)}
    batches = {}
    for b in (512, 4096):
        parts = [(starts[i:i + b], orders[i:i + b]) for i in range(0, n, b)]

        def go(parts=parts):
            for s, o in parts:
                state.apply_blocks(s, o)

        t = timeit(go, repeat=max(3, repeat // 2), setup=reset)
        batches[str(b)] = {**t, "ranges": n, "mranges_per_s": rate(n, t)}
    out["batched_walker_order"] = batches
    # baselines, on byte-per-page arrays of their own
    skip_b = np.zeros(pages, dtype=bool)

    def reset_b():
        skip_b[:] = False

    mq = min(n, 20_000 if quick else 200_000)
    sub = shuffled[:mq]
    t = timeit(lambda: python_loop(skip_b, written, sub), repeat=3, setup=reset_b)
    out["baseline_python_loop"] = {**t, "ranges_timed": mq, "extrapolated": mq < n,
                                   "mranges_per_s": rate(mq, t),
                                   "est_full_set_s": t["median_s"] * n / mq}
    reset_b()
    reset()
    if python_loop(skip_b, written, ranges[:20_000]) != state.apply_hints(ranges[:20_000]):
        raise AssertionError("python baseline and HostPageState disagree")
    t = timeit(lambda: numpy_expand(skip_b, written, ranges), repeat=max(3, repeat // 2), setup=reset_b)
    out["baseline_numpy_expand"] = {**t, "mranges_per_s": rate(n, t)}
    head = out["bulk_walker_order"]["mranges_per_s"]
    f32 = out["frames32_staged"]["mranges_per_s"]
    out["goal_mranges_per_s"] = GOAL
    out["goal_frames32_mranges_per_s"] = GOAL_FRAMES32
    out["goal_c_ratio"] = GOAL_C_RATIO
    out["host_apply_mranges_per_s"] = head["median"]
    out["host_apply_frames32_mranges_per_s"] = f32["median"]
    out["c_yardstick_mranges_per_s"] = out["c_yardstick"]["mranges_per_s"]["median"] if c_times else None
    out["goals"] = {
        "bulk": head["median"] >= GOAL,
        "c_ratio": (out["c_ratio"]["median"] >= GOAL_C_RATIO) if c_times else None,
        "frames32": f32["median"] >= GOAL_FRAMES32,
    }
    out["goal_met"] = all(v for v in out["goals"].values() if v is not None) and c_times != []
    bl = out["baseline_python_loop"]["mranges_per_s"]["median"]
    c_base = (f"C loop {out['c_yardstick']['mranges_per_s']['median']:.0f} ({c_note}); "
              f"numpy/C {out['c_ratio']['median']:.2f} ({out['c_ratio']['min']:.2f}-{out['c_ratio']['max']:.2f})"
              if c_times else c_note)
    out["rows"] = [
        row("host_apply", f"{n / 1e6:.1f}M blocks, walker order", head, "M ranges/s", baseline=c_base,
            goal=f">= {GOAL:g} and >= {GOAL_C_RATIO:g}x C"),
        row("host_apply", "same, shuffled", out["bulk_shuffled"]["mranges_per_s"], "M ranges/s",
            baseline=(f"py loop {bl:.2f} ({mq // 1000}k-range subset); "
                      f"numpy expand {out['baseline_numpy_expand']['mranges_per_s']['median']:.1f}")),
        row("host_apply", "frames of 32, staged as the session does", f32, "M ranges/s",
            baseline=f"one apply call per frame {out['frames32_one_call_each']['mranges_per_s']['median']:.2f}",
            goal=f">= {GOAL_FRAMES32:g}"),
        row("host_apply", "batches of 4096", batches["4096"]["mranges_per_s"], "M ranges/s"),
        row("host_apply", "cold (first call)", out["cold_mranges_per_s"], "M ranges/s"),
    ]
    return out


def _times(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}
