"""Peak memory of a GRPO update and an SFT step vs sequence length and model size, with and without
gradient checkpointing and bf16 autocast; prints a table.

    python -m benchmarks.memory                      # tiny:small widened to 8 layers, B=8 x G=8, 64 new tokens
    python -m benchmarks.memory --layers 16 --hidden 256
    python -m benchmarks.memory --hiddens 128 256 --lengths 32 128 --precisions fp32 bf16_autocast

`--hiddens` and `--lengths` sweep the model width (MLP 2x) and the sequence length (GRPO: new tokens
per completion; SFT: tokens per row); `--precisions` adds `model.precision` choices to the
checkpointing off/on pair. Each measurement runs in a fresh subprocess: load the model, build the batch (for
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
    p.add_argument("--sft-length", type=int, default=None, help="tokens per SFT row; default the rows' own length")
    p.add_argument("--hiddens", type=int, nargs="+", default=None, help="sweep: hidden sizes")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sweep: GRPO new tokens = SFT row tokens")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16_autocast", "bf16_master"])
    p.add_argument("--child", nargs=3, metavar=("STAGE", "CHECKPOINTING", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_measure(args, args.child[0], args.child[1] == "on", args.child[2])))
        return
    if args.hiddens or args.lengths:
        _sweep(args)
        return
    results = {(stage, on): _spawn(stage, on) for stage in ("grpo", "sft") for on in (False, True)}
    _print(args, results)


def _sweep(args: argparse.Namespace) -> None:
    """One row per (step, hidden, length, precision, checkpointing)."""
    hiddens, lengths = args.hiddens or [args.hidden], args.lengths or [args.max_new_tokens]
    table = Table(caption=(
        f"tiny:{args.preset}, {args.layers} layers, LoRA r=8; GRPO update of B={args.prompts} x G={args.group_size} "
        f"completions of up to `length` new tokens; SFT step of {args.sft_batch} rows of `length` tokens; torch "
        f"threads={torch.get_num_threads()}; peak RSS above the step's start (activations, mostly); 'vs base' is "
        "against fp32 without checkpointing in the same row group"))
    for col in ("step", "hidden", "length", "precision", "ckpt", "peak MiB", "vs base", "step s"):
        table.add_column(col, justify="left" if col in ("step", "precision", "ckpt") else "right")
    for stage in ("grpo", "sft"):
        for hidden in hiddens:
            for length in lengths:
                extra = [*(["--hidden", str(hidden)] if hidden else []), "--max-new-tokens", str(length),
                         "--sft-length", str(length)]
                base = None
                for prec in args.precisions:
                    for on in (False, True):
                        r = _spawn(stage, on, prec, extra)
                        base = base or r
                        table.add_row("GRPO update" if stage == "grpo" else "SFT step", str(hidden or "preset"),
                                      str(length), prec, "on" if on else "off", f"{r['peak_mib']:.1f}",
                                      f"{r['peak_mib'] / base['peak_mib']:.0%}", f"{r['seconds']:.3f}")
    Console().print(table)


def _spawn(stage: str, on: bool, prec: str = "fp32", extra: list[str] | None = None) -> dict[str, float]:
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    argv = _without_sweep(sys.argv[1:])
    cmd = [sys.executable, "-m", "benchmarks.memory", *argv, *(extra or []), "--child", stage, "on" if on else "off",
           prec]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _without_sweep(argv: list[str]) -> list[str]:
    """The parent's arguments minus the sweep lists (a child measures one point)."""
    out, skip = [], False
    for a in argv:
        if a in ("--hiddens", "--lengths", "--precisions"):
            skip = True
        elif a.startswith("--"):
            skip = False
        if not skip:
            out.append(a)
    return out


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


def _model_spec(args: argparse.Namespace, on: bool, prec: str = "fp32") -> Any:
    from rlft.recipe.schema import ModelSpec

    tiny = {"num_layers": args.layers} | ({"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden}
                                         if args.hidden else {})
    return ModelSpec.model_validate({"name": f"tiny:{args.preset}", "tiny": tiny, "gradient_checkpointing": on,
                                    "precision": prec})


def _measure(args: argparse.Namespace, stage: str, on: bool, prec: str = "fp32") -> dict[str, float]:
    from rlft.models import attach_lora, load_model, load_tokenizer, prepare_base
    from rlft.recipe.schema import LoraSpec

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        spec = _model_spec(args, on, prec)
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
    if args.sft_length:  # every row cut to exactly --sft-length tokens: a worked solution repeated
        rows = [{**r, "solution": " ".join([r["solution"]] * args.sft_length)} for r in rows]
    length = args.sft_length or 512
    examples = encode.tokenize_sft([{"prompt": r["prompt"], "completion": r["solution"]} for r in rows], tok, length,
                                 "truncate" if args.sft_length else "error", "tiny:arith")
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
