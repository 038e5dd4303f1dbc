# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""Distillation pieces (ALGORITHMS.md section 7), used by the `distill` stage.

- `token_divergence` / `distill_step`: the per-token divergence of the student's next-token
  distribution from the teacher's (forward KL, reverse KL or generalised JSD at temperature T,
  already times T^2) on the target tokens of a batch, token-mean over the whole optimizer step.
- `check_same_tokenizer` / `shared_vocab`: logit-level modes compare distributions token by
  token, so teacher and student must share the tokenizer.
- `teacher_completions` and the `teacher_data.jsonl` store: sequence-level distillation's data.
- `student_batch`: on-policy distillation's data (GKD with lambda = 1): the student's own samples.

Shape letters: N sequences, L sequence length, V vocabulary, K target tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from rlft import evaluate, fsdp, rollout, training
from rlft.ckpt.fsio import atomic_write_text
from rlft.core import losses
from rlft.data import encode
from rlft.data.batch import SFTExample, collate, model_inputs
from rlft.data.rows import CANONICAL_COLUMNS
from rlft.errors import UserInputError
from rlft.metrics import progress
from rlft.models import load_model, trainable_named_params

if TYPE_CHECKING:
    from rlft.recipe.schema import DistillSpec, ModelSpec

log = logging.getLogger(__name__)

TEACHER_DATA = "teacher_data.jsonl"
TEACHER_META = "teacher_data.json"
DivergenceName = Literal["forward_kl", "reverse_kl", "jsd"]

# (student_logits, teacher_logits, beta, temperature) -> (..., ) per-token loss; beta is JSD's only.
DIVERGENCES: dict[str, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "forward_kl": lambda s, t, beta, temp: losses.forward_kl(s, t, temp),
    "reverse_kl": lambda s, t, beta, temp: losses.reverse_kl(s, t, temp),
    "jsd": lambda s, t, beta, temp: losses.generalized_jsd(s, t, beta, temp),
}


@dataclass(frozen=True)
class Divergence:
    """The recipe's per-token divergence: `loss` (forward_kl, reverse_kl, jsd), `beta`, `temperature`."""

    loss: DivergenceName
    beta: float
    temperature: float

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return DIVERGENCES[self.loss](student_logits, teacher_logits, self.beta, self.temperature)


# --------------------------------------------------------------------------- the teacher


def load_teacher(source: str, spec: ModelSpec, dev: torch.device) -> Any:
    """The teacher model from `source` in eval mode with every parameter frozen."""
    model = load_model(source, spec, dev)
    model.eval().requires_grad_(False)
    return model


def check_same_tokenizer(student_tok: Any, teacher_tok: Any, stage: str, mode: str) -> None:
    """Refuse logit-level distillation between models whose tokenizers differ.

    Compares the vocabularies (token -> id, added tokens included) and the special tokens.

    Raises:
        UserInputError: naming `stages.<stage>.mode`, what differs, and `mode: sequence` as the fix.
    """
    problem = None
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:3]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:3]
        moved = sorted(k for k in set(s_vocab) & set(t_vocab) if s_vocab[k] != t_vocab[k])[:3]
        problem = (f"their vocabularies differ (student {len(s_vocab)} tokens, teacher {len(t_vocab)}; "
                   f"only in the student: {only_s}, only in the teacher: {only_t}, other ids: {moved})")
    else:
        s_special, t_special = _specials(student_tok), _specials(teacher_tok)
        if s_special != t_special:
            problem = f"their special tokens differ (student {s_special}, teacher {t_special})"
    if problem is not None:
        raise UserInputError(
            f"stages.{stage}.mode: {mode} compares teacher and student next-token distributions token by "
            f"token, so both must use the same tokenizer, but {problem}; use `mode: sequence` (the teacher "
            "writes completions and the student learns them as text with its own tokenizer)"
        )
    if getattr(student_tok, "chat_template", None) != getattr(teacher_tok, "chat_template", None):
        log.warning("stage %s: teacher and student chat templates differ; prompts use the student's", stage)


def _specials(tok: Any) -> dict[str, Any]:
    names = ("bos", "eos", "unk")
    return {n: getattr(tok, f"{n}_token", None) for n in names} | {"all": sorted(tok.all_special_tokens)}


def shared_vocab(student: Any, teacher: Any, vocab_size: int, stage: str) -> int:
    """Width V of the logits both models share: equal output layers, or both cover the tokenizer.

    Checkpoints of one family often pad the output layer differently (e.g. 151936 vs 152064
    rows for a 151665-token tokenizer); rows past the tokenizer are never real tokens, so the
    distributions are compared over the first min(V_student, V_teacher) logits.

    Raises:
        UserInputError: a model has fewer output rows than the tokenizer has tokens.
    """
    v_s = student.get_output_embeddings().weight.shape[0]
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if min(v_s, v_t) < vocab_size:
        raise UserInputError(
            f"stages.{stage}.mode: the student has {v_s} output logits and the teacher {v_t}, but the "
            f"tokenizer has {vocab_size} tokens; use `mode: sequence`"
        )
    if v_s != v_t:
        log.info("stage %s: comparing the first %d of %d / %d logits", stage, min(v_s, v_t), v_s, v_t)
    return min(v_s, v_t)


# --------------------------------------------------------------------------- the loss


def token_divergence(
    student: Any, teacher: Any, batch: dict[str, Tensor], divergence: Divergence
) -> tuple[Tensor, Tensor]:
    """Per-token divergence of the student from the teacher on the batch's target tokens.

        L_{i,t} = divergence(z^S_{i,t-1}, z^T_{i,t-1})   where loss_mask_{i,t} = 1, else 0

    Logits at position t-1 are the next-token distribution that predicts token t, so the terms
    align with loss_mask[:, 1:] exactly like the SFT cross-entropy. The teacher runs under
    no_grad; only the K target positions enter the kernel (prompt and padding rows are skipped).

    Args:
        student: the model being trained (a graph is built through it).
        teacher: the frozen teacher.
        batch: collated `input_ids`, `attention_mask`, `loss_mask` (and `position_ids` if packed).
        divergence: which divergence, its beta and temperature.

    Returns:
        (N, L-1) per-token loss (0 off-target) and the (N, L-1) mask.
    """
    inputs = model_inputs(batch)
    mask = batch["loss_mask"][:, 1:]  # (N, L-1)
    target = mask.bool()
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1][target]  # (K, V_t)
    s_logits = student(**inputs).logits[:, :-1][target]  # (K, V_s)
    width = min(s_logits.shape[-1], t_logits.shape[-1])
    per_token = divergence(s_logits[:, :width].float(), t_logits[:, :width].float())  # (K,)
    loss = torch.zeros(mask.shape, dtype=per_token.dtype, device=per_token.device)
    loss[target] = per_token
    return loss, mask


def distill_step(
    student: Any, teacher: Any, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, Tensor]],
    guard: training.NanGuard, spec: DistillSpec, step: int,
) -> dict[str, float]:
    """One optimizer step of the divergence loss, token-mean over all micro-batches of the step.

    The normaliser is the step's total target count, so 1x8 and 8x1 micro-batches give the same
    update (as SFT's `train_step`). `spec` gives loss, beta, temperature and max_grad_norm.
    On several processes `micro_batches` is this rank's share of the step: the normaliser is
    summed over ranks and `finish_step` sums the gradients, so every rank takes the one step.
    """
    dev = next(student.parameters()).device
    n_tokens = training.global_target_count(micro_batches, dev)
    divergence = Divergence(spec.loss, spec.beta, spec.temperature)
    params = list(trainable_named_params(student).values())
    total = torch.zeros((), device=dev)
    with fsdp.accumulated(student):  # fsdp: any number of micro-batches per rank, one reduce-scatter
        for mb in micro_batches:
            per_token, mask = token_divergence(student, teacher, {k: v.to(dev) for k, v in mb.items()}, divergence)
            training.backward_into(losses.aggregate(per_token, mask, "token", n_tokens), total, step)
    return training.finish_step(optimizer, params, total, guard, spec.max_grad_norm, step, n_tokens)


# --------------------------------------------------------------------------- on-policy data


def student_batch(
    student: Any, tokenizer: Any, prompts: list[encode.PromptExample], sampling: rollout.SamplingParams,
    generator: torch.Generator | Sequence[torch.Generator], micro_batch_size: int,
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """The student completes each prompt once; prompt + completion become right-padded
    micro-batches whose loss mask covers the generated tokens (EOS included).

    Returns the micro-batches and the completion counts for `completion_stats` (a float64
    tensor: completion tokens, completions, truncated completions; zeros when `prompts` is empty),
    counts so that several processes can sum them before taking the means.
    """
    if not prompts:
        return [], torch.zeros(3, dtype=torch.float64)
    out = rollout.generate(student, tokenizer, [p.prompt_ids for p in prompts], sampling, 1, generator,
                           micro_batch_size)
    lengths = out.completion_mask.sum(-1).tolist()
    examples = [
        SFTExample(p.prompt_ids + ids[:n], [0] * len(p.prompt_ids) + [1] * n)
        for p, ids, n in zip(prompts, out.completion_ids.tolist(), lengths, strict=True)
    ]
    pad = tokenizer.pad_token_id
    starts = range(0, len(examples), micro_batch_size)
    batches = [collate(examples[k : k + micro_batch_size], pad) for k in starts]
    counts = torch.tensor([sum(lengths), len(lengths), int(out.truncated.sum())], dtype=torch.float64)
    return batches, counts


def completion_stats(counts: Tensor) -> dict[str, float]:
    """Mean completion length and truncated share from `student_batch`'s counts."""
    tokens, rows, truncated = counts.tolist()
    return {"completion/len_mean": tokens / max(rows, 1.0), "completion/truncated": truncated / max(rows, 1.0)}


# --------------------------------------------------------------------------- sequence-level data


def teacher_completions(
    teacher: Any, tokenizer: Any, rows: list[dict[str, Any]], sampling: rollout.SamplingParams, seed: int,
    batch_size: int, batches: Sequence[int] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """One teacher completion per row, as SFT rows (the row's reply replaced by the teacher's).

    Prompt i samples from `seed_generator(seed, i)`, so the output does not depend on how
    prompts are batched. `batches` picks which of the generation batches of `batch_size` rows to
    make (default all; several processes each make a share). Returns the rows of those batches
    and how many of their completions were truncated (for `teacher_stats`).
    """
    prompts = encode.prompt_examples(rows, tokenizer)
    out_rows, truncated = [], 0
    starts = range(0, len(prompts), batch_size)
    picked = [starts[b] for b in (range(len(starts)) if batches is None else batches)]
    for lo in progress(picked, len(picked), "teacher completions"):
        batch = prompts[lo : lo + batch_size]
        gens = [rollout.seed_generator(seed, lo + i) for i in range(len(batch))]
        out = rollout.generate(teacher, tokenizer, [p.prompt_ids for p in batch], sampling, 1, gens)
        truncated += int(out.truncated.sum())
        out_rows += [with_completion(r, t) for r, t in zip(rows[lo : lo + batch_size], out.texts, strict=True)]
    return out_rows, truncated


def teacher_stats(out_rows: list[dict[str, Any]], truncated: int) -> dict[str, float]:
    """The teacher's truncated share and its accuracy on rows that carry an answer."""
    stats = {"teacher/truncated": truncated / max(1, len(out_rows))}
    graded = [r for r in out_rows if "answer" in r]
    if graded:
        stats["teacher/accuracy"] = sum(evaluate.is_correct(r, reply(r)) for r in graded) / len(graded)
    return stats


def with_completion(row: dict[str, Any], text: str) -> dict[str, Any]:
    """`row` with its reply replaced by `text`: a messages row keeps its turns up to the last
    user turn; any other row becomes prompt + completion. Other columns stay, and `_system` (the
    data set's system prompt, so the student's prompt is the teacher's); other `_` keys go."""
    columns = {k: v for k, v in row.items()
               if k == "_system" or k not in CANONICAL_COLUMNS and not k.startswith("_")}
    if "messages" in row:
        turns = list(row["messages"])
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()
        return {"messages": [*turns, {"role": "assistant", "content": text}], **columns}
    return {"prompt": row["prompt"], "completion": text, **columns}


def reply(row: dict[str, Any]) -> str:
    """The assistant reply of a row made by `with_completion`."""
    return row["messages"][-1]["content"] if "messages" in row else row["completion"]


def data_key(parts: dict[str, Any]) -> str:
    """Hash of everything the teacher's completions depend on (JSON-serialisable `parts`)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_teacher_data(stage_dir: Path, key: str) -> tuple[list[dict[str, Any]], dict[str, float]] | None:
    """Rows and stats an earlier attempt wrote for the same inputs; None when absent, made for
    other inputs (teacher, data, sampling, seed) or damaged (sha256 differs)."""
    path, meta_path = stage_dir / TEACHER_DATA, stage_dir / TEACHER_META
    if not (path.exists() and meta_path.exists()):
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    raw = path.read_bytes()
    if meta.get("key") != key or meta.get("sha256") != hashlib.sha256(raw).hexdigest():
        log.warning("%s was made for other inputs or is damaged; asking the teacher again", path)
        return None
    lines = raw.decode().split("\n")[:-1]  # not splitlines(): U+2028, U+0085 ... may sit inside a string
    rows = [json.loads(line) | {"_source": str(path), "_row": i + 1} for i, line in enumerate(lines)]
    return rows, meta["stats"]


def write_teacher_data(stage_dir: Path, key: str, rows: list[dict[str, Any]], stats: dict[str, float]) -> None:
    """Write `teacher_data.jsonl`, then its `teacher_data.json` (key, sha256, stats), each atomically;
    the second written last marks the first complete."""
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stage_dir / TEACHER_DATA, text)
    meta = {"key": key, "sha256": hashlib.sha256(text.encode()).hexdigest(), "rows": len(rows), "stats": stats}
    atomic_write_text(stage_dir / TEACHER_META, json.dumps(meta, indent=1, sort_keys=True))
