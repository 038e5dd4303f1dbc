"""Process CPU time of one GRPO step, the training forward of today against a plain full forward.

    python -m benchmarks.grpo_step                    # both shapes, 3 timed steps each
    python -m benchmarks.grpo_step --shape a --steps 5

Shapes (benchmarks/shapes.py; full fine-tuning, fp32, temperature 1, token-mean loss, beta 0, mu 1,
AdamW): a ~4.0M-parameter Qwen2, 8 chat prompts of ~55 tokens x G=8, up to 32 new tokens; b ~29M
parameters, 4 prompts of 32-160 tokens x G=8, up to 256 new tokens, completion lengths spread.

Two variants run alternately, step by step, each on its own copy of the same initial weights:
  plain   one forward per row over [prompt; completion] at the batch's full padded width and one
          backward per micro-batch (the forward before shared prompts and padding cuts);
  rlft    the training forward as the GRPO stage runs it: `rollout.completion_logprobs` for
          old/reference log-probs, `rollout.loss_by_bucket` (backward bucket by bucket) for the loss.
Columns: CPU-seconds per step (process time: robust on a shared machine), completion tokens per
CPU-second, the share of a matmul FLOP floor (the step's linear-layer FLOPs over a fp32 matmul rate
measured in this run, 6 flops per parameter per trained token, 2 per sampled token), and the
padding share of the tokens the training forward fed the model.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.shapes import SHAPES, prompt_ids, prompt_messages, reward, save_model
from rlft import rollout
from rlft.metrics import StepTimer
from rlft.recipe.schema import GRPOSpec
from rlft.rl import learner
from rlft.stages.grpo import build_experience
from rlft.training import NanGuard, make_optimizer


@dataclass
class Totals:
    cpu: dict[str, float] = field(default_factory=dict)
    completion_tokens: int = 0
    fed_tokens: int = 0  # tokens the training forwards fed the model
    real_tokens: int = 0  # distinct prompt tokens + counted completion tokens of the trained rows
    flops: float = 0.0
    steps: int = 0


class CpuTimer(StepTimer):
    """StepTimer's laps in process CPU time."""

    def __init__(self) -> None:
        super().__init__()
        self._t = time.process_time()

    def lap(self, name: str) -> None:
        now = time.process_time()
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + now - self._t
        self._t = now


def matmul_rate(hidden: int, seconds: float = 1.0) -> float:
    """Best fp32 matmul FLOP/s of this process on a (512, h) x (h, 4h) product, measured now."""
    a, b = torch.randn(512, hidden), torch.randn(hidden, 4 * hidden)
    best, end = 0.0, time.process_time() + seconds
    while time.process_time() < end:
        t0 = time.process_time()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * 512 * hidden * 4 * hidden / max(time.process_time() - t0, 1e-9))
    return best


def matmul_params(model: Any) -> int:
    """Parameters a token's forward multiplies by: every linear layer incl. the LM head, no embeddings."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def run_shape(name: str, steps: int, tmp: Path) -> dict[str, Totals]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    shape = SHAPES[name]
    source = save_model(shape, tmp / name)
    tok = AutoTokenizer.from_pretrained(source)
    B, G = shape.prompts, shape.group_size
    spec = GRPOSpec.model_validate({
        "kind": "grpo", "data": "tiny:arith", "rewards": ["math_answer"], "prompts_per_step": B,
        "group_size": G, "micro_batch_size": B * G, "sampling": {"max_new_tokens": shape.max_new_tokens},
        "loss": {"beta": 0.0, "aggregate": "token"}, "lr": 1e-6,
    })
    sampling = rollout.SamplingParams.of(spec.sampling)
    prompts = prompt_ids(tok, prompt_messages(shape, B * (steps + 1)))
    real, real_by_bucket = rollout.completion_logprobs, rollout.loss_by_bucket

    def one_share(model: Any, batch: Any, temperature: float, share_of: Any, with_entropy: bool = False,
                  share_prompts: bool = True) -> Any:
        """The plain variant's policy loss: one forward over the whole micro-batch, one backward."""
        lp, ent = real(model, batch, temperature, with_entropy=True, one_forward=True)
        yield share_of(torch.arange(len(lp), device=lp.device), lp, ent if with_entropy else None)

    variants: dict[str, Any] = {"plain": (functools.partial(real, one_forward=True), one_share),
                                "rlft": (real, real_by_bucket)}
    policies, optimizers, totals = {}, {}, {}
    for v in variants:
        policies[v] = AutoModelForCausalLM.from_pretrained(source).eval()
        optimizers[v] = make_optimizer(policies[v], spec)
        totals[v] = Totals()
    n_mat = matmul_params(policies["rlft"])
    for step in range(steps + 1):  # step 0 warms up
        batch = prompts[step * B : (step + 1) * B]
        for v, (forward, by_bucket) in variants.items():
            policy, fed = policies[v], [0]
            # the learner calls rollout.completion_logprobs (old/ref) and rollout.loss_by_bucket (policy)
            rollout.completion_logprobs, rollout.loss_by_bucket = forward, by_bucket
            timer = CpuTimer()
            out = rollout.generate(policy, tok, batch, sampling, G, rollout.seed_generator(0, step))
            timer.lap("generation")
            R = torch.tensor([reward(t) for t in out.texts])
            exp = build_experience(policy, None, out, R, spec, sampling, timer)
            hook = policy.get_decoder().embed_tokens.register_forward_hook(
                lambda m, a, o, fed=fed: fed.__setitem__(0, fed[0] + a[0].numel()))
            learner.update(policy, optimizers[v], exp, spec, NanGuard("skip", 10), 0, sampling.temperature,
                           lambda s: spec.lr)
            hook.remove()
            timer.lap("policy")
            rollout.completion_logprobs, rollout.loss_by_bucket = real, real_by_bucket
            if step == 0:
                continue
            t = totals[v]
            t.steps += 1
            for k, val in timer.times.items():
                t.cpu[k] = t.cpu.get(k, 0.0) + val
            c_tokens = int(out.completion_mask.sum())
            p_tokens = int(out.prompt_mask[::G].sum())
            t.completion_tokens += c_tokens
            t.fed_tokens += fed[0]
            t.real_tokens += p_tokens + c_tokens
            t.flops += 2 * n_mat * (p_tokens + c_tokens) + 6 * n_mat * (p_tokens + c_tokens)
    return totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["a", "b", "both"], default="both")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    args = p.parse_args()
    shapes = ["a", "b"] if args.shape == "both" else [args.shape]
    table = Table(caption=f"GRPO step, process CPU time, torch threads={torch.get_num_threads()} "
                          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), {args.steps} steps each")
    for col in ("shape", "forward", "CPU-s/step", "generation", "policy", "compl. tok/CPU-s", "FLOP-floor share",
                "padding fed", "speed-up"):
        table.add_column(col, justify="left" if col in ("shape", "forward") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            totals = run_shape(name, args.steps, Path(tmp))
            hidden = SHAPES[name].hidden
            rate = matmul_rate(hidden)
            base = sum(totals["plain"].cpu.values()) / totals["plain"].steps
            for v, t in totals.items():
                per_step = sum(t.cpu.values()) / t.steps
                table.add_row(
                    name, v, f"{per_step:.3f}", f"{t.cpu['time/generation'] / t.steps:.3f}",
                    f"{t.cpu['time/policy'] / t.steps:.3f}", f"{t.completion_tokens / sum(t.cpu.values()):,.0f}",
                    f"{t.flops / rate / sum(t.cpu.values()):.0%}", f"{1 - t.real_tokens / max(t.fed_tokens, 1):.0%}",
                    f"{base / per_step:.2f}x")
            Console().print(f"shape {name}: {totals['rlft'].completion_tokens / totals['rlft'].steps:.0f} completion "
                            f"tokens/step, fp32 matmul rate {rate / 1e9:.1f} GFLOP/s")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
