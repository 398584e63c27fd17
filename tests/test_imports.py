"""The package's import structure: no cycle among gradual's modules, counting imports inside functions too (a
lazy import hides a cycle from a plain `import`, not from the design), and every module imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradual"
PACKAGE_DIRS = {"gradual.callbacks": ROOT / "callbacks"}  # pyproject's package-dir: ./callbacks is gradual.callbacks


def module_files(package: Path, name: str | None = None) -> dict[str, Path]:
    """Dotted module name → file, for every module under `package` (a package by its `__init__`), installed as
    `name` (default: the folder's name)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = [*(name or package.name).split("."), *path.relative_to(package).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(package: Path, package_dirs: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Each module's imports of other modules of the package (and of the subpackages installed from other folders,
    `package_dirs`), wherever in the file they stand. `from p import x` is an edge to `p.x` when that is a module,
    else to `p`; a submodule's parent package is not an edge (a package's `__init__` importing its own submodules
    is no cycle)."""
    files = module_files(package)
    for name, folder in (package_dirs or {}).items():
        files.update(module_files(folder, name))
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
    graph = import_graph(PACKAGE, PACKAGE_DIRS)
    assert "gradual.callbacks.stopping" in graph and "gradual.module" in graph
    cycle = find_cycle(graph)
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
    every = {**module_files(PACKAGE), **{k: v for name, folder in PACKAGE_DIRS.items()
                                         for k, v in module_files(folder, name).items()}}
    names = [n for n in every if n != "gradual.__main__"]  # __main__ runs the CLI
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
