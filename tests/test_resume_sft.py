"""Exact resume of the SFT stage (RELIABILITY.md tests 1, 3, 7, 9, 8).

Runs are forked from a server that has imported the libraries once (tests/forkserver.py), killed
with SIGKILL at random instants (or by fault injection at each save phase), then resumed with
`rlft stage sft --resume`; the final weights, the newest checkpoint's tensors and the per-step
losses must be bitwise those of an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forkserver import get_server, record_result, reliability_n
from helpers import final_hashes, newest_checkpoint_tensors, sft_recipe, step_losses, write_recipe

from rlft.cli import main

STEPS = 12


def _recipe(tmp: Path, name: str) -> Path:
    recipe = sft_recipe(tmp / name, max_steps=STEPS)
    return write_recipe(tmp / f"{name}.yaml", recipe)


def _outcome(out: Path) -> tuple:
    stage = out / "t" / "sft"
    return final_hashes(stage), newest_checkpoint_tensors(stage), step_losses(stage)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple, float]:
    """The uninterrupted run (forked like the others) and how long it took."""
    tmp = tmp_path_factory.mktemp("ref")
    get_server()  # start (and import) before timing
    t0 = time.monotonic()
    result = get_server().start(main, (["run", str(_recipe(tmp, "ref"))],)).wait()
    assert result.returncode == 0, result.output
    return _outcome(tmp / "ref"), time.monotonic() - t0


def _resume(recipe: Path) -> None:
    result = get_server().start(main, (["stage", "sft", "--recipe", str(recipe), "--resume"],)).wait()
    assert result.returncode == 0, result.output


def _kill_resume_trials(tmp: Path, reference: tuple, duration: float, n: int, seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    passed = killed_mid_run = 0
    for i in range(n):
        recipe = _recipe(tmp, f"k{i}")
        child = get_server().start(main, (["run", str(recipe)],))
        result = child.kill_after(rng.uniform(0.3, 0.9) * duration)
        killed_mid_run += result.killed
        _resume(recipe)
        passed += _outcome(tmp / f"k{i}") == reference
    return passed, killed_mid_run


def test_kill9_sft_resume_bitwise(tmp_path: Path, reference: tuple[tuple, float]) -> None:
    """Test 1: SIGKILL at a uniform random time, resume: bitwise equal N/N."""
    ref, duration = reference
    n = reliability_n()
    passed, killed = _kill_resume_trials(tmp_path, ref, duration, n, seed=1)
    record_result("test_kill9_sft_resume_bitwise", passed, n, killed_mid_run=killed)
    assert killed >= n // 2, f"only {killed}/{n} runs were actually killed mid-run"
    assert passed == n


def test_resume_in_a_fresh_interpreter(tmp_path: Path, reference: tuple[tuple, float]) -> None:
    """Test 1's extra case: the resume runs in a new process (import-time state included)."""
    ref, duration = reference
    recipe = _recipe(tmp_path, "fresh")
    get_server().start(main, (["run", str(recipe)],)).kill_after(0.6 * duration)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "rlft.cli", "stage", "sft", "--recipe", str(recipe), "--resume"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _outcome(tmp_path / "fresh") == ref


PHASES = ["after_file", "mid_file", "before_manifest", "after_manifest", "before_rename", "after_rename",
          "before_latest", "after_latest", "during_retention"]


@pytest.mark.parametrize("phase", PHASES)
def test_kill_at_every_save_phase_sft(tmp_path: Path, reference: tuple[tuple, float], phase: str) -> None:
    """Test 3 on the real stage: die inside the save of step 5; resume is still bitwise."""
    ref, _ = reference
    recipe = _recipe(tmp_path, "p")
    result = get_server().start(main, (["run", str(recipe)],), env={"RLFT_FAULT": f"{phase}:5"}).wait()
    assert result.returncode == -signal.SIGKILL, result.output
    stage = tmp_path / "p" / "t" / "sft"
    newest = sorted(stage.glob("step-*"))[-1].name
    assert newest in ("step-00000004", "step-00000005")  # lost work <= save_every
    _resume(recipe)
    assert _outcome(tmp_path / "p") == ref


def test_sigterm_saves_and_resume_loses_nothing(tmp_path: Path, reference: tuple[tuple, float]) -> None:
    """Test 7: SIGTERM mid-run commits the current step and exits; the resumed run is bitwise."""
    ref, duration = reference
    recipe = _recipe(tmp_path, "term")
    child = get_server().start(main, (["run", str(recipe)],))
    stage = tmp_path / "term" / "t" / "sft"
    deadline = time.monotonic() + 60
    while not (stage / "step-00000003").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    os.kill(child.pid, signal.SIGTERM)
    result = child.wait()
    assert result.returncode == 128 + signal.SIGTERM, result.output
    assert time.monotonic() - t0 < duration / 2 + 1.0
    logged = max(step for step, _ in step_losses(stage))
    assert sorted(stage.glob("step-*"))[-1].name == f"step-{logged:08d}"  # 0 steps lost
    _resume(recipe)
    assert _outcome(tmp_path / "term") == ref


def test_corrupt_newest_checkpoint_falls_back(tmp_path: Path, reference: tuple[tuple, float]) -> None:
    """Test 9 on the stage: a flipped byte in the newest checkpoint is detected, the previous
    one is used, and the result is still bitwise the uninterrupted run."""
    ref, _ = reference
    recipe = _recipe(tmp_path, "c")
    assert get_server().start(main, (["run", str(recipe)],), env={"RLFT_FAULT": "kill_step:7"}).wait().returncode
    stage = tmp_path / "c" / "t" / "sft"
    newest = sorted(stage.glob("step-*"))[-1]
    target = newest / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x40
    target.write_bytes(bytes(data))
    _resume(recipe)
    assert _outcome(tmp_path / "c") == ref


def test_resume_refuses_changed_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Test 8 (recipe keys and seed): exit 2 naming each key old -> new; --force proceeds."""
    recipe = _recipe(tmp_path, "chg")
    assert main(["run", str(recipe), "--set", "stages.sft.max_steps=3"]) == 0  # finished, checkpoint at 3
    capsys.readouterr()
    code = main(["stage", "sft", "--recipe", str(recipe), "--resume", "--set", "stages.sft.lr=0.5", "--set", "seed=3"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "stages.sft.lr: 0.01 -> 0.5" in err and "seed: 0 -> 3" in err
    forced = ["stage", "sft", "--recipe", str(recipe), "--resume", "--force", "--set", "stages.sft.lr=0.5"]
    assert main(forced) == 0
    manifest = (sorted((tmp_path / "chg" / "t" / "sft").glob("step-*"))[-1] / "manifest.json").read_text()
    assert "stages.sft.lr: 0.01 -> 0.5" in manifest  # the override is recorded


def test_second_run_on_the_same_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Test 11 through the CLI: while one run holds the run directory, a second `rlft run` exits
    2 within 2 s naming the holder's PID and writes nothing; after it ends, the lock is free."""
    recipe = write_recipe(tmp_path / "r.yaml", sft_recipe(tmp_path / "out", max_steps=40, save_every=100))
    child = get_server().start(main, (["run", str(recipe)],))
    lock = tmp_path / "out" / "t" / "rlft.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and str(child.pid) in lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    code = main(["run", str(recipe), "--set", "stages.sft.lr=0.5"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 2.0, (code, elapsed, err)
    assert f"PID {child.pid}" in err
    assert "0.5" not in (tmp_path / "out" / "t" / "recipe.yaml").read_text()  # the loser wrote nothing
    child.kill()
    child.wait()
    # the holder died: its lock is stale and the next run takes it over
    assert main(["run", str(recipe), "--set", "stages.sft.max_steps=2"]) == 0


def _rlft(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "rlft"), *args], env=env, capture_output=True, text=True)


def test_no_verifiable_checkpoint_is_exit_3_not_a_silent_restart(tmp_path: Path) -> None:
    """Every checkpoint of a stage corrupt: `rlft stage --resume` and `rlft run` both exit 3
    naming the stage dir and what is wrong with each checkpoint, and touch nothing; --restart
    starts the stage over."""
    recipe = _recipe(tmp_path, "bad")
    assert get_server().start(main, (["run", str(recipe)],), env={"RLFT_FAULT": "kill_step:4"}).wait().returncode
    stage = tmp_path / "bad" / "t" / "sft"
    older, newest = sorted(stage.glob("step-*"))  # keep_last: 2
    params = older / "params.safetensors"
    params.write_bytes(params.read_bytes()[:-8])  # truncated
    (newest / "state.json").write_text("{}\n")  # rewritten
    before = {p: p.stat().st_mtime_ns for p in stage.rglob("*")}
    for args in (["stage", "sft", "--recipe", str(recipe), "--resume"], ["run", str(recipe)]):
        proc = _rlft(*args)
        assert proc.returncode == 3, (args, proc.stderr)
        err = " ".join(proc.stderr.split())  # undo the console's line wrapping
        assert "Traceback" not in err and f"no checkpoint in {stage} verifies" in err, err
        for ckpt, file in ((older, "params.safetensors"), (newest, "state.json")):
            assert f"{ckpt} failed verification: {file}: size" in err, err
        assert {p: p.stat().st_mtime_ns for p in stage.rglob("*")} == before, args
    proc = _rlft("stage", "sft", "--recipe", str(recipe), "--restart")
    assert proc.returncode == 0, proc.stderr
    assert (stage / "stage.done.json").exists() and step_losses(stage)[0][0] == 1
