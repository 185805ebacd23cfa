"""Reclaim: hinted free pages discarded from the guest's memfd, and never a write lost.

Whole migrations run the production path (:func:`hintpipe.inprocess.migrate_guest`: real guest
memory in a memfd, real write-protect, the race workload, the host session handing each applied
Hints frame to the :class:`~hintpipe.host.reclaim.Reclaimer`) under trio's virtual clock; the
oracle compares every allocated page at the destination with the source and the source with what
the guest last wrote, so a write a discard destroyed is a lost page. The smaller tests drive the
reclaimer, the page state and the sync userfaultfd handler directly on a hugetlb memfd.

Hugetlb tests reserve a few huge pages as root and put ``nr_hugepages`` back; they skip, with the
reason, where that is impossible.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import replace

import numpy as np
import pytest
import trio
import trio.testing

import hintpipe.wp as backends
from hintpipe.cli import main
from hintpipe.config import RunConfig
from hintpipe.guest.workload import WorkloadConfig
from hintpipe.host.migration import MigrationConfig
from hintpipe.host.reclaim import BackedPageState, Reclaimer, reclaim_refusal
from hintpipe.inprocess import InProcessRun, RealMachine, migrate_guest
from hintpipe.linux import userfaultfd as u
from hintpipe.linux.backing import (
    hugetlb_pool, punch_runs, reserve_huge_pages, resident_bytes, thp_unavailable,
)
from hintpipe.linux.memfd import page_pattern
from hintpipe.units import PAGE_SIZE

PAGES = 1 << 13  # 32 MiB
HUGE = 512  # 4 KiB pages per 2 MiB huge page


def _cfg(seed: int, *, race_mode: str = "detect", broken=(), wp: str = "uffd", backing: str = "shmem",
         min_order: int = 4) -> RunConfig:
    """A race migration with two live rounds and reclaim on (as tests/test_guards.py's, so the
    interleaving depends on the seed only)."""
    wl = WorkloadConfig.race(seed=seed, ops_per_s=2_500.0, write_pages_per_s=10_000.0, tick_s=0.005)
    return RunConfig(pages=PAGES, workload=wl, race_mode=race_mode,
                     migration=MigrationConfig(bandwidth_gbit=1.0, max_rounds=2, downtime_ms=30),
                     batch=8, min_order=min_order, fixed_hold_s=1e-5, time_budget_us=1e9,
                     memory="real", wp=wp, broken=frozenset(broken), reclaim=True, backing=backing)


def _migrate(cfg: RunConfig) -> InProcessRun:
    async def go():
        return await migrate_guest(cfg)

    return trio.run(go, clock=trio.testing.MockClock(autojump_threshold=0))


def _need(backend: str) -> None:
    try:
        backends.probe(backend)
    except u.UffdUnavailable as e:
        pytest.skip(f"{backend} unavailable on this kernel: {e.reason}")


@pytest.fixture
def huge_pages():
    """Reserve enough 2 MiB huge pages for a 32 MiB guest and a few more; restore afterwards."""
    need = PAGES // HUGE + 8
    short = need - hugetlb_pool()["available"]
    if short <= 0:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("hugetlb tests reserve huge pages, which needs root")
    try:
        with reserve_huge_pages(short):
            yield
    except OSError as e:
        pytest.skip(f"cannot reserve {short} huge pages here: {e}")


# ------------------------------------------------------------------ whole migrations, 4 KiB shmem

def test_sync_uffd_reclaim_under_race_loses_nothing_refuses_written_and_frees_memory():
    _need("uffd")
    refused = 0
    for seed in (1, 2):
        run = _migrate(_cfg(seed))
        assert run.result.lost_pages == 0 and run.result.verified and run.result.allocated_pages > 0
        r = run.reclaim
        assert r["pages_discarded"] > 0 and r["check"]
        assert r["host_rss_min_mib"] < r["host_rss_before_mib"] - r["pages_discarded"] * PAGE_SIZE / 2**20 / 2
        refused += r["discards_refused_written"]
    assert refused > 0  # the race workload reused hinted pages before their discard


def test_isolate_mode_reclaim_loses_nothing_and_acks_after_the_discard():
    _need("uffd")
    run = _migrate(_cfg(1, race_mode="isolate"))
    assert run.result.lost_pages == 0 and run.result.verified
    r = run.reclaim
    assert r["pages_discarded"] > 0 and r["isolate_wait_ms"] > 0
    assert run.walker.inflight == 0  # every isolated block came back once its frame was acked


@pytest.mark.parametrize("guard", ["reclaim-check", "refuse-written"])
def test_breaking_the_discard_check_loses_pages(guard):
    _need("uffd")
    lost = 0
    for seed in (1, 2, 3):
        run = _migrate(_cfg(seed, broken=[guard]))
        assert not run.result.verified
        lost = run.result.lost_pages
        if lost:
            break
    assert lost > 0


def test_uffd_async_reclaim_is_refused_in_detect_mode_and_safe_in_isolate_mode(capsys):
    _need("uffd-async")
    assert "refused" in reclaim_refusal(memory="real", wp="uffd-async", race_mode="detect")
    with pytest.raises(ValueError, match="use --wp uffd, or --race-mode isolate"):
        _migrate(_cfg(1, wp="uffd-async"))
    assert main(["demo", "--memory", "real", "--wp", "uffd-async", "--reclaim", "--size", "8M",
                 "--no-baseline"]) == 2
    err = capsys.readouterr().err
    assert "uffd-async in detect mode is refused" in err and "Traceback" not in err
    run = _migrate(_cfg(1, wp="uffd-async", race_mode="isolate"))
    assert run.result.lost_pages == 0 and run.result.verified and run.reclaim["pages_discarded"] > 0


def test_reclaim_user_mistakes_get_one_sentence(capsys):
    assert main(["demo", "--reclaim", "--size", "8M", "--no-baseline"]) == 2
    assert "--memory real" in capsys.readouterr().err
    assert main(["demo", "--memory", "real", "--wp", "off", "--reclaim", "--size", "8M", "--no-baseline"]) == 2
    assert "--wp off" in capsys.readouterr().err
    assert main(["demo", "--backing", "hugetlb", "--size", "8M", "--no-baseline"]) == 2
    assert "--memory real" in capsys.readouterr().err
    if thp_unavailable():
        assert main(["demo", "--memory", "real", "--backing", "thp", "--size", "8M", "--no-baseline"]) == 2
        err = capsys.readouterr().err
        assert "shmem_enabled" in err and "Traceback" not in err


def test_demo_json_has_the_reclaim_figures(capsys):
    _need("uffd")
    assert main(["demo", "--memory", "real", "--wp", "uffd", "--reclaim", "--size", "32M", "--no-baseline",
                 "--json", "--seed", "3", "--min-order", "4"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    r = rep["reclaim"]
    for key in ("pages_discarded", "discards_refused_written", "host_rss_before_mib", "host_rss_min_mib",
                "host_rss_after_mib", "hints_too_small", "reclaimed_fraction", "isolate_wait_ms"):
        assert key in r
    assert rep["migration"]["lost_pages"] == 0 and r["host_rss_min_mib"] < r["host_rss_before_mib"]


# ------------------------------------------------------------------ hugetlb backing

def test_hugetlb_reclaim_under_race_loses_nothing_and_breaking_the_check_loses(huge_pages):
    _need("uffd")
    run = _migrate(_cfg(1, backing="hugetlb", min_order=9))
    assert run.result.lost_pages == 0 and run.result.verified
    r = run.reclaim
    assert r["backing"] == "hugetlb" and r["pages_discarded"] > 0 and r["pages_discarded"] % HUGE == 0
    lost = 0
    for seed in (1, 2, 3):
        lost = _migrate(_cfg(seed, backing="hugetlb", min_order=9, broken=["reclaim-check"])).result.lost_pages
        if lost:
            break
    assert lost > 0


def test_hugetlb_hints_smaller_than_a_huge_page_are_counted_not_discarded(huge_pages):
    _need("uffd")
    run = _migrate(_cfg(2, backing="hugetlb", min_order=4))
    assert run.result.lost_pages == 0 and run.result.verified
    assert run.reclaim["hints_too_small"] > 0 and run.reclaim["pages_discarded"] % HUGE == 0


def _store(addr: int, data: np.ndarray) -> threading.Thread:
    """Copy ``data`` to ``addr`` from a thread, GIL released (a store can block on a WP fault)."""
    t = threading.Thread(target=ctypes.memmove, args=(addr, data.ctypes.data, data.nbytes), daemon=True)
    t.start()
    return t


def test_hugetlb_a_4k_write_in_a_hinted_huge_page_refuses_its_discard_or_lands_after_it(huge_pages):
    """Production pieces on a 4-huge-page guest: BackedPageState, the sync uffd backend (release
    per 2 MiB) and the Reclaimer. Huge page 1: hinted, then one 4 KiB page of it written, then the
    discard: refused, and all 512 pages count as written. Huge page 2: hinted and discarded
    (memory drops 2 MiB), then one 4 KiB page written: it faults, lands on a fresh page, the rest
    reads zero."""
    _need("uffd")
    n = 4 * HUGE
    with RealMachine(n, "uffd", backing="hugetlb") as m:
        state = BackedPageState(n, unit=HUGE)
        backend = backends.make_backend("uffd", state, **m.backend_kwargs())
        try:
            backend.start_round(0)
            rec = Reclaimer(state, m.guest.fd, backing="hugetlb")
            state.apply_blocks(np.array([HUGE, 2 * HUGE], dtype=np.uint64), np.array([9, 9], dtype=np.uint8))
            data = page_pattern(np.array([HUGE + 7]), np.array([5]))
            _store(m.guest.page_addr(HUGE + 7), data).join(5)
            assert state.written_in(HUGE, 2 * HUGE).all() and not state.skip_in(HUGE, 2 * HUGE).any()
            before = resident_bytes(m.guest.fd)
            assert rec.discard_blocks(np.array([HUGE, 2 * HUGE]), np.array([9, 9])) == HUGE
            assert rec.figures.discards_refused_written == HUGE and rec.figures.pages_discarded == HUGE
            assert resident_bytes(m.guest.fd) == before - (2 << 20)
            assert (m.host.words[HUGE + 7] == data[0]).all()  # the write survived
            data2 = page_pattern(np.array([2 * HUGE + 3]), np.array([9]))
            t = _store(m.guest.page_addr(2 * HUGE + 3), data2)
            t.join(5)
            assert not t.is_alive() and backend.tracker.error is None
            got = os.pread(m.guest.fd, 2 << 20, 2 * HUGE * PAGE_SIZE)
            page = np.frombuffer(got, dtype=np.uint64).reshape(HUGE, -1)
            assert (page[3] == data2[0]).all() and not page[4:].any() and not page[:3].any()
            assert state.written_in(2 * HUGE, 3 * HUGE).all() and not state.discarded[2]
            # a hint of part of a huge page is counted too small and punches nothing
            assert rec.discard_blocks(np.array([3 * HUGE]), np.array([3])) == 0
            assert rec.figures.hints_too_small == 8
        finally:
            backend.close()


def test_punching_part_of_a_huge_page_is_never_asked_for(huge_pages):
    # the kernel would zero those 4 KiB in place, bypassing write-protect: the reclaimer only
    # passes whole backing pages, which this checks at the syscall boundary
    calls = []
    with RealMachine(2 * HUGE, "off", backing="hugetlb") as m:
        state = BackedPageState(2 * HUGE, unit=HUGE)
        state.apply_blocks(np.array([0, 512, 768], dtype=np.uint64), np.array([8, 8, 8], dtype=np.uint8))
        rec = Reclaimer(state, m.guest.fd, backing="hugetlb")
        import hintpipe.host.reclaim as rmod

        orig = rmod.punch_runs
        rmod.punch_runs = lambda fd, s, c: calls.append((s.tolist(), c.tolist())) or orig(fd, s, c)
        try:
            rec.discard_blocks(np.array([0, 512, 768]), np.array([8, 8, 8]))
        finally:
            rmod.punch_runs = orig
    assert calls == [([512], [512])] and rec.figures.hints_too_small == 256


def test_punch_runs_frees_shmem_at_once():
    with RealMachine(64, "off") as m:
        before = resident_bytes(m.guest.fd)
        assert punch_runs(m.guest.fd, np.array([0, 32]), np.array([16, 8])) == 2
        assert resident_bytes(m.guest.fd) == before - 24 * PAGE_SIZE
        assert os.pread(m.guest.fd, PAGE_SIZE, 0) == bytes(PAGE_SIZE)


# ------------------------------------------------------------------ paired processes

def _paired_reclaim(tmp_path, *guest_args: str, host_args: tuple[str, ...] = ()) -> dict:
    """One ``hintpipe host --reclaim`` (sync uffd) and one racing guest process; the host's report."""
    import json
    import subprocess
    import sys
    import time

    addr = f"unix:{tmp_path}/hp.sock"
    env = dict(os.environ, HINTPIPE_RUNTIME_DIR=str(tmp_path))
    host = subprocess.Popen([sys.executable, "-m", "hintpipe", "host", "--listen", addr, "--json", "--memory", "real",
                             "--wp", "uffd", "--reclaim", "--bandwidth", "1", "--guests", "1", *host_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(f"{tmp_path}/hp.sock"):
            assert host.poll() is None and time.monotonic() < deadline, host.stderr.read()
            time.sleep(0.05)
        guest = subprocess.run([sys.executable, "-m", "hintpipe", "guest", "--connect", addr, "--size", "32M",
                                "--memory", "real", "--wp", "uffd", "--workload", "race", "--seed", "2",
                                *guest_args], capture_output=True, text=True, env=env, timeout=120)
        out, err = host.communicate(timeout=120)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    [rep] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert guest.returncode == 0 and host.returncode == 0, (guest.stderr, err)
    return rep


def test_paired_host_reclaims_a_racing_guest_byte_exact(tmp_path):
    """``hintpipe host --reclaim`` discards each frame before acking it while a guest process runs
    the race workload with sync uffd; the host's oracle checks guest RAM against the versions the
    guest publishes, so a destroyed write would fail the run."""
    _need("uffd")
    rep = _paired_reclaim(tmp_path, "--min-order", "4")
    assert rep["status"] == "migrated" and rep["migration"]["lost_pages"] == 0
    r = rep["reclaim"]
    assert r["pages_discarded"] > 0 and r["host_rss_min_mib"] < r["host_rss_before_mib"]


def test_paired_host_reclaims_before_it_migrates(tmp_path):
    """``hintpipe host --reclaim --reclaim-for 2``: the host runs hinting rounds of its own for
    two seconds while the guest process runs, discarding what it hints, and then migrates it
    byte-exact."""
    _need("uffd")
    rep = _paired_reclaim(tmp_path, "--min-order", "4", host_args=("--reclaim-for", "2"))
    assert rep["status"] == "migrated" and rep["migration"]["lost_pages"] == 0
    r = rep["reclaim"]
    assert r["rounds_before_migration"] >= 1 and r["pages_discarded"] > 0
    assert r["host_rss_at_migration_mib"] < r["host_rss_before_mib"]


def test_paired_hugetlb_guest_is_reclaimed_in_whole_huge_pages(tmp_path, huge_pages):
    _need("uffd")
    rep = _paired_reclaim(tmp_path, "--backing", "hugetlb")
    assert rep["status"] == "migrated" and rep["migration"]["lost_pages"] == 0
    assert rep["config"]["backing"] == "hugetlb"
    r = rep["reclaim"]
    assert r["backing"] == "hugetlb" and r["pages_discarded"] > 0 and r["pages_discarded"] % HUGE == 0


def test_paired_host_refuses_reclaim_it_cannot_make_safe(capsys, tmp_path):
    assert main(["host", "--listen", f"unix:{tmp_path}/x.sock", "--memory", "real", "--wp", "uffd-async",
                 "--reclaim"]) == 2
    assert "uffd-async" in capsys.readouterr().err
    assert main(["host", "--listen", f"unix:{tmp_path}/x.sock", "--reclaim"]) == 2
    assert "--memory real" in capsys.readouterr().err


def test_too_few_huge_pages_says_how_many_to_reserve_and_reserves_nothing(monkeypatch, capsys):
    import hintpipe.linux.backing as backing

    monkeypatch.setattr(backing, "hugetlb_pool", lambda: {"total": 3, "free": 1, "reserved": 0, "surplus": 0,
                                                         "available": 1})
    with open(backing.NR_HUGEPAGES) as f:
        before = f.read()
    assert main(["demo", "--memory", "real", "--backing", "hugetlb", "--size", "8M", "--no-baseline"]) == 2
    err = capsys.readouterr().err
    assert "needs 4 free 2M huge pages" in err and "echo 6 > /proc/sys/vm/nr_hugepages" in err
    assert "--reserve-huge-pages" in err and "Traceback" not in err
    with open(backing.NR_HUGEPAGES) as f:
        assert f.read() == before


def test_reclaim_before_the_migration_returns_memory_while_the_guest_runs():
    """--reclaim-for: the host runs hinting rounds of its own before any migration round, the
    guest's free memory goes back to the host while it runs, and the migration that follows
    (its skip bits carried over from those rounds) still loses nothing."""
    _need("uffd")
    run = _migrate(replace(_cfg(1), reclaim_for_s=3.0))
    assert run.result.lost_pages == 0 and run.result.verified
    r = run.reclaim
    assert r["rounds_before_migration"] >= 2  # rounds of about RECLAIM_ROUND_S in 3 s of guest time
    assert r["host_rss_at_migration_mib"] <= r["host_rss_before_mib"] - 8  # MiB returned before any migration round
    assert r["pages_discarded"] > 0


def test_reclaim_before_the_migration_with_the_check_broken_loses_pages():
    _need("uffd")
    run = _migrate(replace(_cfg(1, broken={"reclaim-check"}), reclaim_for_s=3.0))
    assert run.result.lost_pages > 0 and not run.result.verified
