"""`--dry-run`: the shipped GPU recipes rehearsed on CPU with local stand-ins, and planted mistakes found.

Every run goes through the installed console script. The stand-in for the Qwen models is a
qwen2-architecture model rlft builds itself (its tokenizer has a chat template with a system
turn); the stand-in for openai/gsm8k is tests/data/gsm8k/{train,test}.jsonl (question / worked
answer ending in `#### n`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from test_cli import assert_one_line_error, rlft

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "tests" / "data" / "gsm8k"
QWEN = ["Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct"]
SYSTEM = "Give only the final number inside <answer> </answer>."


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlft.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("standin") / "qwen")


def stand_in_args(model: Path) -> list[str]:
    return [a for name in QWEN for a in ("--stand-in", f"{name}={model}")] + ["--stand-in", f"openai/gsm8k={GSM8K}"]


@pytest.mark.parametrize(
    "recipe",
    [
        "qwen2.5-0.5b-grpo-gsm8k.yaml",
        pytest.param("qwen2.5-1.5b-r1.yaml", marks=pytest.mark.slow),
        pytest.param("qwen2.5-distill-7b-to-1.5b.yaml", marks=pytest.mark.slow),
        pytest.param("qwen2.5-0.5b-grpo-gsm8k-vllm.yaml", marks=pytest.mark.slow),  # rehearsed on the built-in sampler
    ],
)
def test_shipped_recipe_rehearses_every_stage(tmp_path: Path, standin: Path, recipe: str) -> None:
    raw = yaml.safe_load((ROOT / "recipes" / recipe).read_text())
    start = time.monotonic()
    proc = rlft("run", str(ROOT / "recipes" / recipe), "--dry-run", *stand_in_args(standin), cwd=tmp_path, timeout=180)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 120, elapsed
    assert "every stage ran" in proc.stdout
    run_dir = tmp_path / "runs" / f"{raw['run_name']}-dry-run"
    assert not (tmp_path / "runs" / raw["run_name"]).exists()  # the real run's directory is left alone
    for stage in raw["stages"]:
        assert f"== {stage} (" in proc.stdout
        assert (run_dir / stage / "stage.done.json").is_file()
    # the models were shrunk from the stand-in's config, keeping its vocabulary
    vocab = json.loads((standin / "config.json").read_text())["vocab_size"]
    shrunk = [json.loads(p.read_text()) for p in (run_dir / "models").glob("shrunk-*/config.json")]
    assert shrunk and all(c["num_hidden_layers"] == 2 and c["vocab_size"] == vocab for c in shrunk)
    # the recipe's system prompt is in the rendered prompts, through the model's chat template
    system = raw["stages"][next(iter(raw["stages"]))]["data"].get("system_prompt")
    if system:
        assert f"<|im_start|>system\n{system}" in proc.stdout.replace("\n    | ", "\n")
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    if recipe == "qwen2.5-1.5b-r1.yaml":  # its cold start trains without the system prompt rl and eval use
        assert len(warnings) == 2, warnings
        assert all(f"stage {s} frames its prompts differently from stage cold_start" in w
                   for s, w in zip(("rl", "eval"), warnings, strict=True)), warnings
    else:
        assert warnings == []


# --------------------------------------------------------------------------- planted mistakes


def plant(tmp_path: Path, model: Path, *, train: dict | None = None, evaluate: dict | None = None,
          rows: list[dict] | None = None) -> Path:
    """A GRPO -> eval recipe on GSM8K-shaped rows, with `train`/`evaluate` merged into the stages' data."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    if rows is None:
        shutil.copy(GSM8K / "train.jsonl", data / "train.jsonl")
    else:
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(GSM8K / "test.jsonl", data / "test.jsonl")
    base = {"columns": {"question": "prompt"}, "system_prompt": SYSTEM}
    recipe = {
        "run_name": "plant",
        "model": {"name": str(model)},
        "stages": {
            "rl": {"kind": "grpo", "data": {"source": "data/train.jsonl", **base, **(train or {})},
                   "rewards": ["math_answer"], "steps": 500},
            "eval": {"kind": "eval", "models": ["rl"],
                     "data": {"source": "data/test.jsonl", **base, **(evaluate or {})}, "rewards": ["math_answer"]},
        },
    }
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def warnings_of(proc) -> list[str]:  # noqa: ANN001
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith("warning:")]


def test_planted_eval_prompt_unlike_train_prompt_is_reported(tmp_path: Path, standin: Path) -> None:
    recipe = plant(tmp_path, standin, evaluate={"system_prompt": None})
    warned = warnings_of(rlft("run", str(recipe), "--dry-run", cwd=tmp_path, timeout=120))
    assert len(warned) == 1 and "stage eval frames its prompts differently from stage rl" in warned[0], warned
    assert "Give only the final number" in warned[0]  # the part that differs is shown


def test_planted_wrong_answer_format_is_reported(tmp_path: Path, standin: Path) -> None:
    rows = [{"question": r["question"], "answer": r["answer"].rsplit("####", 1)[0].strip()}
            for r in map(json.loads, (GSM8K / "train.jsonl").read_text().splitlines())]
    proc = rlft("stage", "rl", "--recipe", str(plant(tmp_path, standin, rows=rows)), "--dry-run",
                cwd=tmp_path, timeout=120)
    warned = warnings_of(proc)
    assert any("stage rl:" in w and "gold answers" in w and "####" in w for w in warned), warned
    assert (tmp_path / "runs/plant-dry-run/rl/stage.done.json").is_file()
    assert not (tmp_path / "runs/plant-dry-run/eval").exists()  # `rlft stage rl` ran only rl


def test_planted_missing_column_fails_like_a_real_run(tmp_path: Path, standin: Path) -> None:
    recipe = plant(tmp_path, standin, train={"columns": {"query": "prompt"}})
    proc = rlft("run", str(recipe), "--dry-run", cwd=tmp_path, timeout=120)
    assert_one_line_error(proc)
    assert "train.jsonl:row 1" in proc.stderr and "query" in proc.stderr, proc.stderr


def test_planted_template_without_system_turn_fails_like_a_real_run(tmp_path: Path, standin: Path) -> None:
    from transformers import AutoTokenizer

    model = tmp_path / "no-system"
    shutil.copytree(standin, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.save_pretrained(model)
    line = assert_one_line_error(rlft("run", str(plant(tmp_path, model)), "--dry-run", cwd=tmp_path, timeout=120))
    assert "System role not supported" in line, line


def test_stand_in_needs_dry_run_and_an_existing_path(tmp_path: Path) -> None:
    recipe = str(ROOT / "recipes/qwen2.5-0.5b-grpo-gsm8k.yaml")
    line = assert_one_line_error(rlft("run", recipe, "--stand-in", f"openai/gsm8k={GSM8K}", cwd=tmp_path))
    assert "--stand-in is used with --dry-run only" in line
    line = assert_one_line_error(rlft("run", recipe, "--dry-run", "--stand-in", "openai/gsm8k", cwd=tmp_path))
    assert "expected HUB_NAME=LOCAL_PATH" in line
    line = assert_one_line_error(rlft("run", recipe, "--dry-run", "--stand-in", "x=/nonexistent/dir", cwd=tmp_path))
    assert "/nonexistent/dir does not exist" in line


def test_explain_shows_each_stage_prompt_and_the_planted_mismatch(tmp_path: Path, standin: Path) -> None:
    proc = rlft("explain", str(plant(tmp_path, standin, evaluate={"system_prompt": None})), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    section = proc.stdout.split("# prompts", 1)[1]
    assert "  rl: " in section and f"    | {SYSTEM}<|im_end|>" in section, section
    eval_part = section.split("  eval: ", 1)[1]
    assert SYSTEM not in eval_part.split("warning:", 1)[0]  # the eval prompt really has no system turn
    assert "warning: stage eval frames its prompts differently from stage rl" in section
    assert not (tmp_path / "runs").exists()  # explain writes nothing
