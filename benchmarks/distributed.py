"""SFT and GRPO on one process with 2 threads vs 2 processes (torchrun, gloo) with 1 thread each.

    .venv/bin/python -m benchmarks.distributed
    .venv/bin/python -m benchmarks.distributed --steps 10 --layers 10
    .venv/bin/python -m benchmarks.distributed --stage grpo --steps 3
    .venv/bin/python -m benchmarks.distributed --full --fsdp       # adds a 2-process fsdp row

A tiny qwen2 of ~30M parameters (hidden 512, 10 layers; LoRA r=8 on all linear layers, or
`--full`), `tiny:arith` rows, the same global batch for both rows. Each configuration runs the
recipe twice, with `--steps` + 2 and 2 optimizer steps; the difference of the wall times over
`--steps` is s/step without start-up, model building and the held-out evaluations (the same in
both runs), and tokens/s counts the target tokens of those steps (`tokens` in metrics.jsonl).
GRPO (`--stage grpo`): 8 prompts x G=4 per step (each process samples 4 prompts' groups), 16
new tokens at most, 2 mini-batches; a step is a generation round, tokens are its sampled
completion tokens (`completion/len_mean` x 32).
`--fsdp` adds a row of 2 processes under `distributed.strategy: fsdp` (on CPU gloo the
all-gathers cost time that ddp does not spend; what fsdp buys is memory, docs/distributed.md).
Prints a Markdown table. Not a timed test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

RLFT = Path(sys.executable).with_name("rlft")


GRPO_ROWS = 8 * 4  # prompts_per_step x group_size


def grpo_stage(steps: int) -> dict:
    return {
        "kind": "grpo", "data": {"source": "tiny:arith", "num_examples": 400, "eval_size": 4, "max_length": 128},
        "rewards": [{"name": "overlong_penalty", "options": {"max_len": 16, "cache_len": 15}}],
        "steps": steps, "prompts_per_step": 8, "group_size": 4, "mini_batches": 2, "micro_batch_size": 8,
        "lr": 1e-3, "sampling": {"temperature": 1.0, "max_new_tokens": 16, "stop": list("aeiou0123456789")},
        "save_every": 1000, "eval_samples": 4, "eval_max_new_tokens": 4,
    }


def recipe(out: Path, steps: int, layers: int, full: bool, stage: str = "sft", strategy: str = "ddp") -> dict:
    if stage == "grpo":
        return recipe(out, steps, layers, full, "sft", strategy) | {"stages": {"grpo": grpo_stage(steps)}}
    return {
        "distributed": {"strategy": strategy},
        "run_name": "bench", "output_dir": str(out), "seed": 0,
        "model": {"name": "tiny:small", "dtype": "float32",
                  "tiny": {"hidden_size": 512, "num_layers": layers, "num_heads": 8, "num_kv_heads": 4,
                           "intermediate_size": 1536}},
        "lora": "full" if full else {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
        "stages": {"sft": {
            "kind": "sft", "data": {"source": "tiny:arith", "num_examples": 400, "eval_size": 8, "max_length": 128},
            "max_steps": steps, "batch_size": 16, "micro_batch_size": 4, "lr": 1e-3, "save_every": 1000,
            "eval_samples": 8, "eval_max_new_tokens": 4,
        }},
    }


def timed_run(tmp: Path, name: str, steps: int, nproc: int, threads: int, layers: int, full: bool,
              stage: str = "sft", strategy: str = "ddp") -> tuple[float, int]:
    """Wall seconds of `rlft run` and the target (SFT) or sampled (GRPO) tokens of its steps."""
    out = tmp / name
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe(out, steps, layers, full, stage, strategy)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    args = [str(RLFT), "run", str(path)] + (["--nproc", str(nproc)] if nproc > 1 else [])
    t0 = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "bench" / stage / "metrics.jsonl").read_text().splitlines()]
    if stage == "grpo":
        return wall, round(sum(r["completion/len_mean"] * GRPO_ROWS for r in rows if "completion/len_mean" in r))
    return wall, sum(int(r["tokens"]) for r in rows if "tokens" in r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--stage", choices=("sft", "grpo"), default="sft")
    parser.add_argument("--fsdp", action="store_true", help="add a row of 2 processes under strategy fsdp")
    args = parser.parse_args()
    rows = []
    configs = [(1, 2, "ddp"), (2, 1, "ddp")] + ([(2, 1, "fsdp")] if args.fsdp else [])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for nproc, threads, strategy in configs:
            name = f"p{nproc}-{strategy}"
            short_wall, short_tokens = timed_run(tmp, f"{name}-short", 2, nproc, threads, args.layers, args.full,
                                                 args.stage, strategy)
            long_wall, long_tokens = timed_run(tmp, f"{name}-long", args.steps + 2, nproc, threads, args.layers,
                                               args.full, args.stage, strategy)
            per_step = (long_wall - short_wall) / args.steps
            label = f"{nproc} process(es) x {threads} thread(s)" + (", fsdp" if strategy == "fsdp" else "")
            rows.append((label, per_step,
                         (long_tokens - short_tokens) / (long_wall - short_wall), short_wall, long_wall))
    mode = "full fine-tuning" if args.full else "LoRA r=8"
    model = f"~30M-parameter tiny qwen2 ({args.layers} layers, hidden 512), {mode}"
    if args.stage == "grpo":
        print(f"GRPO, {model}, 8 prompts x G=4 per round, 2 mini-batches, {args.steps} rounds\n")
        print("| configuration | s/step | sampled tokens/s |\n|---|---|---|")
    else:
        print(f"SFT, {model}, global batch 16 (micro-batches of 4), {args.steps} steps\n")
        print("| configuration | s/step | target tokens/s |\n|---|---|---|")
    for name, per_step, tps, _, _ in rows:
        print(f"| {name} | {per_step:.2f} | {tps:.0f} |")
    # under a varying load the difference can mean nothing (even come out negative): the raw times
    print("\nwall seconds of the two runs (2 and steps + 2 steps):")
    for name, _, _, short_wall, long_wall in rows:
        print(f"  {name}: {short_wall:.1f} s, {long_wall:.1f} s")


if __name__ == "__main__":
    main()
