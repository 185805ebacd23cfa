"""Record the replay-fidelity corpus on this machine, check it, and cut the test-data slices.

    python bench/corpus.py OUT [NAME ...] [--runs 3] [--checkpoint-s 0.25] [--slices DIR]
                                          [--budget BYTES] [--check-only]        (root)

``--check-only`` checks (and slices) recordings made before instead of recording.

For each workload of :data:`CORPUS` (bench/workloads.py) and run: ``hintpipe record`` it (raw
ring-buffer recorder, buddyinfo checkpoints every ``--checkpoint-s``), replay the whole
recording through hintpipe's replay model and compare its free pages at the end with
``buddyinfo.end`` (``error_pct``, what ``hintpipe replay --json`` reports as
``final.error_pct``), and do the same for the prefix up to each checkpoint against the
buddyinfo read there. One JSON line per recording.

Free page reporting (virtio-balloon; Linux ``mm/page_reporting.c``) takes up to 32 blocks of
order >= 9 off the free lists while the host handles a report, with no kmem event; a buddyinfo
read at that moment lacks them (the model has exactly whole order-9/10 blocks more than the
kernel), and a kpageflags snapshot taken at that moment lacks them too (the model has fewer,
until those blocks are next allocated and freed). ``reporting_blocks`` counts such blocks for
each comparison, and ``error_pct_without_reporting`` is the error once they are accounted for.

With ``--slices DIR`` the first run of each workload that allows it is cut at the latest checkpoint whose
slice (raw pages cut at the checkpoint's marker, kpageflags reduced to the BUDDY bit, the
checkpoint's buddyinfo as ``buddyinfo.end``) fits in ``--budget`` bytes and is free of the
reporting effect, and written to ``DIR/NAME`` with a ``DIR/corpus.json`` manifest:
tests/test_fidelity_corpus.py holds each to 0.1 %.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hintpipe.trace.events import EventBatch  # noqa: E402
from hintpipe.trace.model import ReplayModel  # noqa: E402
from hintpipe.trace.record import CHECKPOINT_RE, record  # noqa: E402
from hintpipe.trace.recording import open_recording  # noqa: E402
from hintpipe.trace.ringbuffer import (RAW_DIR, DecodeStats, RingBufferDecoder, cpu_files,  # noqa: E402
                                       iter_raw_batches, read_meta)
from hintpipe.trace.snapshot import buddy_only_kpageflags, read_buddyinfo  # noqa: E402
from hintpipe.trace.stream import read_all  # noqa: E402
from hintpipe.units import NR_ORDERS  # noqa: E402

HERE = Path(__file__).resolve().parent
W = [sys.executable, str(HERE / "workloads.py")]
CORPUS = {
    "make": W + ["make", "--files", "60"],
    "fork": W + ["fork", "--count", "600"],
    "pagecache": W + ["pagecache", "--mb", "100"],
    "thp": W + ["thp", "--rounds", "2"],
    "mmap-churn": W + ["churn", "--seconds", "2", "--workers", "1", "--map-mb", "32"],
    "idle": None,  # 4 s, no command
    "numpy": W + ["numpy", "--seconds", "3"],
}
IDLE_S = 4.0
LIMIT_PCT = 0.1


def _compare(model: ReplayModel, info: dict) -> dict:
    """The model's free pages against a buddyinfo reading, with the reporting signature."""
    ref = int(info["free_pages"])
    err = model.nr_free_pages - ref
    mine = model.free_by_order()
    theirs = (list(info["by_order"]) + [0] * NR_ORDERS)[:NR_ORDERS]
    # Blocks of order >= 9 one side is missing: isolated by free page reporting when buddyinfo
    # was read (the kernel lacks them), or when the kpageflags snapshot was (the model lacks
    # them until they are next allocated and freed).
    sign = 1 if err >= 0 else -1
    rep = {k: max(0, sign * (mine[k] - theirs[k])) for k in (9, 10)}
    rep_pages = sign * sum(n << k for k, n in rep.items())
    if sum(rep.values()) > 32 or abs(err - rep_pages) >= abs(err):
        rep, rep_pages = {9: 0, 10: 0}, 0  # not that signature
    return {"free_pages": model.nr_free_pages, "reference": ref, "error_pages": err,
            "error_pct": round(100 * err / ref, 4), "reporting_blocks": sum(rep.values()),
            "error_pct_without_reporting": round(100 * (err - rep_pages) / ref, 4)}


def checkpoints(rec: Path, stats: DecodeStats) -> list[dict]:
    """Checkpoint N: time stamps of its begin/end markers and its buddyinfo file."""
    marks: dict[int, dict] = {}
    for _cpu, ts, text in stats.markers:
        m = CHECKPOINT_RE.search(text)
        if m:
            marks.setdefault(int(m.group(1)), {})[m.group(2)] = ts
    out = []
    for n in sorted(marks):
        f = rec / RAW_DIR / "checkpoints" / f"{n}.buddyinfo"
        if {"begin", "end"} <= set(marks[n]) and f.exists():
            out.append({"n": n, "begin_ns": marks[n]["begin"], "end_ns": marks[n]["end"], "file": f})
    return out


def check(rec: Path) -> dict:
    """Fidelity of a whole recording and of each checkpoint prefix."""
    tr = open_recording(rec)
    st = DecodeStats()
    ev = EventBatch.concat(list(iter_raw_batches(rec / RAW_DIR, st)))
    model = ReplayModel(tr.initial_free, [ev])
    cps = []
    for cp in checkpoints(rec, st):
        model.advance_to(cp["begin_ns"])
        between = int(np.searchsorted(ev.ts_ns, cp["end_ns"], "right") - np.searchsorted(ev.ts_ns, cp["begin_ns"], "right"))
        cps.append({"n": cp["n"], "events": model.events_applied, "between_markers": between,
                    **_compare(model, read_buddyinfo(cp["file"]))})
    model.run_to_end()
    meta = read_meta(rec / RAW_DIR)
    return {"events": len(ev), "lost": meta.get("lost_events"), "by_type": np.bincount(ev.etype, minlength=5).tolist(),
            "failed_allocations": st.failed_allocations, "span_s": round((int(ev.ts_ns[-1]) - int(ev.ts_ns[0])) / 1e9, 3),
            "final": _compare(model, tr.buddyinfo_end), "checkpoints": cps}


DESCRIPTIONS_BYTES = 16_000  # header_page, header_event, kmem formats and ids, meta.json


def cut_slice(rec: Path, cp: dict, out: Path, name: str, pages: dict[int, bytes], kpf: Path) -> int:
    """Write the prefix of ``rec`` up to checkpoint ``cp`` as a recording folder; returns its bytes.
    ``pages``: each CPU's decompressed page file; ``kpf``: the BUDDY-only kpageflags snapshot."""
    import zstandard

    shutil.rmtree(out, ignore_errors=True)
    raw_out = out / RAW_DIR
    raw_out.mkdir(parents=True)
    src = rec / RAW_DIR
    dec = RingBufferDecoder.from_dir(src)
    for n in ("header_page", "header_event"):
        shutil.copy(src / n, raw_out / n)
    shutil.copytree(src / "kmem", raw_out / "kmem")
    for cpu, data in pages.items():
        cut = dec.cut_pages(data, cp["begin_ns"])
        (raw_out / f"cpu{cpu}.pages.zst").write_bytes(zstandard.ZstdCompressor(level=19, write_checksum=True).compress(cut))
    meta = read_meta(src)
    keep = ("format", "version", "page_size", "trace_clock", "cpus", "lost_events", "buffer_kb", "kernel")
    meta = {k: meta[k] for k in keep if k in meta}
    meta.update(cut_at_ns=cp["begin_ns"], cut_at_checkpoint=cp["n"])
    (raw_out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.copy(kpf, out / "kpageflags.start.zst")
    shutil.copy(rec / "buddyinfo.start", out / "buddyinfo.start")
    shutil.copy(cp["file"], out / "buddyinfo.end")
    shutil.copy(rec / "uname.txt", out / "uname.txt")
    wl = (rec / "workload.txt").read_text().strip()
    (out / "workload.txt").write_text(f"{name}: {wl} (the recording's first events, to checkpoint {cp['n']})\n")
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def make_slice(rec: Path, result: dict, out: Path, name: str, budget: int) -> dict | None:
    """The latest clean checkpoint whose slice fits ``budget``; the slice is left in ``out``.
    Sizes are estimated from a bytes-per-event figure, corrected after each cut that missed."""
    st = DecodeStats()
    for _ in iter_raw_batches(rec / RAW_DIR, st):
        pass
    by_n = {c["n"]: c for c in checkpoints(rec, st)}
    kpf = rec / "kpageflags.buddy.zst"
    kpf_bytes = buddy_only_kpageflags(rec / "kpageflags.start.zst", kpf)
    pages = {cpu: read_all(f) for cpu, f in cpu_files(rec / RAW_DIR).items()}
    cands = sorted((c for c in result["checkpoints"] if c["reporting_blocks"] == 0
                    and abs(c["error_pct"]) <= LIMIT_PCT and c["events"] > 0), key=lambda c: -c["events"])
    fixed = kpf_bytes + DESCRIPTIONS_BYTES
    per_event = 5.0
    tried = set()
    while True:
        fit = [c for c in cands if c["n"] not in tried and fixed + per_event * c["events"] <= budget]
        if not fit:
            shutil.rmtree(out, ignore_errors=True)
            return None
        c = fit[0]
        tried.add(c["n"])
        size = cut_slice(rec, by_n[c["n"]], out, name, pages, kpf)
        if size <= budget:
            return {"name": name, "checkpoint": c["n"], "bytes": size, **check_slice(out)}
        per_event = max(per_event, (size - fixed) / c["events"] * 1.02)


def check_slice(d: Path) -> dict:
    """Events and fidelity of a slice folder, through the reader a replay uses."""
    tr = open_recording(d)
    m = tr.model()
    m.run_to_end()
    ref = tr.buddyinfo_end["free_pages"]
    return {"events": m.events_applied, "free_pages": m.nr_free_pages, "reference": ref,
            "error_pct": round(100 * (m.nr_free_pages - ref) / ref, 4)}


def main(argv: list[str]) -> int:
    out = Path(argv[0]).resolve()
    names = [a for a in argv[1:] if a in CORPUS] or list(CORPUS)
    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 1
    cps = float(argv[argv.index("--checkpoint-s") + 1]) if "--checkpoint-s" in argv else 0.25
    slices = Path(argv[argv.index("--slices") + 1]).resolve() if "--slices" in argv else None
    budget = int(argv[argv.index("--budget") + 1]) if "--budget" in argv else 250_000
    manifest = []
    for name in names:
        sliced = None
        for i in range(runs):
            d = out / f"{name}-{i}"
            load = os.getloadavg()
            if "--check-only" not in argv:
                shutil.rmtree(d, ignore_errors=True)
                cmd = CORPUS[name]
                s = record(d, IDLE_S if cmd is None else None, cmd, checkpoint_s=cps)
                rec_info = {k: s[k] for k in ("events_per_s", "peak_events_per_s", "lost_events", "seconds")}
            else:
                prev = d / "corpus.json"
                old = json.loads(prev.read_text()) if prev.exists() else {}
                rec_info = {k: old[k] for k in ("load", "events_per_s", "peak_events_per_s", "lost_events", "seconds")
                            if k in old}
                load = rec_info.pop("load", load)
            r = check(d)
            row = {"name": name, "run": i, "load": [round(x, 2) for x in load], **rec_info, **r}
            if slices is not None and sliced is None:  # the first run that gives a slice
                sliced = make_slice(d, r, slices / name, name, budget)
                row["slice"] = sliced
                if sliced:
                    manifest.append({**sliced, "run": i, "workload": (d / "workload.txt").read_text().strip()})
            (d / "corpus.json").write_text(json.dumps(row, indent=1) + "\n")
            cp = r["checkpoints"]
            print(json.dumps({**{k: v for k, v in row.items() if k != "checkpoints"},
                              "checkpoints": len(cp),
                              "checkpoint_error_pct": [min((c["error_pct"] for c in cp), default=None),
                                                       max((c["error_pct"] for c in cp), default=None)],
                              "checkpoints_with_reporting": sum(c["reporting_blocks"] > 0 for c in cp),
                              "checkpoint_error_pct_without_reporting": [
                                  min((c["error_pct_without_reporting"] for c in cp), default=None),
                                  max((c["error_pct_without_reporting"] for c in cp), default=None)]}), flush=True)
    if slices is not None:
        (slices / "corpus.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
