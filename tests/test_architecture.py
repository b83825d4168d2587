"""The layout's rules, checked on the source: data flows one way, and nothing imports the tests.

The layers, lowest first (docs/architecture.md draws them): a module may import its own layer
and the layers below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "matryoshka"

#: top-level module or package of ``matryoshka`` -> its layer.
LAYERS = {
    **dict.fromkeys(("__init__", "__main__", "_validate", "config", "io", "nesting", "ops"), 0),
    "checkpoint": 0,
    **dict.fromkeys(("data", "backbones"), 1),
    "losses": 2,
    "models": 3,
    "training": 4,
    **dict.fromkeys(("evaluation", "cascade"), 5),
    **dict.fromkeys(("retrieval", "embed"), 6),
    "report": 7,
    **dict.fromkeys(("experiment", "apps", "serve", "client"), 8),
    "cli": 9,
}


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
    return names


def _layer(module: str) -> int:
    parts = module.split(".")
    return 0 if len(parts) == 1 else LAYERS[parts[1]]


def test_every_module_has_a_layer() -> None:
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")}
    assert tops <= set(LAYERS), f"no layer for {sorted(tops - set(LAYERS))}: add it to LAYERS"


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_module_reaches_up_the_chain(path: Path) -> None:
    rel = path.relative_to(PACKAGE)
    if rel.name == "__init__.py" and len(rel.parts) == 1:
        return  # the package root re-exports from every layer, lazily
    mine = LAYERS[rel.parts[0].removesuffix(".py")]
    up = [m for m in _imports(path) if m.startswith("matryoshka") and _layer(m) > mine]
    assert not up, f"{rel} (layer {mine}) imports {up} from a higher layer"


@pytest.mark.parametrize("folder", ["src", "benchmarks", "tools"])
def test_nothing_imports_the_tests(folder: str) -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / folder).rglob("*.py")
        if any(m == "tests" or m.startswith("tests.") for m in _imports(p))
    ]
    assert not offenders
