"""Order stages, resolve `from:` to artifacts, skip finished stages, resume the running one.

Run layout (`<output_dir>/<run_name>/`, absolute from the moment the recipe loads):
    recipe.yaml, run.json  the resolved recipe of the latest invocation and its directory (rlft/rundir/paths.py)
    models/                tiny base models built locally
    <stage>/step-N/        committed checkpoints (rlft/ckpt/checkpoint.py)
    <stage>/final/         the stage's output: model/ (merged), adapter/, data.jsonl, metrics
    <stage>/stage.done.json  inputs' and outputs' hashes; written last (RELIABILITY.md item 3)
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlft import dist, hints, loggers
from rlft.ckpt.manifest import fingerprint, hash_tree
from rlft.errors import UserInputError
from rlft.explain import split_problem
from rlft.recipe import gates
from rlft.recipe.load import LoadedRecipe
from rlft.run import Artifact, RunContext, input_stages, read_done, stage_inputs_hash, write_done
from rlft.rundir.lineage import stage_lineage

log = logging.getLogger(__name__)



def stage_runner(kind: str) -> Callable[[RunContext[Any]], Artifact]:
    """The `run` function of a stage kind (imported here, so `rlft validate` does not load torch)."""
    from rlft.stages import distill, eval, grpo, ppo, sample, sft

    stages: dict[str, Callable[[RunContext[Any]], Artifact]] = {
        "sft": sft.run, "grpo": grpo.run, "ppo": ppo.run, "sample": sample.run, "distill": distill.run, "eval": eval.run,
    }
    return stages[kind]


# --------------------------------------------------------------------------- running


def base_artifact(loaded: LoadedRecipe, run_dir: Path) -> Artifact:
    from rlft import models

    source = models.prepare_base(loaded.recipe.model, run_dir / "models", loaded.base_dir)
    ident = source if not Path(source).is_dir() else fingerprint(hash_tree(Path(source)))
    return Artifact("base", "base", model=source, fingerprint=hashlib.sha256(ident.encode()).hexdigest())


def run_pipeline(
    loaded: LoadedRecipe,
    only: str | None = None,
    resume: bool = True,
    force: bool = False,
    restart: bool = False,
) -> dict[str, Artifact]:
    """Run the recipe's stages in order (or only `only`), skipping those already finished.

    Under torchrun every rank runs this; rank 0 alone prepares the run directory, holds the run
    lock and writes done markers, and hands its artifacts to the other ranks (rlft/dist.py).
    """
    dist.init()
    check_world(loaded, only)
    if not dist.is_main():
        artifacts = _follow_pipeline(loaded, only, resume, force)
    else:
        with _main_rank_lock(loaded):
            artifacts = _run_pipeline(loaded, only, resume, force, restart)
    dist.finish()
    return artifacts


def check_world(loaded: LoadedRecipe, only: str | None) -> None:
    """Refuse, before any work, stages that cannot run on this many processes (UserInputError)."""
    world = dist.world_size()
    if world == 1:
        return
    stages = [only] if only is not None else list(loaded.recipe.stages)
    problems = [p for s in stages if (p := split_problem(loaded, s, world)) is not None]
    if problems:
        raise UserInputError("; ".join(problems))


class _main_rank_lock:
    """Rank 0's hold on the run directory: prepared, locked, then the other ranks may start."""

    def __init__(self, loaded: LoadedRecipe) -> None:
        from rlft.rundir.lock import RunLock
        from rlft.rundir.paths import prepare_run_dir

        prepare_run_dir(loaded.run_dir)
        self.lock = RunLock(loaded.run_dir)

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def _follow_pipeline(loaded: LoadedRecipe, only: str | None, resume: bool, force: bool) -> dict[str, Artifact]:
    """A rank > 0: run each stage rank 0 runs, taking rank 0's skip decisions and artifacts."""
    artifacts: dict[str, Artifact] = dist.broadcast_object(None)
    while True:
        sent = dist.broadcast_object(None)
        if sent is None:
            return artifacts
        stage, artifacts = sent  # with the stages rank 0 skipped since its last broadcast
        ctx = RunContext(loaded, loaded.run_dir, stage, artifacts, resume=resume, force=force)
        dist.barrier()  # rank 0 has removed the stage's directory (--restart) and checked it
        with hints.running(loaded.path, stage, only is not None):
            stage_runner(loaded.recipe.stages[stage].kind)(ctx)
        artifacts = dist.broadcast_object(None)


def _run_pipeline(
    loaded: LoadedRecipe, only: str | None, resume: bool, force: bool, restart: bool,
) -> dict[str, Artifact]:
    from rlft.rundir.paths import save_recipe

    run_dir = loaded.run_dir
    loggers.configure(loaded.recipe.report_to)
    save_recipe(loaded)
    artifacts = {"base": base_artifact(loaded, run_dir)}
    dist.broadcast_object(artifacts)
    for stage in loaded.recipe.stages:
        ctx = RunContext(loaded, run_dir, stage, artifacts, resume=resume, force=force)
        inputs_hash = stage_inputs_hash(loaded, stage, artifacts)
        if only is not None and stage != only:
            done = read_done(ctx, inputs_hash)
            if done is not None:
                artifacts[stage] = done
            if list(loaded.recipe.stages).index(stage) > list(loaded.recipe.stages).index(only):
                break
            if done is not None:
                _enforce_gate(ctx, _verdict(ctx, done), only)
            continue
        if restart and ctx.stage_dir.exists():
            shutil.rmtree(ctx.stage_dir)
        done = read_done(ctx, inputs_hash)
        if done is not None:
            again = f" (`rlft stage {stage} --recipe {loaded.path} --restart` runs it again)" if only else ""
            log.info("stage %s already finished; skipping%s", stage, again)
            artifacts[stage] = done
            _enforce_gate(ctx, _verdict(ctx, done), only)
            continue
        _check_parents(loaded, stage, artifacts)
        _check_resumable(ctx, only is not None and not resume)
        dist.broadcast_object((stage, artifacts))  # the other ranks run it too
        dist.barrier()
        with hints.running(loaded.path, stage, only is not None):
            artifact = stage_runner(loaded.recipe.stages[stage].kind)(ctx)
        verdict = _verdict(ctx, artifact)
        record = {"lineage": stage_lineage(ctx, input_stages(loaded, stage)), "gate": verdict}
        artifacts[stage] = write_done(ctx, artifact, inputs_hash, record)
        dist.broadcast_object(artifacts)
        _enforce_gate(ctx, verdict, only)  # after the marker: the stage's outputs stay committed
    dist.broadcast_object(None)  # the other ranks are done
    return artifacts


def _verdict(ctx: RunContext, artifact: Artifact) -> dict[str, Any] | None:
    return gates.evaluate(ctx.spec.kind, getattr(ctx.spec, "gate", None), artifact.metrics)


def _enforce_gate(ctx: RunContext, verdict: dict[str, Any] | None, only: str | None) -> None:
    """GateError (exit 4) naming the stages that will not run when the stage's gate failed."""
    order = list(ctx.recipe.stages)
    later = order[order.index(ctx.stage) + 1 :] if only is None else [only] if only != ctx.stage else []
    gates.enforce(ctx.stage, verdict, later)


def _check_parents(loaded: LoadedRecipe, stage: str, artifacts: dict[str, Artifact]) -> None:
    missing = [p for p in input_stages(loaded, stage) if p not in artifacts]
    if missing:
        raise UserInputError(
            f"stage {stage} needs {', '.join(missing)} to have finished first; "
            f"run `rlft run {loaded.path}` or `rlft stage {missing[0]} --recipe {loaded.path}`"
        )


def _check_resumable(ctx: RunContext, explicit_fresh: bool) -> None:
    """`rlft stage X` without --resume refuses to silently continue (or wipe) earlier work."""
    has_ckpt = any(ctx.stage_dir.glob("step-*")) if ctx.stage_dir.exists() else False
    if explicit_fresh and has_ckpt:
        raise UserInputError(
            f"{ctx.stage_dir} has checkpoints from an earlier run; pass --resume to continue it "
            "or --restart to start the stage over"
        )
