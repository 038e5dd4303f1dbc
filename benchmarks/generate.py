"""Completion tokens/s of `rlft.rollout.generate` vs `model.generate` on a tiny model (CPU or CUDA).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.generate
    .venv/bin/python -m benchmarks.generate --preset small --prompt-len 256 --repeats 5

Same settings for every row: B prompts x G samples, temperature 1, no top-k/top-p, at most
`--new-tokens` tokens, EOS = `<|im_end|>`. Rows:
  rlft generate          prefill each prompt once, expand the KV cache to its G rows
  rlft generate, repeat  the same loop fed B*G repeated prompts with G = 1 (prefill N rows)
  HF model.generate      `num_return_sequences=G`, `do_sample=True`
tokens/s counts completion tokens that count (up to and including EOS); median of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlft.rollout import SamplingParams, generate, seed_generator
from rlft.tiny import PRESETS, build_tokenizer


def _model(preset: str, tokenizer: object, device: torch.device) -> Qwen2ForCausalLM:
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,  # type: ignore[arg-type]
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
    )
    return Qwen2ForCausalLM(config).to(device).eval()


def _prompts(tokenizer: object, batch: int, length: int) -> list[list[int]]:
    """B prompts of about `length` tokens, lengths differing by up to 25% (left padding is exercised)."""
    text = "Solve step by step: what is 12 * 34 + 5? Show the work. " * (length // 8 + 1)
    lengths = [max(1, length - (i * length) // (4 * batch)) for i in range(batch)]
    return [tokenizer.encode(text)[:n] for n in lengths]  # type: ignore[attr-defined]


def _time(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        runs.append((time.perf_counter() - start, tokens))
    seconds = statistics.median(r[0] for r in runs)
    return seconds, runs[0][1]


def _hf_tokens(model: Qwen2ForCausalLM, tokenizer: object, prompts: list[list[int]], g: int, new: int) -> int:
    batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")  # type: ignore[attr-defined]
    batch = {k: v.to(model.device) for k, v in batch.items()}
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id  # type: ignore[attr-defined]
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                             num_return_sequences=g, eos_token_id=eos, pad_token_id=pad)
    completion = out[:, batch["input_ids"].shape[1] :]
    is_eos = completion == eos
    # a row counts up to and including its first EOS; HF pads after it
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, completion.shape[1])
    return int(first.sum())


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano", choices=sorted(PRESETS))
    parser.add_argument("--prompts", type=int, default=8, help="B distinct prompts")
    parser.add_argument("--group", type=int, default=8, help="G samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer()
    model = _model(args.preset, tokenizer, device)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
    b, g, new = args.prompts, args.group, args.new_tokens

    def ours(prompts: list[list[int]], group: int) -> Callable[[], int]:
        return lambda: int(generate(model, tokenizer, prompts, sampling, group, seed_generator(0)).completion_mask.sum())

    table = Table(title=f"{args.preset} model, {b} prompts x G={g}, {new} new tokens, {device}, "
                        f"torch threads={torch.get_num_threads()}")
    for column in ("prompt len", "method", "completion tokens", "seconds", "tokens/s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for length in args.prompt_len:
        prompts = _prompts(tokenizer, b, length)
        repeated = [p for p in prompts for _ in range(g)]
        for name, fn in (
            ("rlft generate", ours(prompts, g)),
            ("rlft generate, repeat", ours(repeated, 1)),
            ("HF model.generate", lambda prompts=prompts: _hf_tokens(model, tokenizer, prompts, g, new)),
        ):
            seconds, tokens = _time(fn, args.repeats)
            table.add_row(str(length), name, str(tokens), f"{seconds:.3f}", f"{tokens / seconds:,.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
