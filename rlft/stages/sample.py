"""Rejection sampling: a trained model writes K completions per prompt, verifiers score them,
the keep rules pick the good ones, and the result is an SFT data set (ALGORITHMS.md section 8).

Exactness (RELIABILITY.md test 6): every prompt samples from its own generator, seeded by
(stage seed, prompt index), so the output does not depend on the batch size; prompts are
processed in shards, each committed atomically (`shards/shard-NNNNN.jsonl`), so a kill loses
at most the shard being written and a rerun continues with the next one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlft import data, rejection, rollout
from rlft.fsio import atomic_write_text
from rlft.metrics import fmt, progress, summary_table
from rlft.models import load_model, load_tokenizer
from rlft.rewards import build_rewards
from rlft.stage_io import commit_dir, load_data, load_prompts, new_staging


def run(ctx: Any) -> Any:
    """Generate, score and filter; write `final/data.jsonl` and `final/stats.json`."""
    from rlft.pipeline import Artifact

    spec = ctx.spec
    source = ctx.parent().model
    tokenizer = load_tokenizer(source, ctx.model_spec())
    model = load_model(source, ctx.model_spec(), _device()).eval()
    train, _, prints = load_prompts(ctx, spec.data, tokenizer)
    prompts = [p for spec_prompts in train for p in spec_prompts]  # every prompt once, in data order
    score = build_rewards(
        [e.model_dump() for e in spec.rewards], ctx.data_base_dir(), allow_code_exec_unsafe=spec.allow_unsafe_code_exec,
        timeout_s=spec.reward_timeout_s, max_error_rate=spec.max_reward_error_rate,
    )
    sampling = rollout.SamplingParams(**spec.sampling.model_dump() | {"stop": tuple(spec.sampling.stop)})
    rules = rejection.KeepRules(spec.keep, spec.threshold, spec.max_per_prompt, spec.dedup, spec.min_chars, spec.max_chars)
    shard_dir = ctx.stage_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    _pin_inputs(shard_dir, ctx.input_meta(prints), ctx.force)
    n_shards = -(-len(prompts) // spec.shard_size)
    for shard in progress(range(n_shards), n_shards, f"sample {ctx.stage}"):
        path = shard_dir / f"shard-{shard:05d}.jsonl"
        if path.exists():
            continue  # committed by an earlier run
        lo = shard * spec.shard_size
        out = sample_shard(model, tokenizer, prompts[lo : lo + spec.shard_size], lo, score, sampling, rules, spec, ctx.seed)
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in out))
    score.close()
    return _finish(ctx, shard_dir, n_shards, prompts, Artifact)


def sample_shard(
    model: Any, tokenizer: Any, prompts: list[Any], first_index: int, score: Any,
    sampling: rollout.SamplingParams, rules: rejection.KeepRules, spec: Any, seed: int,
) -> list[dict[str, Any]]:
    """Rows for one shard: one line per prompt with its kept completions and pass rate."""
    out = []
    K = spec.per_prompt
    for lo in range(0, len(prompts), spec.batch_size):
        batch = prompts[lo : lo + spec.batch_size]
        gens = [rollout.seed_generator(seed, first_index + lo + i) for i in range(len(batch))]
        result = rollout.generate(model, tokenizer, [p.prompt_ids for p in batch], sampling, K, gens)
        columns = {k: [p.columns.get(k) for p in batch for _ in range(K)] for k in batch[0].columns}
        columns["completion_tokens"] = result.completion_mask.sum(-1).tolist()
        rewards = score([p.prompt_text for p in batch for _ in range(K)], result.texts, columns).total.tolist()
        for i, p in enumerate(batch):
            texts, r = result.texts[i * K : (i + 1) * K], rewards[i * K : (i + 1) * K]
            keep = rejection.select(texts, r, rules)
            out.append({
                "prompt_id": first_index + lo + i, "prompt": p.prompt_text, "columns": p.columns,
                "kept": [texts[j] for j in keep], "rewards": [r[j] for j in keep],
                "pass_rate": rejection.pass_rate(r, spec.threshold),
            })
    return out


def _finish(ctx: Any, shard_dir: Path, n_shards: int, prompts: list[data.PromptExample], artifact_cls: Any) -> Any:
    """Join the shards into `final/data.jsonl` (each kept completion after its prompt's chat, system
    message included) plus mixed-in data; write stats."""
    spec = ctx.spec
    rows, rates, kept_prompts = [], [], 0
    for shard in range(n_shards):
        for line in (shard_dir / f"shard-{shard:05d}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rates.append(rec["pass_rate"])
            kept_prompts += bool(rec["kept"])
            for j, text in enumerate(rec["kept"]):
                messages = [*prompts[rec["prompt_id"]].messages, {"role": "assistant", "content": text}]
                rows.append({"messages": messages, "prompt_id": rec["prompt_id"], "sample_id": j, **rec["columns"]})
    sampled = len(rows)
    if spec.mix:
        mixed = [rows] + [_as_messages(r) for r in load_data(ctx, spec.mix)[0]]
        rows = data.mix(mixed, [1.0] + [m.weight for m in spec.mix], ctx.seed)
    stats = {
        "prompts": len(rates), "prompts_with_kept": kept_prompts, "rows_sampled": sampled, "rows_total": len(rows),
        "pass_rate_mean": sum(rates) / max(1, len(rates)),
        "pass_rate_hist": {f"{b / 10:.1f}": sum(int(r * 10) == b for r in rates) for b in range(11)},
    }
    staging = new_staging(ctx.stage_dir)
    staging.mkdir(parents=True)
    (staging / "data.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    (staging / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
    commit_dir(staging, ctx.stage_dir / "final")
    summary = {k: v for k, v in stats.items() if k != "pass_rate_hist"}
    summary_table(f"stage {ctx.stage} (sample)", [(k, fmt(v)) for k, v in summary.items()])
    return artifact_cls(ctx.stage, "sample", data=str(ctx.stage_dir / "final" / "data.jsonl"), metrics=summary)


def _pin_inputs(shard_dir: Path, meta: dict[str, Any], force: bool) -> None:
    """Shards of an earlier run are reused only when the stage's inputs are unchanged (R5)."""
    from rlft.checkpoint import check_inputs

    path = shard_dir / "inputs.json"
    # prompts per generation batch do not change the output (per-prompt generators)
    meta = {**meta, "inputs": {k: v for k, v in meta["inputs"].items() if not k.endswith(".batch_size")}}
    if path.exists():
        saved = json.loads(path.read_text())
        check_inputs(saved.get("inputs", {}), meta["inputs"], sorted(meta["inputs"]), force)
    if not path.exists() or force:
        atomic_write_text(path, json.dumps(meta, sort_keys=True))


def _as_messages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if "messages" in r:
            out.append(r)
        elif "prompt" in r and "completion" in r:
            rest = {k: v for k, v in r.items() if k not in ("prompt", "completion")}
            messages = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
            out.append({"messages": messages, **rest})
        else:
            out.append(r)
    return out


def _device() -> Any:
    from rlft.models import device

    return device()
