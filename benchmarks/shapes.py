"""The two GRPO benchmark shapes: a saved Qwen2 model, chat prompts and a reward, the same for
every framework that is measured on them (`grpo_step.py`, `vs_trl.py`).

  a  ~4.0M parameters, 8 prompts of ~55 tokens x G=8, up to 32 new tokens.
  b  ~29M parameters, 4 prompts of 32-160 tokens x G=8, up to 256 new tokens.

Models are random (seeded) with the built-in byte-level tokenizer. A random model almost never
emits EOS, so every completion would run to the limit; to give completions a real length spread,
the model carries a constant channel: hidden dimension 0 of every token embedding is 1 and no
layer writes to it, and the (untied) LM head row of EOS reads it with weight `eos_boost`. EOS then
gets a steady extra logit, and completion lengths spread out roughly geometrically. It is an
ordinary Qwen2 checkpoint: every framework loads it with `from_pretrained`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    prompts: int  # B per step
    group_size: int  # G
    max_new_tokens: int
    prompt_chars: tuple[int, int]  # user-message length range, characters (= tokens, byte-level)
    eos_boost: float


SHAPES = {
    "a": Shape(256, 4, 4, 2, 1024, prompts=8, group_size=8, max_new_tokens=32, prompt_chars=(36, 40), eos_boost=0.3),
    "b": Shape(512, 10, 8, 4, 1376, prompts=4, group_size=8, max_new_tokens=256, prompt_chars=(14, 142),
               eos_boost=0.3),
}

WORDS = "add the two numbers below and give the sum as a single integer with no other words".split()


def save_model(shape: Shape, out_dir: Path, seed: int = 0) -> Path:
    """Write the shape's model and tokenizer to `out_dir` (safetensors, HF layout); returns it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    from rlft.tiny import build_tokenizer

    hf_logging.disable_progress_bar()  # benchmark tables, not progress bars
    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate,
        max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # the constant channel that carries the EOS boost (module docstring)
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[tok.eos_token_id, 0] = shape.eos_boost
    model.save_pretrained(out_dir, safe_serialization=True)
    model.generation_config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def prompt_messages(shape: Shape, n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """n one-turn chat prompts: an addition question padded with words to a length in `prompt_chars`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question = f"{a}+{b}="
        target = rng.randint(*shape.prompt_chars)
        words: list[str] = []
        while len(" ".join(words)) + len(question) + 1 < target:
            words.append(rng.choice(WORDS))
        text = (" ".join(words) + " " + question)[-target:].strip()
        out.append([{"role": "user", "content": text}])
    return out


def reward(completion_text: str) -> float:
    """A reward with a spread (GRPO needs unequal rewards in a group); costs nothing to compute."""
    return float(len(completion_text) % 5) / 4


def model_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def prompt_ids(tokenizer: Any, messages: list[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each prompt as the chat template renders it with the generation prompt."""
    out = []
    for m in messages:
        ids = tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out
