"""Batched sampling of G completions per prompt, and the training-time log-prob forward.

`generate` is the one entry point every sampling stage uses (GRPO/PPO rollouts, rejection
sampling, distillation), so a faster engine can replace it behind the same signature. It
records `sample_logp`, the log-prob of each sampled token under pi_old (ALGORITHMS.md §1);
`completion_logprobs` recomputes the same quantity with one full forward (logp, ref_logp).

Decode loop: the B distinct prompts are prefilled once (left-padded, position = cumsum(mask) - 1)
and the KV cache is expanded to the N = B*G rows; each step samples from float32 logits
(temperature, top-k, top-p) by inverse CDF with one pre-drawn uniform per (row, step), so a
row's random numbers never depend on how rows are batched. Rows stop at EOS or a stop string;
finished rows are dropped from the batch once a quarter of it is done.

Shape letters: B prompts, G group size, N = B*G completions, P prompt length, T completion
length, V vocabulary.
"""

from __future__ import annotations

import hashlib
import inspect
import struct
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from rlft.core.losses import entropy, token_logprobs
from rlft.errors import UserInputError

if TYPE_CHECKING:
    from rlft.recipe.schema import SamplingSpec


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled (the recipe's `sampling:` block).

    Attributes:
        temperature: softmax temperature; 0 = greedy (argmax).
        top_p: nucleus mass in (0, 1]; 1 = off.
        top_k: keep the k most likely tokens; 0 = off.
        max_new_tokens: longest completion, in tokens.
        stop: stop strings; a completion ends with the token that completes one, and the
            stop string is kept in `texts` (text after it in that token is cut).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if not self.temperature >= 0:
            problems.append(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"sampling.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            problems.append(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            problems.append("sampling.stop must not contain an empty string")
        if problems:
            raise UserInputError("; ".join(problems))

    @classmethod
    def of(cls, spec: SamplingSpec, **changes: Any) -> SamplingParams:
        """The recipe's `sampling:` block, with `changes` applied (e.g. `temperature=0.0`)."""
        params = cls(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                     max_new_tokens=spec.max_new_tokens, stop=tuple(spec.stop))
        return replace(params, **changes) if changes else params


@dataclass(frozen=True)
class Rollouts:
    """N = B*G sampled completions; completions of a prompt are consecutive rows.

    Attributes:
        prompt_ids: (N, P) prompts, left-padded with the pad id.
        prompt_mask: (N, P) 1 = real prompt token.
        completion_ids: (N, T) completions, right-padded with the pad id; T = longest completion.
        completion_mask: (N, T) 1 = generated token that counts (EOS included, padding not).
        sample_logp: (N, T) log-prob of each sampled token under the temperature-scaled
            distribution of the sampling policy (before top-k/top-p truncation; temperature 1
            for greedy), 0 on padding.
        truncated: (N,) bool, hit max_new_tokens without EOS or stop string.
        texts: decoded completions (special tokens skipped), stop string kept.
        group_index: (N,) prompt index of each completion.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    sample_logp: Tensor
    truncated: Tensor
    texts: list[str]
    group_index: Tensor


@dataclass(frozen=True)
class _Chunk:
    """Decode result of one micro-batch of n rows; ids/length/flags on the CPU."""

    ids: Tensor  # (n, max_new) pad after each row's length
    length: Tensor  # (n,) tokens that count, the ending EOS/stop token included
    logp: Tensor  # (n, max_new) on the model's device, 0 after length
    truncated: Tensor  # (n,) bool
    stopped: Tensor  # (n,) bool, ended by a stop string


def seed_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from a hash of (seed, *keys), independent of any RNG state.

    Call it as `seed_generator(run_seed, step, round)`: a resumed run re-creates exactly the
    generator the uninterrupted run used at that step, with no state to save.

    Args:
        seed: the run's seed.
        *keys: integers naming the draw (step, sampling round, ...).

    Returns:
        A freshly seeded `torch.Generator` on the CPU.
    """
    packed = struct.pack(f"<{1 + len(keys)}q", seed, *keys)
    digest = hashlib.blake2b(packed, digest_size=8, person=b"rlft-rollout").digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def generate(
    policy: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    sampling: SamplingParams,
    group_size: int,
    generator: torch.Generator | Sequence[torch.Generator],
    micro_batch_size: int | None = None,
) -> Rollouts:
    """Sample `group_size` completions for each prompt with a KV-cached decode loop.

    The model runs in eval mode under `torch.inference_mode()`; every module's train/eval
    flag is restored afterwards. All randomness comes from `generator`: one uniform per
    (row, step) is drawn up front, row r = b*G + g, so row r's draws depend only on the
    generator's state and (N, max_new_tokens), never on micro-batching.

    Determinism: the result is a function of (generator state, prompt_ids, sampling,
    group_size, model weights, tokenizer) and, through floating-point rounding only, of
    micro_batch_size, device and thread count: micro-batching changes the batch size and
    padding width a row is computed with, which can move logits by ~1 ulp and flip a sample
    whose uniform lies within that of a CDF boundary (or an argmax near-tie). Same inputs,
    same micro_batch_size, same machine -> bitwise identical Rollouts.

    Args:
        policy: a causal LM (plain HF or peft-wrapped) accepting position_ids and a KV cache.
        tokenizer: its tokenizer; `eos_token_id` and any id in the model's
            `generation_config.eos_token_id` end a completion; `pad_token_id` (else EOS) pads.
        prompt_ids: B prompts as token-id lists (no padding).
        sampling: temperature, top-k, top-p, max_new_tokens, stop strings.
        group_size: G completions per prompt.
        generator: source of all randomness (CPU or the model's device), or one generator per
            prompt (rejection sampling: per-prompt seeds make the output independent of batching).
        micro_batch_size: rows decoded at once; None = all N.

    Returns:
        Rollouts of N = B*G rows, tensors on the model's device.

    Raises:
        ValueError: empty prompts, group_size < 1 or micro_batch_size < 1.
    """
    _check_args(prompt_ids, group_size, micro_batch_size)
    device = next(policy.parameters()).device
    eos = torch.tensor(_eos_ids(policy, tokenizer), dtype=torch.long, device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos[0]) if len(eos) else 0
    n_rows = len(prompt_ids) * group_size
    group_index = torch.arange(len(prompt_ids), device=device).repeat_interleave(group_size)  # (N,)
    uniforms = _uniforms(generator, len(prompt_ids), group_size, sampling.max_new_tokens).to(device)  # (N, T_max)
    step = micro_batch_size or n_rows
    stopper = _StopChecker(tokenizer, sampling.stop) if sampling.stop else None
    modes = [m.training for m in policy.modules()]
    policy.eval()
    try:
        with torch.inference_mode():
            chunks = [
                _decode_chunk(policy, prompt_ids, group_index[s : s + step], uniforms[s : s + step],
                              sampling, eos, pad_id, stopper)
                for s in range(0, n_rows, step)
            ]
    finally:
        for module, mode in zip(policy.modules(), modes, strict=True):
            module.training = mode
    return _assemble(chunks, prompt_ids, group_index, tokenizer, sampling.stop, pad_id)


def _uniforms(generator: torch.Generator | Sequence[torch.Generator], n_prompts: int, group_size: int,
              steps: int) -> Tensor:
    """One uniform per (row, step): from one generator, or one generator per prompt (then a
    prompt's samples do not depend on which other prompts share its batch)."""
    if isinstance(generator, torch.Generator):
        one: torch.Generator = generator
        return torch.rand((n_prompts * group_size, steps), generator=one, device=one.device)
    if len(generator) != n_prompts:
        raise ValueError(f"got {len(generator)} generators for {n_prompts} prompts")
    return torch.cat([torch.rand((group_size, steps), generator=g, device=g.device) for g in generator])


def _check_args(prompt_ids: list[list[int]], group_size: int, micro_batch_size: int | None) -> None:
    if not prompt_ids:
        raise ValueError("generate() needs at least one prompt")
    empty = [i for i, p in enumerate(prompt_ids) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty[:5]} are empty; every prompt needs at least one token")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")


def _eos_ids(policy: Any, tokenizer: Any) -> list[int]:
    """Tokenizer EOS plus every id in the model's generation_config.eos_token_id."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config = getattr(policy, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys(ids))


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: Tensor) -> Tensor:
    """position = cumsum(mask) - 1 (padding clamped to 0), so left padding shifts nothing."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _forward_params(model: Any) -> Any:
    """The keyword parameters of the (peft-unwrapped) causal LM's forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def _logits_kwargs(model: Any, keep: int) -> dict[str, int]:
    """`logits_to_keep=keep` when the model supports it: skips the LM head on positions not needed."""
    return {"logits_to_keep": keep} if "logits_to_keep" in _forward_params(model) else {}


def cache_keyword(model: Any) -> str:
    """The name of the KV-cache argument of the model's forward and field of its output.

    transformers 5.x calls it `cache` (`past_key_values` still works but warns, to be removed in
    5.40); 4.x calls it `past_key_values`. The cache object (a DynamicCache) is the same.
    """
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _prefill(
    policy: Any, prompts: list[list[int]], groups: Tensor, pad_id: int, max_new: int
) -> tuple[Any, Tensor, Tensor, Tensor]:
    """Run the chunk's distinct prompts once and expand the KV cache to its n rows.

    Returns the cache, the first logits (n, V) in float32, the attention mask (n, P + max_new)
    and the position of each row's first completion token (n,).
    """
    first = int(groups[0])
    local = groups - first  # (n,) row -> prompt within this chunk
    ids, mask = _left_pad(prompts[first : int(groups[-1]) + 1], pad_id, groups.device)
    out = policy(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                 **_logits_kwargs(policy, 1))
    cache = getattr(out, cache_keyword(policy))
    cache.batch_select_indices(local)  # repeated indices: prompt b's keys/values copied to its G rows
    attn = torch.cat([mask[local], mask.new_ones(len(groups), max_new)], dim=1)
    return cache, out.logits[local, -1].float(), attn, mask.sum(-1)[local]


def _decode_chunk(
    policy: Any,
    prompts: list[list[int]],
    groups: Tensor,
    uniforms: Tensor,
    sampling: SamplingParams,
    eos: Tensor,
    pad_id: int,
    stopper: _StopChecker | None,
) -> _Chunk:
    """Decode one micro-batch of rows. Device tensors are indexed by batch row; `active_h` maps
    batch rows to chunk rows, whose tokens and flags live on the host (one copy per step)."""
    n, max_new = len(groups), sampling.max_new_tokens
    cache, logits, attn, pos = _prefill(policy, prompts, groups, pad_id, max_new)
    cache_kw = cache_keyword(policy)
    width, device = attn.shape[1] - max_new, attn.device
    can_end = stopper.table(logits.shape[-1], device) if stopper is not None else None
    logp = torch.zeros((n, max_new), device=device)
    tokens_h, length_h = torch.full((n, max_new), pad_id, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    ended_h, stopped_h = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    active, active_h = torch.arange(n, device=device), torch.arange(n)
    done = torch.zeros(n, dtype=torch.bool, device=device)  # per batch row
    for t in range(max_new):
        tok, lp = _sample(logits, uniforms[active, t], sampling)
        logp[active, t] = lp.masked_fill(done, 0.0)
        hit = ~done & torch.isin(tok, eos)
        cand = ~done & ~hit & can_end[tok] if can_end is not None else hit
        host = torch.stack([tok, hit.long(), cand.long(), done.long()]).cpu()  # the one host sync per step
        tok_h, hit_h, cand_h, done_h = host[0], host[1].bool(), host[2].bool(), host[3].bool()
        tokens_h[active_h[~done_h], t], length_h[active_h[~done_h]] = tok_h[~done_h], t + 1
        if stopper is not None and bool(cand_h.any()):
            stop_h = stopper.hits(tokens_h, active_h, cand_h, t)
            stopped_h[active_h] |= stop_h
            hit_h |= stop_h
        ended_h[active_h] |= hit_h
        done_h |= hit_h
        if bool(done_h.all()) or t + 1 == max_new:
            break
        done = done_h.to(device)
        if 4 * int(done_h.sum()) >= len(done_h):  # drop finished rows: their compute is wasted
            keep_h = (~done_h).nonzero().squeeze(1)
            keep = keep_h.to(device)
            cache.batch_select_indices(keep)
            active, active_h, attn, pos, tok, done = active[keep], active_h[keep_h], attn[keep], pos[keep], tok[keep], done[keep]
        out = policy(input_ids=tok[:, None], attention_mask=attn[:, : width + t + 1],
                     position_ids=(pos + t)[:, None], use_cache=True, **{cache_kw: cache})
        logits = out.logits[:, -1].float()
    return _Chunk(tokens_h, length_h, logp, ~ended_h, stopped_h)


def _sample(logits: Tensor, u: Tensor, sampling: SamplingParams) -> tuple[Tensor, Tensor]:
    """Sample one token per row from float32 logits (n, V) with uniforms u (n,).

    Returns the tokens and their log-probs under softmax(logits / temperature) (temperature 1 for
    greedy), before top-k/top-p truncation, which is what `completion_logprobs` recomputes.
    """
    if sampling.temperature == 0:
        tok = logits.argmax(-1)
        return tok, token_logprobs(logits, tok, 1.0, chunk_rows=None)
    scaled = logits / sampling.temperature
    if sampling.top_k or sampling.top_p < 1:
        if sampling.top_k:
            vals, order = scaled.topk(min(sampling.top_k, scaled.shape[-1]), dim=-1)
        else:
            vals, order = scaled.sort(dim=-1, descending=True, stable=True)
        probs = torch.softmax(vals, dim=-1)
        # nucleus: keep the smallest prefix whose mass reaches top_p (the first token always stays)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= sampling.top_p, 0.0)
        tok = order.gather(-1, _inverse_cdf(probs, u)[:, None]).squeeze(1)
    else:
        tok = _inverse_cdf(torch.softmax(scaled, dim=-1), u)
    return tok, token_logprobs(scaled, tok, 1.0, chunk_rows=None)


def _inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Index j with cdf[j-1] <= u * total < cdf[j]; never a zero-probability entry."""
    cdf = probs.cumsum(-1)  # (n, V)
    total = cdf[:, -1:]
    # u < 1, but u * total can round up to total; cap it just below so j stays on a positive entry
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


class _StopChecker:
    """Stop strings, checked on a row's decoded tail only when its new token could end one.

    A token "could end" a stop when its text contains the last character of some stop string or
    is an incomplete UTF-8 piece; that table is computed once per (tokenizer, stops) and cached.
    Every step a stop is possible is checked, so a stop found in the tail ends at the new token.
    """

    _tables: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], Tensor]] = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        # a stop of L chars spans at most 4L tokens (byte-level pieces); +2 absorbs edge effects
        self.window = 4 * max(len(s) for s in stops) + 2

    def table(self, vocab_size: int, device: torch.device) -> Tensor:
        """(vocab_size,) bool: token ids whose text could complete a stop string."""
        try:
            per_tok = self._tables.setdefault(self.tokenizer, {})
        except TypeError:  # tokenizer without weakref support: no cache
            per_tok = {}
        if self.stops not in per_tok:
            pieces = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))], skip_special_tokens=True)
            lasts = {s[-1] for s in self.stops} | {"\ufffd"}
            per_tok[self.stops] = torch.tensor([any(c in p for c in lasts) for p in pieces], dtype=torch.bool)
        table = per_tok[self.stops][:vocab_size]
        return torch.cat([table, table.new_zeros(vocab_size - len(table))]).to(device)

    def hits(self, tokens_h: Tensor, active_h: Tensor, cand_h: Tensor, t: int) -> Tensor:
        """(n,) bool: candidate batch rows whose completion now contains a stop string."""
        rows = cand_h.nonzero().squeeze(1)
        lo = max(0, t + 1 - self.window)
        tails = self.tokenizer.batch_decode(tokens_h[active_h[rows], lo : t + 1].tolist(), skip_special_tokens=True)
        hit = torch.zeros_like(cand_h)
        hit[rows] = torch.tensor([any(s in text for s in self.stops) for text in tails], dtype=torch.bool)
        return hit


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """Text up to the end of the earliest stop-string occurrence (kept)."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return text[: min(ends)] if ends else text


def _assemble(
    chunks: list[_Chunk],
    prompt_ids: list[list[int]],
    group_index: Tensor,
    tokenizer: Any,
    stops: tuple[str, ...],
    pad_id: int,
) -> Rollouts:
    """Concatenate chunks (padding to the longest), outside inference mode so autograd can use them."""
    device = chunks[0].logp.device
    length = torch.cat([c.length for c in chunks])  # (N,)
    steps = max(int(length.max()), 1)
    ids = torch.cat([c.ids[:, :steps] for c in chunks])  # (N, T), pad after each length
    mask = torch.arange(steps) < length[:, None]  # (N, T)
    logp = torch.cat([c.logp[:, :steps] for c in chunks])
    stopped = torch.cat([c.stopped for c in chunks]).tolist()
    texts = tokenizer.batch_decode([r[:n] for r, n in zip(ids.tolist(), length.tolist(), strict=True)],
                                   skip_special_tokens=True)
    texts = [_cut_at_stop(x, stops) if s else x for x, s in zip(texts, stopped, strict=True)]
    p_ids, p_mask = _left_pad(prompt_ids, pad_id, device)
    return Rollouts(
        prompt_ids=p_ids[group_index],
        prompt_mask=p_mask[group_index],
        completion_ids=ids.to(device),
        completion_mask=mask.long().to(device),
        sample_logp=logp,
        truncated=torch.cat([c.truncated for c in chunks]).to(device),
        texts=texts,
        group_index=group_index.clone(),
    )


def completion_logprobs(
    model: Any,
    batch: Rollouts | Sequence[Tensor],
    temperature: float,
    micro_batch_size: int | None = None,
    with_entropy: bool = False,
    share_prompts: bool = True,
    one_forward: bool = False,
    hidden_of: Any | None = None,
) -> Any:
    """Log-probs of the completion tokens under `model`: the training-time forward.

        logp_{i,t} = log softmax(z_{i, P-1+t} / temperature)[completion_ids_{i,t}]

    This is logp, old_logp and ref_logp of ALGORITHMS.md §1, §3: it returns a graph when grad is
    enabled. Under no_grad it matches `Rollouts.sample_logp` of the same model and temperature to
    float rounding (KV-cache decode vs one forward).

    Work skipped (ALGORITHMS.md §9), none of it changing the result beyond float rounding:
    - the distinct prompts of a micro-batch (a group's G rows share one) are forwarded once and
      the completions run on their keys/values (`share_prompts`); autograd sums a prompt's
      gradient over its rows. Not under activation checkpointing (the checkpointed layers drop
      the cache), where each row's prompt and completion run in one forward instead;
    - rows are bucketed by completion length (`_length_buckets`), each bucket cut to its longest
      counted completion and its longest prompt, so little padding is computed; rows with no
      counted token are not computed at all;
    - the LM head runs only at the positions that predict completion tokens.

    Args:
        model: causal LM (plain HF or peft); its train/eval mode is left as the caller set it.
        batch: Rollouts, or (prompt_ids (N, P) left-padded, prompt_mask (N, P),
            completion_ids (N, T) right-padded, completion_mask (N, T)).
        temperature: sampling temperature; 0 (greedy) scores at temperature 1, like generate.
        micro_batch_size: rows per forward; None = all N at once.
        with_entropy: also return the (N, T) per-token entropy (no graph), a metric.
        share_prompts: forward each distinct prompt of a micro-batch once.
        one_forward: one plain forward of each micro-batch at its full padded width, none of the
            above (the reference the tests and benchmarks compare with).
        hidden_of: a module of `model` (its decoder, for PPO's value head): also return its last
            hidden state at the same positions, (N, T, H), from the same forward (not with
            `one_forward`); 0 on rows with no counted token and past a row's last counted token.

    Returns:
        (N, T) float32 log-probs, 0 where completion_mask is 0; with_entropy: (logp, entropy);
        hidden_of: (logp, entropy or None, hidden).
    """
    if isinstance(batch, Rollouts):
        batch = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    if one_forward and hidden_of is not None:
        raise ValueError("hidden_of is read from the bucketed forward, not with one_forward")
    n_rows, steps = completion_ids.shape
    step = micro_batch_size or n_rows
    temp = temperature if temperature > 0 else 1.0
    parts, entropies, hiddens = [], [], []
    for s in range(0, n_rows, step):
        rows = slice(s, s + step)
        if one_forward:
            lp, ent = _plain_logprobs(model, prompt_ids[rows], prompt_mask[rows], completion_ids[rows],
                                      completion_mask[rows], temp, with_entropy)
            parts.append(lp)
            if ent is not None:
                entropies.append(ent)
            continue
        lp, ent, hid = _micro_batch_logprobs(
            model, (prompt_ids[rows], prompt_mask[rows], completion_ids[rows], completion_mask[rows]), temp,
            with_entropy, share_prompts, hidden_of)
        parts.append(torch.nn.functional.pad(lp, (0, steps - lp.shape[1])))
        if ent is not None:
            entropies.append(torch.nn.functional.pad(ent, (0, steps - ent.shape[1])))
        if hid is not None:
            hiddens.append(torch.nn.functional.pad(hid, (0, 0, 0, steps - hid.shape[1])))
    if hidden_of is not None:
        return torch.cat(parts), torch.cat(entropies) if with_entropy else None, torch.cat(hiddens)
    if with_entropy:
        return torch.cat(parts), torch.cat(entropies)
    return torch.cat(parts)


def _plain_logprobs(
    model: Any, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
    temperature: float, with_entropy: bool,
) -> tuple[Tensor, Tensor | None]:
    """One forward over [prompt; completion] at the full padded width: (n, T) log-probs (and entropies)."""
    logits, _ = _joined_outputs(model, None, prompt_ids, prompt_mask, completion_ids, completion_mask.ne(0).long())
    return _logprobs_of(logits, completion_ids, completion_mask.bool(), temperature, with_entropy)


def _joined_outputs(
    model: Any, capture: Any | None, prompt_ids: Tensor, prompt_mask: Tensor, ids: Tensor, mask: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """(n, C, *) outputs (`_outputs_of`) at the positions predicting the C completion tokens `ids`, and
    `capture`'s last hidden state there, from one forward over [prompt; completion]."""
    width = ids.shape[1]
    both = torch.cat([prompt_mask.ne(0).long(), mask], dim=1)
    out, hidden = _run(model, capture, input_ids=torch.cat([prompt_ids, ids], dim=1), attention_mask=both,
                       position_ids=_positions(both), use_cache=False, **_logits_kwargs(model, width + 1))
    return _outputs_of(out)[:, -width - 1 : -1], None if hidden is None else hidden[:, -width - 1 : -1]


def _outputs_of(out: Any) -> Tensor:
    """A forward's per-position outputs: the logits of a causal LM, the last hidden state of a decoder."""
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, Tensor) else out.last_hidden_state


def _run(model: Any, capture: Any | None, **kwargs: Any) -> tuple[Any, Tensor | None]:
    """model(**kwargs), and the last hidden state the module `capture` (of `model`) gave in it."""
    if capture is None:
        return model(**kwargs), None
    seen: list[Tensor] = []
    handle = capture.register_forward_hook(lambda module, args, out: seen.append(
        out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]))
    try:
        out = model(**kwargs)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"expected one forward of {type(capture).__name__}, saw {len(seen)}")
    return out, seen[0]


def _logprobs_of(
    logits: Tensor, ids: Tensor, keep: Tensor, temperature: float, with_entropy: bool,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `ids` (0 where not `keep`), and the per-token entropy (a metric: no graph)."""
    lp = torch.where(keep, token_logprobs(logits.float(), ids, temperature), 0.0)
    if not with_entropy:
        return lp, None
    with torch.no_grad():
        return lp, torch.where(keep, entropy(logits.detach().float(), temperature), 0.0)


BUCKET_COST = 64  # padded positions a further length bucket must save to pay for its forward
BUCKET_SPLIT = 3  # backward by bucket: no bucket above 1/BUCKET_SPLIT of the micro-batch's tokens


def _micro_batch_logprobs(
    model: Any, tensors: tuple[Tensor, Tensor, Tensor, Tensor], temperature: float, with_entropy: bool,
    share_prompts: bool, capture: Any | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(n, C) log-probs (and entropies, and `capture`'s (n, C, H) hidden states) of one micro-batch;
    C = its last counted column + 1; rows not computed are 0."""
    lengths = _counted_lengths(tensors[3])
    n, cols = len(lengths), int(lengths.max())
    lp = torch.zeros(n, cols, device=tensors[2].device)
    ent = torch.zeros(n, cols, device=tensors[2].device) if with_entropy else None
    hid: Tensor | None = None
    for rows, piece, e, h in _bucket_logprobs(model, tensors, lengths, temperature, with_entropy, share_prompts,
                                              False, capture):
        lp = _scatter_rows(lp, rows, piece, n, cols)
        if ent is not None and e is not None:
            ent = _scatter_rows(ent, rows, e, n, cols)
        if h is not None:
            hid = _scatter_rows(hid, rows, h, n, cols)
    return lp, ent, hid


def _scatter_rows(acc: Tensor | None, rows: Tensor, piece: Tensor, n: int, cols: int) -> Tensor:
    """`acc` (n, cols, *) (zeros when None) with `piece` (r, width, *), padded to `cols`, put in `rows`."""
    piece = torch.nn.functional.pad(piece, [0, 0] * (piece.dim() - 2) + [0, cols - piece.shape[1]])
    return (piece.new_zeros(n, *piece.shape[1:]) if acc is None else acc).index_copy(0, rows, piece)


def completion_hidden(trunk: Any, batch: Sequence[Tensor], share_prompts: bool = True) -> Tensor:
    """(N, T, H) last hidden state of `trunk` (a decoder, no LM head) at the positions predicting the
    completion tokens (position P-1+t for token t): the states a value head reads.

    The same forward as `completion_logprobs` (distinct prompts once, length buckets, the
    plain path under activation checkpointing); rows with no counted token and the columns past a
    row's last counted token are 0. Carries a graph when grad is enabled.
    """
    tensors = (batch[0], batch[1], batch[2], batch[3])
    lengths = _counted_lengths(tensors[3])
    n, steps = len(lengths), tensors[2].shape[1]
    hid: Tensor | None = None
    for rows, h in _bucket_forward(trunk, tensors, lengths, share_prompts, False, lambda out, ids, mask, _: out):
        hid = _scatter_rows(hid, rows, h, n, steps)
    if hid is None:  # _counted_lengths gives every micro-batch a bucket
        raise RuntimeError("no completion row was computed")
    return hid


Share = TypeVar("Share")


def loss_by_bucket(
    model: Any,
    batch: Sequence[Tensor],
    temperature: float,
    share_of: Callable[[Tensor, Tensor, Tensor | None], Share],
    with_entropy: bool = False,
    share_prompts: bool = True,
) -> Iterator[Share]:
    """The training forward of one micro-batch, one length bucket at a time, for a loss that is a
    sum over rows (ALGORITHMS.md §9): yields `share_of(rows, logp, entropy)` per bucket, and the
    caller runs backward on each yielded share before asking for the next.

    `rows` (r,) indexes the batch, `logp` (r, T) are those rows' log-probs with a graph (0 on
    padding, T = the batch's width, as `completion_logprobs` gives them) and `entropy` (r, T) or
    None. Rows with no counted token are in no bucket (except row 0 when no row has one, so the
    share keeps a graph). Each bucket's activations are freed by its backward, so the peak holds
    the shared prompts' forward and one bucket, not every bucket at once.

    The shared prompts' keys/values (and the logits predicting each completion's first token)
    enter the buckets as detached leaves; their gradients accumulate over the buckets and, after
    the last one, one backward runs through the prompts' forward. By the chain rule the parameter
    gradients are those of one backward through the whole micro-batch (to float summation order),
    provided the shares sum to the micro-batch loss: each row's loss may depend on its own
    tokens only (token and sequence ratios, every aggregation, all divided by one normaliser of
    the whole batch, `losses.aggregate`).

    Args:
        model: causal LM (plain HF or peft).
        batch: (prompt_ids (N, P) left-padded, prompt_mask, completion_ids (N, T) right-padded,
            completion_mask), as for `completion_logprobs`.
        temperature: sampling temperature; 0 scores at temperature 1.
        share_of: the loss share of a bucket (and whatever else the caller wants back).
        with_entropy: pass per-token entropies (no graph) to `share_of`.
        share_prompts: forward each distinct prompt once (see `completion_logprobs`).

    Yields:
        `share_of`'s result, once per bucket.
    """
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    steps = completion_ids.shape[1]
    temp = temperature if temperature > 0 else 1.0
    lengths = _counted_lengths(completion_mask)
    for rows, piece, e, _ in _bucket_logprobs(model, (prompt_ids, prompt_mask, completion_ids, completion_mask),
                                              lengths, temp, with_entropy, share_prompts, True):
        pad = (0, steps - piece.shape[1])
        yield share_of(rows, torch.nn.functional.pad(piece, pad), None if e is None else torch.nn.functional.pad(e, pad))


def _counted_lengths(completion_mask: Tensor) -> Tensor:
    """(n,) last counted column + 1 of each row (0: none); row 0 gets 1 when no row counts a token,
    so a loss over the micro-batch still has a graph."""
    counted = completion_mask.ne(0)
    lengths = torch.where(counted.any(-1), counted.shape[1] - counted.flip(-1).long().argmax(-1), 0)  # (n,)
    if not bool(lengths.any()):
        lengths = torch.nn.functional.pad(lengths.new_ones(1), (0, len(lengths) - 1))
    return lengths


def _bucket_logprobs(
    model: Any, tensors: tuple[Tensor, Tensor, Tensor, Tensor], lengths: Tensor, temperature: float,
    with_entropy: bool, share_prompts: bool, backward_by_bucket: bool, capture: Any | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]:
    """Per length bucket: (rows, (r, width) log-probs, entropies, `capture`'s hidden states or None)."""
    def score(logits: Tensor, ids: Tensor, mask: Tensor, hidden: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        return *_logprobs_of(logits, ids, mask.bool(), temperature, with_entropy), hidden

    for rows, (piece, e, hidden) in _bucket_forward(model, tensors, lengths, share_prompts, backward_by_bucket, score,
                                                    capture):
        yield rows, piece, e, hidden


Scored = TypeVar("Scored")


def _bucket_forward(
    model: Any, tensors: tuple[Tensor, Tensor, Tensor, Tensor], lengths: Tensor, share_prompts: bool,
    backward_by_bucket: bool, score: Callable[[Tensor, Tensor, Tensor, Tensor | None], Scored],
    capture: Any | None = None,
) -> Iterator[tuple[Tensor, Scored]]:
    """Per length bucket: (rows, `score`(outputs, ids, mask, hidden)) where `outputs` (r, width, *) are
    the model's outputs (`_outputs_of`) at the positions predicting the bucket's completion tokens
    `ids` (r, width) with `mask`, and `hidden` `capture`'s last hidden state there (None without).
    With `backward_by_bucket` the shared prompts' outputs are cut into leaves and, once the last
    bucket's backward has run, their accumulated gradients are pushed through the prompts' forward
    (see `loss_by_bucket`)."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = tensors
    shared = None
    if share_prompts and not _checkpointed(model):
        shared = _SharedPrompts.of(model, *_trim_left(prompt_ids, prompt_mask), capture)
    multiple = shared is None or shared.copyable
    cap = -(-int(lengths.sum()) // BUCKET_SPLIT) if backward_by_bucket and multiple else None
    buckets = _length_buckets(lengths, multiple=multiple, max_positions=cap)
    cut = backward_by_bucket and shared is not None and len(buckets) > 1 and shared.cut()
    for rows in buckets:
        width = int(lengths[rows].max())
        ids, mask = completion_ids[rows, :width], completion_mask[rows, :width].ne(0).long()
        if shared is not None:
            outputs, hidden = shared.outputs(rows, ids, mask)
        else:
            outputs, hidden = _joined_outputs(model, capture, *_trim_left(prompt_ids[rows], prompt_mask[rows]), ids,
                                              mask)
        scored = score(outputs, ids, mask, hidden)
        del outputs, hidden
        yield rows, scored
    if cut and shared is not None:
        shared.backward()


def _trim_left(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Left-padded prompts without the columns that are padding in every row; the mask as 0/1."""
    real = prompt_mask.ne(0).any(0).nonzero()
    first = min(int(real[0]), prompt_mask.shape[1] - 1) if len(real) else prompt_mask.shape[1] - 1
    return prompt_ids[:, first:], prompt_mask[:, first:].ne(0).long()


def _length_buckets(lengths: Tensor, multiple: bool = True, cost: int | None = None,
                    max_positions: int | None = None) -> list[Tensor]:
    """The rows with a counted token, longest first, cut into contiguous buckets that minimise
    sum over buckets of (rows x longest row) + `cost` per bucket (default BUCKET_COST), with no
    bucket of more than one row above `max_positions` (rows x longest row; None = no limit). An
    exact O(n^2) dynamic program; one bucket when not `multiple`."""
    cost = BUCKET_COST if cost is None else cost
    rows = lengths.nonzero().squeeze(1)
    order = rows[torch.argsort(lengths[rows], descending=True, stable=True)]
    if not multiple or len(order) < 2:
        return [order]
    sizes = lengths[order].tolist()
    best, cut = [0.0] + [float("inf")] * len(sizes), [0] * (len(sizes) + 1)
    for j in range(1, len(sizes) + 1):
        for i in range(j):  # bucket = sorted rows i..j-1, padded to sizes[i]
            if max_positions is not None and j - i > 1 and (j - i) * sizes[i] > max_positions:
                continue
            c = best[i] + (j - i) * sizes[i] + cost
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], len(sizes)
    while j > 0:
        out.append(order[cut[j] : j])
        j = cut[j]
    return out[::-1]


def _checkpointed(model: Any) -> bool:
    """True when activation checkpointing is on: the checkpointed layers drop the KV cache in a
    forward with a graph, so such a model takes the plain path in every forward (with or without a
    graph), and its policy, old and reference log-probs are computed alike."""
    return any(getattr(m, "gradient_checkpointing", False) is True and m.training for m in model.modules())


class _SharedPrompts:
    """The distinct prompts of a micro-batch, forwarded once; their keys/values serve any of its rows."""

    def __init__(self, model: Any, ids: Tensor, mask: Tensor, owner: Tensor, capture: Any | None = None):
        self.model, self.mask, self.owner, self.capture = model, mask, owner, capture  # owner: row -> prompt
        out, hidden = _run(model, capture, input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                           use_cache=True, **_logits_kwargs(model, 1))
        self.first = _outputs_of(out)[:, -1:]  # (U, 1, V): predicts completion token 0
        self.first_hidden = None if hidden is None else hidden[:, -1:]  # (U, 1, H): `capture`'s state there
        self.cache = getattr(out, cache_keyword(model))
        self.layers = _cache_layers(self.cache)
        self.copyable = self.layers is not None
        self._outputs: list[Tensor] = []  # after `cut`: the prompts' outputs, whose leaves the buckets use

    @classmethod
    def of(cls, model: Any, prompt_ids: Tensor, prompt_mask: Tensor, capture: Any | None = None) -> _SharedPrompts | None:
        """None when every row has its own prompt (nothing to share)."""
        distinct, owner = torch.unique(torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True)
        if len(distinct) == len(prompt_ids):
            return None
        width = prompt_ids.shape[1]
        return cls(model, distinct[:, :width], distinct[:, width:], owner, capture)

    def outputs(self, rows: Tensor, completion_ids: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """(r, C, *) outputs (`_outputs_of`) predicting the completion tokens of `rows`, and `capture`'s
        (r, C, H) last hidden states there (None without)."""
        owner = self.owner[rows]
        first = self.first[owner]
        first_hidden = None if self.first_hidden is None else self.first_hidden[owner]
        if completion_ids.shape[1] == 1:
            return first, first_hidden
        cache = self._rows_cache(owner)
        mask = torch.cat([self.mask[owner], completion_mask], dim=1)
        out, hidden = _run(self.model, self.capture, input_ids=completion_ids[:, :-1], attention_mask=mask[:, :-1],
                           position_ids=_positions(mask)[:, self.mask.shape[1] : -1], use_cache=True,
                           **{cache_keyword(self.model): cache})
        both = None if first_hidden is None or hidden is None else torch.cat([first_hidden, hidden], dim=1)
        return torch.cat([first, _outputs_of(out)], dim=1), both

    def cut(self) -> bool:
        """Replace the prompts' outputs (first logits, keys, values) by leaves that collect the
        buckets' gradients; False (nothing cut) when they carry no graph or are not copyable."""
        if self.first_hidden is not None:
            raise ValueError("a backward by bucket cannot carry captured hidden states")
        if self.layers is None or not self.first.requires_grad:
            return False
        self._outputs = [self.first, *(t for kv in self.layers for t in kv)]
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in self._outputs]
        self.first, self.layers = leaves[0], list(zip(leaves[1::2], leaves[2::2], strict=True))
        return True

    def backward(self) -> None:
        """One backward through the prompts' forward with the gradients the leaves collected."""
        leaves = [self.first, *(t for kv in self.layers or [] for t in kv)]
        pairs = [(out, leaf.grad) for out, leaf in zip(self._outputs, leaves, strict=True)
                 if out.requires_grad and leaf.grad is not None]
        self._outputs = []
        if pairs:
            torch.autograd.backward([out for out, _ in pairs], [g for _, g in pairs])

    def _rows_cache(self, owner: Tensor) -> Any:
        """A cache holding each row's prompt keys/values (indexing keeps the autograd graph)."""
        layers = self.layers
        if layers is None:  # one bucket only (copyable False): expand the prompts' cache in place
            self.cache.batch_select_indices(owner)
            return self.cache
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i, (keys, values) in enumerate(layers):
            cache.update(keys[owner], values[owner], i)
        return cache


def _cache_layers(cache: Any) -> list[tuple[Tensor, Tensor]] | None:
    """Per layer (keys, values) of a transformers 5 DynamicCache; None for any other cache."""
    layers = getattr(cache, "layers", None)
    if type(cache).__name__ != "DynamicCache" or not layers or not all(
            isinstance(getattr(layer, "keys", None), Tensor) for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]
