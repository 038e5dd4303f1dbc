"""Synthetic tasks: deterministic rows, correct worked solutions, checkers, disjoint held-out rows."""

from __future__ import annotations

import random
import re

import pytest

from rlft.data import tasks
from rlft.errors import UserInputError

NAMES = sorted(tasks.TASKS)


def _true_answer(name: str, prompt: str) -> str:
    """The answer recomputed from the prompt text alone."""
    arg = prompt.rsplit(" ", 1)[-1]
    if name == "arith":
        a, b = re.fullmatch(r"What is (\d+)\+(\d+)\?", prompt).groups()
        return str(int(a) + int(b))
    return {"reverse": arg[::-1], "copy": arg, "sort": "".join(sorted(arg))}[name]


@pytest.mark.parametrize("name", NAMES)
def test_rows_are_correct_and_deterministic(name: str) -> None:
    task = tasks.get_task(name)
    rows = task.generate(200, seed=1)
    assert rows == task.generate(200, seed=1)
    assert rows != task.generate(200, seed=2)
    for row in rows:
        assert set(row) == {"prompt", "answer", "solution"}
        assert row["answer"] == _true_answer(name, row["prompt"])
        assert re.fullmatch(r"<think>[^<]*</think><answer>[^<]*</answer>", row["solution"])
        assert task.check(row["solution"], row["answer"])
        assert len(row["solution"]) <= 60  # short enough for a char-level model to imitate
    assert len({row["prompt"] for row in rows}) > 50


def test_arith_think_is_column_addition_with_carries() -> None:
    for row in tasks.TASKS["arith"].generate(300, 5):
        a, b = (int(x) for x in re.findall(r"\d+", row["prompt"]))
        steps = re.search(r"<think>(.*)</think>", row["solution"]).group(1).split(",")
        carry = 0
        for (x, y), step in zip(zip(reversed(str(a)), reversed(str(b)), strict=True), steps, strict=True):
            total = int(x) + int(y) + carry
            assert step == f"{x}+{y}{'+1' if carry else ''}={total}"
            carry = total // 10
        assert int(re.search(r"<answer>(\d+)", row["solution"]).group(1)) == a + b


def test_arith_worked_example() -> None:
    class FixedRng(random.Random):
        def randint(self, a: int, b: int) -> int:
            return self.values.pop(0)

    rng = FixedRng()
    rng.values = [47, 85]
    prompt, answer, solution = tasks.TASKS["arith"].make(rng)
    assert (prompt, answer) == ("What is 47+85?", "132")
    assert solution == "<think>7+5=12,4+8+1=13</think><answer>132</answer>"


@pytest.mark.parametrize(
    ("completion", "ok"),
    [
        ("<think>x</think><answer>132</answer>", True),
        ("<answer> 132 \n</answer>", True),
        ("<answer>1</answer> then <answer>132</answer>", True),  # the last answer counts
        ("<answer>132</answer><answer>1</answer>", False),
        ("132", False),
        ("<answer>132", False),
        ("<answer>1320</answer>", False),
        ("", False),
    ],
)
def test_check(completion: str, ok: bool) -> None:
    assert tasks.TASKS["arith"].check(completion, "132") is ok


def test_extract_answer() -> None:
    assert tasks.extract_answer("a<answer>\n x \n</answer>") == "x"
    assert tasks.extract_answer("<answer>multi\nline</answer>") == "multi\nline"
    assert tasks.extract_answer("no tags") is None


@pytest.mark.parametrize("name", NAMES)
def test_heldout_is_disjoint_and_deterministic(name: str) -> None:
    task = tasks.get_task(name)
    train, heldout = task.split(900, 100, seed=7)
    assert (len(train), len(heldout)) == (900, 100)
    assert train == task.generate(900, 7)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert len({r["prompt"] for r in heldout}) == 100
    assert (train, heldout) == task.split(900, 100, seed=7)
    assert heldout != task.split(900, 100, seed=8)[1]


def test_heldout_too_large_for_the_task_space() -> None:
    coin = tasks.Task("coin", "heads or tails", lambda rng: (rng.choice("HT"), "x", "<answer>x</answer>"))
    with pytest.raises(UserInputError, match="found only 0 held-out prompts"):
        coin.split(50, 1, seed=0)
    assert len(coin.split(1, 1, seed=0)[1]) == 1


def test_get_task_did_you_mean() -> None:
    assert tasks.get_task("arith") is tasks.TASKS["arith"]
    with pytest.raises(UserInputError, match=r"did you mean 'arith'\?.*built-in tasks: arith, copy, reverse, sort"):
        tasks.get_task("arth")
