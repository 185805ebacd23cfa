"""What a user meets at the command line: help, version, errors, Ctrl-C, progress, JSON.

Errors are asserted as the user sees them: one line on stderr, the exit status, no traceback and
no partial file left behind. Long commands are interrupted with a real SIGINT once they have
visibly started work (their progress bar on a pseudo-terminal shows it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hintpipe.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "traces"
SHIPPED = ROOT / "examples" / "traces" / "numpy-churn"
# the progress bar is drawn by rich (a dependency): tests that watch it for the start of work
needs_bar = pytest.mark.skipif(importlib.util.find_spec("rich") is None,
                               reason="rich is not installed here (pip install . installs it)")


def run(*args: str, timeout: float = 120, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m hintpipe ARGS`` as a user runs it (stderr not a terminal: no progress bar)."""
    return subprocess.run([sys.executable, "-m", "hintpipe", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def one_line_error(p: subprocess.CompletedProcess, status: int = 2) -> str:
    """The single stderr line of a refused command (asserting there is exactly one)."""
    assert p.returncode == status, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


# ---- help and version --------------------------------------------------------------------------

def test_version():
    p = run("--version")
    assert p.returncode == 0 and p.stdout.startswith("hintpipe 0.") and "Python 3." in p.stdout


def _subcommands(parser):
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub, sub.choices


def test_help_lists_every_command_with_one_line():
    p = run("--help")
    assert p.returncode == 0
    sub, commands = _subcommands(build_parser())
    listed = {c.dest: c.help for c in sub._choices_actions}
    assert set(listed) == set(commands) == {"demo", "replay", "inspect", "record", "trace", "guest", "host"}
    for name, text in listed.items():
        assert text and "\n" not in text
        assert f"    {name}" in p.stdout


def _all_command_parsers():
    _, commands = _subcommands(build_parser())
    for name, parser in commands.items():
        if name == "trace":
            _, inner = _subcommands(parser)
            yield from ((f"trace {n}", q) for n, q in inner.items())
        yield name, parser


@pytest.mark.parametrize("name", ["demo", "replay", "inspect", "record", "trace", "trace convert", "guest", "host"])
def test_every_command_has_a_description_an_example_and_help_for_each_option(name):
    parser = dict(_all_command_parsers())[name]
    text = parser.format_help()
    assert parser.description and len(parser.description.splitlines()) >= 2
    assert "example:\n  hintpipe " in text or "example:\n  sudo hintpipe " in text
    for action in parser._actions:
        if action.help != "==SUPPRESS==" and action.__class__.__name__ != "_SubParsersAction":
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_same_option_same_meaning_across_commands():
    helps: dict[str, set[str]] = {}
    for name, parser in _all_command_parsers():
        for action in parser._actions:
            if action.option_strings and action.help != "==SUPPRESS==" and action.dest not in ("help",):
                helps.setdefault(action.option_strings[-1], set()).add(action.help)
    # --race-mode differs on purpose: a replay offers detect only, and says why
    shared = {k: v for k, v in helps.items() if len(v) > 1 and k not in ("--race-mode", "--json", "--wp",
                                                                          "--memory", "--secret")}
    assert shared == {}
    assert all("one JSON object on one line" in h for h in helps["--json"])


def test_help_and_version_do_not_load_numpy_or_trio():
    code = ("import sys\nfrom hintpipe.cli import main\n"
            "for argv in (['--help'], ['--version'], ['demo', '--help'], ['host', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('numpy', 'trio', 'rich', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_paired_help_says_who_decides_what():
    for name in ("guest", "host"):
        text = dict(_all_command_parsers())[name].format_help()
        assert "decided by the guest" in text or "decided by the host" in text
        assert "--bandwidth" in text and "--size" in text  # the description names both sides' options
    host = dict(_all_command_parsers())["host"].format_help()
    assert "--size SIZE" not in host  # not one of the host's own options


# ---- values checked before any work, naming the flag -------------------------------------------

@pytest.mark.parametrize(("argv", "flag"), [
    (["demo", "--batch", "0"], "--batch"),
    (["demo", "--max-rounds", "0"], "--max-rounds"),
    (["demo", "--downtime-ms", "-5"], "--downtime-ms"),
    (["demo", "--size", "1K"], "--size"),
    (["demo", "--bandwidth", "0"], "--bandwidth"),
    (["demo", "--queue-size", "100"], "--queue-size"),
    (["replay", "x", "--batch", "0"], "--batch"),
    (["replay", "x", "--write-rate", "-5"], "--write-rate"),
    (["replay", "x", "--race-mode", "isolate"], "--race-mode"),
    (["inspect", "x", "--samples", "0"], "--samples"),
    (["record", "out", "--duration", "-1"], "--duration"),
    (["host", "--listen", "unix:/tmp/x", "--guests", "0"], "--guests"),
])
def test_bad_values_are_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and f"see hintpipe {argv[0]} --help" in err


def test_real_memory_that_does_not_fit_is_refused_before_anything_starts():
    p = run("demo", "--memory", "real", "--size", "1T", timeout=60)  # refused, not run: the OOM killer took 70 s
    line = one_line_error(p)
    assert "--size 1.0T" in line and "needs about" in line and "available" in line and "fits" in line
    assert p.stdout == ""


def test_memory_needs_follow_the_measured_factor():
    from hintpipe.cli.checks import check_memory
    from hintpipe.cli.options import UsageError
    from hintpipe.config import RunConfig

    cfg = RunConfig(pages=1 << 18, memory="real", wp="off")  # 1 GiB
    check_memory(cfg, what="demo", available=3 << 30)
    with pytest.raises(UsageError, match="--size 1.0G with --memory real needs about 2.8G"):
        check_memory(cfg, what="demo", available=2 << 30)


# ---- traces: --skip-bad, convert and record outputs --------------------------------------------

@pytest.fixture
def bad_recording(tmp_path) -> Path:
    """The numpy-churn slice with one garbage line in the middle of its (plain text) trace."""
    import zstandard

    rec = tmp_path / "bad"
    rec.mkdir()
    text = zstandard.ZstdDecompressor().decompress(
        (DATA / "numpy-churn" / "kmem.trace.zst").read_bytes(), max_output_size=1 << 30).splitlines(True)
    (rec / "kmem.trace").write_bytes(b"".join(text[:2000] + [b"this is not a trace line\n"] + text[2000:4000]))
    shutil.copy(DATA / "numpy-churn" / "kpageflags.start.zst", rec)
    return rec


def test_a_bad_line_suggests_skip_bad_and_skip_bad_warns_in_one_line(bad_recording, tmp_path):
    line = one_line_error(run("replay", str(bad_recording), "--no-baseline", "--bandwidth", "100"))
    assert "malformed" in line and "--skip-bad" in line
    p = run("replay", str(bad_recording), "--no-baseline", "--bandwidth", "100", "--skip-bad", "--json")
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 1
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("hintpipe: warning: ") and "skipped 1 bad lines" in p.stderr
    assert "UserWarning" not in p.stderr and "warnings.warn" not in p.stderr


def test_convert_refuses_unwritable_destinations_and_leaves_no_part_file(bad_recording, tmp_path):
    src = str(DATA / "numpy-churn")
    assert "does not exist" in one_line_error(run("trace", "convert", src, "/nonexistent/dir/x.hpt"))
    assert "is a folder" in one_line_error(run("trace", "convert", src, str(tmp_path)))
    dst = tmp_path / "x.hpt"
    dst.write_bytes(b"precious")
    assert "--force" in one_line_error(run("trace", "convert", src, str(dst)))
    assert dst.read_bytes() == b"precious"
    # a conversion that fails part way: neither the destination nor a .part file is left
    out = tmp_path / "y.hpt"
    assert "--skip-bad" in one_line_error(run("trace", "convert", str(bad_recording), str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "x.hpt"]
    p = run("trace", "convert", src, str(dst), "--force", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["events"] == 40000 and dst.read_bytes()[:8] == b"HPTRACE1"


def test_record_refuses_bad_commands_and_existing_outputs_before_starting(tmp_path):
    out = tmp_path / "rec"
    line = one_line_error(run("record", str(out), "--", "/nonexistent/cmd"))
    assert "cannot run '/nonexistent/cmd'" in line
    assert not out.exists() and not (tmp_path / "rec.part").exists()
    out.mkdir()
    (out / "kmem.trace.zst").write_bytes(b"an earlier recording")
    assert "--force" in one_line_error(run("record", str(out), "--duration", "1"))
    assert (out / "kmem.trace.zst").read_bytes() == b"an earlier recording"
    assert "does not exist" in one_line_error(run("record", "/nonexistent/dir/rec", "--duration", "1"))


# ---- one-line JSON and the text summary -------------------------------------------------------

def test_json_is_one_line_everywhere(tmp_path):
    for argv in (["demo", "--size", "64M", "--no-baseline"],
                 ["replay", str(DATA / "numpy-churn"), "--no-baseline", "--bandwidth", "100"],
                 ["inspect", str(DATA / "numpy-churn"), "--samples", "5"],
                 ["trace", "convert", str(DATA / "numpy-churn"), str(tmp_path / "c.hpt")]):
        p = run(*argv, "--json")
        assert p.returncode == 0, p.stderr
        assert len(p.stdout.splitlines()) == 1 and isinstance(json.loads(p.stdout), dict)
        assert p.stderr == ""  # no progress bar when stderr is not a terminal


def test_text_summary_says_memory_mode_and_write_tracking():
    p = run("demo", "--size", "64M", "--no-baseline")
    assert p.returncode == 0 and "memory sim, write tracking sim" in p.stdout.splitlines()[0]
    assert p.stderr == ""


# ---- host addresses ---------------------------------------------------------------------------

def test_host_listen_mistakes_are_one_sentence(tmp_path):
    env = dict(os.environ, HINTPIPE_RUNTIME_DIR=str(tmp_path))
    assert "/nonexistent/dir does not exist" in one_line_error(run("host", "--listen", "unix:/nonexistent/dir/x.sock"))
    assert "/nonexistent does not exist" in one_line_error(run("host", "--listen", "shm:/nonexistent/x", env=env))
    regular = tmp_path / "file"
    regular.write_text("")
    assert "exists and is not a socket" in one_line_error(run("host", "--listen", f"unix:{regular}"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert "in use" in one_line_error(run("host", "--listen", f"tcp:127.0.0.1:{port}"))
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(tmp_path / "live.sock"))
        live.listen()
        line = one_line_error(run("host", "--listen", f"unix:{tmp_path}/live.sock"))
        assert "another process" in line and "listening" in line
    assert (tmp_path / "live.sock").exists()  # a live listener's socket is left alone


# ---- Ctrl-C -----------------------------------------------------------------------------------

class Terminal:
    """A command whose stderr is a pseudo-terminal (so it draws its progress bar), stdout a pipe."""

    def __init__(self, argv: list[str], *, cwd: Path = ROOT, env: dict | None = None) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                                  cwd=cwd, env=env, start_new_session=True)
        os.close(slave)
        self.screen = b""

    def wait_for(self, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while needle.encode() not in self.screen:
            assert time.monotonic() < deadline and self.p.poll() is None, self.screen[-2000:]
            self._read(0.1)

    def _read(self, wait: float) -> bool:
        if select.select([self.master], [], [], wait)[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the child closed the terminal
                return False
            self.screen += data
            return bool(data)
        return True

    def interrupt(self, timeout: float = 60) -> tuple[int, str, str]:
        self.p.send_signal(signal.SIGINT)
        return self.finish(timeout)

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        deadline = time.monotonic() + timeout
        while self.p.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0.05):
            pass
        if self.p.poll() is None:
            self.p.kill()
        rc = self.p.wait()
        os.close(self.master)
        return rc, self.p.stdout.read().decode(), self.screen.decode(errors="replace")


def hintpipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "hintpipe", *args]


def assert_interrupted(rc: int, screen: str) -> None:
    assert rc == 130, screen[-2000:]
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen
    assert screen.rstrip().endswith("hintpipe: interrupted")


@needs_bar
def test_ctrl_c_during_demo_is_one_line_and_130(tmp_path):
    t = Terminal(hintpipe("demo", "--size", "16G", "--report", str(tmp_path / "r.html")))
    t.wait_for("round 0")
    rc, out, screen = t.interrupt()
    assert_interrupted(rc, screen)
    assert out == "" and list(tmp_path.iterdir()) == []


@needs_bar
def test_ctrl_c_during_replay_is_one_line_and_130(tmp_path):
    t = Terminal(hintpipe("replay", str(SHIPPED), "--bandwidth", "1", "--plot", str(tmp_path / "plots")))
    t.wait_for("trace events")
    rc, out, screen = t.interrupt()
    assert_interrupted(rc, screen)
    assert out == "" and not (tmp_path / "plots").exists()


@needs_bar
def test_ctrl_c_during_convert_leaves_nothing(tmp_path):
    big = tmp_path / "big"  # the shipped recording, whole: long enough to interrupt
    t = Terminal(hintpipe("trace", "convert", str(SHIPPED), str(big) + ".hpt"))
    t.wait_for("converting")
    rc, out, screen = t.interrupt()
    assert_interrupted(rc, screen)
    assert list(tmp_path.iterdir()) == []


@needs_bar
def test_progress_bar_shows_rate_and_eta_on_a_terminal_only():
    t = Terminal(hintpipe("demo", "--size", "1G"))
    rc, out, screen = t.finish(timeout=120)
    assert rc == 0 and "VERIFIED" in out
    assert "with hinting: round 0" in screen and "pages/s" in screen and "eta" in screen
    assert "VERIFIED" not in screen  # the report goes to stdout, the bar to stderr
    rc, out, screen = Terminal(hintpipe("demo", "--size", "256M", "--quiet")).finish(timeout=120)
    assert rc == 0 and screen == ""


@needs_bar
def test_ctrl_c_during_bench_is_one_line_and_130():
    t = Terminal([sys.executable, "bench/run.py", "--quick", "--only", "migration"])
    t.wait_for("migration")
    rc, out, screen = t.interrupt()
    assert rc == 130 and "Traceback" not in screen and screen.rstrip().endswith("bench: interrupted")


def _why_no_recording() -> str | None:
    if os.geteuid() != 0:
        return "recording needs root"
    if not os.access("/proc/kpageflags", os.R_OK) or not Path("/sys/kernel/tracing").exists():
        return "no /proc/kpageflags or tracefs here"
    return None


@needs_bar
@pytest.mark.skipif(_why_no_recording() is not None, reason=_why_no_recording() or "")
def test_ctrl_c_during_record_of_a_command_keeps_no_partial_recording(tmp_path):
    out = tmp_path / "rec"
    t = Terminal(hintpipe("record", str(out), "--", "sleep", "30"))
    t.wait_for("events")
    rc, stdout, screen = t.interrupt()
    if "recording impossible" in screen or "tracefs" in screen and rc == 2:
        pytest.skip(screen.strip())
    assert rc == 130 and "Traceback" not in screen
    # a recording cut short is still whole (end snapshots taken): it is kept, and says so
    assert "stopped by Ctrl-C" in stdout and (out / "buddyinfo.end").exists()
    assert not (tmp_path / "rec.part").exists()


@needs_bar
def test_replay_runs_to_its_end_on_a_terminal(tmp_path):
    rc, out, screen = Terminal(hintpipe("replay", str(SHIPPED), "--no-baseline")).finish(timeout=120)
    assert rc == 0 and "VERIFIED" in out and "Traceback" not in screen and "error" not in screen
    assert "events" in screen and "round" in screen


def test_a_closed_task_ignores_late_updates():
    pytest.importorskip("rich")
    from hintpipe.progress import open_progress

    with open_progress(True) as progress:  # drawn to the test's stderr: harmless
        task = progress.task("x", total=10, unit="things")
        task.update(5)
        task.close()
        task.update(7)
        task.close()
