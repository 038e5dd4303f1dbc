"""Order stages, resolve `from:` to artifacts, skip finished stages, resume the running one.

Run layout (`<output_dir>/<run_name>/`, absolute from the moment the recipe loads):
    recipe.yaml, run.json  the resolved recipe of the latest invocation and its directory (rlft/rundir.py)
    models/                tiny base models built locally
    <stage>/step-N/        committed checkpoints (rlft/checkpoint.py)
    <stage>/final/         the stage's output: model/ (merged), adapter/, data.jsonl, metrics
    <stage>/stage.done.json  inputs' and outputs' hashes; written last (RELIABILITY.md item 3)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlft import gates, hints
from rlft.errors import UserInputError
from rlft.fsio import atomic_write_text, writing
from rlft.lineage import StageRecord, stage_lineage
from rlft.recipe import LoraOrFull, ModelSpec
from rlft.recipe_load import LoadedRecipe

log = logging.getLogger(__name__)

STAGE_MODULES = {
    "sft": "rlft.stages.sft",
    "grpo": "rlft.stages.grpo",
    "ppo": "rlft.stages.ppo",
    "sample": "rlft.stages.sample",
    "distill": "rlft.stages.distill",
    "eval": "rlft.stages.eval",
}
MODEL_KINDS = {"sft", "grpo", "ppo", "distill"}


@dataclass(frozen=True)
class Artifact:
    """What a finished stage hands to later ones."""

    stage: str
    kind: str
    model: str | None = None  # loadable by from_pretrained: hub name or absolute directory
    data: str | None = None  # JSONL data set (sample stages), absolute
    fingerprint: str = ""  # hash of the outputs, pins later stages' inputs
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """Everything a stage needs from the run: recipe, directories, parents, flags."""

    loaded: LoadedRecipe
    run_dir: Path
    stage: str
    artifacts: dict[str, Artifact]
    resume: bool = True
    force: bool = False
    record: StageRecord = field(default_factory=StageRecord)  # inputs as the stage loads them

    @property
    def recipe(self) -> Any:
        return self.loaded.recipe

    @property
    def spec(self) -> Any:
        return self.recipe.stages[self.stage]

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage

    @property
    def seed(self) -> int:
        """The stage's seed: the recipe seed mixed with the stage's position, so stages differ."""
        return self.recipe.seed * 1000 + list(self.recipe.stages).index(self.stage)

    def parent(self, name: str | None = None) -> Artifact:
        return self.artifacts[name or self.spec.from_]

    def lora(self) -> LoraOrFull:
        """The stage's LoRA setting: its own `lora:` when given, else the recipe's."""
        own = getattr(self.spec, "lora", None)
        return own if own is not None else self.recipe.lora

    def model_spec(self) -> ModelSpec:
        return self.recipe.model

    def data_base_dir(self) -> Path:
        return self.loaded.base_dir

    def input_meta(self, data_fingerprints: dict[str, str], tokenizer_hash: str = "") -> dict[str, Any]:
        """What resume pins (RELIABILITY R5): this stage's keys, model, LoRA, seed, parent, data."""
        lora = self.lora()
        inputs = _flatten(
            {
                # the gate judges the result, it does not change it: not an input
                f"stages.{self.stage}": self.spec.model_dump(mode="json", by_alias=True, exclude={"gate"}),
                "model": self.recipe.model.model_dump(mode="json"),
                "lora": lora if isinstance(lora, str) else lora.model_dump(mode="json"),
            }
        )
        inputs["seed"] = self.recipe.seed
        inputs["parent"] = self.parent().fingerprint if hasattr(self.spec, "from_") else ""
        inputs.update({f"data.{k}": v for k, v in data_fingerprints.items()})
        if tokenizer_hash:
            inputs["tokenizer"] = tokenizer_hash
        import torch

        return {"inputs": inputs, "num_threads": torch.get_num_threads(), "stage": self.stage}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(obj, sort_keys=True) if isinstance(obj, list) else obj}


def stage_runner(kind: str) -> Callable[[RunContext], Artifact]:
    return importlib.import_module(STAGE_MODULES[kind]).run


# --------------------------------------------------------------------------- done markers


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`, by relative path."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[str(path.relative_to(root))] = h.hexdigest()
    return out


def fingerprint(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def write_done(ctx: RunContext, artifact: Artifact, inputs_hash: str, record: dict[str, Any] | None = None) -> Artifact:
    """Hash the stage's final outputs and write `stage.done.json` last, atomically.

    `record` adds what describes the stage: `lineage` (rlft/lineage.py), the `gate` verdict
    (rlft/gates.py). Skip and verify read only `inputs_hash` and `outputs`.
    """
    outputs = hash_tree(ctx.stage_dir / "final")
    artifact = Artifact(
        stage=artifact.stage,
        kind=artifact.kind,
        model=artifact.model,
        data=artifact.data,
        fingerprint=fingerprint(outputs),
        metrics=artifact.metrics,
    )
    marker = {
        "stage": ctx.stage,
        "kind": artifact.kind,
        "inputs_hash": inputs_hash,
        "outputs": outputs,
        "artifact": {
            "model": _in_run_dir(artifact.model, ctx.run_dir),
            "data": _in_run_dir(artifact.data, ctx.run_dir),
            "metrics": artifact.metrics,
        },
    }
    marker |= {k: v for k, v in (record or {}).items() if v is not None and k not in marker}
    with writing(f"stage {ctx.stage}'s done marker", ctx.stage_dir / "stage.done.json"):
        atomic_write_text(ctx.stage_dir / "stage.done.json", json.dumps(marker, indent=1, sort_keys=True))
    return artifact


def _in_run_dir(path: str | None, run_dir: Path) -> str | None:
    """A marker stores output paths relative to the run dir, so a moved run dir still works."""
    if path is None or not Path(path).is_relative_to(run_dir):
        return path
    return str(Path(path).relative_to(run_dir))


def _from_run_dir(path: str | None, run_dir: Path) -> str | None:
    return None if path is None else str(run_dir / path)  # an absolute path stays as it is


def read_done(ctx: RunContext, inputs_hash: str) -> Artifact | None:
    """The stage's artifact when its marker exists, matches the inputs, and its outputs verify."""
    path = ctx.stage_dir / "stage.done.json"
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("stage %s: %s is unreadable; running the stage again", ctx.stage, path)
        return None
    if marker.get("inputs_hash") != inputs_hash:
        log.warning("stage %s: inputs changed since it finished; running it again", ctx.stage)
        return None
    outputs = hash_tree(ctx.stage_dir / "final") if (ctx.stage_dir / "final").exists() else {}
    if outputs != marker["outputs"]:
        log.warning("stage %s: outputs do not match stage.done.json; running it again", ctx.stage)
        return None
    a = marker["artifact"]
    model, data = _from_run_dir(a["model"], ctx.run_dir), _from_run_dir(a["data"], ctx.run_dir)
    missing = [p for p in (model, data) if p is not None and not Path(p).exists()]
    if missing:  # e.g. a marker of an older rlft that stored paths relative to the working directory
        log.warning("stage %s: its output %s is missing; running it again", ctx.stage, missing[0])
        return None
    return Artifact(ctx.stage, marker["kind"], model, data, fingerprint(outputs), a["metrics"])


def stage_inputs_hash(loaded: LoadedRecipe, stage: str, artifacts: dict[str, Artifact]) -> str:
    """Hash of what a stage's result depends on: its spec, the model/LoRA/seed, its parents' outputs."""
    spec = loaded.recipe.stages[stage]
    parents = [r for r in _refs(loaded, stage) if r in artifacts]
    blob = {
        "stage": {k: v for k, v in loaded.raw["stages"][stage].items() if k != "gate"},  # not an input
        "model": loaded.raw["model"],
        "lora": loaded.raw.get("lora"),
        "seed": loaded.recipe.seed,
        "index": list(loaded.recipe.stages).index(stage),
        "parents": {p: artifacts[p].fingerprint for p in sorted(parents)},
        "kind": spec.kind,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _refs(loaded: LoadedRecipe, stage: str) -> list[str]:
    from rlft.recipe import stage_refs

    spec = loaded.recipe.stages[stage]
    names = [name for _, name in stage_refs(stage, spec)]
    for d in getattr(spec, "data", []) + getattr(spec, "mix", []):
        if d.source in loaded.recipe.stages:
            names.append(d.source)
    if spec.kind == "eval" and not spec.models:
        names += [s for s in loaded.recipe.stages if s in artifacts_before(loaded, stage)]
    return names


def artifacts_before(loaded: LoadedRecipe, stage: str) -> list[str]:
    """Model-producing stages written before `stage`."""
    order = list(loaded.recipe.stages)
    return [s for s in order[: order.index(stage)] if loaded.recipe.stages[s].kind in MODEL_KINDS]


# --------------------------------------------------------------------------- running


def run_dir_of(loaded: LoadedRecipe) -> Path:
    """The run directory, absolute (fixed when the recipe was loaded)."""
    return loaded.run_dir


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
    """Run the recipe's stages in order (or only `only`), skipping those already finished."""
    from rlft.rundir import prepare_run_dir, save_recipe
    from rlft.runlock import RunLock

    run_dir = loaded.run_dir
    prepare_run_dir(run_dir)
    with RunLock(run_dir):
        save_recipe(loaded)
        artifacts = {"base": base_artifact(loaded, run_dir)}
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
            with hints.running(loaded.path, stage, only is not None):
                artifact = stage_runner(loaded.recipe.stages[stage].kind)(ctx)
            verdict = _verdict(ctx, artifact)
            record = {"lineage": stage_lineage(ctx, _refs(loaded, stage)), "gate": verdict}
            artifacts[stage] = write_done(ctx, artifact, inputs_hash, record)
            _enforce_gate(ctx, verdict, only)  # after the marker: the stage's outputs stay committed
        return artifacts


def _verdict(ctx: RunContext, artifact: Artifact) -> dict[str, Any] | None:
    return gates.evaluate(ctx.spec.kind, getattr(ctx.spec, "gate", None), artifact.metrics)


def _enforce_gate(ctx: RunContext, verdict: dict[str, Any] | None, only: str | None) -> None:
    """GateError (exit 4) naming the stages that will not run when the stage's gate failed."""
    order = list(ctx.recipe.stages)
    later = order[order.index(ctx.stage) + 1 :] if only is None else [only] if only != ctx.stage else []
    gates.enforce(ctx.stage, verdict, later)


def _check_parents(loaded: LoadedRecipe, stage: str, artifacts: dict[str, Artifact]) -> None:
    missing = [p for p in _refs(loaded, stage) if p not in artifacts]
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
