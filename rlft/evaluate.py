"""Held-out evaluation shared by the stages: token-mean loss and task accuracy with a verifier.

On several processes every rank calls these together: each takes a contiguous share of the
chunks (`dist.shard`), and the per-chunk figures are gathered in chunk order and summed as one
process sums them, so the result is the one-process result, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from rlft import dist, fsdp, rollout, training
from rlft.data import encode, tasks
from rlft.data.batch import collate
from rlft.rewards import builtin


@torch.no_grad()
def heldout_loss(model: Any, examples: list[Any], micro_batch_size: int, pad_id: int) -> float:
    """Token-mean cross-entropy of `examples` (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    starts = range(0, len(examples), micro_batch_size)
    mine = []
    for i in [starts[c] for c in _share(model, len(starts))]:
        batch = {k: v.to(dev) for k, v in collate(examples[i : i + micro_batch_size], pad_id).items()}
        loss_sum, n = training.sft_loss_sum(model, batch)
        mine.append((float(loss_sum), float(n)))
    model.train(was_training)
    total, count = 0.0, 0.0
    for loss_sum, n in _whole(model, mine):
        total, count = total + loss_sum, count + n
    return total / max(count, 1.0)


def _own_all(model: Any) -> bool:
    """Under fsdp every forward is a collective all ranks must join (and greedy generation of one
    chunk runs as many forwards on each rank), so each rank computes all chunks itself, unless the
    model is `fsdp.gathered` (whole weights on every rank, forwards without collectives)."""
    return fsdp.is_sharded(model) and not fsdp.is_gathered(model)


def _share(model: Any, n: int) -> range:
    """This rank's chunks of n (all n when `_own_all`)."""
    return range(n) if _own_all(model) else dist.shard(n)


def _whole(model: Any, mine: list[Any]) -> list[Any]:
    """The per-chunk results of all n chunks: this rank's own when `_own_all` (it computed all of
    them, `_share`), else every rank's gathered in chunk order."""
    return mine if _own_all(model) else in_order(mine)


def in_order(mine: list[Any]) -> list[Any]:
    """Every rank's per-chunk results (each rank's `mine`, its `dist.shard` of the chunks), in
    chunk order on every rank: the one-process list."""
    return [item for part in dist.gather_objects(mine) for item in part]


def is_correct(columns: dict[str, Any], completion: str) -> bool:
    """The verifier of a row (its columns) on one completion: the built-in task's checker, else
    the answer compared with math-verify (exact match first)."""
    if "task" in columns:
        return tasks.get_task(columns["task"]).check(completion, str(columns["answer"]))
    return builtin.answer_is_correct(completion, columns["answer"])


@torch.no_grad()
def task_accuracy(
    model: Any, tokenizer: Any, prompts: list[encode.PromptExample], max_new_tokens: int, batch_size: int = 32,
) -> float | None:
    """Greedy accuracy on held-out prompts whose row carries an answer; None when none do."""
    prompts = [p for p in prompts if "answer" in p.columns]
    if not prompts:
        return None
    sampling = rollout.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    starts = range(0, len(prompts), batch_size)
    mine = []
    for i in [starts[c] for c in _share(model, len(starts))]:
        chunk = prompts[i : i + batch_size]
        out = rollout.generate(
            model, tokenizer, [p.prompt_ids for p in chunk], sampling, group_size=1,
            generator=rollout.seed_generator(0),
        )
        mine.append(sum(is_correct(p.columns, t) for p, t in zip(chunk, out.texts, strict=True)))
    return sum(_whole(model, mine)) / len(prompts)
