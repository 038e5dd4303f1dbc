"""`rlft explain`: the resolved recipe with defaults, the stage graph, and batch arithmetic."""

from __future__ import annotations

import math
from typing import Any

import yaml

from rlft.data.check import data_sources
from rlft.errors import UserInputError
from rlft.prompt_report import prompts_section
from rlft.recipe.gates import describe
from rlft.recipe.schema import stage_refs


def explain_recipe(loaded: Any, nproc: int = 1) -> str:
    """Human-readable explanation of a loaded recipe (with the per-rank split on `nproc` processes).

    Raises:
        UserInputError: a stage cannot run on `nproc` processes (file:line of the size that does not split).
    """
    problems = [p for s in loaded.recipe.stages if (p := split_problem(loaded, s, nproc)) is not None]
    if problems:
        raise UserInputError("; ".join(problems))
    recipe = loaded.recipe
    resolved = recipe.model_dump(mode="json", by_alias=True)
    lines = [f"# {loaded.path}  (resolved, defaults filled in)", yaml.safe_dump(resolved, sort_keys=False)]
    lines.append("# stage graph")
    for name, spec in recipe.stages.items():
        refs: dict[str, list[str]] = {}
        for key, ref in stage_refs(name, spec):
            field = next(p for p in reversed(key.split(".")) if not p.isdigit())
            if not (field == "from" and spec.kind in ("distill", "eval")):  # distill/eval ignore from:
                refs.setdefault(field, []).append(ref)
        student = getattr(spec, "student", None)
        if student is not None:
            refs["student"] = [student.name]
        parts = [f"{k}={','.join(v)}" for k, v in refs.items()]
        data = [d.source for d in getattr(spec, "data", [])]
        parts += [f"data={','.join(data)}"] if data else []
        parts += [f"gate={describe(spec.gate)}"] if getattr(spec, "gate", None) else []
        lines.append(f"  {name:<14} {spec.kind:<8} " + "  ".join(parts))
    lines.append("\n# data files (relative to the recipe's directory; -> where symlinks lead)")
    lines += [f"  {source.key}: {source.shown()}" for source in data_sources(loaded)]
    lines.append("\n# batch arithmetic (per optimizer step)")
    for name, spec in recipe.stages.items():
        lines.append(f"  {name}: {batch_arithmetic(spec)}")
        if nproc > 1:
            lines.append(f"    on {nproc} processes: {rank_split(spec, nproc)}{strategy_split(recipe, spec, nproc)}")
    lines += ["", *prompts_section(loaded)]
    return "\n".join(lines)


def batch_arithmetic(spec: Any) -> str:
    """Prompts, completions and tokens per optimizer step of one stage."""
    if spec.kind in ("sft", "distill"):
        micro = spec.micro_batch_size or spec.batch_size
        max_len = max(d.max_length for d in spec.data)
        return (
            f"{spec.batch_size} sequences = {spec.batch_size // micro} micro-batches x {micro}; "
            f"<= {spec.batch_size * max_len} tokens; "
            + (f"{spec.max_steps} steps" if spec.max_steps else f"{spec.epochs} epochs")
        )
    if spec.kind in ("grpo", "ppo"):
        n = spec.prompts_per_step * spec.group_size
        per_opt = n // spec.mini_batches
        passes = spec.num_iterations if spec.kind == "grpo" else spec.ppo_epochs
        return (
            f"{spec.prompts_per_step} prompts x G={spec.group_size} = {n} completions per generation; "
            f"{spec.mini_batches} mini-batch(es) x {passes} pass(es) = {spec.mini_batches * passes} optimizer "
            f"steps per generation; {per_opt} completions = {math.ceil(per_opt / spec.micro_batch_size)} "
            f"micro-batches of {spec.micro_batch_size} per optimizer step; <= "
            f"{per_opt * spec.sampling.max_new_tokens} completion tokens; {spec.steps} generations"
        )
    if spec.kind == "sample":
        return f"{spec.per_prompt} completions per prompt, batches of {spec.batch_size} prompts (no training)"
    return f"k={spec.k} samples per prompt (no training)"


# --------------------------------------------------------------------------- several processes


def rank_split(spec: Any, world: int) -> str:
    """What each of `world` ranks takes of one optimizer step (sizes in the recipe are global)."""
    if spec.kind == "sample":
        return (f"the shards still to write are taken {world} at a time and their generation batches of "
                f"{spec.batch_size} prompts split over the ranks; rank 0 writes the gathered rows")
    if spec.kind == "eval":
        return (f"the generation batches of held-out prompts split over the {world} ranks; the results "
                "are gathered in prompt order")
    if spec.kind in ("grpo", "ppo"):
        rows = spec.prompts_per_step * spec.group_size // spec.mini_batches
        share = f"{rows // world}" if rows % world == 0 else f"{rows // world}-{rows // world + 1}"
        return (f"each rank samples and scores {spec.prompts_per_step // world} of the {spec.prompts_per_step} prompts "
                f"x G={spec.group_size} (gathered on every rank); each optimizer step's {rows} completions split "
                f"{share} per rank; gradients and statistics are summed over ranks")
    per_rank = spec.batch_size // world
    micro = spec.micro_batch_size or per_rank
    return (f"each rank takes {per_rank} sequences = {per_rank // micro} micro-batches x {micro} of the "
            f"global {spec.batch_size}; gradients and the token count are summed over ranks")


def strategy_split(recipe: Any, spec: Any, world: int) -> str:
    """What `distributed.strategy` does with a training stage's weights on `world` ranks."""
    if spec.kind not in ("sft", "distill", "grpo", "ppo"):
        return ""
    if recipe.distributed.strategy == "fsdp" and spec.kind in ("grpo", "ppo"):
        own = getattr(spec, "lora", None)
        full = (own if own is not None else recipe.lora) == "full"  # with LoRA the reference is the adapter-off policy
        whole = (["the reference"] if spec.loss.beta > 0 and full else []) + (["the critic"] if spec.kind == "ppo" else [])
        critic = f"; {' and '.join(whole)} {'are' if len(whole) > 1 else 'is'} whole on every rank" if whole else ""
        return (f"; strategy fsdp: each rank holds 1/{world} of the policy's weights and AdamW state between "
                "rounds; the whole weights are gathered on every rank for sampling and the no-grad forwards, and "
                "for each optimizer step (whole gradients accumulated, reduce-scattered once)" + critic)
    if recipe.distributed.strategy == "fsdp" and spec.kind == "distill" and spec.mode != "sequence":
        decode = "for the student's decoding and " if spec.mode == "on_policy" else ""
        return (f"; strategy fsdp: each rank holds 1/{world} of the student's weights and AdamW state between steps; "
                f"the whole weights are gathered on every rank {decode}for each optimizer step (whole gradients "
                "accumulated, reduce-scattered once); the teacher is whole on every rank")
    if recipe.distributed.strategy == "fsdp":
        own = getattr(spec, "lora", None)
        if (own if own is not None else recipe.lora) != "full":
            return (f"; strategy fsdp: each rank holds 1/{world} of the frozen base weights and of the LoRA adapter's "
                    "weights, gradients and AdamW state (weights all-gathered per decoder layer, adapter gradients "
                    "reduce-scattered)")
        return (f"; strategy fsdp: each rank holds 1/{world} of the weights, gradients and AdamW state "
                "(weights all-gathered per decoder layer, gradients reduce-scattered)")
    return "; strategy ddp: each rank holds the whole model and optimizer state"


def split_problem(loaded: Any, stage: str, world: int) -> str | None:
    """Why `stage` cannot run on `world` processes (the recipe's file:line when a size does not
    split), or None."""
    if world <= 1:
        return None
    spec = loaded.recipe.stages[stage]
    if spec.kind in ("sample", "eval"):  # any number of generation batches splits (some ranks may idle)
        return None
    if spec.kind in ("grpo", "ppo"):
        return _rl_split_problem(loaded, stage, spec, world)
    micro = spec.micro_batch_size or spec.batch_size // world or 1
    if spec.batch_size % (micro * world) == 0:
        return None
    key = f"stages.{stage}.batch_size"
    at = loaded.positions.get(key) or loaded.positions.get(f"stages.{stage}.micro_batch_size")
    where = f"{loaded.path}:{at[0]}" if at else f"{loaded.path}"
    if spec.micro_batch_size is None:  # one micro-batch of batch_size / world per rank
        return (f"{where}: {key} {spec.batch_size} does not split over {world} processes (without "
                f"micro_batch_size each rank takes batch_size / {world}); make it a multiple of {world}")
    return (f"{where}: {key} {spec.batch_size} = {spec.batch_size // micro} micro-batches of {micro} does not "
            f"split over {world} processes; make batch_size / micro_batch_size a multiple of {world}")


def _rl_split_problem(loaded: Any, stage: str, spec: Any, world: int) -> str | None:
    """GRPO/PPO: each rank samples an equal share of whole prompt groups (with vLLM, on its own engine)."""
    if spec.prompts_per_step % world == 0:
        return None
    key = f"stages.{stage}.prompts_per_step"
    at = loaded.positions.get(key)
    where = f"{loaded.path}:{at[0]}" if at else f"{loaded.path}"
    return (f"{where}: {key} {spec.prompts_per_step} does not split over {world} processes (each rank samples "
            f"whole groups of an equal share of the prompts); make it a multiple of {world}")
