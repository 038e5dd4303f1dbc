"""GRPO with verifiable rewards on a LoRA policy (ALGORITHMS.md sections 1-6).

Each step is one generation round: B prompts, G completions each, rewards, group advantages,
then `mini_batches` optimizer steps per pass over the round, `num_iterations` passes (mu).
Departures from the paper, each an option or a documented choice:
1. Dropout is off for the whole stage (the policy stays in eval mode while gradients flow), so
   the first update's ratio is exactly 1 and old_logp may be logp.detach() when on-policy.
2. The reference policy is the parent model: the LoRA adapter disabled (no second copy); with
   beta = 0 no reference forward runs at all.
3. Checkpoints are taken at generation-round boundaries; a kill inside a round replays the
   round from its stateless per-(seed, step) sampling generator, bitwise.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from rlft import advantages, data, evaluate, rl, rollout, training
from rlft.checkpoint import GracefulExit
from rlft.faults import fault_point
from rlft.metrics import MetricsLog, StepTimer, progress
from rlft.models import load_model, load_policy, reference_mode
from rlft.rewards import build_rewards
from rlft.stage_io import StageOutput, finish_model, load_data


def run(ctx: Any) -> Any:
    """Train `ctx.spec` (a GRPOSpec) and return the stage's Artifact."""
    spec = ctx.spec
    policy, tokenizer = load_policy(ctx.parent().model, ctx.model_spec(), ctx.lora(), ctx.seed)
    policy.eval()  # departure 1: no dropout in RL
    reference = make_reference(policy, ctx)
    train_rows, eval_rows, prints = load_data(ctx, spec.data)
    rows = train_rows[0] if len(train_rows) == 1 else data.mix(train_rows, [d.weight for d in spec.data], ctx.seed)
    loader = data.PromptLoader(data.prompt_examples(rows, tokenizer, spec.data[0].system_prompt), spec.prompts_per_step, ctx.seed)
    score = build_rewards(
        [e.model_dump() for e in spec.rewards], ctx.data_base_dir(), allow_code_exec_unsafe=spec.allow_unsafe_code_exec,
        timeout_s=spec.reward_timeout_s, max_error_rate=spec.max_reward_error_rate,
    )
    optimizer = training.make_optimizer(policy, spec)
    guard = training.NanGuard(spec.nan_policy, spec.max_bad_steps)
    meta = ctx.input_meta(prints) | {"unsafe_code_exec": score.unsafe_code_exec}
    start, opt_step = 0, 0
    restored = training.restore_state(ctx.stage_dir, policy, optimizer, meta, ctx.force) if ctx.resume else None
    if restored is not None:
        start, state, _, meta["forced_overrides"] = restored
        loader.load_state_dict(state["loader"])
        guard.load_state_dict(state["guard"])
        opt_step = state["opt_step"]
    metrics, samples = MetricsLog(ctx.stage_dir, start), MetricsLog(ctx.stage_dir, start, False, "samples.jsonl")
    max_new = spec.eval_max_new_tokens or spec.sampling.max_new_tokens
    held_out, system = eval_rows[: spec.eval_samples], spec.data[0].system_prompt
    stop = GracefulExit()
    if start == 0:
        metrics.log(0, {"eval/accuracy": evaluate.task_accuracy(policy, tokenizer, held_out, max_new, system_prompt=system)})
    sampling = rollout.SamplingParams(**spec.sampling.model_dump() | {"stop": tuple(spec.sampling.stop)})
    for step in progress(range(start, spec.steps), spec.steps, f"grpo {ctx.stage}", start=start):
        timer = StepTimer()
        exp, stats, texts, batch = collect(policy, reference, tokenizer, loader, score, spec, sampling, ctx.seed, step, timer)
        updates = rl.update(policy, optimizer, exp, spec, guard, opt_step, sampling.temperature, lr_fn(spec))
        opt_step += len(updates)
        timer.lap("policy")
        stats |= _mean(updates) | timer.times | {"optimizer_steps": opt_step}
        if step + 1 == spec.steps or spec.eval_every and (step + 1) % spec.eval_every == 0:
            stats["eval/accuracy"] = evaluate.task_accuracy(policy, tokenizer, held_out, max_new, system_prompt=system)
        metrics.log(step + 1, stats)
        if step % spec.log_samples_every == 0:
            for b, text in zip(batch[:2], texts[:: spec.group_size][:2], strict=False):
                samples.log(step + 1, {"prompt": b.prompt_text, "completion": text, **b.columns})
        last = step + 1 == spec.steps
        if (step + 1) % spec.save_every == 0 or last or stop.should_stop():
            state = {"loader": loader.state_dict(), "guard": guard.state_dict(), "opt_step": opt_step}
            training.save_state(ctx.stage_dir, step + 1, policy, optimizer, state, meta, spec.keep_last)
        if stop.should_stop() and not last:
            stop.exit()
        fault_point("kill_step", step + 1)  # tests: die right after this step
    metrics.close()
    samples.close()
    score.close()
    return finish_model(ctx, policy, tokenizer, StageOutput.from_history(metrics.history, guard.skipped))


def lr_fn(spec: Any) -> Any:
    """LR of 1-based optimizer step s; the schedule spans every optimizer step of the stage."""
    total = spec.steps * spec.mini_batches * spec.num_iterations
    return lambda s: training.lr_at(s - 1, total, spec)


def make_reference(policy: Any, ctx: Any) -> Any:
    """pi_ref for the KL term: None when beta = 0; the adapter-disabled policy for LoRA;
    a frozen copy of the parent model for full fine-tuning."""
    if ctx.spec.loss.beta == 0:
        return None
    if ctx.lora() != "full":
        return lambda: reference_mode(policy)
    frozen = load_model(ctx.parent().model, ctx.model_spec(), next(policy.parameters()).device)
    frozen.eval().requires_grad_(False)
    return lambda: contextlib.nullcontext(frozen)


def collect(
    policy: Any, reference: Any, tokenizer: Any, loader: Any, score: Any, spec: Any,
    sampling: rollout.SamplingParams, seed: int, step: int, timer: StepTimer,
) -> tuple[rl.Experience, dict[str, float], list[str], list[Any]]:
    """Sample G completions per prompt, score them, and build the round's Experience.

    With dynamic sampling (DAPO), groups whose G rewards are all equal are dropped and more
    prompts are sampled, up to `max_rounds` rounds, until B groups carry a signal.
    """
    G, B = spec.group_size, spec.prompts_per_step
    parts, totals, rows, stats = [], [], [], {}
    rounds = spec.dynamic_sampling.max_rounds if spec.dynamic_sampling.enabled else 1
    for r in range(rounds):
        batch = next(loader)
        out = rollout.generate(policy, tokenizer, [b.prompt_ids for b in batch], sampling, G,
                               rollout.seed_generator(seed, step, r))
        timer.lap("generation")
        columns = {k: [b.columns.get(k) for b in batch for _ in range(G)] for k in batch[0].columns}
        columns["completion_tokens"] = out.completion_mask.sum(-1).tolist()
        result = score([b.prompt_text for b in batch for _ in range(G)], out.texts, columns)
        timer.lap("rewards")
        if r == 0:
            stats = round_stats(out, result, G)
        keep = torch.ones(len(batch), dtype=torch.bool)
        if spec.dynamic_sampling.enabled:
            keep = ~advantages.zero_variance_groups(result.total, G).cpu()
            if not keep.any():
                if r < rounds - 1 or parts:
                    continue  # no signal in this round: sample more, or train on what we have
                keep = torch.ones(len(batch), dtype=torch.bool)  # nothing at all: advantages are 0
        parts.append(rl.select_groups(out, keep.to(out.truncated.device), G))
        rows += [b for b, k in zip(batch, keep.tolist(), strict=True) if k]
        totals.append(result.total[keep.repeat_interleave(G).to(result.total.device)])
        if sum(len(p.texts) for p in parts) >= B * G:
            break
    out = rl.concat_rollouts(parts, tokenizer.pad_token_id)
    n = min(len(out.texts), B * G)
    stats |= {"dynamic/rounds": r + 1, "dynamic/groups": n // G}
    out = rl.select_groups(out, torch.arange(len(out.texts) // G) < n // G, G)
    R = torch.cat(totals)[:n].to(out.completion_ids.device)  # (N,)
    return build_experience(policy, reference, out, R, spec, sampling, timer), stats, out.texts, rows[: n // G]


def build_experience(
    policy: Any, reference: Any, out: rollout.Rollouts, R: torch.Tensor, spec: Any,
    sampling: rollout.SamplingParams, timer: StepTimer,
) -> rl.Experience:
    """old_logp (when off-policy), ref_logp (when beta > 0) and advantages for one round."""
    mask = out.completion_mask * (~out.truncated[:, None]) if spec.loss.mask_truncated else out.completion_mask
    tensors = (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)
    on_policy = spec.num_iterations == 1 and spec.mini_batches == 1 and spec.old_logp != "recompute"
    old_logp = None if on_policy else rl.logprobs_of(policy, tensors, sampling.temperature, spec.micro_batch_size)
    ref_logp = None
    if reference is not None:
        with reference() as ref_model:
            ref_logp = rl.logprobs_of(ref_model, tensors, sampling.temperature, spec.micro_batch_size)
    timer.lap("reference")
    kl_tok = torch.zeros_like(mask, dtype=torch.float32)
    if ref_logp is not None and spec.loss.kl_in == "reward":
        behaviour = old_logp if old_logp is not None else rl.logprobs_of(
            policy, tensors, sampling.temperature, spec.micro_batch_size)
        kl_tok = torch.where(mask.bool(), behaviour - ref_logp, 0.0)  # k1 per token
    adv = advantages_for(R, kl_tok, mask, spec)
    ref_in_loss = ref_logp if spec.loss.kl_in == "loss" else None
    return rl.Experience(out.prompt_ids, out.prompt_mask, out.completion_ids, mask, adv, old_logp, ref_in_loss)


def advantages_for(R: torch.Tensor, kl_tok: torch.Tensor, mask: torch.Tensor, spec: Any) -> torch.Tensor:
    """(N,) or (N, T) advantages for the recipe's estimator; KL-in-reward folded in first."""
    a = spec.advantage
    if a.estimator == "reinforce_pp":
        return advantages.reinforce_pp(R, kl_tok, mask, spec.loss.beta)
    R = R - spec.loss.beta * kl_tok.sum(-1)
    if a.estimator == "rloo":
        return advantages.rloo(R, spec.group_size)
    return advantages.grouped(R, spec.group_size, a.scale, a.delta)


def round_stats(out: rollout.Rollouts, result: Any, G: int) -> dict[str, float]:
    """Reward and completion statistics of a generation round (before any filtering)."""
    R = result.total
    lengths = out.completion_mask.sum(-1).float()
    stats = {
        "reward/mean": float(R.mean()), "reward/std": float(R.std()) if R.numel() > 1 else 0.0,
        "reward/error_rate": float(result.error_rate),
        "completion/len_mean": float(lengths.mean()), "completion/len_max": float(lengths.max()),
        "completion/truncated": float(out.truncated.float().mean()),
        "groups/zero_variance": float(advantages.zero_variance_groups(R, G).float().mean()),
    }
    for name, values in result.per_function.items():
        stats[f"reward/{name}"] = float(values.float().nanmean())
    return stats


def _mean(updates: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for u in updates for k in u if k != "skipped"}
    out = {k: sum(u[k] for u in updates if k in u) / max(1, sum(k in u for u in updates)) for k in keys}
    out["skipped"] = updates[-1]["skipped"] if updates else 0
    return out
