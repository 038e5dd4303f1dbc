# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""PPO with a critic on a LoRA policy (ALGORITHMS.md sections 1-3; Schulman et al. 2017, Ziegler et al. 2019).

Each step is one rollout batch: B prompts x G completions (G = 1 by default), per-token rewards
(the summed sequence reward R on each completion's last token, minus beta * k1 on every token:
the KL to the reference in the reward), values V_t from the critic (rlft/rl/critic.py), GAE
advantages and returns, advantages whitened over the batch's counted tokens; then `ppo_epochs`
passes of `mini_batches` optimizer steps on

    L = L_clip (+ beta * KL with kl_in: loss) + value_coef * L_V        (one backward, one optimizer)

through GRPO's loss core (`learner.optimize`, `learner.policy_loss`). Choices, each documented or an option:
1. Dropout is off (as in GRPO, `models.dropout_free_mode`). old_logp and V_old are recomputed in one forward before the first
   update (with `critic: shared` that forward gives both), so the first step's ratio is exactly 1.
2. The reference is the adapter-disabled policy (`rounds.make_reference`); beta = 0 skips it.
3. Adaptive KL (`kl_target`): after each batch beta *= 1 + clip(KL/target - 1, -0.2, 0.2) * N/horizon,
   KL = mean over the N completions of sum_t k1 (Ziegler et al. 2019); beta is checkpointed.
4. Early stop (`early_stop_kl`): the epochs of a batch end after an epoch whose mean approx KL
   to the rollout policy exceeds it: k3 = (r - 1) - log r, r = exp(logp - old_logp), mean over
   tokens, measured in each step's forward (before its update); >= 0, unlike the k1 mean.
5. Checkpoints at rollout-batch boundaries hold the adapter, the critic (head, separate trunk),
   optimizer, RNG, data cursor and beta; a kill inside the epochs replays the batch, bitwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rlft import dist, fsdp, rollout, training
from rlft.ckpt.fsio import commit_dir
from rlft.core import advantages, losses
from rlft.metrics import StepTimer
from rlft.models import dropout_free_mode, load_policy
from rlft.rl import critic, learner, rounds, shard
from rlft.stage_io import StageOutput, finish_model, new_staging

if TYPE_CHECKING:
    from rlft.recipe.schema import LossSpec, PPOSpec
    from rlft.run import Artifact, RunContext


@dataclass(frozen=True)
class PPOBatch:
    """A rollout batch ready for the epochs; every tensor (N, T), 0 at masked positions."""

    exp: learner.Experience  # advantages = whitened GAE advantages; old_logp recorded
    old_values: Tensor  # V_old, the critic at sampling time
    returns: Tensor  # GAE returns, the value targets
    rewards: Tensor  # per-token rewards
    raw_advantages: Tensor  # GAE advantages before whitening
    kl: Tensor  # k1 = old_logp - ref_logp (0 without a reference)

    @property
    def mask(self) -> Tensor:
        return self.exp.mask

    def rows(self, idx: Tensor) -> PPOBatch:
        return PPOBatch(self.exp.rows(idx), self.old_values[idx], self.returns[idx], self.rewards[idx],
                        self.raw_advantages[idx], self.kl[idx])


@dataclass
class KLController:
    """beta of the KL penalty: fixed, or adaptive (Ziegler et al. 2019) when `target` is set.

        beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
    """

    beta: float
    target: float | None
    horizon: int

    def update(self, kl: float, n: int) -> None:
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * n / self.horizon


def run(ctx: RunContext[PPOSpec]) -> Artifact:
    """Train `ctx.spec` (a PPOSpec) and return the stage's Artifact."""
    spec = ctx.spec
    policy, tokenizer, value = load_models(ctx)
    reference = rounds.make_reference(policy, ctx)
    loader, eval_rows, prints = rounds.prompt_data(ctx, tokenizer)
    score = rounds.reward_scorer(ctx)
    opt = make_optimization(policy, value, spec)
    kl_ctl = KLController(spec.loss.beta, spec.kl_target, spec.kl_horizon)
    meta = ctx.input_meta(prints) | {"unsafe_code_exec": score.unsafe_code_exec}
    start, state, tensors = training.resume_stage(ctx, policy, opt.optimizer, loader, opt.guard, meta)
    opt_step, kl_ctl.beta = state.get("opt_step", 0), state.get("beta", kl_ctl.beta)
    if start:
        value.load_state_tensors(tensors.get("critic", {}), str(ctx.stage_dir))
    logs = rounds.RoundLog(ctx, policy, tokenizer, eval_rows, start)
    loop = training.StageLoop(
        start, spec.steps, f"ppo {ctx.stage}", ctx.stage_dir, spec, policy, opt.optimizer, meta,
        state=lambda: {"loader": loader.state_dict(), "guard": opt.guard.state_dict(), "opt_step": opt_step,
                       "beta": kl_ctl.beta},
        extra_tensors=lambda: {"critic": value.state_tensors()},
        halt=logs,
    )
    sampling = rollout.SamplingParams.of(spec.sampling)
    engine = rounds.sampling_engine(ctx)  # None: the built-in sampler
    for step in loop:
        timer = StepTimer()
        with fsdp.gathered(policy):  # fsdp: each rank samples, scores and evaluates its share with the whole weights
            r = rounds.sample_round(policy, tokenizer, loader, score, spec, sampling, ctx.seed, step, timer, engine)
            batch = build_batch(policy, value, reference, r.out, r.rewards, spec, sampling.temperature, kl_ctl.beta)
        timer.lap("experience")  # old_logp, V_old, ref_logp, GAE
        stats: dict[str, Any] = r.stats | batch_stats(batch) | {"kl/beta": kl_ctl.beta}
        updates = update(policy, value, batch, spec, opt, opt_step, sampling.temperature, kl_ctl.beta)
        opt_step += len(updates)
        timer.lap("policy")
        kl_ctl.update(stats["kl/sequence"], len(r.out.texts))
        stats |= learner.mean_stats(updates) | {"ppo/epochs_run": len(updates) / spec.mini_batches}
        stats |= timer.times | {"optimizer_steps": opt_step}
        logs.log(step, stats, r.rows, r.out.texts)
    history = logs.close()
    score.close()
    if engine is not None:
        engine.close()
    return finish(ctx, policy, tokenizer, value, history, opt.guard.skipped)


def load_models(ctx: RunContext[PPOSpec]) -> tuple[Any, Any, critic.Critic]:
    """Policy (LoRA attached, eval mode), tokenizer and critic; a bad `reward_model` fails first."""
    spec, key = ctx.spec, f"stages.{ctx.stage}.reward_model"
    source = critic.resolve_reward_model(spec.reward_model, ctx.data_base_dir(), key) if spec.reward_model else None
    policy, tokenizer = load_policy(ctx.parent().model_source, ctx.model_spec(), ctx.lora(), ctx.seed)
    dropout_free_mode(policy)  # no dropout in RL (gradient checkpointing stays on)
    if fsdp.active(ctx.recipe.distributed.strategy):  # lora: full (the recipe checks say so); the critic is replicated
        policy = fsdp.shard(policy, ctx.model_spec())
    dev = next(policy.parameters()).device
    rm = critic.load_reward_model(source, ctx.model_spec(), dev, key) if source else None
    value = critic.build_critic(spec.critic, policy, ctx.parent().model_source, ctx.model_spec(), ctx.lora(), ctx.seed, rm)
    return policy, tokenizer, value


def make_optimization(policy: Any, value: critic.Critic, spec: PPOSpec) -> learner.Optimization:
    """One AdamW over the policy's adapter (first group) and the critic (second group, at critic_lr)."""
    optimizer = training.make_optimizer(policy, spec)
    optimizer.add_param_group({"params": list(value.named_params().values())})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    guard = training.NanGuard(spec.nan_policy, spec.max_bad_steps)
    scales = (1.0, (spec.critic_lr or spec.lr) / spec.lr)
    return learner.Optimization(optimizer, params, guard, learner.lr_fn(spec, spec.ppo_epochs), spec.max_grad_norm, scales,
                                policy)


@torch.no_grad()
def evaluate_batch(policy: Any, value: critic.Critic, tensors: tuple[Tensor, ...], temperature: float,
                   micro_batch_size: int) -> critic.Evaluation:
    """old_logp and V_old of every row, micro-batch by micro-batch, without a graph (on several
    processes each rank evaluates a share of the rows, `shard.by_rows`)."""
    fields = ("logp", "entropy", "values")

    def evaluate(rows: tuple[Tensor, ...]) -> list[Tensor]:
        parts = [value.evaluate(policy, tuple(t[s : s + micro_batch_size] for t in rows), temperature)
                 for s in range(0, rows[0].shape[0], micro_batch_size)]
        return [torch.cat([getattr(p, f) for p in parts]) for f in fields]

    return critic.Evaluation(*shard.by_rows(evaluate, tensors))


def build_batch(
    policy: Any, value: critic.Critic, reference: Any, out: rollout.Rollouts, R: Tensor, spec: PPOSpec,
    temperature: float, beta: float,
) -> PPOBatch:
    """Per-token rewards, V_old, GAE advantages (whitened) and returns of one rollout batch.

        rew_t = R * [t = last] - beta * k1_t,   k1_t = old_logp_t - ref_logp_t     (kl_in: reward)
        (A, returns) = gae(rew, V_old, mask, gamma, lam);   A <- whiten(A, mask)
    """
    mask = out.completion_mask * (~out.truncated[:, None]) if spec.loss.mask_truncated else out.completion_mask
    tensors = (out.prompt_ids, out.prompt_mask, out.completion_ids, mask)
    old = evaluate_batch(policy, value, tensors, temperature, spec.micro_batch_size)
    ref_logp = None
    if reference is not None:
        with reference() as ref_model:
            ref_logp = learner.logprobs_of(ref_model, tensors, temperature, spec.micro_batch_size)
    counted = mask.bool()
    kl = torch.where(counted, old.logp - ref_logp, 0.0) if ref_logp is not None else torch.zeros_like(old.logp)
    rewards = learner.token_rewards(R.to(old.logp.dtype), kl, mask, beta if spec.loss.kl_in == "reward" else 0.0)
    gae = advantages.gae(rewards, old.values, mask, spec.gamma, spec.lam)
    ref_in_loss = ref_logp if spec.loss.kl_in == "loss" else None
    exp = learner.Experience(out.prompt_ids, out.prompt_mask, out.completion_ids, mask,
                        advantages.whiten(gae.advantages, mask), old.logp, ref_in_loss, out.sample_logp)
    return PPOBatch(exp, old.values, gae.returns, rewards, gae.advantages, kl)


def batch_stats(batch: PPOBatch) -> dict[str, float]:
    """Critic and KL statistics of a rollout batch over its counted tokens (before any update).

    explained_variance = 1 - Var(returns - V_old) / Var(returns)   (NaN when the returns are all equal)
    """
    counted = batch.mask.bool()
    ret, v, a = batch.returns[counted], batch.old_values[counted], batch.raw_advantages[counted]
    var = float(ret.var()) if ret.numel() > 1 else 0.0
    explained = 1.0 - float((ret - v).var()) / var if var > 0 else float("nan")
    return {
        "value/explained_variance": explained, "value/mean": float(v.mean()), "returns/mean": float(ret.mean()),
        "advantage/mean": float(a.mean()), "advantage/std": float(a.std()) if a.numel() > 1 else 0.0,
        "kl": float(batch.kl[counted].mean()), "kl/sequence": float(batch.kl.sum(-1).mean()),
    }


def ppo_loss(
    ev: critic.Evaluation, micro: PPOBatch, loss_spec: LossSpec, value_coef: float, value_clip: float, normalizer: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the step loss, L_clip (+ beta * KL in the loss) + value_coef * L_V,
    each aggregated with the whole mini-batch's `normalizer` (ALGORITHMS.md §1-§4).

    Returns the loss and summed statistics for `learner.optimize` ("loss/*" are shares, summed as they are).
    """
    policy_part, stats = learner.policy_loss(ev.logp, micro.exp, loss_spec, normalizer)
    value_part = losses.aggregate(losses.value_loss(ev.values, micro.old_values, micro.returns, value_clip),
                                  micro.mask, loss_spec.aggregate, normalizer)
    counted = micro.mask.bool()
    clipped = micro.old_values + (ev.values.detach() - micro.old_values).clamp(-value_clip, value_clip)
    chose_clipped = ((clipped - micro.returns).square() > (ev.values.detach() - micro.returns).square()) & counted
    loss = policy_part + value_coef * value_part
    old_logp = micro.exp.old_logp
    assert old_logp is not None, "PPO always records the rollout policy's log-probs"
    log_ratio = (ev.logp.detach() - old_logp).clamp(-losses.MAX_LOG_RATIO, losses.MAX_LOG_RATIO)
    if "kl" in stats:  # the in-loss estimator; "kl" of the batch is the rollout's k1
        stats["kl/loss"] = stats.pop("kl")
    stats |= {
        "loss/policy": policy_part.detach(), "loss/value": value_part.detach(), "loss/total": loss.detach(),
        "clip/value": chose_clipped.sum().float(),
        "ppo/approx_kl": torch.where(counted, torch.expm1(log_ratio) - log_ratio, 0.0).sum(),
        "entropy": torch.where(counted, ev.entropy, 0.0).sum(),
    }
    return loss, stats


def update(
    policy: Any, value: critic.Critic, batch: PPOBatch, spec: PPOSpec, opt: learner.Optimization, opt_step: int,
    temperature: float, beta: float,
) -> list[dict[str, float]]:
    """`ppo_epochs` x `mini_batches` optimizer steps on one rollout batch, with the KL early stop."""
    loss_spec = spec.loss.model_copy(update={"beta": beta})

    def loss_fn(micro: PPOBatch, normalizer: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ev = value.evaluate(policy, micro.exp.tensors(), temperature)
        return ppo_loss(ev, micro, loss_spec, spec.value_coef, spec.value_clip, normalizer)

    def keep_going(epoch: list[dict[str, float]]) -> bool:
        kls = [u["ppo/approx_kl"] for u in epoch if "ppo/approx_kl" in u]
        return spec.early_stop_kl is None or not kls or sum(kls) / len(kls) <= spec.early_stop_kl

    return learner.optimize(batch, loss_fn, opt, spec, opt_step, spec.ppo_epochs, keep_going)


def finish(
    ctx: RunContext[PPOSpec], policy: Any, tokenizer: Any, value: critic.Critic, history: list[dict[str, Any]], skipped: int,
) -> Any:
    """`final/` as every model stage writes it, then `final/critic/` (value head, separate trunk).

    The critic is committed after `final/` and before the pipeline's done marker, so a kill in
    between re-runs the finish from the last checkpoint.
    """
    output = StageOutput.from_history(history, skipped)
    evs = [r["value/explained_variance"] for r in history if isinstance(r.get("value/explained_variance"), float)]
    if evs:  # mean of the last 10% of steps, like the reward summary
        k = max(1, len(evs) // 10)
        output.summary["value/explained_variance_last"] = sum(evs[-k:]) / k
    artifact = finish_model(ctx, policy, tokenizer, output)
    if dist.is_main():  # rank 0 writes; the critic is the same on every rank
        staging = new_staging(ctx.stage_dir)
        value.save(staging, ctx.spec.reward_model)
        commit_dir(staging, ctx.stage_dir / "final" / "critic")
    dist.barrier()
    return artifact
