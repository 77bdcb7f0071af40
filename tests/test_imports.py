"""The import graph of ``src/`` and ``data_prep/``: no cycle, and no import from a lower layer
into a higher one (the order in CONTRIBUTING.md). Every import statement counts, at module level
or inside a function, under ``TYPE_CHECKING`` or not."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"sparse_moe": REPO / "src", "data_prep": REPO}


def module_files() -> dict[str, Path]:
    """Module name -> file, for every module of both packages."""
    out = {}
    for package, base in ROOTS.items():
        for path in (base / package).rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's package
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in node.names]


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that ``name`` (a module or a name in one) belongs to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    modules = modules if modules is not None else module_files()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for name in _imported(module, path, node, modules):
                owner = _owner(name, modules)
                if owner and owner != module and not module.startswith(owner + "."):
                    graph[module].add(owner)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def documented_layers() -> dict[str, int]:
    """Package -> layer, from CONTRIBUTING.md's numbered list after the ``layers`` marker."""
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    listed = text.split("<!-- layers: the test reads this list -->", 1)[1]
    layers = {}
    for number, names in re.findall(r"^(\d+)\. (.*)$", listed.split("\n\n", 1)[0], re.M):
        for name in re.findall(r"`([\w.]+)`", names):
            layers[name] = int(number)
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    while module and module not in layers:
        module = module.rpartition(".")[0]
    return layers.get(module) if module else None


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    out = []
    for module, imported in sorted(graph.items()):
        for other in sorted(imported):
            mine, theirs = layer_of(module, layers), layer_of(other, layers)
            if mine is not None and theirs is not None and theirs > mine:
                out.append(f"{module} (layer {mine}) imports {other} (layer {theirs})")
    return out


def test_no_module_imports_itself_back():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_every_package_is_in_a_layer_and_imports_only_downward():
    graph, layers = import_graph(), documented_layers()
    unplaced = sorted(m for m in graph if layer_of(m, layers) is None and "." in m)
    assert not unplaced, f"not in CONTRIBUTING.md's layers: {unplaced}"
    wrong = upward_imports(graph, layers)
    assert not wrong, "imports from a lower layer into a higher one:\n" + "\n".join(wrong)


def test_the_checks_find_a_cycle_and_an_upward_import(tmp_path):
    package = tmp_path / "sparse_moe"
    (package / "moe").mkdir(parents=True)
    (package / "train").mkdir()
    (package / "moe" / "a.py").write_text("from sparse_moe.train.b import x\n")
    (package / "train" / "b.py").write_text("def f():\n    from sparse_moe.moe import a\n")
    modules = {"sparse_moe.moe.a": package / "moe" / "a.py",
               "sparse_moe.train.b": package / "train" / "b.py"}
    graph = import_graph(modules)
    assert cycles(graph) == [["sparse_moe.moe.a", "sparse_moe.train.b"]]
    assert upward_imports(graph, {"sparse_moe.moe": 2, "sparse_moe.train": 5}) == [
        "sparse_moe.moe.a (layer 2) imports sparse_moe.train.b (layer 5)"]
