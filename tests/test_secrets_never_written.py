"""RELIABILITY.md test 24: secrets never written. HF_TOKEN, WANDB_API_KEY and MY_SECRET_TOKEN
hold canaries while a tiny two-stage pipeline runs with --verbose, crashes on a forced disk
error (traceback printed), resumes and finishes; a user reward runs code in the sandbox and
writes down the environment the code saw. No canary is in any file under the run's root, in
stdout or stderr, or in the sandboxed code's environment; a recipe holding one is refused."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from helpers import rlft, write_recipe

PROBE = '''\
import json, os
from pathlib import Path

from rlft.rewards import sandbox

CODE = "import json, os; print(json.dumps(dict(os.environ)))"


def reward(prompts, completions, **columns):
    """Score 0; record the sandboxed code's environment and whether this process had the tokens."""
    res = sandbox.run_python(CODE, timeout_s=20, memory_mb=512, max_procs=16, max_file_mb=4,
                             allow_unsafe=not sandbox.isolation_available())
    seen = {"status": res.status, "child_env": res.stdout,
            "parent_has": sorted(k for k in ("HF_TOKEN", "WANDB_API_KEY", "MY_SECRET_TOKEN") if k in os.environ)}
    (Path(__file__).parent / "sandbox_env.jsonl").open("a").write(json.dumps(seen) + "\\n")
    return [0.0] * len(completions)
'''
ARITH = {"source": "tiny:arith", "num_examples": 24, "eval_size": 4, "max_length": 128}


def _recipe(root: Path) -> dict:
    return {
        "run_name": "s", "output_dir": str(root / "runs"), "model": {"name": "tiny:nano"}, "lora": {"r": 4, "alpha": 8},
        "stages": {
            "cold": {"kind": "sft", "data": ARITH, "max_steps": 3, "batch_size": 4, "save_every": 1,
                     "eval_samples": 4, "eval_max_new_tokens": 4},
            "rl": {"kind": "grpo", "from": "cold", "data": ARITH, "rewards": ["math_answer", "probe.py:reward"],
                   "steps": 2, "prompts_per_step": 2, "group_size": 2, "micro_batch_size": 4, "eval_samples": 4,
                   "sampling": {"max_new_tokens": 4}, "save_every": 1},
        },
    }


def test_secrets_never_written(tmp_path: Path) -> None:
    canaries = {"HF_TOKEN": "hf_" + secrets.token_hex(17), "WANDB_API_KEY": secrets.token_hex(20),
                "MY_SECRET_TOKEN": "canary-" + secrets.token_hex(12)}
    root = tmp_path / "root"
    root.mkdir()
    (root / "probe.py").write_text(PROBE)
    recipe = write_recipe(root / "r.yaml", _recipe(root))
    crashed = rlft("run", str(recipe), "--verbose", env=canaries | {"RLFT_FAULT": "eio:after_file:2"})
    assert crashed.returncode == 3 and "Traceback" in crashed.stdout + crashed.stderr, crashed.stderr
    done = rlft("run", str(recipe), "--verbose", env=canaries)
    assert done.returncode == 0, done.stderr
    bad = write_recipe(tmp_path / "bad.yaml", _recipe(root) | {"run_name": canaries["WANDB_API_KEY"]})
    refused = rlft("validate", str(bad), "--set", f"stages.rl.rewards.0.options.token={canaries['HF_TOKEN']}",
                   env=canaries)
    assert refused.returncode == 2 and "run_name: the value looks like" in refused.stderr, refused.stderr

    run = root / "runs" / "s"
    assert (run / "rl" / "stage.done.json").exists() and any(run.glob("*/tensorboard/*"))
    assert (run / "cold" / "metrics.jsonl").exists() and (run / "rl" / "samples.jsonl").exists()
    probes = [json.loads(line) for line in (root / "sandbox_env.jsonl").read_text().splitlines()]
    assert probes and all(p["status"] == "ok" and p["parent_has"] == sorted(canaries) for p in probes), probes
    files = [p for p in root.rglob("*") if p.is_file()]
    outputs = [crashed.stdout, crashed.stderr, done.stdout, done.stderr, refused.stdout, refused.stderr]
    hits = [(str(f), name) for f in files for name, value in canaries.items() if value.encode() in f.read_bytes()]
    hits += [(f"output {i}", name) for i, text in enumerate(outputs) for name, value in canaries.items() if value in text]
    assert len(files) > 50 and hits == [], hits
    assert all(name not in json.loads(p["child_env"]) for p in probes for name in canaries)
