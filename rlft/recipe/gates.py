"""Gates: a stage's final metric must meet the recipe's bound for later stages to run.

    gate: {metric: greedy, min: 0.5, models: [rl]}     # an eval stage
    gate: {metric: eval/accuracy, min: 0.3}            # a training stage's last held-out eval

The gate is checked after the stage has finished and its outputs are committed (its
`stage.done.json` records the verdict), and again whenever `rlft run` skips the finished stage,
so a rerun fails the same way in seconds without training again; lowering the bound lets the
run go on without retraining (the gate is not one of the stage's inputs). A metric the stage did
not report (eval/accuracy without an `answer` column) fails the gate. Checking metric names
against the stage kind happens when the recipe loads (`gate_problems`, no torch import).
"""

from __future__ import annotations

from typing import Any

from rlft.errors import Problem, TrainingError
from rlft.recipe.problems import Locator, did_you_mean
from rlft.recipe.schema import EvalSpec, GateSpec

# a training stage's gate reads the last held-out eval: `<metric>_last` of the stage's summary
TRAINING_METRICS = {"sft": ("eval/accuracy", "eval/loss"), "distill": ("eval/accuracy", "eval/loss"),
                    "grpo": ("eval/accuracy",), "ppo": ("eval/accuracy",)}
MODEL_KINDS = ("sft", "grpo", "ppo", "distill")


class GateError(TrainingError):
    """A stage's metric is outside its gate: later stages do not run (exit 4)."""


def gate_metrics(kind: str, k: int = 4, greedy: bool = True) -> list[str]:
    """Metric names a gate may check on a stage of `kind` (an eval stage's depend on k and greedy)."""
    if kind == "eval":
        return ["greedy", "greedy_ci_low", "greedy_ci_high"] * greedy + [f"avg@{k}", f"pass@{k}"]
    return list(TRAINING_METRICS.get(kind, ()))


def gate_problems(raw: dict[str, Any], loc: Locator) -> list[Problem]:
    """Unknown gate metrics (with did-you-mean) and gate `models` the eval stage does not score."""
    stages = raw.get("stages")
    if not isinstance(stages, dict):
        return []
    problems = []
    for name, spec in stages.items():
        gate = spec.get("gate") if isinstance(spec, dict) else None
        if not isinstance(gate, dict) or spec.get("kind") not in (*TRAINING_METRICS, "eval"):
            continue
        path = ("stages", name, "gate")
        metric = gate.get("metric")
        k = spec.get("k", EvalSpec.model_fields["k"].default)
        allowed = gate_metrics(spec["kind"], k if isinstance(k, int) else 4, spec.get("greedy", True) is not False)
        if isinstance(metric, str) and metric not in allowed:
            problems.append(loc.at(path + ("metric",), f"unknown metric '{metric}' for stage {name} (kind: {spec['kind']})"
                                   f"{did_you_mean(metric, allowed)}; metrics: {', '.join(allowed)}"))
        problems += _model_problems(name, spec, gate.get("models"), list(stages), stages, loc)
    return problems


def _model_problems(
    name: str, spec: dict[str, Any], models: Any, order: list[str], stages: dict[str, Any], loc: Locator
) -> list[Problem]:
    """Each gate `models` entry is a stage the eval stage scores."""
    if not isinstance(models, list) or not models:
        return []
    path = ("stages", name, "gate", "models")
    if spec["kind"] != "eval":
        return [loc.at(path, "only an eval stage scores several models; drop `models:` from this gate")]
    scored = spec.get("models")
    if not isinstance(scored, list) or not scored:  # default: every earlier model stage
        earlier = order[: order.index(name)]
        scored = [s for s in earlier if isinstance(stages[s], dict) and stages[s].get("kind") in MODEL_KINDS]
    return [
        loc.at(path + (i,), f"'{m}' is not scored by stage {name}{did_you_mean(m, scored)}; it scores: "
               f"{', '.join(map(str, scored)) or 'nothing'}")
        for i, m in enumerate(models) if m not in scored
    ]


def describe(gate: Any) -> str:
    """`greedy>=0.5` or `eval/loss<=1.2` (with `@rl,retrain` when it names models), for `rlft explain`."""
    bounds = ([] if gate.min is None else [f">={gate.min:g}"]) + ([] if gate.max is None else [f"<={gate.max:g}"])
    return gate.metric + ",".join(bounds) + (f"@{','.join(gate.models)}" if gate.models else "")


def evaluate(kind: str, gate: GateSpec | None, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The verdict of a stage's `gate` on its final metrics, or None when it has no gate.

    Returns {metric, min, max, values: {scored stage, or "last eval": value or None}, passed};
    a value that was not reported (None) fails.
    """
    if gate is None:
        return None
    if kind == "eval":
        values = {m: metrics.get(m, {}).get(gate.metric) for m in (gate.models or list(metrics))}
    else:
        values = {"last eval": metrics.get(f"{gate.metric}_last")}
    passed = all(_within(v, gate.min, gate.max) for v in values.values())
    return {"metric": gate.metric, "min": gate.min, "max": gate.max, "values": values, "passed": passed}


def _within(value: Any, low: float | None, high: float | None) -> bool:
    if not isinstance(value, int | float) or value != value:  # None or NaN: not reported
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def enforce(stage: str, verdict: dict[str, Any] | None, later: list[str]) -> None:
    """Raise GateError naming the stage, metric, values and bound when `verdict` failed."""
    if verdict is None or verdict["passed"]:
        return
    from rlft.metrics import fmt

    low, high = verdict["min"], verdict["max"]
    failed = []
    for who, value in verdict["values"].items():
        if _within(value, low, high):
            continue
        of = f" of {who}" if who != "last eval" else ""
        if not isinstance(value, int | float):
            failed.append(f"{verdict['metric']}{of} was not reported")
        else:
            bound = f"< min {fmt(low)}" if low is not None and value < low else f"> max {fmt(high)}"
            failed.append(f"{verdict['metric']}{of} = {fmt(value)} {bound}")
    not_run = f"; not run: {', '.join(later)}" if later else ""
    raise GateError(
        f"stage {stage}: gate failed: {'; '.join(failed)}{not_run}. The stage's outputs are kept; "
        f"change stages.{stage}.gate or the stage and run again"
    )
