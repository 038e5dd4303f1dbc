"""`rlft explain --run runs/NAME`: what fed what in a run, read from its `stage.done.json` markers.

Per stage: its inputs (parent stages and their fingerprints, data sets with row counts), its
outputs and metrics, its gate, wall time and the library versions it ran with. Stages are listed
in the order of the run's `recipe.yaml` (the latest invocation's), whose gates judge the recorded
metrics; markers written before rlft recorded lineage show their outputs and metrics only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rlft.errors import UserInputError
from rlft.metrics import fmt
from rlft.recipe import gates
from rlft.recipe.schema import GateSpec
from rlft.rundir.results import with_intervals

SHORT = 12  # hex digits of a fingerprint shown; enough to tell artifacts apart by eye


def explain_run(run_dir: Path) -> str:
    """Human-readable lineage of the run in `run_dir`.

    Raises:
        UserInputError: `run_dir` is not a run directory (no recipe.yaml and no stage markers).
    """
    order, kinds, gate_specs = _stage_order(run_dir)
    markers = {stage: _read_marker(run_dir / stage / "stage.done.json") for stage in order}
    models = [m["lineage"]["model"] for m in markers.values() if m and (m.get("lineage") or {}).get("model")]
    lines = [f"# run {run_dir}  (stage.done.json of each finished stage; order from recipe.yaml)"]
    if models:
        lines.append(f"base model {_model(models[0])}")
    for stage in order:
        marker = markers[stage]
        if marker is not None and stage in gate_specs:  # judged by the latest invocation's gate
            metrics = (marker.get("artifact") or {}).get("metrics") or {}
            marker = marker | {"gate": gates.evaluate(kinds[stage], gate_specs[stage], metrics)}
        lines += render_stage(stage, kinds.get(stage, "?"), marker, run_dir, models[0] if models else None)
    return "\n".join(lines)


def _stage_order(run_dir: Path) -> tuple[list[str], dict[str, str], dict[str, GateSpec]]:
    """Stage names in run order, their kinds and gates: from recipe.yaml, else from the markers found."""
    try:
        raw = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        stages = raw["stages"] if isinstance(raw, dict) and isinstance(raw.get("stages"), dict) else {}
    except (OSError, yaml.YAMLError):
        stages = {}
    kinds = {name: str(s.get("kind", "?")) for name, s in stages.items() if isinstance(s, dict)}
    gate_specs = {}
    for name, spec in stages.items():
        try:  # the file was validated when it was written; a hand edit just falls back to the marker
            gate_specs[name] = GateSpec.model_validate(spec["gate"])
        except (TypeError, KeyError, ValidationError):
            continue
    found = sorted(p.parent.name for p in run_dir.glob("*/stage.done.json")) if run_dir.is_dir() else []
    order = list(kinds) + [s for s in found if s not in kinds]
    if not order:
        raise UserInputError(f"{run_dir}: not a run directory (no recipe.yaml and no <stage>/stage.done.json)")
    return order, kinds, gate_specs


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def render_stage(
    stage: str, kind: str, marker: dict[str, Any] | None, run_dir: Path, base: dict[str, Any] | None
) -> list[str]:
    """The lines of one stage: header, inputs, outputs, metrics, gate, environment.

    The base model is shown only when it differs from the run's (`base`, shown once on top).
    """
    if marker is None:
        return [f"\n{stage:<14} {kind:<8} not finished"]
    lin = marker.get("lineage") or {}
    head = f"\n{stage:<14} {marker.get('kind', kind):<8} finished"
    if lin:
        head += f" {lin['finished']}  wall {lin['wall_s']:.1f} s"
        head += f" (resumed at step {lin['resumed_from_step']})" if lin.get("resumed_from_step") else ""
    lines = [head]
    if not lin:
        lines.append("  (no lineage recorded: the stage finished before rlft recorded it)")
    lines += _inputs(lin, base)
    lines += _outputs(marker, run_dir / stage / "final")
    if marker.get("gate"):
        lines.append("  gate     " + gate_text(marker["gate"]))
    if lin:
        lines.append("  env      " + _env(lin))
    return lines


def _inputs(lin: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    lines = []
    model = lin.get("model")
    if model and model != base:
        lines.append("  model    " + _model(model))
    if lin.get("student"):
        lines.append("  student  " + _model(lin["student"]))
    for p in lin.get("parents", []):
        path = p.get("model") or p.get("data") or ""
        lines.append(f"  parent   {p['stage']} ({', '.join(p['roles'])}): {path}  fp {p['fingerprint'][:SHORT]}")
    for d in lin.get("data", []):
        shown = d["source"] if d["source"] == d["resolved"] else f"{d['source']} ({d['resolved']})"
        lines.append(f"  {d['role']:<8} {shown}: {d['train_rows']} train / {d['held_out_rows']} held-out rows"
                     f"  fp {d['fingerprint'][:SHORT]}")
    return lines


def _model(m: dict[str, Any]) -> str:
    text = m["name"] + (f"@{m['revision']}" if m.get("revision") else "")
    text += f" (commit {m['commit']})" if m.get("commit") else ""
    if m.get("source") and m["source"] != m["name"]:
        text += f" -> {m['source']}"
    return text + (f"  fp {m['fingerprint'][:SHORT]}" if m.get("fingerprint") else "")


def _outputs(marker: dict[str, Any], final: Path) -> list[str]:
    art = marker.get("artifact") or {}
    n = len(marker.get("outputs") or {})
    lines = [f"  output   {art.get('model') or art.get('data') or final} ({n} file{'s' * (n != 1)} in {final.name}/)"]
    metrics = art.get("metrics") or {}
    if marker.get("kind") == "eval":
        lines += [f"  metrics  {model}: {_metric_text(values)}" for model, values in metrics.items()]
    elif metrics:
        lines.append(f"  metrics  {_metric_text(metrics)}")
    return lines


def _metric_text(values: dict[str, Any]) -> str:
    """`key first -> last` for a stage's summary pairs, `key value [low, high]` otherwise."""
    parts = []
    for key, text in with_intervals(values):
        if key.endswith("_first"):
            continue
        if key.endswith("_last"):
            name = key.removesuffix("_last")
            parts.append(f"{name} {fmt(values.get(name + '_first'))} -> {text}")
        else:
            parts.append(f"{key} {text}")
    return ", ".join(parts)


def gate_text(gate: dict[str, Any]) -> str:
    """`eval/accuracy >= 0.5: passed (0.62)`, or the values that failed it."""
    bounds = [f"{op} {fmt(gate[key])}" for key, op in (("min", ">="), ("max", "<=")) if gate.get(key) is not None]
    values = ", ".join(f"{k} {fmt(v)}" for k, v in gate.get("values", {}).items())
    return f"{gate['metric']} {' and '.join(bounds)}: {'passed' if gate.get('passed') else 'FAILED'} ({values})"


def _env(lin: dict[str, Any]) -> str:
    v = lin.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers", "peft", "rlft") if k in v)
    threads = lin.get("threads")
    return f"{libs}; {threads} thread{'s' * (threads != 1)} on {lin.get('device')}; started {lin.get('started')}"
