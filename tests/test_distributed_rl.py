"""GRPO and PPO on several processes (torchrun, gloo on CPU): a 2-process run equals the
1-process run with the same global batch (metrics.jsonl and final weights within 1e-5); a rank
killed with SIGKILL mid-GRPO brings the job down and the rerun ends bitwise where an
uninterrupted 2-process run ends.

Every run is the installed `rlft` console script in a subprocess (`--nproc 2` launches torchrun).
The recipes have a length-shaping reward, with stop strings for varied lengths; GRPO runs mu = 2 passes of 2 mini-batches with the `batch` advantage
scale, dynamic sampling (zero-variance groups dropped and refilled) and a KL to the
adapter-disabled reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import done_marker, final_hashes, write_recipe
from safetensors.torch import load_file
from test_distributed import kill_one_rank_then_rerun

RLFT = Path(sys.executable).with_name("rlft")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _recipe(tmp: Path, name: str, kind: str, fsdp: bool = False, lora: bool = False) -> Path:
    """`fsdp`: the policy (and a separate critic's trunk) fully fine-tuned under distributed.strategy: fsdp."""
    spec: dict[str, Any] = {
        "kind": kind,
        "data": {"source": "tiny:arith", "num_examples": 64, "eval_size": 4, "max_length": 128},
        "rewards": [{"name": "overlong_penalty", "options": {"max_len": 16, "cache_len": 15}}],
        "steps": 3, "prompts_per_step": 4, "mini_batches": 2, "micro_batch_size": 2, "lr": 1e-2,
        "sampling": {"temperature": 1.0, "max_new_tokens": 16, "stop": list("aeiou0123456789")},
        "save_every": 1, "eval_samples": 4, "eval_max_new_tokens": 8, "log_samples_every": 1,
    }
    if kind == "grpo":  # 4 prompts x G=4: each mini-batch's 8 rows are 4 per rank, 2 micro-batches each
        spec |= {"group_size": 4, "num_iterations": 2, "loss": {"beta": 0.05}, "advantage": {"scale": "batch"},
                 "dynamic_sampling": {"enabled": True, "max_rounds": 3},  # a reward flat below 15 tokens: refills
                 "rewards": [{"name": "overlong_penalty", "options": {"max_len": 16, "cache_len": 2}}],
                 # AdamW turns float-rounding differences in near-zero gradients (summation order,
                 # padding widths) into weight differences that scale with lr: at 1e-2 up to 1.3e-5
                 "lr": 2e-3}
    else:  # G = 1: 2 rows per rank per mini-batch; a separate critic
        spec |= {"ppo_epochs": 2, "critic": "separate", "critic_lr": 2e-2, "loss": {"beta": 0.1}, "kl_target": 0.5,
                 "kl_horizon": 8}
    recipe = {"run_name": "t", "output_dir": str(tmp / name), "seed": 0, "model": {"name": "tiny:nano"},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "all-linear"}, "stages": {"rl": spec}}
    if fsdp and lora:  # a LoRA adapter on the sharded frozen base
        recipe["distributed"] = {"strategy": "fsdp"}
    elif fsdp:
        recipe["lora"], recipe["distributed"] = "full", {"strategy": "fsdp"}
        if kind == "ppo":  # full fine-tuning: AdamW's rounding amplification (above) grows with lr
            spec |= {"lr": 1e-3, "critic_lr": 2e-3}
    return write_recipe(tmp / f"{name}.yaml", recipe)


def _rlft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RLFT), *args], env=ENV, capture_output=True, text=True, timeout=600)


def _stage(tmp: Path, name: str) -> Path:
    return tmp / name / "t" / "rl"


def _metrics(stage: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _one_and_two(tmp: Path, kind: str, fsdp: bool = False, lora: bool = False) -> tuple[Path, Path]:
    one = _rlft("run", str(_recipe(tmp, f"{kind}-one", kind, fsdp, lora)))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _rlft("run", str(_recipe(tmp, f"{kind}-two", kind, fsdp, lora)), "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    return _stage(tmp, f"{kind}-one"), _stage(tmp, f"{kind}-two")


def _assert_same_run(one: Path, two: Path, weights: list[str]) -> None:
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k, v in ra.items():
            if isinstance(v, float):
                assert abs(v - rb[k]) <= 1e-5, (ra["step"], k, v, rb[k])
            else:
                assert v == rb[k], (ra["step"], k, v, rb[k])
    losses = [r["loss/policy"] for r in a if "loss/policy" in r]
    assert len(losses) == 3 and all(x != 0 for x in losses)  # every round trained on a signal
    for name in weights:
        wa, wb = load_file(one / name), load_file(two / name)
        assert wa.keys() == wb.keys()
        assert max(float(wa[k].abs().max()) for k in wa) > 0
        worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        assert worst <= 1e-5, (name, worst)


def _killed_then_rerun_equals(uninterrupted: Path, tmp_path: Path, kind: str, rank: int, fsdp: bool = False) -> None:
    """Kill one rank of `kind`'s 2-process run after step 1's checkpoint, rerun: it resumed (not
    started over) and ends bitwise where the `uninterrupted` 2-process run ends."""
    recipe = _recipe(tmp_path, "k", kind, fsdp=fsdp)
    stage = _stage(tmp_path, "k")
    kill_one_rank_then_rerun(recipe, stage, after_step=1, rank=rank)
    assert done_marker(stage)["lineage"]["resumed_from_step"] >= 1  # it resumed, not started over
    assert final_hashes(stage) == final_hashes(uninterrupted)
    assert _metrics(stage) == _metrics(uninterrupted)


@pytest.fixture(scope="module")
def grpo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _one_and_two(tmp_path_factory.mktemp("grpo"), "grpo")


@pytest.mark.slow
def test_two_processes_grpo_as_one(grpo: tuple[Path, Path]) -> None:
    one, two = grpo
    _assert_same_run(one, two, ["final/adapter/adapter_model.safetensors", "final/model/model.safetensors"])
    assert _metrics(one)[1]["optimizer_steps"] == 4  # mu = 2 passes x 2 mini-batches
    assert any(r.get("dynamic/rounds", 1) > 1 for r in _metrics(one))  # dynamic sampling refilled a round
    samples = [json.loads(line) for line in (two / "samples.jsonl").read_text().splitlines()]
    assert samples == [json.loads(line) for line in (one / "samples.jsonl").read_text().splitlines()]
    assert not list((two.parent / ".ranks").rglob("*.jsonl"))  # rank 1 wrote no metrics of its own


@pytest.mark.slow
def test_two_processes_ppo_as_one(tmp_path: Path) -> None:
    one, two = _one_and_two(tmp_path, "ppo")
    _assert_same_run(one, two, ["final/adapter/adapter_model.safetensors", "final/critic/value_head.safetensors"])


@pytest.mark.slow
def test_kill9_of_one_rank_mid_grpo_then_rerun_equals_uninterrupted(grpo: tuple[Path, Path], tmp_path: Path) -> None:
    _killed_then_rerun_equals(grpo[1], tmp_path, "grpo", rank=1)


# --------------------------------------------------------------------------- distributed.strategy: fsdp


@pytest.fixture(scope="module")
def fsdp_grpo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The GRPO recipe fully fine-tuned under fsdp: 1 process (the plain path) and 2 (sharded)."""
    return _one_and_two(tmp_path_factory.mktemp("fsdp-grpo"), "grpo", fsdp=True)


@pytest.mark.slow
def test_fsdp_two_processes_grpo_as_one(fsdp_grpo: tuple[Path, Path]) -> None:
    """Each rank samples its share (decode steps differ), runs its rows' bucketed forwards and
    the reference's no-grad forwards: the sharded run still equals the one-process run."""
    one, two = fsdp_grpo
    _assert_same_run(one, two, ["final/model/model.safetensors"])
    assert not (two / "final" / "adapter").exists()
    assert _metrics(one)[1]["optimizer_steps"] == 4 and "kl" in _metrics(one)[1]  # mu x mini-batches; the reference ran
    assert any(r.get("dynamic/rounds", 1) > 1 for r in _metrics(one))
    meta = json.loads(next(two.glob("step-*/manifest.json")).read_text())["meta"]
    assert meta["strategy"] == "fsdp" and meta["world_size"] == 2  # the 2-process run was sharded


@pytest.fixture(scope="module")
def fsdp_ppo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The PPO recipe (a separate critic) fully fine-tuned under fsdp: 1 process and 2."""
    return _one_and_two(tmp_path_factory.mktemp("fsdp-ppo"), "ppo", fsdp=True)


@pytest.mark.slow
def test_fsdp_two_processes_ppo_as_one(fsdp_ppo: tuple[Path, Path]) -> None:
    """PPO with a separate, fully fine-tuned critic (replicated) beside the sharded policy."""
    one, two = fsdp_ppo
    _assert_same_run(one, two, ["final/model/model.safetensors", "final/critic/value_head.safetensors",
                                "final/critic/model/model.safetensors"])


@pytest.mark.slow
def test_fsdp_kill9_mid_grpo_then_rerun_equals_uninterrupted(fsdp_grpo: tuple[Path, Path], tmp_path: Path) -> None:
    _killed_then_rerun_equals(fsdp_grpo[1], tmp_path, "grpo", rank=1, fsdp=True)


_ACCUMULATE = """
import sys
import torch
import torch.distributed as td
from transformers import AutoModelForCausalLM
from rlft import fsdp

td.init_process_group("gloo")
rank = td.get_rank()
model = fsdp.shard(AutoModelForCausalLM.from_pretrained(sys.argv[1]).float().eval(), None)
ids = torch.load(sys.argv[2], weights_only=True)
with fsdp.gathered(model), torch.no_grad():  # unequal numbers of forwards: no collective inside
    for _ in range(2 + 3 * rank):
        model(input_ids=ids[:1])
with fsdp.accumulated(model):  # rank 0: three backwards of different shapes; rank 1: none
    for rows in ([[0], [1, 2], [3]] if rank == 0 else []):
        (model(input_ids=ids[rows]).logits.logsumexp(-1).sum() / 100).backward()
sharded = all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
grads = {n: fsdp.full(p.grad) for n, p in model.named_parameters()}  # every rank joins each gather
if rank == 0:
    torch.save({"grads": grads, "sharded": sharded}, sys.argv[3])
td.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_accumulated_reduces_unequal_backwards_to_the_one_process_gradient(tmp_path: Path) -> None:
    """Two ranks under `fsdp.gathered`/`fsdp.accumulated` with different numbers of forwards and
    backwards (one rank none at all) end with the gradient one process computes, sharded."""
    import socket

    import torch
    from transformers import AutoModelForCausalLM

    from rlft.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "nano")
    ids = torch.randint(3, 200, (4, 7), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "worker.py").write_text(_ACCUMULATE)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(model_dir), str(tmp_path / "ids.pt"),
                               str(tmp_path / "out.pt")],
                              env={**ENV, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["sharded"]
    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    for rows in ([0], [1, 2], [3]):
        (model(input_ids=ids[rows]).logits.logsumexp(-1).sum() / 100).backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    assert want.keys() == out["grads"].keys()
    assert all(g is not None and float(g.abs().max()) > 0 for g in want.values())
    worst = max(float((want[n] - out["grads"][n]).abs().max()) for n in want)
    assert worst <= 1e-6, worst


def test_explain_shows_the_rl_split_and_refuses_an_uneven_one(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "e", "grpo")
    shown = _rlft("explain", str(recipe), "--nproc", "2")
    assert shown.returncode == 0, shown.stderr
    assert ("on 2 processes: each rank samples and scores 2 of the 4 prompts x G=4 (gathered on every rank); "
            "each optimizer step's 8 completions split 4 per rank") in shown.stdout
    refused = _rlft("explain", str(recipe), "--nproc", "3")
    assert refused.returncode == 2
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if "prompts_per_step: 4" in text)
    message = " ".join(refused.stderr.split())
    assert f"{recipe}:{line}: stages.rl.prompts_per_step 4 does not split over 3 processes" in message


def test_prompt_generators_continue_the_rounds_one_stream() -> None:
    """Prompt b's generator draws exactly rows b*G..(b+1)*G-1 of the one (B*G, T) block that one
    process draws for the round, so a prompt's completions do not depend on the rank sampling it."""
    import torch

    from rlft.rl.shard import prompt_generators
    from rlft.rollout import seed_generator

    full = torch.rand((5 * 4, 16), generator=seed_generator(0, 3, 1))
    gens = prompt_generators(seed_generator(0, 3, 1), 5, 4, 16)
    assert torch.equal(torch.cat([torch.rand((4, 16), generator=g) for g in gens]), full)
    rank_one = prompt_generators(seed_generator(0, 3, 1), 5, 4, 16)[3:]  # a rank's share alone
    assert torch.equal(torch.cat([torch.rand((4, 16), generator=g) for g in rank_one]), full[12:])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_fsdp_lora_two_processes_rl_as_one(tmp_path: Path, kind: str) -> None:
    """A LoRA adapter on the sharded frozen base: the round's sampling, the reference (adapter
    disabled) and the step run on the gathered model; the 2-process run equals one process's."""
    one, two = _one_and_two(tmp_path, kind, fsdp=True, lora=True)
    weights = ["final/adapter/adapter_model.safetensors", "final/model/model.safetensors"]
    _assert_same_run(one, two, weights + (["final/critic/value_head.safetensors"] if kind == "ppo" else []))
    meta = json.loads(next(two.glob("step-*/manifest.json")).read_text())["meta"]
    assert meta["strategy"] == "fsdp" and meta["world_size"] == 2  # the 2-process run was sharded


@pytest.mark.slow
def test_fsdp_kill9_mid_ppo_then_rerun_equals_uninterrupted(fsdp_ppo: tuple[Path, Path], tmp_path: Path) -> None:
    """The sharded checkpoint holds the policy's shards and, beside them, the replicated critic's
    weights and AdamW state (one optimizer steps both): a resume after a kill is bitwise."""
    _killed_then_rerun_equals(fsdp_ppo[1], tmp_path, "ppo", rank=0, fsdp=True)
