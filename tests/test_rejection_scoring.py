"""Keep rules of rejection sampling, pass rates, avg@k / pass@k and confidence intervals."""

from __future__ import annotations

import math
from itertools import combinations

import pytest

from rlft.rl.rejection import KeepRules, pass_rate, select
from rlft.scoring import mean_ci, pass_at_k, wilson_ci

TEXTS = ["a", "b", "a", "ccc", "", "d"]
REWARDS = [1.0, 0.0, 1.0, 1.0, 1.0, 0.5]


def test_correct_keeps_passing_dedups_and_caps() -> None:
    rules = KeepRules(keep="correct", threshold=1.0, max_per_prompt=None, dedup=True, min_chars=1)
    # 0 "a", 2 "a" (duplicate of 0), 3 "ccc", 4 "" (too short); 1 and 5 fail the threshold
    assert select(TEXTS, REWARDS, rules) == [0, 3]
    assert select(TEXTS, REWARDS, KeepRules(keep="correct", max_per_prompt=1)) == [0]
    assert select(TEXTS, REWARDS, KeepRules(keep="correct", max_per_prompt=None, dedup=False)) == [0, 2, 3]


def test_best_keeps_the_top_one_only_if_it_passes() -> None:
    assert select(TEXTS, REWARDS, KeepRules(keep="best")) == [0]  # ties keep the earlier sample
    assert select(["x", "y"], [0.2, 0.7], KeepRules(keep="best", threshold=1.0)) == []
    assert select(["x", "y"], [0.2, 0.7], KeepRules(keep="best", threshold=0.5)) == [1]


def test_all_ignores_the_threshold_but_not_length_or_dedup() -> None:
    rules = KeepRules(keep="all", max_per_prompt=None, max_chars=2)
    # sorted by reward: 0 (1.0), 2 dup, 3 too long, 4 empty, 5 (0.5), 1 (0.0)
    assert select(TEXTS, REWARDS, rules) == [0, 5, 1]


def test_select_rejects_misaligned_inputs() -> None:
    with pytest.raises(ValueError, match="2 completions but 1 rewards"):
        select(["a", "b"], [1.0], KeepRules())


def test_pass_rate() -> None:
    assert pass_rate(REWARDS, 1.0) == 4 / 6
    assert pass_rate([], 1.0) == 0.0


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """Probability that a random k-subset of n samples (c correct) holds a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 1, 1), (5, 2, 3), (8, 3, 4), (8, 8, 2), (10, 1, 10), (7, 6, 2)])
def test_pass_at_k_is_the_unbiased_estimator(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k), abs=1e-12)
    # closed form, by hand: 1 - C(n-c, k) / C(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_worked_example() -> None:
    # n=4 samples, c=1 correct, k=2: C(3,2)/C(4,2) = 3/6 of the pairs miss it, so pass@2 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def test_intervals() -> None:
    mean, half = mean_ci([0.0, 1.0, 1.0, 0.0])
    # sample std = sqrt(1/3), half-width = 1.96 * sqrt(1/3) / 2
    assert mean == 0.5 and half == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    lo, hi = wilson_ci(0, 10)
    assert lo == 0.0 and 0.0 < hi < 0.35  # sound at the boundary, unlike the normal interval
    lo, hi = wilson_ci(5, 10)
    assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo)
