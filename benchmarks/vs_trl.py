"""rlft's GRPO step against TRL's GRPOTrainer on the same saved model, prompts, reward and settings.

    python -m benchmarks.vs_trl                 # both shapes, 3 timed steps, 2 alternating rounds
    python -m benchmarks.vs_trl --shape a --rounds 3

Needs `trl` importable in this environment (it is not an rlft dependency; e.g. a separate venv
with `pip install trl` and rlft installed editable). Each run is its own process, TRL and rlft
alternating round by round, so a busy machine slows both alike. Settings, the same on both
sides: the shape's model (benchmarks/shapes.py) fully fine-tuned in fp32 on the CPU, B prompts x G
completions per step, one generation and one optimizer step per step (mu 1, no gradient
accumulation), temperature 1 with no top-k/top-p, beta 0 (no reference model), token-mean loss
(TRL loss_type "dapo"), group-scaled advantages, AdamW, grad clip 1.0, dropout off, the same
Python reward on the completion text.

Measured per step: process CPU seconds (robust on a shared machine; the first step is a warm-up
and not counted) and completion tokens; per process: peak RSS and RSS growth from just before
training to the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.shapes import SHAPES, Shape, prompt_ids, prompt_messages, reward, save_model


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_trl(shape: Shape, model_dir: Path, steps: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    B, G = shape.prompts, shape.group_size
    data = Dataset.from_list([{"prompt": m} for m in prompt_messages(shape, B * (steps + 1))])

    def reward_fn(completions: list[Any], **_: Any) -> list[float]:
        return [reward(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    times: list[float] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.process_time() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=B * G, num_generations=G, gradient_accumulation_steps=1,
            max_completion_length=shape.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
            loss_type="dapo", scale_rewards="group", num_iterations=1, learning_rate=1e-6, lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=1.0, max_steps=steps + 1, logging_steps=10**6, save_strategy="no",
            report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0, shuffle_dataset=False, disable_dropout=True,
            mask_truncated_completions=False, log_completions=False, dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_fn, args=config, train_dataset=data,
                              processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Clock()])
        real = trainer._generate_and_score_completions

        def counted(*a: Any, **k: Any) -> Any:
            out_ = real(*a, **k)
            tokens.append(int(out_["completion_mask"].sum()))
            return out_

        trainer._generate_and_score_completions = counted  # type: ignore[method-assign]
        before = rss_mib()
        trainer.train()
    return {"cpu": times[1:], "tokens": tokens[1:], "rss_before": before, "peak_rss": peak_rss_mib()}


def run_rlft(shape: Shape, model_dir: Path, steps: int) -> dict[str, Any]:
    import torch

    from rlft import rollout
    from rlft.models import dropout_free_mode, load_model, load_tokenizer
    from rlft.recipe.schema import GRPOSpec, ModelSpec
    from rlft.rl import learner
    from rlft.stages.grpo import build_experience
    from rlft.training import NanGuard, make_optimizer

    torch.manual_seed(0)
    B, G = shape.prompts, shape.group_size
    mspec = ModelSpec(name=str(model_dir))
    policy = dropout_free_mode(load_model(model_dir, mspec, torch.device("cpu")))
    tok = load_tokenizer(model_dir, mspec)
    spec = GRPOSpec.model_validate({
        "kind": "grpo", "data": "tiny:arith", "rewards": ["math_answer"], "prompts_per_step": B, "group_size": G,
        "micro_batch_size": B * G, "sampling": {"max_new_tokens": shape.max_new_tokens, "temperature": 1.0},
        "loss": {"beta": 0.0, "aggregate": "token"}, "advantage": {"scale": "group"}, "lr": 1e-6,
        "max_grad_norm": 1.0, "weight_decay": 0.0,
    })
    sampling = rollout.SamplingParams.of(spec.sampling)
    optimizer = make_optimizer(policy, spec)
    guard = NanGuard("skip", 10)
    prompts = prompt_ids(tok, prompt_messages(shape, B * (steps + 1)))
    times, tokens = [], []
    before = rss_mib()
    for step in range(steps + 1):
        t0 = time.process_time()
        out = rollout.generate(policy, tok, prompts[step * B : (step + 1) * B], sampling, G,
                               rollout.seed_generator(0, step))
        R = torch.tensor([reward(t) for t in out.texts])
        exp = build_experience(policy, None, out, R, spec, sampling, _NoTimer())
        learner.update(policy, optimizer, exp, spec, guard, step, sampling.temperature, lambda s: spec.lr)
        times.append(time.process_time() - t0)
        tokens.append(int(out.completion_mask.sum()))
    return {"cpu": times[1:], "tokens": tokens[1:], "rss_before": before, "peak_rss": peak_rss_mib()}


class _NoTimer:
    def lap(self, name: str) -> None:
        pass


def worker(args: argparse.Namespace) -> None:
    shape = SHAPES[args.shape]
    run = run_trl if args.worker == "trl" else run_rlft
    print("RESULT " + json.dumps(run(shape, Path(args.model), args.steps)))


def spawn(framework: str, shape: str, model: Path, steps: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.vs_trl", "--worker", framework, "--shape", shape, "--model", str(model),
           "--steps", str(steps)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{framework} worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["a", "b", "both"], default="both")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="alternating TRL/rlft runs per framework")
    p.add_argument("--worker", choices=["trl", "rlft"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    try:
        import trl
    except ImportError:
        raise SystemExit("benchmarks/vs_trl.py needs `trl` importable (pip install trl in a separate venv)") from None
    from rich.console import Console
    from rich.table import Table

    table = Table(caption=f"GRPO step, TRL {trl.__version__} vs rlft, process CPU time, "
                          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.rounds} alternating "
                          f"runs x {args.steps} steps each")
    for col in ("shape", "framework", "CPU-s/step (median)", "min-max", "compl. tok/step", "tok/CPU-s",
                "peak RSS MiB", "RSS growth MiB", "rlft speed-up", "rlft peak RSS"):
        table.add_column(col, justify="left" if col in ("shape", "framework") else "right")
    shapes = ["a", "b"] if args.shape == "both" else [args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            model = save_model(SHAPES[name], Path(tmp) / name)
            runs: dict[str, list[dict[str, Any]]] = {"trl": [], "rlft": []}
            for _ in range(args.rounds):
                for framework in ("trl", "rlft"):
                    runs[framework].append(spawn(framework, name, model, args.steps))
            summary = {}
            for framework, rs in runs.items():
                cpu = [t for r in rs for t in r["cpu"]]
                toks = [t for r in rs for t in r["tokens"]]
                summary[framework] = (statistics.median(cpu), min(cpu), max(cpu), statistics.mean(toks),
                                      sum(toks) / sum(cpu), max(r["peak_rss"] for r in rs),
                                      max(r["peak_rss"] - r["rss_before"] for r in rs))
            for framework, s in summary.items():
                speed = summary["trl"][0] / s[0]
                mem = s[5] / summary["trl"][5]
                table.add_row(name, framework, f"{s[0]:.3f}", f"{s[1]:.2f}-{s[2]:.2f}", f"{s[3]:.0f}", f"{s[4]:,.0f}",
                              f"{s[5]:.0f}", f"{s[6]:.0f}", f"{speed:.2f}x" if framework == "rlft" else "",
                              f"{mem:.2f}x" if framework == "rlft" else "")
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
