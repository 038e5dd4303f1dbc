"""Float64 plain-loop re-computations of ALGORITHMS.md §1-§7, the oracle for the kernel tests.

Written from the formulas, not from the kernels: Python floats and `math`, one element at a
time, no vectorised tensor code. Inputs are tensors (converted with .tolist()); outputs are
float64 tensors so tests can compare with torch.testing.assert_close.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _lists(*tensors: Tensor) -> list:
    return [t.detach().double().tolist() for t in tensors]


def _out(values: list) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def _log_softmax(xs: list[float], temperature: float) -> list[float]:
    zs = [x / temperature for x in xs]
    lse = _logsumexp(zs)
    return [z - lse for z in zs]


# §1 log-probs and entropy ------------------------------------------------------------------


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    (lg,) = _lists(logits)
    idl = ids.tolist()
    out = []
    for n in range(len(lg)):
        row = []
        for t in range(len(lg[n])):
            row.append(_log_softmax(lg[n][t], temperature)[idl[n][t]])
        out.append(row)
    return _out(out)


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    (lg,) = _lists(logits)
    out = []
    for n in range(len(lg)):
        row = []
        for t in range(len(lg[n])):
            h = 0.0
            for lp in _log_softmax(lg[n][t], temperature):
                p = math.exp(lp)
                if p > 0:
                    h -= p * lp
            row.append(h)
        out.append(row)
    return _out(out)


# §1 PPO-clip ---------------------------------------------------------------------------------


def _clip_one(r: float, a: float, eps_low: float, eps_high: float, c: float | None) -> tuple:
    """(loss, clipped_low, clipped_high, dual_clipped) for one ratio and advantage."""
    unclipped = r * a
    clipped = min(max(r, 1 - eps_low), 1 + eps_high) * a
    loss = -min(unclipped, clipped)
    won = clipped < unclipped
    low, high, dual = won and r < 1 - eps_low, won and r > 1 + eps_high, False
    if c is not None and a < 0 and loss > -c * a:
        loss, dual = -c * a, True
    return loss, low, high, dual


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float,
    c: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns loss (N,T) and bool indicators low, high, dual."""
    lp, olp = _lists(logp, old_logp)
    adv = advantages.detach().double().reshape(len(lp), -1).tolist()
    loss, low, high, dual = [], [], [], []
    for n in range(len(lp)):
        rows = [[], [], [], []]
        for t in range(len(lp[n])):
            a = adv[n][0] if len(adv[n]) == 1 else adv[n][t]
            res = _clip_one(math.exp(lp[n][t] - olp[n][t]), a, eps_low, eps_high, c)
            for k in range(4):
                rows[k].append(res[k])
        loss.append(rows[0])
        low.append(rows[1])
        high.append(rows[2])
        dual.append(rows[3])
    return _out(loss), torch.tensor(low), torch.tensor(high), torch.tensor(dual)


# §5 GSPO -------------------------------------------------------------------------------------


def gspo(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor]:
    """Returns (s (N,), loss (N,))."""
    lp, olp, m = _lists(logp, old_logp, mask)
    adv = advantages.detach().double().reshape(-1).tolist()
    ratios, losses = [], []
    for n in range(len(lp)):
        total, count = 0.0, 0
        for t in range(len(lp[n])):
            if m[n][t]:
                total += lp[n][t] - olp[n][t]
                count += 1
        s = math.exp(total / count) if count else 1.0
        ratios.append(s)
        losses.append(_clip_one(s, adv[n], eps_low, eps_high, None)[0])
    return _out(ratios), _out(losses)


# §3 KL ---------------------------------------------------------------------------------------


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str, old_logp: Tensor | None = None) -> Tensor:
    lp, rlp = _lists(logp, ref_logp)
    olp = _lists(old_logp)[0] if old_logp is not None else None
    out = []
    for n in range(len(lp)):
        row = []
        for t in range(len(lp[n])):
            x = rlp[n][t] - lp[n][t]
            k = {"k1": -x, "k2": x * x / 2, "k3": math.exp(x) - x - 1}[estimator]
            if olp is not None:
                k *= math.exp(lp[n][t] - olp[n][t])
            row.append(k)
        out.append(row)
    return _out(out)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, eps_v: float) -> Tensor:
    v, vo, ret = _lists(values, old_values, returns)
    out = []
    for n in range(len(v)):
        row = []
        for t in range(len(v[n])):
            vc = min(max(v[n][t], vo[n][t] - eps_v), vo[n][t] + eps_v)
            row.append(0.5 * max((v[n][t] - ret[n][t]) ** 2, (vc - ret[n][t]) ** 2))
        out.append(row)
    return _out(out)


# §4 aggregation ------------------------------------------------------------------------------


def aggregate(loss: Tensor, mask: Tensor, mode: str, max_len: int | None = None) -> float:
    """The whole-batch scalar of ALGORITHMS.md §4 (B = number of completions = rows)."""
    lo, m = _lists(loss, mask)
    b = len(lo)
    if mode == "sequence":
        total = 0.0
        for n in range(b):
            length = sum(1 for t in range(len(lo[n])) if m[n][t])
            if length:
                total += sum(lo[n][t] for t in range(len(lo[n])) if m[n][t]) / length
        return total / b
    masked_sum, count = 0.0, 0
    for n in range(b):
        for t in range(len(lo[n])):
            if m[n][t]:
                masked_sum += lo[n][t]
                count += 1
    if mode == "token":
        return masked_sum / count if count else 0.0
    return masked_sum / (b * max_len)


# §2 advantages -------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _sample_std(xs: list[float]) -> float:
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def grouped(rewards: Tensor, group_size: int, scale: str, delta: float = 1e-4) -> Tensor:
    (r,) = _lists(rewards)
    out = []
    for start in range(0, len(r), group_size):
        group = r[start : start + group_size]
        mu = _mean(group)
        std = {"group": _sample_std(group), "batch": _sample_std(r), "none": None}[scale]
        for x in group:
            out.append(x - mu if std is None else (x - mu) / (std + delta))
    return _out(out)


def rloo(rewards: Tensor, group_size: int) -> Tensor:
    (r,) = _lists(rewards)
    out = []
    for start in range(0, len(r), group_size):
        group = r[start : start + group_size]
        for i, x in enumerate(group):
            others = [group[j] for j in range(group_size) if j != i]
            out.append(x - _mean(others))
    return _out(out)


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    xs, m = _lists(x, mask)
    vals = [xs[n][t] for n in range(len(xs)) for t in range(len(xs[n])) if m[n][t]]
    mu = _mean(vals) if vals else 0.0
    var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return _out(
        [
            [(xs[n][t] - mu) / math.sqrt(var + eps) if m[n][t] else 0.0 for t in range(len(xs[n]))]
            for n in range(len(xs))
        ]
    )


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Per row: the counted positions form the episode; V after the last one is 0."""
    rw, v, m = _lists(rewards, values, mask)
    adv_out, ret_out = [], []
    for n in range(len(rw)):
        steps = [t for t in range(len(rw[n])) if m[n][t]]
        deltas = []
        for k, t in enumerate(steps):
            v_next = v[n][steps[k + 1]] if k + 1 < len(steps) else 0.0
            deltas.append(rw[n][t] + gamma * v_next - v[n][t])
        adv_row, ret_row = [0.0] * len(rw[n]), [0.0] * len(rw[n])
        for k, t in enumerate(steps):
            a = sum((gamma * lam) ** l * deltas[k + l] for l in range(len(steps) - k))  # noqa: E741
            adv_row[t], ret_row[t] = a, a + v[n][t]
        adv_out.append(adv_row)
        ret_out.append(ret_row)
    return _out(adv_out), _out(ret_out)


def reinforce_pp(rewards: Tensor, kl: Tensor, mask: Tensor, beta: float, gamma: float = 1.0) -> Tensor:
    (r,) = _lists(rewards)
    k, m = _lists(kl, mask)
    returns = []
    for n in range(len(k)):
        steps = [t for t in range(len(k[n])) if m[n][t]]
        tok = {t: -beta * k[n][t] for t in steps}
        if steps:
            tok[steps[-1]] += r[n]
        row = [0.0] * len(k[n])
        for i, t in enumerate(steps):
            row[t] = sum(gamma ** (j - i) * tok[steps[j]] for j in range(i, len(steps)))
        returns.append(row)
    return whiten(_out(returns), mask)


def process_supervision(
    step_rewards: Tensor, step_end: Tensor, mask: Tensor, group_size: int, delta: float = 1e-4
) -> Tensor:
    sr, m = _lists(step_rewards, mask)
    ends = step_end.tolist()
    out = []
    for start in range(0, len(sr), group_size):
        rows = range(start, start + group_size)
        vals = [sr[n][t] for n in rows for t in range(len(sr[n])) if ends[n][t] and m[n][t]]
        mu = _mean(vals) if vals else 0.0
        std = _sample_std(vals) if len(vals) > 1 else 0.0
        for n in rows:
            normed = [
                (sr[n][t] - mu) / (std + delta) if ends[n][t] and m[n][t] else 0.0 for t in range(len(sr[n]))
            ]
            out.append([sum(normed[t:]) if m[n][t] else 0.0 for t in range(len(sr[n]))])
    return _out(out)


# §7 distillation -----------------------------------------------------------------------------


def _kl_lists(p: list[float], q_log: list[float], p_log: list[float]) -> float:
    return sum(pi * (lpi - lqi) for pi, lpi, lqi in zip(p, p_log, q_log, strict=True) if pi > 0)


def distill(
    student: Tensor, teacher: Tensor, kind: str, beta: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """kind: forward (KL(teacher||student)), reverse (KL(student||teacher)) or jsd (GKD, P = teacher)."""
    s_all, t_all = _lists(student, teacher)
    out = []
    for n in range(len(s_all)):
        row = []
        for t in range(len(s_all[n])):
            lq = _log_softmax(s_all[n][t], temperature)
            lp = _log_softmax(t_all[n][t], temperature)
            p, q = [math.exp(x) for x in lp], [math.exp(x) for x in lq]
            if kind == "forward":
                d = _kl_lists(p, lq, lp)
            elif kind == "reverse":
                d = _kl_lists(q, lp, lq)
            else:
                mix = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
                lm = [math.log(x) for x in mix]
                d = beta * _kl_lists(p, lm, lp) + (1 - beta) * _kl_lists(q, lm, lq)
            row.append(temperature**2 * d)
        out.append(row)
    return _out(out)


# §6 DAPO -------------------------------------------------------------------------------------


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    out = []
    for length in lengths.tolist():
        if length <= max_len - cache_len:
            out.append(0.0)
        elif length <= max_len:
            out.append(((max_len - cache_len) - length) / cache_len)
        else:
            out.append(-1.0)
    return _out(out)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    r = rewards.tolist()
    flags = []
    for start in range(0, len(r), group_size):
        group = r[start : start + group_size]
        flags.append(all(x == group[0] for x in group))
    return torch.tensor(flags)
