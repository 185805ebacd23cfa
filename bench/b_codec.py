"""Benchmark 2: wire codec, encode + decode of one Hints frame of 32, 512 and 4096 ranges.

hintpipe v1 packs the ranges as one msgpack bin of little-endian u64 pairs and checks every field
on both sides. Baselines in the same run: msgpack of a list of [start, npages] pairs (what a
straightforward implementation sends) and JSON of the same list. Both baselines also rebuild the
numpy array the host needs, so all three produce the same thing.
"""

from __future__ import annotations

import json

import msgpack
import numpy as np

from common import rate, row, timeit

from hintpipe.protocol import Hints, decode, encode

SIZES = (32, 512, 4096)
CMD_ID = 0x8000_0001


def batch(n: int, seed: int = 1) -> np.ndarray:
    """n ascending order-9 blocks (what a walker batch looks like)."""
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(1 << 20, size=n, replace=False)).astype(np.uint64) << np.uint64(9)
    return np.stack([starts, np.full(n, 512, np.uint64)], 1)


def hintpipe_roundtrip(ranges: np.ndarray) -> np.ndarray:
    """Encode a Hints frame and decode it back (the library path, all checks on)."""
    return decode(encode(Hints(CMD_ID, ranges))).ranges


def msgpack_pairs_roundtrip(ranges: np.ndarray) -> np.ndarray:
    """Baseline: msgpack of [type, cmd_id, [[start, npages], ...]] and back to an array."""
    data = msgpack.packb([4, CMD_ID, ranges.tolist()])
    obj = msgpack.unpackb(data)
    return np.array(obj[2], dtype=np.uint64).reshape(-1, 2)


def json_roundtrip(ranges: np.ndarray) -> np.ndarray:
    """Baseline: JSON of the same list and back to an array."""
    data = json.dumps([4, CMD_ID, ranges.tolist()]).encode()
    obj = json.loads(data)
    return np.array(obj[2], dtype=np.uint64).reshape(-1, 2)


def frame_bytes(ranges: np.ndarray) -> dict:
    """Encoded size of each representation."""
    return {
        "hintpipe": len(encode(Hints(CMD_ID, ranges))),
        "msgpack_pairs": len(msgpack.packb([4, CMD_ID, ranges.tolist()])),
        "json": len(json.dumps([4, CMD_ID, ranges.tolist()]).encode()),
    }


def run(quick: bool = True, sizes: tuple[int, ...] = SIZES) -> dict:
    """Roundtrips per second and ranges per second for each batch size and codec."""
    repeat = 5 if quick else 9
    out: dict = {"sizes": list(sizes), "by_size": {}}
    rows = []
    for n in sizes:
        r = batch(n)
        inner = max(1, (20_000 if quick else 100_000) // n)  # timed loop of ~20k ranges
        res = {"bytes": frame_bytes(r), "inner_loops": inner}
        for name, fn in (("hintpipe", hintpipe_roundtrip), ("msgpack_pairs", msgpack_pairs_roundtrip),
                         ("json", json_roundtrip)):
            assert np.array_equal(fn(r), r)

            def go(fn=fn):
                for _ in range(inner):
                    fn(r)

            t = timeit(go, repeat=repeat)
            res[name] = {**t, "mranges_per_s": rate(n * inner, t),
                         "us_per_frame": t["median_s"] / inner * 1e6}
        out["by_size"][str(n)] = res
        hp, mp, js = (res[k]["mranges_per_s"]["median"] for k in ("hintpipe", "msgpack_pairs", "json"))
        rows.append(row("codec", f"Hints x{n} enc+dec", res["hintpipe"]["mranges_per_s"], "M ranges/s",
                        baseline=f"msgpack pairs {mp:.2f} ({hp / mp:.0f}x); json {js:.2f} ({hp / js:.0f}x)"))
    out["rows"] = rows
    return out
