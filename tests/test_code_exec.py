"""The code_exec reward: honest scores, test forms, refusals, and verdicts the tested code cannot forge (S3)."""

from __future__ import annotations

import ast
import json

import pytest
import reward_hacks as hacks
import sandbox_battery as battery
from forkserver import record_result

from rlft.rewards import code_tests, code_verdict, sandbox
from rlft.rewards.builtin import REWARDS

needs_isolation = pytest.mark.skipif(not sandbox.isolation_available(), reason="no namespace isolation here")


def _score(code: str, tests: object, **options: object) -> float:
    fn = REWARDS["code_exec"](timeout_s=5.0, memory_mb=256, **options)
    return fn([""], [f"Solution:\n```python\n{code}```\n"], tests=[tests])[0]


def _partial(io: bool = False) -> str:
    """digest() right only for words of at most 4 letters: 1 of the 3 tests ('rlft')."""
    body = hacks.SOLUTION.replace("def digest(s):\n", "def digest(s):\n    if len(s) > 4:\n        return 0\n")
    return body + ("print(digest(input().strip()))\n" if io else "")


@needs_isolation
@pytest.mark.parametrize("form", ["snippets", "source", "io"])
def test_honest_solutions_score_by_tests_passed(form: str) -> None:
    """Correct / partially correct / wrong give 1 / fraction / 0, in every test form."""
    tests = {"snippets": hacks.CALL_TESTS, "source": "\n".join(hacks.CALL_TESTS), "io": hacks.IO_TESTS}[form]
    io = form == "io"
    correct, wrong = (hacks.IO_SOLUTION, "print(0)\n") if io else (hacks.SOLUTION, "def digest(s):\n    return 0\n")
    assert [_score(c, tests) for c in (correct, _partial(io), wrong)] == pytest.approx([1.0, 1 / 3, 0.0])
    assert [_score(c, tests, mode="all") for c in (correct, _partial(io))] == [1.0, 0.0]


@needs_isolation
def test_reward_hacks_score_zero() -> None:
    """Every hack of the battery scores 0, no expected value reaches the sandboxed child, no process is left."""
    baseline = set(battery.leftover_processes(set()))
    attempts = hacks.group_reward_hacks()
    record_result("test_reward_hacks_score_zero", sum(a.contained for a in attempts), len(attempts),
                  escaped=[f"{a.name}: {a.detail}" for a in attempts if not a.contained])
    assert len(attempts) >= 20
    assert all(a.contained for a in attempts), [f"{a.name}: {a.detail}" for a in attempts if not a.contained]
    assert battery.leftover_processes(baseline) == []


ASSERT_FORMS = """
import math
from math import isclose
data = [3, 1, 2]
expected = sorted(data)
assert sort(data) == expected
assert sort([2, 1]) == [1, 2] and sort([]) == []
assert not sort([1]) == [2]
assert sorted(sort(data), reverse=True)[0] == 3
assert math.isclose(mean(data), 2.0) and isclose(mean([1, 2]), 1.5, rel_tol=1e-9)
assert abs(mean([0.1, 0.2]) - 0.15) < 1e-9
assert mean([]) is None
assert isinstance(sort(data), list) and len(sort(data)) == 3
assert set(sort(data)) == {1, 2, 3} and sort(data)[1:] == [2, 3]
assert 1 < mean(data) <= 2.0
s = Stack()
s.push(5)
assert s.pop() == 5
assert pair(1) == (1, 1) and pair(1) != [1, 1]
assert words('A b') == {'a': 1, 'b': 1}
"""
SOLUTION_FORMS = """
from collections import namedtuple, OrderedDict
P = namedtuple("P", "x y")
def sort(xs): return sorted(xs)
def mean(xs): return sum(xs) / len(xs) if xs else None
def pair(x): return P(x, x)
def words(t): return OrderedDict((w.lower(), 1) for w in t.split())
class Stack:
    def __init__(self): self.items = []
    def push(self, x): self.items.append(x)
    def pop(self): return self.items.pop()
"""


@needs_isolation
def test_assertion_forms_are_judged_in_the_parent() -> None:
    plan = code_tests.parse_tests(ASSERT_FORMS)
    assert plan.total == 13
    assert all("sorted([3, 1, 2])" not in src and "expected" not in src for c in plan.calls for _, src in c.steps)
    assert _score(SOLUTION_FORMS, ASSERT_FORMS) == 1.0
    broken = SOLUTION_FORMS.replace("return sorted(xs)", "return list(xs)").replace("P(x, x)", "[x, x]")
    assert _score(broken, ASSERT_FORMS) == pytest.approx(9 / 13)  # the order of sort() and the type of pair()


@needs_isolation
def test_input_output_forms() -> None:
    spec = {"inputs": ["2 3\n", "10 5\n"], "outputs": ["5\n", "15"]}
    adder = "a, b = map(int, input().split())\nprint(a + b, '  ')\nprint()\n"  # trailing blanks ignored
    assert _score(adder, spec) == 1.0
    assert _score(adder, json.dumps(spec)) == 1.0  # as stored by APPS-style data sets
    mixed = ["assert add(1, 2) == 3", {"input": "1 2", "output": "3"}]
    both = "def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(*map(int, input().split())))\n"
    assert _score(both, mixed) == 1.0
    assert _score("import sys\nprint(3)\nsys.exit(1)\n", [{"input": "", "output": "3"}]) == 0.0  # exit status counts


@pytest.mark.parametrize("tests, message", [
    (["def check(f):\n    assert f(1) == 2\ncheck(add)"], r"tests\[0\] line 1 .*only asserts, imports, assignments"),
    (["for i in range(3):\n    assert add(i, 0) == i"], "only asserts"),
    (["assert 1 + 1 == 2"], "does not call the solution"),
    (["assert all(add(i, 0) == i for i in range(3))"], "would be computed by the tested program"),
    (["assert check(add(1, 2) == 3)"], "would be computed by the tested program"),
    (["assert add(1, 2) == math.factorial(3)"], "does not involve the solution"),
    (["import math\ny = math.factorial(3)\nassert add(1, 2) == y"], "does not involve the solution"),
    ("x = 1", "no assert"),
    ({"inputs": ["1"], "outputs": []}, "equally long"),
    ("assert add(1, 2) ==", "does not parse"),
])
def test_tests_that_cannot_be_judged_outside_the_child_are_refused(tests: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        code_tests.parse_tests(tests)


def test_child_steps_never_hold_the_expected_side() -> None:
    plan = code_tests.parse_tests("want = 987654\nx = add(1, 2)\nassert x == want\nassert add(want, 1) == 987655")
    sources = [src for call in plan.calls for _, src in call.steps]
    assert sources == ["x = add(1, 2)", "x", "add(987654, 1)"]  # an input is written in; the expected is not
    assert ast.unparse(plan.calls[0].checks[0]) == "__hole_0__ == 987654"


def test_parent_evaluation_refuses_huge_work() -> None:
    check = code_tests.parse_tests(["assert f(1) ** 2 == 4", "assert 'ab' * f(1) == 'abab'",
                                    "assert f(1) * f(1) > 0", "assert round(f(1), -10**9) == 0"])
    big = 1 << 200_000
    assert code_verdict.judge(check.calls[0], [2]) and not code_verdict.judge(check.calls[0], [big])
    assert code_verdict.judge(check.calls[1], [2]) and not code_verdict.judge(check.calls[1], [10**9])
    assert not code_verdict.judge(check.calls[2], [big, big]) and code_verdict.judge(check.calls[2], [3, 3])
    assert not code_verdict.judge(check.calls[3], [5])


def test_result_channel_is_data_and_duplicates_fail() -> None:
    lines = [json.dumps({"t": 0, "v": [["ok", {"t": [1, {"s": [2]}, {"b": "ff"}, {"x": "-1f"}]}]]}),
             json.dumps({"t": 1, "v": [["ok", 5]]}), json.dumps({"t": 1, "v": [["ok", 5]]}),
             json.dumps({"t": 2, "v": [["err", "ZeroDivisionError"], ["ok", {"evil": 1}]]}), "[" * 100_000]
    values = code_verdict.read_values("\n".join(lines))
    assert values[0] == [(1, {2}, b"\xff", -31)] and values[1] is None
    assert all(isinstance(v, code_verdict._HoleFailed) for v in values[2])
