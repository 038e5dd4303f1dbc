"""Peak memory of a GRPO update and an SFT step with and without gradient checkpointing; prints a table.

    python -m benchmarks.memory                      # tiny:small widened to 8 layers, B=8 x G=8, 64 new tokens
    python -m benchmarks.memory --layers 16 --hidden 256

Each (stage, checkpointing) pair runs in a fresh subprocess: load the model, build the batch (for
GRPO: sample and score a round), take one warm-up step (optimizer state, first-call caches), then
measure the second: the peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs
just before the step) minus the resident size at that instant. glibc is told to serve every
allocation above 64 KiB with its own mapping (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves
the resident set at once and the peak is that of live memory: what the step itself needs on top
of weights, optimizer state and the round's data, i.e. mostly activations saved for backward.
CPU only (on CUDA, torch.cuda.max_memory_allocated is the direct measure).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

MMAP_THRESHOLD = 65536


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=None, help="hidden size (MLP width 2x); default the preset's")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sft-batch", type=int, default=64)
    p.add_argument("--child", nargs=2, metavar=("STAGE", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_measure(args, args.child[0], args.child[1] == "on")))
        return
    results = {(stage, on): _spawn(stage, on) for stage in ("grpo", "sft") for on in (False, True)}
    _print(args, results)


def _spawn(stage: str, on: bool) -> dict[str, float]:
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    cmd = [sys.executable, "-m", "benchmarks.memory", *sys.argv[1:], "--child", stage, "on" if on else "off"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_during(step: Any) -> dict[str, float]:
    """Run `step()` and return its peak resident memory above the resident memory before it (MiB)."""
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return {"peak_mib": (_status_kb("VmHWM") - base) / 1024, "base_mib": base / 1024, "seconds": seconds}


def _model_spec(args: argparse.Namespace, on: bool) -> Any:
    from rlft.recipe.schema import ModelSpec

    tiny = {"num_layers": args.layers} | ({"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden}
                                         if args.hidden else {})
    return ModelSpec(name=f"tiny:{args.preset}", tiny=tiny, gradient_checkpointing=on)


def _measure(args: argparse.Namespace, stage: str, on: bool) -> dict[str, float]:
    from rlft.models import attach_lora, load_model, load_tokenizer, prepare_base
    from rlft.recipe.schema import LoraSpec

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        spec = _model_spec(args, on)
        source = prepare_base(spec, Path(tmp))
        tok = load_tokenizer(source, spec)
        policy = attach_lora(load_model(source, spec, torch.device("cpu")), LoraSpec(r=8))
        step = _grpo_step(args, policy, tok, Path(tmp)) if stage == "grpo" else _sft_step(args, policy, tok)
        step()  # warm-up
        return _peak_during(step)


def _grpo_step(args: argparse.Namespace, policy: Any, tok: Any, tmp: Path) -> Any:
    """One round's update (learner.update) on a sampled, scored round, in the GRPO stage's mode."""
    from rlft import rollout
    from rlft.data import encode, tasks
    from rlft.models import dropout_free_mode
    from rlft.recipe.schema import GRPOSpec
    from rlft.rewards.runner import build_rewards
    from rlft.rl import learner
    from rlft.stages.grpo import build_experience
    from rlft.training import NanGuard, make_optimizer

    spec = GRPOSpec.model_validate({
        "kind": "grpo", "data": "tiny:arith", "rewards": ["math_answer", "think_format"],
        "prompts_per_step": args.prompts, "group_size": args.group_size, "micro_batch_size": 64,
        "sampling": {"max_new_tokens": args.max_new_tokens}})
    dropout_free_mode(policy)
    rows = tasks.get_task("arith").generate(args.prompts, seed=0)
    batch = encode.prompt_examples([{**r, "task": "arith"} for r in rows], tok)
    sampling = rollout.SamplingParams(max_new_tokens=args.max_new_tokens)
    out = rollout.generate(policy, tok, [b.prompt_ids for b in batch], sampling, spec.group_size,
                           rollout.seed_generator(0))
    score = build_rewards([e.model_dump() for e in spec.rewards], tmp)
    cols = {k: [b.columns.get(k) for b in batch for _ in range(spec.group_size)] for k in batch[0].columns}
    R = score([b.prompt_text for b in batch for _ in range(spec.group_size)], out.texts, cols).total
    score.close()
    exp = build_experience(policy, None, out, R, spec, sampling, _NoTimer())
    optimizer = make_optimizer(policy, spec)
    return lambda: learner.update(policy, optimizer, exp, spec, NanGuard("skip", 10), 0, 1.0, lambda s: spec.lr)


def _sft_step(args: argparse.Namespace, policy: Any, tok: Any) -> Any:
    """One SFT optimizer step (training.sft_step, as the SFT stage runs it, train mode) on `--sft-batch` worked additions."""
    from rlft.data import encode, tasks
    from rlft.data.batch import collate
    from rlft.recipe.schema import SFTSpec
    from rlft.training import NanGuard, make_optimizer, sft_step

    rows = tasks.get_task("arith").generate(args.sft_batch, seed=0)
    examples = encode.tokenize_sft([{"prompt": r["prompt"], "completion": r["solution"]} for r in rows], tok, 512,
                                 "error", "tiny:arith")
    batch = collate(examples, tok.pad_token_id)
    optimizer = make_optimizer(policy, SFTSpec.model_validate({"kind": "sft", "data": "tiny:arith"}))
    policy.train()
    return lambda: sft_step(policy, optimizer, [batch], NanGuard("skip", 10), 1.0, 1)


class _NoTimer:
    def lap(self, name: str) -> None:
        pass


def _print(args: argparse.Namespace, results: dict[tuple[str, bool], dict[str, float]]) -> None:
    hidden = f", hidden {args.hidden}" if args.hidden else ""
    table = Table(caption=(
        f"tiny:{args.preset}, {args.layers} layers{hidden}, LoRA r=8; GRPO update of B={args.prompts} x "
        f"G={args.group_size} completions (up to {args.max_new_tokens} new tokens); SFT step of "
        f"{args.sft_batch} rows; torch threads={torch.get_num_threads()}; peak RSS above the step's start"))
    for col in ("step", "checkpointing", "peak MiB", "vs off", "step s", "resident before MiB"):
        table.add_column(col, justify="left" if col in ("step", "checkpointing") else "right")
    for (stage, on), r in results.items():
        off = results[(stage, False)]
        table.add_row("GRPO update" if stage == "grpo" else "SFT step", "on" if on else "off",
                      f"{r['peak_mib']:.1f}", f"{r['peak_mib'] / off['peak_mib']:.0%}", f"{r['seconds']:.3f}",
                      f"{r['base_mib']:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
