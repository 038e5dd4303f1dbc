# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""The actor side of GRPO and PPO: prompt data and rewards, sampling and scoring a generation round
(with DAPO dynamic sampling), the reference policy, and the round's metrics and samples log. The
update of the policy on a round lives in `rlft.rl.learner`.

ALGORITHMS.md sections 2, 5.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rlft import dist, fsdp, rollout
from rlft.core import advantages
from rlft.data import encode
from rlft.data.batch import PromptLoader
from rlft.data.rows import mix
from rlft.models import load_model, reference_mode
from rlft.recipe.schema import GRPOSpec, PPOSpec
from rlft.rewards.runner import build_rewards
from rlft.rl import shard
from rlft.rl.alarms import AlarmMonitor, abstained_stats, abstaining_rewards, unparsed_stats
from rlft.stage_io import load_prompts

if TYPE_CHECKING:
    from rlft.run import RunContext
    from rlft.vllm_engine import VLLMEngine




def select_groups(out: rollout.Rollouts, keep: Tensor, group_size: int) -> rollout.Rollouts:
    """The rows of the groups where `keep` (B,) is True, in order."""
    rows = keep.repeat_interleave(group_size).nonzero().squeeze(1)
    texts = [out.texts[i] for i in rows.tolist()]
    return rollout.Rollouts(
        out.prompt_ids[rows], out.prompt_mask[rows], out.completion_ids[rows], out.completion_mask[rows],
        out.sample_logp[rows], out.truncated[rows], texts, out.group_index[rows],
    )


def concat_rollouts(parts: list[rollout.Rollouts], pad_id: int) -> rollout.Rollouts:
    """One Rollouts from several: prompts re-left-padded, completions re-right-padded."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_ids.shape[1] for p in parts)
    T = max(p.completion_ids.shape[1] for p in parts)

    def left(t: Tensor, v: float) -> Tensor:
        return torch.nn.functional.pad(t, (P - t.shape[1], 0), value=v)

    def right(t: Tensor, v: float) -> Tensor:
        return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=v)

    offsets = torch.tensor([0] + [int(p.group_index.max()) + 1 if len(p.texts) else 0 for p in parts[:-1]]).cumsum(0)
    return rollout.Rollouts(
        torch.cat([left(p.prompt_ids, pad_id) for p in parts]),
        torch.cat([left(p.prompt_mask, 0) for p in parts]),
        torch.cat([right(p.completion_ids, pad_id) for p in parts]),
        torch.cat([right(p.completion_mask, 0) for p in parts]),
        torch.cat([right(p.sample_logp, 0.0) for p in parts]),
        torch.cat([p.truncated for p in parts]),
        [t for p in parts for t in p.texts],
        torch.cat([p.group_index + int(o) for p, o in zip(parts, offsets, strict=True)]),
    )


@dataclass(frozen=True)
class Round:
    """The sampled, scored completions of one generation round (after any dynamic-sampling filter)."""

    out: rollout.Rollouts  # N = B*G rows
    rewards: Tensor  # (N,) summed reward of each completion
    stats: dict[str, float]  # round_stats of the first sampling round, dynamic/*
    rows: list[Any]  # the B prompt examples, in order


def sample_round(
    policy: Any, tokenizer: Any, loader: Any, score: Any, spec: GRPOSpec | PPOSpec,
    sampling: rollout.SamplingParams, seed: int, step: int, timer: Any, engine: VLLMEngine | None = None,
) -> Round:
    """Sample G completions for each of B prompts and score them.

    With dynamic sampling (DAPO, `spec.dynamic_sampling`), groups whose G rewards are all equal
    are dropped and more prompts are sampled, up to `max_rounds` rounds, until B groups carry a
    signal. Randomness comes from `rollout.seed_generator(seed, step, round)` only, so a resumed
    run replays a round bitwise. `engine` (vLLM, `sampling_engine`) samples instead of
    `rollout.generate` when given: it gets the policy's weights first and sleeps afterwards.
    """
    if engine is not None:
        engine.sync(policy, step)
    G, B = spec.group_size, spec.prompts_per_step
    dynamic = spec.dynamic_sampling if isinstance(spec, GRPOSpec) and spec.dynamic_sampling.enabled else None
    parts, totals, rows, stats = [], [], [], {}
    rounds = dynamic.max_rounds if dynamic else 1
    r = 0
    for r in range(rounds):
        batch = next(loader)

        def sample(part: Any, generator: Any) -> tuple[rollout.Rollouts, Any]:
            prompts = [b.prompt_ids for b in part]
            if engine is None:
                out = rollout.generate(policy, tokenizer, prompts, sampling, G, generator)
            else:
                # one seed per prompt, drawn from the prompt's own generator: the same on any number of ranks
                gens = generator if isinstance(generator, list) else shard.prompt_generators(
                    generator, len(part), G, sampling.max_new_tokens)
                out = engine.generate(tokenizer, prompts, sampling, G, gens, next(policy.parameters()).device)
            timer.lap("generation")
            columns = {k: [b.columns.get(k) for b in part for _ in range(G)] for k in part[0].columns}
            columns["completion_tokens"] = out.completion_mask.sum(-1).tolist()
            result = score([b.prompt_text for b in part for _ in range(G)], out.texts, columns)
            timer.lap("rewards")
            return out, result

        # several processes: each rank samples and scores its share of the prompts (rlft/rl/shard.py)
        out, result = shard.sampled_share(batch, rollout.seed_generator(seed, step, r), G, sampling.max_new_tokens,
                                          sample, lambda parts: concat_rollouts(parts, tokenizer.pad_token_id))
        if r == 0:
            stats = round_stats(out, result, G) | abstained_stats(abstaining_rewards(spec.rewards), result)
        keep = torch.ones(len(batch), dtype=torch.bool)
        if dynamic:
            keep = ~advantages.zero_variance_groups(result.total, G).cpu()
            if not keep.any():
                if r < rounds - 1 or parts:
                    continue  # no signal in this round: sample more, or train on what we have
                keep = torch.ones(len(batch), dtype=torch.bool)  # nothing at all: advantages are 0
        parts.append(select_groups(out, keep.to(out.truncated.device), G))
        rows += [b for b, k in zip(batch, keep.tolist(), strict=True) if k]
        totals.append(result.total[keep.repeat_interleave(G).to(result.total.device)])
        if sum(len(p.texts) for p in parts) >= B * G:
            break
    if engine is not None:
        engine.sleep()  # the trainer has the GPU until the next round
    out = concat_rollouts(parts, tokenizer.pad_token_id)
    n = min(len(out.texts), B * G)
    stats |= {"dynamic/rounds": r + 1, "dynamic/groups": n // G}
    out = select_groups(out, torch.arange(len(out.texts) // G) < n // G, G)
    R = torch.cat(totals)[:n].to(out.completion_ids.device)  # (N,)
    return Round(out, R, stats, rows[: n // G])


def round_stats(out: rollout.Rollouts, result: Any, G: int) -> dict[str, float]:
    """Reward and completion statistics of a generation round (before any filtering)."""
    R = result.total
    lengths = out.completion_mask.sum(-1).float()
    stats = {
        "reward/mean": float(R.mean()), "reward/std": float(R.std()) if R.numel() > 1 else 0.0,
        "reward/error_rate": float(result.error_rate),
        "completion/len_mean": float(lengths.mean()), "completion/len_max": float(lengths.max()),
        "completion/truncated": float(out.truncated.float().mean()),
    }
    if G >= 2:  # one completion per prompt (PPO's default) has no groups
        stats["groups/zero_variance"] = float(advantages.zero_variance_groups(R, G).float().mean())
    for name, values in result.per_function.items():
        stats[f"reward/{name}"] = float(values.float().nanmean())
    return stats


def sampling_engine(ctx: RunContext[GRPOSpec] | RunContext[PPOSpec]) -> VLLMEngine | None:
    """The vLLM engine for `sampling.engine: vllm` (None for the built-in sampler)."""
    spec = ctx.spec.sampling
    if spec.engine == "hf":
        return None
    from rlft.vllm_engine import EngineSettings, VLLMEngine

    lora = ctx.lora()
    settings = EngineSettings(
        model=ctx.parent().model_source, lora_rank=None if lora == "full" else lora.r,
        gpu_memory_utilization=spec.vllm.gpu_memory_utilization, sleep=spec.vllm.sleep, dtype=spec.vllm.dtype,
        max_model_len=spec.vllm.max_model_len, seed=ctx.seed, external_launcher=dist.world_size() > 1,
    )
    # each rank runs its own engine on its own GPU; ranks > 0 keep their adapters in their scratch dir
    return VLLMEngine(settings, dist.scratch_dir(ctx.run_dir) / ctx.stage / "vllm")


def make_reference(policy: Any, ctx: RunContext[GRPOSpec] | RunContext[PPOSpec]) -> Any:
    """pi_ref for the KL term: None when beta = 0; the adapter-disabled policy for LoRA;
    a frozen copy of the parent model for full fine-tuning."""
    if ctx.spec.loss.beta == 0:
        return None
    if ctx.lora() != "full":
        return lambda: reference_mode(policy)
    frozen = load_model(ctx.parent().model_source, ctx.model_spec(), next(policy.parameters()).device)
    frozen.eval().requires_grad_(False)
    return lambda: contextlib.nullcontext(frozen)


def prompt_data(
    ctx: RunContext[GRPOSpec] | RunContext[PPOSpec], tokenizer: Any,
) -> tuple[PromptLoader[encode.PromptExample], list[encode.PromptExample], dict[str, str]]:
    """The stage's prompt loader (data sets mixed by weight), its held-out prompts and data fingerprints."""
    spec = ctx.spec
    train, held_out, prints = load_prompts(ctx, spec.data, tokenizer)
    examples = train[0] if len(train) == 1 else mix(train, [d.weight for d in spec.data], ctx.seed)
    return PromptLoader(examples, spec.prompts_per_step, ctx.seed), held_out, prints


def reward_scorer(ctx: RunContext[GRPOSpec] | RunContext[PPOSpec]) -> Any:
    """The stage's summed, weighted reward functions (closed by the stage at its end)."""
    spec = ctx.spec
    return build_rewards(
        [e.model_dump() for e in spec.rewards], ctx.data_base_dir(), allow_code_exec_unsafe=spec.allow_unsafe_code_exec,
        timeout_s=spec.reward_timeout_s, max_error_rate=spec.max_reward_error_rate,
    )


class RoundLog:
    """Per-round logging both RL stages share: metrics.jsonl (every `log_every` rounds, the last
    one and every round with a held-out eval), samples.jsonl and held-out greedy accuracy at the
    start, every `eval_every` rounds and at the end. On a resume both files are cut back to the
    checkpoint's round."""

    def __init__(self, ctx: RunContext[GRPOSpec] | RunContext[PPOSpec], policy: Any, tokenizer: Any, eval_prompts: list[encode.PromptExample], start: int):
        from rlft.metrics import MetricsLog

        spec = ctx.spec
        self.spec, self.policy, self.tokenizer = spec, policy, tokenizer
        self.metrics = MetricsLog(ctx.stage_dir, start, every=spec.log_every)
        self.samples = MetricsLog(ctx.stage_dir, start, False, "samples.jsonl")
        self.alarms = AlarmMonitor(spec.alarms, ctx.stage, ctx.stage_dir, start)
        self.reward_names = [e.name for e in spec.rewards]
        self.held_out = eval_prompts[: spec.eval_samples]
        self.max_new = spec.eval_max_new_tokens or spec.sampling.max_new_tokens
        if start == 0:
            self.metrics.log(0, {"eval/accuracy": self.accuracy()})

    def accuracy(self) -> float | None:
        """Held-out greedy accuracy; on several processes every rank evaluates its share of the
        prompts and gets the whole figure (`evaluate.task_accuracy` gathers: all ranks call it;
        under fsdp with the weights `gathered`)."""
        from rlft import evaluate

        with fsdp.gathered(self.policy):
            return evaluate.task_accuracy(self.policy, self.tokenizer, self.held_out, self.max_new)

    def log(self, step: int, stats: dict[str, Any], rows: list[Any], texts: list[str]) -> None:
        """Record 0-based round `step` (logged as step + 1), with the first samples of the round."""
        spec = self.spec
        last = step + 1 == spec.steps
        evaluate = last or bool(spec.eval_every and (step + 1) % spec.eval_every == 0)
        if evaluate:
            stats["eval/accuracy"] = self.accuracy()
        stats |= unparsed_stats(self.reward_names, texts)
        if dist.initialized():  # every rank checks alarms on the metrics rank 0 writes (timings differ)
            stats = dist.broadcast_object(stats)
        self.metrics.log(step + 1, stats, force=evaluate)
        if self.metrics.history and self.metrics.history[-1]["step"] == step + 1:
            self.alarms.check(self.metrics.history)
        if step % spec.log_samples_every == 0:
            for row, text in zip(rows[:2], texts[:: spec.group_size][:2], strict=False):
                self.samples.log(step + 1, {"prompt": row.prompt_text, "completion": text, **row.columns})

    def alarmed(self) -> bool:
        """A `stop` alarm fired this round: the stage saves a checkpoint, then `stop_if_alarmed`."""
        return self.alarms.stop is not None

    def stop_if_alarmed(self) -> None:
        """After the checkpoint: TrainingError (exit 4) when a `stop` alarm fired this round."""
        if self.alarms.stop is not None:
            self.close()
            self.alarms.raise_if_stopped()

    def close(self) -> list[dict[str, Any]]:
        self.metrics.close()
        self.samples.close()
        self.alarms.close()
        return self.metrics.history
