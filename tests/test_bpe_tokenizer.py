"""The stages on a real-shaped tokenizer (`rlft.tiny_bpe`) as well as the byte-level one: multi-
character tokens, byte fallback (partial UTF-8), eos != pad, a chat template with a system turn
and no generation markers (assistant masks by prefix rendering), reloading as itself, and the
whole R1 stage graph end to end on a `tokenizer: bpe` tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import metrics, rlft, write_recipe

from rlft import tiny
from rlft.data.encode import tokenize_sft
from rlft.rewards.builtin import extract_answer
from rlft.tiny_bpe import build_bpe_tokenizer

ROW = {"messages": [{"role": "system", "content": "Answer in tags."},
                    {"role": "user", "content": "Natalia has 48 clips and buys 24 more. How many?"},
                    {"role": "assistant", "content": "<think>48 + 24 = 72</think> <answer>72</answer>"},
                    {"role": "user", "content": "And twice that?"},
                    {"role": "assistant", "content": "<answer>144</answer>"}]}


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return tiny.tokenizer_of(request.param)


def test_bpe_is_real_shaped() -> None:
    tok = build_bpe_tokenizer()
    ids = tok.encode("Natalia has 48 clips. <answer>72</answer>")
    pieces = [tok.decode([i]) for i in ids]
    assert any(len(p) > 3 for p in pieces), pieces  # multi-character tokens
    assert "</answer>" not in pieces and "</answer>" in tok.decode(ids)  # the tag is split across tokens
    assert tok.eos_token_id != tok.pad_token_id and tok.bos_token_id is None
    assert "{% generation %}" not in tok.chat_template and "{%- generation" not in tok.chat_template
    text = tok.apply_chat_template(ROW["messages"][:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nAnswer in tags.<|im_end|>\n") and text.endswith("assistant\n")


def test_byte_fallback_and_partial_utf8_decode(tokenizer: Any) -> None:
    """A character never learned is its UTF-8 bytes; half of them decode to U+FFFD, never raise."""
    ids = tokenizer.encode("x \u20ac")  # the euro sign is 3 bytes
    assert tokenizer.decode(ids) == "x \u20ac"
    euro = tokenizer.encode("\u20ac")
    assert len(euro) == 3
    assert tokenizer.decode(euro[:2]).endswith("\ufffd") and "\u20ac" not in tokenizer.decode(euro[:2])


def test_assistant_masks_cover_exactly_the_assistant_turns(tokenizer: Any) -> None:
    """With {% generation %} markers (byte) or by prefix rendering (bpe), the loss mask is each
    assistant reply and its eos, nothing of the system or user turns."""
    [ex] = tokenize_sft([ROW], tokenizer, 512, "error", "rows")
    assert ex.input_ids == tokenizer.apply_chat_template(ROW["messages"], tokenize=True, return_dict=False)
    target = [i for i, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m]
    eos = tokenizer.eos_token
    assert tokenizer.decode(target) == f"<think>48 + 24 = 72</think> <answer>72</answer>{eos}<answer>144</answer>{eos}"


def test_answers_extract_from_multi_character_tokens(tokenizer: Any) -> None:
    ids = tokenizer.encode("<think>48 + 24 = 72</think> <answer>72</answer>")
    assert extract_answer(tokenizer.decode(ids)) == "72"


def test_a_bpe_tiny_model_reloads_with_its_own_tokenizer(tmp_path: Path) -> None:
    """transformers rebuilds a qwen2 directory's tokenizer from its vocabulary and merges: the BPE
    comes back token for token (a tokenizer of another pipeline would come back changed)."""
    from transformers import AutoTokenizer

    out = tiny.build_tiny_model(tmp_path / "m", "student", {"tokenizer": "bpe"})
    loaded, built = AutoTokenizer.from_pretrained(out), build_bpe_tokenizer()
    text = tiny.tokenizer_of("bpe").apply_chat_template(ROW["messages"], tokenize=False)
    assert loaded.encode(text) == built.encode(text) and len(loaded) == len(built)
    assert loaded.eos_token_id == built.eos_token_id and loaded.pad_token_id == built.pad_token_id
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(built)
    assert tiny.config_hash(tiny.resolve_config("nano", {"tokenizer": "bpe"}), 0) != tiny.config_hash(
        tiny.resolve_config("nano"), 0)


def bpe_r1(output_dir: Path) -> dict[str, Any]:
    """tiny-r1's stage graph (SFT, GRPO with a stop string, sample, retrain, distill, eval) on BPE
    tiny models, a few steps each."""
    data = {"source": "tiny:arith", "num_examples": 64, "eval_size": 8, "max_length": 128,
            "system_prompt": "Think, then answer in tags."}
    # "o" is inside many multi-character tokens (" books", " more", "How"): stops that end mid-token
    sampling = {"temperature": 1.0, "max_new_tokens": 24, "stop": ["</answer>", "o"]}
    train = {"batch_size": 8, "lr": 1e-2, "save_every": 50, "eval_samples": 8, "eval_max_new_tokens": 16}
    bpe = {"tokenizer": "bpe"}
    return {
        "run_name": "b",
        "output_dir": str(output_dir),
        "model": {"name": "tiny:nano", "tiny": bpe},
        "lora": {"r": 8, "alpha": 16, "targets": "all-linear"},
        "stages": {
            "cold_start": {"kind": "sft", "data": data, "max_steps": 4} | train,
            "rl": {"kind": "grpo", "from": "cold_start", "data": data, "rewards": ["task_verifier", "tag_count"],
                   "steps": 2, "prompts_per_step": 2, "group_size": 4, "micro_batch_size": 8, "lr": 3e-3,
                   "sampling": sampling, "save_every": 1, "eval_samples": 4},
            "sample": {"kind": "sample", "from": "rl", "data": data, "rewards": ["tag_count"], "threshold": 0.0,
                       "per_prompt": 2, "keep": "all", "shard_size": 64, "batch_size": 16, "sampling": sampling},
            "retrain": {"kind": "sft", "from": "base", "data": [{"source": "sample", "eval_size": 4}],
                        "max_steps": 2} | train,
            "distill": {"kind": "distill", "teacher": "rl", "student": {"name": "tiny:student", "tiny": bpe},
                        "lora": "full", "mode": "logits", "data": [{"source": "sample", "eval_size": 4}],
                        "max_steps": 2} | train,
            "eval": {"kind": "eval", "models": ["cold_start", "distill"], "data": data, "k": 2,
                     "num_prompts": 4, "rewards": ["task_verifier"], "sampling": sampling},
        },
    }


def test_every_stage_runs_on_the_bpe_tokenizer(tmp_path: Path) -> None:
    result = rlft("run", str(write_recipe(tmp_path / "r.yaml", bpe_r1(tmp_path))))
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "b"
    for stage in ("cold_start", "rl", "sample", "retrain", "distill", "eval"):
        assert (run / stage / "stage.done.json").exists(), stage
    losses = [r["loss"] for r in metrics(run / "cold_start") if "loss" in r]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)
    rewards = [r for r in metrics(run / "rl") if any(k.startswith("reward") for k in r)]
    assert rewards, metrics(run / "rl")
    sampled = [json.loads(line) for line in (run / "sample/final/data.jsonl").read_text().splitlines()]
    assert sampled and sampled[0]["messages"][0] == {"role": "system", "content": "Think, then answer in tags."}
    replies = [r["messages"][-1]["content"] for r in sampled]
    # a stop string is kept and nothing after it, even when it ends inside a multi-character token
    stopped = [t for t in replies if "o" in t or "</answer>" in t]
    assert len(stopped) >= len(replies) // 4, replies
    assert all(t.endswith(("o", "</answer>")) and t.count("o") <= 1 for t in stopped), stopped
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "distill/final/model")
    assert len(tok) == len(build_bpe_tokenizer())
    results = json.loads((run / "results.json").read_text())
    assert {("eval", "distill", "pass@2"), ("eval", "cold_start", "pass@2")} <= {
        (r["stage"], r["model"], r["metric"]) for r in results}
