# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""GRPO and PPO on several processes: what each rank computes of a generation round, and how the
ranks' shares become the one round a single process would have had.

- Sampling and scoring: each rank takes a contiguous share of the round's prompts (whole groups).
  Row r = b*G + g of the round draws its uniforms from the same generator stream as in one
  process (`prompt_generators`), so a prompt's completions do not depend on which rank samples
  it. The shares (token ids, rewards) are gathered on every rank, in prompt order
  (`gather_round`): advantages (`batch` scale and whitening included), dynamic sampling's kept
  groups and the round's metrics are then those of one process, on every rank.
- Forwards without a graph (old_logp, ref_logp, PPO's V_old): each rank computes a contiguous
  share of the rows and the results are gathered (`by_rows`).
- Updates: each mini-batch is the one-process mini-batch; each rank takes a contiguous share of
  its rows, the aggregation normaliser is that of the whole mini-batch, gradients and the loss
  are summed over ranks (`training.finish_step`; a sharded policy's gradients by the one
  reduce-scatter of `fsdp.accumulated`), and the step's summed statistics too (`reduce_stats`:
  sums, and max for `*_max`).

In one process every function here is the identity (or does what the caller did before).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from rlft import dist, rollout
from rlft.rewards.runner import RewardResult


def prompt_generators(generator: torch.Generator, n_prompts: int, group_size: int, steps: int) -> list[torch.Generator]:
    """One generator per prompt whose draws are the rows of prompt b in `generator`'s one draw of
    (n_prompts * group_size, steps) uniforms (`rollout.generate` with one generator): prompt b's
    generator starts where `generator` stands after b * group_size * steps uniforms."""
    out: list[torch.Generator] = []
    for _ in range(n_prompts):
        g = torch.Generator(device=generator.device)
        g.set_state(generator.get_state())
        out.append(g)
        torch.rand((group_size, steps), generator=generator, device=generator.device)  # skip prompt b's draws
    return out


def sampled_share(
    batch: Sequence[Any], generator: torch.Generator, group_size: int, steps: int,
    sample: Callable[[Sequence[Any], torch.Generator | list[torch.Generator]], tuple[rollout.Rollouts, RewardResult]],
    concat: Callable[[list[rollout.Rollouts]], rollout.Rollouts],
) -> tuple[rollout.Rollouts, RewardResult]:
    """`sample(batch, generator)` (sampled and scored completions of the round's prompts), each rank
    doing its contiguous share of the prompts, the shares gathered in prompt order on every rank."""
    if not dist.initialized():
        return sample(batch, generator)
    share = dist.shard(len(batch))
    gens = prompt_generators(generator, len(batch), group_size, steps)[share.start: share.stop]
    mine = sample(batch[share.start: share.stop], gens) if len(share) else None
    return gather_round(mine, concat)


def gather_round(
    mine: tuple[rollout.Rollouts, RewardResult] | None, concat: Callable[[list[rollout.Rollouts]], rollout.Rollouts],
) -> tuple[rollout.Rollouts, RewardResult]:
    """Every rank's (rollouts, rewards), in rank order, as one round (tensors on this rank's device)."""
    device = mine[0].completion_ids.device if mine is not None else None
    parts = [p for p in dist.gather_objects(None if mine is None else (_to_cpu(mine[0]), mine[1])) if p is not None]
    out = concat([o for o, _ in parts])
    if device is not None:
        out = _to(out, device)
    results = [r for _, r in parts]
    names = list(results[0].per_function)
    errors = {k: sum(r.errors.get(k, 0) for r in results) for k in names}
    n = sum(len(r.total) for r in results)
    return out, RewardResult(
        total=torch.cat([r.total for r in results]),
        per_function={k: torch.cat([r.per_function[k] for r in results]) for k in names},
        errors=errors,
        error_rate=sum(errors.values()) / max(1, n * len(names)),
        failed=torch.cat([r.failed for r in results]),
    )


def _to(out: rollout.Rollouts, device: torch.device) -> rollout.Rollouts:
    return rollout.Rollouts(
        out.prompt_ids.to(device), out.prompt_mask.to(device), out.completion_ids.to(device),
        out.completion_mask.to(device), out.sample_logp.to(device), out.truncated.to(device), out.texts,
        out.group_index.to(device),
    )


def _to_cpu(out: rollout.Rollouts) -> rollout.Rollouts:
    return _to(out, torch.device("cpu"))


def by_rows(fn: Callable[[tuple[Tensor, ...]], list[Tensor]], tensors: tuple[Tensor, ...]) -> list[Tensor]:
    """`fn(tensors)` for (N, ...) row tensors, each rank computing a contiguous share of the rows
    and every rank getting all N rows of each result (gathered in rank order)."""
    if not dist.initialized():
        return fn(tensors)
    share = dist.shard(tensors[0].shape[0])
    device = tensors[0].device
    mine = fn(tuple(t[share.start: share.stop] for t in tensors)) if len(share) else None
    parts = [p for p in dist.gather_objects(None if mine is None else [t.detach().cpu() for t in mine]) if p is not None]
    return [torch.cat([p[i] for p in parts]).to(device) for i in range(len(parts[0]))]


def reduce_stats(sums: dict[str, Tensor], max_suffix: str) -> dict[str, Tensor]:
    """An optimizer step's summed statistics over every rank: summed, `*{max_suffix}` keys by max
    (keys in first-seen order, rank by rank; a rank without rows this step adds nothing)."""
    if not dist.initialized():
        return sums
    device = next(iter(sums.values())).device if sums else torch.device("cpu")
    out: dict[str, Tensor] = {}
    for part in dist.gather_objects({k: v.detach().cpu() for k, v in sums.items()}):
        for k, v in part.items():
            if k not in out:
                out[k] = v
            else:
                out[k] = torch.maximum(out[k], v) if k.endswith(max_suffix) else out[k] + v
    return {k: v.to(device) for k, v in out.items()}
