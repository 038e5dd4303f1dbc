"""The `rlft` command: parse, call the pipeline, map errors to exit codes.

Exit codes: 0 done; 2 bad recipe, data or arguments (usage errors included); 3 no usable
checkpoint, or an output could not be written (disk full); 4 training stopped (NaN streak,
reward failures, a failed gate); 130 interrupted. Errors print as one line without a
traceback (`--verbose` adds it).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rlft.errors import RlftError, UserInputError, WriteError

if TYPE_CHECKING:
    from rlft.recipe.load import LoadedRecipe

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
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Rehearse on CPU: shrunk random models of the same architectures, real tokenizers, "
    "a few rows, 2 steps per stage, in runs/<run_name>-dry-run.")]
NprocOpt = Annotated[int | None, typer.Option(
    "--nproc", min=1, help="Start N processes on this machine through torchrun (one per GPU; gloo on CPU). "
    "Several nodes: start torchrun yourself (see README).")]
StandInOpt = Annotated[list[str] | None, typer.Option(
    "--stand-in", help="With --dry-run: use a local directory or file for a hub model or data set, "
    "e.g. --stand-in Qwen/Qwen2.5-0.5B-Instruct=./qwen (repeatable).")]


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
    import os

    from rich.logging import RichHandler

    from rlft.metrics import console

    quiet = int(os.environ.get("RANK", "0")) > 0  # under torchrun, rank 0 speaks for the job
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=verbose)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "peft", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(recipe: Path, overrides: list[str] | None):  # noqa: ANN202
    from rlft.rundir.paths import load_any

    return load_any(recipe, overrides or [])


def _check_data(loaded: LoadedRecipe, stages: list[str] | None = None) -> None:
    """Read the stages' local data files before any model loads; log where each one is."""
    from rlft.data.check import check_data, raise_problems

    checks = check_data(loaded, stages)
    raise_problems(checks)
    for check in checks:
        if check.source.path is not None:
            logging.getLogger("rlft").info("data %s: %s (%d rows)", check.source.key, check.source.shown(), check.rows)


@app.command()
def run(
    recipe: RecipeArg, set_: SetOpt = None, force: ForceOpt = False, restart: RestartOpt = False,
    verbose: VerboseOpt = False, dry_run: DryRunOpt = False, stand_in: StandInOpt = None, nproc: NprocOpt = None,
) -> None:
    """Run every stage of RECIPE in order; finished stages are skipped, an interrupted one resumes."""
    _setup_logging(verbose)
    loaded = _dry(_load(recipe, set_), dry_run, stand_in)
    _launch(nproc, loaded, list(loaded.recipe.stages))
    _check_data(loaded)
    from rlft.pipeline import run_pipeline
    from rlft.rundir.results import print_run_table

    artifacts = run_pipeline(loaded, resume=True, force=force, restart=restart)
    if _main_rank():  # under torchrun the other ranks write nothing to the run directory
        print_run_table(loaded, artifacts)
        _dry_report(loaded, dry_run)


def _launch(nproc: int | None, loaded: LoadedRecipe, stages: list[str]) -> None:
    """With --nproc N > 1 outside torchrun: check that `stages` can run on N processes, then run
    this same command as N torchrun processes and exit with torchrun's code. Under torchrun (or
    N = 1) nothing happens."""
    import os

    if nproc is None or nproc == 1:
        return
    from rlft.explain import split_problem

    problems = [p for s in stages if (p := split_problem(loaded, s, nproc)) is not None]
    if problems:
        raise UserInputError("; ".join(problems))
    if "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != nproc:
            raise UserInputError(f"--nproc {nproc} inside a torchrun job of {os.environ['WORLD_SIZE']} processes; "
                                 "drop --nproc (torchrun's --nproc-per-node decides)")
        return
    import subprocess
    import tempfile

    args = sys.argv[1:] if _ARGV is None else _ARGV
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "rlft", *_without_nproc(args)]
    with tempfile.TemporaryDirectory(prefix="rlft-exit-") as codes:
        code = subprocess.call(command, env=os.environ | {_EXIT_DIR: codes})
        raise SystemExit(_job_exit_code(code, Path(codes)))


_EXIT_DIR = "RLFT_EXIT_DIR"


def _job_exit_code(torchrun_code: int, codes: Path) -> int:
    """The job's exit code: torchrun reports any failed rank as 1, so take the code rlft gave
    (2 input, 3 checkpoint/write, 4 alarm...) from the lowest rank that recorded one."""
    if torchrun_code == 0:
        return 0
    recorded = sorted((int(f.name.removeprefix("rank-")), int(f.read_text())) for f in codes.glob("rank-*"))
    return next((code for _, code in recorded if code != 0), torchrun_code)


def _record_exit_code(code: int) -> None:
    """Under `--nproc`, leave this rank's exit code where the launcher reads it."""
    import os

    codes, rank = os.environ.get(_EXIT_DIR), os.environ.get("RANK")
    if code != 0 and codes and rank is not None and Path(codes).is_dir():
        (Path(codes) / f"rank-{int(rank)}").write_text(str(code))


def _without_nproc(args: list[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


_ARGV: list[str] | None = None


def _main_rank() -> bool:
    """Rank 0 of a torchrun job (or the one process): read from torchrun's environment, since the
    pipeline has left the process group by the time the run table is printed."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _dry(loaded: LoadedRecipe, dry_run: bool, stand_in: list[str] | None) -> LoadedRecipe:
    """The recipe to run: `loaded` itself, or with --dry-run its CPU rehearsal (rlft/dry_run.py)."""
    if not dry_run:
        if stand_in:
            raise UserInputError("--stand-in is used with --dry-run only; a real run loads what the recipe names")
        _check_quantize(loaded)
        return loaded
    from rlft import dry_run as dry

    return dry.dry_recipe(loaded, dry.parse_stand_ins(stand_in, loaded.base_dir))


def _check_quantize(loaded: LoadedRecipe) -> None:
    """Quantized base weights (`quantize:`) need CUDA and bitsandbytes: say so at the recipe's line
    before any model loads (a --dry-run rehearses on CPU without them)."""
    specs: list[tuple[str, Any]] = [("model", loaded.recipe.model)] + [
        (f"stages.{name}.student", getattr(spec, "student", None)) for name, spec in loaded.recipe.stages.items()
    ]
    if all(spec is None or spec.quantize == "none" for _, spec in specs):
        return  # and torch stays unimported until the data is checked
    from rlft.errors import Problem, RecipeError
    from rlft.precision import quantization_problem

    problems: list[Problem] = []
    for key, spec in specs:
        why = quantization_problem(spec.quantize) if spec is not None else None
        if why:
            line, col = loaded.positions.get(f"{key}.quantize", (None, None))
            problems.append(Problem(str(loaded.path), line, col, f"{key}.quantize", why))
    if problems:
        raise RecipeError(problems)


def _dry_report(loaded: LoadedRecipe, dry_run: bool) -> None:
    if dry_run:
        from rlft.dry_run import report

        typer.echo(report(loaded))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="Stage name, or a kind (sft, grpo, ...) that one stage of the recipe has.")],
    recipe: Annotated[
        Path | None,
        typer.Option("--recipe", "-r", help="Recipe YAML file; default: the recipe saved in the only run under ./runs."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest committed checkpoint.")] = False,
    set_: SetOpt = None, force: ForceOpt = False, restart: RestartOpt = False, verbose: VerboseOpt = False,
    dry_run: DryRunOpt = False, stand_in: StandInOpt = None, nproc: NprocOpt = None,
) -> None:
    """Run one stage of RECIPE (its parents must have finished); a finished stage is left as it is."""
    if resume and restart:
        raise typer.BadParameter("--resume continues from the newest checkpoint and --restart discards it; give one")
    _setup_logging(verbose)
    if recipe is None:
        from rlft.rundir.paths import find_saved_recipe

        recipe = find_saved_recipe()
    loaded = _dry(_load(recipe, set_), dry_run, stand_in)
    _launch(nproc, loaded, [stage_name(loaded, name)])
    _check_data(loaded, [stage_name(loaded, name)])
    from rlft.pipeline import run_pipeline

    run_pipeline(loaded, only=stage_name(loaded, name), resume=resume, force=force, restart=restart)
    if _main_rank():
        _dry_report(loaded, dry_run)


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check RECIPE and read its local data files without loading any model; report every
    problem at once (exit 2)."""
    from rlft.data.check import check_data, raise_problems, summary

    loaded = _load(recipe, set_)
    checks = check_data(loaded)
    raise_problems(checks)
    typer.echo(f"{recipe}: ok ({len(loaded.recipe.stages)} stages: {', '.join(loaded.recipe.stages)})")
    for check in checks:
        typer.echo(f"  data {summary(check)}")


@app.command()
def explain(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML file.", show_default=False)] = None,
    set_: SetOpt = None,
    run: Annotated[Path | None, typer.Option("--run", help="A run directory: show what fed what.")] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Show each rank's share on N processes "
                                       "(refuses batch sizes that do not split).")] = 1,
) -> None:
    """Show RECIPE resolved (defaults, stage graph, batch arithmetic), or with --run a run's lineage."""
    if run is not None and recipe is None and not set_:
        from rlft.rundir.explain import explain_run

        typer.echo(explain_run(run))
        return
    if recipe is None or run is not None:
        raise UserInputError("explain takes either a recipe (rlft explain RECIPE [--set k=v]) or a run directory "
                              "(rlft explain --run runs/NAME)")
    from rlft.explain import explain_recipe

    typer.echo(explain_recipe(_load(recipe, set_), nproc))


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directory (runs/NAME); with --compare, two or more.", show_default=False)],
    compare: Annotated[bool, typer.Option("--compare", help="Overlay the given runs on one page.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Output directory; default RUN/report (first run).")] = None,
) -> None:
    """Write an HTML page (and PNGs) of a run's metrics, alarms, pipeline and samples; works while it runs."""
    if compare and len(runs) < 2:
        raise UserInputError("--compare overlays two or more runs: rlft report --compare runs/A runs/B")
    if not compare and len(runs) > 1:
        raise UserInputError(f"{len(runs)} run directories given; overlay them with --compare, or give one")
    from rlft.rundir.report import write_report

    typer.echo(f"report: {write_report(runs, out)}")


def stage_name(loaded: Any, name: str) -> str:
    """The stage NAME means: a stage of that name, else the one stage whose kind is NAME.

    Raises:
        UserInputError: no such stage (with a did-you-mean), or several stages of that kind.
    """
    stages = loaded.recipe.stages
    if name in stages:
        return name
    of_kind = [s for s, spec in stages.items() if spec.kind == name]
    if len(of_kind) == 1:
        return of_kind[0]
    if of_kind:
        raise UserInputError(f"{loaded.path}: {len(of_kind)} stages are {name} stages ({', '.join(of_kind)}); name one")
    import difflib

    close = difflib.get_close_matches(name, list(stages), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; stages: {', '.join(stages)}"
    raise UserInputError(f"{loaded.path}: no stage named '{name}'{hint}")


def _usage_error_types() -> tuple[type[Exception], ...]:
    """The classes of the parser's usage errors, whichever click typer runs on.

    Recent typer (0.29 here) vendors its own click (`typer.TyperException` is the base of its
    ClickException); older typer raises click's own. Both are reached through the bases of
    `typer.BadParameter`; click itself is added when it is installed.
    """
    types: list[type[Exception]] = [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    if hasattr(typer, "TyperException"):
        types.append(typer.TyperException)
    with contextlib.suppress(ImportError):
        import click

        types.append(click.ClickException)
    return tuple(types) or (typer.BadParameter,)


def _usage_line(err: Exception) -> str:
    """One line for a usage error: the command, what is wrong, where help is."""
    possibilities = getattr(err, "possibilities", None)
    if possibilities:  # an unknown option: click's own did-you-mean list
        message = f"{getattr(err, 'message', err)} (did you mean {' or '.join(sorted(possibilities))}?)"
    else:
        message = getattr(err, "format_message", err.__str__)()
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path if ctx is not None else "rlft"
    return f"{command}: {message.strip()} (see '{command} --help')"


def _print_error(message: str) -> None:
    from rich.text import Text

    from rlft.metrics import console

    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (also used by tests that fork a run)."""
    code = _main(argv)
    _record_exit_code(code)
    _leave_if_follower(code)
    return code


def _leave_if_follower(code: int) -> None:
    """A torchrun rank > 0 exits here, skipping interpreter teardown: it has met the others at the
    final barrier and written nothing that needs it, and tearing down the process group's C++
    threads at exit can abort (SIGABRT) while rank 0 is still finishing. Rank 0 exits normally."""
    import os

    if int(os.environ.get("RANK", "0")) > 0 and "TORCHELASTIC_RUN_ID" in os.environ:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _main(argv: list[str] | None) -> int:
    from rlft.ckpt.fsio import storage_errno

    global _ARGV
    args = sys.argv[1:] if argv is None else argv
    _ARGV = list(args)
    verbose = "--verbose" in args or "-v" in args
    _quiet_library_warnings()
    try:
        app(args=args, standalone_mode=False)
    except RlftError as err:
        if verbose:
            from rlft.metrics import console

            console.print_exception()
        _print_error(str(err))
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except _usage_error_types() as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `rlft`: the help is the message
            err.show()  # type: ignore[attr-defined]
        else:
            _print_error(_usage_line(err))
        return UserInputError.exit_code
    except Exception as err:
        if storage_errno(err) is None:
            raise
        _print_error(f"a write failed: {err}; free disk space and run the same command again")
        return WriteError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
