# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""Logit-level kernels: chosen-token log-probs, entropy, distillation divergences (ALGORITHMS.md §1, §7).

These work on (N, T, V) logits. At a 150k vocabulary a full float32 log-softmax of a
(8, 1024) batch is ~5 GB, so `token_logprobs` and `entropy` process rows in chunks and never
keep a whole-batch (N, T, V) temporary; the distillation losses need both full distributions
(and the student's for backward) and do not chunk. Re-exported by `rlft.core.losses`.

Shape letters: N completions, T completion length, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_CHUNK_ROWS = 1024


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _row_chunks(logits: Tensor, chunk_rows: int | None) -> tuple[Tensor, list[tuple[int, int]]]:
    """(N*T, V) view of logits and the [start, stop) row ranges to process."""
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 or None, got {chunk_rows}")
    rows = logits.reshape(-1, logits.shape[-1])
    step = rows.shape[0] if chunk_rows is None else chunk_rows
    return rows, [(s, min(s + step, rows.shape[0])) for s in range(0, rows.shape[0], max(step, 1))]


def token_logprobs(
    logits: Tensor, ids: Tensor, temperature: float = 1.0, chunk_rows: int | None = DEFAULT_CHUNK_ROWS
) -> Tensor:
    """Log-probability of the chosen tokens, ALGORITHMS.md §1 (logp, old_logp, ref_logp).

        logp_{i,t} = z_{i,t,ids_{i,t}} - logsumexp_v z_{i,t,v},   z = logits / temperature

    Gathers the chosen logit and subtracts the logsumexp instead of materialising a full
    log-softmax; rows are processed `chunk_rows` at a time, so the largest temporary is
    (chunk_rows, V). Stable for huge logits (logsumexp shifts by the max).

    Args:
        logits: (N, T, V) next-token logits aligned with ids (logits[:, t] predicts ids[:, t]).
        ids: (N, T) chosen token ids.
        temperature: sampling temperature the log-probs should match.
        chunk_rows: rows of N*T per chunk; None for a single chunk.

    Returns:
        (N, T) log-probs in logits' dtype.

    Raises:
        ValueError: shape mismatch, temperature <= 0 or chunk_rows < 1.
    """
    _check_temperature(temperature)
    if ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"ids {tuple(ids.shape)} must match logits {tuple(logits.shape)} without the vocab dim"
        )
    rows, chunks = _row_chunks(logits, chunk_rows)
    flat_ids = ids.reshape(-1, 1).long()
    out: list[Tensor] = []
    for start, stop in chunks:
        z = rows[start:stop]
        if temperature != 1.0:
            z = z / temperature
        out.append(z.gather(-1, flat_ids[start:stop]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.cat(out).reshape(ids.shape) if out else logits.new_zeros(ids.shape)


def entropy(logits: Tensor, temperature: float = 1.0, chunk_rows: int | None = DEFAULT_CHUNK_ROWS) -> Tensor:
    """Per-token entropy of the next-token distribution.

        H_{i,t} = -sum_v p_v log p_v,   log p = log_softmax(logits / temperature)

    Written with log p (not logsumexp - sum p z) so huge logits do not cancel catastrophically.

    Args:
        logits: (N, T, V) logits.
        temperature: temperature applied before the softmax.
        chunk_rows: rows of N*T per chunk; None for a single chunk.

    Returns:
        (N, T) entropies in nats.

    Raises:
        ValueError: temperature <= 0 or chunk_rows < 1.
    """
    _check_temperature(temperature)
    rows, chunks = _row_chunks(logits, chunk_rows)
    out: list[Tensor] = []
    for start, stop in chunks:
        z = rows[start:stop]
        if temperature != 1.0:
            z = z / temperature
        logp = torch.log_softmax(z, dim=-1)
        out.append(-_xexpx_sum(logp))
    return torch.cat(out).reshape(logits.shape[:-1]) if out else logits.new_zeros(logits.shape[:-1])


def _xexpx_sum(logp: Tensor) -> Tensor:
    """sum_v exp(logp_v) * logp_v with 0 * log 0 = 0 (entries at -inf contribute nothing)."""
    return torch.where(logp > -math.inf, logp.exp() * logp, torch.zeros_like(logp)).sum(-1)


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(P || Q) = sum_v P_v (log P_v - log Q_v) over the last dim, with 0 * log 0 = 0."""
    terms = logp.exp() * (logp - logq)
    return torch.where(logp > -math.inf, terms, torch.zeros_like(terms)).sum(-1)


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ; logit distillation needs a shared tokenizer (fall back to sequence-level distillation)"
        )
    return (
        torch.log_softmax(student_logits / temperature, dim=-1),
        torch.log_softmax(teacher_logits / temperature, dim=-1),
    )


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token forward KL(teacher || student) at temperature T, ALGORITHMS.md §7.

        p = softmax(teacher / T),  q = softmax(student / T)
        L_{i,t} = T^2 * sum_v p_v (log p_v - log q_v)

    Mean-seeking: the student must cover every teacher mode (Hinton et al. 2015 KD).

    Args:
        student_logits: (N, T, V) student logits.
        teacher_logits: (N, T, V) teacher logits (usually computed under no_grad).
        temperature: softmax temperature T > 0; the T^2 keeps gradient scale independent of T.

    Returns:
        (N, T) per-token loss, unmasked (see `rlft.core.losses.aggregate`).

    Raises:
        ValueError: shapes differ or temperature <= 0.
    """
    logq, logp = _log_probs(student_logits, teacher_logits, temperature)
    return temperature**2 * _kl(logp, logq)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token reverse KL(student || teacher) at temperature T, ALGORITHMS.md §7.

        p = softmax(teacher / T),  q = softmax(student / T)
        L_{i,t} = T^2 * sum_v q_v (log q_v - log p_v)

    Mode-seeking: the student may drop teacher modes but is penalised for mass the teacher lacks.

    Args:
        student_logits: (N, T, V) student logits.
        teacher_logits: (N, T, V) teacher logits.
        temperature: softmax temperature T > 0.

    Returns:
        (N, T) per-token loss, unmasked.

    Raises:
        ValueError: shapes differ or temperature <= 0.
    """
    logq, logp = _log_probs(student_logits, teacher_logits, temperature)
    return temperature**2 * _kl(logq, logp)


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float = 1.0
) -> Tensor:
    """Per-token generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), ALGORITHMS.md §7.

        P = softmax(teacher / T)   (teacher, GKD's P)
        Q = softmax(student / T)   (student, GKD's Q)
        M = beta * P + (1 - beta) * Q
        L_{i,t} = T^2 * ( beta * KL(P || M) + (1 - beta) * KL(Q || M) )

    Limits: L / beta -> forward KL(P || Q) as beta -> 0 and L / (1 - beta) -> reverse
    KL(Q || P) as beta -> 1; at beta = 0 or 1 exactly L is identically 0, so those values are
    rejected (use `forward_kl` / `reverse_kl`). beta = 0.5 is the symmetric JSD.

    Args:
        student_logits: (N, T, V) student logits.
        teacher_logits: (N, T, V) teacher logits.
        beta: interpolation weight in (0, 1).
        temperature: softmax temperature T > 0.

    Returns:
        (N, T) per-token loss, unmasked.

    Raises:
        ValueError: beta outside (0, 1), shapes differ or temperature <= 0.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"distill.beta must be in (0, 1) for the generalised JSD, got {beta}; "
            "beta -> 0 approaches forward_kl and beta -> 1 reverse_kl, use those losses for the limits"
        )
    logq, logp = _log_probs(student_logits, teacher_logits, temperature)
    logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log1p(-beta)]), dim=0)
    return temperature**2 * (beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm))
