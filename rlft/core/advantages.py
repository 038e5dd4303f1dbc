# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""Advantage estimators and reward shaping, ALGORITHMS.md §2 and §6.

Rewards for a step are laid out (N,) = B groups of G consecutive completions of the same
prompt. Group-relative estimators (GRPO, Dr. GRPO, RLOO, process supervision) return exact
zeros for a group whose rewards are all equal, never NaN. Per-token estimators (REINFORCE++,
GAE) treat mask-0 positions as absent: they get 0 and are skipped by the reverse scan, so the
value after the last counted token is 0 and right padding is ignored.

Shape letters: B prompts, G group size, N = B*G completions, T completion length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

AdvantageScale = Literal["group", "batch", "none"]


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """(N,) rewards -> (B, G) float view, validating the layout."""
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2, got {group_size}: with one completion per prompt the group mean "
            "equals the reward and every advantage is 0; sample several completions per prompt"
        )
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D (N,) = B groups of G completions, got shape {tuple(rewards.shape)}"
        )
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards has N={rewards.shape[0]} entries, not a multiple of group_size={group_size}; "
            "rewards must be B groups of G consecutive completions"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    return rewards.reshape(-1, group_size)


def _all_equal(grouped: Tensor) -> Tensor:
    """(B, 1) True where every reward of the group is equal (then the exact advantage is 0)."""
    return (grouped == grouped[:, :1]).all(dim=1, keepdim=True)


def grouped(rewards: Tensor, group_size: int, scale: AdvantageScale = "group", delta: float = 1e-4) -> Tensor:
    """GRPO outcome-supervision advantages, ALGORITHMS.md §2 (Shao et al. 2024; Liu et al. 2025).

        "group": A_i = (R_i - mean_g R) / (std_g R + delta)     std_g: sample std of the group
        "batch": A_i = (R_i - mean_g R) / (std_all R + delta)   std_all: sample std over all N
        "none":  A_i =  R_i - mean_g R                          (Dr. GRPO)

    Every token of completion i gets A_i. A group with equal rewards gets exactly 0.

    Args:
        rewards: (N,) scalar rewards, B groups of G consecutive completions.
        group_size: G >= 2.
        scale: "group", "batch" or "none".
        delta: added to the std so a zero-variance scale gives no NaN.

    Returns:
        (N,) advantages.

    Raises:
        ValueError: group_size < 2, N not a multiple of G, or unknown scale.
    """
    r = _groups(rewards, group_size)  # (B, G)
    centred = torch.where(_all_equal(r), torch.zeros_like(r), r - r.mean(dim=1, keepdim=True))
    if scale == "group":
        return (centred / (r.std(dim=1, keepdim=True) + delta)).reshape(-1)
    if scale == "batch":
        return (centred / (r.std() + delta)).reshape(-1)
    if scale == "none":
        return centred.reshape(-1)
    raise ValueError(f"unknown advantage scale {scale!r}; choose one of 'group', 'batch', 'none'")


def rloo(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantages, ALGORITHMS.md §2 (Ahmadian et al. 2024).

        A_i = R_i - (1/(G-1)) * sum_{j != i} R_j

    Args:
        rewards: (N,) scalar rewards, B groups of G consecutive completions.
        group_size: G >= 2.

    Returns:
        (N,) advantages; exactly 0 for a group with equal rewards.

    Raises:
        ValueError: group_size < 2 or N not a multiple of G.
    """
    r = _groups(rewards, group_size)  # (B, G)
    loo_mean = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return torch.where(_all_equal(r), torch.zeros_like(r), r - loo_mean).reshape(-1)


def _last_counted(mask: Tensor) -> Tensor:
    """(N, T) bool, True at the last counted token of each row (none for an all-masked row)."""
    counted = mask.bool()
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(counted)
    last = torch.where(counted, pos, torch.full_like(pos, -1)).amax(dim=-1, keepdim=True)  # (N, 1)
    return counted & (pos == last)


def reinforce_pp(rewards: Tensor, kl: Tensor, mask: Tensor, beta: float, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ advantages, ALGORITHMS.md §2 (Hu 2025).

        rew_{i,t} = R_i * [t = last counted token of i] - beta * kl_{i,t}
        G_{i,t}   = sum_{l>=0} gamma^l rew_{i,t+l}        (over counted tokens)
        A         = whiten(G, mask)                        (mean/std over all counted tokens)

    Args:
        rewards: (N,) sequence rewards.
        kl: (N, T) per-token KL estimate, usually `kl_penalty(logp, ref_logp, "k1")`.
        mask: (N, T) 1 for counted completion tokens.
        beta: KL coefficient in the reward.
        gamma: discount (1.0 in the paper).

    Returns:
        (N, T) advantages, 0 at masked positions.

    Raises:
        ValueError: shape mismatch or gamma outside [0, 1].
    """
    if rewards.shape != (kl.shape[0],) or kl.shape != mask.shape:
        raise ValueError(
            f"rewards must be (N,) and kl, mask (N, T); got {tuple(rewards.shape)}, {tuple(kl.shape)}, "
            f"{tuple(mask.shape)}"
        )
    counted = mask.bool()
    token_rewards = torch.where(counted, -beta * kl, torch.zeros_like(kl))
    token_rewards = token_rewards + torch.where(_last_counted(mask), rewards[:, None].to(kl.dtype), 0.0)
    returns = gae(token_rewards, torch.zeros_like(token_rewards), mask, gamma, 1.0).advantages
    return whiten(returns, mask)


def process_supervision(
    step_rewards: Tensor, step_end: Tensor, mask: Tensor, group_size: int, delta: float = 1e-4
) -> Tensor:
    """GRPO process-supervision advantages, ALGORITHMS.md §2 (Shao et al. 2024, §4.1.3).

        r~ = (r - mean(R_g)) / (std(R_g) + delta)   R_g: every step reward of the group's G completions
        A_{i,t} = sum_{j: index(j) >= t} r~_i^{index(j)}

    Step rewards sit at the end token index(j) of each reasoning step. A group whose step
    rewards are all equal (or that has a single step) gets 0.

    Args:
        step_rewards: (N, T) reward of the step ending at each token (read only where step_end).
        step_end: (N, T) True at the last token of each step.
        mask: (N, T) 1 for counted completion tokens; step ends outside it are ignored.
        group_size: G >= 2 (rows are B groups of G consecutive completions).
        delta: added to the std.

    Returns:
        (N, T) advantages, 0 at masked positions and after a row's last step end.

    Raises:
        ValueError: shape mismatch, group_size < 2 or N not a multiple of G.
    """
    if not step_rewards.shape == step_end.shape == mask.shape:
        raise ValueError("step_rewards, step_end and mask must all be (N, T)")
    _groups(step_rewards.new_zeros(step_rewards.shape[0]), group_size)
    n, t = step_rewards.shape
    ends = (step_end.bool() & mask.bool()).reshape(-1, group_size * t)  # (B, G*T)
    r = step_rewards.reshape(-1, group_size * t)
    zero = torch.zeros_like(r)
    count = ends.sum(dim=1, keepdim=True).to(r.dtype)
    mean = torch.where(ends, r, zero).sum(dim=1, keepdim=True) / count.clamp_min(1)
    var = torch.where(ends, (r - mean).square(), zero).sum(dim=1, keepdim=True) / (count - 1).clamp_min(1)
    inf = torch.full_like(r, torch.inf)
    same = torch.where(ends, r, inf).amin(dim=1, keepdim=True) >= torch.where(ends, r, -inf).amax(
        dim=1, keepdim=True
    )
    normed = torch.where(ends & ~same, (r - mean) / (var.sqrt() + delta), zero).reshape(n, t)
    adv = normed.flip(-1).cumsum(-1).flip(-1)  # sum over step ends at or after t
    return torch.where(mask.bool(), adv, torch.zeros_like(adv))


@dataclass(frozen=True)
class GAEOutput:
    """Generalised advantage estimates; both (N, T), 0 at masked positions."""

    advantages: Tensor
    returns: Tensor


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> GAEOutput:
    """Generalised advantage estimation, ALGORITHMS.md §2 (Schulman et al. 2016).

        delta_t   = rew_t + gamma * V_{t+1} - V_t      (V after the last counted token = 0)
        A_t       = sum_{l>=0} (gamma * lam)^l delta_{t+l}
        returns_t = A_t + V_t

    t runs over counted tokens only: a masked position is skipped (its reward and value are
    ignored), so right padding and masked holes are both handled. A reverse scan over T with
    (N,) tensor ops; call under torch.no_grad() when values carry a graph you do not want.

    Args:
        rewards: (N, T) per-token rewards (sequence reward on the last token, minus any KL).
        values: (N, T) value-head predictions V_t.
        mask: (N, T) 1 for counted tokens.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        GAEOutput(advantages, returns), (N, T) each.

    Raises:
        ValueError: shapes differ or gamma/lam outside [0, 1].
    """
    if not rewards.shape == values.shape == mask.shape:
        raise ValueError(
            f"rewards, values and mask must be (N, T); got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    counted = mask.bool()
    next_value = rewards.new_zeros(rewards.shape[0])  # (N,)
    next_adv = rewards.new_zeros(rewards.shape[0])
    zeros = torch.zeros_like(next_adv)
    advs: list[torch.Tensor] = []
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = counted[:, t]
        adv = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv
        advs.append(torch.where(m, adv, zeros))
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    advantages = torch.stack(advs[::-1], dim=1) if advs else torch.zeros_like(rewards)
    returns = torch.where(counted, advantages + values, torch.zeros_like(values))
    return GAEOutput(advantages, returns)


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Whiten over counted tokens of the whole batch, ALGORITHMS.md §2.

        mean = sum(m x) / sum(m),  var = sum(m (x - mean)^2) / (sum(m) - 1)
        y    = (x - mean) / sqrt(var + eps)        at counted tokens, 0 elsewhere

    Exactly 0 when all counted values are equal or fewer than two tokens count.

    Args:
        x: (N, T) values, e.g. advantages.
        mask: (N, T) 1 for counted tokens.
        eps: added to the variance.

    Returns:
        (N, T) whitened values.
    """
    counted = mask.bool()
    zero = torch.zeros_like(x)
    count = counted.sum().to(x.dtype)
    mean = torch.where(counted, x, zero).sum() / count.clamp_min(1)
    var = torch.where(counted, (x - mean).square(), zero).sum() / (count - 1).clamp_min(1)
    inf = torch.full_like(x, torch.inf)
    same = torch.where(counted, x, inf).amin() >= torch.where(counted, x, -inf).amax()
    y = torch.where(counted & ~same, (x - mean) * torch.rsqrt(var + eps), zero)
    return y


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO soft overlong punishment, ALGORITHMS.md §6 (Yu et al. 2025).

        R_len = 0                                     L <= max_len - cache_len
              = ((max_len - cache_len) - L) / cache_len  max_len - cache_len < L <= max_len
              = -1                                    L > max_len

    Args:
        lengths: (N,) completion lengths in tokens.
        max_len: L_max, the max completion length.
        cache_len: L_cache, the width of the linear ramp, 1 <= cache_len <= max_len.

    Returns:
        (N,) float penalties in [-1, 0], added to the task reward.

    Raises:
        ValueError: cache_len outside [1, max_len].
    """
    if not 1 <= cache_len <= max_len:
        raise ValueError(f"cache_len must be in [1, max_len={max_len}], got {cache_len}")
    dtype = lengths.dtype if lengths.is_floating_point() else torch.get_default_dtype()
    over = (max_len - cache_len) - lengths.to(dtype)
    return (over / cache_len).clamp(-1.0, 0.0)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic sampling filter, ALGORITHMS.md §6: groups whose G rewards are all equal.

    Args:
        rewards: (N,) rewards, B groups of G consecutive completions.
        group_size: G >= 2.

    Returns:
        (B,) bool, True for groups that carry no learning signal (drop and resample them).

    Raises:
        ValueError: group_size < 2 or N not a multiple of G.
    """
    return _all_equal(_groups(rewards, group_size)).squeeze(1)
