"""A `code_exec` row's tests as a plan whose verdicts the tested code can neither forge nor read (RELIABILITY.md S3).

The model's code and the test code share an interpreter, so nothing that interpreter reports
can be trusted: it can print any marker, call any reporting function, exit 0 early, replace
builtins, or return objects whose `__eq__` is always true. So the sandboxed child never judges
and never sees what is expected; it only computes values, and the trainer (the parent) judges:

- call tests (`assert` statements). The parent splits each assertion with `ast`. The parts that
  run the solution are *holes*: a call of a function the test did not define (`add(1, 2)`,
  `s.split()`), or a name the test's setup computed from one (`x = add(0, 5)`). The child
  evaluates only the holes, in the solution's namespace, and writes their values as data
  (tagged JSON of None, bool, int, float, complex, str, bytes, list, tuple, dict, set,
  frozenset; anything else is an error). The parent decodes that data into builtin values and
  evaluates the rest of the assertion itself: comparisons, the expected literals, arithmetic,
  `and`/`or`/`not`, indexing and a fixed set of pure functions (`abs`, `len`, `sorted`, `set`,
  `round`, `isinstance`, `math.isclose`, ...: these names always mean the builtins, see
  rlft/rewards/code_verdict.py, which runs the plan). Literal setup assignments (`expected = [1, 2]`)
  stay in the parent too; where a hole uses one as an input, its literal is written into the
  hole. Whatever the child writes is only a claim about what the solution returned: matching
  the expected value still means producing it, without ever seeing it.
- input/output tests (`{"input": ..., "output": ...}`): the program runs once per test with the
  input on stdin; the parent compares its stdout with the expected output, ignoring trailing
  whitespace on each line and trailing blank lines, and requires exit status 0.

Rules for a call test (anything else is refused with ValueError naming the statement, which the
reward counts as an error, never as a score):
- statements: `assert`, `import`/`from ... import`, assignments to names, and expression
  statements (e.g. `random.seed(0)`); no def, class, loop, if, with or try;
- each assertion must contain a hole (it must test the solution);
- a hole, and any setup statement the child runs, contains no comparison, `and`/`or`/`not`,
  conditional expression, lambda or comprehension: those would compute a verdict, or carry an
  expected value, inside the child;
- a hole must involve a name the test did not define (a solution function or a value computed
  from one): `math.factorial(5)` on the expected side would be test data computed by the child.
A snippet in a list of tests is one test (all its assertions must pass); in one source string
each top-level `assert` is a test, run after the setup statements before it. A failing setup
statement fails that test and every later one.
"""

from __future__ import annotations

import ast
import builtins
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from rlft.rewards.code_verdict import SAFE_FUNCTIONS, SAFE_MATH, evaluate

_FORBIDDEN_IN_CHILD = (ast.Compare, ast.BoolOp, ast.IfExp, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
                       ast.GeneratorExp, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)
_BUILTIN_NAMES = frozenset(dir(builtins))
_STDLIB_MODULES = frozenset(sys.stdlib_module_names)
@dataclass(frozen=True)
class CallTest:
    """One call test: what the child runs and what the parent checks.

    steps: ("exec", setup statement) or ("eval", hole expression), in order; the child returns
    one value per "eval". checks: the assertions, each hole replaced by the name `__hole_<k>__`.
    """

    steps: tuple[tuple[str, str], ...]
    checks: tuple[ast.expr, ...]

    @property
    def n_holes(self) -> int:
        return sum(kind == "eval" for kind, _ in self.steps)


@dataclass(frozen=True)
class IOTest:
    """One input/output test: stdin for the program and the stdout expected from it."""

    stdin: str
    stdout: str


@dataclass(frozen=True)
class TestPlan:
    """A row's tests, in the order they count."""

    calls: tuple[CallTest, ...]
    ios: tuple[IOTest, ...]

    @property
    def total(self) -> int:
        return len(self.calls) + len(self.ios)


def parse_tests(tests: Any) -> TestPlan:
    """Turn a row's tests column into a plan the parent can judge.

    Args:
        tests: One Python source (each top-level assert a test); a list whose items are snippets
            (each one test) or `{"input", "output"}` mappings; or `{"inputs": [...], "outputs": [...]}`
            (also as a JSON string).

    Raises:
        ValueError: a test that cannot be judged outside the child (see the module docstring).
    """
    if isinstance(tests, str) and tests.lstrip().startswith("{"):
        try:
            tests = json.loads(tests)
        except ValueError:
            pass
    if isinstance(tests, dict):
        return TestPlan((), _io_pairs(tests))
    parser = _Parser()
    if isinstance(tests, str):
        return TestPlan(tuple(parser.source(tests, one_test=False, label="tests")), ())
    if not isinstance(tests, (list, tuple)):
        raise ValueError(f"tests must be a source string, a list or a mapping; got {type(tests).__name__}")
    calls: list[CallTest] = []
    ios: list[IOTest] = []
    for i, item in enumerate(tests):
        if isinstance(item, dict):
            ios.extend(_io_pairs({"inputs": [item.get("input")], "outputs": [item.get("output")]}, f"tests[{i}]"))
        else:
            calls.extend(parser.source(str(item), one_test=True, label=f"tests[{i}]"))
    return TestPlan(tuple(calls), tuple(ios))


def _io_pairs(spec: dict[str, Any], label: str = "tests") -> tuple[IOTest, ...]:
    inputs, outputs = spec.get("inputs"), spec.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise ValueError(f"{label}: an input/output test needs 'input' and 'output' strings "
                         "(or equally long 'inputs' and 'outputs' lists)")
    if not all(isinstance(x, str) for x in inputs + outputs):
        raise ValueError(f"{label}: inputs and outputs must be strings")
    return tuple(IOTest(i, o) for i, o in zip(inputs, outputs, strict=True))


class _Parser:
    """Splits test sources; remembers literal constants and which names the test itself defined."""

    def __init__(self) -> None:
        self.consts: dict[str, ast.expr] = {}  # name -> literal expression the parent evaluates
        self.const_src: dict[str, ast.expr] = {}  # name -> the same as written (inlined into child code)
        self.test_names: set[str] = set()  # names the test defined without calling the solution
        self.derived: set[str] = set()  # names the test's setup computed from the solution
        self.math_names: dict[str, str] = {"math": ""}  # name -> attribute of `math` ("" = the module)

    def source(self, text: str, one_test: bool, label: str) -> list[CallTest]:
        """Call tests of one source: one test for a snippet, one per top-level assert otherwise."""
        try:
            tree = ast.parse(text)
        except SyntaxError as exc:
            raise ValueError(f"{label} does not parse as Python: {exc}") from exc
        tests: list[CallTest] = []
        steps: list[tuple[str, str]] = []
        checks: list[ast.expr] = []
        holes: list[str] = []  # this test's hole sources; hole k is the k-th "eval" step
        for stmt in tree.body:
            line = (ast.get_source_segment(text, stmt) or ast.unparse(stmt)).splitlines()[0]
            where = f"{label} line {stmt.lineno} `{line[:80]}`"  # one line per error
            if not isinstance(stmt, ast.Assert):
                steps += self.setup(stmt, where)
                continue
            first = len(holes)
            checks.append(self.split(stmt.test, holes, where))
            if len(holes) == first:
                raise ValueError(f"{where}: does not call the solution")
            steps += [("eval", h) for h in holes[first:]]
            if not one_test:
                tests.append(CallTest(tuple(steps), tuple(checks)))
                steps, checks, holes = [], [], []
        if one_test and checks:
            tests.append(CallTest(tuple(steps), tuple(checks)))
        if not tests:
            raise ValueError(f"{label}: the row's tests contain no assert")
        return tests

    def setup(self, stmt: ast.stmt, where: str) -> list[tuple[str, str]]:
        """Child steps for a statement other than assert; literal assignments stay in the parent."""
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            return []  # a docstring
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                name = alias.asname or alias.name.split(".")[0]
                self.test_names.add(name)
                if isinstance(stmt, ast.Import) and alias.name == "math":
                    self.math_names[name] = ""
                elif isinstance(stmt, ast.ImportFrom) and stmt.module == "math" and alias.name in SAFE_MATH:
                    self.math_names[name] = alias.name
            return [("exec", ast.unparse(stmt))]
        if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets) \
                and self.parent_side(stmt.value):
            value = self.split(stmt.value, [], where)
            try:
                evaluate(value, {})
            except Exception as exc:
                raise ValueError(f"{where}: {type(exc).__name__}: {exc}") from exc
            for target in stmt.targets:
                assert isinstance(target, ast.Name)
                self.consts[target.id], self.const_src[target.id] = value, cast(ast.expr, self.inline(stmt.value))
            return []
        if isinstance(stmt, ast.Expr) or isinstance(stmt, ast.Assign) and all(map(_is_names, stmt.targets)):
            self.child_code(stmt, where)
            derived = bool(self.solution_names(stmt.value))
            for target in getattr(stmt, "targets", []):
                for node in ast.walk(target):
                    if isinstance(node, ast.Name):
                        self.consts.pop(node.id, None)
                        self.const_src.pop(node.id, None)
                        (self.test_names.discard if derived else self.test_names.add)(node.id)
                        (self.derived.add if derived else self.derived.discard)(node.id)
            return [("exec", ast.unparse(self.inline(stmt)))]
        raise ValueError(f"{where}: a test may hold only asserts, imports, assignments to names and "
                         "expression statements")

    def parent_side(self, node: ast.expr) -> bool:
        """Whether the parent can evaluate `node` entirely (no hole in it)."""
        return self.is_parent_node(node) and all(self.parent_side(c) for c in _subexpressions(node))

    def is_parent_node(self, node: ast.expr) -> bool:
        """Whether the parent evaluates this node itself (its subexpressions may still be holes)."""
        if isinstance(node, (ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.UnaryOp, ast.BinOp,
                             ast.BoolOp, ast.Compare, ast.IfExp, ast.Subscript, ast.Slice)):
            return not any(isinstance(c, ast.Starred) for c in _subexpressions(node))
        if isinstance(node, ast.Name):
            return node.id in self.consts or self.is_safe_function(node)
        if isinstance(node, ast.Attribute):
            return self.is_safe_function(node)
        if isinstance(node, ast.Call):
            return (self.is_safe_function(node.func) and all(k.arg is not None for k in node.keywords)
                    and not any(isinstance(a, ast.Starred) for a in node.args))
        return False

    def is_safe_function(self, node: ast.expr) -> bool:
        """A builtin of SAFE_FUNCTIONS the test did not rebind, or a SAFE_MATH member of `math`."""
        if isinstance(node, ast.Name):
            return (node.id in SAFE_FUNCTIONS and node.id not in self.test_names and node.id not in self.consts
                    or self.math_names.get(node.id, "") in SAFE_MATH)
        return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and self.math_names.get(node.value.id) == "" and node.attr in SAFE_MATH)

    def split(self, node: ast.expr, holes: list[str], where: str) -> ast.expr:
        """A copy of `node` for the parent: each hole replaced by `__hole_<k>__`, its source appended to `holes`."""
        if not self.is_parent_node(node):
            return self.hole(node, holes, where)
        if isinstance(node, ast.Name):
            if node.id in self.consts:
                return self.consts[node.id]
            if node.id in self.math_names:
                return ast.Attribute(ast.Name("math", ast.Load()), self.math_names[node.id], ast.Load())
            return ast.Name(node.id, ast.Load())
        if isinstance(node, ast.Attribute):  # math.<SAFE_MATH member>
            return ast.Attribute(ast.Name("math", ast.Load()), node.attr, ast.Load())
        fields: dict[str, Any] = {}
        for name, value in ast.iter_fields(node):
            if isinstance(value, ast.expr):
                value = self.split(value, holes, where)
            elif isinstance(value, list):
                value = [self.split(v, holes, where) if isinstance(v, ast.expr)
                         else ast.keyword(v.arg, self.split(v.value, holes, where)) if isinstance(v, ast.keyword)
                         else v for v in value]
            fields[name] = value
        return type(node)(**fields)

    def hole(self, node: ast.expr, holes: list[str], where: str) -> ast.expr:
        """Register `node` as a value the child computes; return its placeholder."""
        self.child_code(node, where)
        if not self.solution_names(node):
            raise ValueError(f"{where}: `{ast.unparse(node)}` does not involve the solution, so the tested "
                             "program would compute a value the test compares against; write it as a literal")
        holes.append(ast.unparse(self.inline(node)))
        return ast.Name(f"__hole_{len(holes) - 1}__", ast.Load())

    def child_code(self, node: ast.AST, where: str) -> None:
        """Refuse code for the child that would decide a verdict or carry an expected value."""
        for sub in ast.walk(node):
            if isinstance(sub, _FORBIDDEN_IN_CHILD) or isinstance(sub, ast.UnaryOp) and isinstance(sub.op, ast.Not):
                raise ValueError(f"{where}: `{ast.unparse(sub)}` would be computed by the tested program; "
                                 "comparisons and conditions belong outside function calls")

    def solution_names(self, node: ast.AST) -> set[str]:
        """Names in `node` the test did not define: the solution's (or values computed from it).

        A standard-library module used as `module.attr` (`math.factorial(5)`) is not the solution's,
        even when the test relies on the solution to import it.
        """
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        modules = {n.value.id for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                   and n.value.id in _STDLIB_MODULES}
        return (names - self.test_names - set(self.consts) - _BUILTIN_NAMES - modules) | (names & self.derived)

    def inline(self, node: ast.AST) -> ast.AST:
        """A copy of `node` with the literal constants written in: the child never gets them by name."""
        consts = self.const_src

        class Inline(ast.NodeTransformer):
            def visit_Name(self, node: ast.Name) -> ast.AST:  # noqa: N802 - NodeTransformer protocol
                return consts.get(node.id, node) if isinstance(node.ctx, ast.Load) else node

        copy = ast.parse(ast.unparse(node), mode="eval").body if isinstance(node, ast.expr) \
            else ast.parse(ast.unparse(node)).body[0]
        return ast.fix_missing_locations(Inline().visit(copy))


def _subexpressions(node: ast.AST) -> Iterator[ast.expr]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.expr):
            yield child
        elif isinstance(child, ast.keyword):
            yield child.value


def _is_names(target: ast.expr) -> bool:
    return isinstance(target, ast.Name) or isinstance(target, (ast.Tuple, ast.List)) and all(map(_is_names, target.elts))
