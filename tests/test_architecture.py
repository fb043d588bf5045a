"""The layers of ARCHITECTURE.md hold: no module imports from a layer below it (lazy imports included)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first; a module may import from its own layer and the ones before it.
LAYERS = [
    ("c2al.errors", "c2al.config", "c2al.logs"),
    ("c2al.data",),
    ("c2al.dist",),
    ("c2al.models",),
    ("c2al.cohorts",),
    ("c2al.losses", "c2al.balance", "c2al.plugin", "c2al.robust", "c2al.towers"),
    ("c2al.eval",),
    ("c2al.train",),
    ("c2al.federated",),
    ("c2al.jobs",),
]
PACKAGES = {"c2al": ROOT / "c2al", "c2al.models": ROOT / "models", "c2al.cohorts": ROOT / "cohorts"}


def layer(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def modules() -> list[tuple[str, Path]]:
    out = []
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            if package == "c2al" and path.parts[len(folder.parts)] in ("models", "cohorts"):
                continue
            rel = path.relative_to(folder).with_suffix("")
            name = ".".join([package, *rel.parts]).removesuffix(".__init__")
            if name != "c2al":  # the package root re-exports the public API (attach, detach, errors)
                out.append((name, path))
    return out


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [m for m in found if m.startswith("c2al.")]


def test_every_module_has_a_layer():
    assert [name for name, _ in modules() if layer(name) is None] == []


@pytest.mark.parametrize("name, path", modules(), ids=[n for n, _ in modules()])
def test_no_import_goes_down_the_layers(name, path):
    mine = layer(name)
    upward = [m for m in imports(path) if (layer(m) or 0) > mine]
    assert upward == [], f"{name} (layer {mine}) imports {upward}"
