"""GRPO end to end on the tiny model: every loss/advantage option runs and logs sane metrics,
bad configurations are rejected, the reference is the adapter-disabled policy, resume after a
SIGKILL inside a generation window is bitwise (RELIABILITY.md test 2)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
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

from rlft.cli import main
from rlft.errors import RecipeError
from rlft.recipe.load import load_recipe


def grpo_recipe(output_dir: Path, **rl: Any) -> dict[str, Any]:
    """GRPO straight from the random tiny base, with a dense reward (length shaping) so every
    group carries a signal and the updates are real."""
    spec = {
        "kind": "grpo",
        "data": {"source": "tiny:arith", "num_examples": 64, "eval_size": 4, "max_length": 128},
        "rewards": [{"name": "overlong_penalty", "options": {"max_len": 12, "cache_len": 10}}],
        "steps": 4,
        "prompts_per_step": 2,
        "group_size": 4,
        "micro_batch_size": 4,
        "lr": 1e-2,
        "sampling": {"temperature": 1.0, "max_new_tokens": 16},
        "save_every": 1,
        "eval_samples": 4,
        "eval_max_new_tokens": 8,
        "log_samples_every": 1,
    } | rl
    return {
        "run_name": "g",
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"name": "tiny:nano"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "all-linear"},
        "stages": {"rl": spec},
    }


def _metrics(stage: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


VARIANTS = {
    "default": {},
    "kl_in_loss_mu2_minibatch2": {"loss": {"beta": 0.1}, "num_iterations": 2, "mini_batches": 2},
    "kl_in_reward_rloo": {"loss": {"beta": 0.1, "kl_in": "reward", "kl_estimator": "k1"}, "advantage": {"estimator": "rloo"}},
    "reinforce_pp_k2": {"loss": {"beta": 0.05, "kl_estimator": "k2"}, "advantage": {"estimator": "reinforce_pp"}},
    "gspo_sequence_agg": {"loss": {"ratio": "sequence", "aggregate": "sequence", "eps_low": 3e-4, "eps_high": 4e-4},
                          "num_iterations": 2},
    "dr_grpo_dual_clip": {"loss": {"aggregate": "constant", "dual_clip": 3.0, "eps_high": 0.28, "mask_truncated": True},
                          "advantage": {"scale": "none"}, "old_logp": "recompute"},
    "dynamic_sampling_is_kl": {"dynamic_sampling": {"enabled": True, "max_rounds": 2},
                               "loss": {"beta": 0.1, "importance_sampling_kl": True}, "num_iterations": 2},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_option_runs_with_finite_metrics(tmp_path: Path, variant: str) -> None:
    recipe = grpo_recipe(tmp_path, **VARIANTS[variant] | {"steps": 2})
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    stage = tmp_path / "g" / "rl"
    rows = [r for r in _metrics(stage) if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "reward/std", "loss/policy", "grad_norm", "entropy", "clip/low", "clip/high",
                "completion/len_mean", "completion/truncated", "groups/zero_variance", "time/generation",
                "time/policy", "reward/overlong_penalty", "reward/error_rate"):
        assert all(isinstance(r[key], float | int) and math.isfinite(r[key]) for r in rows), (key, rows)
    if VARIANTS[variant].get("loss", {}).get("beta", 0) and VARIANTS[variant]["loss"].get("kl_in", "loss") == "loss":
        assert all("kl" in r for r in rows)
    assert rows[-1]["optimizer_steps"] == 2 * VARIANTS[variant].get("mini_batches", 1) * VARIANTS[variant].get(
        "num_iterations", 1)
    samples = (stage / "samples.jsonl").read_text().splitlines()
    assert samples and "completion" in json.loads(samples[0])
    assert (stage / "final/model/model.safetensors").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"group_size": 1}, "stages.rl.group_size: must be >= 2"),
        ({"num_iterations": 2, "old_logp": "detach"}, "old_logp: detach is only exact when fully on-policy"),
        ({"mini_batches": 3}, "must split evenly into mini_batches"),
        ({"loss": {"dual_clip": 0.5}}, "stages.rl.loss.dual_clip"),
        ({"loss": {"aggregate": "tokens"}}, "did you mean 'token'"),
        ({"rewards": ["math_answr"]}, "did you mean 'math_answer'"),
        ({"loss": {"beta": 0.1, "kl_in": "reward", "kl_estimator": "k3"}},
         "stages.rl.loss: must not set kl_estimator with kl_in: reward: the KL in the reward is k1"),
    ],
)
def test_bad_grpo_configs_are_rejected(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = write_recipe(tmp_path / "r.yaml", grpo_recipe(tmp_path, **change))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value)
    assert f"{path}:" in str(err.value)


def test_kl_estimator_beside_kl_in_reward_is_one_line_exit_2(tmp_path: Path) -> None:
    """Through the console script: the GRPO recipe's file:line, the key and why, no traceback."""
    recipe = grpo_recipe(tmp_path, loss={"beta": 0.1, "kl_in": "reward", "kl_estimator": "k2"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = subprocess.run([str(Path(sys.executable).with_name("rlft")), "validate", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    line, col = next((n, len(t) - len(t.lstrip()) + 1) for n, t in enumerate(path.read_text().splitlines(), 1)
                     if t.strip() == "loss:")
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}:{line}:{col}  stages.rl.loss: must not set kl_estimator with kl_in: reward: the KL in the reward "
        "is k1 = logp - ref_logp (Ziegler et al. 2019); the other estimators apply with kl_in: loss"]


def test_console_script_run_prints_no_library_warnings(tmp_path: Path) -> None:
    """`rlft run` of a GRPO stage (sampling, KL reference, gradient checkpointing, checkpoints) prints
    no FutureWarning or DeprecationWarning of transformers/peft/torch, even with DeprecationWarnings shown."""
    recipe = grpo_recipe(tmp_path, steps=1, loss={"beta": 0.1}, sampling={"max_new_tokens": 8})
    recipe["model"]["gradient_checkpointing"] = True
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"PYTHONWARNINGS": "default::DeprecationWarning"}
    rlft = Path(sys.executable).with_name("rlft")
    proc = subprocess.run([str(rlft), "run", str(write_recipe(tmp_path / "r.yaml", recipe))], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    for word in ("FutureWarning", "DeprecationWarning", "deprecated"):
        assert word not in output, output
    assert "stage rl (grpo)" in output  # the run's own report did print


def test_gradient_checkpointing_is_active_in_grpo_and_changes_no_metric(tmp_path: Path) -> None:
    """`model.gradient_checkpointing: true` recomputes the policy's decoder layers in GRPO's updates
    (the stage keeps the policy in its dropout-free mode), and every logged metric equals the run
    without it: reward, loss, gradient norm, KL, entropy, held-out accuracy. To float rounding: the
    checkpointed layers drop the KV cache, so the policy's forward there is one plain forward per
    row instead of the shared-prompt one (rollout.completion_logprobs)."""
    runs = run_with_and_without_checkpointing(
        lambda out: grpo_recipe(out, steps=2, loss={"beta": 0.1}, num_iterations=2), tmp_path, "rl")
    assert runs[False][1] == 0 and runs[True][1] > 0
    assert_same_metrics(runs[True][0], runs[False][0], atol=1e-5)


def test_reference_is_the_adapter_disabled_policy(tmp_path: Path) -> None:
    """ref_logp under `reference_mode` equals the base model's log-probs, with LoRA trained."""
    from rlft import rollout
    from rlft.models import attach_lora, load_model, load_tokenizer, prepare_base, reference_mode
    from rlft.recipe.schema import LoraSpec, ModelSpec
    spec = ModelSpec(name="tiny:nano")
    source = prepare_base(spec, tmp_path)
    tok = load_tokenizer(source, spec)
    base = load_model(source, spec, torch.device("cpu"))
    policy = attach_lora(load_model(source, spec, torch.device("cpu")), LoraSpec(r=4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # make the adapter matter
    out = rollout.generate(policy, tok, [tok("What is 1+1?").input_ids], rollout.SamplingParams(max_new_tokens=8), 2,
                           rollout.seed_generator(0))
    with torch.no_grad():
        lp_base = rollout.completion_logprobs(base, out, 1.0)
        lp_policy = rollout.completion_logprobs(policy, out, 1.0)
        with reference_mode(policy) as ref:
            lp_ref = rollout.completion_logprobs(ref, out, 1.0)
    torch.testing.assert_close(lp_ref, lp_base)
    assert not torch.allclose(lp_policy, lp_base)


def test_log_every_writes_every_nth_round_and_the_last_and_resumes_bitwise(tmp_path: Path) -> None:
    """`log_every: 2` over 5 rounds writes rounds 2, 4 and the last, 5 (beside the start's eval; a
    round with a held-out eval is always written); SIGKILL after round 3 (checkpoint at 2, round 3
    unlogged) and a resume give the uninterrupted run's metrics, samples and weights, bitwise."""
    server = get_server()

    def recipe(name: str) -> Path:
        spec = grpo_recipe(tmp_path / name, steps=5, log_every=2, save_every=2, eval_every=3)
        return write_recipe(tmp_path / f"{name}.yaml", spec)

    assert server.start(main, (["run", str(recipe("ref"))],)).wait().returncode == 0
    rows = _metrics(tmp_path / "ref" / "g" / "rl")
    assert [r["step"] for r in rows] == [0, 2, 3, 4, 5]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 3, 5]
    assert all("reward/mean" in r and "loss/policy" in r for r in rows[1:])
    killed = server.start(main, (["run", str(recipe("k"))],), env={"RLFT_FAULT": "kill_step:3"}).wait()
    assert killed.returncode == -9
    assert [r["step"] for r in _metrics(tmp_path / "k" / "g" / "rl")] == [0, 2, 3]
    resumed = server.start(main, (["stage", "rl", "--recipe", str(recipe("k")), "--resume"],)).wait()
    assert resumed.returncode == 0, resumed.output
    assert _grpo_outcome(tmp_path / "k") == _grpo_outcome(tmp_path / "ref")


def _grpo_kill_recipe(tmp: Path, name: str) -> Path:
    recipe = grpo_recipe(tmp / name, mini_batches=2, num_iterations=2, loss={"beta": 0.05})
    return write_recipe(tmp / f"{name}.yaml", recipe)


def _grpo_outcome(out: Path) -> tuple:
    stage = out / "g" / "rl"
    metric_rows = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in _metrics(stage)]
    return final_hashes(stage), newest_checkpoint_tensors(stage), metric_rows, sha(stage / "samples.jsonl")


def test_kill9_grpo_resume_bitwise(tmp_path: Path) -> None:
    """RELIABILITY.md test 2: 4 generations, 2 optimizer steps per generation, mu = 2; SIGKILL at
    random instants (most inside a generation window), resume: bitwise equal N/N."""
    server = get_server()
    ref = _grpo_kill_recipe(tmp_path, "ref")
    t0 = time.monotonic()
    assert server.start(main, (["run", str(ref)],)).wait().returncode == 0
    duration = time.monotonic() - t0
    expected = _grpo_outcome(tmp_path / "ref")
    rng = random.Random(2)
    n, passed, mid_window = reliability_n(), 0, 0
    for i in range(n):
        recipe = _grpo_kill_recipe(tmp_path, f"k{i}")
        result = server.start(main, (["run", str(recipe)],)).kill_after(rng.uniform(0.3, 0.95) * duration)
        stage = tmp_path / f"k{i}" / "g" / "rl"
        logged = [r["step"] for r in _metrics(stage) if "reward/mean" in r] if (stage / "metrics.jsonl").exists() else []
        saved = sorted(stage.glob("step-*"))
        # killed between committing generation k and logging generation k+1: inside a window
        mid_window += result.killed and (not saved or int(saved[-1].name[5:]) == (max(logged) if logged else 0))
        res = server.start(main, (["stage", "rl", "--recipe", str(recipe), "--resume"],)).wait()
        assert res.returncode == 0, res.output
        passed += _grpo_outcome(tmp_path / f"k{i}") == expected
    record_result("test_kill9_grpo_resume_bitwise", passed, n, mid_window_kills=mid_window)
    assert mid_window >= n // 2, f"only {mid_window}/{n} kills landed inside a generation window"
    assert passed == n


def test_one_update_moves_logp_along_the_advantage(tmp_path: Path) -> None:
    """After one GRPO update, completions with A > 0 became more likely and A < 0 less likely."""
    from rlft import rollout
    from rlft.models import attach_lora, load_model, load_tokenizer, prepare_base
    from rlft.recipe.schema import GRPOSpec, LoraSpec, ModelSpec
    from rlft.rl import learner
    from rlft.stages.grpo import build_experience
    from rlft.training import NanGuard, make_optimizer

    mspec = ModelSpec(name="tiny:nano")
    source = prepare_base(mspec, tmp_path)
    tok = load_tokenizer(source, mspec)
    torch.manual_seed(0)
    policy = attach_lora(load_model(source, mspec, torch.device("cpu")), LoraSpec(r=4)).eval()
    spec = GRPOSpec.model_validate({"kind": "grpo", "data": "tiny:arith", "rewards": ["math_answer"], "group_size": 4,
                                    "prompts_per_step": 2, "micro_batch_size": 3, "lr": 1e-3})
    sampling = rollout.SamplingParams(max_new_tokens=12)
    prompts = [tok("What is 1+1?").input_ids, tok("Reverse: abc").input_ids]
    out = rollout.generate(policy, tok, prompts, sampling, 4, rollout.seed_generator(3))
    R = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    exp = build_experience(policy, None, out, R, spec, sampling, _NoTimer())
    with torch.no_grad():
        before = rollout.completion_logprobs(policy, out, 1.0).sum(-1)
    learner.update(policy, make_optimizer(policy, spec), exp, spec, NanGuard("skip", 3), 0, 1.0, lambda s: 1e-3)
    with torch.no_grad():
        delta = rollout.completion_logprobs(policy, out, 1.0).sum(-1) - before
    assert (delta[exp.advantages > 0] > 0).all(), (delta, exp.advantages)
    assert (delta[exp.advantages < 0] < 0).all(), (delta, exp.advantages)


class _NoTimer:
    def lap(self, name: str) -> None:
        pass


# Measured with recipes/tiny-grpo.yaml on this machine (OMP_NUM_THREADS=1), held-out greedy
# accuracy on 256 rows, cold start -> after 200 GRPO steps, seeds 0-3: 0.426 -> 0.570,
# 0.355 -> 0.402, 0.566 -> 0.758, 0.348 -> 0.488 (+14.5, +4.7, +19.1, +14.1 points; mean reward
# 0.24 -> 0.45, 0.24 -> 0.42, 0.29 -> 0.57, 0.19 -> 0.40). The margin asserted is below the
# smallest gain seen; the recipe runs with seed 0.
MIN_GAIN = 0.03


@pytest.mark.slow
def test_tiny_grpo_recipe_beats_its_cold_start(tmp_path: Path) -> None:
    """recipes/tiny-grpo.yaml end to end: reward rises and held-out accuracy after GRPO exceeds
    the cold-start model's by MIN_GAIN (about four minutes on one core)."""
    root = Path(__file__).resolve().parents[1]
    assert main(["run", str(root / "recipes/tiny-grpo.yaml"), "--set", f"output_dir={tmp_path}"]) == 0
    cold = _metrics(tmp_path / "tiny-grpo" / "cold_start")
    rl_rows = _metrics(tmp_path / "tiny-grpo" / "rl")
    evals = [r for r in rl_rows if "eval/accuracy" in r]
    cold_acc = [r for r in cold if "eval/accuracy" in r][-1]["eval/accuracy"]
    assert evals[0]["step"] == 0 and evals[0]["eval/accuracy"] == cold_acc  # fresh adapter = cold start
    assert evals[-1]["eval/accuracy"] >= cold_acc + MIN_GAIN, (cold_acc, evals)
    rewards = [r["reward/mean"] for r in rl_rows if "reward/mean" in r]
    k = len(rewards) // 10
    assert sum(rewards[-k:]) / k > sum(rewards[:k]) / k + 0.1, rewards
    assert (tmp_path / "tiny-grpo/rl/alarms.jsonl").read_text() == ""  # a healthy run: no default alarm fires
