"""hintpipe's import graph: no cycle among its modules, and a protocol core that does no I/O.

The imports are read from the source with ``ast`` (nothing is imported), every ``import`` and
``from ... import`` anywhere in a module, inside functions too: a lazy import is still a
dependency. A package's ``__init__`` importing its own submodules (to re-export them) is not
counted as a dependency of the package on them, so a submodule may use its parent's names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hintpipe"

# what a sans-I/O protocol core must not import (the standard library's I/O and trio), and the
# parts of hintpipe that do I/O
IO_MODULES = {"trio", "anyio", "asyncio", "socket", "ssl", "select", "selectors", "os", "io",
              "mmap", "fcntl", "signal", "subprocess", "threading", "ctypes", "pathlib", "shutil",
              "tempfile"}


def module_files(pkg_dir: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package in ``pkg_dir``."""
    mods = {}
    for f in pkg_dir.rglob("*.py"):
        parts = f.relative_to(pkg_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def imports_of(name: str, path: Path) -> set[str]:
    """Every module named by an import statement anywhere in ``path`` (absolute names)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - (node.level - 1)] + ([mod] if mod else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # from pkg import submodule
    return out


def import_graph(pkg_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package's __init__ re-exporting its own
    submodules excluded)."""
    mods = module_files(pkg_dir)
    graph = {}
    for name, path in mods.items():
        deps = {m for m in imports_of(name, path) if m in mods and m != name}
        if path.name == "__init__.py":
            deps = {m for m in deps if not m.startswith(name + ".")}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_hintpipe_modules():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50  # the walk found the package
    assert cycles(graph) == []


def test_the_cycle_check_sees_lazy_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")  # a re-export: not a cycle
    (pkg / "a.py").write_text("from pkg.sub import b\nimport pkg\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g  # lazy, still a dependency\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b"]]
    (pkg / "sub" / "b.py").write_text("X = 1\n")
    assert cycles(import_graph(pkg)) == []


def test_protocol_core_imports_no_io():
    graph = import_graph(PACKAGE)
    reach, todo = set(), ["hintpipe.protocol"]
    while todo:  # everything the protocol package needs, within hintpipe
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo.extend(graph[m])
    reach |= {m for m in graph if m.startswith("hintpipe.protocol.")}
    outside = sorted(m for m in reach if not m.startswith("hintpipe.protocol") and m != "hintpipe.units")
    assert outside == [], "the protocol core depends on hintpipe modules beyond units"
    mods = module_files(PACKAGE)
    io = {m: sorted(i for i in imports_of(m, mods[m]) if i.split(".")[0] in IO_MODULES) for m in reach}
    assert {m: i for m, i in io.items() if i} == {}


# loaded by Python or numpy themselves whatever hintpipe imports
RUNTIME_DEPENDENCIES = {"os", "io", "threading", "pathlib", "ctypes", "shutil", "tempfile"}


def test_importing_the_protocol_loads_no_io_module():
    code = ("import sys, hintpipe.protocol\n"
            f"bad = {sorted(IO_MODULES - RUNTIME_DEPENDENCIES)!r}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in bad "
            "or m.startswith(('hintpipe.channel', 'hintpipe.paired', 'hintpipe.linux'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
