# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""GRPO with verifiable rewards on a LoRA policy (ALGORITHMS.md sections 1-6).

Each step is one generation round: B prompts, G completions each, rewards, group advantages,
then `mini_batches` optimizer steps per pass over the round, `num_iterations` passes (mu).
Departures from the paper, each an option or a documented choice:
1. Dropout is off for the whole stage (the policy stays in eval mode while gradients flow, with
   `model.gradient_checkpointing` still in force: `models.dropout_free_mode`), so the first
   update's ratio is exactly 1 and old_logp may be logp.detach() when on-policy.
2. The reference policy is the parent model: the LoRA adapter disabled (no second copy); with
   beta = 0 no reference forward runs at all.
3. Checkpoints are taken at generation-round boundaries; a kill inside a round replays the
   round from its stateless per-(seed, step) sampling generator, bitwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from rlft import fsdp, rollout, training
from rlft.core import advantages
from rlft.metrics import StepTimer
from rlft.models import dropout_free_mode, load_policy
from rlft.rl import learner, rounds
from rlft.rl.rounds import make_reference
from rlft.stage_io import StageOutput, finish_model

if TYPE_CHECKING:
    from rlft.recipe.schema import GRPOSpec
    from rlft.run import Artifact, RunContext


def run(ctx: RunContext[GRPOSpec]) -> Artifact:
    """Train `ctx.spec` (a GRPOSpec) and return the stage's Artifact."""
    spec = ctx.spec
    policy, tokenizer = load_policy(ctx.parent().model_source, ctx.model_spec(), ctx.lora(), ctx.seed)
    dropout_free_mode(policy)  # departure 1: no dropout in RL
    if fsdp.active(ctx.recipe.distributed.strategy):  # lora: full (the recipe checks say so)
        policy = fsdp.shard(policy, ctx.model_spec())
    reference = make_reference(policy, ctx)
    loader, eval_rows, prints = rounds.prompt_data(ctx, tokenizer)
    score = rounds.reward_scorer(ctx)
    optimizer = training.make_optimizer(policy, spec)
    guard = training.NanGuard(spec.nan_policy, spec.max_bad_steps)
    meta = ctx.input_meta(prints) | {"unsafe_code_exec": score.unsafe_code_exec}
    start, state, _ = training.resume_stage(ctx, policy, optimizer, loader, guard, meta)
    opt_step = state.get("opt_step", 0)
    logs = rounds.RoundLog(ctx, policy, tokenizer, eval_rows, start)
    loop = training.StageLoop(
        start, spec.steps, f"grpo {ctx.stage}", ctx.stage_dir, spec, policy, optimizer, meta,
        state=lambda: {"loader": loader.state_dict(), "guard": guard.state_dict(), "opt_step": opt_step},
        halt=logs,
    )
    sampling = rollout.SamplingParams.of(spec.sampling)
    engine = rounds.sampling_engine(ctx)  # None: the built-in sampler
    for step in loop:
        timer = StepTimer()
        with fsdp.gathered(policy):  # fsdp: each rank samples and scores its share with the whole weights
            exp, stats, texts, batch = collect(policy, reference, tokenizer, loader, score, spec, sampling, ctx.seed,
                                               step, timer, engine)
        updates = learner.update(policy, optimizer, exp, spec, guard, opt_step, sampling.temperature, lr_fn(spec))
        opt_step += len(updates)
        timer.lap("policy")
        stats |= learner.mean_stats(updates) | timer.times | {"optimizer_steps": opt_step}
        logs.log(step, stats, batch, texts)
    history = logs.close()
    score.close()
    if engine is not None:
        engine.close()
    return finish_model(ctx, policy, tokenizer, StageOutput.from_history(history, guard.skipped))


def lr_fn(spec: GRPOSpec) -> Callable[[int], float]:
    """LR of 1-based optimizer step s; the schedule spans every optimizer step of the stage."""
    return learner.lr_fn(spec, spec.num_iterations)


def collect(
    policy: Any, reference: Any, tokenizer: Any, loader: Any, score: Any, spec: GRPOSpec,
    sampling: rollout.SamplingParams, seed: int, step: int, timer: StepTimer, engine: Any = None,
) -> tuple[learner.Experience, dict[str, float], list[str], list[Any]]:
    """Sample G completions per prompt, score them, and build the round's Experience.

    With dynamic sampling (DAPO), groups whose G rewards are all equal are dropped and more
    prompts are sampled, up to `max_rounds` rounds, until B groups carry a signal.
    """
    r = rounds.sample_round(policy, tokenizer, loader, score, spec, sampling, seed, step, timer, engine)
    return build_experience(policy, reference, r.out, r.rewards, spec, sampling, timer), r.stats, r.out.texts, r.rows


def build_experience(
    policy: Any, reference: Any, out: rollout.Rollouts, R: torch.Tensor, spec: GRPOSpec,
    sampling: rollout.SamplingParams, timer: StepTimer,
) -> learner.Experience:
    """old_logp (when off-policy), ref_logp (when beta > 0) and advantages for one round."""
    mask = out.completion_mask * (~out.truncated[:, None]) if spec.loss.mask_truncated else out.completion_mask
    tensors = (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)
    on_policy = spec.num_iterations == 1 and spec.mini_batches == 1 and spec.old_logp in ("auto", "detach")
    if spec.old_logp == "sampler":  # pi_old's log-probs as the sampler recorded them: no forward
        old_logp = torch.where(out.completion_mask.bool(), out.sample_logp, 0.0)
    elif on_policy:
        old_logp = None
    else:
        old_logp = learner.logprobs_of(policy, tensors, sampling.temperature, spec.micro_batch_size)
    ref_logp = None
    if reference is not None:
        with reference() as ref_model:
            ref_logp = learner.logprobs_of(ref_model, tensors, sampling.temperature, spec.micro_batch_size)
    timer.lap("reference")
    kl_tok = torch.zeros_like(mask, dtype=torch.float32)
    if ref_logp is not None and spec.loss.kl_in == "reward":
        behaviour = old_logp if old_logp is not None else learner.logprobs_of(
            policy, tensors, sampling.temperature, spec.micro_batch_size)
        kl_tok = torch.where(mask.bool(), behaviour - ref_logp, 0.0)  # k1 per token
    adv = advantages_for(R, kl_tok, mask, spec)
    ref_in_loss = ref_logp if spec.loss.kl_in == "loss" else None
    sample_logp = None if spec.old_logp == "sampler" else out.sample_logp
    return learner.Experience(out.prompt_ids, out.prompt_mask, out.completion_ids, mask, adv, old_logp, ref_in_loss,
                              sample_logp)


def advantages_for(R: torch.Tensor, kl_tok: torch.Tensor, mask: torch.Tensor, spec: GRPOSpec) -> torch.Tensor:
    """(N,) or (N, T) advantages for the recipe's estimator; KL-in-reward folded in first."""
    a = spec.advantage
    if a.estimator == "reinforce_pp":
        return advantages.reinforce_pp(R, kl_tok, mask, spec.loss.beta)
    shaped = R - spec.loss.beta * kl_tok.sum(-1)
    if a.estimator == "rloo":
        return advantages.rloo(shaped, spec.group_size)
    return advantages.grouped(shaped, spec.group_size, a.scale, a.delta)
