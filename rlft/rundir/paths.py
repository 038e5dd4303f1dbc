"""The run directory: created at the absolute path the recipe names, its recipe saved with the
directory the original recipe lived in, and found again by `rlft stage` without `--recipe`.

    <run_dir>/recipe.yaml   the resolved recipe of the latest invocation (file + --set)
    <run_dir>/run.json      {"recipe_dir": "<absolute directory of that recipe>"}

The saved recipe's relative data and reward paths were written relative to the ORIGINAL
recipe's directory, so a recipe loaded from a run directory resolves them there (`run.json`),
and its run directory is the one it was found in (a moved run directory keeps working).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import yaml

from rlft.ckpt.fsio import atomic_write_text, writing
from rlft.errors import UserInputError
from rlft.recipe.load import LoadedRecipe, load_recipe

log = logging.getLogger(__name__)

SAVED_RECIPE = "recipe.yaml"
RUN_INFO = "run.json"
DEFAULT_RUNS = Path("runs")  # the default output_dir, relative to the working directory


def prepare_run_dir(run_dir: Path) -> None:
    """Create `run_dir` and its parents, or say which part of the path is in the way.

    Raises:
        UserInputError: a part of the path exists and is not a directory, or cannot be created
            (permission, read-only file system).
        WriteError: the disk is full.
    """
    for part in (run_dir, *run_dir.parents):
        if part.is_dir():
            break
        if part.exists() or part.is_symlink():
            what = f"the run directory {part} (output_dir/run_name)" if part == run_dir else str(part)
            raise UserInputError(
                f"output_dir: {what} exists and is not a directory; remove it or choose another "
                "output_dir (e.g. --set output_dir=DIR)"
            )
    try:
        with writing("the run directory", run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserInputError(
            f"output_dir: cannot create {run_dir}: {err.strerror}; choose another output_dir (e.g. --set output_dir=DIR)"
        ) from None


def save_recipe(loaded: LoadedRecipe) -> None:
    """Write `recipe.yaml` (the resolved raw recipe) and `run.json` (its original directory)."""
    run_dir = loaded.run_dir
    with writing("the run's recipe", run_dir / SAVED_RECIPE):
        atomic_write_text(run_dir / SAVED_RECIPE, yaml.safe_dump(loaded.raw, sort_keys=False))
        atomic_write_text(run_dir / RUN_INFO, json.dumps({"recipe_dir": str(loaded.base_dir)}, indent=1) + "\n")


def load_any(recipe: Path, overrides: Sequence[str] = ()) -> LoadedRecipe:
    """Load `recipe`; one saved in a run directory (`recipe.yaml` beside `run.json`) resolves its
    data and reward files against the original recipe's directory and runs in that run directory.

    Raises:
        RecipeError: every problem of the recipe.
        UserInputError: an unreadable `run.json`, or `--set` of output_dir or run_name (the run
            directory of a saved recipe is the one it is in).
    """
    info = recipe.parent / RUN_INFO
    if recipe.name != SAVED_RECIPE or not info.is_file():
        return load_recipe(recipe, overrides)
    moving = [o for o in overrides if o.partition("=")[0].strip() in ("output_dir", "run_name")]
    if moving:
        raise UserInputError(
            f"--set {moving[0]}: {recipe} is saved in its run directory, where the run continues; "
            "pass the original recipe to run elsewhere"
        )
    try:
        base_dir = Path(json.loads(info.read_text(encoding="utf-8"))["recipe_dir"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserInputError(f"{info}: unreadable ({err}); pass the original recipe with --recipe") from None
    return load_recipe(recipe, overrides, base_dir=base_dir, run_dir=recipe.parent.absolute())


def find_saved_recipe(runs: Path = DEFAULT_RUNS) -> Path:
    """The recipe saved in the only run under `runs` (for `rlft stage` without `--recipe`).

    Raises:
        UserInputError: no run there, or several (each is listed).
    """
    found = sorted(p for p in runs.glob(f"*/{SAVED_RECIPE}") if p.is_file()) if runs.is_dir() else []
    if len(found) == 1:
        log.info("using %s (the only run under %s/); --recipe picks another recipe", found[0], runs)
        return found[0]
    if not found:
        raise UserInputError(
            f"no --recipe given and no run under {runs}/ (looked in {runs.absolute()}); "
            "pass the recipe: --recipe RECIPE.yaml"
        )
    names = ", ".join(p.parent.name for p in found)
    raise UserInputError(
        f"no --recipe given and {runs}/ holds {len(found)} runs ({names}); "
        f"pass the recipe, e.g. --recipe {found[0]}"
    )
