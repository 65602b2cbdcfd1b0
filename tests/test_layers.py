"""The package's imports run one way: no module imports a module of a higher layer, and no import
cycle exists, function-local and TYPE_CHECKING imports included (read with ``ast``, nothing is
imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pipeline"

# The layers, from the bottom. A module may import modules of its own layer and of the layers
# below it. An entry names a module, or a package and every module in it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline", "pipeline.storage", "pipeline.data", "pipeline.tune"),
    ("pipeline.config",),
    ("pipeline.data.format", "pipeline.tune.space"),
    (
        "pipeline.augment",
        "pipeline.models",
        "pipeline.losses",
        "pipeline.metrics",
        "pipeline.dist",
        "pipeline.loopback",
    ),
    ("pipeline.objective", "pipeline.data.read", "pipeline.data.pairs", "pipeline.prepare"),
    ("pipeline.tracking",),
    ("pipeline.checkpoint",),
    ("pipeline.evaluate", "pipeline.serving"),
    ("pipeline.plots",),
    ("pipeline.train", "pipeline.demo"),
    ("pipeline.tune.search", "pipeline.segment"),
    ("pipeline.cli",),
)
PACKAGES = {"pipeline", "pipeline.data", "pipeline.tune"}  # their own __init__ only


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pipeline import storage` imports a module; `from pipeline import X` a name.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def layer_of(name: str) -> int:
    """The index in LAYERS of the longest entry that names ``name`` or a package holding it."""
    best, where = "", -1
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            holds = entry not in PACKAGES and name.startswith(entry + ".")
            if (name == entry or holds) and len(entry) > len(best):
                best, where = entry, i
    return where


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in edges.items()
        for b in targets
        if layer_of(b) > layer_of(a)
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if layer_of(m) < 0]
    assert not unplaced, f"add these modules to LAYERS: {unplaced}"


def test_no_module_imports_a_higher_layer():
    assert upward_imports(graph()) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_reader_sees_function_local_and_type_checking_imports(tmp_path):
    """The checks above can fail: a lower module that imports a higher one inside a function
    or under TYPE_CHECKING is caught, and so is the circle it closes."""
    pkg = tmp_path / "pipeline"
    (pkg / "tune").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tune" / "__init__.py").write_text("")
    (pkg / "config.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pipeline.tune.space import Dimension\n"
    )
    (pkg / "evaluate.py").write_text("def f():\n    from pipeline import train\n")
    (pkg / "train.py").write_text("from pipeline.evaluate import f\n")
    (pkg / "tune" / "space.py").write_text("from pipeline.config import X\n")
    edges = graph(pkg)
    assert upward_imports(edges) == [
        "pipeline.config (layer 1) imports pipeline.tune.space (layer 2)",
        "pipeline.evaluate (layer 7) imports pipeline.train (layer 9)",
    ]
    assert sorted(cycles(edges)) == [
        ["pipeline.config", "pipeline.tune.space"],
        ["pipeline.evaluate", "pipeline.train"],
    ]
