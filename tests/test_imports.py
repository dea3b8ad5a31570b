"""The package's import graph has no cycles (issue 17): every import statement, at any depth in a
file, counts, and importing ``a.b.c`` counts as importing the package ``a.b`` too (its ``__init__``
runs)."""

from __future__ import annotations

import ast
from pathlib import Path

import ulma_lightning

PACKAGE = Path(__file__).resolve().parents[1] / "ulma_lightning"
LEFT_OUT: tuple[str, ...] = ()


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if not target or target == name:
                    continue
                graph[name].add(target)
                parent = target.rpartition(".")[0]
                while parent in modules and parent != "ulma_lightning":  # the package __init__s that run
                    if parent != name and not name.startswith(parent + "."):
                        graph[name].add(parent)
                    parent = parent.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = import_graph()
    kept = {m: {t for t in ts if not t.startswith(LEFT_OUT)} for m, ts in graph.items() if not m.startswith(LEFT_OUT)}
    assert cycles(kept) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_named_seams_stay_one_way() -> None:
    """The seams issue 17 named: ``ulma evaluate`` builds on the LightningCLI, not the entry point
    that dispatches to it; the tokenizers and the errors import nothing of the data package."""
    graph = import_graph()
    assert "ulma_lightning.cli" not in graph["ulma_lightning.evaluation.evaluate"]
    assert not {t for t in graph["ulma_lightning.tokenizers"] if t.startswith("ulma_lightning.")}
    assert "ulma_lightning.data.sources" not in graph["ulma_lightning.data.errors"]


def test_public_names_importable() -> None:
    for name in ("ULMAModule", "PointwiseDPOModule", "PointwiseDataModule", "pointwise_dpo_loss", "ulma_loss"):
        assert hasattr(ulma_lightning, name), name


def test_test_modules_import_helper_modules_not_other_test_modules() -> None:
    """Issue 28: what several test files share lives in a helper module (``tests/helpers.py``,
    ``tests/rl_helpers.py``), so running or changing one test file never runs another's imports."""
    found = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found += [f"{path.name} imports {name}" for name in names if name.rpartition(".")[2].startswith("test_")]
    assert found == []
