"""Load a recipe: YAML with positions, `--set` overrides, schema, graph checks; every problem at once.

    loaded = load_recipe("recipes/r1.yaml", ["stages.rl.lr=5e-6"])

A bad recipe raises `RecipeError` listing every problem as
`recipes/r1.yaml:14:5  stages.rl.group_sise: unknown key (did you mean 'group_size'?)`;
overridden keys are reported as `--set  stages.rl.lr: ...`. Nothing here imports torch or
transformers, so a bad recipe fails in well under a second (RELIABILITY S1, test 25).
YAML rules: see `rlft/recipe/yaml_tree.py` (YAML 1.2 scalars, `0755` is reported as ambiguous).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rlft.errors import Problem, RecipeError
from rlft.recipe.checks import all_problems
from rlft.recipe.problems import Locator, dotted, show, validation_problems
from rlft.recipe.schema import Recipe
from rlft.recipe.yaml_tree import MAX_BYTES, Path_, Positions, parse_scalar_text, parse_yaml

__all__ = ["LoadedRecipe", "load_recipe", "recipe_sha256", "resolve_run_dir"]


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe and where it came from.

    `base_dir` and `run_dir` are absolute, fixed when the recipe is loaded: every path the run
    writes or reads back is built from them, so none is resolved twice against different bases.
    """

    recipe: Recipe
    path: Path  # as the user gave it (messages quote it)
    base_dir: Path  # the recipe's directory, absolute: relative data and reward files resolve here
    raw: dict[str, Any]  # the merged plain data (file + overrides), as written
    sha256: str  # hash of the resolved recipe (defaults filled in), for resume pinning
    positions: dict[str, tuple[int, int]]  # dotted key -> (line, col) in the file
    run_dir: Path  # <output_dir>/<run_name>, absolute


def resolve_run_dir(recipe: Recipe) -> Path:
    """`<output_dir>/<run_name>` as an absolute path: `~` expanded, a relative output_dir taken
    from the working directory (as documented for `output_dir`)."""
    return Path(recipe.output_dir).expanduser().absolute() / recipe.run_name


def recipe_sha256(recipe: Recipe) -> str:
    """sha256 of the resolved recipe as canonical JSON (sorted keys, stages kept in run order)."""
    data = recipe.model_dump(mode="json", by_alias=True)
    data["stages"] = [[name, spec] for name, spec in data["stages"].items()]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _set_path(raw: dict[str, Any], keys: list[str], value: Any, created: set[Path_]) -> str | None:
    """Set `value` at `keys` in `raw`, creating mappings on the way; an error message or None."""
    node: Any = raw
    path: Path_ = ()
    i = 0
    while i < len(keys):
        if isinstance(node, list):
            if not keys[i].isdigit() or int(keys[i]) >= len(node):
                return f"{dotted(path)} is a list of {len(node)}; '{keys[i]}' is not an index in it"
            key: Any = int(keys[i])
            i += 1
        elif isinstance(node, dict):
            # the longest run of segments that is an existing key: stage names may contain '.'
            j = next((j for j in range(len(keys), i, -1) if ".".join(keys[i:j]) in node), i + 1)
            key, i = ".".join(keys[i:j]), j
        else:
            return f"{dotted(path)} is {show(node)}, not a mapping; set it whole, e.g. --set {dotted(path)}={{...}}"
        path += (key,)
        if len(path) == 2 and path[0] == "stages" and key not in node and path not in created and keys[i:] != ["kind"]:
            close = difflib.get_close_matches(str(key), [str(k) for k in node], n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"stages: {', '.join(map(str, node))}"
            return f"no stage '{key}' in the recipe ({hint}); a new stage starts with --set stages.{key}.kind=KIND"
        if i == len(keys):
            node[key] = value
            created.add(path)
        elif isinstance(node, dict) and key not in node:
            node[key] = {}
            created.add(path)
        node = node[key]
    return None


def _apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> tuple[set[Path_], list[Problem]]:
    created: set[Path_] = set()
    problems = []
    for text in overrides:
        key, sep, value_text = text.partition("=")
        key = key.strip()
        if not sep or not key or "" in key.split("."):
            problems.append(Problem("--set", None, None, text, "expected key.path=value, e.g. stages.sft.lr=1e-4"))
            continue
        value, error = parse_scalar_text(value_text)
        error = error or _set_path(raw, key.split("."), value, created)
        if error:
            problems.append(Problem("--set", None, None, key, error))
    return created, problems


def _read(path: Path) -> bytes:
    """The recipe's bytes, at most MAX_BYTES + 1 of them, read only from a regular file.

    The file is opened non-blocking and checked with fstat before any read, so a FIFO does not
    hang, /dev/zero is not read to exhaustion and a directory is named as one.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _read_error(path, f"recipe file not found{_recipe_hint(path)}") from None
    except OSError as err:
        raise _read_error(path, f"cannot read the recipe: {err.strerror}") from None
    try:
        _check_regular(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read(MAX_BYTES + 1)  # a file that grew since fstat is caught by the parser's check
        except OSError as err:
            raise _read_error(path, f"cannot read the recipe: {err.strerror}") from None


def _check_regular(path: Path, info: os.stat_result) -> None:
    """Refuse anything but a regular file of at most MAX_BYTES, saying what `path` is instead."""
    if stat.S_ISREG(info.st_mode) and info.st_size <= MAX_BYTES:
        return
    if stat.S_ISDIR(info.st_mode):
        raise _read_error(path, f"a directory, not a recipe file{_yaml_files(path)}")
    if not stat.S_ISREG(info.st_mode):
        raise _read_error(path, "not a regular file (a pipe, device or socket); give a recipe YAML file")
    raise _read_error(path, f"recipe is {info.st_size / 1e6:.1f} MB; recipes are limited to 1 MB")


def _read_error(path: Path, message: str) -> RecipeError:
    return RecipeError([Problem(str(path), None, None, "", message)])


def _recipe_hint(path: Path) -> str:
    """A did-you-mean among the YAML files beside a missing recipe."""
    if not path.parent.is_dir():
        return f" (directory {path.parent} does not exist)"
    names = sorted(p.name for p in path.parent.glob("*.y*ml"))
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _yaml_files(directory: Path) -> str:
    names = sorted(p.name for p in directory.glob("*.y*ml"))
    return f"; recipes there: {', '.join(names[:8])}" if names else ""


def _parse(path: Path) -> tuple[dict[str, Any], Positions, list[Problem]]:
    file = str(path)
    raw, positions, problems = parse_yaml(_read(path), file)
    if problems and not isinstance(raw, dict):
        raise RecipeError(problems)
    if raw is None:
        raise RecipeError([Problem(file, 1, 1, "", "the recipe is empty; it needs at least `model:` and `stages:`")])
    if not isinstance(raw, dict):
        got = show(raw)
        raise RecipeError([Problem(file, 1, 1, "", f"a recipe is a mapping of keys (model:, stages:, ...), got {got}")])
    return raw, positions, problems


def _sort_key(problem: Problem) -> tuple:
    return (problem.file == "--set", problem.line or 0, problem.col or 0)


def load_recipe(
    path: str | Path, overrides: Sequence[str] = (), base_dir: Path | None = None, run_dir: Path | None = None
) -> LoadedRecipe:
    """Read, override and validate a recipe, reporting every problem at once.

    Args:
        path: The recipe YAML file.
        overrides: `key.path=value` strings (`--set`); values follow the recipe's YAML rules.
        base_dir: Where relative data and reward files resolve; default the recipe's directory
            (a recipe saved in a run directory passes its original directory here).
        run_dir: The run directory; default `<output_dir>/<run_name>` (`resolve_run_dir`).

    Returns:
        The validated recipe with its raw data, positions and sha256.

    Raises:
        RecipeError: every problem found, each with file:line:col and the dotted key.
    """
    path = Path(path)
    base_dir = (base_dir or path.parent).absolute()
    raw, positions, problems = _parse(path)
    created, override_problems = _apply_overrides(raw, overrides)
    problems += override_problems
    locator = Locator(str(path), positions, created)
    problems += all_problems(raw, locator, base_dir)
    recipe = None
    try:
        recipe = Recipe.model_validate(raw, strict=True)
    except ValidationError as err:
        seen = {p.path for p in problems}
        problems += [p for p in validation_problems(err, raw, locator) if p.path not in seen]
    if recipe is not None and not problems:
        return LoadedRecipe(
            recipe=recipe,
            path=path,
            base_dir=base_dir,
            raw=raw,
            sha256=recipe_sha256(recipe),
            positions={dotted(k): v for k, v in positions.items() if k},
            run_dir=(run_dir or resolve_run_dir(recipe)).absolute(),
        )
    raise RecipeError(sorted(problems, key=_sort_key))

