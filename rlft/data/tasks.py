"""Synthetic tasks with verifiable answers, small enough for a char-level model to partly learn on CPU.

Every row has a user `prompt`, the `answer` string, and a worked `solution` in the R1 format
`<think>...</think><answer>...</answer>`, kept short so an ~80k-parameter model can imitate it
after a minute of SFT. Rows are a pure function of (task, n, seed); held-out rows come from a
separate random stream and never share a prompt with the training rows.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlft.errors import UserInputError

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def extract_answer(completion: str) -> str | None:
    """Content of the last `<answer>...</answer>` in `completion`, stripped; None when there is none."""
    found = _ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


@dataclass(frozen=True)
class Task:
    """A synthetic task: `make(rng)` draws one (prompt, answer, solution) triple."""

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str, str]]

    def generate(self, n: int, seed: int) -> list[dict[str, Any]]:
        """`n` rows drawn from the training stream of `seed` (duplicates possible).

        Returns:
            Rows `{"prompt", "answer", "solution"}`.
        """
        rng = random.Random(f"{self.name}/train/{seed}")
        return [self._row(rng) for _ in range(n)]

    def split(self, n_train: int, n_heldout: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Training rows and held-out rows with no prompt in common.

        Held-out rows are drawn from a stream seeded apart from the training one and kept only
        if their prompt is not in the training rows or earlier held-out rows.

        Raises:
            UserInputError: the task has too few distinct prompts for `n_heldout` new ones.
        """
        train = self.generate(n_train, seed)
        seen = {row["prompt"] for row in train}
        rng = random.Random(f"{self.name}/heldout/{seed}")
        heldout: list[dict[str, Any]] = []
        for _ in range(100 * n_heldout + 1000):
            if len(heldout) == n_heldout:
                break
            row = self._row(rng)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                heldout.append(row)
        if len(heldout) < n_heldout:
            raise UserInputError(
                f"task {self.name!r}: found only {len(heldout)} held-out prompts distinct from the "
                f"{n_train} training rows, {n_heldout} asked; lower eval_size or num_examples"
            )
        return train, heldout

    def check(self, completion: str, answer: str) -> bool:
        """True when the last `<answer>` of `completion` equals `answer` after stripping."""
        got = extract_answer(completion)
        return got is not None and got == str(answer).strip()

    def _row(self, rng: random.Random) -> dict[str, Any]:
        prompt, answer, solution = self.make(rng)
        return {"prompt": prompt, "answer": answer, "solution": solution}


def _solution(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def _make_arith(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    # Column addition from the ones digit: "7+5=12,4+8+1=13" for 47+85; the carry is the tens digit.
    steps, carry = [], 0
    for x, y in zip(reversed(str(a)), reversed(str(b)), strict=True):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
        carry = total // 10
    answer = str(a + b)
    return f"What is {a}+{b}?", answer, _solution(",".join(steps), answer)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))


def _make_reverse(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    answer = word[::-1]
    return f"Reverse: {word}", answer, _solution(" ".join(answer), answer)


def _make_copy(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    return f"Copy: {word}", word, _solution(" ".join(word), word)


def _make_sort(rng: random.Random) -> tuple[str, str, str]:
    digits = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5)))
    answer = "".join(sorted(digits))
    return f"Sort the digits {digits}", answer, _solution(" ".join(answer), answer)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("arith", "add two 2-digit numbers; the solution adds column by column with carries", _make_arith),
        Task("reverse", "reverse a word of 3-6 lowercase letters", _make_reverse),
        Task("copy", "repeat a word of 3-6 lowercase letters (the easiest task)", _make_copy),
        Task("sort", "sort 3-5 digits ascending", _make_sort),
    )
}


def get_task(name: str) -> Task:
    """The built-in task called `name`.

    Raises:
        UserInputError: no such task (with a did-you-mean and the list of tasks).
    """
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, list(TASKS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserInputError(f"unknown task {name!r}{hint}; built-in tasks: {', '.join(sorted(TASKS))}")
