"""The import graph flows one way: config/runtime <- datasets, models <- eval, adapt <- train <- benchmark.

Every import counts, a lazy one inside a function too: a strategy that imported the trainer on first use
would still sit below what it drives.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER = {"config": 0, "runtime": 0, "datasets": 1, "models": 1, "eval": 2, "adapt": 2, "train": 3, "benchmark": 4}


def project_imports(path: Path) -> set[str]:
    """The project's top-level modules and packages that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in LAYER)
    return found


def unit_of(path: Path) -> str:
    relative = path.relative_to(REPO)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def source_files() -> list[Path]:
    files = [REPO / f"{name}.py" for name in LAYER if (REPO / f"{name}.py").is_file()]
    files += [p for package in ("datasets", "models") for p in sorted((REPO / package).glob("*.py"))]
    return files


def test_every_project_module_has_a_layer():
    top_level = {p.stem for p in REPO.glob("*.py")} | {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert top_level - {"tests"} <= set(LAYER), "give a new top-level module a place in LAYER"


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_a_higher_layer(path):
    unit = unit_of(path)
    higher = sorted(name for name in project_imports(path) if LAYER[name] > LAYER[unit])
    assert not higher, f"{path.relative_to(REPO)} (layer {LAYER[unit]}) imports {higher} from a higher layer"


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    for path in source_files():
        graph.setdefault(unit_of(path), set()).update(project_imports(path) - {unit_of(path)})
    visiting, done = set(), set()

    def visit(node: str, trail: list[str]) -> None:
        if node in done:
            return
        assert node not in visiting, "import cycle: " + " -> ".join(trail + [node])
        visiting.add(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\n\ndef run():\n    from train import train\n    import benchmark.x\n")
    assert project_imports(sample) == {"train", "benchmark"}
