"""The package's layering, declared once (:data:`LAYERS`): no import cycle, and no module imports a higher layer.

The import graph comes from the source (``ast``; imports inside functions count too: a lazy import is still a
dependency). A module belongs to the first layer naming it exactly, else to the layer naming its first part.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nirvana_lightning"

#: lowest first. ``data.datamodule`` (and the ``data`` package that exposes it) is Lightning glue that loads the
#: tokenizer of a model source, so it sits with the LightningModule; the rest of ``data`` (sources, text, sft,
#: calibration) is below pruning, which validates calibration sources and masks labels with it. ``loading`` sits
#: above the exports because an export is one of the model sources it reads.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["errors", "io", "dtypes", "devices", "divergence"]),
    ("families", ["families", "debug_models"]),
    ("data", ["data.sources", "data.text", "data.sft", "data.calibration"]),
    ("pruning", ["pruning"]),
    ("recovery", ["recovery"]),
    ("eval", ["eval"]),
    ("export", ["export", "serving"]),
    ("loading", ["loading"]),
    ("module", ["contract", "sharding", "restore", "module", "data", "data.datamodule"]),
    ("callbacks", ["callbacks"]),
    ("cli", ["cli", "__main__", "configs_doc", ""]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        out[name] = f
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{module}.{a.name}".lstrip(".") for a in node.names] + [module]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                targets = [n.removeprefix("nirvana_lightning").lstrip(".") for n in names
                           if n == "nirvana_lightning" or n.startswith("nirvana_lightning.")]
            hit = next((t for t in targets if t in modules and t != name), None)
            if hit is not None:
                edges[name].add(hit)
    return edges


def _layer(module: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        if module in names:
            return i
    for i, (_, names) in enumerate(LAYERS):
        if module.split(".")[0] in names:
            return i
    raise AssertionError(f"module {module!r} is in no layer: add it to LAYERS")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    edges = _graph()
    assert "pruning.api" in edges["pruning.selection"]  # a module-level import
    assert "export" in edges["loading"]  # a function-level import counts too


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_no_module_imports_a_higher_layer():
    edges = _graph()
    up = [f"{a} ({LAYERS[_layer(a)][0]}) -> {b} ({LAYERS[_layer(b)][0]})"
          for a in sorted(edges) for b in sorted(edges[a]) if _layer(b) > _layer(a)]
    assert up == [], "\n".join(up)


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)
