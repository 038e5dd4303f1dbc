"""Gates: a stage's final metric below its `gate:` bound stops the pipeline with exit 4 naming
the stage, metric, value and bound; later stages do not run, the stage's outputs stay, a rerun
fails the same way without training again, and the gate is not one of the stage's inputs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from helpers import done_marker, rlft, write_recipe

from rlft.errors import RecipeError
from rlft.recipe.load import load_recipe

ARITH = {"source": "tiny:arith", "num_examples": 48, "eval_size": 8, "max_length": 128}
SFT = {"kind": "sft", "data": ARITH, "batch_size": 8, "eval_samples": 8, "eval_max_new_tokens": 8}


def gated_recipe(output_dir: Path, eval_gate: dict[str, Any], cold_gate: dict[str, Any]) -> dict[str, Any]:
    """cold (3 SFT steps: greedy accuracy 0) -> ev (eval of cold) -> after (1 more SFT step)."""
    return {
        "run_name": "g", "output_dir": str(output_dir), "model": {"name": "tiny:nano"}, "lora": {"r": 4, "alpha": 8},
        "stages": {
            "cold": SFT | {"max_steps": 3, "gate": cold_gate},
            "ev": {"kind": "eval", "models": ["cold"], "data": ARITH, "k": 2, "num_prompts": 8,
                   "rewards": ["task_verifier"], "sampling": {"max_new_tokens": 8}, "gate": eval_gate},
            "after": SFT | {"from": "cold", "max_steps": 1},
        },
    }


def test_a_failed_eval_gate_stops_the_pipeline_and_a_rerun_fails_the_same_way(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", gated_recipe(
        tmp_path, {"metric": "greedy", "min": 0.5, "models": ["cold"]}, {"metric": "eval/loss", "max": 100.0}))
    run = tmp_path / "g"
    proc = rlft("run", str(recipe))
    assert proc.returncode == 4, proc.stderr
    expected = "error: stage ev: gate failed: greedy of cold = 0 < min 0.5; not run: after."
    assert expected in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr, proc.stderr
    assert not (run / "after").exists()
    cold, ev = done_marker(run / "cold"), done_marker(run / "ev")
    assert cold["gate"]["passed"] and 0 < cold["gate"]["values"]["last eval"] < 100  # the passing gate
    assert ev["gate"] == {"metric": "greedy", "min": 0.5, "max": None, "values": {"cold": 0.0}, "passed": False}
    assert (run / "ev/final/eval.json").exists()  # outputs committed before the gate was checked

    before = {s: (run / s / "stage.done.json").stat().st_mtime_ns for s in ("cold", "ev")}
    for args in (["run", str(recipe)], ["stage", "after", "--recipe", str(recipe)]):
        t0 = time.monotonic()
        again = rlft(*args)
        assert again.returncode == 4 and "stage ev: gate failed: greedy of cold = 0 < min 0.5" in again.stderr
        assert time.monotonic() - t0 < 30 and not (run / "after").exists()
    assert {s: (run / s / "stage.done.json").stat().st_mtime_ns for s in ("cold", "ev")} == before  # no retraining

    explained = rlft("explain", "--run", str(run))
    assert "gate     greedy >= 0.5: FAILED (cold 0)" in explained.stdout, explained.stdout
    assert "gate     eval/loss <= 100: passed (last eval " in explained.stdout

    lowered = rlft("run", str(recipe), "--set", "stages.ev.gate.min=0.0")  # the gate is not an input
    assert lowered.returncode == 0, lowered.stderr
    assert {s: (run / s / "stage.done.json").stat().st_mtime_ns for s in ("cold", "ev")} == before
    assert (run / "after/stage.done.json").exists()
    assert "gate     greedy >= 0: passed (cold 0)" in rlft("explain", "--run", str(run)).stdout


def test_a_failed_training_gate_names_the_last_held_out_value(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", gated_recipe(
        tmp_path, {"metric": "greedy", "min": 0.0}, {"metric": "eval/loss", "max": 0.01}))
    proc = rlft("run", str(recipe))
    assert proc.returncode == 4, proc.stderr
    err = " ".join(proc.stderr.split())
    value = done_marker(tmp_path / "g" / "cold")["artifact"]["metrics"]["eval/loss_last"]
    assert f"stage cold: gate failed: eval/loss = {value:.4g} > max 0.01; not run: ev, after." in err, err
    assert not (tmp_path / "g" / "ev").exists()


GATED = """\
model: {{name: "tiny:nano"}}
stages:
  cold:
    kind: sft
    data: "tiny:arith"
    gate: {cold}
  ev:
    kind: eval
    k: 2
    models: [cold]
    data: "tiny:arith"
    gate:
      {ev}
  after: {{kind: sft, from: cold, data: "tiny:arith"}}
"""
BAD = [  # (id, cold's gate, ev's gate lines, line, key, message)
    ("metric-typo", "{metric: eval/acuracy, min: 0.1}", "metric: greedy\n      min: 0.5", 6, "stages.cold.gate.metric",
     "unknown metric 'eval/acuracy' for stage cold (kind: sft) (did you mean 'eval/accuracy'?)"),
    ("eval-k", "{metric: eval/loss, max: 9}", "min: 0.1\n      metric: pass@4", 14, "stages.ev.gate.metric",
     "unknown metric 'pass@4' for stage ev (kind: eval) (did you mean 'pass@2'?); metrics: greedy, greedy_ci_low, "
     "greedy_ci_high, avg@2, pass@2"),
    ("models-not-scored", "null", "metric: greedy\n      min: 0.1\n      models: [colt]", 15,
     "stages.ev.gate.models.0", "'colt' is not scored by stage ev (did you mean 'cold'?); it scores: cold"),
    ("models-on-training", "{metric: eval/loss, max: 1, models: [cold]}", "metric: greedy\n      min: 0.5", 6,
     "stages.cold.gate.models", "only an eval stage scores several models"),
    ("no-bound", "null", "metric: greedy", 12, "stages.ev.gate", "needs min or max"),
    ("min-above-max", "null", "metric: greedy\n      min: 0.9\n      max: 0.1", 14, "stages.ev.gate.min",
     "stages.ev.gate.min: must be <= max 0.1, got 0.9: no value could pass"),
    ("key-typo", "null", "metirc: greedy\n      min: 0.5", 13, "stages.ev.gate.metirc",
     "unknown key (did you mean 'metric'?)"),
]


@pytest.mark.parametrize(("cold", "ev", "line", "key", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_gates_are_reported_at_their_line(tmp_path: Path, cold: str, ev: str, line: int, key: str,
                                              message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(GATED.format(cold=cold, ev=ev))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert [(p.line, p.path) for p in info.value.problems] == [(line, key)], str(info.value)
    assert message in str(info.value)


def test_validate_through_the_console_script(tmp_path: Path) -> None:
    recipe = gated_recipe(tmp_path, {"metric": "greedy", "min": 0.5}, {"metric": "eval/acuracy", "min": 0.1})
    proc = rlft("validate", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "stages.cold.gate.metric: unknown metric 'eval/acuracy'" in proc.stderr
    assert "(did you mean 'eval/accuracy'?)" in proc.stderr and f"{tmp_path / 'r.yaml'}:" in proc.stderr


def test_explain_shows_gates_and_the_gate_is_not_a_stage_input(tmp_path: Path) -> None:
    from rlft.run import Artifact, RunContext, stage_inputs_hash

    with_gate = gated_recipe(tmp_path, {"metric": "greedy", "min": 0.5, "models": ["cold"]},
                             {"metric": "eval/loss", "max": 9.0})
    proc = rlft("explain", str(write_recipe(tmp_path / "a.yaml", with_gate)))
    assert proc.returncode == 0, proc.stderr
    assert "gate=eval/loss<=9" in proc.stdout and "gate=greedy>=0.5@cold" in proc.stdout
    without = gated_recipe(tmp_path, {}, {})
    for spec in without["stages"].values():
        spec.pop("gate", None)
    a, b = load_recipe(tmp_path / "a.yaml"), load_recipe(write_recipe(tmp_path / "b.yaml", without))
    for stage in ("cold", "ev"):
        assert stage_inputs_hash(a, stage, {}) == stage_inputs_hash(b, stage, {})
    cold = {"base": Artifact("base", "base", fingerprint="f")}
    meta = RunContext(a, tmp_path, "cold", cold).input_meta({})
    assert meta == RunContext(b, tmp_path, "cold", cold).input_meta({})
