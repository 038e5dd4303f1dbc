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

import pytest
from helpers import final_hashes, sft_recipe, step_losses, write_recipe
from safetensors.torch import load_file

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


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same recipe run by 1 process and by 2 (`two`), once for the module."""
    tmp = tmp_path_factory.mktemp("dist")
    one = _rlft("run", str(_recipe(tmp, "one")))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _rlft("run", str(_recipe(tmp, "two")), "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
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
    assert refused.returncode != 0
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


@pytest.mark.slow
def test_kill9_of_one_rank_then_rerun_equals_uninterrupted(runs: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "k")
    stage = _stage(tmp_path, "k")
    launcher = subprocess.Popen([str(RLFT), "run", str(recipe), "--nproc", "2"], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (stage / "step-00000002").exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = _rank_pid(launcher.pid, 1)
    assert victim is not None and launcher.poll() is None, "the job ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    assert launcher.wait(timeout=300) != 0  # torchrun brings the job down
    assert not (stage / "stage.done.json").exists()
    rerun = _rlft("run", str(recipe), "--nproc", "2")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert final_hashes(stage) == final_hashes(_stage(runs, "two"))
    assert step_losses(stage) == step_losses(_stage(runs, "two"))


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


def test_nproc_refuses_stages_that_run_in_one_process_only(tmp_path: Path) -> None:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-grpo.yaml"
    refused = _rlft("run", str(recipe), "--nproc", "2", "--set", f"output_dir={tmp_path}",
                    "--set", "stages.rl.sampling.engine=vllm")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "(grpo, sampling.engine vllm) runs in one process only so far" in " ".join(refused.stderr.split())
    assert list(tmp_path.iterdir()) == []  # refused before torchrun started or anything was written


def _distill_recipe(tmp: Path, name: str) -> Path:
    """SFT, then sequence-level distillation into a fully fine-tuned tiny student (a tiny:student
    that rank 0 builds, teacher completions that rank 0 writes and every rank reads)."""
    recipe = sft_recipe(tmp / name, batch_size=8, micro_batch_size=4, max_steps=2)
    recipe["lora"]["dropout"] = 0.0
    recipe["stages"]["distill"] = {
        "kind": "distill", "teacher": "sft", "student": {"name": "tiny:student"}, "lora": "full",
        "mode": "sequence", "data": {"source": "tiny:arith", "num_examples": 24, "eval_size": 4, "max_length": 96},
        "sampling": {"temperature": 1.0, "max_new_tokens": 8}, "max_steps": 3, "batch_size": 8,
        "micro_batch_size": 2, "eval_samples": 4, "eval_max_new_tokens": 4, "save_every": 1,
    }
    return write_recipe(tmp / f"{name}.yaml", recipe)


@pytest.mark.slow
def test_two_processes_distill_as_one(tmp_path: Path) -> None:
    one = _rlft("run", str(_distill_recipe(tmp_path, "one")))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _rlft("run", str(_distill_recipe(tmp_path, "two")), "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = tmp_path / "one" / "t" / "distill", tmp_path / "two" / "t" / "distill"
    assert (a / "final").exists() and (b / "final").exists()
    la, lb = step_losses(a), step_losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3]
    assert all(abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(la, lb, strict=True)), (la, lb)
    wa, wb = load_file(a / "final/model/model.safetensors"), load_file(b / "final/model/model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5
