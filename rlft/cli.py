"""The `rlft` command: parse, call the pipeline, map errors to exit codes.

Exit codes: 0 done; 2 bad recipe, data or arguments; 3 no usable checkpoint; 4 training
stopped (NaN streak, reward failures); 130 interrupted. Errors print without a traceback
(`--verbose` adds it).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from rlft.errors import RlftError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Recipe-driven fine-tuning: SFT -> GRPO -> rejection sampling -> retrain -> distill.",
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set stages.sft.lr=1e-4 (repeatable)."),
]
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Resume even though recipe, data or model changed.")]
RestartOpt = Annotated[bool, typer.Option("--restart", help="Discard the stage's earlier checkpoints and start over.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log more; show tracebacks.")]


# Warnings of rlft's dependencies about each other that a user of rlft cannot act on, each
# silenced by (message, category, module of the warning), never wholesale.
LIBRARY_WARNINGS: list[tuple[str, type[Warning], str]] = [
    # peft reads transformers 5.x's renamed `is_gradient_checkpointing` (now is_activation_checkpointing)
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\."),
]


def _quiet_library_warnings() -> None:
    for message, category, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    from rlft.metrics import console

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=verbose)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "peft", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(recipe: Path, overrides: list[str] | None):  # noqa: ANN202
    from rlft.recipe_load import load_recipe

    return load_recipe(recipe, overrides or [])


@app.command()
def run(
    recipe: RecipeArg, set_: SetOpt = None, force: ForceOpt = False, restart: RestartOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run every stage of RECIPE in order; finished stages are skipped, an interrupted one resumes."""
    _setup_logging(verbose)
    loaded = _load(recipe, set_)
    from rlft.pipeline import run_pipeline
    from rlft.report import print_run_table

    artifacts = run_pipeline(loaded, resume=True, force=force, restart=restart)
    print_run_table(loaded, artifacts)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="Stage name in the recipe.")],
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML file.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest committed checkpoint.")] = False,
    set_: SetOpt = None, force: ForceOpt = False, restart: RestartOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Run one stage of RECIPE (its parents must have finished)."""
    _setup_logging(verbose)
    loaded = _load(recipe, set_)
    if name not in loaded.recipe.stages:
        import difflib

        close = difflib.get_close_matches(name, list(loaded.recipe.stages), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; stages: {', '.join(loaded.recipe.stages)}"
        raise typer_error(f"{recipe}: no stage named '{name}'{hint}")
    from rlft.pipeline import run_pipeline

    run_pipeline(loaded, only=name, resume=resume, force=force, restart=restart)


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check RECIPE without loading any model; report every problem at once (exit 2)."""
    loaded = _load(recipe, set_)
    typer.echo(f"{recipe}: ok ({len(loaded.recipe.stages)} stages: {', '.join(loaded.recipe.stages)})")


@app.command()
def explain(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Show the resolved recipe with defaults, the stage graph and the batch arithmetic."""
    from rlft.explain import explain_recipe

    typer.echo(explain_recipe(_load(recipe, set_)))


def typer_error(message: str) -> RlftError:
    from rlft.errors import UserInputError

    return UserInputError(message)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (also used by tests that fork a run)."""
    verbose = "--verbose" in (argv or sys.argv) or "-v" in (argv or sys.argv)
    _quiet_library_warnings()
    try:
        app(args=argv, standalone_mode=False)
    except RlftError as err:
        from rlft.metrics import console

        if verbose:
            console.print_exception()
        from rich.text import Text

        console.print(Text.assemble(("error: ", "bold red"), str(err)), soft_wrap=True)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as err:  # click's usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
