"""PPO with a critic on the tiny model: GAE, whitening and the value loss on the stage's real
tensors against the float64 loop references, one update moves the policy and the critic the
right way, reward-model initialisation, bad configurations, resume after kill -9 inside a PPO
epoch is bitwise (weights, value head, beta, metrics), and the tiny recipe learns."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import reference
import torch
from forkserver import get_server, record_result, reliability_n
from helpers import (
    assert_same_metrics,
    final_hashes,
    newest_checkpoint_tensors,
    run_with_and_without_checkpointing,
    sha,
    write_recipe,
)

from rlft import rollout
from rlft.cli import main
from rlft.core import losses
from rlft.errors import RecipeError, UserInputError
from rlft.models import attach_lora, load_model, load_tokenizer, prepare_base, reference_mode
from rlft.recipe.load import load_recipe
from rlft.recipe.schema import LoraSpec, ModelSpec, PPOSpec
from rlft.rl import critic
from rlft.stages import ppo

CPU = torch.device("cpu")
TEMPERATURE = 1.0


def ppo_recipe(output_dir: Path, **rl: Any) -> dict[str, Any]:
    """PPO straight from the random tiny base with a dense reward (length shaping), a KL in the
    reward with the adaptive controller, 2 epochs x 2 mini-batches of 2 micro-batches per batch."""
    spec = {
        "kind": "ppo",
        "data": {"source": "tiny:arith", "num_examples": 64, "eval_size": 4, "max_length": 128},
        "rewards": [{"name": "overlong_penalty", "options": {"max_len": 12, "cache_len": 10}}],
        "steps": 4,
        "prompts_per_step": 4,
        "ppo_epochs": 2,
        "mini_batches": 2,
        "micro_batch_size": 1,
        "lr": 1e-2,
        "critic_lr": 2e-2,
        "sampling": {"temperature": TEMPERATURE, "max_new_tokens": 16},
        "loss": {"beta": 0.1},
        "kl_target": 0.5,
        "kl_horizon": 8,
        "save_every": 1,
        "eval_samples": 4,
        "eval_max_new_tokens": 8,
        "log_samples_every": 1,
    } | rl
    return {
        "run_name": "p",
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"name": "tiny:nano"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "all-linear"},
        "stages": {"rl": spec},
    }


def _metrics(stage: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- one step, real tensors


class _Step:
    """A policy with a non-trivial adapter, a critic with non-zero values, one real rollout."""

    def __init__(self, tmp: Path, kind: str, **spec: Any) -> None:
        mspec = ModelSpec(name="tiny:nano")
        self.source = prepare_base(mspec, tmp)
        self.tok = load_tokenizer(self.source, mspec)
        torch.manual_seed(0)
        self.policy = attach_lora(load_model(self.source, mspec, CPU), LoraSpec(r=4)).eval()
        with torch.no_grad():
            for name, p in self.policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)  # the adapter matters: KL to the reference > 0
        self.spec = PPOSpec.model_validate({"kind": "ppo", "data": "tiny:arith", "rewards": ["math_answer"],
                                            "prompts_per_step": 6, "micro_batch_size": 4, "critic": kind,
                                            "gamma": 0.97, "lam": 0.9, "value_clip": 0.05} | spec)
        self.value = critic.build_critic(kind, self.policy, self.source, mspec, LoraSpec(r=4), 0)
        with torch.no_grad():
            self.value.head.weight.normal_(std=0.1)
            self.value.head.bias.fill_(0.2)
        # many one-character stop strings: completions of varied length, some cut at max_new_tokens
        sampling = rollout.SamplingParams(max_new_tokens=12, stop=tuple("aeiou0123456789"))
        prompts = [self.tok(f"What is {a}+{b}?").input_ids for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (8, 1)]]
        self.out = rollout.generate(self.policy, self.tok, prompts, sampling, 1, rollout.seed_generator(4))
        self.R = torch.linspace(-1.0, 1.0, 6)
        self.reference = lambda: reference_mode(self.policy)


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_rewards_gae_whitening_and_value_loss_match_the_float64_references(tmp_path: Path, kind: str) -> None:
    s = _Step(tmp_path, kind)
    lengths = s.out.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) > 2, lengths  # ragged right padding exercised
    beta = 0.3
    batch = ppo.build_batch(s.policy, s.value, s.reference, s.out, s.R, s.spec, TEMPERATURE, beta)
    mask = batch.mask
    tensors = (s.out.prompt_ids, s.out.prompt_mask, s.out.completion_ids, mask)
    with torch.no_grad():
        logp = rollout.completion_logprobs(s.policy, tensors, TEMPERATURE)
        with reference_mode(s.policy) as ref:
            ref_logp = rollout.completion_logprobs(ref, tensors, TEMPERATURE)
    torch.testing.assert_close(batch.exp.old_logp, logp, atol=1e-5, rtol=1e-5)  # the hook left logp alone
    # per-token rewards: R on the last counted token, minus beta * k1 on every counted token
    expected = torch.zeros_like(batch.rewards, dtype=torch.float64)
    for i, n in enumerate(lengths.tolist()):
        for t in range(n):
            expected[i, t] = -beta * (logp[i, t].item() - ref_logp[i, t].item()) + (s.R[i].item() if t == n - 1 else 0.0)
    torch.testing.assert_close(batch.rewards.double(), expected, atol=1e-5, rtol=1e-5)
    assert batch.kl[mask.bool()].abs().sum() > 0
    assert batch.old_values[mask.bool()].std() > 0
    adv, ret = reference.gae(batch.rewards, batch.old_values, mask, s.spec.gamma, s.spec.lam)
    torch.testing.assert_close(batch.raw_advantages.double(), adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.returns.double(), ret, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.exp.advantages.double(), reference.whiten(batch.raw_advantages, mask),
                               atol=1e-5, rtol=1e-5)
    # the value loss after the critic moved: some tokens past the clip range, some inside
    with torch.no_grad():
        s.value.head.bias.add_(0.04)
        s.value.head.weight.add_(torch.randn_like(s.value.head.weight) * 0.02)
    ev = s.value.evaluate(s.policy, batch.exp.tensors(), TEMPERATURE)
    normalizer = losses.aggregation_normalizer(mask, "token")
    loss, stats = ppo.ppo_loss(ev, batch, s.spec.loss, s.spec.value_coef, s.spec.value_clip, normalizer)
    per_token = reference.value_loss(ev.values, batch.old_values, batch.returns, s.spec.value_clip)
    value_ref = reference.aggregate(per_token, mask, "token")
    assert stats["loss/value"].item() == pytest.approx(value_ref, rel=1e-5, abs=1e-7)
    v, vo, r = (x.detach().double() for x in (ev.values, batch.old_values, batch.returns))
    clipped = vo + (v - vo).clamp(-s.spec.value_clip, s.spec.value_clip)
    chose = ((clipped - r).square() > (v - r).square()) & mask.bool()
    assert 0 < chose.sum() < mask.sum()
    assert stats["clip/value"].item() == chose.sum().item()
    surrogate = reference.clipped_surrogate(ev.logp, batch.exp.old_logp, batch.exp.advantages, 0.2, 0.2)[0]
    policy_ref = reference.aggregate(surrogate, mask, "token")
    assert stats["loss/policy"].item() == pytest.approx(policy_ref, abs=1e-5)
    assert loss.item() == pytest.approx(policy_ref + s.spec.value_coef * value_ref, abs=1e-5)
    loss.backward()
    grads = {n: p.grad for n, p in s.value.named_params().items()}
    assert all(g is not None for g in grads.values()) and grads["head.weight"].abs().sum() > 0
    if kind == "separate":  # the critic's own adapter learns (B first: A's gradient is 0 while B = 0)
        assert sum(g.abs().sum() for n, g in grads.items() if "lora_B" in n) > 0


def test_one_update_moves_policy_along_the_advantage_and_values_towards_the_returns(tmp_path: Path) -> None:
    s = _Step(tmp_path, "shared", ppo_epochs=1, lr=1e-3)
    batch = ppo.build_batch(s.policy, s.value, None, s.out, s.R, s.spec, TEMPERATURE, 0.0)
    opt = ppo.make_optimization(s.policy, s.value, s.spec)
    before = ppo.evaluate_batch(s.policy, s.value, batch.exp.tensors(), TEMPERATURE, 8)
    updates = ppo.update(s.policy, s.value, batch, s.spec, opt, 0, TEMPERATURE, 0.0)
    after = ppo.evaluate_batch(s.policy, s.value, batch.exp.tensors(), TEMPERATURE, 8)
    assert len(updates) == 1 and updates[0]["ppo/approx_kl"] == 0.0  # first step: ratio exactly 1
    # the surrogate's first-order change sum_t A_t * dlogp_t is positive
    assert ((after.logp - before.logp) * batch.exp.advantages).sum() > 0
    counted = batch.mask.bool()
    err = lambda v: (v - batch.returns)[counted].square().mean()  # noqa: E731
    assert err(after.values) < err(before.values)


def test_gradient_checkpointing_is_active_in_ppo_and_changes_no_metric(tmp_path: Path) -> None:
    """`model.gradient_checkpointing: true` recomputes the decoder layers of the policy and of a
    separate critic's trunk in PPO's updates, and every logged metric equals the run without it."""
    runs = run_with_and_without_checkpointing(lambda out: ppo_recipe(out, steps=2, critic="separate"), tmp_path, "rl")
    assert runs[False][1] == 0 and runs[True][1] > 0
    assert_same_metrics(runs[True][0], runs[False][0], atol=1e-6)


def test_kl_controller_follows_ziegler() -> None:
    ctl = ppo.KLController(beta=0.1, target=1.0, horizon=100)
    ctl.update(kl=3.0, n=10)  # error clipped to +0.2
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(kl=0.9, n=10)
    assert ctl.beta == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))
    fixed = ppo.KLController(beta=0.1, target=None, horizon=100)
    fixed.update(kl=5.0, n=10)
    assert fixed.beta == 0.1


# --------------------------------------------------------------------------- reward model


def _reward_model(tmp: Path, source: str, **config: Any) -> Path:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(source, **({"num_labels": 1} | config))
    out = tmp / "rm"
    rm.save_pretrained(out)
    return out


def test_critic_initialised_from_a_reward_model(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    mspec = ModelSpec(name="tiny:nano")
    source = prepare_base(mspec, tmp_path)
    rm_dir = _reward_model(tmp_path, source)
    rm_ref = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    with torch.no_grad():  # a trained trunk differs from the parent's
        for p in rm_ref.model.parameters():
            p.add_(0.01)
    rm_ref.save_pretrained(rm_dir)
    policy = attach_lora(load_model(source, mspec, CPU), LoraSpec(r=4))
    key = "stages.rl.reward_model"
    rm = critic.load_reward_model(critic.resolve_reward_model("rm", tmp_path, key), mspec, CPU, key)
    shared = critic.build_critic("shared", policy, source, mspec, LoraSpec(r=4), 0, rm)
    separate = critic.build_critic("separate", policy, source, mspec, LoraSpec(r=4), 0, rm)
    for c in (shared, separate):
        torch.testing.assert_close(c.head.weight, rm_ref.score.weight)
        assert c.head.bias.item() == 0.0  # Qwen2's score head has no bias
    trunk = critic.decoder(separate.trunk)
    torch.testing.assert_close(trunk.layers[0].mlp.down_proj.base_layer.weight, rm_ref.model.layers[0].mlp.down_proj.weight)
    assert not torch.equal(critic.decoder(policy).embed_tokens.weight, rm_ref.model.embed_tokens.weight)


def test_incompatible_reward_models_are_rejected_with_the_reason(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    mspec = ModelSpec(name="tiny:nano")
    source = prepare_base(mspec, tmp_path / "base")
    key = "stages.rl.reward_model"
    with pytest.raises(UserInputError, match="has 2 output labels; a critic needs a reward model with one"):
        critic.load_reward_model(str(_reward_model(tmp_path / "two", source, num_labels=2)), mspec, CPU, key)
    lm_dir = tmp_path / "lm"
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(lm_dir)
    with pytest.raises(UserInputError, match="no trained score head .*it is not a reward model"):
        critic.load_reward_model(str(lm_dir), mspec, CPU, key)
    small = prepare_base(ModelSpec(name="tiny:student"), tmp_path / "small")
    rm = critic.load_reward_model(str(_reward_model(tmp_path / "s", small)), mspec, CPU, key)
    policy = attach_lora(load_model(source, mspec, CPU), LoraSpec(r=4))
    with pytest.raises(UserInputError, match="hidden states of width 32, the policy's are 64"):
        critic.build_critic("shared", policy, source, mspec, LoraSpec(r=4), 0, rm)
    with pytest.raises(UserInputError, match="trunk of .* does not match the parent model's"):
        critic.build_critic("separate", policy, source, mspec, LoraSpec(r=4), 0, rm)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="not a model directory"):
        critic.resolve_reward_model("empty", tmp_path, key)


def test_missing_reward_model_fails_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = ppo_recipe(tmp_path, critic="separate", reward_model="./models/no_such_rm")
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert "stages.rl.reward_model: directory not found: ./models/no_such_rm" in err
    assert str(tmp_path / "models/no_such_rm") in err and "Traceback" not in err
    assert not (tmp_path / "p" / "rl" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- recipe checks


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mini_batches": 3}, "stages.rl.mini_batches: must split prompts_per_step*group_size = 4 completions"),
        ({"loss": {"beta": 0.0}}, "stages.rl.kl_target: must start from loss.beta > 0"),
        ({"loss": {"ratio": "sequence"}}, "stages.rl.loss: must use ratio: token; GSPO's sequence ratio"),
        ({"loss": {"kl_estimator": "k3"}}, "stages.rl.loss: must not set kl_estimator with kl_in: reward"),
        ({"critic": "seperate"}, "did you mean 'separate'"),
        ({"value_clip": 0}, "stages.rl.value_clip"),
        ({"lam": 1.5}, "stages.rl.lam"),
        ({"critic_lr": -1}, "stages.rl.critic_lr"),
    ],
)
def test_bad_ppo_configs_are_rejected(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = write_recipe(tmp_path / "r.yaml", ppo_recipe(tmp_path, **change))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value)
    assert f"{path}:" in str(err.value)


def test_loss_keys_not_given_keep_ppo_defaults() -> None:
    base = {"kind": "ppo", "data": "tiny:arith", "rewards": ["math_answer"]}
    spec = PPOSpec.model_validate(base | {"loss": {"eps_high": 0.28}})
    assert (spec.loss.kl_in, spec.loss.beta, spec.loss.eps_high) == ("reward", 0.05, 0.28)
    assert PPOSpec.model_validate(base).group_size == 1
    in_loss = PPOSpec.model_validate(base | {"loss": {"kl_in": "loss", "kl_estimator": "k3"}})
    assert in_loss.loss.kl_in == "loss"


# --------------------------------------------------------------------------- end to end


VARIANTS = {
    "shared_adaptive_kl": {},
    "separate": {"critic": "separate"},
    "kl_in_loss_early_stop": {"loss": {"kl_in": "loss", "beta": 0.1, "kl_estimator": "k3"}, "early_stop_kl": 1e-9,
                              "kl_target": None},
    "no_reference_groups_masked": {"loss": {"beta": 0.0, "mask_truncated": True}, "kl_target": None,
                                   "group_size": 2, "prompts_per_step": 2, "lam": 1.0,
                                   "sampling": {"max_new_tokens": 16, "stop": list("aeiou0123456789")}},
}
PPO_KEYS = ("reward/mean", "loss/policy", "loss/value", "loss/total", "grad_norm", "entropy", "clip/low", "clip/high",
            "clip/value", "value/explained_variance", "advantage/mean", "advantage/std", "returns/mean", "kl",
            "kl/beta", "ppo/approx_kl", "ppo/epochs_run", "time/generation", "time/experience", "time/policy")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_option_runs_with_finite_metrics(tmp_path: Path, variant: str) -> None:
    change = VARIANTS[variant]
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", ppo_recipe(tmp_path, **change | {"steps": 2})))]) == 0
    stage = tmp_path / "p" / "rl"
    rows = [r for r in _metrics(stage) if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for key in PPO_KEYS:
        assert all(isinstance(r[key], float | int) and math.isfinite(r[key]) for r in rows), (key, rows)
    epochs = [r["ppo/epochs_run"] for r in rows]
    assert epochs == ([1.0, 1.0] if "early_stop_kl" in change else [2.0, 2.0])
    assert rows[-1]["optimizer_steps"] == sum(epochs) * 2
    betas = [r["kl/beta"] for r in rows]
    assert (betas[1] != betas[0]) == (change.get("kl_target", 0.5) is not None)  # adaptive only with a target
    assert ("kl/loss" in rows[0]) == (change.get("loss", {}).get("kl_in") == "loss")
    final = stage / "final"
    assert (final / "model/model.safetensors").exists() and (final / "critic/value_head.safetensors").exists()
    assert (final / "critic/adapter/adapter_model.safetensors").exists() == (change.get("critic") == "separate")
    head = safetensors_load(final / "critic/value_head.safetensors")
    ckpt = safetensors_load(sorted(stage.glob("step-*"))[-1] / "critic.safetensors")
    assert torch.equal(head["weight"], ckpt["head.weight"]) and head["weight"].abs().sum() > 0


def safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(str(path))


def _kill_recipe(tmp: Path, name: str, kind: str) -> Path:
    return write_recipe(tmp / f"{name}.yaml", ppo_recipe(tmp / name, critic=kind))


def _outcome(out: Path) -> tuple:
    stage = out / "p" / "rl"
    metric_rows = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in _metrics(stage)]
    critic_files = {f.name: sha(f) for f in sorted((stage / "final/critic").rglob("*.safetensors"))}
    return final_hashes(stage), critic_files, newest_checkpoint_tensors(stage), metric_rows, sha(stage / "samples.jsonl")


def test_kill9_inside_a_ppo_epoch_resumes_bitwise(tmp_path: Path) -> None:
    """RELIABILITY.md test 2 for PPO: 4 rollout batches x 2 epochs x 2 mini-batches of 2 micro-batches;
    SIGKILL after micro-batch j of optimizer step k (random k, j: gradients half accumulated, or
    all accumulated and not yet applied), resume: weights, value head (and a separate critic's
    adapter), optimizer, adaptive beta and metrics bitwise equal, N/N."""
    server = get_server()
    expected = {}
    for kind in ("shared", "separate"):
        assert server.start(main, (["run", str(_kill_recipe(tmp_path, f"ref-{kind}", kind))],)).wait().returncode == 0
        expected[kind] = _outcome(tmp_path / f"ref-{kind}")
    assert len({r["kl/beta"] for r in expected["shared"][3] if "kl/beta" in r}) == 4  # beta adapted every batch
    rng = random.Random(3)
    n, passed, killed = reliability_n(), 0, 0
    for i in range(n):
        kind = ("shared", "separate")[i % 2]
        recipe = _kill_recipe(tmp_path, f"k{i}", kind)
        k, j = rng.randint(1, 16), rng.randint(1, 2)
        result = server.start(main, (["run", str(recipe)],), env={"RLFT_FAULT": f"micro_batch:{k}:{j}"}).wait()
        killed += result.returncode == -9
        res = server.start(main, (["stage", "rl", "--recipe", str(recipe), "--resume"],)).wait()
        assert res.returncode == 0, res.output
        passed += _outcome(tmp_path / f"k{i}") == expected[kind]
    record_result("test_kill9_inside_a_ppo_epoch_resumes_bitwise", passed, n, killed=killed)
    assert killed == n
    assert passed == n


@pytest.mark.slow
def test_tiny_ppo_recipe_learns_and_its_critic_explains_the_returns(tmp_path: Path) -> None:
    """recipes/tiny-ppo.yaml end to end (about two minutes on one core): reward rises, and the
    value head's explained variance over the last 10% of steps is positive."""
    root = Path(__file__).resolve().parents[1]
    assert main(["run", str(root / "recipes/tiny-ppo.yaml"), "--set", f"output_dir={tmp_path}"]) == 0
    rows = [r for r in _metrics(tmp_path / "tiny-ppo" / "rl") if "reward/mean" in r]
    k = len(rows) // 10
    rewards = [r["reward/mean"] for r in rows]
    assert sum(rewards[-k:]) / k > sum(rewards[:k]) / k + 0.05, rewards
    explained = [r["value/explained_variance"] for r in rows[-k:]]
    assert all(isinstance(v, float) for v in explained) and sum(explained) / k > 0, explained
    summary = json.loads((tmp_path / "tiny-ppo" / "rl" / "final" / "metrics.json").read_text())
    assert summary["value/explained_variance_last"] == pytest.approx(sum(explained) / k)
    assert (tmp_path / "tiny-ppo/rl/alarms.jsonl").read_text() == ""  # a healthy run: no default alarm fires
