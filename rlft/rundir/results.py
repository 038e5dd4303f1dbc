"""The table `rlft run` ends with: stage, model, metric, value (also saved in the run dir)."""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from rlft.metrics import console, fmt


def run_rows(loaded: Any, artifacts: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(stage, model, metric, value) rows; an eval stage gives one block per model it scored."""
    rows = []
    for name in loaded.recipe.stages:
        artifact = artifacts.get(name)
        if artifact is None:
            continue
        per_model = artifact.metrics if artifact.kind == "eval" else {name: artifact.metrics}
        for model, values in per_model.items():
            rows += [(name, model, key, value) for key, value in with_intervals(values)]
    return rows


def with_intervals(values: dict[str, Any]) -> list[tuple[str, str]]:
    """Metric rows with their 95% intervals folded in: `0.42 [0.36, 0.48]`, `0.40 ± 0.03`."""
    out = []
    for key, value in sorted(values.items()):
        if key.endswith(("_ci", "_ci_low", "_ci_high")):
            continue
        text = fmt(value)
        if f"{key}_ci_low" in values:
            text += f" [{fmt(values[key + '_ci_low'])}, {fmt(values[key + '_ci_high'])}]"
        elif f"{key}_ci" in values:
            text += f" ± {fmt(values[key + '_ci'])}"
        out.append((key, text))
    return out


def print_run_table(loaded: Any, artifacts: dict[str, Any]) -> None:
    """Print the per-stage table and save it as results.json / results.md in the run dir."""
    rows = run_rows(loaded, artifacts)
    table = Table(title=f"run {loaded.recipe.run_name}")
    for col in ("stage", "model", "metric", "value"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    run_dir = loaded.run_dir
    (run_dir / "results.json").write_text(json.dumps([dict(zip(("stage", "model", "metric", "value"), r, strict=True)) for r in rows], indent=1))
    md = ["| stage | model | metric | value |", "|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]
    (run_dir / "results.md").write_text("\n".join(md) + "\n")
