"""lowbit's subpackages import downward only.

Every ``import`` in ``src/lowbit`` (module level or inside a function: a lazy import is still a
dependency) is read with ``ast``; a module of subpackage A may import subpackage B only when B
sits on a lower layer than A.  Two subpackages on one layer may not import each other, so there
is no cycle between subpackages either.  A new subpackage must be given its layer here.

The layers (see ../shared/DESIGN.md; export and runtime need nothing from the algorithms, so
they sit beside them rather than above, and analysis/report, which runs algorithms and measures
exported files, sits above both):
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lowbit

LAYERS: dict[str, int] = {
    # 0: no lowbit dependency
    "_files": 0, "targets": 0, "numerics": 0, "zoo": 0,
    "observers": 1,
    "nn": 2,
    "config": 3,
    # algorithms below ptq, and the file format, which only needs nn
    "passes": 4, "export": 4,
    "ptq": 5, "runtime": 5,
    "qat": 6,
    "persist": 7, "report": 7,
    # sensitivity, mixed precision, autoquant: they run the algorithms and measure with report
    "analysis": 8,
    # faces
    "cli": 9, "demo": 9, "examples": 9,
    "__init__": 10, "__main__": 10,  # the package itself and `python -m lowbit`
}

ROOT = Path(lowbit.__file__).parent


def _unit(path: Path) -> str:
    """The subpackage (or top-level module) ``path`` belongs to."""
    first = path.relative_to(ROOT).parts[0]
    return first.removesuffix(".py")


def _imported_units(path: Path, root: Path = ROOT) -> set[tuple[str, int]]:
    """(lowbit subpackage, line) for every import in the module at ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = list(path.relative_to(root.parent).parts[:-1])  # the package the module is in
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names = [".".join([*base, *(node.module.split(".") if node.module else [])])]
            if node.module is None:  # from . import x: x is the unit
                names = [".".join([*base, alias.name]) for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "lowbit" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def _edges() -> list[tuple[str, str, str]]:
    """(importer unit, imported unit, "file:line") for every cross-unit import."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        unit = _unit(path)
        for imported, line in _imported_units(path):
            if imported != unit:
                edges.append((unit, imported, f"{path.relative_to(ROOT.parent)}:{line}"))
    return edges


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in ROOT.rglob("*.py")}
    missing = sorted(units - LAYERS.keys())
    assert not missing, f"give these subpackages a layer in tests/test_layering.py: {missing}"


def test_imports_go_downward_only():
    upward = [f"{where}: {a} (layer {LAYERS.get(a)}) imports {b} (layer {LAYERS.get(b)})"
              for a, b, where in _edges() if b in LAYERS and LAYERS[b] >= LAYERS.get(a, 99)]
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


@pytest.mark.parametrize("low", ["export", "runtime"])
def test_export_and_runtime_never_import_training(low):
    assert not [w for a, b, w in _edges() if a == low and b in ("qat", "passes", "ptq")]


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The parser finds what the test relies on: relative imports at any depth, ``from . import``,
    and imports inside functions."""
    pkg = tmp_path / "lowbit" / "export" / "sub"
    pkg.mkdir(parents=True)
    module = pkg / "mod.py"
    module.write_text("from ...qat.prepare import x\nfrom ... import ptq\nfrom . import sibling\n"
                      "def f():\n    import lowbit.passes.fold_bn\n")
    units = {u for u, _ in _imported_units(module, tmp_path / "lowbit")}
    assert units == {"qat", "ptq", "passes", "export"}
