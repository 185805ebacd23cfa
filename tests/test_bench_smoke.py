"""Smoke test of the benchmark suite: tiny sizes, JSON shape only (no timing assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import b_apply  # noqa: E402
import b_codec  # noqa: E402
import common  # noqa: E402
import run as bench_run  # noqa: E402


def test_standard_set_is_aligned_disjoint_and_in_walker_order():
    r = b_apply.standard_set(n=5000, pages=1 << 16, seed=3)
    starts, sizes = r[:, 0].astype(np.int64), r[:, 1].astype(np.int64)
    assert len(r) == 5000
    assert np.all(sizes & (sizes - 1) == 0) and np.all(starts % sizes == 0)
    cover = np.zeros(1 << 16, np.int64)
    for s, n in zip(starts.tolist(), sizes.tolist()):
        cover[s:s + n] += 1
    assert cover.max() == 1  # disjoint
    assert np.all(np.diff(sizes) <= 0)  # top order first


def test_host_apply_small_run_has_the_documented_shape(tmp_path):
    out = b_apply.run(quick=True, n_blocks=3000, pages=1 << 16)
    rows = out.pop("rows")
    assert rows and {"bench", "case", "median", "min", "max", "unit"} <= set(rows[0])
    assert out["blocks"] == 3000
    for key in ("bulk_walker_order", "bulk_shuffled", "frames32_staged", "frames32_one_call_each",
                "baseline_python_loop", "baseline_numpy_expand"):
        s = out[key]["mranges_per_s"]
        assert s["min"] <= s["median"] <= s["max"] and s["runs"] >= 1
    assert out["marked_pages"] + out["refused_pages"] == out["block_pages"]
    # the C yardstick is built when a compiler is present (and then agreed with the library's
    # bitmap, or the run raised); otherwise the figure is None and the note says why
    assert out["c_yardstick"]["built"] == (out["c_yardstick_mranges_per_s"] is not None)
    assert out["c_yardstick"]["note"]
    assert out["host_apply_frames32_mranges_per_s"] == out["frames32_staged"]["mranges_per_s"]["median"]
    p = tmp_path / "r.json"
    common.write_json(p, {"benchmarks": {"apply": out}, "rows": rows})
    back = json.loads(p.read_text())
    assert back["benchmarks"]["apply"]["blocks"] == 3000
    assert "last" not in back["benchmarks"]["apply"]["bulk_walker_order"]


def test_codec_roundtrips_agree_and_table_formats():
    out = b_codec.run(quick=True, sizes=(4,))
    assert set(out["by_size"]["4"]) >= {"hintpipe", "msgpack_pairs", "json", "bytes"}
    text = common.format_table(out["rows"])
    assert "Hints x4" in text and text.count("\n") == 2


def test_run_all_collects_headline_keys_and_failures(monkeypatch):
    import types

    fake = types.ModuleType("b_apply")
    fake.run = lambda quick: {"bulk_walker_order": {"mranges_per_s": {"median": 1.5, "min": 1, "max": 2}},
                              "goal_met": False, "rows": []}
    broken = types.ModuleType("b_codec")

    def boom(quick):
        raise RuntimeError("nope")

    broken.run = boom
    monkeypatch.setitem(sys.modules, "b_apply", fake)
    monkeypatch.setitem(sys.modules, "b_codec", broken)
    res = bench_run.run_all(True, ["apply", "codec"], log=lambda *a, **k: None)
    assert res["host_apply_mranges_per_s"] == 1.5
    assert res["goals"] == {"apply": False}
    assert "codec" in res["errors"] and res["table"][-1]["case"] == "FAILED"
    for key in ("e2e_unix_mranges_per_s", "replay_mevents_per_s", "lock_hold_p99_us_batch32", "scale",
                "host_apply_frames32_mranges_per_s", "c_yardstick_mranges_per_s", "e2e_walker_unix_mranges_per_s",
                "uffd_sync_faults_per_s_1writer", "uffd_sync_faults_per_s_4writers"):
        assert key in res


def test_library_and_python_baseline_mark_the_same_bitmap():
    from hintpipe.host.pagestate import HostPageState

    pages = 1 << 16
    ranges = b_apply.standard_set(3000, pages)
    lib = HostPageState(pages)
    lib.begin_first_round()
    lib.on_written(np.arange(0, pages, 97))  # some pages written: both must refuse them
    written = lib.written_in()
    ref = np.zeros(pages, dtype=bool)
    lib.apply_hints(ranges)
    b_apply.python_loop(ref, written, ranges)
    assert ref.any() and np.array_equal(lib.skip_in(), ref)


def test_c_yardstick_without_a_compiler_is_reported_not_fatal(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    fn, note = b_apply.build_c_yardstick()
    assert fn is None and "no C compiler" in note


def test_loading_paths_all_load_the_same_events(tmp_path):
    import b_load

    rec = Path(__file__).parent / "data" / "traces" / "numpy-churn"
    out = b_load.measure(rec, ["text cold", "text first run", "text cached", "trace-v1"], runs=1,
                         process_runs=0, work=tmp_path)
    assert {p["events"] for p in out["paths"].values()} == {40_000}
    assert all(p["load_mevents_per_s"]["runs"] == 1 and p["process_s"] is None for p in out["paths"].values())


def test_figures_cells_tables_and_one_demo_run():
    import figures

    assert figures.rng([3, 3, 3]) == "3"
    assert figures.rng([1.04, 1.21, 1.1], "{:.1f}", " s") == "1.0-1.2 s"
    assert figures.rng([None]) == "-"
    md = figures.table(["a", "b"], [["1", "2"]])
    assert md.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | 2 |"]
    rep = figures.hintpipe("demo", "--json", "--size", "16M", "--history", "0")
    m = rep["migration"]
    assert rep["_exit"] == 0 and m["verified"]
    assert m["bytes_sent_baseline"] >= m["bytes_sent"] > 0


def test_figures_rewrite_only_the_readme_blocks_measured(tmp_path):
    import figures

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- figures:demo -->\nold demo\n<!-- /figures:demo -->\nmiddle\n"
                      "<!-- figures:lock -->\nold lock\n<!-- /figures:lock -->\n"
                      "<!-- figures:apply -->\n<!-- /figures:apply -->\nend\n")
    assert figures.update_readme(readme, {"demo": {"text": "| new |\n| --- |"}, "apply": {"text": "| a |"}}) == ["demo", "apply"]
    text = readme.read_text()
    assert "| new |\n| --- |\n<!-- /figures:demo -->" in text and "old demo" not in text
    assert "old lock" in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "<!-- figures:apply -->\n| a |\n<!-- /figures:apply -->" in text  # an empty block is filled too
