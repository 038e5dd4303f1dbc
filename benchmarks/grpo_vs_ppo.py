"""GRPO vs PPO on the tiny task, from the same cold start, and print a table.

    python -m benchmarks.grpo_vs_ppo                     # tiny-grpo, tiny-ppo, tiny-ppo with a shared critic
    python -m benchmarks.grpo_vs_ppo --only grpo grpo-4steps ppo ppo-shared ppo-matched   # all five

Each run is `rlft run <recipe>` in a fresh interpreter (one thread), after its cold start ran in
another, so the peak RSS (`resource.getrusage`) and the wall time are the RL stage's alone. The
two recipes' cold-start stages are identical (same spec, seed and model), so they train the same
weights; the table says whether the adapters' hashes agree. Figures: reward/mean averaged over
the first, middle and last 10% of steps; held-out greedy accuracy of the cold start and after RL
(the stage's own eval rows); seconds per step from the stage's per-phase timers (generation,
rewards, experience/reference, policy; held-out evals excluded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "grpo": ("recipes/tiny-grpo.yaml", "tiny-grpo", []),
    "ppo": ("recipes/tiny-ppo.yaml", "tiny-ppo", []),
    "ppo-shared": ("recipes/tiny-ppo.yaml", "tiny-ppo-shared", ["stages.rl.critic=shared", "run_name=tiny-ppo-shared"]),
    # as many completions as tiny-grpo (steps x prompts x G): about 8 minutes on one core
    "ppo-matched": ("recipes/tiny-ppo.yaml", "tiny-ppo-matched",
                    ["stages.rl.prompts_per_step=256", "stages.rl.steps=200", "run_name=tiny-ppo-matched"]),
    # GRPO with PPO's 4 optimizer steps per round (mu = 2 passes x 2 mini-batches): about 5 minutes
    "grpo-4steps": ("recipes/tiny-grpo.yaml", "tiny-grpo-4steps",
                    ["stages.rl.num_iterations=2", "stages.rl.mini_batches=2", "run_name=tiny-grpo-4steps"]),
}
DEFAULT_RUNS = ["grpo", "ppo", "ppo-shared"]


def worker(argv: list[str]) -> None:
    """Run the CLI with `argv` in this process; print wall seconds and peak RSS as JSON."""
    from rlft.cli import main

    t0 = time.monotonic()
    code = main(argv)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"code": code, "wall_s": time.monotonic() - t0, "peak_rss_mb": rss_kb / 1024}))


def _spawn(argv: list[str]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.grpo_vs_ppo", "--worker", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines or json.loads(lines[-1])["code"]:
        raise SystemExit(f"run failed: {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _window(values: list[float], where: str) -> float:
    k = max(1, len(values) // 10)
    start = {"first": 0, "mid": len(values) // 2 - k // 2, "last": len(values) - k}[where]
    part = values[start : start + k]
    return sum(part) / len(part)


def _adapter_hash(stage: Path) -> str:
    return hashlib.sha256((stage / "final/adapter/adapter_model.safetensors").read_bytes()).hexdigest()[:12]


def run_one(name: str, out: Path) -> dict[str, Any]:
    """Cold start, then the RL stage of one recipe; the figures of the table's column."""
    recipe, run_name, sets = RUNS[name]
    overrides = [x for s in [f"output_dir={out}", *sets] for x in ("--set", s)]
    _spawn(["stage", "cold_start", "--recipe", str(ROOT / recipe), *overrides])
    usage = _spawn(["run", str(ROOT / recipe), *overrides])
    run_dir = out / run_name
    rows = [json.loads(ln) for ln in (run_dir / "rl/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    rewards = [r["reward/mean"] for r in steps]
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    step_s = [sum(v for k, v in r.items() if k.startswith("time/")) for r in steps]
    explained = [r["value/explained_variance"] for r in steps if isinstance(r.get("value/explained_variance"), float)]
    spec = yaml.safe_load((run_dir / "recipe.yaml").read_text())["stages"]["rl"]  # overrides applied
    return {
        "steps": len(steps),
        "completions/step": spec["prompts_per_step"] * spec.get("group_size", 1),
        "optimizer steps/step": steps[-1]["optimizer_steps"] / len(steps),
        "reward first 10%": _window(rewards, "first"),
        "reward mid 10%": _window(rewards, "mid"),
        "reward last 10%": _window(rewards, "last"),
        "held-out acc, cold start": evals[0],
        "held-out acc, after RL": evals[-1],
        "explained var, last 10%": _window(explained, "last") if explained else None,
        "s/step (timers)": sum(step_s) / len(step_s),
        "stage wall s": usage["wall_s"],
        "peak RSS MB": usage["peak_rss_mb"],
        "cold start adapter": _adapter_hash(run_dir / "cold_start"),
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per figure, one column per run."""
    names = list(results)
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in results[names[0]]:
        cells = []
        for n in names:
            v = results[n][key]
            cells.append("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/grpo-vs-ppo"), help="Where the runs go.")
    p.add_argument("--only", nargs="+", choices=sorted(RUNS), default=DEFAULT_RUNS, help="Runs to compare.")
    args = p.parse_args()
    out = args.out.resolve()
    results = {}
    for name in args.only:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_one(name, out)
    print(table(results))
    hashes = {r["cold start adapter"] for r in results.values()}
    print(f"\ncold starts identical: {'yes' if len(hashes) == 1 else 'NO'}; torch threads: 1; machine: {os.uname().machine}")


if __name__ == "__main__":
    main()
