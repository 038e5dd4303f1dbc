"""What a stage may know about its run: the RunContext it is given, the Artifact it returns, and
the done markers (`stage.done.json`) that let a rerun skip it. Stages import this module, never
the pipeline; the pipeline orders stages and calls them (rlft/pipeline.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from rlft.ckpt.fsio import atomic_write_text, writing
from rlft.ckpt.manifest import fingerprint, hash_tree
from rlft.errors import UserInputError
from rlft.recipe.load import LoadedRecipe
from rlft.recipe.schema import LoraOrFull, ModelSpec, Recipe
from rlft.rundir.lineage import StageRecord

log = logging.getLogger(__name__)

MODEL_KINDS = {"sft", "grpo", "ppo", "distill"}
Spec = TypeVar("Spec")


@dataclass(frozen=True)
class Artifact:
    """What a finished stage hands to later ones."""

    stage: str
    kind: str
    model: str | None = None  # loadable by from_pretrained: hub name or absolute directory
    data: str | None = None  # JSONL data set (sample stages), absolute
    fingerprint: str = ""  # hash of the outputs, pins later stages' inputs
    metrics: dict[str, Any] = field(default_factory=dict[str, Any])

    @property
    def model_source(self) -> str:
        """`model`, for a stage that loads it (the recipe checks refuse a `from:` without a model)."""
        if self.model is None:
            raise UserInputError(f"stage {self.stage} ({self.kind}) wrote no model to load")
        return self.model


@dataclass
class RunContext(Generic[Spec]):
    """Everything a stage needs from the run: recipe, directories, parents, flags; `spec` is the
    stage's own recipe entry, typed by the stage (`RunContext[GRPOSpec]`)."""

    loaded: LoadedRecipe
    run_dir: Path
    stage: str
    artifacts: dict[str, Artifact]
    resume: bool = True
    force: bool = False
    record: StageRecord = field(default_factory=StageRecord)  # inputs as the stage loads them

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe

    @property
    def spec(self) -> Spec:
        return cast(Spec, self.recipe.stages[self.stage])  # the stage module names its kind's spec

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage

    @property
    def seed(self) -> int:
        """The stage's seed: the recipe seed mixed with the stage's position, so stages differ."""
        return self.recipe.seed * 1000 + list(self.recipe.stages).index(self.stage)

    def parent(self, name: str | None = None) -> Artifact:
        """A parent stage's artifact: `name`, else the stage's `from:`."""
        spec: Any = self.spec  # every kind but eval has `from:`; eval names its models
        return self.artifacts[name or spec.from_]

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
        lora, spec = self.lora(), self.recipe.stages[self.stage]
        inputs = _flatten(
            {
                # the gate judges the result, it does not change it: not an input
                f"stages.{self.stage}": spec.model_dump(mode="json", by_alias=True, exclude={"gate", "alarms"}),
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


# --------------------------------------------------------------------------- done markers


def write_done(ctx: RunContext, artifact: Artifact, inputs_hash: str, record: dict[str, Any] | None = None) -> Artifact:
    """Hash the stage's final outputs and write `stage.done.json` last, atomically.

    `record` adds what describes the stage: `lineage` (rlft/rundir/lineage.py), the `gate` verdict
    (rlft/recipe/gates.py). Skip and verify read only `inputs_hash` and `outputs`.
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
    parents = [r for r in input_stages(loaded, stage) if r in artifacts]
    blob = {
        "stage": {k: v for k, v in loaded.raw["stages"][stage].items() if k not in ("gate", "alarms")},  # not inputs
        "model": loaded.raw["model"],
        "lora": loaded.raw.get("lora"),
        "seed": loaded.recipe.seed,
        "index": list(loaded.recipe.stages).index(stage),
        "parents": {p: artifacts[p].fingerprint for p in sorted(parents)},
        "kind": spec.kind,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def input_stages(loaded: LoadedRecipe, stage: str) -> list[str]:
    from rlft.recipe.schema import stage_refs

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
