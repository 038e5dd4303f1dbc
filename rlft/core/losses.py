# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""Policy-loss kernels: PPO-clip, GSPO, KL penalties, value loss, aggregation (ALGORITHMS.md §1, §3-§5).

Every kernel is a pure function over tensors and scalars returning a per-token (N, T) or
per-sequence (N,) term; masking and reduction happen once, in `aggregate`, with a normaliser
computed over the whole accumulated batch so gradient accumulation is exact (§4).
Logit-level kernels (log-probs, entropy, distillation) live in `rlft.core.logits`.

Shape letters: N completions, T completion length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlft.core.logits import entropy, forward_kl, generalized_jsd, reverse_kl, token_logprobs

__all__ = [
    "MAX_LOG_RATIO",
    "AggregateMode",
    "ClipOutput",
    "KLEstimator",
    "aggregate",
    "aggregation_normalizer",
    "clipped_surrogate",
    "entropy",
    "forward_kl",
    "generalized_jsd",
    "gspo_loss",
    "gspo_sequence_ratio",
    "kl_penalty",
    "reverse_kl",
    "token_logprobs",
    "value_loss",
]

AggregateMode = Literal["sequence", "token", "constant"]
KLEstimator = Literal["k1", "k2", "k3"]

# |log ratio| above 20 (ratio e^20 ~ 5e8) only occurs at garbage positions such as padding; the
# clamp keeps exp() finite there, so a masked-out inf can never turn into a NaN gradient (0 * inf).
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class ClipOutput:
    """Result of a PPO-clip style kernel; all fields have the shape of the ratio, (N, T) or (N,).

    Attributes:
        loss: per-token (or per-sequence) loss, unmasked and unreduced.
        ratio: importance ratio r (token) or s (sequence).
        clipped_low: r < 1 - eps_low and the clipped term won the min (only possible for A < 0).
        clipped_high: r > 1 + eps_high and the clipped term won the min (only possible for A > 0).
        dual_clipped: A < 0 and the loss was capped at -c * A (all False without dual-clip).
    """

    loss: Tensor
    ratio: Tensor
    clipped_low: Tensor
    clipped_high: Tensor
    dual_clipped: Tensor


def _check_clip_args(eps_low: float, eps_high: float, dual_clip_c: float | None) -> None:
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(
            f"eps_low must be in [0, 1), got {eps_low}; the lower clip bound 1 - eps_low must be > 0"
        )
    if eps_high < 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if dual_clip_c is not None and not dual_clip_c > 1.0:
        raise ValueError(
            f"dual_clip_c must be > 1 (3 is typical), got {dual_clip_c}; use None to disable dual-clip"
        )


def _clip_from_log_ratio(
    log_ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float, dual_clip_c: float | None
) -> ClipOutput:
    """Shared body of the token (§1) and sequence (§5) clip: one formula, two ratio definitions."""
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    advantages = advantages.to(ratio.dtype)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clipped_won = clipped < unclipped
    clipped_low = clipped_won & (ratio < 1.0 - eps_low)
    clipped_high = clipped_won & (ratio > 1.0 + eps_high)
    if dual_clip_c is None:
        dual_clipped = torch.zeros_like(clipped_won)
    else:
        # Dual-clip (Ye et al. 2020): for A < 0, L = min(L_clip, -c * A).
        cap = -dual_clip_c * advantages
        dual_clipped = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_clipped, cap.expand_as(loss), loss)
    return ClipOutput(loss, ratio, clipped_low, clipped_high, dual_clipped)


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
) -> ClipOutput:
    """PPO-clip per-token loss with asymmetric bounds and optional dual-clip, ALGORITHMS.md §1.

        r = exp(logp - old_logp)
        L = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
        dual-clip (c > 1): L = min(L, -c * A)   where A < 0

    eps_low == eps_high is classic PPO; eps_high > eps_low is DAPO clip-higher. With
    old_logp = logp.detach() (one update per batch) r == 1 and the gradient is the plain
    policy gradient -A * grad(logp). The log-ratio is clamped to +-20 before exp (see MAX_LOG_RATIO).

    Shapes: logp, old_logp (N, T); advantages (N,), (N, 1) or (N, T) ((N,) is read as (N, 1)).

    Args:
        logp: log-probs of the sampled tokens under the current policy.
        old_logp: log-probs under the sampling policy pi_old (no gradient needed).
        advantages: per-sequence or per-token advantages.
        eps_low: lower clip width, ratio floor 1 - eps_low.
        eps_high: upper clip width, ratio ceiling 1 + eps_high.
        dual_clip_c: dual-clip constant c > 1, or None for no dual-clip.

    Returns:
        ClipOutput with (N, T) fields; no mask or reduction applied (see `aggregate`).

    Raises:
        ValueError: eps out of range, dual_clip_c <= 1, or advantages of an unusable shape.
    """
    _check_clip_args(eps_low, eps_high, dual_clip_c)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    if (
        advantages.dim() != 2
        or advantages.shape[0] != logp.shape[0]
        or advantages.shape[1] not in (1, logp.shape[1])
    ):
        raise ValueError(
            f"advantages must be (N,), (N, 1) or (N, T) with N={logp.shape[0]}, T={logp.shape[1]}; "
            f"got {tuple(advantages.shape)}"
        )
    return _clip_from_log_ratio(logp - old_logp, advantages, eps_low, eps_high, dual_clip_c)


def _sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """(1/|o_i|) sum_t m_{i,t} (logp - old_logp), (N,); 0 for a row with no counted token."""
    counted = mask.bool()
    diff = torch.where(counted, logp - old_logp, torch.zeros_like(logp))
    return diff.sum(-1) / counted.sum(-1).clamp_min(1).to(diff.dtype)


def gspo_sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO sequence-level importance ratio, ALGORITHMS.md §5 (Zheng et al. 2025).

        s_i = exp( (1/|o_i|) * sum_t m_{i,t} (logp_{i,t} - old_logp_{i,t}) )

    Differentiable through every counted token: ds_i/dlogp_{i,t} = s_i * m_{i,t} / |o_i|.
    A row with no counted token gets s = 1 and zero gradient.

    Args:
        logp: (N, T) current-policy log-probs.
        old_logp: (N, T) sampling-policy log-probs.
        mask: (N, T) 1 for counted completion tokens.

    Returns:
        (N,) sequence ratios.
    """
    return torch.exp(_sequence_log_ratio(logp, old_logp, mask).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
) -> ClipOutput:
    """GSPO per-sequence clipped loss, ALGORITHMS.md §5.

        s_i = gspo_sequence_ratio(logp, old_logp, mask)
        L_i = -min(s_i * A_i, clip(s_i, 1 - eps_low, 1 + eps_high) * A_i)

    The paper's objective is the mean of L_i over sequences: broadcast to tokens,
    `out.loss[:, None].expand_as(mask)`, and aggregate with mode "sequence". The paper uses
    far narrower clip widths than token-level PPO (3e-4 / 4e-4).

    Args:
        logp: (N, T) current-policy log-probs.
        old_logp: (N, T) sampling-policy log-probs.
        advantages: (N,) or (N, 1) per-sequence advantages.
        mask: (N, T) 1 for counted completion tokens.
        eps_low: lower clip width on s.
        eps_high: upper clip width on s.
        dual_clip_c: optional dual-clip constant c > 1.

    Returns:
        ClipOutput with (N,) fields.

    Raises:
        ValueError: bad eps/dual_clip_c or advantages that are not one value per sequence.
    """
    _check_clip_args(eps_low, eps_high, dual_clip_c)
    if advantages.numel() != logp.shape[0]:
        raise ValueError(
            f"GSPO needs one advantage per sequence, (N,) with N={logp.shape[0]}; got {tuple(advantages.shape)}"
        )
    log_s = _sequence_log_ratio(logp, old_logp, mask)
    return _clip_from_log_ratio(log_s, advantages.reshape(-1), eps_low, eps_high, dual_clip_c)


def kl_penalty(
    logp: Tensor, ref_logp: Tensor, estimator: KLEstimator, old_logp: Tensor | None = None
) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref), ALGORITHMS.md §3 (Schulman 2020).

        x  = ref_logp - logp
        k1 = -x
        k2 = x^2 / 2
        k3 = exp(x) - x - 1
        importance-weighted (old_logp given): k * r,  r = exp(logp - old_logp)

    k3 is GRPO's (unbiased, >= 0); k1 is PPO's in-reward penalty. Pass old_logp when the
    samples came from pi_old rather than pi_theta (mu > 1 updates per batch); r is not detached,
    so the gradient is that of the importance-sampled estimate. x and log r are clamped to +-20.

    Args:
        logp: (N, T) current-policy log-probs.
        ref_logp: (N, T) reference-policy log-probs.
        estimator: "k1", "k2" or "k3".
        old_logp: (N, T) sampling-policy log-probs, or None for no importance weighting.

    Returns:
        (N, T) per-token penalty, unmasked.

    Raises:
        ValueError: unknown estimator.
    """
    x = ref_logp - logp
    if estimator == "k1":
        kl = -x
    elif estimator == "k2":
        kl = 0.5 * x.square()
    elif estimator == "k3":
        x = x.clamp(max=MAX_LOG_RATIO)
        kl = torch.expm1(x) - x  # exp(x) - 1 - x without cancellation near x = 0
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of 'k1', 'k2', 'k3'")
    if old_logp is not None:
        kl = kl * torch.exp((logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    return kl


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, eps_v: float) -> Tensor:
    """Clipped value-head loss, ALGORITHMS.md §2.

        L_V = 0.5 * max( (V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2 )

    Args:
        values: (N, T) current value predictions V.
        old_values: (N, T) values recorded at sampling time V_old.
        returns: (N, T) GAE returns R.
        eps_v: clip width around V_old (>= 0).

    Returns:
        (N, T) per-token loss, unmasked.

    Raises:
        ValueError: eps_v < 0.
    """
    if eps_v < 0:
        raise ValueError(f"eps_v must be >= 0, got {eps_v}")
    clipped = old_values + (values - old_values).clamp(-eps_v, eps_v)
    return 0.5 * torch.maximum((values - returns).square(), (clipped - returns).square())


def aggregation_normalizer(mask: Tensor, mode: AggregateMode, max_len: int | None = None) -> Tensor:
    """Denominator of the loss reduction, ALGORITHMS.md §4; compute once per optimizer step.

        "sequence": B            (number of completions, rows of mask, all-masked rows included)
        "token":    sum_{i,t} m_{i,t}
        "constant": B * max_len

    Call it on the mask of the whole accumulated batch and pass the same value to `aggregate`
    for every micro-batch; then sum_k aggregate(micro_k) == aggregate(whole batch). The
    normaliser is additive, so summing it over the micro-batch masks gives the same value.
    Exact in float32 up to 2^24 tokens.

    Args:
        mask: (N, T) 1 for counted tokens (whole batch).
        mode: "sequence", "token" or "constant".
        max_len: the max completion length setting L_max; required for "constant".

    Returns:
        Scalar float32 tensor on mask's device.

    Raises:
        ValueError: unknown mode, or "constant" without a positive max_len.
    """
    if mode == "sequence":
        return torch.full((), float(mask.shape[0]), dtype=torch.float32, device=mask.device)
    if mode == "token":
        return mask.bool().sum().to(torch.float32)
    if mode == "constant":
        if max_len is None or max_len < 1:
            raise ValueError(
                f"aggregation mode 'constant' needs max_len >= 1 (the max completion length), got {max_len}"
            )
        return torch.full((), float(mask.shape[0] * max_len), dtype=torch.float32, device=mask.device)
    raise ValueError(f"unknown aggregation mode {mode!r}; choose one of 'sequence', 'token', 'constant'")


def aggregate(loss: Tensor, mask: Tensor, mode: AggregateMode, normalizer: Tensor | float) -> Tensor:
    """Reduce per-token losses to this micro-batch's share of the batch loss, ALGORITHMS.md §4.

        "sequence": (1/norm) * sum_i [ (1/max(|o_i|, 1)) * sum_t m_{i,t} L_{i,t} ]   norm = B
        "token":    (1/norm) * sum_{i,t} m_{i,t} L_{i,t}                          norm = sum m
        "constant": (1/norm) * sum_{i,t} m_{i,t} L_{i,t}                          norm = B * L_max

    The 1/|o_i| of "sequence" is row-local (exact on any micro-batch holding whole rows); the
    batch-level count is in `normalizer` (from `aggregation_normalizer` on the whole batch), so the
    micro-batch results SUM to the whole-batch loss: call backward on each, no extra scaling.
    Masked positions are selected out (never multiplied), so inf/NaN there cannot leak; a row
    with no counted token, or a normaliser of 0, contributes 0.

    Args:
        loss: (N, T) per-token loss.
        mask: (N, T) 1 for counted tokens.
        mode: "sequence", "token" or "constant".
        normalizer: whole-batch denominator for `mode`.

    Returns:
        Scalar tensor in loss's dtype.

    Raises:
        ValueError: unknown mode or mismatched shapes.
    """
    if loss.shape != mask.shape:
        raise ValueError(
            f"loss {tuple(loss.shape)} and mask {tuple(mask.shape)} must have the same (N, T) shape"
        )
    counted = mask.bool()
    kept = torch.where(counted, loss, torch.zeros_like(loss))
    if mode == "sequence":
        total = (kept.sum(-1) / counted.sum(-1).clamp_min(1).to(loss.dtype)).sum()
    elif mode in ("token", "constant"):
        total = kept.sum()
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose one of 'sequence', 'token', 'constant'")
    norm = torch.as_tensor(normalizer, dtype=loss.dtype, device=loss.device)
    return total / torch.where(norm > 0, norm, torch.ones_like(norm))
