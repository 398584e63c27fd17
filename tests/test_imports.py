"""The package's import structure: no cycle among gradual's modules, counting imports inside functions too (a
lazy import hides a cycle from a plain `import`, not from the design), and every module imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gradual"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name → file, for every module under `package` (a package by its `__init__`)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module's imports of other modules of the package, wherever in the file they stand. `from p import x`
    is an edge to `p.x` when that is a module, else to `p`; a submodule's parent package is not an edge (a
    package's `__init__` importing its own submodules is no cycle)."""
    files = module_files(package)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                module = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module or ""
                deps.update(f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None (depth-first search)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for dep in sorted(graph[node]):
            cycle = visit(dep, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node, [])
        if cycle:
            return cycle
    return None


def test_no_import_cycle_among_gradual_modules():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_lazy_import_cycle_is_found(tmp_path):
    """The check sees a cycle closed by an import inside a function, as `cli` → `compare` → `lightning_cli` →
    `cli.check_lm_eval_tasks` was."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.sub import g\n")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.b import g\n")
    (package / "sub" / "b.py").write_text("def g():\n    from pkg import a\n")
    (package / "c.py").write_text("from . import a\nfrom .sub import b\n")
    graph = import_graph(package)
    assert graph["pkg.c"] == {"pkg.a", "pkg.sub.b"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
    (package / "sub" / "b.py").write_text("def g():\n    pass\n")
    assert find_cycle(import_graph(package)) is None


def test_every_module_imports_in_a_fresh_process():
    """Every module, in a fixed (sorted) order, in one fresh interpreter: none fails at import time."""
    names = [n for n in module_files(PACKAGE) if n != "gradual.__main__"]  # __main__ runs the CLI
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
