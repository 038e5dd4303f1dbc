"""What the policy-gradient stages (GRPO, PPO) share: rewards of a generation round, the
per-token policy loss from the loss core, and the mini-batch/micro-batch update.

ALGORITHMS.md sections 1, 3, 4, 5. The update is exact under micro-batching: the
aggregation normaliser is computed once per optimizer step over the whole mini-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from rlft import losses, rollout
from rlft.faults import fault_active
from rlft.models import trainable_named_params
from rlft.training import NanGuard, apply_step, set_lr


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
        is_old = exp.old_logp if spec.importance_sampling_kl and exp.old_logp is not None else None
        kl = losses.kl_penalty(logp, exp.ref_logp, spec.kl_estimator, old_logp=is_old)
        per_token = per_token + spec.beta * kl
        stats["kl"] = torch.where(counted, kl.detach(), 0.0).sum()
    return losses.aggregate(per_token, exp.mask, spec.aggregate, normalizer), stats


def update(
    policy: Any, optimizer: torch.optim.Optimizer, exp: Experience, spec: Any, guard: NanGuard,
    opt_step: int, temperature: float, lr_for: Callable[[int], float],
) -> list[dict[str, float]]:
    """Optimizer steps over one generation round: `mini_batches` per pass, `num_iterations` passes.

    `spec` is the stage spec (GRPOSpec/PPOSpec). Returns one stats dict per optimizer step.
    """
    # dynamic sampling may leave fewer rows than planned: split as evenly as possible
    minis = [m for m in torch.arange(exp.mask.shape[0], device=exp.mask.device).tensor_split(spec.mini_batches) if len(m)]
    params = list(trainable_named_params(policy).values())
    max_len = spec.loss.max_len or spec.sampling.max_new_tokens
    out = []
    for _ in range(getattr(spec, "num_iterations", 1)):
        for rows in minis:
            mini = exp.rows(rows)
            size = len(rows)
            normalizer = losses.aggregation_normalizer(mini.mask, spec.loss.aggregate, max_len)
            opt_step += 1
            set_lr(optimizer, lr_for(opt_step))
            sums: dict[str, Tensor] = {}
            total = torch.zeros((), device=exp.mask.device)
            for s in range(0, size, spec.micro_batch_size):
                micro = mini.rows(torch.arange(s, min(s + spec.micro_batch_size, size), device=exp.mask.device))
                logp, ent = rollout.completion_logprobs(policy, micro.tensors(), temperature, with_entropy=True)
                loss, stats = policy_loss(logp, micro, spec.loss, normalizer)
                if fault_active("nan_loss", opt_step):
                    loss = loss * float("nan")
                loss.backward()
                total += loss.detach()
                stats["entropy"] = torch.where(micro.mask.bool(), ent, 0.0).sum()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
            out.append(_optimizer_step(optimizer, params, total, sums, guard, spec.max_grad_norm, opt_step))
    return out


def _optimizer_step(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], total: Tensor, sums: dict[str, Tensor],
    guard: NanGuard, max_grad_norm: float | None, opt_step: int,
) -> dict[str, float]:
    tokens = float(sums.pop("tokens").clamp(min=1))
    stats = {f"{k}": float(v) / tokens for k, v in sums.items()}
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
