"""Small helpers shared by the end-to-end tests: write a recipe, run the CLI, read run outputs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def sft_recipe(output_dir: Path, **stage: Any) -> dict[str, Any]:
    """A tiny SFT recipe: LoRA with dropout, shuffling, accumulation, a checkpoint every step."""
    spec = {
        "kind": "sft",
        "data": {"source": "tiny:arith", "num_examples": 48, "eval_size": 8, "max_length": 128},
        "epochs": 2,
        "batch_size": 8,
        "micro_batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 2,
        "save_every": 1,
        "keep_last": 2,
        "eval_samples": 8,
        "eval_max_new_tokens": 8,
    } | stage
    return {
        "run_name": "t",
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"name": "tiny:nano"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "targets": "all-linear"},
        "stages": {"sft": spec},
    }


def metrics(stage_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(stage_dir: Path) -> list[tuple[int, Any]]:
    return [(r["step"], r["loss"]) for r in metrics(stage_dir) if "loss" in r]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def final_hashes(stage_dir: Path) -> dict[str, str]:
    """sha256 of the stage's weights: merged model and (for LoRA) the adapter."""
    files = [stage_dir / "final/model/model.safetensors", stage_dir / "final/adapter/adapter_model.safetensors"]
    return {f.name: sha(f) for f in files if f.exists()}


def newest_checkpoint_tensors(stage_dir: Path) -> dict[str, str]:
    """sha256 of each tensor file of the newest committed checkpoint (params, optimizer, rng)."""
    newest = sorted(stage_dir.glob("step-*"))[-1]
    return {f.name: sha(f) for f in sorted(newest.glob("*.safetensors"))}


def rlft(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The installed `rlft` console script in a fresh process (offline, one thread)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | (env or {})
    script = Path(sys.executable).parent / "rlft"
    return subprocess.run([str(script), *args], env=full_env, capture_output=True, text=True, timeout=timeout)


def done_marker(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / "stage.done.json").read_text())


def run_with_and_without_checkpointing(recipe_for: Any, tmp: Path, stage: str) -> dict[bool, tuple[list, int]]:
    """Run `recipe_for(output_dir)` with `model.gradient_checkpointing` off and on, through the CLI
    in-process, counting the checkpointed layer calls; returns {on: (metric rows without time/*, calls)}."""
    import transformers.modeling_utils as hf_modeling

    from rlft.cli import main

    real, calls = hf_modeling.checkpoint, [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    out = {}
    hf_modeling.checkpoint = counting  # what activation checkpointing binds when it is enabled
    try:
        for on in (False, True):
            recipe = recipe_for(tmp / f"ckpt-{on}")
            recipe["model"]["gradient_checkpointing"] = on
            calls[0] = 0
            assert main(["run", str(write_recipe(tmp / f"ckpt-{on}.yaml", recipe))]) == 0
            stage_dir = next((tmp / f"ckpt-{on}").glob(f"*/{stage}"))
            rows = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in metrics(stage_dir)]
            out[on] = (rows, calls[0])
    finally:
        hf_modeling.checkpoint = real
    return out


def assert_same_metrics(a: list[dict[str, Any]], b: list[dict[str, Any]], atol: float) -> None:
    """Same rows, keys and non-numeric values; numbers equal to `atol`."""
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k, v in ra.items():
            if isinstance(v, float) and isinstance(rb[k], float):
                assert abs(v - rb[k]) <= atol, (ra["step"], k, v, rb[k])
            else:
                assert v == rb[k], (ra["step"], k, v, rb[k])
