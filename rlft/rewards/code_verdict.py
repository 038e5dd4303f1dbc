"""How a `code_exec` verdict is reached: the child's harness, its data channel, the parent's judgement.

rlft/rewards/code_tests.py turns a row's tests into a plan; this module runs it (RELIABILITY.md S3):
- call tests: ONE sandboxed run of `_HARNESS`, which imports the solution as module `solution`,
  runs the setup steps, evaluates the holes and writes one JSON line per test,
  `{"t": test, "v": [["ok", value] | ["err", exception name], ...]}`, on a duplicate of its
  stdout; the solution's own stdout and stderr go to /dev/null. Values are tagged JSON
  (`_enc`); the parent decodes them into builtin types only (`_decode`), so no object of the
  solution ever reaches the parent's `==`. A test with no line, a malformed line or two lines
  (the solution can write to that pipe too) fails. The parent then evaluates each assertion
  with `evaluate`, which knows only literals, operators, subscripts and `SAFE_FUNCTIONS`/`SAFE_MATH`,
  and refuses operations whose result would be huge (a hole's value is chosen by the tested code).
- input/output tests: one sandboxed run per test, stdin fed by the parent, stdout compared by it.
The expected values exist only in the parent, which the sandbox cannot see or read.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlft.rewards.code_tests import CallTest, TestPlan
    from rlft.rewards.sandbox import SandboxResult

Runner = Callable[[str, str], "SandboxResult"]  # (program, stdin) -> outcome of one sandboxed run

_REPEAT_LIMIT = 10**6  # longest sequence the parent builds with `*`; larger exponents/shifts refused
_BIG_INT_BITS = 1 << 16  # multiplying or dividing larger ints costs the parent super-linear time
_SUPERLINEAR = (ast.Mult, ast.Pow, ast.FloorDiv, ast.Mod, ast.Div)


def _round(x: Any, ndigits: int | None = None) -> Any:
    if ndigits is not None and abs(ndigits) > 1000:
        raise ValueError("ndigits out of range")  # round(n, -10**9) would compute 10**(10**9)
    return round(x) if ndigits is None else round(x, ndigits)


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > _REPEAT_LIMIT:
        raise ValueError("range too long")
    return r


SAFE_FUNCTIONS: dict[str, Any] = {
    "abs": abs, "all": all, "any": any, "bool": bool, "chr": chr, "complex": complex, "dict": dict,
    "divmod": divmod, "enumerate": enumerate, "float": float, "frozenset": frozenset, "int": int,
    "isinstance": isinstance, "len": len, "list": list, "max": max, "min": min, "ord": ord, "range": _range,
    "repr": repr, "reversed": reversed, "round": _round, "set": set, "sorted": sorted, "str": str, "sum": sum,
    "tuple": tuple, "type": type, "zip": zip,
}
SAFE_MATH = frozenset({"isclose", "isnan", "isinf", "isfinite", "sqrt", "floor", "ceil", "fabs", "log", "exp",
                       "gcd", "pi", "e", "inf", "nan", "tau"})
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.LShift: operator.lshift,
    ast.RShift: operator.rshift, ast.BitOr: operator.or_, ast.BitXor: operator.xor, ast.BitAnd: operator.and_,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos,
                                            ast.Invert: operator.invert}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not, ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}



class _HoleFailed(Exception):
    """The child reported an error (or nothing usable) for a hole the assertion needs."""


def evaluate(node: ast.expr, holes: dict[str, Any]) -> Any:
    """Evaluate a split assertion over plain data; `holes` maps `__hole_<k>__` to a value or _HoleFailed."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in holes:
            if isinstance(holes[node.id], _HoleFailed):
                raise holes[node.id]
            return holes[node.id]
        return SAFE_FUNCTIONS[node.id]
    if isinstance(node, ast.Attribute) and node.attr in SAFE_MATH:
        return getattr(math, node.attr)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [evaluate(e, holes) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        return {evaluate(k, holes): evaluate(v, holes) for k, v in zip(node.keys, node.values, strict=True)
                if k is not None}
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](evaluate(node.operand, holes))
    if isinstance(node, ast.BinOp):
        left, right = evaluate(node.left, holes), evaluate(node.right, holes)
        _guard(node.op, left, right)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.BoolOp):  # short-circuit, returning the deciding operand as Python does
        value: Any = None
        for operand in node.values:
            value = evaluate(operand, holes)
            if bool(value) != isinstance(node.op, ast.And):
                return value
        return value
    if isinstance(node, ast.Compare):
        left = evaluate(node.left, holes)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = evaluate(comparator, holes)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    return _evaluate_rest(node, holes)


def _evaluate_rest(node: ast.expr, holes: dict[str, Any]) -> Any:
    if isinstance(node, ast.IfExp):
        return evaluate(node.body if evaluate(node.test, holes) else node.orelse, holes)
    if isinstance(node, ast.Subscript):
        return evaluate(node.value, holes)[evaluate(node.slice, holes)]
    if isinstance(node, ast.Slice):
        return slice(*(None if x is None else evaluate(x, holes) for x in (node.lower, node.upper, node.step)))
    if isinstance(node, ast.Call):
        function = evaluate(node.func, holes)
        return function(*(evaluate(a, holes) for a in node.args),
                        **{k.arg: evaluate(k.value, holes) for k in node.keywords if k.arg is not None})
    raise ValueError(f"cannot evaluate {type(node).__name__}")


def _guard(op: ast.operator, left: Any, right: Any) -> None:
    """Refuse operations whose result would be huge (a hole's value is chosen by the tested code)."""
    ints = isinstance(left, int) and isinstance(right, int)
    if ints and max(abs(left), abs(right)).bit_length() > _BIG_INT_BITS and isinstance(op, _SUPERLINEAR):
        raise ValueError("integer too large")
    if isinstance(op, ast.Pow) and ints and abs(right) > 10_000 and abs(left) > 1:
        raise ValueError("exponent too large")
    if isinstance(op, ast.LShift) and ints and right > 100_000:
        raise ValueError("shift too large")
    if isinstance(op, ast.Mult):
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(count, int) \
                    and len(seq) * count > _REPEAT_LIMIT:
                raise ValueError("sequence repetition too long")


_HARNESS = r"""
import json, os, sys
_results = os.fdopen(os.dup(1), "w")
_null = os.open(os.devnull, os.O_WRONLY)
os.dup2(_null, 1)
os.dup2(_null, 2)
if hasattr(sys, "set_int_max_str_digits"):
    sys.set_int_max_str_digits(0)


def _enc(v):
    if v is None or v is True or v is False:
        return v
    if isinstance(v, int):
        v = int(v)
        return v if -2**63 < v < 2**63 else {"x": format(v, "x")}
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return {"b": bytes(v).hex()}
    if isinstance(v, list):
        return [_enc(x) for x in v]
    if isinstance(v, tuple):
        return {"t": [_enc(x) for x in v]}
    if isinstance(v, dict):
        return {"d": [[_enc(k), _enc(x)] for k, x in v.items()]}
    if isinstance(v, frozenset):
        return {"f": [_enc(x) for x in v]}
    if isinstance(v, set):
        return {"s": [_enc(x) for x in v]}
    if isinstance(v, complex):
        return {"c": [v.real, v.imag]}
    raise TypeError("a tested value must be plain data, not " + type(v).__name__)


_ns = {"__name__": "solution"}
try:
    exec(compile(__CODE__, "solution.py", "exec"), _ns)
except BaseException:
    os._exit(1)
for _i, _steps in enumerate(__TESTS__):
    _values = []
    try:
        for _kind, _src in _steps:
            if _kind == "exec":
                exec(compile(_src, "tests.py", "exec"), _ns)
                continue
            try:
                _values.append(["ok", _enc(eval(compile(_src, "tests.py", "eval"), _ns))])
            except BaseException as _e:
                _values.append(["err", type(_e).__name__])
    except BaseException:
        break
    _results.write(json.dumps({"t": _i, "v": _values}) + "\n")
    _results.flush()
"""


def harness(calls: tuple[CallTest, ...], code: str) -> str:
    """The child program for the call tests: the solution, then each test's steps (no expected value)."""
    return _HARNESS.replace("__CODE__", repr(code)).replace("__TESTS__", repr([list(t.steps) for t in calls]))


def _decode(x: Any) -> Any:
    """Builtin value of one tagged-JSON value (see `_enc` in the harness)."""
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is list:
        return [_decode(v) for v in x]
    if type(x) is not dict or len(x) != 1:
        raise ValueError("not an encoded value")
    ((tag, body),) = x.items()
    if tag == "x" and type(body) is str:
        return int(body, 16)
    if tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "c" and type(body) is list and len(body) == 2:
        return complex(float(body[0]), float(body[1]))
    if tag == "d" and type(body) is list:
        return {_decode(k): _decode(v) for k, v in body}
    if tag in ("t", "s", "f") and type(body) is list:
        return {"t": tuple, "s": set, "f": frozenset}[tag](_decode(v) for v in body)
    raise ValueError(f"unknown tag {tag!r}")


def _hole_value(item: Any) -> Any:
    if type(item) is list and len(item) == 2 and item[0] == "ok":
        try:
            return _decode(item[1])
        except (ValueError, TypeError, RecursionError) as exc:
            return _HoleFailed(f"undecodable value: {exc}")
    return _HoleFailed(str(item[1])[:100] if type(item) is list and len(item) == 2 else "malformed")


def read_values(stdout: str) -> dict[int, list[Any] | None]:
    """Test index -> its hole values from the child's lines; None for a test reported twice."""
    found: dict[int, list[Any] | None] = {}
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if type(record) is not dict or type(record.get("t")) is not int or type(record.get("v")) is not list:
            continue
        index = record["t"]
        found[index] = None if index in found else [_hole_value(v) for v in record["v"]]
    return found


def judge(test: CallTest, values: list[Any] | None) -> bool:
    """Whether every assertion of `test` holds for these hole values (False when any is missing or failed)."""
    if values is None or len(values) != test.n_holes:
        return False
    holes = {f"__hole_{k}__": v for k, v in enumerate(values)}
    try:
        return all(bool(evaluate(check, holes)) for check in test.checks)
    except Exception:  # a failed hole, a TypeError between values, a refused huge operation: the test fails
        return False


def same_output(got: str, expected: str) -> bool:
    """Equal after dropping trailing whitespace on each line and trailing blank lines."""
    def lines(text: str) -> list[str]:
        out = [line.rstrip() for line in text.splitlines()]
        while out and not out[-1]:
            out.pop()
        return out

    return lines(got) == lines(expected)


def score(plan: TestPlan, code: str, run: Runner, stop_at_failure: bool = False) -> int:
    """Number of the plan's tests that `code` passes.

    Args:
        plan: The row's tests (rlft.rewards.code_tests.parse_tests).
        code: The solution's source (model-written).
        run: Runs a program with a stdin in the sandbox.
        stop_at_failure: Stop at the first failed test (the score is all-or-nothing).
    """
    passed = 0
    if plan.calls:
        values = read_values(run(harness(plan.calls, code), "").stdout)
        for i, test in enumerate(plan.calls):
            ok = judge(test, values.get(i))
            passed += ok
            if stop_at_failure and not ok:
                return passed
    for io in plan.ios:
        res = run(code, io.stdin)
        ok = res.status == "ok" and same_output(res.stdout, io.stdout)
        passed += ok
        if stop_at_failure and not ok:
            return passed
    return passed
