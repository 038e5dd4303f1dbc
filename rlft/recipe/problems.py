"""Turn pydantic validation errors into recipe Problems at `file:line:col  dotted.key: message`.

pydantic reports a location such as ('stages', 'rl', 'grpo', 'group_sise'): the discriminator
tag ('grpo') and plain-union member names ('LoraSpec', "literal['full']") are not keys the user
wrote, so the location is walked against the recipe data and such parts are dropped. Where a
plain union fails in every branch, the branch matching the type the user wrote is reported (an
unknown key inside a LoRA mapping, not "should be 'full'"); when none matches, one message lists
what is accepted.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import UnionType
from typing import Annotated, Any, Union, cast, get_args, get_origin

from pydantic import BaseModel, ValidationError

from rlft.errors import Problem
from rlft.recipe.schema import STAGE_KINDS, Recipe
from rlft.recipe.yaml_tree import Path_, Positions


def _osa(a: str, b: str) -> int:
    """Edit distance counting insertion, deletion, substitution and adjacent transposition as 1."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def closest(word: str, choices: Any) -> str | None:
    """The choice `word` is most likely a typo of, or None when nothing is close."""
    options = [c for c in dict.fromkeys(choices) if isinstance(c, str) and c != word]
    if not word or not options:
        return None
    ranked = sorted(
        options, key=lambda c: (_osa(word.lower(), c.lower()), -difflib.SequenceMatcher(None, word, c).ratio())
    )
    if _osa(word.lower(), ranked[0].lower()) <= (1 if len(word) <= 3 else 2):
        return ranked[0]
    near = difflib.get_close_matches(word, options, n=1, cutoff=0.75)
    return near[0] if near else None


def did_you_mean(word: Any, choices: Any) -> str:
    """` (did you mean 'x'?)` or ''."""
    best = closest(word, choices) if isinstance(word, str) else None
    return f" (did you mean '{best}'?)" if best else ""


def show(value: Any) -> str:
    """A short, readable rendering of a recipe value for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 42 else text[:39] + "...'"


def dotted(path: Path_) -> str:
    """('stages', 'rl', 'rewards', 0) -> 'stages.rl.rewards.0'."""
    return ".".join(str(p) for p in path)


@dataclass
class Locator:
    """Maps key paths to Problems: file:line:col from the YAML, or `--set` for overridden keys."""

    file: str
    positions: Positions
    overridden: set[Path_] = field(default_factory=set)

    def at(self, path: Path_, message: str) -> Problem:
        """A Problem at `path` (the nearest written key when `path` itself is not in the file)."""
        if any(path[:i] in self.overridden for i in range(len(path) + 1)):
            return Problem("--set", None, None, dotted(path), message)
        for i in range(len(path), -1, -1):
            if path[:i] in self.positions:
                line, col = self.positions[path[:i]]
                return Problem(self.file, line, col, dotted(path), message)
        return Problem(self.file, None, None, dotted(path), message)


# --------------------------------------------------------------------------- schema walking


def strip_annotated(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tag_of(member: Any, item: Any) -> bool:
    if not is_model(member) or not isinstance(item, str):
        return False
    kind = member.model_fields.get("kind")
    return item == member.__name__ or (kind is not None and item in get_args(kind.annotation))


def _step(tp: Any, item: Any) -> Any:
    tp = strip_annotated(tp)
    if is_model(tp):
        for name, info in tp.model_fields.items():
            if item in (name, info.alias):
                return info.annotation
        return None
    origin = get_origin(tp)
    if origin in (Union, UnionType):
        members = [strip_annotated(a) for a in get_args(tp) if a is not type(None)]
        tagged = [m for m in members if _tag_of(m, item)]
        if tagged:
            return tagged[0]
        return _step(members[0], item) if len(members) == 1 else None
    if origin in (list, tuple):
        return get_args(tp)[0]
    return get_args(tp)[1] if origin is dict else None


def model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema model at a pydantic location (tags included), or None."""
    tp: Any = Recipe
    for item in loc:
        tp = _step(tp, item)
        if tp is None:
            return None
    tp = strip_annotated(tp)
    if get_origin(tp) in (Union, UnionType):  # an optional mapping (`tiny:`, `student:`, `gate:`)
        members = [strip_annotated(a) for a in get_args(tp) if a is not type(None)]
        tp = members[0] if len(members) == 1 else None
    return tp if is_model(tp) else None


def field_names(model: type[BaseModel]) -> list[str]:
    """Keys a recipe may write for `model` (aliases such as `from` instead of `from_`)."""
    return [info.alias or name for name, info in model.model_fields.items()]


_STAGE_MODELS = get_args(strip_annotated(get_args(Recipe.model_fields["stages"].annotation)[1]))
STAGE_KEYS = sorted({key for model in _STAGE_MODELS for key in field_names(model)})


# --------------------------------------------------------------------------- error -> message

_TYPE_ERRORS = {
    "model_type", "model_attributes_type", "dict_type", "list_type", "tuple_type", "string_type",
    "int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "bool_type",
    "bool_parsing", "literal_error",
}
_KIND_TEXT = {"dict": "a mapping", "list": "a list", "number": "a number", "str": "a string", "bool": "true or false"}
_MESSAGES = {
    "greater_than": "must be > {gt}, got {got}",
    "greater_than_equal": "must be >= {ge}, got {got}",
    "less_than": "must be < {lt}, got {got}",
    "less_than_equal": "must be <= {le}, got {got}",
    "too_long": "takes at most {max_length} entries, got {actual_length}",
    "string_type": "expected a string, got {got}",
    "float_type": "expected a number, got {got}",
    "float_parsing": "expected a number, got {got}",
    "finite_number": "must be a finite number, got {got}",
    "dict_type": "expected a mapping, got {got}",
    "model_type": "expected a mapping, got {got}",
    "model_attributes_type": "expected a mapping, got {got}",
    "list_type": "expected a list, got {got}",
    "tuple_type": "expected a list, got {got}",
}


# models a plain string stands for (see the `_coerce_*` validators in rlft/recipe/schema.py)
_SHORTHAND = {
    "DataSpec": "a data source: a string (tiny:<task>, file.jsonl, hub name, sample stage) or a mapping with source:",
    "RewardEntry": "a reward: a name or a mapping with name:",
}


@dataclass(frozen=True)
class _Err:
    path: Path_  # keys the user wrote
    tags: tuple[tuple[int, Any], ...]  # (depth in path, union tag) pydantic added
    loc: tuple
    err: Mapping[str, Any]  # pydantic's ErrorDetails


@dataclass(frozen=True)
class _Out:
    path: Path_
    message: str
    missing: str | None = None  # the key a "missing required key" names
    suggests: str | None = None  # the key an "unknown key" suggests


def _walk(raw: Any, loc: tuple) -> tuple[Path_, tuple[tuple[int, Any], ...]]:
    node, path, tags = raw, [], []
    for item in loc:
        if isinstance(node, dict) and item in node:
            path.append(item)
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            path.append(item)
            node = node[item]
        else:
            tags.append((len(path), item))
    return tuple(path), tuple(tags)


def value_at(raw: Any, path: Path_) -> Any:
    """The recipe value at a key path that exists."""
    for part in path:
        raw = raw[part]
    return raw


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return {dict: "dict", list: "list", str: "str"}.get(type(value), "null")


def _tag_kind(tag: Any) -> str | None:
    if not isinstance(tag, str):
        return None
    if tag.startswith(("list[", "tuple[")):
        return "list"
    if tag.startswith("dict[") or (tag[:1].isupper() and tag.isidentifier()):
        return "dict"
    if tag.startswith("literal[") or tag == "str":
        return "str"
    return {"float": "number", "int": "number", "bool": "bool", "none": "null"}.get(tag)


def _choices(err: Mapping[str, Any]) -> list[str]:
    return re.findall(r"'((?:[^'\\]|\\.)*)'", (err.get("ctx") or {}).get("expected", ""))


def _union_out(prefix: Path_, branches: dict[Any, list[_Err]], value: Any) -> _Out:
    expected, choices = [], []
    for tag, errs in branches.items():
        literal = [e for e in errs if e.err["type"] == "literal_error" and e.path == prefix]
        if literal:
            choices += _choices(literal[0].err)
            expected.append(" or ".join(f"'{c}'" for c in _choices(literal[0].err)))
        else:
            expected.append(_KIND_TEXT.get(_tag_kind(tag) or "", str(tag)))
    text = " or ".join(dict.fromkeys(expected))
    return _Out(prefix, f"expected {text}, got {show(value)}{did_you_mean(value, choices)}")


def _pick(items: list[_Err], raw: Any) -> tuple[list[_Err], list[_Out]]:
    """Keep the errors of the union branch the user meant; combine the rest into one message."""
    done, outs = [e for e in items if not e.tags], []
    groups: dict[Path_, list[_Err]] = {}
    for e in items:
        if e.tags:
            groups.setdefault(e.path[: e.tags[0][0]], []).append(e)
    for prefix, group in groups.items():
        branches: dict[Any, list[_Err]] = {}
        for e in group:
            branches.setdefault(e.tags[0][1], []).append(replace(e, tags=e.tags[1:]))
        value = value_at(raw, prefix)
        fits = [t for t in branches if _tag_kind(t) == _kind(value)]
        shallow = all(e.path == prefix and len(e.tags) == 1 and e.err["type"] in _TYPE_ERRORS for e in group)
        if len(branches) == 1:
            chosen = next(iter(branches.values()))
        elif len(fits) == 1 and not shallow:
            chosen = branches[fits[0]]
        else:
            outs.append(_union_out(prefix, branches, value))
            continue
        more_done, more_outs = _pick(chosen, raw)
        done += more_done
        outs += more_outs
    return done, outs


def _unknown_key(path: Path_, key: str, allowed: list[str], raw: Any) -> _Out:
    if key in ("env", "environment"):
        return _Out(path, "unknown key: rlft does not set environment variables from recipes; export them "
                    "in the shell before running")
    present = value_at(raw, path[:-1])
    best = closest(key, [k for k in allowed if k not in present]) or closest(key, allowed)
    if best:
        return _Out(path, f"unknown key (did you mean '{best}'?)", suggests=best)
    listed = f"; allowed keys: {', '.join(allowed)}" if len(allowed) <= 12 else "; see docs/recipe-reference.md"
    return _Out(path, "unknown key" + listed)


def _missing_kind(e: _Err, raw: Any) -> list[_Out]:
    outs = [_Out(e.path, f"missing required key 'kind' (one of {', '.join(STAGE_KINDS)})", missing="kind")]
    stage = value_at(raw, e.path)
    for key in stage:
        if key not in STAGE_KEYS:
            outs.append(_unknown_key(e.path + (key,), key, STAGE_KEYS, raw))
    return outs


def _validator_out(e: _Err, raw: Any) -> _Out:
    """A message from our own validators, at the field it names when that key was written."""
    text = re.sub(r"^(Value error|Assertion failed), ", "", e.err["msg"])
    model, value = model_at(e.loc), value_at(raw, e.path)
    first = re.match(r"`?([A-Za-z_]\w*)", text)
    if model and first and isinstance(value, dict) and first.group(1) in value:
        name = first.group(1)
        if name in field_names(model):
            return _Out(e.path + (name,), text[len(name) + 1 :] if text.startswith(name + " must") else text)
    return _Out(e.path, text)


def _type_out(e: _Err) -> _Out:
    kind, ctx, got = e.err["type"], dict(e.err.get("ctx") or {}), e.err.get("input")
    if kind in ("int_type", "int_parsing", "int_from_float"):
        whole = isinstance(got, float) and got.is_integer()
        return _Out(e.path, f"expected an integer, got {show(got)}" + (f" (write {int(cast(float, got))})" if whole else ""))
    if kind in ("bool_type", "bool_parsing"):
        yaml11 = isinstance(got, str) and got.lower() in ("yes", "no", "on", "off", "y", "n")
        note = " (only true/false are booleans in recipes)" if yaml11 else ""
        return _Out(e.path, f"expected true or false, got {show(got)}{note}")
    if kind == "too_short":
        least = ctx.get("min_length", 1)
        return _Out(e.path, "must have at least one entry" if least == 1 else f"needs at least {least} entries")
    if kind in ("model_attributes_type", "model_type") and len(e.path) == 2 and e.path[0] == "stages":
        return _Out(e.path, f"expected a mapping with `kind:` and the stage's settings, got {show(got)}")
    model = model_at(e.loc)
    if kind in ("model_attributes_type", "model_type") and model is not None and model.__name__ in _SHORTHAND:
        return _Out(e.path, f"expected {_SHORTHAND[model.__name__]}, got {show(got)}")
    if kind in _MESSAGES:
        return _Out(e.path, _MESSAGES[kind].format_map({**ctx, "got": show(got)}))
    return _Out(e.path, e.err["msg"])


def _describe(e: _Err, raw: Any) -> list[_Out]:
    kind, got = e.err["type"], e.err.get("input")
    if kind == "missing":
        key = e.loc[-1]
        if isinstance(key, int):
            return [_Out(e.path, f"needs more values (value {key + 1} is missing)")]
        return [_Out(e.path, f"missing required key '{key}'", missing=str(key))]
    if kind == "extra_forbidden":
        model = model_at(e.loc[:-1])
        return [_unknown_key(e.path, str(e.loc[-1]), field_names(model) if model else [], raw)]
    if kind == "union_tag_invalid":
        stage = value_at(raw, e.path)
        has_kind = isinstance(stage, dict) and "kind" in stage
        tag = stage["kind"] if has_kind else (e.err.get("ctx") or {}).get("tag")
        hint = did_you_mean(tag, STAGE_KINDS)
        message = f"unknown stage kind {show(tag)}{hint}; kinds: {', '.join(STAGE_KINDS)}"
        return [_Out(e.path + ("kind",) if has_kind else e.path, message)]
    if kind == "union_tag_not_found":
        return _missing_kind(e, raw)
    if kind in ("value_error", "assertion_error"):
        return [_validator_out(e, raw)]
    if kind == "literal_error":
        choices = _choices(e.err)
        return [_Out(e.path, f"must be one of {', '.join(choices)}; got {show(got)}{did_you_mean(got, choices)}")]
    return [_type_out(e)]


def validation_problems(err: ValidationError, raw: dict[str, Any], locator: Locator) -> list[Problem]:
    """Every pydantic error of one recipe as a Problem at the key the user wrote.

    An "unknown key" that suggests a missing required key replaces the "missing" message.
    Stage-name errors are left to the loader, which knows where each name is written.
    """
    items = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        if e["type"] == "value_error" and loc == ("stages",):
            continue
        path, tags = _walk(raw, loc[:-1] if e["type"] == "missing" else loc)
        items.append(_Err(path, tags, loc, e))
    singles, outs = _pick(items, raw)
    for e in singles:
        outs += _describe(e, raw)
    suggested = {(o.path[:-1], o.suggests) for o in outs if o.suggests}
    outs = [o for o in outs if not o.missing or (o.path, o.missing) not in suggested]
    problems = [locator.at(o.path, o.message) for o in outs]
    return list(dict.fromkeys(problems))
