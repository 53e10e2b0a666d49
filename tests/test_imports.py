"""The import graph of pivot_mega, read from the source with ``ast``: no circles, and DESIGN.md's layers.

Every ``import`` counts, at module level or inside a function: a function-level import only hides a
circle until the function runs. ``from X import name`` counts as importing ``X.name`` when that is a
module, else ``X``; a package's ``__init__.py`` re-exporting its submodules imports them, and a
submodule reading its parent package imports that ``__init__.py``. Implicit parent-package imports
(``import a.b`` runs ``a/__init__.py``) do not count: Python runs them first, before the importer.
``importlib.import_module("pivot_mega.x")`` counts; a module name computed at run time cannot be seen.
The repository's ``kernels/`` folder installs as ``pivot_mega.kernels``; ``import kernels`` means it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pivot_mega"
ENTRY_POINT = f"{PACKAGE}.cli"  # the console script (setup.py); nothing else may import it

# (importer layer, forbidden layers): DESIGN.md's "one direction of imports".
LOW_LAYERS = ("models", "data", "parallel", "precision", "kernels")
HIGH_LAYERS = ("training", "eval", "demo", "convert", "cli")
LAYER_RULES = [(low, HIGH_LAYERS) for low in LOW_LAYERS] + [
    ("data", ("models", "parallel", "precision")),
    # The model knows nothing of how it is run: parallelism and precision are applied from outside.
    ("models", ("parallel", "precision", "training")),
    # The batch contract sits below everything that reads it.
    ("batch", LOW_LAYERS + HIGH_LAYERS),
]


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str  # "path:line" of the import statement


def source_files(root: Path = ROOT) -> dict[str, Path]:
    """{module name: file} of pivot_mega, with ``kernels/`` under ``pivot_mega.kernels``."""
    trees = [(root / PACKAGE, PACKAGE)]
    if (root / "kernels").is_dir() and not (root / PACKAGE / "kernels").is_dir():
        trees.append((root / "kernels", f"{PACKAGE}.kernels"))
    modules = {}
    for folder, name in trees:
        for path in sorted(folder.rglob("*.py")):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _canonical(name: str) -> str:
    return f"{PACKAGE}.{name}" if name == "kernels" or name.startswith("kernels.") else name


def _known(name: str, modules) -> str | None:
    """``name`` or its longest prefix that is one of ``modules`` (``a.b.func`` → ``a.b``)."""
    parts = _canonical(name).split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def _base(module: str, path: Path, level: int) -> str:
    """The package a ``from .{level} import`` in ``module`` starts from."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return package


def import_edges(modules: dict[str, Path], root: Path = ROOT) -> list[Edge]:
    edges = []
    for module, path in modules.items():
        where = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    base = _base(module, path, node.level)
                    source = f"{base}.{source}" if source else base
                for alias in node.names:
                    submodule = _known(f"{source}.{alias.name}", modules)
                    targets.append(submodule if submodule == _canonical(f"{source}.{alias.name}") else source)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                  and not node.args[0].value.startswith(".")):
                targets = [node.args[0].value]  # importlib.import_module("pivot_mega.x")
            for target in targets:
                imported = _known(target, modules)
                if imported is not None and imported != module:
                    edges.append(Edge(module, imported, f"{where}:{node.lineno}"))
    return list(dict.fromkeys(edges))  # `from .x import a, b` is one edge


@dataclass
class Cycle:
    circle: list[Edge]       # one shortest way round, from the part's first module back to it
    modules: frozenset[str]  # the whole strongly connected part (may hold more circles)


def find_cycles(edges: list[Edge]) -> list[Cycle]:
    """One :class:`Cycle` for each strongly connected part of the graph (Tarjan)."""
    graph: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, {}).setdefault(edge.imported, edge)
        graph.setdefault(edge.imported, {})
    index, low, stack, on_stack, parts = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                part.add(member)
                if member == node:
                    break
            if len(part) > 1:
                parts.append(part)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles = []
    for part in parts:
        start = min(part)
        # Shortest way back to start inside the part (breadth first): the circle to show.
        came_from: dict[str, Edge] = {}
        frontier, found = [start], None
        while frontier and found is None:
            following = []
            for node in frontier:
                for nxt, edge in sorted(graph[node].items()):
                    if nxt not in part:
                        continue
                    if nxt == start:
                        found = edge
                        break
                    if nxt not in came_from:
                        came_from[nxt] = edge
                        following.append(nxt)
                if found is not None:
                    break
            frontier = following
        circle = [found]
        while circle[0].importer != start:
            circle.insert(0, came_from[circle[0].importer])
        cycles.append(Cycle(circle, frozenset(part)))
    return sorted(cycles, key=lambda cycle: cycle.circle[0].importer)


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == PACKAGE else None


def layer_violations(edges: list[Edge]) -> list[str]:
    found = []
    for edge in edges:
        if edge.imported == ENTRY_POINT:
            found.append(f"{edge.where}: {edge.importer} imports {ENTRY_POINT}, the entry point "
                         "(shared command pieces belong in a module below the commands)")
            continue
        for importer_layer, forbidden in LAYER_RULES:
            if layer(edge.importer) == importer_layer and layer(edge.imported) in forbidden:
                found.append(f"{edge.where}: {edge.importer} imports {edge.imported} "
                             f"({importer_layer}/ must not import {layer(edge.imported)})")
    return found


def _describe(cycle: Cycle) -> str:
    circle = cycle.circle
    lines = [" -> ".join([edge.importer for edge in circle] + [circle[0].importer])]
    lines += [f"    {edge.where}: {edge.importer} imports {edge.imported}" for edge in circle]
    if len(cycle.modules) > len(circle):
        lines.append("    in one knot with: " + ", ".join(sorted(cycle.modules - {e.importer for e in circle})))
    return "\n".join(lines)


def test_the_package_has_no_import_cycles():
    cycles = find_cycles(import_edges(source_files()))
    assert not cycles, "import cycles:\n" + "\n".join(_describe(cycle) for cycle in cycles)


def test_imports_follow_the_layers_of_design_md():
    violations = layer_violations(import_edges(source_files()))
    assert not violations, "imports against DESIGN.md's layers:\n" + "\n".join(violations)


def test_the_graph_covers_the_package():
    # Guards the two tests above against passing on an empty or misread graph.
    modules = source_files()
    edges = import_edges(modules)
    assert {f"{PACKAGE}.cli", f"{PACKAGE}.models.mllm", f"{PACKAGE}.kernels"} <= set(modules)
    assert any(edge.importer.startswith(f"{PACKAGE}.parallel") and edge.imported.startswith(f"{PACKAGE}.kernels")
               for edge in edges), "parallel/ reads the kernels (as pivot_mega.kernels or kernels)"
    assert any(edge.importer == f"{PACKAGE}.parallel" and edge.imported.startswith(f"{PACKAGE}.parallel.")
               for edge in edges), "a package __init__ re-exporting its submodules is an edge"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_a_planted_cycle_and_layer_breach_are_found(tmp_path):
    _write(tmp_path, {
        f"{PACKAGE}/__init__.py": "",
        f"{PACKAGE}/cli.py": "",
        # package <-> submodule through the __init__ re-export
        f"{PACKAGE}/parallel/__init__.py": "from .pipeline import run\n",
        f"{PACKAGE}/parallel/pipeline.py": "from . import mesh\ndef run():\n    from . import helper\n",
        f"{PACKAGE}/parallel/mesh.py": "",
        # a function-level import back to the entry point, and an absolute one to a low layer
        f"{PACKAGE}/eval/__init__.py": "",
        f"{PACKAGE}/eval/commands.py": "def f():\n    from ..cli import DTYPES\n",
        f"{PACKAGE}/data/loader.py": "import pivot_mega.models.mllm\nfrom kernels import linear\n",
        f"{PACKAGE}/models/mllm.py": "from pivot_mega.models import layers\n",
        f"{PACKAGE}/models/layers.py": "",
        "kernels/__init__.py": "",
        "kernels/linear.py": "from kernels.triton import fused\n",
        "kernels/triton.py": "def fused():\n    from .linear import reference\n",
    })
    edges = import_edges(source_files(tmp_path), tmp_path)
    pairs = {(edge.importer, edge.imported) for edge in edges}
    p = PACKAGE
    assert {(f"{p}.parallel", f"{p}.parallel.pipeline"), (f"{p}.parallel.pipeline", f"{p}.parallel.mesh"),
            (f"{p}.parallel.pipeline", f"{p}.parallel"), (f"{p}.models.mllm", f"{p}.models.layers"),
            (f"{p}.data.loader", f"{p}.kernels.linear"), (f"{p}.eval.commands", f"{p}.cli")} <= pairs
    cycles = [set(cycle.modules) for cycle in find_cycles(edges)]
    assert sorted(cycles, key=sorted) == [{f"{p}.kernels.linear", f"{p}.kernels.triton"},
                                          {f"{p}.parallel", f"{p}.parallel.pipeline"}]
    violations = layer_violations(edges)
    assert len(violations) == 2
    assert any(f"{p}.eval.commands imports {p}.cli" in v for v in violations)
    assert any("data/ must not import models" in v and "data/loader.py:1" in v for v in violations)
