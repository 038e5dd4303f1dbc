"""Generate the recipe reference (Markdown) from the schema in `rlft/recipe/schema.py`.

    python -m rlft.recipe.docgen > docs/recipe-reference.md

One table per schema model (key, type, default, description), so the reference cannot drift
from the code: `tests/test_docs.py` compares the committed file with `render()`.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from rlft.recipe.problems import is_model, strip_annotated
from rlft.recipe.schema import STAGE_KINDS, Recipe

_HEADER = """\
# Recipe reference

Generated from the schema in `rlft/recipe/schema.py` by `python -m rlft.recipe.docgen` (`make docs`); do not
edit by hand. Every key is checked: an unknown key, a wrong type or a value out of range is an
error reported with `file:line:col`, the dotted key and a did-you-mean. `rlft validate RECIPE`
checks a recipe without loading any model.

Scalars follow YAML 1.2: `1e-4` is a number, only `true`/`false` are booleans (`yes`, `no`,
`on`, `off` are strings), and a leading-zero number such as `0755` is an error (write `755` or
`0o755`). Override any key on the command line with `--set stages.rl.lr=5e-6`.
"""


def _models_in(tp: Any) -> Iterator[type[BaseModel]]:
    tp = strip_annotated(tp)
    if is_model(tp):
        yield tp
    for arg in get_args(tp):
        if get_origin(tp) is not Literal:
            yield from _models_in(arg)


def _stage_models() -> list[type[BaseModel]]:
    members = list(_models_in(Recipe.model_fields["stages"].annotation))
    return sorted(members, key=lambda m: STAGE_KINDS.index(get_args(m.model_fields["kind"].annotation)[0]))


def _section_order() -> list[type[BaseModel]]:
    """Recipe, the models under it (model, lora, ...), the stage kinds, then their nested settings."""
    stages = _stage_models()
    order: list[type[BaseModel]] = []

    def visit(model: type[BaseModel]) -> None:
        if model in order:
            return
        order.append(model)
        for name, info in model.model_fields.items():
            if model is Recipe and name == "stages":
                continue
            for inner in _models_in(info.annotation):
                if inner not in stages:
                    visit(inner)

    visit(Recipe)
    top = list(order)
    for stage in stages:
        visit(stage)
    return top + stages + [m for m in order if m not in top and m not in stages]


def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _type(tp: Any) -> str:
    tp = strip_annotated(tp)
    origin, args = get_origin(tp), get_args(tp)
    if is_model(tp):
        return f"[{tp.__name__}](#{_anchor(tp)})"
    if origin is Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        members = [strip_annotated(a) for a in args if a is not type(None)]
        if all(is_model(m) and "kind" in m.model_fields for m in members):
            return "stage (see [stage kinds](#stage-kinds))"
        text = " or ".join(_type(m) for m in members)
        return text + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type(a) for a in args) + "]"
    if origin is dict:
        return "mapping" if args[1] is Any else f"mapping of name to {_type(args[1])}"
    return getattr(tp, "__name__", str(tp))


def _bounds(info: FieldInfo) -> str:
    parts = []
    for item in info.metadata:
        for cls, sign, attr in ((at.Gt, ">", "gt"), (at.Ge, ">=", "ge"), (at.Lt, "<", "lt"), (at.Le, "<=", "le")):
            if isinstance(item, cls):
                parts.append(f"{sign} {getattr(item, attr)}")
        if isinstance(item, at.MinLen):
            parts.append(f"at least {item.min_length}")
    return f" ({', '.join(parts)})" if parts else ""


def _flow(value: Any) -> str:
    if isinstance(value, BaseModel):
        return _flow(value.model_dump(exclude_defaults=True, by_alias=True))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    value = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel) and not value.model_dump(exclude_defaults=True):
        return f"see [{type(value).__name__}](#{_anchor(type(value))})"
    return f"`{_flow(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(model: type[BaseModel]) -> list[str]:
    fields = sorted(model.model_fields.items(), key=lambda item: item[0] != "kind")
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, info in fields:
        key = info.alias or name
        kind = _cell(_type(info.annotation)) + _bounds(info)
        about = info.description or ("Selects this stage kind." if key == "kind" else "")
        rows.append(f"| `{key}` | {kind} | {_cell(_default(info))} | {_cell(about)} |")
    return rows


def _doc(model: type[BaseModel]) -> str:
    return inspect.cleandoc(model.__doc__ or "")


def render() -> str:
    """The whole reference as Markdown."""
    stages = _stage_models()
    lines = [_HEADER]
    for model in _section_order():
        if model is stages[0]:
            lines += ["## Stage kinds", "", "Each stage is a mapping with `kind:` set to one of: "
                      + ", ".join(f"[`{k}`](#{_anchor(m)})" for k, m in zip(STAGE_KINDS, stages, strict=True))
                      + ". Stages run in the order written; `from:` names an earlier stage or `base`.", ""]
        if model in stages:
            kind = get_args(model.model_fields["kind"].annotation)[0]
            lines += [f"### {model.__name__}", "", f"`kind: {kind}`. {_doc(model)}", ""]
        else:
            lines += [f"## {model.__name__}", "", _doc(model), ""]
        lines += _table(model) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    """Print the reference to stdout."""
    print(render(), end="")


if __name__ == "__main__":
    main()
