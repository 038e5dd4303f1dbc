# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""The learner side of GRPO and PPO: a generation round as `Experience`, the per-token policy loss
from the loss core (clipped surrogate or GSPO, + beta * KL), per-token rewards with the KL folded
in, and the mini-batch x micro-batch update loop (`optimize`, which takes a stage's loss as a
callback: GRPO's `update` below, PPO's with its value loss).

ALGORITHMS.md sections 1, 3, 4. The update is exact under micro-batching: the aggregation
normaliser is computed once per optimizer step over the whole mini-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from rlft import dist, fsdp, rollout
from rlft.ckpt.faults import fault_point
from rlft.core import losses
from rlft.models import trainable_named_params
from rlft.recipe.schema import GRPOSpec, LossSpec, PPOSpec
from rlft.rl import shard
from rlft.training import NanGuard, backward_into, finish_step, lr_at, set_lr


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
    sample_logp: Tensor | None = None  # (N, T) the sampler's log-probs: mismatch metric, TIS (ALGORITHMS.md §10)

    def rows(self, idx: Tensor) -> Experience:
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        return replace(
            self,
            prompt_ids=self.prompt_ids[idx], prompt_mask=self.prompt_mask[idx],
            completion_ids=self.completion_ids[idx], mask=self.mask[idx],
            advantages=self.advantages[idx], old_logp=pick(self.old_logp), ref_logp=pick(self.ref_logp),
            sample_logp=pick(self.sample_logp),
        )

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.prompt_ids, self.prompt_mask, self.completion_ids, self.mask


def policy_loss(logp: Tensor, exp: Experience, spec: LossSpec, normalizer: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the step loss: clipped surrogate (+ beta * KL), aggregated.

    `spec` is the recipe's LossSpec. Returns the loss and summed (not averaged) statistics.
    On-policy (`exp.old_logp` None) old_logp is logp.detach() for the ratio and for the KL's
    importance weight alike: r = 1 in value, but its gradient (d r = d logp) still weights the KL,
    so the gradient equals the one with old_logp recomputed (ALGORITHMS.md §1, §3).

    With the sampler's log-probs s (`exp.sample_logp`) it reports how far sampler and trainer
    disagree on the sampled tokens, `mismatch/kl` (token mean of s - old_logp) and
    `mismatch/ratio_max` (max of exp(old_logp - s)), and with `spec.tis_cap` = C weights each
    token's clipped term by min(exp(old_logp - s), C), without gradient (ALGORITHMS.md §10).
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
    if exp.sample_logp is not None:
        log_w = torch.where(counted, old_logp.detach() - exp.sample_logp, 0.0)
        stats["mismatch/kl"] = -log_w.sum()
        stats["mismatch/ratio_max"] = torch.where(counted, log_w, -torch.inf).max().exp()
        if spec.tis_cap is not None:  # a per-token weight, so only on the token-level ratio (schema)
            per_token = per_token * log_w.exp().clamp(max=spec.tis_cap)
    if exp.ref_logp is not None and spec.beta > 0:
        is_old = old_logp if spec.importance_sampling_kl else None
        kl = losses.kl_penalty(logp, exp.ref_logp, spec.kl_estimator, old_logp=is_old)
        per_token = per_token + spec.beta * kl
        stats["kl"] = torch.where(counted, kl.detach(), 0.0).sum()
    return losses.aggregate(per_token, exp.mask, spec.aggregate, normalizer), stats


def update(
    policy: Any, optimizer: torch.optim.Optimizer, exp: Experience, spec: GRPOSpec, guard: NanGuard,
    opt_step: int, temperature: float, lr_for: Callable[[int], float],
) -> list[dict[str, float]]:
    """Optimizer steps over one generation round: `mini_batches` per pass, `num_iterations` passes.

    Returns one stats dict per optimizer step.
    """

    def loss_fn(micro: Experience, normalizer: Tensor) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        def share(rows: Tensor, logp: Tensor, ent: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
            part = micro.rows(rows)
            loss, stats = policy_loss(logp, part, spec.loss, normalizer)
            stats["entropy"] = torch.where(part.mask.bool(), ent if ent is not None else 0.0, 0.0).sum()
            return loss, stats

        # one share per length bucket, each backpropagated before the next is computed (less memory)
        return rollout.loss_by_bucket(policy, micro.tensors(), temperature, share, with_entropy=True)

    params = list(trainable_named_params(policy).values())
    opt = Optimization(optimizer, params, guard, lr_for, spec.max_grad_norm, sharded=policy)
    return optimize(exp, loss_fn, opt, spec, opt_step, spec.num_iterations)


Share = tuple[Tensor, dict[str, Tensor]]
LossFn = Callable[[Any, Tensor], Share | Iterator[Share]]
MAX_SUFFIX = "_max"  # statistics reduced by max over micro-batches and steps (not token means)


@dataclass(frozen=True)
class Optimization:
    """What an optimizer step needs besides the batch: the optimizer, every parameter it updates
    (NaN-checked and norm-clipped together), the guard, the LR of 1-based step s, the clip norm,
    per param group a factor on that LR (empty: every group at lr_for(s)), and the policy when it
    may be sharded (`fsdp.accumulated` runs each step's forwards and backwards)."""

    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    guard: NanGuard
    lr_for: Callable[[int], float]
    max_grad_norm: float | None
    lr_scales: tuple[float, ...] = ()
    sharded: Any = None


def optimize(
    batch: Any, loss_fn: LossFn, opt: Optimization, spec: GRPOSpec | PPOSpec, opt_step: int, passes: int,
    keep_going: Callable[[list[dict[str, float]]], bool] | None = None,
) -> list[dict[str, float]]:
    """`passes` passes over a round's `batch`, each `spec.mini_batches` optimizer steps of
    `spec.micro_batch_size`-row micro-batches; the loss core of GRPO and PPO.

    `batch` has `.mask` (N, T) and `.rows(idx)` (an Experience, a PPO batch). `loss_fn(micro,
    normalizer)` returns the micro-batch's share of the step loss (`losses.aggregate` with the
    whole mini-batch's `normalizer`, so accumulation is exact) and summed stats, or an iterator of
    such shares that sum to it, each backpropagated before the next is drawn (`rollout.loss_by_bucket`).
    Stats: "tokens" (counted tokens) divides the others, except "loss/*" keys, which are already
    shares and are summed, and "*_max" keys, reduced by max.
    After each pass, `keep_going(that pass's stats)` False ends the round (PPO's KL early stop).
    Under fsdp each step's forwards and backwards run in `fsdp.accumulated(opt.sharded)`.
    On several processes `batch` is the whole round on every rank; each rank takes a contiguous
    share of every mini-batch's rows (the normaliser stays the whole mini-batch's), and the step's
    gradients, loss and statistics are summed over ranks (`rlft/rl/shard.py`).

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
            normalizer = losses.aggregation_normalizer(batch.mask[rows], spec.loss.aggregate, max_len)
            share = dist.shard(len(rows))  # several processes: this rank's rows of the mini-batch
            mini = batch.rows(rows[share.start: share.stop])
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
    # fsdp: each rank runs as many forwards/backwards as its rows take, the gradients reduced at the end
    with fsdp.accumulated(opt.sharded):
        for s in range(0, size, micro_batch_size):
            micro = mini.rows(torch.arange(s, min(s + micro_batch_size, size), device=mini.mask.device))
            shares = loss_fn(micro, normalizer)
            for loss, stats in shares if isinstance(shares, Iterator) else [shares]:  # each backpropagated before the next
                backward_into(loss, total, opt_step)
                for k, v in stats.items():
                    sums[k] = torch.maximum(sums[k], v) if k.endswith(MAX_SUFFIX) and k in sums else sums.get(k, 0.0) + v
            fault_point("micro_batch", opt_step)  # tests: die with gradients half accumulated
    return _optimizer_step(opt.optimizer, opt.params, total, sums, opt.guard, opt.max_grad_norm, opt_step)


def _optimizer_step(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], total: Tensor, sums: dict[str, Tensor],
    guard: NanGuard, max_grad_norm: float | None, opt_step: int,
) -> dict[str, float]:
    sums = shard.reduce_stats(sums, MAX_SUFFIX)  # several processes: the whole mini-batch's sums
    n_tokens = sums.pop("tokens", torch.zeros(()))
    tokens = float(n_tokens.clamp(min=1))
    stats = {k: float(v) if k.startswith("loss/") or k.endswith(MAX_SUFFIX) else float(v) / tokens
             for k, v in sums.items()}
    lr = optimizer.param_groups[0]["lr"]
    step = finish_step(optimizer, params, total, guard, max_grad_norm, opt_step, n_tokens)  # sums grads over ranks
    if "grad_norm" not in step:
        return {"loss/policy": float("nan"), "skipped": guard.skipped}
    return {"loss/policy": step["loss"], "grad_norm": step["grad_norm"], "lr": lr, "skipped": guard.skipped, **stats}


@torch.no_grad()
def logprobs_of(model: Any, exp_tensors: tuple[Tensor, ...], temperature: float, micro_batch_size: int) -> Tensor:
    """(N, T) log-probs without a graph (old_logp before the first update, ref_logp); on several
    processes each rank computes a share of the rows (`shard.by_rows`)."""
    return shard.by_rows(lambda t: [rollout.completion_logprobs(model, t, temperature, micro_batch_size=micro_batch_size)],
                         exp_tensors)[0]


def mean_stats(updates: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over a round's optimizer steps; `skipped` is the running count."""
    keys = dict.fromkeys(k for u in updates for k in u if k != "skipped")  # first-seen order
    out = {k: max(u[k] for u in updates if k in u) if k.endswith(MAX_SUFFIX)
           else sum(u[k] for u in updates if k in u) / max(1, sum(k in u for u in updates)) for k in keys}
    out["skipped"] = updates[-1]["skipped"] if updates else 0
    return out


def lr_fn(spec: GRPOSpec | PPOSpec, passes: int) -> Callable[[int], float]:
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
