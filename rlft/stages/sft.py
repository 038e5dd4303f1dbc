# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""Supervised fine-tuning: cold start, retrain on sampled data, sequence-level distillation.

Departures from a plain loop, each for exactness:
1. The loss is the token mean over the WHOLE optimizer step (every micro-batch divides its
   summed token loss by the step's total count), so 1x8 and 8x1 micro-batches give the same
   update up to summation order (RELIABILITY.md test 13).
2. The LR is a pure function of the step, the data cursor and every RNG are checkpointed, so
   a resumed run is bitwise the uninterrupted one (test 1).
3. A NaN/Inf loss or gradient skips the step (counted, logged as NaN) or aborts (R6).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rlft import dist, evaluate, fsdp, training
from rlft.data.batch import SFTLoader
from rlft.metrics import MetricsLog
from rlft.models import load_named_policy, load_policy
from rlft.stage_io import StageOutput, finish_model, prepare_sft_data

if TYPE_CHECKING:
    from rlft.recipe.schema import SFTSpec
    from rlft.run import Artifact, RunContext


def run(ctx: RunContext[SFTSpec]) -> Artifact:
    """Train `ctx.spec` (an SFTSpec) and return the stage's Artifact."""
    spec = ctx.spec
    if spec.student is not None:  # a model of its own, e.g. a small student's baseline
        key = f"stages.{ctx.stage}.student"
        if not dist.is_main():  # rank 0 builds a tiny:<preset> student first; the others load it
            dist.barrier()
        policy, tokenizer = load_named_policy(spec.student, ctx.run_dir / "models", ctx.data_base_dir(), ctx.lora(), ctx.seed, key)
        if dist.is_main():
            dist.barrier()
    else:
        policy, tokenizer = load_policy(ctx.parent().model_source, ctx.model_spec(), ctx.lora(), ctx.seed)
    if fsdp.active(ctx.recipe.distributed.strategy):  # the frozen base of a LoRA model is sharded too
        policy = fsdp.shard(policy, spec.student or ctx.model_spec())
    train_ex, eval_ex, eval_prompts, fingerprints = prepare_sft_data(ctx, spec.data, tokenizer)
    # no micro_batch_size: one micro-batch per rank (the whole batch in one process)
    micro = spec.micro_batch_size or spec.batch_size // dist.world_size()
    loader = SFTLoader(train_ex, spec.batch_size, micro, seed=ctx.seed)
    total = spec.max_steps or max(1, math.ceil(spec.epochs * loader.steps_per_epoch))
    optimizer = training.make_optimizer(policy, spec)
    guard = training.NanGuard(spec.nan_policy, spec.max_bad_steps)
    meta = ctx.input_meta(fingerprints)
    start, _, _ = training.resume_stage(ctx, policy, optimizer, loader, guard, meta)
    metrics = MetricsLog(ctx.stage_dir, resume_step=start, every=spec.log_every)
    loop = training.StageLoop(start, total, f"sft {ctx.stage}", ctx.stage_dir, spec, policy, optimizer, meta,
                              state=lambda: {"loader": loader.state_dict(), "guard": guard.state_dict()})

    def evaluate_now(at: int) -> None:
        pad = tokenizer.pad_token_id
        values = {"eval/loss": evaluate.heldout_loss(policy, eval_ex, loader.micro_batch_size, pad)}
        acc = evaluate.task_accuracy(policy, tokenizer, eval_prompts, spec.eval_max_new_tokens)
        if acc is not None:
            values["eval/accuracy"] = acc
        metrics.log(at, values, force=True)

    if start == 0:
        evaluate_now(0)
    policy.train()
    for step in loop:
        training.set_lr(optimizer, training.lr_at(step, total, spec))
        stats = training.sft_step(policy, optimizer, next(loader), guard, spec.max_grad_norm, step + 1)
        last = loop.is_last(step)
        metrics.log(step + 1, stats | {"lr": optimizer.param_groups[0]["lr"]}, force=last)
        if last or spec.eval_every and (step + 1) % spec.eval_every == 0:
            evaluate_now(step + 1)  # before the loop saves: a resumed run never logs it twice
    metrics.close()
    return finish_model(ctx, policy, tokenizer, StageOutput.from_history(metrics.history, guard.skipped))
