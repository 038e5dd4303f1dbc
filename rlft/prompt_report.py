"""The prompt each stage renders, side by side, and the stages whose prompts should match but do not.

A stage's prompt is its first data set's first row through `rlft.data.encode.prompt_ids` (system
prompt, chat template, generation prompt) with the tokenizer of the model it trains or
scores: the exact text the model sees. Its frame is the same rendering with each user turn's
text replaced by a placeholder. A stage that reads another's model (`from:`, `teacher:`, an
eval's `models:`) should frame its prompts as that stage did: a system prompt dropped from the
eval stage, for one, scores the trained model on prompts it never saw; each such pair is
reported. Stages scored by an answer reward also get their gold answers checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlft.recipe.load import LoadedRecipe

USER_TEXT = "<<the row's question>>"
ANSWER_ROWS = 8  # rows whose gold answers are checked
ANSWER_REWARDS = {"math_answer", "exact_answer"}
MAX_ANSWER_WORDS = 4  # a gold answer longer than this is a sentence, not an answer


@dataclass(frozen=True)
class StagePrompt:
    source: str  # the data set the row came from
    text: str  # the rendered prompt, decoded
    prompt_tokens: int
    completion_tokens: int | None  # the row's reference completion, when it has one
    frame: str = ""  # the prompt with each user turn's text replaced by USER_TEXT: what stages must share
    answers: tuple = ()  # the `answer` column of the first rows, when the data set has one


def stage_prompts(loaded: LoadedRecipe, build: bool = True) -> dict[str, StagePrompt]:
    """The rendered first prompt of every stage whose first data set is not another stage's output.

    With `build` False nothing is written: a tiny:<preset> model's tokenizer is made in memory
    (`rlft explain`); otherwise tokenizers load from the models as the stages load them.

    Raises:
        DataError: the row cannot be read or rendered (as the stage itself would fail).
        UserInputError: a tokenizer that does not load.
    """
    from rlft import models
    from rlft.data.encode import prompt_ids, prompt_messages, render_prompt_ids
    from rlft.data.rows import load_rows
    tokenizers: dict[str, Any] = {}
    out: dict[str, StagePrompt] = {}
    for stage, spec in loaded.recipe.stages.items():
        data = [d for d in getattr(spec, "data", []) if d.source not in loaded.recipe.stages]
        if not data:
            continue
        model = getattr(spec, "student", None) or loaded.recipe.model
        if not build and model.name.startswith("tiny:"):
            source = model.name
            if source not in tokenizers:
                from rlft.tiny import tokenizer_of

                tokenizers[source] = tokenizer_of(model.tiny.tokenizer or "byte" if model.tiny else "byte")
        else:
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
        frame = [{**m, "content": USER_TEXT} if m["role"] == "user" else m for m in prompt_messages(row)]
        out[stage] = StagePrompt(
            source=data[0].source,
            text=tokenizer.decode(ids),
            prompt_tokens=len(ids),
            completion_tokens=None if completion is None else len(tokenizer(completion, add_special_tokens=False)["input_ids"]),
            frame=tokenizer.decode(render_prompt_ids(tokenizer, frame)),
            answers=tuple(r["answer"] for r in rows[:ANSWER_ROWS] if "answer" in r),
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
    """One line per pair of stages, one reading the other's model, whose prompts are framed
    differently (system prompt, template, generation prompt), whatever their questions."""
    out = []
    for stage, mine in prompts.items():
        for other in reads_models_of(loaded, stage):
            theirs = prompts.get(other)
            if theirs is None or theirs.frame == mine.frame:
                continue
            out.append(f"stage {stage} frames its prompts differently from stage {other}, whose model it reads "
                       f"({_difference(theirs.frame, mine.frame)}); give both the same system_prompt")
    return out


def _difference(a: str, b: str) -> str:
    """Where two renderings part: the first differing position with a little context."""
    i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"from character {i}: {a[i:i + 40]!r} vs {b[i:i + 40]!r}"


def answer_problems(loaded: LoadedRecipe, prompts: dict[str, StagePrompt]) -> list[str]:
    """One line per stage scored by an answer reward whose gold answers are not answers: no
    `answer` column, or one holding a sentence (GSM8K's worked solution without its `#### n`)."""
    from rlft.rewards.builtin import gold_answer
    out = []
    for stage, shown in prompts.items():
        spec = loaded.recipe.stages[stage]
        names = {r.name for r in getattr(spec, "rewards", [])} & ANSWER_REWARDS
        if not names:
            continue
        reward = sorted(names)[0]
        if not shown.answers:
            out.append(f"stage {stage}: {reward} compares with an `answer` column, and {shown.source} has none "
                       "(map one with columns: {YOUR_COLUMN: answer})")
            continue
        bad = [a for a in shown.answers if not gold_answer(a) or len(gold_answer(a).split()) > MAX_ANSWER_WORDS]
        if bad:
            out.append(f"stage {stage}: {len(bad)} of the first {len(shown.answers)} gold answers of {shown.source} "
                       f"are not a final answer {reward} can compare with, e.g. {str(bad[0])[:60]!r} (end it with "
                       "`#### <answer>`, as GSM8K does, or keep only the answer)")
    return out


def prompts_section(loaded: LoadedRecipe) -> list[str]:
    """`rlft explain`'s prompt report: each stage's first prompt as rendered, then the warnings;
    one line saying why when a tokenizer or data set cannot be read here (offline, say)."""
    from rlft.errors import RlftError

    lines = ["# prompts (each stage's first row, rendered with its model's chat template)"]
    try:
        prompts = stage_prompts(loaded, build=False)
    except (RlftError, OSError, ValueError) as err:
        return [*lines, f"  not rendered: {err}".splitlines()[0]]
    for stage, shown in prompts.items():
        lines.append(f"  {stage}: {shown.prompt_tokens} prompt tokens ({shown.source})")
        lines += [f"    | {line}" for line in shown.text.splitlines()]
    lines += [f"warning: {w}" for w in mismatches(loaded, prompts) + answer_problems(loaded, prompts)]
    return lines
