"""Training-health alarms: each one fired by a planted fault in a tiny GRPO run (and named in
alarms.jsonl; the KL, clip and unparsed ones also in a tiny PPO run, beside a healthy PPO control), a `stop` alarm saves a checkpoint and exits 4 naming the alarm and the step, the
report marks it, and changing an alarm never counts as a changed input. That the defaults stay
quiet on the healthy shipped recipes is checked by the slow end-to-end runs of tiny-grpo.yaml
(test_stage_grpo.py) and tiny-r1.yaml (test_rundir.py), whose runs take minutes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import rlft, write_recipe
from test_report_html import tiny_grpo

from rlft.cli import main
from rlft.errors import RecipeError
from rlft.recipe.alarm_spec import AlarmsSpec
from rlft.recipe.load import load_recipe
from rlft.rl.alarms import reward_hacking, unparsed_stats

REWARDS = (
    "def const(prompts, completions, **kw):\n    return [0.5 for c in completions]\n"
    "def picky(prompts, completions, **kw):\n    return [1.0 if '<answer>' in c else None for c in completions]\n"
    "def digits(prompts, completions, **kw):\n    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]\n"
)

# planted fault -> (the stage's settings, the alarm it must fire)
FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    # full fine-tuning at lr 0.5 without clipping: the policy turns deterministic within a few steps
    "lr_collapses_entropy": ({"rewards": ["r.py:digits"], "lora": "full", "lr": 0.5, "max_grad_norm": None,
                              "steps": 8, "loss": {"beta": 0.0}}, "entropy_collapse"),
    # LoRA at lr 0.1 with a KL penalty: the policy leaves the reference at once
    "lr_spikes_kl": ({"rewards": ["r.py:digits"], "lr": 0.1, "steps": 3, "loss": {"beta": 0.05}}, "kl_spike"),
    # four passes over each round at lr 0.1 (full fine-tuning): the ratio leaves the clip range
    "mu4_blows_ratio": ({"rewards": ["r.py:digits"], "lora": "full", "lr": 0.1, "num_iterations": 4, "steps": 2,
                         "loss": {"beta": 0.0}}, "clip_blowup"),
    # a reward that never varies: no group carries a signal
    "constant_reward": ({"rewards": ["r.py:const"], "steps": 5}, "zero_variance"),
    # the random base never writes an <answer>: task_verifier cannot read one
    "no_answers": ({"rewards": ["task_verifier", "r.py:digits"], "steps": 3}, "unparsed"),
    # a user reward that returns None (none_as: skip) where it finds no <answer>: the same alarm
    "user_reward_abstains": ({"rewards": ["r.py:digits", {"name": "r.py:picky", "options": {"none_as": "skip"}}],
                              "steps": 3}, "unparsed"),
}


def _alarms(stage_dir: Path) -> list[dict[str, Any]]:
    path = stage_dir / "alarms.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_planted_fault_fires_its_alarm(fault: str, tmp_path: Path) -> None:
    settings, alarm = FAULTS[fault]
    (tmp_path / "r.py").write_text(REWARDS)
    recipe = tiny_grpo(tmp_path / "runs", eval_every=0, **settings)
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0  # warn: the stage finishes
    fired = {a["alarm"]: a for a in _alarms(tmp_path / "runs/rep/rl")}
    assert alarm in fired, fired
    assert fired[alarm]["action"] == "warn" and fired[alarm]["step"] >= 1 and fired[alarm]["message"]
    rows = [json.loads(line) for line in (tmp_path / "runs/rep/rl/metrics.jsonl").read_text().splitlines()]
    assert fired[alarm]["step"] in {r["step"] for r in rows}  # judged on a logged step


def tiny_ppo(output_dir: Path, **rl: Any) -> dict[str, Any]:
    spec = {"kind": "ppo", "data": {"source": "tiny:arith", "num_examples": 64, "eval_size": 4, "max_length": 128},
            "rewards": ["r.py:digits"], "steps": 4, "prompts_per_step": 4, "ppo_epochs": 1, "mini_batches": 1,
            "micro_batch_size": 4, "lr": 1e-2, "sampling": {"temperature": 1.0, "max_new_tokens": 16},
            "loss": {"beta": 0.05}, "save_every": 100, "eval_every": 0} | rl
    return tiny_grpo(output_dir) | {"stages": {"rl": spec}}


# the same faults in PPO (a critic, the KL in the reward); "healthy" is the control: lr 1e-2 fires nothing
PPO_FAULTS: dict[str, tuple[dict[str, Any], str | None]] = {
    "lr_spikes_kl": ({"lr": 0.1, "steps": 3}, "kl_spike"),
    "epochs4_blow_ratio": ({"lora": "full", "lr": 0.1, "ppo_epochs": 4, "steps": 2, "loss": {"beta": 0.0}}, "clip_blowup"),
    "no_answers": ({"rewards": ["task_verifier", "r.py:digits"], "steps": 3}, "unparsed"),
    "healthy": ({}, None),
}


@pytest.mark.parametrize("fault", sorted(PPO_FAULTS))
def test_planted_fault_fires_its_alarm_in_ppo(fault: str, tmp_path: Path) -> None:
    settings, alarm = PPO_FAULTS[fault]
    (tmp_path / "r.py").write_text(REWARDS)
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", tiny_ppo(tmp_path / "runs", **settings)))]) == 0
    fired = {a["alarm"]: a for a in _alarms(tmp_path / "runs/rep/rl")}
    if alarm is None:
        assert fired == {}
        assert (tmp_path / "runs/rep/rl/alarms.jsonl").is_file()  # checked, and nothing fired
    else:
        assert alarm in fired, fired
        assert fired[alarm]["action"] == "warn" and fired[alarm]["step"] >= 1 and fired[alarm]["message"]


def test_stop_alarm_saves_exits_4_and_the_report_marks_it(tmp_path: Path) -> None:
    (tmp_path / "r.py").write_text(REWARDS)
    recipe = tiny_grpo(tmp_path / "runs", rewards=["r.py:const"], steps=8, eval_every=0, save_every=4,
                       alarms={"zero_variance": {"action": "stop", "window": 3}})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = rlft("run", str(path))
    assert proc.returncode == 4, proc.stderr
    line = " ".join(proc.stderr.split())
    assert "stage rl: alarm zero_variance at step 3: zero-variance groups 1" in line and "Traceback" not in line
    stage = tmp_path / "runs/rep/rl"
    assert (stage / "step-00000003/manifest.json").is_file() and not (stage / "stage.done.json").exists()
    assert [(a["alarm"], a["step"], a["action"]) for a in _alarms(stage)] == [("zero_variance", 3, "stop")]
    report = rlft("report", str(tmp_path / "runs/rep"))
    assert report.returncode == 0, report.stderr
    plots = json.loads((tmp_path / "runs/rep/report/plots.json").read_text())
    assert plots["rl/reward"]["alarms"][0]["step"] == 3 and plots["rl/reward"]["alarms"][0]["alarm"] == "zero_variance"
    page = (tmp_path / "runs/rep/report/index.html").read_text()
    assert "<b>stop</b> zero_variance at step 3" in page and "stopped by alarm" in page
    # the alarm is not an input: a rerun with it as a warning resumes from step 3 and finishes
    again = rlft("run", str(path), "--set", "stages.rl.alarms.zero_variance.action=warn")
    assert again.returncode == 0, again.stderr
    assert (stage / "stage.done.json").is_file()
    assert [a["step"] for a in _alarms(stage)] == [3]  # fired once per stage


def test_alarm_keys_are_checked(tmp_path: Path) -> None:
    recipe = tiny_grpo(tmp_path / "runs", alarms={"entropy_colapse": {"action": "stop"}, "kl_spike": {"action": "halt"}})
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    text = str(err.value)
    assert "stages.rl.alarms.entropy_colapse" in text and "did you mean 'entropy_collapse'" in text
    assert "stages.rl.alarms.kl_spike.action" in text


def _rows(evals: dict[int, float], rewards: dict[int, float]) -> list[dict[str, Any]]:
    steps = sorted(set(evals) | set(rewards))
    return [{"step": s, **({"reward/mean": rewards[s]} if s in rewards else {}),
             **({"eval/accuracy": evals[s]} if s in evals else {})} for s in steps]


def test_reward_hacking_rule() -> None:
    rule = AlarmsSpec().reward_hacking
    rising = {s: 0.2 + 0.05 * s for s in range(1, 11)}
    assert reward_hacking(rule, _rows({0: 0.5, 5: 0.55, 10: 0.3}, rising))  # reward up, accuracy down
    assert reward_hacking(rule, _rows({0: 0.5, 5: 0.55, 10: 0.6}, rising)) is None  # both up: healthy
    assert reward_hacking(rule, _rows({0: 0.5, 10: 0.3}, dict.fromkeys(range(1, 11), 0.4))) is None  # reward flat
    assert reward_hacking(rule, _rows({0: 0.5, 10: 0.45}, rising)) is None  # within min_accuracy_drop


def test_unparsed_counts_per_answer_reward() -> None:
    texts = ["<answer>12</answer>", "the sum is 7", "no answer here"]
    stats = unparsed_stats(["task_verifier", "math_answer", "think_format", "my.py:fn"], texts)
    # task_verifier reads only <answer> tags; math_answer also a bare last number
    assert stats == {"unparsed/task_verifier": pytest.approx(2 / 3), "unparsed/math_answer": pytest.approx(1 / 3)}


def test_unparsed_of_a_reward_that_abstains_leaves_errors_out() -> None:
    from types import SimpleNamespace

    import torch

    from rlft.recipe.schema import RewardEntry
    from rlft.rl.alarms import abstained_stats, abstaining_rewards

    entries = [RewardEntry(name="my.py:fn", options={"none_as": "skip"}), RewardEntry(name="other.py:fn"),
               RewardEntry(name="task_verifier", options={"none_as": "skip"})]
    assert abstaining_rewards(entries) == ["my.py:fn"]  # task_verifier is counted from the text
    nan = float("nan")
    result = SimpleNamespace(per_function={"my.py:fn": torch.tensor([nan, nan, nan, 1.0])}, errors={"my.py:fn": 1})
    assert abstained_stats(["my.py:fn"], result) == {"unparsed/my.py:fn": 0.5}  # 3 NaN, 1 of them an error
