"""The prompt each stage renders, side by side, and the stages whose prompts should match but do not.

A stage's prompt is its first data set's first row through `rlft.data.prompt_ids` (system
prompt, chat template, generation prompt) with the tokenizer of the model it trains or
scores: the exact text the model sees. Two stages that read the same data set should render
the same prompt for the same row when one reads the other's model (`from:`, `teacher:`, an
eval's `models:`); a system prompt dropped from the eval stage, for one, scores the trained
model on prompts it never saw, and is reported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlft.recipe_load import LoadedRecipe


@dataclass(frozen=True)
class StagePrompt:
    source: str  # the data set the row came from
    text: str  # the rendered prompt, decoded
    prompt_tokens: int
    completion_tokens: int | None  # the row's reference completion, when it has one


def stage_prompts(loaded: LoadedRecipe) -> dict[str, StagePrompt]:
    """The rendered first prompt of every stage whose first data set is not another stage's output.

    Raises:
        DataError: the row cannot be read or rendered (as the stage itself would fail).
        UserInputError: a tokenizer that does not load.
    """
    from rlft import models
    from rlft.data import prompt_ids
    from rlft.data_load import load_rows

    tokenizers: dict[str, Any] = {}
    out: dict[str, StagePrompt] = {}
    for stage, spec in loaded.recipe.stages.items():
        data = [d for d in getattr(spec, "data", []) if d.source not in loaded.recipe.stages]
        if not data:
            continue
        model = getattr(spec, "student", None) or loaded.recipe.model
        source = models.prepare_base(model, loaded.run_dir / "models", loaded.base_dir)
        if source not in tokenizers:
            tokenizers[source] = models.load_tokenizer(source, model)
        tokenizer = tokenizers[source]
        train, heldout = load_rows(data[0], loaded.base_dir, loaded.recipe.seed)
        rows = train or heldout
        if not rows:
            continue
        row = rows[0]
        ids = prompt_ids(row, tokenizer)
        completion = row.get("completion")
        out[stage] = StagePrompt(
            source=data[0].source,
            text=tokenizer.decode(ids),
            prompt_tokens=len(ids),
            completion_tokens=None if completion is None else len(tokenizer(completion, add_special_tokens=False)["input_ids"]),
        )
    return out


def reads_models_of(loaded: LoadedRecipe, stage: str) -> list[str]:
    """The stages whose model `stage` continues from, learns from or scores."""
    spec = loaded.recipe.stages[stage]
    if spec.kind == "eval":
        from rlft.run import artifacts_before

        return list(spec.models) or artifacts_before(loaded, stage)
    names = [getattr(spec, "teacher", None) if spec.kind == "distill" else getattr(spec, "from_", None)]
    return [n for n in names if n and n in loaded.recipe.stages]


def mismatches(loaded: LoadedRecipe, prompts: dict[str, StagePrompt]) -> list[str]:
    """One line per pair of stages that read the same data set, one reading the other's model,
    and render its first row's prompt differently."""
    out = []
    for stage, mine in prompts.items():
        for other in reads_models_of(loaded, stage):
            theirs = prompts.get(other)
            if theirs is None or theirs.source != mine.source or theirs.text == mine.text:
                continue
            out.append(f"stage {stage} renders the prompts of {mine.source} differently from stage {other}, whose "
                       f"model it reads ({_difference(theirs.text, mine.text)}); give both the same system_prompt "
                       "and columns")
    return out


def _difference(a: str, b: str) -> str:
    """Where two renderings part: the first differing position with a little context."""
    i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"from character {i}: {a[i:i + 40]!r} vs {b[i:i + 40]!r}"
