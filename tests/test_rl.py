"""rlft.rl.rounds: the policy loss GRPO and PPO share, on-policy vs recomputed old log-probs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from rlft.core import losses
from rlft.recipe.schema import LossSpec
from rlft.rl import learner
from rlft.training import NanGuard
from tests.test_losses import ragged_mask

ESTIMATORS = ["k1", "k2", "k3"]


def _experience(mask: torch.Tensor, adv: torch.Tensor, old_logp: torch.Tensor | None,
                ref_logp: torch.Tensor) -> learner.Experience:
    n, t = mask.shape
    ids = torch.zeros((n, t), dtype=torch.long)
    return learner.Experience(ids, torch.ones_like(ids), ids, mask.long(), adv, old_logp, ref_logp)


def _loss_and_grad(logp0: torch.Tensor, exp: learner.Experience, spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor]:
    logp = logp0.clone().requires_grad_(True)
    normalizer = losses.aggregation_normalizer(exp.mask, spec.aggregate, max_len=logp.shape[1])
    loss, _ = learner.policy_loss(logp, exp, spec, normalizer)
    loss.backward()
    assert logp.grad is not None
    return loss.detach(), logp.grad


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("ratio", ["token", "sequence"])
@pytest.mark.parametrize("aggregate", ["token", "sequence"])
def test_on_policy_loss_has_the_gradient_of_recomputed_old_logp(estimator: str, weighted: bool, ratio: str,
                                                                 aggregate: str) -> None:
    """ALGORITHMS.md §1: old_logp = logp.detach() (on-policy, `old_logp` None) must give the gradient
    of old_logp recomputed (numerically equal to logp), importance-weighted KL included: r = 1, dr = dlogp."""
    gen = torch.Generator().manual_seed(3)
    n, t = 6, 5
    logp = -(torch.rand(n, t, generator=gen, dtype=torch.float64) * 3 + 0.05)
    ref_logp = logp + torch.randn(n, t, generator=gen, dtype=torch.float64) * 0.5
    mask = ragged_mask(n, t, gen)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    spec = LossSpec(beta=0.1, kl_estimator=estimator, importance_sampling_kl=weighted, ratio=ratio,
                    aggregate=aggregate)
    loss_on, grad_on = _loss_and_grad(logp, _experience(mask, adv, None, ref_logp), spec)
    loss_re, grad_re = _loss_and_grad(logp, _experience(mask, adv, logp.clone(), ref_logp), spec)
    assert_close(loss_on, loss_re, rtol=0, atol=1e-12)
    assert_close(grad_on, grad_re, rtol=0, atol=1e-6)
    assert grad_on[mask].abs().min() > 0  # every counted token gets a gradient


def test_on_policy_importance_weighted_kl_gradient_by_hand() -> None:
    """One token, A = 0, k3 weighted: d/dlogp [beta * k3 * r] at r = 1 is beta * (k3 + dk3/dlogp),
    dk3/dlogp = 1 - exp(ref_logp - logp); the weight's own gradient is the k3 term."""
    logp, ref_logp, beta = torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([[-1.5]], dtype=torch.float64), 0.1
    x = torch.tensor(-0.5, dtype=torch.float64)  # ref_logp - logp
    k3 = x.exp() - x - 1
    expected = beta * (k3 + 1 - x.exp())
    spec = LossSpec(beta=beta, importance_sampling_kl=True)
    exp = _experience(torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.float64), None, ref_logp)
    _, grad = _loss_and_grad(logp, exp, spec)
    assert_close(grad, expected.reshape(1, 1), rtol=0, atol=1e-12)


def test_grpo_update_gradient_same_on_policy_and_recomputed(tmp_path: Path) -> None:
    """End to end on the tiny model: `old_logp: auto` (on-policy, detach) and `old_logp: recompute`
    give the same adapter gradient for every KL estimator, importance-weighted or not."""
    from rlft import rollout
    from rlft.models import attach_lora, load_model, load_tokenizer, prepare_base, reference_mode
    from rlft.recipe.schema import GRPOSpec, LoraSpec, ModelSpec
    from rlft.stages.grpo import build_experience

    mspec = ModelSpec(name="tiny:nano")
    source = prepare_base(mspec, tmp_path)
    tok = load_tokenizer(source, mspec)
    torch.manual_seed(0)
    policy = attach_lora(load_model(source, mspec, torch.device("cpu")), LoraSpec(r=4)).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # policy != reference, so the KL and its gradient are not 0
    sampling = rollout.SamplingParams(max_new_tokens=10)
    out = rollout.generate(policy, tok, [tok("What is 1+1?").input_ids, tok("Reverse: abc").input_ids], sampling, 4,
                           rollout.seed_generator(5))
    R = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    params = [p for p in policy.parameters() if p.requires_grad]

    def gradient(estimator: str, weighted: bool, old_logp: str) -> list[torch.Tensor]:
        spec = GRPOSpec.model_validate({
            "kind": "grpo", "data": "tiny:arith", "rewards": ["math_answer"], "group_size": 4, "prompts_per_step": 2,
            "micro_batch_size": 8, "old_logp": old_logp,
            "loss": {"beta": 0.5, "kl_estimator": estimator, "importance_sampling_kl": weighted}})
        exp = build_experience(policy, lambda: reference_mode(policy), out, R, spec, sampling, _NoTimer())
        assert (exp.old_logp is None) == (old_logp == "auto")
        policy.zero_grad()
        logp = rollout.completion_logprobs(policy, exp.tensors(), 1.0)
        normalizer = losses.aggregation_normalizer(exp.mask, spec.loss.aggregate)
        learner.policy_loss(logp, exp, spec.loss, normalizer)[0].backward()
        return [p.grad.clone() for p in params]

    for estimator in ESTIMATORS:
        for weighted in (True, False):
            auto, recompute = gradient(estimator, weighted, "auto"), gradient(estimator, weighted, "recompute")
            for a, b in zip(auto, recompute, strict=True):
                assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, e=estimator, w=weighted: f"{e} weighted={w}: {m}")
            assert any(g.abs().sum() > 0 for g in auto)


class _NoTimer:
    def lap(self, name: str) -> None:
        pass


def _rl_policy(source: str, checkpointing: bool) -> object:
    """A tiny LoRA policy (dropout 0.1 on the adapter) in the RL stages' dropout-free mode."""
    from rlft.models import attach_lora, dropout_free_mode, load_model
    from rlft.recipe.schema import LoraSpec, ModelSpec

    spec = ModelSpec(name="tiny:nano", gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    policy = attach_lora(load_model(source, spec, torch.device("cpu")), LoraSpec(r=4, dropout=0.1))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return dropout_free_mode(policy)


def _loss_grads_and_layer_starts(policy: object, exp: learner.Experience) -> tuple:
    """Loss and adapter gradients of one forward/backward, and how often each decoder layer's MLP
    started per model forward (1: no recompute; 2: recomputed in the backward)."""
    from rlft import rollout
    layers = policy.get_base_model().model.layers
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    # a pre-hook: the recompute stops once the last saved tensor is back, before the MLP returns
    hooks = [layer.mlp.register_forward_pre_hook(count) for layer in layers]
    forwards = [0]
    hooks.append(policy.get_base_model().model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1)))
    spec = LossSpec()
    logp = rollout.completion_logprobs(policy, exp.tensors(), 1.0)
    loss, _ = learner.policy_loss(logp, exp, spec, losses.aggregation_normalizer(exp.mask, spec.aggregate))
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    return loss.detach(), grads, calls[0] / len(layers) / forwards[0]


def test_gradient_checkpointing_is_active_in_rl_and_changes_no_number(tmp_path: Path) -> None:
    """With model.gradient_checkpointing the RL policy recomputes every decoder layer in the backward
    (each layer's MLP starts twice per forward/backward instead of once), and the loss and the adapter
    gradients equal those without it; dropout stays off (LoRA dropout 0.1 would make them differ)."""
    from rlft import rollout
    from rlft.models import load_tokenizer, prepare_base
    from rlft.recipe.schema import ModelSpec
    source = prepare_base(ModelSpec(name="tiny:nano"), tmp_path)
    tok = load_tokenizer(source, ModelSpec(name="tiny:nano"))
    plain, checkpointed = _rl_policy(source, False), _rl_policy(source, True)
    assert not any(m.training for m in plain.modules())
    # only the layers carry the flag checkpointing needs; no dropout module is in training mode
    assert {type(m).__name__ for m in checkpointed.modules() if m.training} == {"Qwen2DecoderLayer"}
    out = rollout.generate(plain, tok, [tok("What is 1+1?").input_ids, tok("Reverse: abc").input_ids],
                           rollout.SamplingParams(max_new_tokens=10), 4, rollout.seed_generator(5))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.0, 0.0])
    exp = learner.Experience(out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask, adv, None, None)
    results = {name: _loss_grads_and_layer_starts(policy, exp) for name, policy in
               (("plain", plain), ("checkpointed", checkpointed))}
    assert results["plain"][2] == 1 and results["checkpointed"][2] == 2  # recomputed in the backward
    assert_close(results["checkpointed"][0], results["plain"][0], rtol=0, atol=1e-6)
    assert results["plain"][1].keys() == results["checkpointed"][1].keys()
    for n, g in results["plain"][1].items():
        assert_close(results["checkpointed"][1][n], g, rtol=0, atol=1e-6, msg=n)
    assert any(g.abs().sum() > 0 for g in results["plain"][1].values())


def _mismatch_exp(tis_spec_old: torch.Tensor, sample: torch.Tensor, mask: torch.Tensor, adv: float) -> learner.Experience:
    n, t = mask.shape
    ids = torch.zeros((n, t), dtype=torch.long)
    return learner.Experience(ids, torch.ones_like(ids), ids, mask.long(), torch.full((n,), adv, dtype=torch.float64),
                              tis_spec_old, None, sample)


def test_sampler_mismatch_metric_and_tis_by_hand() -> None:
    """ALGORITHMS.md §10 on one row worked by hand: old_logp = (-1, -2, -0.5), sampler s = (-1.2, -1.5, -9),
    third token padding. log w = old - s = (0.2, -0.5); mismatch/kl = mean(s - old) = (-0.2 + 0.5) / 2
    = 0.15; ratio_max = e^0.2. With A = 2 at ratio 1 the clipped term is -A per token; TIS with C = 1.1
    weights it by w = (min(e^0.2, 1.1), e^-0.5) = (1.1, 0.60653): token-mean loss -(2 * 1.1 + 2 * e^-0.5) / 2,
    gradient -A * w / 2 per token; C = inf leaves e^0.2 in place; no tis_cap leaves the loss at -A."""
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    sample = torch.tensor([[-1.2, -1.5, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    w = torch.tensor([1.1, math.exp(-0.5)], dtype=torch.float64)
    for cap, weights in ((1.1, w), (1e9, torch.tensor([math.exp(0.2), math.exp(-0.5)], dtype=torch.float64)),
                         (None, torch.ones(2, dtype=torch.float64))):
        spec = LossSpec(tis_cap=cap)
        logp = old.clone().requires_grad_(True)
        exp = _mismatch_exp(old, sample, mask, 2.0)
        normalizer = losses.aggregation_normalizer(exp.mask, spec.aggregate, max_len=3)
        loss, stats = learner.policy_loss(logp, exp, spec, normalizer)
        loss.backward()
        assert_close(loss.detach(), -(2.0 * weights).sum() / 2, rtol=0, atol=1e-12)
        assert logp.grad is not None
        assert_close(logp.grad[0, :2], -2.0 * weights / 2, rtol=0, atol=1e-12)
        assert float(logp.grad[0, 2]) == 0.0
        assert_close(stats["mismatch/kl"] / stats["tokens"], torch.tensor(0.15, dtype=torch.float64), rtol=0, atol=1e-12)
        assert_close(stats["mismatch/ratio_max"], torch.tensor(math.exp(0.2), dtype=torch.float64), rtol=0, atol=1e-12)


def test_ratio_max_is_a_max_over_micro_batches_and_steps() -> None:
    """`*_max` statistics are maxima; the others token means (learner.optimize / mean_stats)."""
    from rlft.recipe.schema import GRPOSpec
    gen = torch.Generator().manual_seed(0)
    n, t = 8, 4
    old = -(torch.rand(n, t, generator=gen, dtype=torch.float64) + 0.1)
    shift = torch.zeros(n, t, dtype=torch.float64)
    shift[5, 2] = -0.3  # sampler gave token (5, 2) a lower log-prob: weight e^0.3, in the 2nd micro-batch
    exp = learner.Experience(torch.zeros((n, t), dtype=torch.long), torch.ones((n, t), dtype=torch.long),
                             torch.zeros((n, t), dtype=torch.long), torch.ones((n, t), dtype=torch.long),
                             torch.randn(n, generator=gen, dtype=torch.float64), old, None, old + shift)
    spec = GRPOSpec.model_validate({"kind": "grpo", "data": "tiny:arith", "rewards": ["math_answer"],
                                    "prompts_per_step": 2, "group_size": 4, "micro_batch_size": 4})
    param = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def loss_fn(micro: learner.Experience, normalizer: torch.Tensor):
        assert micro.old_logp is not None
        return learner.policy_loss(micro.old_logp + param, micro, spec.loss, normalizer)

    opt = learner.Optimization(torch.optim.SGD([param], lr=0.0), [param], NanGuard("abort", 1), lambda s: 0.0, None)
    stats = learner.mean_stats(learner.optimize(exp, loss_fn, opt, spec, 0, 2))
    assert stats["mismatch/ratio_max"] == pytest.approx(math.exp(0.3), abs=1e-12)
    assert stats["mismatch/kl"] == pytest.approx(-0.3 / (n * t), abs=1e-12)  # mean of s - old_logp


def test_tis_and_sampler_old_logp_refused_where_they_mean_nothing() -> None:
    from pydantic import ValidationError

    from rlft.recipe.schema import GRPOSpec
    base = {"kind": "grpo", "data": "tiny:arith", "rewards": ["math_answer"]}
    with pytest.raises(ValidationError, match="ratio: sequence"):
        GRPOSpec.model_validate({**base, "loss": {"tis_cap": 2.0, "ratio": "sequence"}})
    with pytest.raises(ValidationError, match="old_logp: sampler"):
        GRPOSpec.model_validate({**base, "old_logp": "sampler", "loss": {"tis_cap": 2.0}})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        GRPOSpec.model_validate({**base, "loss": {"tis_cap": 0.5}})


def test_sampler_old_logp_equals_recomputed_with_the_built_in_engine(tmp_path: Path) -> None:
    """`old_logp: sampler` takes the decode loop's log-probs instead of a forward: equal to
    `old_logp: recompute` to float rounding; the mismatch metric of a built-in-engine round is ~0."""
    from rlft import rollout
    from rlft.metrics import StepTimer
    from rlft.models import attach_lora, load_model, load_tokenizer, prepare_base
    from rlft.recipe.schema import GRPOSpec, LoraSpec, ModelSpec
    from rlft.stages.grpo import build_experience

    mspec = ModelSpec(name="tiny:nano")
    source = prepare_base(mspec, tmp_path)
    tok = load_tokenizer(source, mspec)
    torch.manual_seed(0)
    policy = attach_lora(load_model(source, mspec, torch.device("cpu")), LoraSpec(r=4)).eval()
    base = {"kind": "grpo", "data": "tiny:arith", "rewards": ["math_answer"], "prompts_per_step": 2, "group_size": 4,
            "num_iterations": 2, "sampling": {"max_new_tokens": 10, "temperature": 0.8}}
    out = rollout.generate(policy, tok, [tok.encode("1+2="), tok.encode("what is 7*6?")],
                           rollout.SamplingParams(max_new_tokens=10, temperature=0.8), 4, rollout.seed_generator(3))
    R = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0])
    exps = {}
    for mode in ("sampler", "recompute"):
        spec = GRPOSpec.model_validate({**base, "old_logp": mode})
        exps[mode] = build_experience(policy, None, out, R, spec, rollout.SamplingParams.of(spec.sampling), StepTimer())
    assert exps["sampler"].old_logp is not None and exps["recompute"].old_logp is not None
    assert exps["sampler"].old_logp is not exps["recompute"].old_logp
    assert_close(exps["sampler"].old_logp, exps["recompute"].old_logp, rtol=0, atol=1e-5)
    assert exps["sampler"].sample_logp is None  # no mismatch to measure: old is the sampler
    spec = GRPOSpec.model_validate({**base, "old_logp": "recompute"})
    stats = learner.update(policy, torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0),
                           exps["recompute"], spec, NanGuard("abort", 1), 0, 0.8, lambda s: 0.0)
    assert all(abs(s["mismatch/kl"]) < 1e-5 and abs(s["mismatch/ratio_max"] - 1) < 1e-5 for s in stats)
