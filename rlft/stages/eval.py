# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""Score stages' models on held-out prompts with a verifier: greedy accuracy, avg@k and the
unbiased pass@k from k samples per prompt, each with a 95% confidence interval.

On several processes each rank generates a contiguous share of the generation batches (the
batches one process makes, so every sample is the one-process sample), the per-prompt results
are gathered in prompt order, and rank 0 alone writes `final/eval.json`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rlft import dist, evaluate, rollout, scoring
from rlft.ckpt.fsio import commit_dir
from rlft.data import encode
from rlft.errors import UserInputError
from rlft.metrics import console, fmt
from rlft.models import device, load_model, load_tokenizer
from rlft.rewards.runner import build_rewards
from rlft.run import Artifact, artifacts_before
from rlft.stage_io import load_data, new_staging

if TYPE_CHECKING:
    from rlft.recipe.schema import EvalSpec
    from rlft.run import RunContext


def run(ctx: RunContext[EvalSpec]) -> Artifact:
    """Evaluate every model named in `models:` (default: every earlier model stage)."""
    spec = ctx.spec
    names = spec.models or artifacts_before(ctx.loaded, ctx.stage)
    held_out = [(d, load_data(ctx, [d])[1]) for d in spec.data]
    score = build_rewards([e.model_dump() for e in spec.rewards], ctx.data_base_dir())
    results = {}
    for name in names:
        source = ctx.artifacts[name].model_source
        tokenizer = load_tokenizer(source, ctx.model_spec())
        prompts = heldout_prompts(held_out, tokenizer, spec.num_prompts, ctx.stage)
        model = load_model(source, ctx.model_spec(), device()).eval()
        results[name] = evaluate_model(model, tokenizer, prompts, score, spec, ctx.seed)
        if dist.is_main():
            console.print(f"eval {name}: " + ", ".join(f"{k} {fmt(v)}" for k, v in results[name].items()))
    score.close()
    if dist.is_main():
        staging = new_staging(ctx.stage_dir)
        staging.mkdir(parents=True)
        (staging / "eval.json").write_text(json.dumps(results, indent=1, sort_keys=True))
        commit_dir(staging, ctx.stage_dir / "final")
    dist.barrier()
    return Artifact(ctx.stage, "eval", metrics=results)


def heldout_prompts(
    held_out: list[tuple[Any, list[dict[str, Any]]]], tokenizer: Any, num_prompts: int | None, stage: str
) -> list[encode.PromptExample]:
    """The first `num_prompts` held-out prompts in a model's tokenizer, each data set's rows under
    its own max_length/long_rows (`encode.prompt_examples`, the prompts every stage renders).

    Raises:
        UserInputError: there is no held-out prompt to score.
    """
    prompts = [p for d, rows in held_out
               for p in encode.prompt_examples(rows, tokenizer, d.max_length, d.long_rows, required=False)]
    if not prompts:
        raise UserInputError(f"stages.{stage}.data: no held-out prompts to score; set eval_size or eval_split")
    return prompts[:num_prompts] if num_prompts else prompts


def evaluate_model(
    model: Any, tokenizer: Any, prompts: list[encode.PromptExample], score: Any, spec: EvalSpec, seed: int
) -> dict[str, float]:
    """Greedy accuracy and avg@k / pass@k (k samples per prompt) with 95% intervals."""
    out: dict[str, float] = {"prompts": len(prompts)}
    if spec.greedy:
        correct = _correct(model, tokenizer, prompts, score, rollout.SamplingParams.of(
            spec.sampling, temperature=0.0, top_p=1.0, top_k=0), 1, seed)
        hits = sum(c[0] for c in correct)
        lo, hi = scoring.wilson_ci(hits, len(correct))
        out |= {"greedy": hits / len(correct), "greedy_ci_low": lo, "greedy_ci_high": hi}
    sampling = rollout.SamplingParams.of(spec.sampling)
    correct = _correct(model, tokenizer, prompts, score, sampling, spec.k, seed)
    avg, avg_half = scoring.mean_ci([sum(c) / spec.k for c in correct])
    passk, pass_half = scoring.mean_ci([scoring.pass_at_k(spec.k, sum(c), spec.k) for c in correct])
    out |= {f"avg@{spec.k}": avg, f"avg@{spec.k}_ci": avg_half, f"pass@{spec.k}": passk, f"pass@{spec.k}_ci": pass_half}
    return out


def _correct(
    model: Any, tokenizer: Any, prompts: list[Any], score: Any, sampling: rollout.SamplingParams, k: int, seed: int,
    batch_size: int = 16,
) -> list[list[bool]]:
    """Per prompt, whether each of its k samples is correct (summed reward >= 1)."""
    out = []
    starts = range(0, len(prompts), batch_size)
    for lo in [starts[c] for c in dist.shard(len(starts))]:  # this rank's batches
        batch = prompts[lo : lo + batch_size]
        gens = [rollout.seed_generator(seed, lo + i) for i in range(len(batch))]
        result = rollout.generate(model, tokenizer, [p.prompt_ids for p in batch], sampling, k, gens)
        columns = {c: [p.columns.get(c) for p in batch for _ in range(k)] for c in batch[0].columns}
        columns["completion_tokens"] = result.completion_mask.sum(-1).tolist()
        total = score([p.prompt_text for p in batch for _ in range(k)], result.texts, columns).total.tolist()
        out += [[t >= 1.0 for t in total[i * k : (i + 1) * k]] for i in range(len(batch))]
    return evaluate.in_order(out)
