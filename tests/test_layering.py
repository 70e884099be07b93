"""The module map in docs/ARCHITECTURE.md is true: every import inside `platform/lorafleet` (at module
level or inside a function, but not under `if TYPE_CHECKING:`) goes to a module of a lower layer or of its
own package, every top-level module is in the map, and no modules import each other around a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "platform" / "lorafleet"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT / "platform").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """The lorafleet modules `name` imports (a `from pkg import sub` counts as importing `pkg.sub`)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names if a.name.startswith("lorafleet"))

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("lorafleet"):
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    found.add(sub if sub in MODULES else module)

    Visitor().visit(ast.parse(path.read_text()))
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _unit(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _layers() -> dict[str, int]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `([a-z_]+)` \|", text, flags=re.M)
    assert rows, "docs/ARCHITECTURE.md has no module map table"
    return {unit: int(layer) for layer, unit in rows}


def test_every_top_level_module_is_in_the_map():
    units = {_unit(m) for m in MODULES} - {""}
    assert units == set(_layers()), f"not in the map: {units - set(_layers())}; gone: {set(_layers()) - units}"


def test_no_import_runs_up_the_layers():
    layers = _layers()
    upward = [f"{a} -> {b} (layer {layers[_unit(a)]} -> {layers[_unit(b)]})"
              for a, deps in GRAPH.items() if _unit(a) for b in deps
              if _unit(b) and _unit(b) != _unit(a) and layers[_unit(b)] >= layers[_unit(a)]]
    assert not upward, "imports that run up (or across) the layers of docs/ARCHITECTURE.md:\n" + "\n".join(upward)


def test_no_import_circles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


@pytest.mark.parametrize("entry", ["jobs", "tune", "serve"])
def test_entry_folders_import_only_lorafleet(entry):
    for path in (ROOT / entry).glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("jobs", "tune", "serve"):
                pytest.fail(f"{path.relative_to(ROOT)} imports {node.module}: entry folders import lorafleet only")
