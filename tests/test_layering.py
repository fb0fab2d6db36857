"""The import graph flows one way inside `rtda`, and the root scripts sit on top of it:

    config, utils  <-  datasets, models, runs  <-  evaluation, adapt  <-  engine  <-  bench, experiments

Every import counts, a lazy one inside a function too: a strategy that imported the trainer on first use
would still sit below what it drives. A unit is a subpackage or module of `rtda` (rtda/adapt/, rtda/runs.py).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rtda"
LAYER = {"config": 0, "utils": 0, "datasets": 1, "models": 1, "evaluation": 2, "adapt": 2, "engine": 3, "runs": 1,
         "bench": 4, "experiments": 4}


def project_imports(path: Path) -> set[str]:
    """The units of `rtda` that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "rtda" else [f"rtda.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name.split(".")[1] for name in names if name.startswith("rtda.") and len(name.split(".")) > 1)
    return found


def unit_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_unit_of_the_package_has_a_layer():
    units = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert units - {"__init__"} <= set(LAYER), "give a new unit of rtda a place in LAYER"


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_a_higher_layer(path):
    unit = unit_of(path)
    higher = sorted(name for name in project_imports(path) if LAYER[name] > LAYER[unit])
    assert not higher, f"{path.relative_to(REPO)} (layer {LAYER[unit]}) imports {higher} from a higher layer"


def test_no_import_cycle_between_units():
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


def test_root_scripts_and_shims_hold_no_library_code():
    """The commands are thin: argument handling lives in the package, so a notebook gets it with `import rtda`."""
    for path in [*REPO.glob("*.py"), *REPO.glob("datasets/*.py"), *REPO.glob("models/*.py")]:
        tree = ast.parse(path.read_text())
        defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert len(path.read_text().splitlines()) <= 40 and not defined, f"{path.name}: move {defined} into rtda/"


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\n\ndef run():\n    from rtda.engine import train\n    import rtda.bench.x\n"
                      "    from rtda import experiments\n")
    assert project_imports(sample) == {"engine", "bench", "experiments"}
