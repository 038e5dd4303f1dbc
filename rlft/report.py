"""The table `rlft run` ends with: stage, model, metric, value (also saved in the run dir)."""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from rlft.metrics import console, fmt


def run_rows(loaded: Any, artifacts: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    for name in loaded.recipe.stages:
        artifact = artifacts.get(name)
        if artifact is None:
            continue
        for key, value in sorted(artifact.metrics.items()):
            rows.append((name, artifact.kind, key, fmt(value)))
    return rows


def print_run_table(loaded: Any, artifacts: dict[str, Any]) -> None:
    """Print the per-stage table and save it as results.json / results.md in the run dir."""
    from rlft.pipeline import run_dir_of

    rows = run_rows(loaded, artifacts)
    table = Table(title=f"run {loaded.recipe.run_name}")
    for col in ("stage", "kind", "metric", "value"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    run_dir = run_dir_of(loaded)
    (run_dir / "results.json").write_text(json.dumps([dict(zip(("stage", "kind", "metric", "value"), r, strict=True)) for r in rows], indent=1))
    md = ["| stage | kind | metric | value |", "|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]
    (run_dir / "results.md").write_text("\n".join(md) + "\n")
