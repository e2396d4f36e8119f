"""The package's module graph: no import cycles among the modules' top-level imports, and every module imports on
its own, in a fresh interpreter, whichever order the modules come in."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import genesis_ext

ROOT = Path(genesis_ext.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """The genesis_ext modules `path` imports when it is imported (module-level statements, try blocks included;
    imports inside functions run later and cannot close a cycle at import time)."""
    found = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.Try):
            body += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        else:
            found |= imported(node, path)
    return found


def imported(node: ast.AST, path: Path) -> set[str]:
    """The genesis_ext names an import statement of `path` names: each module, and each name taken from a module
    (which may be a submodule: `from genesis_ext import demo`)."""
    if not isinstance(node, (ast.Import, ast.ImportFrom)):
        return set()
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.startswith("genesis_ext")}
    if node.level:
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        target = f"{base}.{node.module}" if node.module else base
        return {f"{target}.{a.name}" for a in node.names} | ({target} if node.module else set())
    if not (node.module or "").startswith("genesis_ext"):
        return set()
    return {node.module} | {f"{node.module}.{a.name}" for a in node.names}


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def test_no_import_cycles():
    mods = modules()
    graph = {m: {t for t in top_level_imports(p) if t in mods and t != m} for m, p in mods.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, "import cycle: " + " -> ".join(path + [m, t])
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert graph["genesis_ext"] == set()  # __init__ imports its names lazily: importing it loads nothing else
    assert not any("genesis_ext" in targets for m, targets in graph.items() if m != "genesis_ext")


def test_every_module_imports_in_a_fresh_interpreter_in_both_orders():
    names = sorted(modules())
    for order in (names, names[::-1]):
        code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
        done = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]


def test_the_demo_and_the_reference_are_leaves():
    """The demo uses the library, nothing uses the demo (the benchmarks take the sample data from
    genesis_ext.data.sample), and no module of the library imports the NumPy reference, even inside a function: it is
    the oracle the tests hold the kernels to."""
    for path in [*ROOT.rglob("*.py"), *(ROOT.parent / "benchmarks").glob("*.py")]:
        names = set().union(*(imported(node, path) for node in ast.walk(ast.parse(path.read_text()))))
        assert "genesis_ext.demo" not in names, path
        if path.parent != ROOT.parent / "benchmarks" and path.name != "reference.py":
            assert "genesis_ext.reference" not in names, path
