"""Read recipe YAML as plain data, keeping the line and column of every key.

`yaml.safe_load` semantics with three departures, all toward "recipes are data":
- YAML 1.2 core-schema scalars: `1e-4` and `1E3` are floats (PyYAML's 1.1 resolver reads them
  as strings); only true/false (any case) are booleans, so `yes/no/on/off` stay strings; no
  timestamps or sexagesimals. A leading-zero integer such as `0755` is reported as ambiguous
  (octal 493 in YAML 1.1, 755 in YAML 1.2) rather than guessed: write `755` or `0o755`.
- Only the core tags (str, int, float, bool, null, seq, map) are allowed; `!!python/...`, `!!binary`,
  `!!set` and custom tags are reported with their line.
- Duplicate keys are errors, documents over 1 MB are refused, and alias expansion stops at
  10,000 nodes (alias bombs); nesting stops at 64 levels.

Keys are always names: a key written `1` or `true` is the string "1" or "true".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from rlft.errors import Problem

MAX_BYTES = 1_000_000
MAX_NODES = 10_000
MAX_DEPTH = 64

Path_ = tuple[str | int, ...]
Positions = dict[Path_, tuple[int, int]]

_T = "tag:yaml.org,2002:"
_NULL, _BOOL, _INT, _FLOAT, _STR = _T + "null", _T + "bool", _T + "int", _T + "float", _T + "str"
_SEQ, _MAP, _MERGE = _T + "seq", _T + "map", _T + "merge"
_AMBIGUOUS_INT = re.compile(r"[-+]?0[0-9]+\Z")


def walk(value: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """Every (key path, value) of a loaded recipe, the root first, depth first."""
    yield path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from walk(child, path + (key,))


if TYPE_CHECKING:
    _SafeLoader = yaml.SafeLoader
else:
    _SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class RecipeLoader(_SafeLoader):
    """Safe loader (libyaml when available: ~8x faster) with YAML 1.2 core-schema implicit scalars."""

    yaml_implicit_resolvers: dict[str, Any] = {}


for _tag, _regexp, _first in [
    (_NULL, r"(?:~|null|Null|NULL|)\Z", ["~", "n", "N", ""]),
    (_BOOL, r"(?i:true|false)\Z", list("tTfF")),
    (_INT, r"[-+]?[0-9]+\Z|0o[0-7]+\Z|0x[0-9a-fA-F]+\Z", list("-+0123456789")),
    (
        _FLOAT,
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?\Z|[-+]?\.(?:inf|Inf|INF)\Z|\.(?:nan|NaN|NAN)\Z",
        list("-+.0123456789"),
    ),
    (_MERGE, r"<<\Z", ["<"]),
]:
    RecipeLoader.add_implicit_resolver(_tag, re.compile(_regexp), _first)


class _TooBig(Exception):
    """Raised to stop walking an alias bomb or a too-deep document."""


def _show_tag(tag: str) -> str:
    return "!!" + tag[len(_T) :] if tag.startswith(_T) else tag


def _int(text: str) -> int:
    if _AMBIGUOUS_INT.match(text):
        raise ValueError(
            f"ambiguous number {text}: YAML 1.1 reads it as octal {int(text, 8)}, YAML 1.2 as "
            f"{int(text)}; write {int(text)}, 0o{text.lstrip('+-0')} or quote it"
        )
    if text[:2] in ("0o", "0x"):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text)


def _float(text: str) -> float:
    low = text.lower()
    if low.lstrip("+-") == ".inf":
        return -math.inf if low.startswith("-") else math.inf
    if low == ".nan":
        return math.nan
    return float(text)


_SCALARS: dict[str, Callable[[str], Any]] = {
    _NULL: lambda text: None,
    _BOOL: lambda text: text.lower() == "true",
    _INT: _int,
    _FLOAT: _float,
    _STR: str,
}


class _Walker:
    """Turns a composed node graph into plain data, recording positions and problems."""

    def __init__(self, file: str):
        self.file = file
        self.positions: Positions = {}
        self.problems: list[Problem] = []
        self.count = 0
        self.stack: set[int] = set()

    def problem(self, node: Node | None, path: Path_, message: str) -> None:
        mark = node.start_mark if node is not None else None
        line, col = (mark.line + 1, mark.column + 1) if mark else self.positions.get(path, (None, None))
        self.problems.append(Problem(self.file, line, col, ".".join(str(p) for p in path), message))

    def value(self, node: Node, path: Path_) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            message = f"more than {MAX_NODES} values, counting each alias expansion (an alias bomb?)"
            self.problem(None, path[:1], message)
            raise _TooBig
        if len(path) > MAX_DEPTH or id(node) in self.stack:
            why = "an alias refers to a value that contains it" if id(node) in self.stack else "nested too deeply"
            self.problem(node, path, why)
            raise _TooBig
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        allowed = _SEQ if isinstance(node, SequenceNode) else _MAP
        if node.tag != allowed:
            return self.bad_tag(node, path)
        self.stack.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return [self.item(child, path + (i,)) for i, child in enumerate(node.value)]
            return self.mapping(cast(MappingNode, node), path)
        finally:
            self.stack.discard(id(node))

    def bad_tag(self, node: Node, path: Path_) -> None:
        self.problem(
            node, path, f"tag {_show_tag(node.tag)} is not allowed: recipes are data, rlft builds no "
            "Python objects from them"
        )

    def scalar(self, node: ScalarNode, path: Path_) -> Any:
        convert = _SCALARS.get(node.tag)
        if convert is None:
            return self.bad_tag(node, path)
        try:
            return convert(node.value)
        except ValueError as err:
            message = str(err) if node.tag == _INT and _AMBIGUOUS_INT.match(node.value) else None
            self.problem(node, path, message or f"{node.value!r} is not a valid {_show_tag(node.tag)}")
            return None

    def item(self, node: Node, path: Path_) -> Any:
        self.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        return self.value(node, path)

    def mapping(self, node: MappingNode, path: Path_) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        explicit = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                self.merge(value_node, path, out)
            else:
                explicit.append((key_node, value_node))
        for key_node, value_node in explicit:
            if not isinstance(key_node, ScalarNode) or key_node.tag not in _SCALARS or key_node.value == "":
                self.problem(key_node, path, "keys must be plain names")
                continue
            key = key_node.value
            if key in first_line:
                self.problem(key_node, path + (key,), f"duplicate key '{key}' (first at line {first_line[key]})")
                continue
            first_line[key] = key_node.start_mark.line + 1
            self.positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out.pop(key, None)
            out[key] = self.value(value_node, path + (key,))
        return out

    def merge(self, node: Node, path: Path_, out: dict[str, Any]) -> None:
        sources = node.value if isinstance(node, SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, MappingNode):
                self.problem(source, path, "'<<' merges only mappings")
                continue
            for key, value in self.value(source, path).items():
                out.setdefault(key, value)


def _syntax_problem(err: yaml.MarkedYAMLError, text: str, file: str) -> Problem:
    mark = err.problem_mark or err.context_mark
    problem = err.problem or ""
    line_text = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
    if "\t" in line_text[: (mark.column if mark else 0) + 1]:
        message = "tab character: indent YAML with spaces, not tabs"
    elif "expected a single document" in f"{problem} {err.context}":
        message = "a recipe is one YAML document; remove the second '---'"
    elif "mapping values are not allowed" in problem:
        message = "unexpected ':' (quote a value that contains ': ', or check the indentation)"
    else:
        context = f" ({err.context})" if err.context else ""
        message = f"YAML syntax error: {problem}{context}"
    line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
    return Problem(file, line, col, "", message)


def _where(text: str, index: int) -> tuple[int, int]:
    return text.count("\n", 0, index) + 1, index - text.rfind("\n", 0, index)


def _decode(data: bytes, file: str) -> tuple[str | None, list[Problem]]:
    if len(data) > MAX_BYTES:
        size = f"{len(data) / 1e6:.1f} MB"
        return None, [Problem(file, None, None, "", f"recipe is {size}; recipes are limited to 1 MB")]
    nul = data.find(b"\0")
    if nul >= 0:  # valid UTF-8, but no text file holds NUL: a binary file given as the recipe
        line, col = _where(data[:nul].decode("latin-1"), nul)
        return None, [Problem(file, line, col, "", "a NUL byte: this is a binary file, not a YAML recipe")]
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError as err:
        line, col = _where(data.decode("latin-1"), err.start)
        return None, [Problem(file, line, col, "", "not UTF-8 text; save the recipe as UTF-8")]


def _too_deep(text: str, file: str) -> Problem | None:
    """Nesting deeper than MAX_DEPTH, found on the event stream before composing.

    libyaml composes recursively in C: a few hundred thousand '[' would overflow its stack.
    """
    depth = 0
    for event in yaml.parse(text, Loader=RecipeLoader):
        if isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                return Problem(file, mark.line + 1, mark.column + 1, "", f"nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            depth -= 1
    return None


def parse_yaml(data: bytes | str, file: str) -> tuple[Any, Positions, list[Problem]]:
    """Parse one YAML document into plain data, positions and problems.

    Args:
        data: The document (bytes are decoded as UTF-8).
        file: Name used in problems.

    Returns:
        (value, positions, problems): value is None when the document is empty or unreadable;
        positions maps a key path (tuple of keys and list indices) to its 1-based (line, col).
    """
    text, problems = _decode(data, file) if isinstance(data, bytes) else (data, [])
    if text is None:
        return None, {}, problems
    try:
        too_deep = _too_deep(text, file)
        if too_deep:
            return None, {}, [too_deep]
        node = yaml.compose(text, Loader=RecipeLoader)
    except yaml.MarkedYAMLError as err:
        return None, {}, [_syntax_problem(err, text, file)]
    except yaml.reader.ReaderError as err:
        line, col = _where(text, err.position)
        char = err.character if isinstance(err.character, int) else ord(err.character)
        return None, {}, [Problem(file, line, col, "", f"control character {char:#04x} is not allowed in YAML")]
    except RecursionError:
        return None, {}, [Problem(file, None, None, "", "nested too deeply")]
    if node is None:
        return None, {}, []
    walker = _Walker(file)
    walker.positions[()] = (node.start_mark.line + 1, node.start_mark.column + 1)
    try:
        value = walker.value(node, ())
    except _TooBig:
        return None, walker.positions, walker.problems
    return value, walker.positions, walker.problems


def parse_scalar_text(text: str) -> tuple[Any, str | None]:
    """Parse a `--set` value with the recipe's YAML rules.

    Returns:
        (value, error): `1e-4` -> 1e-4, `[q_proj, v_proj]` -> a list, `{r: 8}` -> a mapping,
        `` -> None; error is None or says what is wrong.
    """
    value, _, problems = parse_yaml(text, "--set")
    return value, (problems[0].message if problems else None)
