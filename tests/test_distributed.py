"""Several processes (torchrun, gloo on CPU): a 2-process SFT run equals the 1-process run with the
same global batch; sizes that do not split are refused at file:line; a checkpoint resumes only on
the world size that wrote it; a rank killed with SIGKILL brings the job down and the rerun ends
bitwise where an uninterrupted 2-process run ends.

Every run is the installed `rlft` console script in a subprocess (`--nproc 2` launches torchrun).
LoRA dropout is 0 here: dropout masks draw from each rank's RNG, so with dropout the N-process
run is an equally valid but different draw.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import helpers
import pytest
from helpers import final_hashes, sft_recipe, step_losses, write_recipe
from safetensors.torch import load_file

from rlft.ckpt.manifest import manifest_bytes

RLFT = Path(sys.executable).with_name("rlft")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
WEIGHTS = ("final/adapter/adapter_model.safetensors", "final/model/model.safetensors")


def _recipe(tmp: Path, name: str, **stage: Any) -> Path:
    # 40 training rows, 12 a step = 6 micro-batches of 2 (3 per rank); step 4 is the epoch's
    # short last batch (4 rows = 2 micro-batches: 1 per rank)
    stage = {"batch_size": 12, "micro_batch_size": 2, "max_steps": 5} | stage
    recipe = sft_recipe(tmp / name, **stage)
    recipe["lora"]["dropout"] = 0.0
    return write_recipe(tmp / f"{name}.yaml", recipe)


def _rlft(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RLFT), *args], env=ENV | (env or {}), capture_output=True, text=True, timeout=600)


def _stage(tmp: Path, name: str) -> Path:
    return tmp / name / "t" / "sft"


def _one_and_two(tmp: Path, recipe: Any) -> subprocess.CompletedProcess[str]:
    """`recipe(tmp, name)` run as "one" by 1 process and as "two" by 2; both must finish."""
    one = _rlft("run", str(recipe(tmp, "one")))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _rlft("run", str(recipe(tmp, "two")), "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    return two


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same recipe run by 1 process and by 2 (`two`), once for the module."""
    tmp = tmp_path_factory.mktemp("dist")
    two = _one_and_two(tmp, _recipe)
    shown = [line.strip() for line in (two.stdout + two.stderr).splitlines()]
    assert shown.count("run t") == 1, two.stderr[-3000:]  # rank 0 alone prints the run table
    return tmp


def test_two_processes_train_as_one(runs: Path) -> None:
    one, two = _stage(runs, "one"), _stage(runs, "two")
    losses_one, losses_two = step_losses(one), step_losses(two)
    assert [s for s, _ in losses_two] == [1, 2, 3, 4, 5]
    assert [s for s, _ in losses_one] == [s for s, _ in losses_two]
    for (_, a), (_, b) in zip(losses_one, losses_two, strict=True):
        assert abs(a - b) <= 1e-5, (losses_one, losses_two)
    assert losses_two[0][1] != losses_two[-1][1]  # it trained
    for name in WEIGHTS:
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst <= 1e-5, (name, worst)


def test_other_ranks_write_only_their_scratch(runs: Path) -> None:
    """One metrics file, one done marker, one checkpoint per step, no per-rank files beside them."""
    run_dir = runs / "two" / "t"
    stage = run_dir / "sft"
    assert (stage / "stage.done.json").exists()
    def steps(stage: Path) -> list[int]:
        return [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()]

    assert steps(stage) == steps(_stage(runs, "one"))  # each row once, not once per rank
    ckpt = sorted(stage.glob("step-*"))[-1]
    assert (ckpt / "rng.rank1.safetensors").exists()
    assert not (ckpt / "rng.rank2.safetensors").exists()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) in ([], [".ranks"])


def test_explain_shows_the_split_and_refuses_an_uneven_one(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "e", batch_size=8, micro_batch_size=2)
    shown = _rlft("explain", str(recipe), "--nproc", "2")
    assert shown.returncode == 0, shown.stderr
    assert "on 2 processes: each rank takes 4 sequences = 2 micro-batches x 2 of the global 8" in shown.stdout
    refused = _rlft("explain", str(recipe), "--nproc", "3")
    assert refused.returncode == 2
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if "batch_size: 8" in text)
    message = " ".join(refused.stderr.split())
    assert f"{recipe}:{line}: stages.sft.batch_size 8 = 4 micro-batches of 2 does not split over 3" in message


@pytest.mark.slow
def test_a_checkpoint_resumes_on_its_own_world_size_only(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "w", max_steps=3)
    killed = _rlft("run", str(recipe), env={"RLFT_FAULT": "kill_step:2"})
    assert killed.returncode == -signal.SIGKILL
    assert (_stage(tmp_path, "w") / "step-00000002").exists()
    refused = _rlft("stage", "sft", "--recipe", str(recipe), "--resume", "--nproc", "2")
    assert refused.returncode == 3  # rlft's checkpoint exit code, relayed through torchrun
    message = " ".join(refused.stderr.split())
    assert "was saved by 1 process(es) and this run has 2" in message, refused.stderr[-3000:]
    assert not (_stage(tmp_path, "w") / "stage.done.json").exists()


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` under the launcher process `launcher`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, seen = [launcher], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += children.get(pid, [])
    for pid in seen:
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env):
            return pid
    return None


def kill_one_rank_then_rerun(recipe: Path, stage: Path, after_step: int, rank: int, delay: float = 0.0) -> None:
    """`rlft run RECIPE --nproc 2`; SIGKILL of `rank` once the checkpoint of `after_step` has
    appeared (plus `delay` s); torchrun must bring the job down unfinished; then the same command
    again, which must finish."""
    launcher = subprocess.Popen([str(RLFT), "run", str(recipe), "--nproc", "2"], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (stage / f"step-{after_step:08d}").exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    victim = _rank_pid(launcher.pid, rank)
    assert victim is not None and launcher.poll() is None, "the job ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    assert launcher.wait(timeout=300) != 0  # torchrun brings the job down
    assert not (stage / "stage.done.json").exists()
    rerun = _rlft("run", str(recipe), "--nproc", "2")
    assert rerun.returncode == 0, rerun.stderr[-3000:]


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_as_one_node(runs: Path, tmp_path: Path) -> None:
    """Two torchrun launches of one process each, meeting at a rendezvous on 127.0.0.1 (the
    README's two-node example), end where one node with 2 processes ends."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = _recipe(tmp_path, "nodes")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "rehearsal",
              "-m", "rlft", "run", str(recipe)]
    nodes = [subprocess.Popen([*launch[:3], f"--node-rank={n}", *launch[3:]], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    stage = _stage(tmp_path, "nodes")
    assert final_hashes(stage) == final_hashes(_stage(runs, "two"))
    assert step_losses(stage) == step_losses(_stage(runs, "two"))


def test_without_micro_batch_size_each_rank_takes_an_equal_share(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "m", batch_size=16, micro_batch_size=None)
    shown = _rlft("explain", str(recipe), "--nproc", "2")
    assert shown.returncode == 0, shown.stderr
    assert "each rank takes 8 sequences = 1 micro-batches x 8 of the global 16" in shown.stdout
    refused = _rlft("explain", str(recipe), "--nproc", "3")
    assert refused.returncode == 2
    assert "batch_size 16 does not split over 3 processes" in " ".join(refused.stderr.split())


def test_vllm_sampling_on_several_processes_needs_ddp(tmp_path: Path) -> None:
    """Each rank's vLLM engine takes the whole policy: with fsdp the recipe is refused at its line."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-grpo.yaml"
    refused = _rlft("run", str(recipe), "--nproc", "2", "--set", f"output_dir={tmp_path}",
                    "--set", "stages.rl.sampling.engine=vllm", "--set", "distributed.strategy=fsdp", "--set", "lora=full")
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = " ".join(refused.stderr.split())
    assert "distributed.strategy: fsdp: stage 'rl' (grpo) samples with vLLM" in message, message
    assert "use strategy: ddp with sampling.engine: vllm" in message
    assert list(tmp_path.iterdir()) == []  # refused before torchrun started or anything was written
    shown = _rlft("explain", str(recipe), "--nproc", "2", "--set", "stages.rl.sampling.engine=vllm")
    assert shown.returncode == 0, shown.stderr[-3000:]  # with ddp each rank runs its own engine


def _distill_recipe(tmp: Path, name: str, strategy: str = "ddp") -> Path:
    """SFT, then sequence-level distillation into a fully fine-tuned tiny student (a tiny:student
    that rank 0 builds, teacher completions that the ranks share, rank 0 writes and every rank
    reads); `fsdp`: both stages fully fine-tuned under distributed.strategy: fsdp; `fsdp-lora`:
    both with the recipe's LoRA adapter under fsdp."""
    recipe = sft_recipe(tmp / name, batch_size=8, micro_batch_size=4, max_steps=2)
    recipe["lora"]["dropout"] = 0.0
    if strategy == "fsdp":
        recipe["lora"] = "full"
        recipe["stages"]["sft"]["lr"] = 1e-3
    if strategy != "ddp":
        recipe["distributed"] = {"strategy": "fsdp"}
    recipe["stages"]["distill"] = {
        "kind": "distill", "teacher": "sft", "student": {"name": "tiny:student"}, "lora": "full",
        "mode": "sequence", "data": {"source": "tiny:arith", "num_examples": 24, "eval_size": 4, "max_length": 96},
        "sampling": {"temperature": 1.0, "max_new_tokens": 8}, "max_steps": 3, "batch_size": 8,
        "micro_batch_size": 2, "eval_samples": 4, "eval_max_new_tokens": 4, "save_every": 1,
    }
    if strategy == "fsdp-lora":
        del recipe["stages"]["distill"]["lora"]
    return write_recipe(tmp / f"{name}.yaml", recipe)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp-lora"])
def test_two_processes_distill_as_one(tmp_path: Path, strategy: str) -> None:
    one = _rlft("run", str(_distill_recipe(tmp_path, "one", strategy)))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _rlft("run", str(_distill_recipe(tmp_path, "two", strategy)), "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = tmp_path / "one" / "t" / "distill", tmp_path / "two" / "t" / "distill"
    assert (a / "final").exists() and (b / "final").exists()
    # 20 prompts = teacher batches of 8, 8, 4 (rank 0 makes the first, rank 1 the others); the
    # metadata's key differs: it pins the teacher's weights, which are the SFT stage's within 1e-5
    assert (a / "teacher_data.jsonl").read_bytes() == (b / "teacher_data.jsonl").read_bytes()
    meta_a, meta_b = (json.loads((d / "teacher_data.json").read_text()) for d in (a, b))
    assert (meta_a["stats"], meta_a["rows"]) == (meta_b["stats"], meta_b["rows"]) and meta_a["rows"] == 20
    la, lb = step_losses(a), step_losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3]
    assert all(abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(la, lb, strict=True)), (la, lb)
    for name in WEIGHTS if strategy == "fsdp-lora" else WEIGHTS[1:]:
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5


# --------------------------------------------------------------------------- distributed.strategy: fsdp


def _fsdp_recipe(tmp: Path, name: str, **changes: Any) -> Path:
    """Full fine-tuning under `distributed.strategy: fsdp`. 38 training rows, 12 a step = 6
    micro-batches of 2 (3 per rank); step 4 is the epoch's last 2 rows, one micro-batch: rank 1
    has none of its own and runs the pass that adds zero (every rank joins each collective)."""
    stage = {"batch_size": 12, "micro_batch_size": 2, "max_steps": 5, "lr": 1e-3,
             "data": {"source": "tiny:arith", "num_examples": 46, "eval_size": 8, "max_length": 128}}
    recipe = sft_recipe(tmp / name, **stage)
    recipe["lora"] = "full"
    recipe["distributed"] = {"strategy": "fsdp"}
    return write_recipe(tmp / f"{name}.yaml", recipe | changes)


def _one_and_two_dir(factory: pytest.TempPathFactory, name: str, recipe: Any) -> Path:
    """A fresh directory in which `recipe` ran as "one" (1 process) and "two" (2)."""
    tmp = factory.mktemp(name)
    _one_and_two(tmp, recipe)
    return tmp


def _assert_same_steps(one: Path, two: Path) -> None:
    """Steps 1-5 of the two stage dirs: losses and gradient norms within 1e-5, and it trained."""
    steps_one, steps_two = ([(r["step"], r["loss"], r["grad_norm"]) for r in helpers.metrics(s) if "loss" in r]
                            for s in (one, two))
    assert [s for s, _, _ in steps_two] == [s for s, _, _ in steps_one] == [1, 2, 3, 4, 5]
    for (_, la, ga), (_, lb, gb) in zip(steps_one, steps_two, strict=True):
        assert abs(la - lb) <= 1e-5 and abs(ga - gb) <= 1e-5, (steps_one, steps_two)
    assert steps_two[0][1] != steps_two[-1][1]  # it trained


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fsdp recipe run by 1 process (nothing to shard: the plain path) and by 2 (sharded)."""
    return _one_and_two_dir(tmp_path_factory, "fsdp", _fsdp_recipe)


@pytest.mark.slow
def test_fsdp_two_processes_train_as_one(fsdp_runs: Path) -> None:
    one, two = _stage(fsdp_runs, "one"), _stage(fsdp_runs, "two")
    _assert_same_steps(one, two)
    a, b = load_file(one / "final/model/model.safetensors"), load_file(two / "final/model/model.safetensors")
    assert a.keys() == b.keys()  # an ordinary model: the tied output layer saved once, as one process saves it
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    config = json.loads((two / "final/model/config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.slow
def test_fsdp_checkpoint_is_one_shard_file_a_rank(fsdp_runs: Path) -> None:
    """Each rank wrote its own half of every weight and AdamW moment; no file holds a whole copy."""
    one, two = (sorted(_stage(fsdp_runs, n).glob("step-*"))[-1] for n in ("one", "two"))
    files = sorted(p.name for p in two.iterdir())
    shards = ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert files == sorted(["manifest.json", "state.json", "optimizer.safetensors", "rng.safetensors",
                            "rng.rank1.safetensors", *shards]), files
    manifest = json.loads((two / "manifest.json").read_text())
    assert set(manifest["files"]) == set(files) - {"manifest.json"}  # every shard is hashed and committed
    assert manifest["meta"]["layout"] == "dcp-safetensors" and manifest["meta"]["world_size"] == 2
    # the whole state as one process saves it: weights by name, AdamW moments by parameter index
    params, optim = load_file(one / "params.safetensors"), load_file(one / "optimizer.safetensors")
    whole = {f"model.{n}": t for n, t in params.items()}
    names = json.loads((two / "state.json").read_text())["optimizer"]["optim"]["param_groups"][0]["params"]
    assert sorted(names) == sorted(params)  # the optimizer's parameter order, by name
    whole |= {f"optim.state.{names[i]}.{m}": optim[f"state.{i}.{m}"] for i in range(len(names))
              for m in ("exp_avg", "exp_avg_sq")}
    a, b = (load_file(two / name) for name in shards)
    assert set(a) == set(b) == set(whole)
    total = sum(t.numel() for t in whole.values())
    for part in (a, b):
        assert 0.4 * total < sum(t.numel() for t in part.values()) < 0.6 * total
    for key, t in whole.items():  # dim-0 shards: rank 0's rows then rank 1's make the whole tensor
        assert a[key].shape[0] + b[key].shape[0] == t.shape[0] and a[key].shape[1:] == t.shape[1:], key
        assert b[key].shape[0] < t.shape[0], key


@pytest.mark.slow
def test_fsdp_resume_after_a_kill_is_bitwise(fsdp_runs: Path, tmp_path: Path) -> None:
    """Rank 0 killed inside the save of step 4, after every rank wrote its shard file and before
    the manifest: step 4 stays invisible and steps 2 and 3 are the committed checkpoints (keep_last
    2). A flipped byte in a rank's shard file is caught by verification: with
    both checkpoints hit nothing resumes (exit 3); a checkpoint in the older gathered layout is
    refused (exit 3); with step 2's file restored the rerun resumes from step 2 and ends bitwise
    where the uninterrupted run ends."""
    recipe = _fsdp_recipe(tmp_path, "k")
    killed = _rlft("run", str(recipe), "--nproc", "2", env={"RLFT_FAULT": "before_manifest:4"})
    assert killed.returncode != 0
    stage = _stage(tmp_path, "k")
    assert sorted(p.name for p in stage.glob("step-*")) == ["step-00000002", "step-00000003"]
    assert not (stage / "final").exists()
    shard = "shard-00002-model-00001-of-00001.safetensors"
    (staging,) = stage.glob(".staging-step-00000004-*")  # the half-done save, never read
    assert (staging / shard).exists() and (staging / shard.replace("00002", "00001", 1)).exists()
    assert not (staging / "manifest.json").exists()
    kept = (stage / "step-00000002" / shard).read_bytes()
    for step in (2, 3):
        path = stage / f"step-{step:08d}" / shard
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x01  # a bit of a tensor, not of the header: only the hash can tell
        path.write_bytes(bytes(data))
    refused = _rlft("run", str(recipe), "--nproc", "2")
    message = " ".join(refused.stderr.split())
    assert refused.returncode == 3, refused.stderr[-3000:]
    assert f"no checkpoint in {stage} verifies" in message
    assert f"step-00000003 failed verification: {shard}: sha256 does not match the manifest" in message
    (stage / "step-00000002" / shard).write_bytes(kept)
    # the same checkpoint as an older rlft's fsdp checkpoint (its meta names no sharded layout)
    manifest_file = stage / "step-00000002" / "manifest.json"
    original = manifest_file.read_bytes()
    manifest = json.loads(original)
    manifest["meta"].pop("layout")
    manifest_file.write_bytes(manifest_bytes(2, manifest["files"], manifest["meta"]))
    old = _rlft("run", str(recipe), "--nproc", "2")
    assert old.returncode == 3, old.stderr[-3000:]
    assert "is an fsdp checkpoint in the older layout (whole tensors gathered to rank 0)" in " ".join(old.stderr.split())
    manifest_file.write_bytes(original)
    rerun = _rlft("run", str(recipe), "--nproc", "2")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((stage / "stage.done.json").read_text())["lineage"]["resumed_from_step"] == 2
    assert final_hashes(stage) == final_hashes(_stage(fsdp_runs, "two"))
    assert step_losses(stage) == step_losses(_stage(fsdp_runs, "two"))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_shard_files_are_safetensors_verified_before_they_are_parsed(tmp_path: Path) -> None:
    """The sharded format in one process: one safetensors file, no pickled `.metadata`; a load
    round-trips bitwise, and a file whose bytes differ from the manifest's hash is refused."""
    import hashlib

    import torch

    from rlft.ckpt import sharded
    from rlft.errors import CheckpointError

    saved = {"w": torch.randn(6, 4), "m.exp_avg": torch.randn(6)}
    sharded.save_shards(saved, tmp_path)
    name = "shard-00001-model-00001-of-00001.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [name]
    data = (tmp_path / name).read_bytes()
    entry = {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}
    loaded = {k: torch.zeros_like(v) for k, v in saved.items()}
    sharded.load_shards(loaded, tmp_path, entry)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    with pytest.raises(CheckpointError, match="Missing key in checkpoint state_dict: extra"):
        sharded.load_shards(loaded | {"extra": torch.zeros(2)}, tmp_path, entry)
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    (tmp_path / name).write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=f"{name}: sha256 does not match the manifest"):
        sharded.load_shards({k: torch.zeros_like(v) for k, v in saved.items()}, tmp_path, entry)


def test_fsdp_needs_a_torch_whose_dcp_writes_a_file_a_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.checkpoint import hf_storage

    from rlft.ckpt import sharded
    from rlft.errors import CheckpointError

    sharded.require()  # this torch can

    class Older:  # torch < 2.8: no save_distributed
        def __init__(self, path: str) -> None: ...

    monkeypatch.setattr(hf_storage, "HuggingFaceStorageWriter", Older)
    with pytest.raises(CheckpointError, match=r"fsdp checkpoints need .* \(torch 2.8 or newer\); this is torch"):
        sharded.require()


def test_the_strategy_key_is_checked_and_explained(tmp_path: Path) -> None:
    shown = _rlft("explain", str(_fsdp_recipe(tmp_path, "ok")), "--nproc", "2")
    assert shown.returncode == 0, shown.stderr
    assert "distributed:\n  strategy: fsdp" in shown.stdout
    assert "strategy fsdp: each rank holds 1/2 of the weights, gradients and AdamW state" in shown.stdout

    def refused(name: str, strategy: Any, **changes: Any) -> str:
        recipe = _fsdp_recipe(tmp_path, name, distributed={"strategy": strategy}, **changes)
        out = _rlft("explain", str(recipe))
        assert out.returncode == 2, out.stdout[-2000:]
        line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if "strategy:" in text)
        message = " ".join(out.stderr.split())
        assert f"{recipe}:{line}:" in message, message
        return message

    assert "distributed.strategy: must be one of ddp, fsdp; got 'fdsp' (did you mean 'fsdp'?)" in refused("typo", "fdsp")
    lora = _rlft("explain", str(_fsdp_recipe(tmp_path, "lora", lora={"r": 4})), "--nproc", "2")
    assert lora.returncode == 0, lora.stderr
    assert ("strategy fsdp: each rank holds 1/2 of the frozen base weights and of the LoRA adapter's weights, "
            "gradients and AdamW state") in " ".join(lora.stdout.split())
    quantized = refused("quantized", "fsdp", lora={"r": 4}, model={"name": "tiny:nano", "quantize": "4bit"})
    assert "stage 'sft' loads its model with quantize: 4bit; FSDP2 does not shard bitsandbytes'" in quantized
    assert "use strategy: ddp, or quantize: none" in quantized
    grpo = Path(__file__).resolve().parents[1] / "recipes" / "tiny-grpo.yaml"
    full = ("--set", "distributed.strategy=fsdp", "--set", "lora=full", "--set", "stages.rl.lora=full")
    out = _rlft("explain", str(grpo), *full)
    assert out.returncode == 0, out.stderr  # grpo (and ppo) are sharded with full fine-tuning
    shown = _rlft("explain", str(grpo), *full, "--set", "stages.rl.loss.beta=0.1", "--nproc", "2")
    assert ("strategy fsdp: each rank holds 1/2 of the policy's weights and AdamW state between rounds; the whole "
            "weights are gathered on every rank for sampling") in shown.stdout
    assert "reduce-scattered once); the reference is whole on every rank" in shown.stdout
    out = _rlft("explain", str(grpo), *full, "--set", "stages.rl.sampling.engine=vllm")
    assert out.returncode == 2
    assert ("stage 'rl' (grpo) samples with vLLM, and each rank's engine takes the whole policy from the rank, "
            "which fsdp keeps sharded" in " ".join(out.stderr.split()))
    out = _rlft("explain", str(grpo), *full[:4])
    assert out.returncode == 0, out.stderr[-3000:]  # grpo with its own LoRA adapter shards too


def test_fsdp_mixed_precision_follows_model_precision() -> None:
    """The CUDA policy is built, not run, here: bf16 compute with float32 reduction for
    bf16_master (auto on CUDA); nothing for fp32 or bf16_autocast, and nothing on the CPU."""
    import torch

    from rlft import fsdp
    from rlft.recipe.schema import ModelSpec

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    policy = fsdp.mixed_precision(ModelSpec(name="m"), cuda)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp.mixed_precision(ModelSpec(name="m", precision="bf16_master"), cuda) == policy
    for precision in ("fp32", "bf16_autocast"):
        assert fsdp.mixed_precision(ModelSpec(name="m", precision=precision), cuda) is None
    assert fsdp.mixed_precision(ModelSpec(name="m"), cpu) is None


def test_fsdp_shard_wraps_each_decoder_layer_then_the_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """`shard` with torch's fully_shard replaced by a recorder (no process group needed): every
    decoder layer first, then the root (resharded after its forward too), bf16 weights cast to
    float32 masters, and the precision policy passed to each call."""
    import torch
    import torch.distributed.fsdp as torch_fsdp
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlft import fsdp
    from rlft.recipe.schema import ModelSpec

    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    calls: list[tuple[torch.nn.Module, dict[str, Any]]] = []
    monkeypatch.setattr(torch_fsdp, "fully_shard", lambda module, **kwargs: calls.append((module, kwargs)))
    policy = object()
    monkeypatch.setattr(fsdp, "mixed_precision", lambda spec, dev: policy)
    assert fsdp.shard(model, ModelSpec(name="m")) is model
    assert [m for m, _ in calls] == [*model.model.layers, model]
    assert all(kw["mp_policy"] is policy for _, kw in calls)
    assert calls[-1][1]["reshard_after_forward"] is True
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# --------------------------------------------------------------------------- fsdp with a LoRA adapter


def _tiny_lora_model(modules_to_save: list[str] | None) -> Any:
    """A 2-layer Qwen2 with tied embeddings and a LoRA adapter on every linear layer (and, with
    `modules_to_save`, a trained copy of the tied output layer, kept tied as rlft asks peft), its
    lora_B drawn nonzero (a fresh adapter's is zero: merging would change nothing) and the trained
    copy moved off the original; the same on every rank."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM",
                      modules_to_save=modules_to_save, ensure_weight_tying=bool(modules_to_save))
    model = get_peft_model(Qwen2ForCausalLM(config), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    return model


def _lora_shard_check(rank: int, modules_to_save: list[str] | None, checkpointing: bool = False) -> dict[str, Any]:
    """Shard the tiny LoRA model over the gloo pair, run a forward/backward of this rank's half of
    a batch, report what this rank holds and how far the summed gradients are from the unsharded
    model's on the whole batch; rank 0 also rebuilds the whole model for the final export."""
    import torch

    from rlft import fsdp
    from rlft.models import enable_checkpointing
    from rlft.recipe.schema import ModelSpec

    model = _tiny_lora_model(modules_to_save)
    if checkpointing:
        enable_checkpointing(model.get_base_model())
    ids = torch.arange(32).view(4, 8) % 32
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    model(input_ids=ids).logits.square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        plain_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            plain_base_logits = model(input_ids=ids).logits
    layers = fsdp.decoder_layers(model)  # found through the peft wrapper
    fsdp.shard(model, ModelSpec(name="m"))
    q = layers[0].self_attn.q_proj
    report: dict[str, Any] = {
        "layers": [type(m).__name__ for m in layers],
        "base": [fsdp.local(q.base_layer.weight).numel(), q.base_layer.weight.numel(), q.base_layer.weight.requires_grad],
        "lora_A": [fsdp.local(q.lora_A["default"].weight).numel(), q.lora_A["default"].weight.numel()],
    }
    model(input_ids=ids[2 * rank : 2 * rank + 2]).logits.square().sum().backward()  # gradients summed over ranks
    report["with_grad"] = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    report["checkpointed"] = [bool(getattr(m, "gradient_checkpointing", False)) for m in layers]
    report["grad_error"] = max(float((fsdp.full(p.grad) - want[n]).abs().max() / want[n].abs().max())
                               for n, p in model.named_parameters() if p.grad is not None)
    report["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        report["lora_logits"] = float((model(input_ids=ids).logits - plain_logits).abs().max())
        with model.disable_adapter():
            report["reference_logits"] = float((model(input_ids=ids).logits - plain_base_logits).abs().max())
    state = fsdp.full_model_state(model)
    if rank == 0:
        assert state is not None
        plain = fsdp.unsharded_lora(model, state)
        mine, inner = plain.state_dict(), plain.get_base_model()
        report["state_keys_equal"] = mine.keys() == whole.keys()
        report["state_equal"] = all(torch.equal(mine[k], whole[k]) for k in whole)
        report["tied"] = inner.lm_head.weight is inner.model.embed_tokens.weight
        merged = plain.merge_and_unload()
        expected = _tiny_lora_model(modules_to_save).merge_and_unload().state_dict()
        report["merged_keys_equal"] = merged.state_dict().keys() == expected.keys()
        report["merged_equal"] = all(torch.equal(merged.state_dict()[k], expected[k]) for k in expected)
        report["merged_tied"] = merged.lm_head.weight is merged.model.embed_tokens.weight
        report["merged_changed"] = not torch.equal(merged.model.layers[0].self_attn.q_proj.weight,
                                                   whole["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    return report


def _lora_shard_worker(rank: int, port: int, out: str) -> None:
    """One rank of a gloo pair: `_lora_shard_check` of an adapter, of an adapter and a trained
    output layer, and of an adapter with activation checkpointing."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    reports = {"adapter": _lora_shard_check(rank, None), "lm_head": _lora_shard_check(rank, ["lm_head"]),
               "checkpointing": _lora_shard_check(rank, None, checkpointing=True)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(reports))
    tdist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_shards_the_frozen_base_of_a_lora_model(tmp_path: Path) -> None:
    """Two gloo ranks in spawned processes: each holds half of a layer's frozen base weight and of
    its adapter; only the trained weights get gradients, and their sum over the ranks' halves of a
    batch is the unsharded model's gradient on the whole batch; the forward with and without the
    adapter (the reference policy) is the unsharded model's; the whole model rebuilt on rank 0
    holds exactly the original weights, tied as they were, and peft's merge of it equals the merge
    of the unsharded model. With an adapter only, with a trained copy of the tied output layer
    (lora.modules_to_save), and with activation checkpointing."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_lora_shard_worker, args=(port, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for reports in ranks:
        for variant, report in reports.items():
            assert report["layers"] == ["FSDPQwen2DecoderLayer"] * 2  # each layer its own FSDP group
            assert report["base"] == [8 * 16, 16 * 16, False]  # half of q_proj's 16 x 16 frozen weight
            assert report["lora_A"] == [2 * 16, 4 * 16]
            adapter = [n for n in report["trainable"] if ".lora_A." in n or ".lora_B." in n]
            assert report["with_grad"] == report["trainable"] and len(adapter) == 2 * 7 * 2
            copies = [n for n in report["trainable"] if n not in adapter]
            assert len(copies) == (variant == "lm_head") and all("modules_to_save" in n for n in copies)
            assert report["lora_logits"] <= 1e-6 and report["reference_logits"] <= 1e-6
            assert report["grad_error"] <= 1e-5, (variant, report["grad_error"])
            assert report["checkpointed"] == [variant == "checkpointing"] * 2
    for variant, first in ranks[0].items():
        assert first["state_keys_equal"] and first["state_equal"] and first["tied"], variant
        assert first["merged_keys_equal"] and first["merged_equal"] and first["merged_changed"], variant
        assert first["merged_tied"], variant


def _fsdp_lora_recipe(tmp: Path, name: str) -> Path:
    """`_fsdp_recipe`'s stage (step 4: rank 1 runs the pass that adds zero) with a LoRA adapter
    (dropout 0) instead of lora: full, at the LoRA learning rate."""
    stage = {"batch_size": 12, "micro_batch_size": 2, "max_steps": 5,
             "data": {"source": "tiny:arith", "num_examples": 46, "eval_size": 8, "max_length": 128}}
    recipe = sft_recipe(tmp / name, **stage)
    recipe["lora"]["dropout"] = 0.0
    recipe["distributed"] = {"strategy": "fsdp"}
    return write_recipe(tmp / f"{name}.yaml", recipe)


@pytest.fixture(scope="module")
def fsdp_lora_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LoRA recipe under fsdp run by 1 process and by 2 (frozen base and adapter sharded)."""
    return _one_and_two_dir(tmp_path_factory, "fsdp_lora", _fsdp_lora_recipe)


@pytest.mark.slow
def test_fsdp_lora_two_processes_train_as_one(fsdp_lora_runs: Path) -> None:
    one, two = _stage(fsdp_lora_runs, "one"), _stage(fsdp_lora_runs, "two")
    _assert_same_steps(one, two)
    for name in WEIGHTS:  # the adapter, and the merged model later stages load
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst <= 1e-5, (name, worst)
    adapter = load_file(two / WEIGHTS[0])
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # lora_B starts at zero
    # each rank's shard file holds its part of the adapter, under one process's names, and nothing
    # of the frozen base (reloaded from its source on resume)
    c1 = load_file(sorted(one.glob("step-*"))[-1] / "params.safetensors")
    files = sorted(sorted(two.glob("step-*"))[-1].glob("shard-*.safetensors"))
    assert len(files) == 2
    for file in files:
        names = {k.removeprefix("model.") for k in load_file(file) if k.startswith("model.")}
        assert names == set(c1), sorted(names ^ set(c1))[:5]


@pytest.mark.slow
def test_fsdp_lora_resume_after_a_kill_is_bitwise(fsdp_lora_runs: Path, tmp_path: Path) -> None:
    recipe = _fsdp_lora_recipe(tmp_path, "k")
    stage = _stage(tmp_path, "k")
    kill_one_rank_then_rerun(recipe, stage, after_step=2, rank=1)
    assert final_hashes(stage) == final_hashes(_stage(fsdp_lora_runs, "two"))
    assert step_losses(stage) == step_losses(_stage(fsdp_lora_runs, "two"))
