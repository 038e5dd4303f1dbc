"""Reward functions, the entry resolver and the failure policy (RELIABILITY.md R8, S4; tests 19-20)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rlft.errors import TrainingError, UserInputError
from rlft.rewards import sandbox
from rlft.rewards.builtin import REWARDS, answers_match, extract_answer
from rlft.rewards.runner import build_rewards, validate_reward_entry

USER_REWARDS = '''
import os, signal, time

def flaky(prompts, completions, **columns):
    if any("BAD" in c for c in completions):
        raise ValueError("bad sample in flaky")
    return [1.0] * len(completions)

def always_fails(prompts, completions, **columns):
    raise RuntimeError("boom from always_fails")

def hangs(prompts, completions, **columns):
    time.sleep(3600)

def uses_alarm(prompts, completions, **columns):
    def on_alarm(signum, frame):
        raise TimeoutError("alarm")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(5)
    try:
        return [float(len(c)) for c in completions]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)

def wrong_length(prompts, completions, **columns):
    return [1.0] * (len(completions) + 1)

def returns_str(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1) + ["1.0"]

def all_none(prompts, completions, **columns):
    return [None] * len(completions)

def nan_at_2(prompts, completions, **columns):
    return [float("nan") if i == 2 else 0.0 for i in range(len(completions))]

def none_for_odd(prompts, completions, **columns):
    return [None if i % 2 else 1.0 for i in range(len(completions))]

def nan_if(prompts, completions, flag):
    return [float("nan") if f else 1.0 for f in flag]

def crash_if(prompts, completions, flag):
    if any(flag):
        os._exit(3)
    print("noise on stdout must not break the protocol")
    return [1.0] * len(completions)

def answer_len(prompts, completions, answer):
    return [float(len(a)) for a in answer]

not_callable = 3
'''


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    return tmp_path


def _children() -> list[int]:
    me, out = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = dict(x.split(":", 1) for x in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in x)
        except OSError:
            continue
        if fields["PPid"].strip() == me and not fields["State"].strip().startswith("Z"):
            out.append(int(pid))
    return out


def _user(fn: str, **options: object) -> dict:
    return {"name": f"my_rewards.py:{fn}", "options": options}


# ---------------------------------------------------------------- answer extraction and built-ins

@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><answer> 42 </answer>", "42"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),
    ("so \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}", "x^{2}"),
    ("we get 3 apples and then 1,250 pears", "1,250"),
    ("no answer here", None),
    ("\\boxed{unclosed", None),
])
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred, gold, same", [
    ("42", 42, True), (" 2.50 ", "2.5", True), ("1,000", "1000", True), ("\\boxed{7}", "7", True),
    ("$7$.", "7", True), ("a  b", "a b", True), ("42", "43", False), ("1/2", "0.5", False), ("abc", "abd", False),
])
def test_answers_match(pred: str, gold: object, same: bool) -> None:
    assert answers_match(pred, gold) is same


def test_math_answer() -> None:
    fn = REWARDS["math_answer"]()
    completions = [
        "<think>half</think><answer>\\frac{1}{2}</answer>",  # symbolic == 0.5
        "<answer>0.5</answer>",
        "the result is \\boxed{3}",  # no tags: last boxed
        "3 + 4 = 7",  # no tags, no box: last number
        "<answer>I don't know</answer>",  # unparseable: 0, not an error
        "",
        "<answer>\\sqrt{</answer>",
    ]
    gold = ["0.5", "1/2", "3", "7", "5", "5", "2"]
    assert fn([""] * 7, completions, answer=gold) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert REWARDS["exact_answer"]()([""] * 2, ["<answer>1/2</answer>", "<answer>2.0</answer>"],
                                     answer=["0.5", "2"]) == [0.0, 1.0]
    with pytest.raises(KeyError, match="needs a column 'answer'"):
        fn(["p"], ["<answer>1</answer>"], solution=["1"])


@pytest.mark.parametrize("text, fmt, tags", [
    ("<think>a</think><answer>b</answer>", 1.0, 1.0),
    ("  <think>\nline 1\nline 2\n</think>\n\n<answer>\n7\n</answer>\n", 1.0, 1.0),
    ("<think>a</think>text<answer>b</answer>", 0.0, 1.0),
    ("<think>a</think><answer>b</answer> trailing", 0.0, 1.0),
    ("<answer>b</answer><think>a</think>", 0.0, 1.0),
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0, 0.5),
    ("<think><think>a</think><answer>b</answer>", 0.0, 0.75),
    ("<think>a<answer>b</answer>", 0.0, 0.75),
    ("plain text", 0.0, 0.0),
])
def test_think_format_and_tag_count(text: str, fmt: float, tags: float) -> None:
    assert REWARDS["think_format"]()([""], [text]) == [fmt]
    assert REWARDS["tag_count"]()([""], [text]) == [tags]


def test_cosine_length_hand_values() -> None:
    fn = REWARDS["cosine_length"](min_value_wrong=-10.0, max_value_wrong=0.0, min_value_correct=1.0,
                                  max_value_correct=2.0, max_len=100, unit="tokens")
    right, wrong = "<answer>5</answer>", "<answer>6</answer>"
    got = fn([""] * 6, [right, right, right, wrong, wrong, wrong], answer=["5"] * 6,
             completion_tokens=[0, 50, 150, 0, 50, 100])
    # correct: 1 + 0.5*(2-1)*(1+cos(pi*p)); wrong: 0 + 0.5*(-10-0)*(1+cos(pi*p))
    assert got == pytest.approx([2.0, 1.5, 1.0, -10.0, -5.0, 0.0])
    chars = REWARDS["cosine_length"](max_len=len(right), unit="chars")([""], [right], answer=["5"])
    assert chars == pytest.approx([0.5])  # min_value_correct at max_len
    with pytest.raises(KeyError, match="completion_tokens"):
        fn([""], [right], answer=["5"])


def test_repetition_penalty() -> None:
    fn = REWARDS["repetition_penalty"](ngram=3, max_penalty=-1.0)
    got = fn([""] * 4, ["a b c a b c", "a b c d e", "a b", "A B C a b c"])
    assert got == pytest.approx([-0.25, 0.0, 0.0, -0.25])  # 4 trigrams, 3 unique -> 1 - 3/4
    with pytest.raises(ValueError, match="max_penalty"):
        REWARDS["repetition_penalty"](max_penalty=0.5)


def test_overlong_penalty() -> None:
    fn = REWARDS["overlong_penalty"](max_len=10, cache_len=4)
    got = fn([""] * 5, ["x"] * 5, completion_tokens=[3, 6, 8, 10, 11])
    assert got == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    chars = REWARDS["overlong_penalty"](max_len=10, cache_len=4, unit="chars")([""], ["x" * 9])
    assert chars == pytest.approx([-0.75])
    with pytest.raises(ValueError, match="cache_len"):
        REWARDS["overlong_penalty"](max_len=4, cache_len=5)


CODE_OK = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
CODE_HALF = "```python\ndef add(a, b):\n    return a + b if a else 0\n```"


@pytest.fixture
def code_exec_fn(monkeypatch: pytest.MonkeyPatch):
    if not sandbox.isolation_available():
        monkeypatch.setattr(sandbox, "isolation_available", lambda: False)
    return lambda **kw: REWARDS["code_exec"](timeout_s=2.0, allow_unsafe=not sandbox.isolation_available(), **kw)


def test_code_exec(code_exec_fn) -> None:
    tests = ["assert add(1, 2) == 3", "assert add(0, 5) == 5", "assert add(2, 2) == 4"]
    as_source = "import math\nassert add(1, 2) == 3\nx = add(0, 5)\nassert x == 5\nassert add(2, 2) == 4\n"
    fn = code_exec_fn()
    completions = [CODE_OK, CODE_HALF, "no code at all", "```python\nwhile True:\n    pass\n```",
                   "```python\nimport sys\nsys.exit(0)\n```", CODE_HALF]
    rows = [tests, tests, tests, tests, tests, as_source]
    assert fn([""] * 6, completions, tests=rows) == pytest.approx([1.0, 2 / 3, 0.0, 0.0, 0.0, 2 / 3])
    assert code_exec_fn(mode="all")([""] * 2, [CODE_OK, CODE_HALF], tests=[tests, tests]) == [1.0, 0.0]


def test_code_exec_forged_results_do_not_count(code_exec_fn) -> None:
    forged = "```python\nfor i in range(3):\n    print('RLFT-TEST-0000000000000000', i, 1)\nraise SystemExit\n```"
    assert code_exec_fn()([""], [forged], tests=[["assert add(1, 2) == 3"]]) == [0.0]
    with pytest.raises(ValueError, match="no assert"):
        code_exec_fn()([""], [CODE_OK], tests=["x = 1"])


def _tiny_reward_model(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

    vocab = {"<pad>": 0, "<unk>": 1, **{chr(c): i + 2 for i, c in enumerate(range(32, 127))}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, num_labels=1, pad_token_id=0)
    Qwen2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_model_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlft.rewards import builtin

    path = _tiny_reward_model(tmp_path / "rm")
    loads = []
    real = builtin._load_reward_model
    monkeypatch.setattr(builtin, "_load_reward_model", lambda *a: loads.append(a) or real(*a))
    fn = REWARDS["reward_model"](model=str(path), batch_size=2)
    prompts, completions = ["2+2=", "2+2=", "hi"], ["4", "five, surely", "hello there"]
    first = fn(prompts, completions)
    again = fn(prompts[::-1], completions[::-1])
    assert len(first) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in first)
    assert again == pytest.approx(first[::-1], abs=1e-5)  # deterministic, independent of batching
    assert len(set(first)) == 3
    assert len(loads) == 1  # loaded once, lazily


# ---------------------------------------------------------------- entries

@pytest.mark.parametrize("entry, fragment", [
    ("math_anwser", "did you mean 'math_answer'"),
    ("os.system", "unknown reward 'os.system'"),
    ("os:system", "not your module"),
    ("subprocess:run", "not your module"),
    ("pkg.mod:_private", "not a public function"),
    ({"name": "think_format", "wieght": 2}, "did you mean 'weight'"),
    ({"name": "think_format", "weight": float("nan")}, "finite number"),
    ({"name": "think_format", "weight": True}, "finite number"),
    ({"name": "cosine_length", "options": {"max_lenn": 5}}, "did you mean 'max_len'"),
    ({"name": "code_exec", "options": {"allow_unsafe": True}}, "allow_unsafe_code_exec"),
    ({"name": "reward_model"}, "needs option 'model'"),
    ({"name": "overlong_penalty", "options": {"max_len": 4, "cache_len": 8}}, "cache_len"),
    ({"name": "think_format", "options": {"none_as": "maybe"}}, "none_as"),
    ({"name": "pkg.mod:fn", "options": {"ngram": 3}}, "only the options"),
    (3, "a reward is a name or a mapping"),
])
def test_validate_reward_entry_rejects(entry: object, fragment: str) -> None:
    problem = validate_reward_entry(entry)
    assert problem is not None and fragment in problem


def test_validate_reward_entry_accepts(recipe_dir: Path) -> None:
    for entry in ["math_answer", "pkg.mod:fn", "my_rewards.py:flaky", {"name": "tag_count", "weight": 0.5},
                  {"name": "overlong_penalty", "options": {"max_len": 8, "cache_len": 2, "timeout_s": 3}}]:
        assert validate_reward_entry(entry, recipe_dir) is None
    assert "not found" in validate_reward_entry("nope.py:f", recipe_dir)
    assert "outside the recipe directory" in validate_reward_entry("../x.py:f", recipe_dir / "sub")


def test_validation_imports_no_torch() -> None:
    code = ("import sys; from rlft.rewards.runner import validate_reward_entry as v; "
            "assert 'did you mean' in v('tag_cont'); assert v({'name': 'reward_model', 'options': {'model': 'x'}}) is None; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("entry, fragment", [
    ("missing.py:f", "reward file not found"),
    ("my_rewards.py:flaki", "has no function 'flaki' (did you mean 'flaky'?)"),
    ("my_rewards.py:not_callable", "is a int, not a function"),
])
def test_bad_user_entries_are_named(recipe_dir: Path, entry: str, fragment: str) -> None:
    with pytest.raises(UserInputError, match=r"rewards\[1\]") as err:
        build_rewards(["tag_count", entry], recipe_dir)
    assert fragment in str(err.value)


def test_module_rewards_ignore_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "rwpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text("def ones(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    shadow = tmp_path / "cwd"
    shadow.mkdir()
    canary = tmp_path / "canary"
    (shadow / "json.py").write_text(f"open({str(canary)!r}, 'w').write('imported')\n")
    (shadow / "localmod.py").write_text("def f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(shadow)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(shadow))
    monkeypatch.syspath_prepend("")
    with build_rewards(["rwpkg.scores:ones"], tmp_path) as rs:
        assert rs(["p"], ["c"]).total.tolist() == [1.0]
    with pytest.raises(UserInputError, match="cannot import it"):
        build_rewards(["localmod:f"], tmp_path)
    assert not canary.exists()


# ---------------------------------------------------------------- failure policy (tests 19 and 20)

def test_errors_counted_exactly(recipe_dir: Path) -> None:
    n = 200
    completions = ["fine"] * n
    completions[17] = completions[150] = "BAD"
    with build_rewards([_user("flaky"), "tag_count"], recipe_dir) as rs:
        out = rs([""] * n, completions, {})
    assert out.errors == {"my_rewards.py:flaky": 2, "tag_count": 0}
    assert out.error_rate == pytest.approx(2 / (2 * n))
    assert out.failed.nonzero().flatten().tolist() == [17, 150]
    flaky = out.per_function["my_rewards.py:flaky"]
    assert torch.isnan(flaky[[17, 150]]).all() and flaky.nansum() == n - 2
    assert out.total[17] == 0.0 and out.total.dtype == torch.float32 and out.total.shape == (n,)


def test_all_failing_aborts_at_first_call_with_one_traceback(recipe_dir: Path) -> None:
    with build_rewards(["tag_count", _user("always_fails")], recipe_dir) as rs:
        with pytest.raises(TrainingError) as err:
            rs(["p"] * 4, ["c"] * 4, {})
    msg = str(err.value)
    assert "'my_rewards.py:always_fails' failed on all 4 samples at the first call" in msg
    assert msg.count("Traceback (most recent call last)") == 1 and "boom from always_fails" in msg


def test_error_rate_over_threshold_aborts(recipe_dir: Path) -> None:
    batch = ["BAD"] * 2 + ["ok"] * 18  # 10% errors
    with build_rewards([_user("flaky")], recipe_dir, max_error_rate=0.05, min_samples=64) as rs:
        for _ in range(3):  # 60 samples: under min_samples, counted only
            assert rs([""] * 20, batch).errors["my_rewards.py:flaky"] == 2
        with pytest.raises(TrainingError, match=r"'my_rewards.py:flaky' failed on 8 of 80 samples \(10.0%\)"):
            rs([""] * 20, batch)


def test_hung_function_killed_pool_constant(recipe_dir: Path) -> None:
    timeout = 0.5
    entries = [_user("hangs", timeout_s=timeout), _user("uses_alarm")]
    before = set(_children())  # e.g. the fork server of other test modules
    with build_rewards(entries, recipe_dir, max_error_rate=1.0) as rs:
        pool = sorted(set(_children()) - before)
        assert len(pool) == 2
        for _ in range(10):
            t0 = time.monotonic()
            out = rs(["p"] * 3, ["a", "bb", "ccc"], {})
            assert time.monotonic() - t0 <= timeout + 1.0
            assert out.errors == {"my_rewards.py:hangs": 3, "my_rewards.py:uses_alarm": 0}
            assert out.per_function["my_rewards.py:uses_alarm"].tolist() == [1.0, 2.0, 3.0]
        assert rs.workers["my_rewards.py:hangs"].restarts == 10
        assert len(set(_children()) - before) == 2
    assert set(_children()) - before == set()


def test_signal_alarm_function_called_from_a_thread(recipe_dir: Path) -> None:
    results = []
    with build_rewards([_user("uses_alarm")], recipe_dir) as rs:
        worker = threading.Thread(target=lambda: results.append(rs(["p", "p"], ["ab", "abcd"])))
        worker.start()
        worker.join(30)
    assert results[0].errors == {"my_rewards.py:uses_alarm": 0}
    assert results[0].total.tolist() == [2.0, 4.0]


def test_crashed_worker_counted_and_restarted(recipe_dir: Path) -> None:
    with build_rewards([_user("crash_if")], recipe_dir, max_error_rate=1.0) as rs:
        assert rs(["p"] * 2, ["a", "b"], {"flag": [False, False]}).errors == {"my_rewards.py:crash_if": 0}
        assert rs(["p"] * 2, ["a", "b"], {"flag": [False, True]}).errors == {"my_rewards.py:crash_if": 2}
        assert rs(["p"] * 2, ["a", "b"], {"flag": [False, False]}).total.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("fn, fragment", [
    ("wrong_length", "returned 4 values for 3 completions"),
    ("returns_str", "returned a str '1.0' at sample 2"),
    ("all_none", "returned None for every sample"),
    ("nan_at_2", "returned nan at sample 2"),
])
def test_contract_violations_name_function_and_sample(recipe_dir: Path, fn: str, fragment: str) -> None:
    with build_rewards([_user(fn)], recipe_dir) as rs:
        with pytest.raises(TrainingError, match=f"my_rewards.py:{fn}") as err:
            rs(["p"] * 3, ["a", "b", "c"], {})
    assert fragment in str(err.value)


def test_none_policy(recipe_dir: Path) -> None:
    entries = [{**_user("none_for_odd", none_as=policy)} for policy in ("zero", "skip", "error")]
    with build_rewards(entries, recipe_dir, max_error_rate=1.0) as rs:
        assert rs.names == ["my_rewards.py:none_for_odd", "my_rewards.py:none_for_odd#2", "my_rewards.py:none_for_odd#3"]
        out = rs(["p"] * 4, ["a"] * 4)
    zero, skip, error = (out.per_function[name] for name in rs.names)
    assert zero.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert skip[0] == 1.0 and torch.isnan(skip[[1, 3]]).all()
    assert out.errors == {rs.names[0]: 0, rs.names[1]: 0, rs.names[2]: 2}
    assert torch.isnan(error[[1, 3]]).all() and out.total.tolist() == [3.0, 0.0, 3.0, 0.0]


def test_nan_after_first_call_is_counted(recipe_dir: Path) -> None:
    with build_rewards([_user("nan_if")], recipe_dir, max_error_rate=1.0) as rs:
        rs(["p"] * 2, ["a", "b"], {"flag": [False, False]})
        out = rs(["p"] * 2, ["a", "b"], {"flag": [False, True]})
    assert out.errors == {"my_rewards.py:nan_if": 1} and out.failed.tolist() == [False, True]


def test_weights_columns_and_builtins_together(recipe_dir: Path) -> None:
    entries = [{"name": "think_format", "weight": 0.5}, "exact_answer", {"name": "my_rewards.py:answer_len", "weight": 2}]
    with build_rewards(entries, recipe_dir) as rs:
        assert rs.weights == [0.5, 1.0, 2.0]
        out = rs(["p", "p"], ["<think>t</think><answer>12</answer>", "12"], {"answer": ["12", "123"]})
    assert out.total.tolist() == pytest.approx([0.5 + 1.0 + 4.0, 0.0 + 0.0 + 6.0])
    with pytest.raises(ValueError, match="answer must have 2 entries"):
        build_rewards(["tag_count"], recipe_dir)(["p", "p"], ["a", "b"], {"answer": ["1"]})


def test_math_answer_runs_in_a_worker(recipe_dir: Path) -> None:
    with build_rewards(["math_answer"], recipe_dir) as rs:
        assert "math_answer" in rs.workers
        out = rs(["p"] * 3, ["<answer>\\frac{1}{2}</answer>", "<answer>?</answer>", "\\boxed{4}"],
                 {"answer": ["0.5", "1", "4"]})
    assert out.total.tolist() == [1.0, 0.0, 1.0] and out.error_rate == 0.0


def test_gsm8k_style_gold_is_compared_by_its_final_answer() -> None:
    from rlft.rewards.builtin import answers_match, gold_answer

    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert gold_answer(gold) == "72"
    assert answers_match("72", gold) and not answers_match("24", gold)
    fn = REWARDS["math_answer"]()
    assert fn(["q", "q"], ["<answer>72</answer>", "<answer>24</answer>"], answer=[gold, gold]) == [1.0, 0.0]


def test_task_verifier_uses_the_tasks_own_checker() -> None:
    fn = REWARDS["task_verifier"]()
    done = "<think>4+4=8,4+3=7</think><answer>78</answer>"
    torn = "<think>4+4=8,4+3=7</think><answer>78</a\ufffdinswer>"  # math_answer would still find 78
    out = fn(["q"] * 3, [done, torn, "<answer>77</answer>"], task=["arith"] * 3, answer=["78"] * 3)
    assert out == [1.0, 0.0, 0.0]
