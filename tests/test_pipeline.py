"""The whole R1 pipeline through `rlft run`: every stage kind feeds the next, finished stages are
skipped, and kills anywhere followed by reruns reproduce an uninterrupted run byte for byte
(RELIABILITY.md test 5)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from forkserver import get_server, record_result
from helpers import sha, write_recipe

from rlft.cli import main

ARITH = {"source": "tiny:arith", "num_examples": 300, "eval_size": 40, "max_length": 128}
SAMPLING = {"temperature": 1.0, "max_new_tokens": 48}


def small_r1(output_dir: Path) -> dict[str, Any]:
    """tiny-r1's stage graph at a size that runs in well under a minute."""
    train = {"batch_size": 16, "lr": 1e-2, "save_every": 5, "eval_samples": 16, "eval_max_new_tokens": 48}
    return {
        "run_name": "p",
        "output_dir": str(output_dir),
        "model": {"name": "tiny:nano"},
        "lora": {"r": 8, "alpha": 16, "targets": "all-linear", "modules_to_save": ["embed_tokens"]},
        "stages": {
            "cold_start": {"kind": "sft", "data": ARITH, "max_steps": 40} | train,
            "rl": {"kind": "grpo", "from": "cold_start", "data": ARITH, "rewards": ["task_verifier", "tag_count"],
                   "steps": 4, "prompts_per_step": 4, "group_size": 4, "micro_batch_size": 16, "lr": 3e-3,
                   "sampling": SAMPLING, "save_every": 1, "eval_samples": 16,
                   "lora": {"r": 8, "alpha": 16, "targets": "all-linear"}},
            "sample": {"kind": "sample", "from": "rl", "data": ARITH, "rewards": ["tag_count"], "threshold": 0.5,
                       "per_prompt": 2, "keep": "correct", "shard_size": 64, "batch_size": 32, "sampling": SAMPLING},
            "retrain": {"kind": "sft", "from": "base", "data": [{"source": "sample", "eval_size": 8}, ARITH],
                        "max_steps": 20} | train,
            "distill": {"kind": "distill", "teacher": "rl", "student": {"name": "tiny:student"}, "lora": "full",
                        "mode": "logits", "data": [{"source": "sample", "eval_size": 8}], "max_steps": 10} | train,
            "eval": {"kind": "eval", "models": ["cold_start", "retrain", "distill"], "data": ARITH, "k": 2,
                     "num_prompts": 16, "rewards": ["task_verifier"], "sampling": SAMPLING},
        },
    }


STAGES = ["cold_start", "rl", "sample", "retrain", "distill", "eval"]
OUTPUTS = ["retrain/final/model/model.safetensors", "distill/final/model/model.safetensors",
           "sample/final/data.jsonl", "rl/final/model/model.safetensors"]


def _outputs(run: Path) -> dict[str, str]:
    return {name: sha(run / name) for name in OUTPUTS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("pipe")
    get_server()
    t0 = time.monotonic()
    result = get_server().start(main, (["run", str(write_recipe(out / "r.yaml", small_r1(out)))],)).wait(600)
    assert result.returncode == 0, result.output
    return out / "p", time.monotonic() - t0


def test_every_stage_feeds_the_next_and_the_table_is_saved(reference: tuple[Path, float]) -> None:
    run, _ = reference
    for stage in STAGES:
        assert (run / stage / "stage.done.json").exists(), stage
    sampled = [json.loads(line) for line in (run / "sample/final/data.jsonl").read_text().splitlines()]
    assert sampled and all(r["messages"][-1]["role"] == "assistant" for r in sampled)
    results = json.loads((run / "results.json").read_text())
    rows = {(r["stage"], r["model"], r["metric"]) for r in results}
    assert ("eval", "distill", "pass@2") in rows and ("rl", "rl", "reward/mean_last") in rows
    assert "| eval | retrain | greedy |" in (run / "results.md").read_text()


def test_rerun_skips_every_finished_stage(reference: tuple[Path, float], capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = reference
    before = {s: (run / s / "stage.done.json").stat().st_mtime_ns for s in STAGES}
    t0 = time.monotonic()
    assert main(["run", str(run.parent / "r.yaml")]) == 0
    assert time.monotonic() - t0 < 30
    assert {s: (run / s / "stage.done.json").stat().st_mtime_ns for s in STAGES} == before


@pytest.mark.slow
def test_pipeline_kill_and_rerun(tmp_path: Path, reference: tuple[Path, float]) -> None:
    """Test 5: SIGKILL the pipeline at 10 random instants across its stages, rerunning the same
    command after each; the final weights and sampled data are byte-equal to the uninterrupted
    run and no committed stage ever runs again."""
    ref_run, duration = reference
    recipe = write_recipe(tmp_path / "r.yaml", small_r1(tmp_path))
    run = tmp_path / "p"
    rng = random.Random(5)
    kills, rerun_stages, done_at = 0, 0, {}
    while kills < 10:
        result = get_server().start(main, (["run", str(recipe)],)).kill_after(rng.uniform(0.04, 0.2) * duration, 600)
        kills += result.killed
        for stage in STAGES:
            marker = run / stage / "stage.done.json"
            if marker.exists():
                mtime = marker.stat().st_mtime_ns
                rerun_stages += stage in done_at and done_at[stage] != mtime
                done_at.setdefault(stage, mtime)
        if not result.killed:
            break
    result = get_server().start(main, (["run", str(recipe)],)).wait(600)
    assert result.returncode == 0, result.output
    same = _outputs(run) == _outputs(ref_run)
    record_result("test_pipeline_kill_and_rerun", int(same), 1, kills=kills, committed_stages_rerun=rerun_stages)
    assert kills >= 5, f"only {kills} kills landed before the pipeline finished"
    assert rerun_stages == 0
    assert same, (_outputs(run), _outputs(ref_run))


def test_a_torn_done_marker_reruns_the_stage_instead_of_crashing(tmp_path: Path) -> None:
    from helpers import sft_recipe

    recipe = write_recipe(tmp_path / "r.yaml", sft_recipe(tmp_path, max_steps=2))
    assert main(["run", str(recipe)]) == 0
    marker = tmp_path / "t" / "sft" / "stage.done.json"
    marker.write_text('{"stage": "sf')  # as a disk error could leave it
    assert main(["run", str(recipe)]) == 0
    assert json.loads(marker.read_text())["stage"] == "sft"
