"""Reward functions for GRPO/PPO and rejection sampling: built-ins, the name table, user rewards.

A reward function is `fn(prompts, completions, **columns) -> list[float | None]`: one value
per completion, `columns` are the data set's other columns aligned with the completions
(e.g. `answer=[...]`). Built-ins live in `REWARDS` (name -> factory taking the recipe's
options). A recipe entry is a built-in name, `package.module:function` (importable without
the current directory on sys.path) or `path/to/file.py:function` (inside the recipe's
directory), optionally as a mapping `{name, weight, options}`; rlft/rewards/runner.py resolves
the entries (`build_rewards`, `validate_reward_entry`) and runs them under its failure policy.
This module does not import the runner.

Importing this module imports neither torch nor user code.
"""

from __future__ import annotations

import concurrent.futures
import math
import re
import threading
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from rlft.errors import UserInputError
from rlft.rewards import code_tests, code_verdict, sandbox

__all__ = ["REWARDS", "extract_answer", "make_builtin"]

RewardFn = Callable[..., list[float | None]]
RewardFactory = Callable[..., RewardFn]
LENGTH_COLUMN = "completion_tokens"  # token counts of the completions, passed by the stage as a column

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT_RE = re.compile(r"\A\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*\Z", re.DOTALL)
_CODE_RE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


# ---------------------------------------------------------------- answer extraction and matching

def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


def extract_answer(completion: str) -> str | None:
    """The completion's final answer: the last `<answer>...</answer>`, else the last `\\boxed{}`,
    else the last number; None when there is none of these."""
    tagged = _ANSWER_RE.findall(completion)
    if tagged:
        return tagged[-1].strip()
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed
    numbers = _NUMBER_RE.findall(completion)
    return numbers[-1] if numbers else None


def _canonical(text: str) -> str:
    text = _last_boxed(text) or text
    text = " ".join(text.split()).rstrip(".").strip().strip("$").strip()
    if _NUMBER_RE.fullmatch(text):
        text = text.replace(",", "")
    return text


def gold_answer(gold: Any) -> str:
    """The final answer in a gold column: the text after the last `####` (GSM8K's convention)
    when there is one, else the whole value."""
    text = str(gold)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text


def answers_match(pred: str, gold: Any) -> bool:
    """Exact match after normalising whitespace, `$`, a trailing period and `\\boxed{}`;
    integers and decimals compare by value (`2.50` == `2.5`, `1,000` == `1000`). A gold
    value with a GSM8K-style `#### answer` tail is compared by that tail."""
    a, b = _canonical(pred), _canonical(gold_answer(gold))
    if a == b:
        return True
    if _PLAIN_NUMBER.fullmatch(a) and _PLAIN_NUMBER.fullmatch(b):
        try:
            return Decimal(a) == Decimal(b)
        except InvalidOperation:
            return False
    return False


def _math_equal(pred: str, gold: str) -> bool:
    """Symbolic equality via math-verify; False when either side does not parse."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    # math-verify's own timeout uses signal.alarm, which works only in the main thread;
    # elsewhere the reward worker's timeout is the guard.
    limit = 5 if threading.current_thread() is threading.main_thread() else None

    def parsed(text: str) -> list:
        wrapped = text if ("$" in text or "\\boxed" in text) else f"${text}$"
        return parse(wrapped, parsing_timeout=limit) or parse(text, parsing_timeout=limit)  # type: ignore[arg-type]

    gold_p, pred_p = parsed(gold), parsed(pred)
    return bool(gold_p and pred_p and verify(gold_p, pred_p, timeout_seconds=limit))


def _column(columns: dict[str, Any], name: str, reward: str, n: int) -> list[Any]:
    if name not in columns:
        raise KeyError(f"{reward} needs a column '{name}'; the batch has columns {sorted(columns) or 'none'}")
    values = list(columns[name])
    if len(values) != n:
        raise ValueError(f"{reward}: column '{name}' has {len(values)} values for {n} completions")
    return values


def answer_is_correct(completion: str, gold: Any) -> bool:
    """Whether the completion's final answer equals `gold` (exactly, or by math-verify)."""
    return _correct(completion, gold, "math")


def _correct(completion: str, gold: Any, check: Literal["math", "exact"]) -> bool:
    pred = extract_answer(completion)
    if pred is None or gold is None:
        return False
    return answers_match(pred, gold) or (check == "math" and _math_equal(pred, gold_answer(gold)))


def _lengths(completions: list[str], columns: dict[str, Any], unit: str, reward: str) -> list[int]:
    if unit == "chars":
        return [len(c) for c in completions]
    return [int(x) for x in _column(columns, LENGTH_COLUMN, f"{reward} (unit: tokens)", len(completions))]


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"option {name} must be one of {', '.join(choices)}; got {value!r}")


# ---------------------------------------------------------------- built-in rewards

def math_answer(check: Literal["math", "exact"] = "math") -> RewardFn:
    """1.0 when the extracted answer equals the `answer` column, else 0.0 (also when nothing parses).

    Plain exact/numeric match first (synthetic tasks), then math-verify `parse`/`verify`.
    """
    _check_choice(check, "check", ("math", "exact"))

    def math_answer(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        gold = _column(columns, "answer", "math_answer", len(completions))
        return [float(_correct(c, g, check)) for c, g in zip(completions, gold, strict=True)]

    return math_answer


def exact_answer() -> RewardFn:
    """1.0 when the extracted answer equals `answer` (normalised whitespace; numbers by value)."""
    return math_answer(check="exact")


def task_verifier() -> RewardFn:
    """1.0 when the row's built-in synthetic task (column `task`, e.g. arith) accepts the
    completion with its own checker (exact `<answer>` match), else 0.0."""

    def task_verifier(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        from rlft.data.tasks import get_task

        names = _column(columns, "task", "task_verifier", len(completions))
        answers = _column(columns, "answer", "task_verifier", len(completions))
        return [float(get_task(t).check(c, str(a))) for c, t, a in zip(completions, names, answers, strict=True)]

    return task_verifier


def think_format() -> RewardFn:
    """1.0 iff the completion is `<think>...</think>` then `<answer>...</answer>`, with only
    whitespace around and between, each tag exactly once; else 0.0."""

    def think_format(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        out: list[float | None] = []
        for c in completions:
            m = _FORMAT_RE.match(c)
            ok = m is not None and not any(t in part for part in m.groups() for t in _TAGS)
            out.append(float(ok))
        return out

    return think_format


def tag_count() -> RewardFn:
    """0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` occurring exactly once."""

    def tag_count(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        return [0.25 * sum(c.count(t) == 1 for t in _TAGS) for c in completions]

    return tag_count


def cosine_length(min_value_wrong: float = -1.0, max_value_wrong: float = -0.5, min_value_correct: float = 0.5,
                  max_value_correct: float = 1.0, max_len: int = 1000,
                  unit: Literal["tokens", "chars"] = "tokens", check: Literal["math", "exact"] = "math") -> RewardFn:
    """Correctness scaled by length with a cosine schedule (Yeo et al. 2025, "Demystifying Long
    Chain-of-Thought Reasoning in LLMs", eq. 1):

        progress = min(L / max_len, 1)
        r = lo + 0.5 * (hi - lo) * (1 + cos(pi * progress))
        correct: (hi, lo) = (max_value_correct, min_value_correct)   short correct earns most
        wrong:   (hi, lo) = (min_value_wrong, max_value_wrong)       short wrong is penalised most

    L is in tokens (column `completion_tokens`) or characters (`unit: chars`); L > max_len
    scores as max_len (add overlong_penalty for a hard cap).
    """
    _check_choice(unit, "unit", ("tokens", "chars"))
    _check_choice(check, "check", ("math", "exact"))
    if max_len <= 0:
        raise ValueError(f"option max_len must be > 0; got {max_len}")

    def cosine_length(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        gold = _column(columns, "answer", "cosine_length", len(completions))
        out: list[float | None] = []
        for c, g, n in zip(completions, gold, _lengths(completions, columns, unit, "cosine_length"), strict=True):
            hi, lo = (max_value_correct, min_value_correct) if _correct(c, g, check) else (min_value_wrong, max_value_wrong)
            out.append(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * min(n / max_len, 1.0))))
        return out

    return cosine_length


def repetition_penalty(ngram: int = 3, max_penalty: float = -1.0) -> RewardFn:
    """N-gram repetition penalty over lower-cased words:

        r = max_penalty * (1 - unique_ngrams / total_ngrams);  0 for fewer than `ngram` words.
    """
    if ngram < 1:
        raise ValueError(f"option ngram must be >= 1; got {ngram}")
    if max_penalty > 0:
        raise ValueError(f"option max_penalty must be <= 0 (a penalty); got {max_penalty}")

    def repetition_penalty(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        out: list[float | None] = []
        for c in completions:
            words = c.lower().split()
            if len(words) < ngram:
                out.append(0.0)
                continue
            grams = list(zip(*(words[i:] for i in range(ngram)), strict=False))
            out.append(max_penalty * (1.0 - len(set(grams)) / len(grams)))
        return out

    return repetition_penalty


def overlong_penalty(max_len: int, cache_len: int, unit: Literal["tokens", "chars"] = "tokens") -> RewardFn:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13), L in tokens or chars:

        r = 0                                   if L <= max_len - cache_len
        r = (max_len - cache_len - L) / cache_len   if max_len - cache_len < L <= max_len
        r = -1                                  if L > max_len
    """
    _check_choice(unit, "unit", ("tokens", "chars"))
    if not 0 < cache_len <= max_len:
        raise ValueError(f"options need 0 < cache_len <= max_len; got cache_len={cache_len}, max_len={max_len}")

    def overlong_penalty(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        free = max_len - cache_len
        return [0.0 if n <= free else (free - n) / cache_len if n <= max_len else -1.0
                for n in _lengths(completions, columns, unit, "overlong_penalty")]

    return overlong_penalty


def code_exec(mode: Literal["fraction", "all"] = "fraction", tests_column: str = "tests", timeout_s: float = 5.0,
              memory_mb: int = 512, max_procs: int = 16, max_file_mb: int = 16, parallel: int = 2,
              allow_unsafe: bool = False) -> RewardFn:
    """Run the last ```python block of the completion against the row's tests in the sandbox.

    The tests column is Python source whose top-level `assert`s are the tests, a list of tests
    (each a snippet of asserts, or `{"input": ..., "output": ...}` for a program reading stdin),
    or `{"inputs": [...], "outputs": [...]}`. The sandboxed program only computes values; the
    trainer holds the expected values and judges (rlft/rewards/code_tests.py has the rules, e.g. an
    assert must compare a call of the solution with something the test wrote itself).
    All assert tests of a row share one run; each input/output test is a run of its own
    (`timeout_s` each). Reward: passed / total (`fraction`) or 1.0 iff all pass (`all`); 0.0
    without a code block or when the program times out or crashes (the model's failure, not the
    reward's). Tests that cannot be judged this way raise ValueError (counted as reward errors).
    """
    _check_choice(mode, "mode", ("fraction", "all"))
    if timeout_s <= 0 or memory_mb < 32 or max_procs < 1 or max_file_mb < 1 or parallel < 1:
        raise ValueError("options need timeout_s > 0, memory_mb >= 32, max_procs, max_file_mb, parallel >= 1")

    def run(program: str, stdin: str) -> sandbox.SandboxResult:
        return sandbox.run_python(program, timeout_s=timeout_s, memory_mb=memory_mb, max_procs=max_procs,
                                  max_file_mb=max_file_mb, allow_unsafe=allow_unsafe, stdin=stdin,
                                  stdout_cap=sandbox.OUTPUT_LIMIT)

    def one(completion: str, tests: Any) -> float:
        plan = code_tests.parse_tests(tests)
        blocks = _CODE_RE.findall(completion)
        if not blocks:
            return 0.0
        passed = code_verdict.score(plan, blocks[-1], run, stop_at_failure=mode == "all")
        return passed / plan.total if mode == "fraction" else float(passed == plan.total)

    def code_exec(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        tests = _column(columns, tests_column, "code_exec", len(completions))
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            return list(pool.map(one, completions, tests))

    return code_exec


def reward_model(model: str, batch_size: int = 8, max_length: int = 1024, label: int = 0,
                 chat_template: bool = True, device: str = "cpu") -> RewardFn:
    """Score prompt + completion with an AutoModelForSequenceClassification (loaded once, lazily).

    The score is the logit of `label` (the only logit for a one-label model). With a chat
    template the pair is rendered as a user and an assistant message; else concatenated.
    """
    if batch_size < 1 or max_length < 8:
        raise ValueError(f"options need batch_size >= 1 and max_length >= 8; got {batch_size}, {max_length}")
    loaded: dict[str, Any] = {}

    def reward_model(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        import torch

        if not loaded:
            loaded.update(_load_reward_model(model, device))
        tok, net = loaded["tokenizer"], loaded["model"]
        if chat_template and getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                             tokenize=False) for p, c in zip(prompts, completions, strict=True)]
        else:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        scores: list[float | None] = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length).to(device)
                logits = net(**enc).logits.float()  # (b, num_labels)
                scores += logits[:, label if logits.shape[-1] > 1 else 0].tolist()
        return scores

    return reward_model


def _load_reward_model(name: str, device: str) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    net = AutoModelForSequenceClassification.from_pretrained(name, trust_remote_code=False, dtype="float32")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.truncation_side = "left"  # keep the end of the completion
    net.config.pad_token_id = tok.pad_token_id
    return {"tokenizer": tok, "model": net.to(device).eval()}


REWARDS: dict[str, RewardFactory] = {
    "math_answer": math_answer,
    "exact_answer": exact_answer,
    "task_verifier": task_verifier,
    "think_format": think_format,
    "tag_count": tag_count,
    "cosine_length": cosine_length,
    "repetition_penalty": repetition_penalty,
    "overlong_penalty": overlong_penalty,
    "code_exec": code_exec,
    "reward_model": reward_model,
}
# sympy inside math-verify can hang on adversarial answers: these run in a killable worker.
IN_WORKER = frozenset({"math_answer", "cosine_length"})
WARM_IMPORTS = {"math_answer": ("math_verify",), "cosine_length": ("math_verify",)}
RESERVED_OPTIONS = frozenset({"allow_unsafe"})  # set by the stage from its explicit opt-in, not by options


def make_builtin(name: str, options: dict[str, Any]) -> RewardFn:
    """Call the factory of built-in `name`; bad options raise UserInputError naming the reward."""
    try:
        return REWARDS[name](**options)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"reward {name}: {exc}") from exc
