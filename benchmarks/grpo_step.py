"""Time one GRPO step on a tiny model, split into its phases, and print a table.

    python -m benchmarks.grpo_step                       # nano preset, B=8 prompts x G=8, 64 new tokens
    python -m benchmarks.grpo_step --preset small --steps 5 --beta 0.05

Phases: generation (KV-cached sampling), rewards, reference (old/ref log-probs), policy
forward/backward, optimizer (clip + AdamW step). The same library functions the GRPO stage
calls; fixed seeds, so two runs on one machine time the same work.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from rlft import rollout
from rlft.data import encode, tasks
from rlft.metrics import StepTimer
from rlft.models import attach_lora, load_model, load_tokenizer, prepare_base
from rlft.recipe.schema import GRPOSpec, LoraSpec, ModelSpec
from rlft.rewards.runner import build_rewards
from rlft.rl import learner
from rlft.stages.grpo import build_experience, make_reference
from rlft.training import NanGuard, make_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--mu", type=int, default=1)
    args = p.parse_args()

    model_spec = ModelSpec(name=f"tiny:{args.preset}")
    spec = GRPOSpec.model_validate({
        "kind": "grpo", "data": "tiny:arith", "rewards": ["math_answer", "think_format"],
        "prompts_per_step": args.prompts, "group_size": args.group_size, "micro_batch_size": 64,
        "num_iterations": args.mu, "sampling": {"max_new_tokens": args.max_new_tokens},
        "loss": {"beta": args.beta},
    })
    with tempfile.TemporaryDirectory() as tmp:
        source = prepare_base(model_spec, Path(tmp))
        tok = load_tokenizer(source, model_spec)
        torch.manual_seed(0)
        policy = attach_lora(load_model(source, model_spec, torch.device("cpu")), LoraSpec(r=8)).eval()
        rows = tasks.get_task("arith").generate(args.prompts * (args.steps + 1), seed=0)
        prompts = encode.prompt_examples([{**r, "task": "arith"} for r in rows], tok)
        score = build_rewards([e.model_dump() for e in spec.rewards], Path(tmp))
        reference = make_reference(policy, _Ctx(spec))
        times, tokens = _run(policy, tok, prompts, score, reference, spec, args.steps)
        score.close()
    _print(args, times, tokens)


class _Ctx:
    """The two things `make_reference` asks of a run context."""

    def __init__(self, spec: GRPOSpec):
        self.spec = spec

    def lora(self) -> LoraSpec:
        return LoraSpec(r=8)


def _run(policy, tok, prompts, score, reference, spec, steps):  # noqa: ANN001, ANN202
    optimizer = make_optimizer(policy, spec)
    opt_time = [0.0]
    inner = optimizer.step

    def timed_step(*a, **k):  # noqa: ANN002, ANN003, ANN202
        t0 = time.perf_counter()
        out = inner(*a, **k)
        opt_time[0] += time.perf_counter() - t0
        return out

    optimizer.step = timed_step  # type: ignore[method-assign]
    sampling = rollout.SamplingParams(max_new_tokens=spec.sampling.max_new_tokens)
    G, B = spec.group_size, spec.prompts_per_step
    totals: dict[str, float] = {}
    tokens = 0
    for step in range(steps + 1):  # step 0 warms up
        batch = prompts[step * B : (step + 1) * B]
        timer = StepTimer()
        opt_time[0] = 0.0
        out = rollout.generate(policy, tok, [b.prompt_ids for b in batch], sampling, G, rollout.seed_generator(0, step))
        timer.lap("generation")
        cols = {k: [b.columns.get(k) for b in batch for _ in range(G)] for k in batch[0].columns}
        R = score([b.prompt_text for b in batch for _ in range(G)], out.texts, cols).total
        timer.lap("rewards")
        exp = build_experience(policy, reference, out, R, spec, sampling, timer)
        learner.update(policy, optimizer, exp, spec, NanGuard("skip", 10), 0, sampling.temperature, lambda s: spec.lr)
        timer.lap("update")
        if step == 0:
            continue
        tokens += int(out.completion_mask.sum())
        split = dict(timer.times)
        split["time/optimizer"] = opt_time[0]
        split["time/policy fwd+bwd"] = split.pop("time/update") - opt_time[0]
        for k, v in split.items():
            totals[k] = totals.get(k, 0.0) + v / steps
    return totals, tokens


def _print(args, times: dict[str, float], tokens: int) -> None:  # noqa: ANN001
    total = sum(times.values())
    table = Table(caption=(
        f"GRPO step, tiny:{args.preset}, B={args.prompts} x G={args.group_size}, {args.max_new_tokens} new tokens, "
        f"beta={args.beta}, mu={args.mu}, torch threads={torch.get_num_threads()} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"))
    for col in ("phase", "s/step", "share"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    order = ["time/generation", "time/rewards", "time/reference", "time/policy fwd+bwd", "time/optimizer"]
    for key in order:
        table.add_row(key.removeprefix("time/"), f"{times.get(key, 0.0):.4f}", f"{times.get(key, 0.0) / total:.0%}")
    table.add_row("total", f"{total:.4f}", "100%")
    Console().print(table)
    print(f"completion tokens/s (whole step): {tokens / args.steps / total:,.0f}; "
          f"generation only: {tokens / args.steps / times['time/generation']:,.0f}")


if __name__ == "__main__":
    main()
