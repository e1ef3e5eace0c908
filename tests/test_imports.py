"""The package's imports point one way: no cycle among vitup_cli modules (imports inside functions and
``TYPE_CHECKING`` blocks counted), and each layer imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vitup_cli"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path, *, only_in_functions: bool = False) -> set[str]:
    """The vitup_cli modules ``module`` imports (``from pkg import sub`` counts as ``pkg.sub``; the parent
    packages Python initialises on the way are not edges; ``importlib.import_module("name")`` counts)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    nodes = []
    if only_in_functions:
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name != "__getattr__":
                nodes.extend(ast.walk(fn))
    else:
        nodes = list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names = [node.args[0].value]
        else:
            continue
        out.update(n for n in names if n in MODULES and n != module)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_package():
    assert {"vitup_cli.models.registry", "vitup_cli.hub.open", "vitup_cli.extract"} <= set(MODULES)
    assert "vitup_cli.models.base" in GRAPH["vitup_cli.models.vitup"]
    assert "vitup_cli.hub.format" in GRAPH["vitup_cli.hub.open"]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


#: what each layer may import from vitup_cli (by first component below vitup_cli)
ALLOWED = {
    "models": {"models", "backbones", "errors", "choice"},
    "hub": {"hub", "models", "backbones", "errors", "fileio", "_version", "choice"},
    "train": {
        *("train", "hub", "models", "backbones", "errors", "fileio", "_version", "data", "progress", "distributed"),
        "choice",
    },
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downwards(layer):
    wrong = {
        m: sorted(n for n in deps if _layer(n) not in ALLOWED[layer]) for m, deps in GRAPH.items() if _layer(m) == layer
    }
    assert {m: d for m, d in wrong.items() if d} == {}


def test_no_vitup_import_hides_inside_a_function():
    """An import inside a function to dodge a cycle is a smell: every internal import is at module level
    (the CLI's command modules may defer the heavy ones, for a fast ``--help``, as may a package's lazy
    public names, PEP 562 ``__getattr__``)."""
    hidden = {
        m: sorted(_imports(m, p, only_in_functions=True))
        for m, p in MODULES.items()
        if not m.startswith("vitup_cli.cli")
    }
    assert {m: d for m, d in hidden.items() if d} == {}
