"""Batching: packing, collation and loaders whose position is a checkpointable cursor.

Loaders shuffle with `torch.randperm` on a private `torch.Generator` seeded with `seed + epoch`
(never the global RNG), so the batches of a step depend only on (seed, epoch, step in epoch).
`state_dict()` stores that cursor; a loader built on the same examples that loads it yields
exactly the remaining batches of the interrupted run. Loaders are endless: the stage decides
how many steps to take (`steps_per_epoch` per epoch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from rlft.errors import CheckpointError, UserInputError

T = TypeVar("T")


@dataclass(frozen=True)
class SFTExample:
    """One training sequence. `loss_mask[t] = 1` marks a target token (token 0 never is).

    `position_ids` is set by `pack` only: it restarts at 0 for each packed example.
    """

    input_ids: list[int]
    loss_mask: list[int]
    position_ids: list[int] | None = None


def pack(examples: Sequence[SFTExample], max_length: int) -> list[SFTExample]:
    """Greedy next-fit packing in the given order: append to the current sequence while it fits.

    Attention does not cross examples: each packed example gets position ids restarting at 0
    and `model_inputs` then omits the attention mask, which makes transformers build a
    block-diagonal causal mask from the restarts (masking_utils.find_packed_sequence_indices).
    The first token of every packed example is never a target, since in the packed sequence it
    would be predicted from the previous example.

    Raises:
        ValueError: an example is longer than `max_length`.
    """
    out: list[SFTExample] = []
    ids: list[int] = []
    mask: list[int] = []
    pos: list[int] = []
    for ex in examples:
        n = len(ex.input_ids)
        if n > max_length:
            raise ValueError(f"example of {n} tokens does not fit max_length {max_length}")
        if ids and len(ids) + n > max_length:
            out.append(SFTExample(ids, mask, pos))
            ids, mask, pos = [], [], []
        ids += ex.input_ids
        mask += [0, *ex.loss_mask[1:]]
        pos += list(range(n))
    if ids:
        out.append(SFTExample(ids, mask, pos))
    return out


def collate(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (N, L) tensors `input_ids`, `attention_mask`, `loss_mask` (long).

    Batches with packed examples also get `position_ids`; padding continues the last
    example's positions so it opens no new segment.
    """
    width = max(len(ex.input_ids) for ex in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.long)
    packed = any(ex.position_ids is not None for ex in examples)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    for i, ex in enumerate(examples):
        k = len(ex.input_ids)
        input_ids[i, :k] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[i, :k] = 1
        loss_mask[i, :k] = torch.tensor(ex.loss_mask, dtype=torch.long)
        if packed:
            pos = ex.position_ids if ex.position_ids is not None else list(range(k))
            position_ids[i, :k] = torch.tensor(pos, dtype=torch.long)
            position_ids[i, k:] = torch.arange(pos[-1] + 1, pos[-1] + 1 + width - k)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    if packed:
        batch["position_ids"] = position_ids
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments for a causal LM's forward on a collated batch.

    Packed batches pass `position_ids` and no attention mask (see `pack`); right padding needs
    no mask in a causal model, as pads come after every real token and are never targets.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def token_count(step_batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """Target tokens in all micro-batches of one optimizer step: the token-mean denominator."""
    return int(sum(int(mb["loss_mask"].sum()) for mb in step_batches))


class _Cursor(Generic[T]):
    """Endless shuffled batches of indices with an exact (epoch, step in epoch) position."""

    def __init__(self, examples: Sequence[T], batch_size: int, seed: int, drop_last: bool):
        if batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
        self.examples, self.batch_size, self.seed, self.drop_last = examples, batch_size, seed, drop_last
        n = len(examples)
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if self.steps_per_epoch == 0:
            raise UserInputError(f"{n} examples make no full batch of {batch_size}; lower the batch size or add data")
        self.epoch, self.step_in_epoch = 0, 0
        self._perm_epoch, self._perm = -1, []

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> _Cursor[T]:
        return self

    def _next_items(self) -> list[T]:
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self._perm_epoch != self.epoch:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.examples), generator=gen).tolist(), self.epoch
        start = self.step_in_epoch * self.batch_size
        self.step_in_epoch += 1
        return [self.examples[j] for j in self._perm[start: start + self.batch_size]]

    def state_dict(self) -> dict[str, int | bool]:
        """The cursor (epoch, step_in_epoch) plus what must match on load."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "num_examples": len(self.examples), "batch_size": self.batch_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved cursor.

        Raises:
            CheckpointError: the state is malformed or was saved for other examples, seed or batching.
        """
        mine = self.state_dict()
        fixed = ("seed", "num_examples", "batch_size", "drop_last")
        if not isinstance(state, dict) or any(key not in state for key in mine):
            raise CheckpointError(f"data loader state is incomplete: {state!r}")
        changed = [f"{k} {state[k]!r} -> {mine[k]!r}" for k in fixed if state[k] != mine[k]]
        if changed:
            raise CheckpointError("data loader state was saved for other data or batching ("
                                  + ", ".join(changed) + "); the run cannot resume exactly")
        if not 0 <= state["step_in_epoch"] <= self.steps_per_epoch or state["epoch"] < 0:
            raise CheckpointError(f"data loader position out of range: {state!r}")
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])


class SFTLoader(_Cursor[SFTExample]):
    """Optimizer steps of SFT examples; each step is a list of collated micro-batches.

    A step holds `batch_size` examples (fewer at the end of an epoch unless `drop_last`), split
    into micro-batches of `micro_batch_size` for gradient accumulation; normalise the summed
    loss by `token_count(step)` so accumulation matches one big batch.
    """

    def __init__(self, examples: Sequence[SFTExample], batch_size: int, micro_batch_size: int, seed: int,
                 drop_last: bool = False, pad_id: int = 0):
        if micro_batch_size < 1 or batch_size % micro_batch_size:
            raise UserInputError(f"batch_size {batch_size} must be a multiple of micro_batch_size {micro_batch_size}")
        super().__init__(examples, batch_size, seed, drop_last)
        self.micro_batch_size, self.pad_id = micro_batch_size, pad_id

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        items = self._next_items()
        mbs = self.micro_batch_size
        return [collate(items[k: k + mbs], self.pad_id) for k in range(0, len(items), mbs)]


class PromptLoader(_Cursor[T]):
    """Batches of `batch_size` prompts (full batches only by default), same cursor as SFTLoader."""

    def __init__(self, examples: Sequence[T], batch_size: int, seed: int, drop_last: bool = True):
        super().__init__(examples, batch_size, seed, drop_last)

    def __next__(self) -> list[T]:
        return self._next_items()
