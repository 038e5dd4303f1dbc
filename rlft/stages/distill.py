# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""Distil a teacher stage's model into a (smaller) student (ALGORITHMS.md section 7).

Modes (`mode:`):
1. sequence, what DeepSeek-R1 did: the teacher writes one completion per training prompt
   (`sampling:`, temperature 0 = greedy; prompt i draws from its own generator seeded by
   (stage seed, i)), stored once in `<stage>/teacher_data.jsonl` (pinned to the teacher, data,
   sampling and seed by `teacher_data.json`) and reused on resume; the student learns them with
   `training.sft_step`, under the first data set's max_length/long_rows (a prompt longer than
   max_length in student tokens is an error under `error`, else not sent to the teacher: it
   would leave no room for a completion). Rows that already carry
   a reply are asked again: the data's replies are not the teacher's, and a data set of teacher
   text is just `kind: sft`.
2. logits: per-token divergence of the student from the teacher (`loss:` forward_kl,
   reverse_kl or jsd with `beta`, at `temperature` T and times T^2) on the data's own
   completions; the teacher runs under no_grad.
3. on_policy, GKD with lambda = 1: each step the student completes the step's `batch_size`
   prompts (`sampling:`, prompt i of step s seeded by (stage seed, s, i)) and the divergence
   is taken on the student's own tokens, gradients through the student's forward over prompt +
   completion. Samples are not mixed with fixed data as GKD's lambda < 1 does (that is mode logits).
Logit modes need a shared tokenizer, checked before the teacher model loads. Everything else
is SFT's: AdamW, LR schedule, token-mean over the whole optimizer step (exact under
micro-batching), NaN guard, bitwise checkpoint/resume; `from:` is ignored (the student starts
from `student:`). Held-out rows give eval/loss (those with a reply) and eval/accuracy.

On N processes every mode splits each step's micro-batches over the ranks (on_policy: the
micro-batches of prompts each rank completes), sums the token-mean normaliser and the
gradients over ranks, and takes the one-process step. In mode sequence the ranks share the
teacher's generation batches and rank 0 alone writes the teacher's data; it alone writes
checkpoints and metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from rlft import dist, evaluate, fsdp, rollout, training
from rlft.data import encode
from rlft.data.batch import PromptLoader, SFTExample, SFTLoader, pack
from rlft.data.rows import mix, row_format
from rlft.errors import UserInputError
from rlft.metrics import MetricsLog
from rlft.models import device, load_named_policy, load_tokenizer
from rlft.rl import distill
from rlft.stage_io import StageOutput, finish_model, load_data

if TYPE_CHECKING:
    from rlft.recipe.schema import DistillSpec
    from rlft.run import Artifact, RunContext

# data keys that do not change which prompts the teacher answers (max_row_bytes only refuses rows)
TOKENIZING_KEYS = {"packing", "max_row_bytes"}


def run(ctx: RunContext[DistillSpec]) -> Artifact:
    """Train the student of `ctx.spec` (a DistillSpec) and return the stage's Artifact."""
    spec = ctx.spec
    student, tokenizer = load_student(ctx)
    loader, eval_ex, eval_prompts, prints, info = PREPARE[spec.mode](ctx, tokenizer)
    teacher = None if spec.mode == "sequence" else logit_teacher(ctx, student, tokenizer)
    total = spec.max_steps or max(1, math.ceil(spec.epochs * loader.steps_per_epoch))
    optimizer = training.make_optimizer(student, spec)
    guard = training.NanGuard(spec.nan_policy, spec.max_bad_steps)
    take_step = step_function(spec, (student, teacher, tokenizer), optimizer, guard, ctx.seed)
    meta = ctx.input_meta(prints)
    meta["inputs"]["teacher"] = ctx.artifacts[spec.teacher].fingerprint
    start, _, _ = training.resume_stage(ctx, student, optimizer, loader, guard, meta)
    metrics = MetricsLog(ctx.stage_dir, resume_step=start, every=spec.log_every)
    loop = training.StageLoop(start, total, f"distill {ctx.stage} ({spec.mode})", ctx.stage_dir, spec, student,
                              optimizer, meta, state=lambda: {"loader": loader.state_dict(), "guard": guard.state_dict()})

    def evaluate_now(at: int, values: dict[str, Any]) -> None:
        if eval_ex:
            mbs = spec.micro_batch_size or spec.batch_size
            values["eval/loss"] = evaluate.heldout_loss(student, eval_ex, mbs, tokenizer.pad_token_id)
        acc = evaluate.task_accuracy(student, tokenizer, eval_prompts, spec.eval_max_new_tokens)
        if acc is not None:
            values["eval/accuracy"] = acc
        metrics.log(at, values, force=True)

    if start == 0:
        evaluate_now(0, dict(info))
    student.train()
    for step in loop:
        training.set_lr(optimizer, training.lr_at(step, total, spec))
        stats = take_step(next(loader), step)
        last = loop.is_last(step)
        metrics.log(step + 1, stats | {"lr": optimizer.param_groups[0]["lr"]}, force=last)
        if last or spec.eval_every and (step + 1) % spec.eval_every == 0:
            evaluate_now(step + 1, {})  # before the loop saves: a resumed run never logs it twice
    metrics.close()
    return finish_model(ctx, student, tokenizer, StageOutput.from_history(metrics.history, guard.skipped))


def load_student(ctx: RunContext[DistillSpec]) -> tuple[Any, Any]:
    """The student (a tiny:<preset> is built first) with LoRA or full fine-tuning per `ctx.lora()`."""
    key = f"stages.{ctx.stage}.student"
    if not dist.is_main():  # rank 0 builds a tiny:<preset> student first; the others load it
        dist.barrier()
    student, tokenizer = load_named_policy(ctx.spec.student, ctx.run_dir / "models", ctx.data_base_dir(), ctx.lora(),
                                           ctx.seed, key)
    if dist.is_main():
        dist.barrier()
    if fsdp.active(ctx.recipe.distributed.strategy):  # full or LoRA (the recipe checks say so)
        student = fsdp.shard(student, ctx.spec.student)
    return student, tokenizer


def logit_teacher(ctx: RunContext[DistillSpec], student: Any, tokenizer: Any) -> Any:
    """The frozen teacher for a logit-level mode, after checking it shares the student's tokenizer."""
    spec, source = ctx.spec, ctx.artifacts[ctx.spec.teacher].model_source
    distill.check_same_tokenizer(tokenizer, load_tokenizer(source, ctx.model_spec()), ctx.stage, spec.mode)
    teacher = distill.load_teacher(source, ctx.model_spec(), device())
    distill.shared_vocab(student, teacher, len(tokenizer), ctx.stage)
    return teacher


def step_function(
    spec: DistillSpec, models: tuple[Any, Any, Any], optimizer: torch.optim.Optimizer, guard: training.NanGuard, seed: int
) -> Callable[[Any, int], dict[str, float]]:
    """(the loader's next item, 0-based step) -> the step's stats, for the stage's mode."""
    student, teacher, tokenizer = models
    if spec.mode == "sequence":
        return lambda batches, step: training.sft_step(student, optimizer, batches, guard, spec.max_grad_norm, step + 1)
    if spec.mode == "logits":  # each rank scores its share of the step's micro-batches
        return lambda batches, step: distill.distill_step(student, teacher, optimizer, training.rank_share(batches),
                                                          guard, spec, step + 1)
    sampling = rollout.SamplingParams.of(spec.sampling)
    mbs = spec.micro_batch_size or spec.batch_size // dist.world_size()  # one micro-batch per rank

    def on_policy(prompts: list[encode.PromptExample], step: int) -> dict[str, float]:
        # each rank completes its share of the step's micro-batches of prompts; prompt i of the
        # step draws from its own generator, so a completion does not depend on the rank
        groups = range(0, len(prompts), mbs)
        mine = [i for g in dist.shard(len(groups)) for i in range(groups[g], min(groups[g] + mbs, len(prompts)))]
        gens = [rollout.seed_generator(seed, step, i) for i in mine]
        with fsdp.gathered(student):  # fsdp: each rank decodes its own share with the whole weights
            batches, counts = distill.student_batch(student, tokenizer, [prompts[i] for i in mine], sampling, gens, mbs)
        stats = distill.completion_stats(dist.all_reduce_sum(counts))
        return distill.distill_step(student, teacher, optimizer, batches, guard, spec, step + 1) | stats

    return on_policy


# --------------------------------------------------------------------------- data per mode
# Each returns (loader, held-out examples, held-out prompts, data fingerprints, step-0 metrics).
Prepared = tuple[Any, list[SFTExample], list[encode.PromptExample], dict[str, str], dict[str, float]]


def sequence_data(ctx: RunContext[DistillSpec], tokenizer: Any) -> Prepared:
    """SFT batches of the teacher's completions, generated once (or read back on resume)."""
    spec, d = ctx.spec, ctx.spec.data[0]
    rows, eval_rows, prints = _rows(ctx)
    rows = [p.row for p in encode.prompt_examples(rows, tokenizer, d.max_length, d.long_rows)]
    sampling = rollout.SamplingParams.of(spec.sampling)
    key = distill.data_key({
        "teacher": ctx.artifacts[spec.teacher].fingerprint, "data": prints, "sampling": spec.sampling.model_dump(),
        "specs": [d.model_dump(exclude=TOKENIZING_KEYS) for d in spec.data], "seed": ctx.seed,
        "batch_size": spec.batch_size,
    })
    # on several processes each rank asks the teacher for its share of the generation batches,
    # rank 0 writes the gathered rows (in batch order) and every rank reads them back
    found = distill.read_teacher_data(ctx.stage_dir, key) if dist.is_main() else None
    if dist.broadcast_object(found is None):
        source = ctx.artifacts[spec.teacher].model_source
        teacher = distill.load_teacher(source, ctx.model_spec(), device())
        n_batches = -(-len(rows) // spec.batch_size)
        mine = distill.teacher_completions(teacher, load_tokenizer(source, ctx.model_spec()), rows, sampling,
                                           ctx.seed, spec.batch_size, dist.shard(n_batches))
        del teacher
        parts = dist.gather_objects(mine)
        if dist.is_main():
            out = [r for part_rows, _ in parts for r in part_rows]
            stats = distill.teacher_stats(out, sum(t for _, t in parts))
            distill.write_teacher_data(ctx.stage_dir, key, out, stats)
        found = None
    dist.barrier()
    if found is None:
        found = distill.read_teacher_data(ctx.stage_dir, key)
        assert found is not None
    teacher_rows, info = found
    loader = _sft_loader(ctx, teacher_rows, tokenizer, str(ctx.stage_dir / distill.TEACHER_DATA))
    eval_ex, eval_prompts = heldout(ctx, eval_rows, tokenizer)
    return loader, eval_ex, eval_prompts, prints, info


def logits_data(ctx: RunContext[DistillSpec], tokenizer: Any) -> Prepared:
    """SFT batches of the data's own sequences, for the teacher and student to score."""
    rows, eval_rows, prints = _rows(ctx)
    bare = next((r for r in rows if not _has_reply(r)), None)
    if bare is not None:
        raise UserInputError(
            f"stages.{ctx.stage}.mode: logits scores the data's own completions, but {bare.get('_source')} row "
            f"{bare.get('_row')} has none; give prompt + completion or messages rows, or use `mode: on_policy` "
            "(the student writes the completions) or `mode: sequence` (the teacher does)"
        )
    loader = _sft_loader(ctx, rows, tokenizer, ctx.spec.data[0].source)
    eval_ex, eval_prompts = heldout(ctx, eval_rows, tokenizer)
    return loader, eval_ex, eval_prompts, prints, {}


def on_policy_data(ctx: RunContext[DistillSpec], tokenizer: Any) -> Prepared:
    """Batches of `batch_size` prompts; the student completes them at each step."""
    spec, d = ctx.spec, ctx.spec.data[0]
    rows, eval_rows, prints = _rows(ctx)
    prompts = encode.prompt_examples(rows, tokenizer, d.max_length, d.long_rows)
    loader = PromptLoader(prompts, spec.batch_size, ctx.seed)
    eval_ex, eval_prompts = heldout(ctx, eval_rows, tokenizer)
    return loader, eval_ex, eval_prompts, prints, {}


PREPARE = {"sequence": sequence_data, "logits": logits_data, "on_policy": on_policy_data}


def _rows(ctx: RunContext[DistillSpec]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """Training rows (several data sets mixed by weight), the first eval_samples held-out rows, fingerprints."""
    spec = ctx.spec
    train, held_out, prints = load_data(ctx, spec.data)
    rows = train[0] if len(train) == 1 else mix(train, [d.weight for d in spec.data], ctx.seed)
    return rows, held_out[: spec.eval_samples], prints


def _sft_loader(ctx: RunContext[DistillSpec], rows: list[dict[str, Any]], tokenizer: Any, name: str) -> SFTLoader:
    spec, d = ctx.spec, ctx.spec.data[0]
    examples = encode.tokenize_sft(rows, tokenizer, d.max_length, d.long_rows, name)
    if d.packing:
        examples = pack(examples, d.max_length)
    mbs = spec.micro_batch_size or spec.batch_size // dist.world_size()  # one micro-batch per rank
    return SFTLoader(examples, spec.batch_size, mbs, seed=ctx.seed, pad_id=tokenizer.pad_token_id)


def _has_reply(row: dict[str, Any]) -> bool:
    fmt = row_format(row)
    return fmt != "prompt" and (fmt != "messages" or any(m["role"] == "assistant" for m in row["messages"]))


def heldout(ctx: RunContext[DistillSpec], rows: list[dict[str, Any]], tokenizer: Any) -> tuple[list[SFTExample], list[encode.PromptExample]]:
    """Held-out examples of rows that carry a reply (eval/loss) and prompts of rows that carry an
    answer (eval/accuracy), under the first data set's max_length/long_rows like the training rows."""
    d = ctx.spec.data[0]
    replies = [r for r in rows if _has_reply(r)]
    examples = encode.tokenize_sft(replies, tokenizer, d.max_length, d.long_rows, d.source, required=False)
    graded = [r for r in rows if "answer" in r]
    return examples, encode.prompt_examples(graded, tokenizer, d.max_length, d.long_rows, required=False)
