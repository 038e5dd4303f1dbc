# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""Keep rules of rejection sampling (ALGORITHMS.md section 8, step 3), as pure functions.

Given the K completions of one prompt and their summed rewards, `select` returns the indices
to keep: correct ones (reward >= threshold), the best one, or all; identical completions
deduplicated; length limits applied; at most M per prompt. Ties keep the earlier sample, so
the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

KeepRule = Literal["correct", "best", "all"]


@dataclass(frozen=True)
class KeepRules:
    """The `sample` stage's keep settings."""

    keep: KeepRule = "correct"
    threshold: float = 1.0
    max_per_prompt: int | None = 1
    dedup: bool = True
    min_chars: int = 1
    max_chars: int | None = None


def select(completions: Sequence[str], rewards: Sequence[float], rules: KeepRules) -> list[int]:
    """Indices of the completions of one prompt to keep, best reward first (stable)."""
    if len(completions) != len(rewards):
        raise ValueError(f"{len(completions)} completions but {len(rewards)} rewards")
    order = sorted(range(len(completions)), key=lambda i: (-rewards[i], i))
    if rules.keep == "best":
        order = order[:1]
    kept: list[int] = []
    seen: set[str] = set()
    for i in order:
        text = completions[i]
        if rules.keep != "all" and not rewards[i] >= rules.threshold:
            continue
        if len(text.strip()) < rules.min_chars or (rules.max_chars is not None and len(text) > rules.max_chars):
            continue
        if rules.dedup:
            if text in seen:
                continue
            seen.add(text)
        kept.append(i)
        if rules.max_per_prompt is not None and len(kept) >= rules.max_per_prompt:
            break
    return kept


def pass_rate(rewards: Sequence[float], threshold: float) -> float:
    """Share of a prompt's samples whose reward reaches the threshold."""
    return sum(r >= threshold for r in rewards) / len(rewards) if rewards else 0.0
