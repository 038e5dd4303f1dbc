"""The sample stage's output with `mix:` data: one schema for sampled and mixed rows, which a
retrain reads; and keeping nothing is a failed stage (exit 4), with or without `mix:`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import write_recipe

from rlft.data.files import read_local

RLFT = str(Path(sys.executable).with_name("rlft"))
SYSTEM = "Be brief."


def _recipe(out: Path) -> dict[str, Any]:
    prompts = [{"prompt": f"{i}+{i}=?", "answer": str(2 * i), "id": i} for i in range(12)]
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    extra = [{"prompt": f"say {w}", "completion": w, "answer": w, "note": "mixed"} for w in ("yes", "no", "ok", "hi")]
    (out / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extra))
    short = {"temperature": 1.0, "max_new_tokens": 6}
    return {
        "run_name": "m", "output_dir": str(out), "model": {"name": "tiny:nano"}, "lora": {"r": 4, "alpha": 8},
        "stages": {
            "sft": {"kind": "sft", "data": {"source": "tiny:arith", "num_examples": 32}, "max_steps": 2,
                    "batch_size": 8, "eval_samples": 2, "eval_max_new_tokens": 4},
            "sample": {"kind": "sample", "from": "sft", "data": {"source": "prompts.jsonl", "eval_size": 0},
                       "rewards": ["math_answer"], "keep": "all", "per_prompt": 2, "max_per_prompt": 2,
                       "sampling": short,
                       "mix": [{"source": "extra.jsonl", "eval_size": 0, "system_prompt": SYSTEM, "weight": 0.5}]},
            "retrain": {"kind": "sft", "data": {"source": "sample", "eval_size": 2}, "max_steps": 2,
                        "batch_size": 4, "eval_samples": 2, "eval_max_new_tokens": 4},
        },
    }


def _run(recipe: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RLFT, "run", str(recipe), *args], capture_output=True, text=True, timeout=600)


def test_sampled_and_mixed_rows_share_one_schema_and_the_retrain_runs(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path))
    proc = _run(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "m/sample/final/data.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(read_local(out)) == len(rows)  # one schema: the reader's consistency check passes
    assert {frozenset(r) for r in rows} == {frozenset({"messages", "prompt_id", "sample_id", "answer", "id", "note"})}
    sampled = [r for r in rows if r["prompt_id"] is not None]
    mixed = [r for r in rows if r["prompt_id"] is None]
    # 24 sampled + 4 mix rows = 28 output rows; weights 1 : 0.5 make the shares 2/3 and 1/3 (data.mix)
    assert (len(sampled), len(mixed)) == (19, 9)
    assert all(r["sample_id"] is None and r["id"] is None and r["note"] == "mixed" for r in mixed)
    assert all(r["messages"][0] == {"role": "system", "content": SYSTEM} for r in mixed)
    assert all(r["note"] is None and r["messages"][0]["role"] == "user" for r in sampled)
    assert (tmp_path / "m/retrain/stage.done.json").exists()
    stats = json.loads((tmp_path / "m/sample/final/stats.json").read_text())
    assert (stats["rows_sampled"], stats["rows_total"]) == (24, 28)


def test_keeping_nothing_stops_the_stage_with_exit_4(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path))
    proc = _run(recipe, "--set", "stages.sample.keep=correct", "--set", "stages.sample.threshold=100")
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "stage sample: kept no completion of 12 prompts x 2 samples" in proc.stderr
    assert "lower `threshold`" in proc.stderr and "--restart" in proc.stderr
    assert not (tmp_path / "m/sample/final").exists() and not (tmp_path / "m/retrain").exists()


def test_mix_data_is_checked_before_sampling(tmp_path: Path) -> None:
    """A mix column whose JSON type differs from the prompt data's, and mix rows that cannot become
    chat rows, are data errors (exit 2) raised before any completion is sampled."""
    recipe = _recipe(tmp_path)
    sample = recipe["stages"]["sample"] | {"from": "base"}
    (tmp_path / "typed.jsonl").write_text('{"prompt": "p", "completion": "c", "answer": 4}\n' * 3)
    sample["mix"] = [{"source": "typed.jsonl", "eval_size": 0}]
    path = write_recipe(tmp_path / "r.yaml", recipe | {"stages": {"sample": sample}})
    proc = _run(path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (f"{tmp_path / 'typed.jsonl'}:row 1  column 'answer': is a number here but a string in "
            f"{tmp_path / 'prompts.jsonl'} row 1") in proc.stderr
    assert not (tmp_path / "m/sample/shards").exists()

    (tmp_path / "text.jsonl").write_text('{"text": "t"}\n' * 3)
    sample["mix"] = [{"source": "text.jsonl", "eval_size": 0}]
    proc = subprocess.run([RLFT, "validate", str(write_recipe(path, recipe | {"stages": {"sample": sample}}))],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and f"{tmp_path / 'text.jsonl'}:row 1: sample.mix rows become chat rows" in proc.stderr
