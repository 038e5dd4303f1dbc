"""Imports point one way: cli -> pipeline -> stages -> the library modules (docs/architecture.md).

Read from the source with `ast`, so a new import that breaks the direction fails here, whether
it sits at the top of a module or inside a function (a deferred import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlft"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """rlft modules (and `typer`) imported anywhere in the file, TYPE_CHECKING blocks excluded."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for child in node.body for n in ast.walk(child)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from rlft import data`
    known = set(MODULES)
    return {n for n in names if n in known or n == "typer" or n.startswith("typer.")}


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _layer(module: str) -> str:
    if module == "rlft.__main__":  # `python -m rlft`: the command line itself
        return "cli"
    if module in ("rlft.cli", "rlft.pipeline"):
        return module.rsplit(".", 1)[1]
    return "stages" if module.startswith("rlft.stages") else "library"


def test_imports_point_one_way() -> None:
    order = {"cli": 0, "pipeline": 1, "stages": 2, "library": 3}
    upward = sorted(
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if t.startswith("rlft") and order[_layer(t)] < order[_layer(m)]
    )
    assert not upward, upward


def test_only_the_cli_speaks_typer() -> None:
    assert [m for m, targets in GRAPH.items() if m != "rlft.cli" and any(t.startswith("typer") for t in targets)] == []


def test_stages_do_not_import_each_other() -> None:
    crossing = [f"{m} imports {t}" for m, ts in GRAPH.items() if m.startswith("rlft.stages.") for t in ts
                if t.startswith("rlft.stages.")]
    assert not crossing, crossing


def _cycles() -> list[list[str]]:
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
        for w in GRAPH[v]:
            if w not in GRAPH:
                continue
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

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    # the package itself (rlft/__init__.py) re-exports nothing that imports back, so it counts too
    assert _cycles() == []


def test_the_checker_sees_a_planted_cycle_and_an_upward_import() -> None:
    """The graph walk is not vacuous: edges exist, and a planted cycle is found."""
    assert "rlft.run" in GRAPH["rlft.pipeline"] and "rlft.stages.grpo" in GRAPH["rlft.pipeline"]
    GRAPH["rlft.core.losses"].add("rlft.rl.rounds")
    try:
        assert any("rlft.core.losses" in c for c in _cycles())
    finally:
        GRAPH["rlft.core.losses"].discard("rlft.rl.rounds")


def _package(module: str) -> str:
    """`rlft.data.rows` -> `data`; a top-level module is its own package (`rlft.training` -> `training`)."""
    return module.split(".")[1] if module.count(".") else "rlft"


# What each library package may import (docs/architecture.md): a DAG, bottom first.
ALLOWED: dict[str, set[str]] = {
    "errors": set(), "hints": set(), "core": set(), "scoring": set(),
    "data": {"errors"},
    "ckpt": {"errors", "hints"},
    "loggers": {"errors"},
    "dist": {"errors"},
    "fsdp": {"dist", "precision"},
    "metrics": {"dist", "loggers"},
    "rewards": {"errors", "data"},
    "tiny_bpe": set(),
    "tiny": {"errors", "ckpt", "tiny_bpe"},
    "recipe": {"errors", "data", "rewards", "tiny", "metrics"},
    "precision": {"errors"},
    "models": {"errors", "ckpt", "precision", "recipe", "tiny"},
    "rollout": {"errors", "core"},
    "training": {"errors", "ckpt", "core", "data", "dist", "fsdp", "metrics", "models", "precision"},
    "evaluate": {"errors", "data", "dist", "fsdp", "rewards", "rollout", "training"},
    "rundir": {"errors", "ckpt", "metrics", "models", "recipe"},
    "run": {"errors", "ckpt", "recipe", "rundir"},
    "stage_io": {"errors", "ckpt", "data", "dist", "fsdp", "metrics", "models", "run"},
    "vllm_engine": {"errors", "rollout"},
    "rl": {"errors", "ckpt", "core", "data", "dist", "evaluate", "fsdp", "metrics", "models", "recipe", "rewards", "rollout",
           "stage_io", "training", "vllm_engine"},
    "prompt_report": {"errors", "data", "models", "recipe", "rewards", "run", "tiny"},
    "explain": {"errors", "data", "prompt_report", "recipe"},
    "dry_run": {"errors", "ckpt", "models", "prompt_report", "recipe"},
}


def _package_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for m, targets in GRAPH.items():
        for t in targets:
            if t.startswith("rlft.") and _package(t) != _package(m):
                edges.setdefault(_package(m), set()).add(_package(t))
    return edges


def test_library_packages_import_only_what_their_layer_allows() -> None:
    edges = _package_edges()
    library = {p for p in edges if p not in ("__main__", "cli", "pipeline", "stages")}
    assert library <= set(ALLOWED), f"a new package needs its row in ALLOWED: {sorted(library - set(ALLOWED))}"
    extra = {p: sorted(edges.get(p, set()) - allowed) for p, allowed in ALLOWED.items()}
    assert not {p: e for p, e in extra.items() if e}, extra


def test_allowed_table_has_no_package_cycle() -> None:
    """The table itself is layered: following allowed imports never leads back to the start."""
    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in ALLOWED.get(todo.pop(), set()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert [p for p in ALLOWED if p in reach(p)] == []


def test_the_loss_core_imports_torch_and_the_standard_library_only() -> None:
    third_party = {"numpy", "transformers", "peft", "datasets", "yaml", "pydantic", "rich", "typer"}
    for name, path in MODULES.items():
        if _package(name) != "core":
            continue
        tree = ast.parse(path.read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not roots & third_party, (name, roots)
        assert not any(m for m in GRAPH[name] if m.startswith("rlft.") and _package(m) != "core"), (name, GRAPH[name])


def test_the_package_check_sees_a_planted_upward_import() -> None:
    GRAPH["rlft.core.losses"].add("rlft.models")
    try:
        assert "models" in _package_edges()["core"]
        with pytest.raises(AssertionError):
            test_library_packages_import_only_what_their_layer_allows()
    finally:
        GRAPH["rlft.core.losses"].discard("rlft.models")


def test_every_rlft_import_in_the_benchmarks_resolves() -> None:
    """Benchmarks run by hand, so a moved module would break them silently: every `from rlft...
    import name` in them (inside functions too) must name a module and an attribute that exist."""
    import importlib

    missing = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rlft":
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and f"{node.module}.{a.name}" not in MODULES]
            elif isinstance(node, ast.Import):
                missing += [f"{path.name}: {a.name}" for a in node.names
                            if a.name.startswith("rlft.") and a.name not in MODULES]
    assert missing == []
