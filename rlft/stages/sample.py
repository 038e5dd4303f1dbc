# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""Rejection sampling: a trained model writes K completions per prompt, verifiers score them,
the keep rules pick the good ones, and the result is an SFT data set (ALGORITHMS.md section 8).

Exactness (RELIABILITY.md test 6): every prompt samples from its own generator, seeded by
(stage seed, prompt index), so the output does not depend on the batch size; prompts are
processed in shards, each committed atomically (`shards/shard-NNNNN.jsonl`), so a kill loses
at most the shard being written and a rerun continues with the next one.

On N processes the shards still to write are taken N at a time; each rank generates a
contiguous share of those shards' generation batches (the very batches one process makes, so
every completion is the one-process completion), the rows are gathered in batch order, and
rank 0 alone commits the shards and writes `final/`: the output is byte-identical to one
process, and a kill loses at most the N shards being written.

Output (`final/data.jsonl`), one schema for every row: `messages` (the prompt exactly as it was
sampled, system message included, then the kept completion), `prompt_id` and `sample_id` (null
for rows of `mix:` data), and the union of the other columns of the prompt and mix data (null
where a row has none). Keeping nothing is a failed stage (exit 4), also with `mix:`: the output
would silently be the mix data alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlft import dist, rollout
from rlft.ckpt.faults import fault_point
from rlft.ckpt.fsio import atomic_write_text, commit_dir, writing
from rlft.data import encode
from rlft.data.files import json_type
from rlft.data.rows import CANONICAL_COLUMNS, mix, usage_problem
from rlft.errors import DataError, TrainingError
from rlft.metrics import fmt, progress, summary_table
from rlft.models import load_model, load_tokenizer
from rlft.rewards.runner import build_rewards
from rlft.rl import rejection
from rlft.run import Artifact
from rlft.stage_io import load_data, load_prompts, new_staging, removed_on_error

if TYPE_CHECKING:
    from rlft.recipe.schema import SampleSpec
    from rlft.run import RunContext


def run(ctx: RunContext[SampleSpec]) -> Artifact:
    """Generate, score and filter; write `final/data.jsonl` and `final/stats.json`."""
    spec = ctx.spec
    source = ctx.parent().model_source
    tokenizer = load_tokenizer(source, ctx.model_spec())
    train, _, prints = load_prompts(ctx, spec.data, tokenizer)
    prompts = [p for spec_prompts in train for p in spec_prompts]  # every prompt once, in data order
    mixed = mix_rows(ctx, prompts)  # before the model loads: bad mix data fails fast
    model = load_model(source, ctx.model_spec(), _device()).eval()
    score = build_rewards(
        [e.model_dump() for e in spec.rewards], ctx.data_base_dir(), allow_code_exec_unsafe=spec.allow_unsafe_code_exec,
        timeout_s=spec.reward_timeout_s, max_error_rate=spec.max_reward_error_rate,
    )
    sampling = rollout.SamplingParams.of(spec.sampling)
    rules = rejection.KeepRules(spec.keep, spec.threshold, spec.max_per_prompt, spec.dedup, spec.min_chars, spec.max_chars)
    shard_dir = ctx.stage_dir / "shards"
    n_shards = -(-len(prompts) // spec.shard_size)
    todo = None
    if dist.is_main():  # rank 0 decides which shards an earlier run left to write
        shard_dir.mkdir(parents=True, exist_ok=True)
        _pin_inputs(shard_dir, ctx.input_meta(prints), ctx.force)
        todo = [s for s in range(n_shards) if not _shard_path(shard_dir, s).exists()]
    todo = dist.broadcast_object(todo)
    world = dist.world_size()
    rounds = [todo[i : i + world] for i in range(0, len(todo), world)]
    for r in progress(range(len(rounds)), len(rounds), f"sample {ctx.stage}"):
        out = sample_shards(model, tokenizer, prompts, rounds[r], score, sampling, rules, spec, ctx.seed)
        if dist.is_main():
            for shard, rows in out.items():
                atomic_write_text(_shard_path(shard_dir, shard), "".join(json.dumps(x, sort_keys=True) + "\n" for x in rows))
                fault_point("sample_shard", shard)  # tests: die right after committing this shard
    score.close()
    artifact = _finish(ctx, shard_dir, n_shards, prompts, mixed) if dist.is_main() else None
    return dist.broadcast_object(artifact)


def _shard_path(shard_dir: Path, shard: int) -> Path:
    return shard_dir / f"shard-{shard:05d}.jsonl"


def sample_shards(
    model: Any, tokenizer: Any, prompts: list[Any], shards: list[int], score: Any,
    sampling: rollout.SamplingParams, rules: rejection.KeepRules, spec: SampleSpec, seed: int,
) -> dict[int, list[dict[str, Any]]]:
    """Rows of `shards` (one line per prompt with its kept completions and pass rate), on every
    rank: each rank samples a contiguous share of the shards' generation batches (`dist.shard`)
    and the rows are gathered in batch order."""
    batches = [(shard, lo)
               for shard in shards
               for lo in range(shard * spec.shard_size, min((shard + 1) * spec.shard_size, len(prompts)), spec.batch_size)]
    mine = []
    for shard, lo in [batches[i] for i in dist.shard(len(batches))]:
        hi = min(lo + spec.batch_size, (shard + 1) * spec.shard_size)
        mine.append((shard, sample_batch(model, tokenizer, prompts[lo:hi], lo, score, sampling, rules, spec, seed)))
    out: dict[int, list[dict[str, Any]]] = {shard: [] for shard in shards}
    for shard, rows in [item for part in dist.gather_objects(mine) for item in part]:
        out[shard] += rows
    return out


def sample_batch(
    model: Any, tokenizer: Any, batch: list[Any], first_index: int, score: Any,
    sampling: rollout.SamplingParams, rules: rejection.KeepRules, spec: SampleSpec, seed: int,
) -> list[dict[str, Any]]:
    """Rows for one generation batch, prompts first_index, first_index + 1, ... (each from its
    own generator, seeded by (seed, prompt index))."""
    K = spec.per_prompt
    gens = [rollout.seed_generator(seed, first_index + i) for i in range(len(batch))]
    result = rollout.generate(model, tokenizer, [p.prompt_ids for p in batch], sampling, K, gens)
    columns = {k: [p.columns.get(k) for p in batch for _ in range(K)] for k in batch[0].columns}
    columns["completion_tokens"] = result.completion_mask.sum(-1).tolist()
    rewards = score([p.prompt_text for p in batch for _ in range(K)], result.texts, columns).total.tolist()
    out = []
    for i, p in enumerate(batch):
        texts, r = result.texts[i * K : (i + 1) * K], rewards[i * K : (i + 1) * K]
        keep = rejection.select(texts, r, rules)
        out.append({
            "prompt_id": first_index + i, "prompt": p.prompt_text, "columns": p.columns,
            "kept": [texts[j] for j in keep], "rewards": [r[j] for j in keep],
            "pass_rate": rejection.pass_rate(r, spec.threshold),
        })
    return out


def _finish(
    ctx: RunContext[SampleSpec], shard_dir: Path, n_shards: int, prompts: list[encode.PromptExample], mixed: list[list[dict[str, Any]]]
) -> Any:
    """Join the shards into `final/data.jsonl` plus the mix data; write stats."""

    spec = ctx.spec
    rows, rates, kept_prompts = [], [], 0
    for shard in range(n_shards):
        for line in (shard_dir / f"shard-{shard:05d}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rates.append(rec["pass_rate"])
            kept_prompts += bool(rec["kept"])
            turns = prompts[rec["prompt_id"]].messages
            for j, text in enumerate(rec["kept"]):
                messages = [*turns, {"role": "assistant", "content": text}]
                rows.append({**rec["columns"], "messages": messages, "prompt_id": rec["prompt_id"], "sample_id": j})
    stats = {
        "prompts": len(rates), "prompts_with_kept": kept_prompts, "rows_sampled": len(rows),
        "pass_rate_mean": sum(rates) / max(1, len(rates)),
        "pass_rate_hist": {f"{b / 10:.1f}": sum(int(r * 10) == b for r in rates) for b in range(11)},
    }
    if not rows:
        raise TrainingError(
            f"stage {ctx.stage}: kept no completion of {len(rates)} prompts x {spec.per_prompt} samples (mean pass "
            f"rate {stats['pass_rate_mean']:.3f} at threshold {spec.threshold}), so there is no data to write; lower "
            "`threshold`, raise `per_prompt`, or train the model further, then rerun with --restart"
        )
    if mixed:  # the sampled rows have weight 1 beside each mix data set's weight
        rows = mix([rows, *mixed], [1.0, *(m.weight for m in spec.mix)], ctx.seed)
    rows = _one_schema(rows)
    stats["rows_total"] = len(rows)
    staging = new_staging(ctx.stage_dir)
    with writing(f"stage {ctx.stage}'s data set", ctx.stage_dir / "final"), removed_on_error(staging):
        staging.mkdir(parents=True)
        (staging / "data.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        (staging / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
        commit_dir(staging, ctx.stage_dir / "final")
    summary = {k: v for k, v in stats.items() if k != "pass_rate_hist"}
    summary_table(f"stage {ctx.stage} (sample)", [(k, fmt(v)) for k, v in summary.items()])
    return Artifact(ctx.stage, "sample", data=str(ctx.stage_dir / "final" / "data.jsonl"), metrics=summary)


def _pin_inputs(shard_dir: Path, meta: dict[str, Any], force: bool) -> None:
    """Shards of an earlier run are reused only when the stage's inputs are unchanged (R5)."""
    from rlft.ckpt.checkpoint import check_inputs

    path = shard_dir / "inputs.json"
    # prompts per generation batch do not change the output (per-prompt generators)
    meta = {**meta, "inputs": {k: v for k, v in meta["inputs"].items() if not k.endswith(".batch_size")}}
    if path.exists():
        saved = json.loads(path.read_text())
        check_inputs(saved.get("inputs", {}), meta["inputs"], sorted(meta["inputs"]), force)
    if not path.exists() or force:
        atomic_write_text(path, json.dumps(meta, sort_keys=True))


def mix_rows(ctx: RunContext[SampleSpec], prompts: list[encode.PromptExample]) -> list[list[dict[str, Any]]]:
    """The training rows of each `mix:` data set as output rows (chat `messages` with the data
    set's system prompt, null prompt_id/sample_id), after checking that every column has one
    JSON type across the prompt data and the mix data, as the output's readers require.

    Raises:
        DataError: a mix row that is not a conversation with a reply, or a column whose type
            differs from an earlier row's.
    """
    seen: dict[str, tuple[str, str]] = {}
    for p in prompts:
        _check_types(seen, (p.row["_source"], p.row["_row"]), p.columns)
    per_spec = []
    for rows in load_data(ctx, ctx.spec.mix, "mix")[0] if ctx.spec.mix else []:
        out = []
        for r in rows:
            where = (r["_source"], r["_row"])
            problem = usage_problem(r, "chat", where)
            if problem is not None:
                raise problem
            columns = {k: v for k, v in r.items() if k not in CANONICAL_COLUMNS and not k.startswith("_")}
            _check_types(seen, where, columns)
            out.append({**columns, "messages": encode.conversation(r), "prompt_id": None, "sample_id": None})
        per_spec.append(out)
    return per_spec


def _check_types(seen: dict[str, tuple[str, str]], where: tuple[str, int], columns: dict[str, Any]) -> None:
    """Record each column's JSON type in `seen` (type, first row); raise on a different one."""
    for col, value in columns.items():
        if value is None:
            continue
        kind = json_type(value)
        first = seen.setdefault(col, (kind, f"{where[0]} row {where[1]}"))
        if first[0] != kind:
            raise DataError(where[0], f"is a {kind} here but a {first[0]} in {first[1]}; the sample stage's "
                            "output needs one type per column", row=where[1], column=col)


def _one_schema(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with the same columns: a column a row lacks is null."""
    names = dict.fromkeys(k for r in rows for k in r)
    return [{k: r.get(k) for k in names} for r in rows]


def _device() -> Any:
    from rlft.models import device

    return device()
