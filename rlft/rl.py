"""What the policy-gradient stages (GRPO, PPO) share: prompt data and rewards, sampling and
scoring a generation round, the reference policy, the per-token policy loss from the loss core,
per-token rewards with the KL folded in, and the mini-batch/micro-batch update loop (`optimize`,
which takes each stage's loss as a callback).

ALGORITHMS.md sections 1, 2, 3, 4, 5. The update is exact under micro-batching: the
aggregation normaliser is computed once per optimizer step over the whole mini-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from rlft import advantages, data, losses, rollout
from rlft.alarms import AlarmMonitor, unparsed_stats
from rlft.faults import fault_active, fault_point
from rlft.models import load_model, reference_mode, trainable_named_params
from rlft.reward_runner import build_rewards
from rlft.stage_io import load_prompts
from rlft.training import NanGuard, apply_step, lr_at, set_lr


@dataclass(frozen=True)
class Experience:
    """A generation round ready for updates. N rows; tensors on the policy's device."""

    prompt_ids: Tensor  # (N, P) left-padded
    prompt_mask: Tensor  # (N, P)
    completion_ids: Tensor  # (N, T) right-padded
    mask: Tensor  # (N, T) counted tokens (truncated rows zeroed when they are masked out)
    advantages: Tensor  # (N,) per sequence, or (N, T) per token
    old_logp: Tensor | None  # (N, T); None = fully on-policy, use logp.detach() (ALGORITHMS.md §1)
    ref_logp: Tensor | None  # (N, T); None when the KL is not in the loss

    def rows(self, idx: Tensor) -> Experience:
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return replace(
            self,
            prompt_ids=self.prompt_ids[idx], prompt_mask=self.prompt_mask[idx],
            completion_ids=self.completion_ids[idx], mask=self.mask[idx],
            advantages=self.advantages[idx], old_logp=pick(self.old_logp), ref_logp=pick(self.ref_logp),
        )

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.prompt_ids, self.prompt_mask, self.completion_ids, self.mask


def policy_loss(logp: Tensor, exp: Experience, spec: Any, normalizer: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the step loss: clipped surrogate (+ beta * KL), aggregated.

    `spec` is the recipe's LossSpec. Returns the loss and summed (not averaged) statistics.
    On-policy (`exp.old_logp` None) old_logp is logp.detach() for the ratio and for the KL's
    importance weight alike: r = 1 in value, but its gradient (d r = d logp) still weights the KL,
    so the gradient equals the one with old_logp recomputed (ALGORITHMS.md §1, §3).
    """
    old_logp = exp.old_logp if exp.old_logp is not None else logp.detach()
    adv = exp.advantages
    if spec.ratio == "sequence":
        out = losses.gspo_loss(logp, old_logp, adv, exp.mask, spec.eps_low, spec.eps_high, spec.dual_clip)
        per_token = out.loss[:, None].expand_as(logp)
        clip_low, clip_high = (out.clipped_low[:, None] & exp.mask.bool()), (out.clipped_high[:, None] & exp.mask.bool())
    else:
        a = adv[:, None] if adv.dim() == 1 else adv
        out = losses.clipped_surrogate(logp, old_logp, a, spec.eps_low, spec.eps_high, spec.dual_clip)
        per_token = out.loss
        clip_low, clip_high = out.clipped_low & exp.mask.bool(), out.clipped_high & exp.mask.bool()
    counted = exp.mask.bool()
    stats = {"clip/low": clip_low.sum().float(), "clip/high": clip_high.sum().float(), "tokens": counted.sum().float()}
    if exp.ref_logp is not None and spec.beta > 0:
        is_old = old_logp if spec.importance_sampling_kl else None
        kl = losses.kl_penalty(logp, exp.ref_logp, spec.kl_estimator, old_logp=is_old)
        per_token = per_token + spec.beta * kl
        stats["kl"] = torch.where(counted, kl.detach(), 0.0).sum()
    return losses.aggregate(per_token, exp.mask, spec.aggregate, normalizer), stats


def update(
    policy: Any, optimizer: torch.optim.Optimizer, exp: Experience, spec: Any, guard: NanGuard,
    opt_step: int, temperature: float, lr_for: Callable[[int], float],
) -> list[dict[str, float]]:
    """Optimizer steps over one generation round: `mini_batches` per pass, `num_iterations` passes.

    `spec` is the stage spec (GRPOSpec). Returns one stats dict per optimizer step.
    """

    def loss_fn(micro: Experience, normalizer: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logp, ent = rollout.completion_logprobs(policy, micro.tensors(), temperature, with_entropy=True)
        loss, stats = policy_loss(logp, micro, spec.loss, normalizer)
        stats["entropy"] = torch.where(micro.mask.bool(), ent, 0.0).sum()
        return loss, stats

    params = list(trainable_named_params(policy).values())
    opt = Optimization(optimizer, params, guard, lr_for, spec.max_grad_norm)
    return optimize(exp, loss_fn, opt, spec, opt_step, getattr(spec, "num_iterations", 1))


LossFn = Callable[[Any, Tensor], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class Optimization:
    """What an optimizer step needs besides the batch: the optimizer, every parameter it updates
    (NaN-checked and norm-clipped together), the guard, the LR of 1-based step s, the clip norm,
    and per param group a factor on that LR (empty: every group at lr_for(s))."""

    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    guard: NanGuard
    lr_for: Callable[[int], float]
    max_grad_norm: float | None
    lr_scales: tuple[float, ...] = ()


def optimize(
    batch: Any, loss_fn: LossFn, opt: Optimization, spec: Any, opt_step: int, passes: int,
    keep_going: Callable[[list[dict[str, float]]], bool] | None = None,
) -> list[dict[str, float]]:
    """`passes` passes over a round's `batch`, each `spec.mini_batches` optimizer steps of
    `spec.micro_batch_size`-row micro-batches; the loss core of GRPO and PPO.

    `batch` has `.mask` (N, T) and `.rows(idx)` (an Experience, a PPO batch). `loss_fn(micro,
    normalizer)` returns the micro-batch's share of the step loss (`losses.aggregate` with the
    whole mini-batch's `normalizer`, so accumulation is exact) and summed stats: "tokens" (counted
    tokens) divides the others, except "loss/*" keys, which are already shares and are summed.
    After each pass, `keep_going(that pass's stats)` False ends the round (PPO's KL early stop).

    Returns:
        One stats dict per optimizer step taken.
    """
    # dynamic sampling may leave fewer rows than planned: split as evenly as possible
    n = batch.mask.shape[0]
    minis = [m for m in torch.arange(n, device=batch.mask.device).tensor_split(spec.mini_batches) if len(m)]
    max_len = spec.loss.max_len or spec.sampling.max_new_tokens
    out: list[dict[str, float]] = []
    for _ in range(passes):
        done = []
        for rows in minis:
            mini = batch.rows(rows)
            normalizer = losses.aggregation_normalizer(mini.mask, spec.loss.aggregate, max_len)
            opt_step += 1
            done.append(_accumulate_and_step(mini, loss_fn, opt, normalizer, spec.micro_batch_size, opt_step))
        out += done
        if keep_going is not None and not keep_going(done):
            break
    return out


def _accumulate_and_step(
    mini: Any, loss_fn: LossFn, opt: Optimization, normalizer: Tensor, micro_batch_size: int, opt_step: int,
) -> dict[str, float]:
    set_lr(opt.optimizer, opt.lr_for(opt_step))
    for group, scale in zip(opt.optimizer.param_groups, opt.lr_scales, strict=False):
        group["lr"] *= scale
    size = mini.mask.shape[0]
    sums: dict[str, Tensor] = {}
    total = torch.zeros((), device=mini.mask.device)
    for s in range(0, size, micro_batch_size):
        micro = mini.rows(torch.arange(s, min(s + micro_batch_size, size), device=mini.mask.device))
        loss, stats = loss_fn(micro, normalizer)
        if fault_active("nan_loss", opt_step):
            loss = loss * float("nan")
        loss.backward()
        total += loss.detach()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        fault_point("micro_batch", opt_step)  # tests: die with gradients half accumulated
    return _optimizer_step(opt.optimizer, opt.params, total, sums, opt.guard, opt.max_grad_norm, opt_step)


def _optimizer_step(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], total: Tensor, sums: dict[str, Tensor],
    guard: NanGuard, max_grad_norm: float | None, opt_step: int,
) -> dict[str, float]:
    tokens = float(sums.pop("tokens").clamp(min=1))
    stats = {k: float(v) if k.startswith("loss/") else float(v) / tokens for k, v in sums.items()}
    lr = optimizer.param_groups[0]["lr"]
    grad_norm = apply_step(optimizer, params, total, guard, max_grad_norm, opt_step)
    if grad_norm is None:
        return {"loss/policy": float("nan"), "skipped": guard.skipped}
    return {"loss/policy": float(total), "grad_norm": grad_norm, "lr": lr, "skipped": guard.skipped, **stats}


@torch.no_grad()
def logprobs_of(model: Any, exp_tensors: tuple[Tensor, ...], temperature: float, micro_batch_size: int) -> Tensor:
    """(N, T) log-probs without a graph (old_logp before the first update, ref_logp)."""
    return rollout.completion_logprobs(model, exp_tensors, temperature, micro_batch_size=micro_batch_size)


def select_groups(out: rollout.Rollouts, keep: Tensor, group_size: int) -> rollout.Rollouts:
    """The rows of the groups where `keep` (B,) is True, in order."""
    rows = keep.repeat_interleave(group_size).nonzero().squeeze(1)
    texts = [out.texts[i] for i in rows.tolist()]
    return rollout.Rollouts(
        out.prompt_ids[rows], out.prompt_mask[rows], out.completion_ids[rows], out.completion_mask[rows],
        out.sample_logp[rows], out.truncated[rows], texts, out.group_index[rows],
    )


def concat_rollouts(parts: list[rollout.Rollouts], pad_id: int) -> rollout.Rollouts:
    """One Rollouts from several: prompts re-left-padded, completions re-right-padded."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_ids.shape[1] for p in parts)
    T = max(p.completion_ids.shape[1] for p in parts)
    left = lambda t, v: torch.nn.functional.pad(t, (P - t.shape[1], 0), value=v)  # noqa: E731
    right = lambda t, v: torch.nn.functional.pad(t, (0, T - t.shape[1]), value=v)  # noqa: E731
    offsets = torch.tensor([0] + [int(p.group_index.max()) + 1 if len(p.texts) else 0 for p in parts[:-1]]).cumsum(0)
    return rollout.Rollouts(
        torch.cat([left(p.prompt_ids, pad_id) for p in parts]),
        torch.cat([left(p.prompt_mask, 0) for p in parts]),
        torch.cat([right(p.completion_ids, pad_id) for p in parts]),
        torch.cat([right(p.completion_mask, 0) for p in parts]),
        torch.cat([right(p.sample_logp, 0.0) for p in parts]),
        torch.cat([p.truncated for p in parts]),
        [t for p in parts for t in p.texts],
        torch.cat([p.group_index + int(o) for p, o in zip(parts, offsets, strict=True)]),
    )


# --------------------------------------------------------------------------- a generation round


@dataclass(frozen=True)
class Round:
    """The sampled, scored completions of one generation round (after any dynamic-sampling filter)."""

    out: rollout.Rollouts  # N = B*G rows
    rewards: Tensor  # (N,) summed reward of each completion
    stats: dict[str, float]  # round_stats of the first sampling round, dynamic/*
    rows: list[Any]  # the B prompt examples, in order


def sample_round(
    policy: Any, tokenizer: Any, loader: Any, score: Any, spec: Any,
    sampling: rollout.SamplingParams, seed: int, step: int, timer: Any,
) -> Round:
    """Sample G completions for each of B prompts and score them.

    With dynamic sampling (DAPO, `spec.dynamic_sampling`), groups whose G rewards are all equal
    are dropped and more prompts are sampled, up to `max_rounds` rounds, until B groups carry a
    signal. Randomness comes from `rollout.seed_generator(seed, step, round)` only, so a resumed
    run replays a round bitwise.
    """
    G, B = spec.group_size, spec.prompts_per_step
    dynamic = getattr(spec, "dynamic_sampling", None)
    dynamic = dynamic if dynamic is not None and dynamic.enabled else None
    parts, totals, rows, stats = [], [], [], {}
    rounds = dynamic.max_rounds if dynamic else 1
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
        if dynamic:
            keep = ~advantages.zero_variance_groups(result.total, G).cpu()
            if not keep.any():
                if r < rounds - 1 or parts:
                    continue  # no signal in this round: sample more, or train on what we have
                keep = torch.ones(len(batch), dtype=torch.bool)  # nothing at all: advantages are 0
        parts.append(select_groups(out, keep.to(out.truncated.device), G))
        rows += [b for b, k in zip(batch, keep.tolist(), strict=True) if k]
        totals.append(result.total[keep.repeat_interleave(G).to(result.total.device)])
        if sum(len(p.texts) for p in parts) >= B * G:
            break
    out = concat_rollouts(parts, tokenizer.pad_token_id)
    n = min(len(out.texts), B * G)
    stats |= {"dynamic/rounds": r + 1, "dynamic/groups": n // G}
    out = select_groups(out, torch.arange(len(out.texts) // G) < n // G, G)
    R = torch.cat(totals)[:n].to(out.completion_ids.device)  # (N,)
    return Round(out, R, stats, rows[: n // G])


def round_stats(out: rollout.Rollouts, result: Any, G: int) -> dict[str, float]:
    """Reward and completion statistics of a generation round (before any filtering)."""
    R = result.total
    lengths = out.completion_mask.sum(-1).float()
    stats = {
        "reward/mean": float(R.mean()), "reward/std": float(R.std()) if R.numel() > 1 else 0.0,
        "reward/error_rate": float(result.error_rate),
        "completion/len_mean": float(lengths.mean()), "completion/len_max": float(lengths.max()),
        "completion/truncated": float(out.truncated.float().mean()),
    }
    if G >= 2:  # one completion per prompt (PPO's default) has no groups
        stats["groups/zero_variance"] = float(advantages.zero_variance_groups(R, G).float().mean())
    for name, values in result.per_function.items():
        stats[f"reward/{name}"] = float(values.float().nanmean())
    return stats


def mean_stats(updates: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over a round's optimizer steps; `skipped` is the running count."""
    keys = dict.fromkeys(k for u in updates for k in u if k != "skipped")  # first-seen order
    out = {k: sum(u[k] for u in updates if k in u) / max(1, sum(k in u for u in updates)) for k in keys}
    out["skipped"] = updates[-1]["skipped"] if updates else 0
    return out


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


def lr_fn(spec: Any, passes: int) -> Callable[[int], float]:
    """LR of 1-based optimizer step s; the schedule spans every optimizer step of the stage
    (steps * mini_batches * passes; with PPO's KL early stop it may end before its last step)."""
    total = spec.steps * spec.mini_batches * passes
    return lambda s: lr_at(s - 1, total, spec)


def token_rewards(rewards: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards of ALGORITHMS.md §2/§3 with the KL in the reward:

        rew_{i,t} = R_i * [t = last counted token of i] - beta * kl_{i,t}      (counted tokens; 0 elsewhere)

    Args:
        rewards: (N,) sequence rewards.
        kl: (N, T) per-token KL estimate (k1 = logp - ref_logp), or zeros.
        mask: (N, T) 1 for counted tokens.
        beta: KL coefficient.

    Returns:
        (N, T) float rewards.
    """
    counted = mask.bool()
    last = counted & (mask.long().cumsum(-1) == counted.sum(-1, keepdim=True))  # (N, T)
    kl_part = torch.where(counted, -beta * kl, torch.zeros_like(kl))
    return kl_part + torch.where(last, rewards[:, None].to(kl.dtype), 0.0)


def prompt_data(ctx: Any, tokenizer: Any) -> tuple[data.PromptLoader, list[data.PromptExample], dict[str, str]]:
    """The stage's prompt loader (data sets mixed by weight), its held-out prompts and data fingerprints."""
    spec = ctx.spec
    train, held_out, prints = load_prompts(ctx, spec.data, tokenizer)
    examples = train[0] if len(train) == 1 else data.mix(train, [d.weight for d in spec.data], ctx.seed)
    return data.PromptLoader(examples, spec.prompts_per_step, ctx.seed), held_out, prints


def reward_scorer(ctx: Any) -> Any:
    """The stage's summed, weighted reward functions (closed by the stage at its end)."""
    spec = ctx.spec
    return build_rewards(
        [e.model_dump() for e in spec.rewards], ctx.data_base_dir(), allow_code_exec_unsafe=spec.allow_unsafe_code_exec,
        timeout_s=spec.reward_timeout_s, max_error_rate=spec.max_reward_error_rate,
    )


class RoundLog:
    """Per-round logging both RL stages share: metrics.jsonl (every `log_every` rounds, the last
    one and every round with a held-out eval), samples.jsonl and held-out greedy accuracy at the
    start, every `eval_every` rounds and at the end. On a resume both files are cut back to the
    checkpoint's round."""

    def __init__(self, ctx: Any, policy: Any, tokenizer: Any, eval_prompts: list[data.PromptExample], start: int):
        from rlft.metrics import MetricsLog

        spec = ctx.spec
        self.spec, self.policy, self.tokenizer = spec, policy, tokenizer
        self.metrics = MetricsLog(ctx.stage_dir, start, every=spec.log_every)
        self.samples = MetricsLog(ctx.stage_dir, start, False, "samples.jsonl")
        self.alarms = AlarmMonitor(spec.alarms, ctx.stage, ctx.stage_dir, start)
        self.reward_names = [e.name for e in spec.rewards]
        self.held_out = eval_prompts[: spec.eval_samples]
        self.max_new = spec.eval_max_new_tokens or spec.sampling.max_new_tokens
        if start == 0:
            self.metrics.log(0, {"eval/accuracy": self.accuracy()})

    def accuracy(self) -> float | None:
        from rlft import evaluate

        return evaluate.task_accuracy(self.policy, self.tokenizer, self.held_out, self.max_new)

    def log(self, step: int, stats: dict[str, Any], rows: list[Any], texts: list[str]) -> None:
        """Record 0-based round `step` (logged as step + 1), with the first samples of the round."""
        spec = self.spec
        last = step + 1 == spec.steps
        evaluate = last or bool(spec.eval_every and (step + 1) % spec.eval_every == 0)
        if evaluate:
            stats["eval/accuracy"] = self.accuracy()
        stats |= unparsed_stats(self.reward_names, texts)
        self.metrics.log(step + 1, stats, force=evaluate)
        if self.metrics.history and self.metrics.history[-1]["step"] == step + 1:
            self.alarms.check(self.metrics.history)
        if step % spec.log_samples_every == 0:
            for row, text in zip(rows[:2], texts[:: spec.group_size][:2], strict=False):
                self.samples.log(step + 1, {"prompt": row.prompt_text, "completion": text, **row.columns})

    def stop_if_alarmed(self) -> None:
        """After the checkpoint: TrainingError (exit 4) when a `stop` alarm fired this round."""
        if self.alarms.stop is not None:
            self.close()
            self.alarms.raise_if_stopped()

    def close(self) -> list[dict[str, Any]]:
        self.metrics.close()
        self.samples.close()
        self.alarms.close()
        return self.metrics.history
