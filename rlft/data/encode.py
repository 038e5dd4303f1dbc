"""Data for the stages: canonical rows -> token ids with loss masks (SFT) or prompt ids (RL).

Reading files is `rlft.data.files`, canonical rows (checks, split, mix) `rlft.data.rows`, batches
(packing, collation, resumable loaders) `rlft.data.batch`.

The prompt of a row is built in one place for every stage (`prompt_messages`, `prompt_ids`):
the data set's system prompt (the row's `_system`) unless the row has its own system message,
the user turn(s), and the template's generation prompt. SFT's prompt part, GRPO/PPO rollouts,
held-out accuracy, rejection sampling, distillation and eval all render these same ids.

Loss masks (1 = the token is a target of the next-token loss):
- messages: assistant content and its end-of-turn marker (the tokenizer's eos) of every
  assistant turn; template glue after the marker (Qwen's "\\n") is not trained.
- prompt_completion: the prompt is rendered as a user turn with the generation prompt, the
  completion follows as the assistant turn and ends with eos; loss on completion + eos. These
  are exactly the tokens a rollout generates after the same prompt ids.
- text: every token, with eos appended.
Token 0 is never a target (nothing predicts it), so `sum(loss_mask)` is the number of loss terms.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

from jinja2.exceptions import TemplateError

from rlft.data.batch import (
    SFTExample,
)
from rlft.data.rows import CANONICAL_COLUMNS, row_format, usage_problem
from rlft.errors import DataError, UserInputError

log = logging.getLogger(__name__)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class PromptExample:
    """One prompt: `prompt_ids(row)`, the last user message, the row's other columns (answer,
    task, ...) for rewards and verifiers, and the chat the ids render (`prompt_messages(row)`)."""

    prompt_ids: list[int]
    prompt_text: str
    columns: dict[str, Any]
    messages: list[dict[str, Any]]
    row: dict[str, Any]  # the canonical row it was built from


def tokenize_sft(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    long_rows: Literal["error", "drop", "truncate"],
    source_name: str,
    required: bool = True,
) -> list[SFTExample]:
    """Token ids and loss masks of canonical rows (see the module docstring for the masks).

    Args:
        rows: Canonical rows (`load_rows`, `mix`); `_source`/`_row` name rows in errors and
            `_system` is their data set's system prompt.
        tokenizer: A Hugging Face tokenizer; its chat template renders messages/prompts.
        max_length: Longest allowed sequence in tokens.
        long_rows: Longer rows are an error, dropped, or cut to `max_length` (a cut row left
            without any target token is dropped).
        source_name: Name for errors about rows that carry no `_source`.
        required: Every row dropped is an error (training rows); False leaves no examples
            (held-out rows, which follow the same `long_rows` rule).

    Raises:
        DataError: a row with nothing to train on, a long row under "error", or every row
            dropped when `required`.
    """
    _require_eos(tokenizer)
    out, dropped = [], 0
    name = rows[0].get("_source", source_name) if rows else source_name
    for i, row in enumerate(rows):
        where = (row.get("_source", source_name), row.get("_row", i + 1))
        try:
            ids, mask = _encode_row(row, tokenizer, where)
        except TemplateError as err:
            raise _template_error(err, where) from None
        mask[0] = 0
        truncated = len(ids) > max_length
        if truncated:
            if long_rows == "error":
                raise DataError(where[0], f"is {len(ids)} tokens, longer than max_length {max_length}; raise "
                                "max_length or set long_rows: drop / truncate", row=where[1])
            if long_rows == "drop":
                dropped += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            if truncated:
                dropped += 1
                continue
            raise DataError(where[0], "has no tokens to train on (no assistant turn or empty completion)",
                            row=where[1])
        out.append(SFTExample(input_ids=ids, loss_mask=mask))
    _report_dropped(name, "rows", len(rows), len(out), dropped, max_length, long_rows, required)
    return out


def _template_error(err: Exception, where: tuple) -> DataError:
    return DataError(where[0], f"the tokenizer's chat template rejected this row: {err}", row=where[1])


def _require_eos(tokenizer: Any) -> None:
    if tokenizer.eos_token_id is None:
        raise UserInputError("the tokenizer has no eos token, so completions cannot be taught to end; "
                             "use a tokenizer with eos_token set")


def _encode_row(row: dict[str, Any], tokenizer: Any, where: tuple) -> tuple[list[int], list[int]]:
    problem = usage_problem(row, "reply", where)
    if problem is not None:
        raise problem
    fmt = row_format(row)
    if fmt == "messages":
        return _encode_messages(conversation(row), tokenizer, where)
    if fmt == "prompt_completion":
        prompt = prompt_ids(row, tokenizer)
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)
    ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return ids, [1] * len(ids)


def _with_system(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def prompt_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat a row's reply follows: system message, user turn(s), no reply.

    The system message is the row's own (a messages row starting with one), else its data
    set's `system_prompt` (`_system`), else none. A prompt / prompt_completion row is one user
    turn; a messages row keeps its turns up to (not including) its final assistant turn(s).

    Raises:
        DataError: a text row, or a conversation without a user turn.
    """
    where = (row.get("_source", "data"), row.get("_row"))
    problem = usage_problem(row, "prompt", where)
    if problem is not None:
        raise problem
    if row_format(row) != "messages":
        return _with_system([{"role": "user", "content": row["prompt"]}], row.get("_system"))
    messages = list(row["messages"])
    while messages[-1]["role"] == "assistant":
        messages.pop()
    return _with_system(messages, row.get("_system"))


def conversation(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole chat of a row with a reply: `prompt_messages(row)` followed by the reply (a
    messages row keeps every turn, with the data set's system message put first if it has none)."""
    if row_format(row) == "messages":
        return _with_system(row["messages"], row.get("_system"))
    return [*prompt_messages(row), {"role": "assistant", "content": row["completion"]}]


def prompt_ids(row: dict[str, Any], tokenizer: Any) -> list[int]:
    """The prompt ids of a row, as every stage renders them: `prompt_messages(row)` through the
    chat template with the generation prompt (`render_prompt_ids`).

    Raises:
        DataError: see `prompt_messages`, or the chat template rejects the row.
    """
    return _render_prompt(row, tokenizer)[1]


def _render_prompt(row: dict[str, Any], tokenizer: Any) -> tuple[list[dict[str, Any]], list[int]]:
    messages = prompt_messages(row)
    try:
        return messages, render_prompt_ids(tokenizer, messages)
    except TemplateError as err:
        raise _template_error(err, (row.get("_source", "data"), row.get("_row"))) from None


def _template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return template.get("default") if isinstance(template, dict) else template


def _encode_messages(messages: list[dict[str, Any]], tokenizer: Any, where: tuple) -> tuple[list[int], list[int]]:
    template = _template(tokenizer)
    if template is None:
        raise DataError(where[0], "has chat messages but the tokenizer has no chat template; use an instruct "
                        "model's tokenizer or prompt/completion rows", row=where[1])
    if _GENERATION_TAG.search(template):
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), [int(m) for m in enc["assistant_masks"]]
    return _prefix_diff(messages, tokenizer, where)


def _render_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefix_diff(messages: list[dict[str, Any]], tokenizer: Any, where: tuple) -> tuple[list[int], list[int]]:
    """Assistant spans by rendering prefixes, for templates without {% generation %} markers.

    Turn i spans render(messages[:i], generation prompt) .. render(messages[:i+1]) in the full
    rendering, cut after its last eos; this needs a template whose renderings extend each other.
    """
    full = _render_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_ids(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if upto[: len(before)] != before or full[: len(upto)] != upto:
            raise DataError(where[0], f"the chat template renders assistant turn {i + 1} differently in a "
                            "longer conversation (e.g. it drops earlier reasoning), so its tokens cannot be "
                            "located; split the conversation or use prompt/completion rows", row=where[1])
        span = upto[len(before):]
        end = len(span)
        if tokenizer.eos_token_id in span:
            end = len(span) - span[::-1].index(tokenizer.eos_token_id)
        mask[len(before): len(before) + end] = [1] * end
    return full, mask


def render_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Prompt ids ending where the assistant's reply starts.

    With a chat template: the rendered messages plus the generation prompt. Without one (a base
    model): the contents joined by blank lines, tokenised with the tokenizer's special tokens.
    """
    if _template(tokenizer) is None:
        text = "\n\n".join(m["content"] for m in messages)
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    return _render_ids(tokenizer, messages, add_generation_prompt=True)


def prompt_examples(
    rows: list[dict[str, Any]], tokenizer: Any, max_length: int | None = None,
    long_rows: Literal["error", "drop", "truncate"] = "error", required: bool = True,
) -> list[PromptExample]:
    """Prompts (`prompt_ids`) of canonical rows, for generation: rollouts, sampling, eval.

    A prompt longer than `max_length` tokens is an error naming the file and row under
    `long_rows: error`, and is left out (counted in a warning) under `drop`. A prompt is never
    cut: it would ask another question than the one its answer belongs to, so under `truncate`
    (which cuts SFT rows) a long prompt is left out too; stages that only generate refuse
    `truncate` when the recipe is validated. With `required`, every prompt left out is an error
    (training prompts); held-out prompts pass False.

    Raises:
        DataError: text rows, a conversation with no user turn, a long prompt under "error", or
            every prompt left out when `required`.
    """
    out, dropped = [], 0
    for row in rows:
        messages, ids = _render_prompt(row, tokenizer)
        if max_length is not None and len(ids) > max_length:
            if long_rows == "error":
                raise DataError(row.get("_source", "data"), f"the prompt is {len(ids)} tokens, longer than "
                                f"max_length {max_length}; raise max_length or set long_rows: drop", row=row.get("_row"))
            dropped += 1
            continue
        text = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        columns = {k: v for k, v in row.items() if k not in CANONICAL_COLUMNS and not k.startswith("_")}
        out.append(PromptExample(prompt_ids=ids, prompt_text=text, columns=columns, messages=messages, row=row))
    name = rows[0].get("_source", "data") if rows else "data"
    _report_dropped(name, "prompts", len(rows), len(out), dropped, max_length, long_rows, required)
    return out


def _report_dropped(name: str, what: str, n: int, kept: int, dropped: int, max_length: int | None,
                    long_rows: str, required: bool) -> None:
    """Every row left out is an error when `required`; some left out, a warning with the count."""
    if kept == 0 and n and required:
        verb = "were dropped as" if what == "rows" else "are"
        raise DataError(name, f"all {n} {what} {verb} longer than max_length {max_length} "
                        f"(long_rows={long_rows}); raise max_length")
    if dropped:
        verb = "dropped" if what == "rows" else "left out"
        log.warning("%s: %s %d of %d %s longer than max_length %d", name, verb, dropped, n, what, max_length)
