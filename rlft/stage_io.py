"""What stages share at their edges: turning `data:` entries into examples, and writing the
stage's final output (`<stage>/final/`) atomically before the pipeline's done marker."""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlft import dist, fsdp
from rlft.ckpt.fsio import commit_dir, writing
from rlft.data import encode
from rlft.data.batch import pack
from rlft.data.rows import data_fingerprint, load_rows, mix
from rlft.metrics import fmt, summary_table


def resolve_data_specs(ctx: Any, specs: list[Any]) -> list[Any]:
    """Replace a `source:` naming an earlier stage with that stage's data file (an absolute path)."""
    out = []
    for spec in specs:
        if spec.source in ctx.recipe.stages:
            spec = spec.model_copy(update={"source": ctx.artifacts[spec.source].data, "format": "messages"})
        out.append(spec)
    return out


def load_data(ctx: Any, specs: list[Any], role: str = "data") -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]], dict[str, str]]:
    """Rows of every data spec (train per spec, held-out pooled) and their fingerprints.

    Each data set's row counts go into the stage's lineage record under `role` (data, mix).
    """
    train, held_out, prints = [], [], {}
    for named, spec in zip(specs, resolve_data_specs(ctx, specs), strict=True):
        # keyed by the name in the recipe, not the resolved file: resume pins survive a moved run dir
        rows, eval_rows, prints[named.source] = _load_rows(ctx, named, spec, role)
        train.append(rows)
        held_out += eval_rows
    return train, held_out, prints


def _load_rows(ctx: Any, named: Any, spec: Any, role: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Train and held-out rows of one resolved data spec and its fingerprint, recorded for the
    stage's lineage (`named` is the spec as the recipe writes it, `spec` with a stage resolved)."""
    rows, eval_rows = load_rows(spec, ctx.data_base_dir(), ctx.recipe.seed)
    fingerprint = data_fingerprint(spec, ctx.data_base_dir(), ctx.recipe.seed)
    ctx.record.add_data(role, named.source, spec.source, fingerprint, len(rows), len(eval_rows))
    return rows, eval_rows, fingerprint



def load_prompts(
    ctx: Any, specs: list[Any], tokenizer: Any
) -> tuple[list[list[encode.PromptExample]], list[encode.PromptExample], dict[str, str]]:
    """Prompts of every data spec (training prompts per spec, held-out prompts pooled) and
    fingerprints; each spec's prompts, held-out ones included, follow its max_length/long_rows.

    Raises:
        DataError: a long prompt under `long_rows: error`, or every training prompt of a spec left out.
    """
    train, held_out, prints = [], [], {}
    for spec in specs:
        (rows,), eval_rows, spec_prints = load_data(ctx, [spec])
        train.append(encode.prompt_examples(rows, tokenizer, spec.max_length, spec.long_rows))
        held_out += encode.prompt_examples(eval_rows, tokenizer, spec.max_length, spec.long_rows, required=False)
        prints |= spec_prints
    return train, held_out, prints


def prepare_sft_data(
    ctx: Any, specs: list[Any], tokenizer: Any
) -> tuple[list, list, list[encode.PromptExample], dict[str, str]]:
    """Tokenised train examples (mixed by weight, packed if asked), held-out examples (for the
    loss) and held-out prompts (for accuracy), and fingerprints.

    Held-out rows are the first `eval_samples` of the pooled held-out rows; each follows its
    data set's max_length/long_rows like the training rows (a long one is an error naming the
    file and row, or is left out).
    """
    named_specs, specs = specs, resolve_data_specs(ctx, specs)
    per_spec, held_out, prints = [], [], {}
    for named, spec in zip(named_specs, specs, strict=True):
        rows, eval_rows, prints[named.source] = _load_rows(ctx, named, spec, "data")
        examples = encode.tokenize_sft(rows, tokenizer, spec.max_length, spec.long_rows, spec.source)
        if spec.packing:
            examples = pack(examples, spec.max_length)
        per_spec.append(examples)
        held_out.append((spec, eval_rows))
    train = per_spec[0] if len(per_spec) == 1 else mix(per_spec, [s.weight for s in specs], ctx.seed)
    eval_ex, eval_prompts, budget = [], [], ctx.spec.eval_samples
    for spec, rows in held_out:
        rows, budget = rows[:budget], budget - len(rows[:budget])
        eval_ex += encode.tokenize_sft(rows, tokenizer, spec.max_length, spec.long_rows, spec.source, required=False)
        graded = [r for r in rows if "answer" in r]
        eval_prompts += encode.prompt_examples(graded, tokenizer, spec.max_length, spec.long_rows, required=False)
    return train, eval_ex, eval_prompts, prints


@dataclass(frozen=True)
class StageOutput:
    """The figures a stage reports at its end (first and last eval, skipped steps)."""

    summary: dict[str, Any] = field(default_factory=dict[str, Any])

    @staticmethod
    def from_history(history: list[dict[str, Any]], skipped: int) -> StageOutput:
        evals = [r for r in history if any(k.startswith("eval/") for k in r)]
        summary: dict[str, Any] = {"steps": max((r["step"] for r in history), default=0), "skipped_steps": skipped}
        for key, name in (("loss", "train/loss"), ("reward/mean", "reward/mean")):
            values = [r[key] for r in history if isinstance(r.get(key), float)]
            if values:  # the mean of the first and last 10% of steps: single steps are noisy
                k = max(1, len(values) // 10)
                summary[f"{name}_first"], summary[f"{name}_last"] = sum(values[:k]) / k, sum(values[-k:]) / k
        if evals:
            for key in (k for k in evals[-1] if k.startswith("eval/")):
                first = next((r[key] for r in evals if key in r), None)
                summary[f"{key}_first"], summary[f"{key}_last"] = first, evals[-1][key]
        return StageOutput(summary)


def finish_model(ctx: Any, model: Any, tokenizer: Any, output: StageOutput) -> Any:
    """Write `<stage>/final/` (merged model, adapter, metrics.json) atomically; return the Artifact."""
    from rlft.models import is_lora, save_model
    from rlft.run import Artifact

    final = ctx.stage_dir / "final"
    state = fsdp.full_model_state(model)  # a sharded model: every rank sends its shards to rank 0
    if not dist.is_main():  # rank 0 writes the one output; the others wait for it
        dist.barrier()
        return Artifact(ctx.stage, ctx.spec.kind, model=str(final / "model"), metrics=output.summary)
    if state is not None and is_lora(model):  # a sharded LoRA model: rebuilt whole on rank 0,
        model, state = fsdp.unsharded_lora(model, state), None  # peft saves and merges it as in one process
    staging = new_staging(ctx.stage_dir)
    with writing(f"stage {ctx.stage}'s final model", final), removed_on_error(staging):
        save_model(model, tokenizer, staging, state)
        (staging / "metrics.json").write_text(json.dumps(output.summary, indent=1, sort_keys=True))
        commit_dir(staging, final)
    dist.barrier()
    summary_table(f"stage {ctx.stage} ({ctx.spec.kind})", [(k, fmt(v)) for k, v in output.summary.items()])
    return Artifact(ctx.stage, ctx.spec.kind, model=str(final / "model"), metrics=output.summary)


def new_staging(stage_dir: Path) -> Path:
    """A fresh `.final-<uuid>` directory; those of a killed earlier attempt (and an old `final`
    a kill left aside during `commit_dir`) are removed first."""
    for old in [*stage_dir.glob(".final-*"), *stage_dir.glob(".replaced-final-*")]:
        shutil.rmtree(old, ignore_errors=True)
    return stage_dir / f".final-{uuid.uuid4().hex}"


@contextlib.contextmanager
def removed_on_error(staging: Path) -> Iterator[None]:
    """Remove a half-written staging directory when the block fails (it holds the space a full disk needs)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
