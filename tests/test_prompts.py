"""One prompt for every stage: a data set's system prompt and max_length reach SFT (train and
held-out), GRPO rollouts and held-out accuracy, rejection sampling (and its output rows, so a
retrain sees the same prompt), distillation and eval; held-out rows follow long_rows like
training rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import write_recipe

from rlft import pipeline, rollout, run, tiny
from rlft.cli import main
from rlft.data import encode
from rlft.data.batch import SFTExample
from rlft.errors import DataError
from rlft.stage_io import prepare_sft_data

SYSTEM = "Answer in <answer></answer>."
RLFT = str(Path(sys.executable).with_name("rlft"))


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"What is {i} plus {i + 3}?", "completion": f"<answer>{2 * i + 3}</answer>",
             "answer": str(2 * i + 3)} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _every_stage(out: Path) -> dict[str, Any]:
    """sft -> grpo -> sample -> retrain on the sample, distill (sequence), eval: all on one file
    whose data spec sets a system prompt (the retrain reads the sample's output rows)."""
    d = {"source": "qa.jsonl", "system_prompt": SYSTEM, "eval_size": 4, "max_length": 96}
    short = {"temperature": 1.0, "max_new_tokens": 6}
    train = {"max_steps": 2, "batch_size": 4, "eval_samples": 4, "eval_max_new_tokens": 4}
    return {
        "run_name": "p", "output_dir": str(out), "model": {"name": "tiny:nano"}, "lora": {"r": 4, "alpha": 8},
        "stages": {
            "sft": {"kind": "sft", "data": d} | train,
            "rl": {"kind": "grpo", "from": "sft", "data": d, "rewards": ["math_answer"], "steps": 1,
                   "prompts_per_step": 2, "group_size": 2, "micro_batch_size": 4, "sampling": short,
                   "eval_samples": 4},
            "sample": {"kind": "sample", "from": "rl", "data": d, "rewards": ["math_answer"], "per_prompt": 1,
                       "keep": "all", "sampling": short},
            "retrain": {"kind": "sft", "data": {"source": "sample", "eval_size": 2, "max_length": 96}} | train,
            "distill": {"kind": "distill", "teacher": "sft", "student": {"name": "tiny:student"}, "lora": "full",
                        "mode": "sequence", "data": d, "sampling": short} | train,
            "eval": {"kind": "eval", "models": ["rl"], "data": d, "k": 1, "num_prompts": 3, "sampling": short},
        },
    }


def _record(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[int]]]:
    """Prompt ids each stage generates from or trains on (the ids before the first target token)."""
    seen: dict[str, list[list[int]]] = {}
    current = [""]
    runner, generate, tokenize = pipeline.stage_runner, rollout.generate, encode.tokenize_sft

    def stage_runner(kind: str) -> Any:
        run = runner(kind)

        def wrapped(ctx: Any) -> Any:
            current[0] = ctx.stage
            return run(ctx)

        return wrapped

    def recording_generate(policy: Any, tokenizer: Any, prompt_ids: list[list[int]], *a: Any, **k: Any) -> Any:
        seen.setdefault(current[0], []).extend(list(p) for p in prompt_ids)
        return generate(policy, tokenizer, prompt_ids, *a, **k)

    def recording_tokenize(*a: Any, **k: Any) -> list[SFTExample]:
        examples = tokenize(*a, **k)
        seen.setdefault(current[0], []).extend(ex.input_ids[: ex.loss_mask.index(1)] for ex in examples)
        return examples

    monkeypatch.setattr(pipeline, "stage_runner", stage_runner)
    monkeypatch.setattr(rollout, "generate", recording_generate)
    monkeypatch.setattr(encode, "tokenize_sft", recording_tokenize)
    return seen


def test_every_stage_renders_the_same_prompt_with_the_system_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _rows(24)
    _write_jsonl(tmp_path / "qa.jsonl", rows)
    seen = _record(monkeypatch)
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", _every_stage(tmp_path)))]) == 0

    tok = tiny.build_tokenizer()
    expected = {}
    for row in rows:  # rendered here from the chat template itself, not through rlft.data.encode
        chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["prompt"]}]
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        expected[tuple(tok(text, add_special_tokens=False)["input_ids"])] = row["prompt"]
    assert set(seen) == {"sft", "rl", "sample", "retrain", "distill", "eval"}
    for stage, prompts in seen.items():
        strangers = [tok.decode(p) for p in prompts if tuple(p) not in expected]
        assert not strangers, (stage, strangers[:2])
    # the same held-out row is scored by every stage that scores one, with identical ids
    assert set(map(tuple, seen["sft"])) & set(map(tuple, seen["rl"])) & set(map(tuple, seen["eval"]))

    sampled = [json.loads(line) for line in (tmp_path / "p/sample/final/data.jsonl").read_text().splitlines()]
    assert sampled and all(r["messages"][0] == {"role": "system", "content": SYSTEM} for r in sampled)
    assert all(r["messages"][1]["role"] == "user" and r["messages"][2]["role"] == "assistant" for r in sampled)


# --------------------------------------------------------------------------- max_length for prompts


def _ctx(tmp_path: Path, stage: dict[str, Any]) -> Any:
    from rlft.recipe.load import load_recipe

    recipe = {"model": {"name": "tiny:nano"}, "output_dir": str(tmp_path / "runs"), "stages": {"s": stage}}
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    return run.RunContext(loaded, tmp_path / "runs" / "run", "s", {})


def test_rl_prompts_follow_max_length_and_long_rows(tmp_path: Path) -> None:
    from rlft.rl import rounds
    rows = _rows(12)
    rows[6]["prompt"] = "x" * 200  # row 7: a prompt of 200+ tokens
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    tok = tiny.build_tokenizer()
    grpo = {"kind": "grpo", "rewards": ["math_answer"], "prompts_per_step": 2, "group_size": 2}
    with pytest.raises(DataError) as err:
        rounds.prompt_data(_ctx(tmp_path, grpo | {"data": {"source": "qa.jsonl", "max_length": 64, "eval_size": 0}}), tok)
    assert str(err.value).startswith(f"{path}:row 7: the prompt is ") and "longer than max_length 64" in str(err.value)
    loader, _, _ = rounds.prompt_data(
        _ctx(tmp_path, grpo | {"data": {"source": "qa.jsonl", "max_length": 64, "long_rows": "drop", "eval_size": 0}}),
        tok)
    assert len(loader.examples) == 11 and all(len(p.prompt_ids) <= 64 for p in loader.examples)


@pytest.mark.parametrize("kind", ["grpo", "ppo", "sample", "eval"])
def test_generating_stages_refuse_to_truncate_prompts(tmp_path: Path, kind: str) -> None:
    _write_jsonl(tmp_path / "qa.jsonl", _rows(4))
    stage = {"kind": kind, "data": {"source": "qa.jsonl", "long_rows": "truncate"}, "rewards": ["math_answer"]}
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"name": "tiny:nano"}, "stages": {"s": stage}})
    proc = subprocess.run([RLFT, "validate", str(recipe)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{recipe}:8:7  stages.s.data.long_rows: a {kind} stage generates" in proc.stderr
    assert "a prompt is never cut" in proc.stderr


# --------------------------------------------------------------------------- held-out rows


def _sft_ctx(tmp_path: Path, long_rows: str) -> Any:
    rows = _rows(20)
    rows[17]["completion"] = "y" * 300
    _write_jsonl(tmp_path / "qa.jsonl", rows[:17])
    _write_jsonl(tmp_path / "dev.jsonl", rows[17:])  # held-out row 1 is too long
    d = {"source": "qa.jsonl", "eval_split": "dev.jsonl", "max_length": 64, "long_rows": long_rows}
    return _ctx(tmp_path, {"kind": "sft", "data": d, "eval_samples": 8})


def test_a_long_heldout_row_follows_long_rows(tmp_path: Path) -> None:
    tok = tiny.build_tokenizer()
    ctx = _sft_ctx(tmp_path, "drop")
    train, eval_ex, eval_prompts, _ = prepare_sft_data(ctx, ctx.spec.data, tok)
    assert len(train) == 17 and len(eval_ex) == 2  # the long held-out row is dropped, the run goes on
    assert len(eval_prompts) == 3  # its prompt is short: accuracy still scores it

    cut = _sft_ctx(tmp_path, "truncate")
    assert [len(e.input_ids) for e in prepare_sft_data(cut, cut.spec.data, tok)[1]][0] == 64

    ctx = _sft_ctx(tmp_path, "error")
    with pytest.raises(DataError) as err:
        prepare_sft_data(ctx, ctx.spec.data, tok)
    assert str(err.value).startswith(f"{tmp_path / 'dev.jsonl'}:row 1: is ") and "max_length 64" in str(err.value)


def test_every_heldout_row_dropped_leaves_no_heldout_loss_but_trains(tmp_path: Path) -> None:
    tok = tiny.build_tokenizer()
    rows = [{"prompt": "p", "completion": "c", "_source": "/d/dev.jsonl", "_row": 1}]
    long = [{"prompt": "p", "completion": "c" * 100, "_source": "/d/dev.jsonl", "_row": 1}]
    assert encode.tokenize_sft(long, tok, 32, "drop", "dev.jsonl", required=False) == []
    with pytest.raises(DataError, match=r"^/d/dev\.jsonl: all 1 rows were dropped"):
        encode.tokenize_sft(long, tok, 32, "drop", "dev.jsonl")
    assert len(encode.tokenize_sft(rows, tok, 32, "drop", "dev.jsonl", required=False)) == 1


def test_prompt_ids_is_the_prompt_part_of_sft_rows() -> None:
    tok = tiny.build_tokenizer()
    pc = {"prompt": "hi", "completion": "yo", "_system": SYSTEM}
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "_system": SYSTEM}
    ids = encode.prompt_ids(pc, tok)
    assert encode.prompt_ids(chat, tok) == ids
    for row in (pc, chat):
        (ex,) = encode.tokenize_sft([row], tok, 128, "error", "mem")
        assert ex.input_ids[: ex.loss_mask.index(1)] == ids
    assert encode.conversation(pc) == [{"role": "system", "content": SYSTEM}, *chat["messages"]]
    assert encode.prompt_examples([pc], tok)[0].messages == encode.conversation(pc)[:2]
