"""Crash-safe checkpoints: RELIABILITY.md tests 3, 4, 9 and 10 on synthetic tensors and state.

Kill tests fork children from `forkserver` and use `RLFT_FAULT` to SIGKILL (or inject an errno)
at every phase of a save; each test records its figure in reliability-results.json.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import resource
import shutil
import signal
from pathlib import Path

import pytest
import safetensors.torch
import torch
from forkserver import get_server, record_result, reliability_n

from rlft.ckpt import faults, fsio
from rlft.ckpt.checkpoint import (
    Checkpoint,
    find_latest,
    load_checkpoint,
    save_checkpoint,
    step_dir_name,
    verify_checkpoint,
)
from rlft.errors import CheckpointError, UserInputError

META = {"recipe_sha256": "ab" * 32, "base_model": "tiny", "seed": 3, "num_threads": 1}
FILES_PER_SAVE = 5  # model, optimizer, rng .safetensors + state.json + manifest.json
SAVE_PHASES = (
    [f"after_file:{{k}}:{i}" for i in range(1, FILES_PER_SAVE + 1)]
    + [f"mid_file:{{k}}:{i}" for i in range(1, FILES_PER_SAVE + 1)]
    + [f"{p}:{{k}}" for p in ("before_manifest", "after_manifest", "before_rename")]
)
COMMIT_PHASES = [f"{p}:{{k}}" for p in ("after_rename", "before_latest", "after_latest", "during_retention")]


def synthetic(step: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Tensors and state that depend on the step, so a wrong checkpoint is caught by content."""
    g = torch.Generator().manual_seed(1000 + step)
    tensors = {
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.full((32,), float(step))},
        "optimizer": {"exp_avg": torch.randn(64, 32, generator=g), "step": torch.tensor(float(step))},
        "rng": {"torch_cpu": torch.arange(step, step + 16, dtype=torch.uint8)},
    }
    state = {"step": step, "loss": [1.0 / (i + 1) for i in range(step)], "cursor": {"epoch": 0, "index": 4 * step}}
    return tensors, state


def save_steps(stage_dir: str, first: int, last: int, keep_last: int | None) -> None:
    for step in range(first, last + 1):
        tensors, state = synthetic(step)
        save_checkpoint(Path(stage_dir), step, tensors, state, META, keep_last)


def resume_and_finish(stage_dir: str, last: int, keep_last: int | None) -> int:
    """What a stage does on --resume: newest verified checkpoint, check it, continue to `last`."""
    ckpt = find_latest(Path(stage_dir))
    start = 1 if ckpt is None else ckpt.step + 1
    if ckpt is not None:
        assert_content(ckpt, ckpt.step)
    save_steps(stage_dir, start, last, keep_last)
    return 0


def assert_content(ckpt: Checkpoint | Path, step: int) -> None:
    tensors, state, meta = load_checkpoint(ckpt, expect=("model", "optimizer", "rng"))
    want_tensors, want_state = synthetic(step)
    assert state == want_state and meta == META
    assert tensors.keys() == want_tensors.keys()
    for group, named in want_tensors.items():
        assert tensors[group].keys() == named.keys()
        assert all(torch.equal(tensors[group][k], v) for k, v in named.items()), group


def verified_steps(stage: Path) -> list[int]:
    steps = []
    for d in sorted(stage.glob("step-*")):
        try:
            steps.append(verify_checkpoint(d)["step"])
        except CheckpointError:
            pass
    return steps


def leftovers(stage: Path) -> list[str]:
    return sorted(p.name for p in stage.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def server():
    return get_server()


@pytest.fixture
def fault_env(monkeypatch):
    """Arm `RLFT_FAULT` in this process; disarmed (and re-read) after the test."""

    def arm(spec: str) -> None:
        monkeypatch.setenv(faults.ENV_VAR, spec)
        faults.reset()

    yield arm
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    faults.reset()


def check_kill(server, stage: Path, spec: str, k: int, committed: int, keep_last: int) -> None:
    """Run steps 1..k+1 with the fault at step k, check what a resume sees, then resume to the end."""
    result = server.run(save_steps, (str(stage), 1, k + 1, keep_last), env={faults.ENV_VAR: spec})
    assert result.returncode == -signal.SIGKILL, f"{spec}: child ended with {result.returncode}\n{result.output}"
    latest = find_latest(stage)
    assert latest is not None and latest.step == committed, f"{spec}: resumed from {latest}"
    assert k - latest.step <= 1  # lost work <= save_every (= 1)
    assert_content(latest, latest.step)
    assert not [n for n in leftovers(stage) if n.startswith(".staging")]  # dead writer's staging removed
    assert verified_steps(stage)[-1] == committed
    finish = server.run(resume_and_finish, (str(stage), k + 2, keep_last))
    assert finish.returncode == 0, finish.output
    assert verified_steps(stage) == list(range(k + 3 - keep_last, k + 3))
    assert (stage / "LATEST").read_text().strip() == step_dir_name(k + 2)
    assert leftovers(stage) == []


def test_kill_at_every_save_phase(server, tmp_path: Path) -> None:
    """RELIABILITY test 3: SIGKILL at each phase of the save of step 2 (and of step 3)."""
    trials = [(p, k) for k in (2, 3) for p in SAVE_PHASES + COMMIT_PHASES]
    failures = []
    for i, (phase, k) in enumerate(trials):
        spec = phase.format(k=k)
        committed = k if phase in COMMIT_PHASES else k - 1
        try:
            check_kill(server, tmp_path / f"t{i}", spec, k, committed, keep_last=1)
        except AssertionError as err:
            failures.append(f"{spec}: {err}")
    record_result("test_kill_at_every_save_phase", len(trials) - len(failures), len(trials))
    assert not failures, "\n".join(failures)


def test_retention_keeps_last_good(server, tmp_path: Path) -> None:
    """RELIABILITY test 4: keep_last 1 and 2, kills during saves and during deletions."""
    rng = random.Random(4)
    trials, failures = 0, []
    for keep_last in (1, 2):
        for i in range(reliability_n()):
            k = rng.randint(keep_last + 1, 5)  # a step whose save deletes an older checkpoint
            phase = "during_retention:{k}:1" if i % 2 == 0 else rng.choice(SAVE_PHASES + COMMIT_PHASES)
            spec = phase.format(k=k)
            committed = k if phase in COMMIT_PHASES or phase.startswith("during_retention") else k - 1
            trials += 1
            try:
                check_kill(server, tmp_path / f"k{keep_last}-{i}", spec, k, committed, keep_last)
            except AssertionError as err:
                failures.append(f"keep_last={keep_last} {spec}: {err}")
    record_result("test_retention_keeps_last_good", trials - len(failures), trials)
    assert not failures, "\n".join(failures)


def test_retention_stays_inside_and_spares_newer(tmp_path: Path) -> None:
    stage, outside = tmp_path / "stage", tmp_path / "outside"
    save_steps(str(outside), 1, 1, None)
    save_steps(str(stage), 9, 9, None)
    (stage / "step-00000009" / "state.json").write_text("{}\n")  # newer but corrupt: not ours to delete
    (stage / "step-00000001").symlink_to(outside / "step-00000001", target_is_directory=True)
    (stage / "step-00000003").mkdir()  # a partial dir without manifest
    (stage / "notes").mkdir()
    save_steps(str(stage), 4, 6, keep_last=1)
    names = sorted(p.name for p in stage.iterdir())
    assert names == ["LATEST", "notes", "step-00000001", "step-00000003", "step-00000006", "step-00000009"]
    assert verified_steps(outside) == [1]
    assert find_latest(stage).step == 6


def damage(path: Path, rng: random.Random) -> tuple[str, str]:
    """Flip one byte, truncate or delete a random file of a checkpoint; returns (kind, file)."""
    victim = rng.choice(sorted(path.iterdir()))
    kind = rng.choice(["flip", "truncate", "delete"])
    data = victim.read_bytes()
    if kind == "flip":
        pos = rng.randrange(len(data))
        victim.write_bytes(data[:pos] + bytes([data[pos] ^ rng.randint(1, 255)]) + data[pos + 1 :])
    elif kind == "truncate":
        victim.write_bytes(data[: rng.randrange(len(data))])
    else:
        victim.unlink()
    return kind, victim.name


def test_checkpoint_integrity(tmp_path: Path, monkeypatch, caplog) -> None:
    """RELIABILITY test 9: 50 random corruptions are detected before any tensor is loaded."""
    base = tmp_path / "base"
    save_steps(str(base), 1, 2, keep_last=None)
    loads = []
    real_load = safetensors.torch.load
    monkeypatch.setattr(safetensors.torch, "load", lambda data: loads.append(1) or real_load(data))
    rng, detected, trials = random.Random(9), 0, 50
    for i in range(trials):
        stage = tmp_path / f"t{i}"
        shutil.copytree(base, stage, symlinks=True)
        kind, name = damage(stage / "step-00000002", rng)
        loads.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rlft.ckpt.checkpoint"):
            with pytest.raises(CheckpointError) as err:
                load_checkpoint(stage / "step-00000002")
            latest = find_latest(stage)
        named = name in str(err.value) and name in caplog.text and "step-00000002" in caplog.text
        if not loads and named and latest is not None and latest.step == 1:
            detected += 1
        assert not loads, f"trial {i} ({kind} {name}): a tensor was loaded before verification failed"
        assert named, f"trial {i} ({kind} {name}): {err.value} / {caplog.text}"
        assert_content(latest, 1)
    record_result("test_checkpoint_integrity", detected, trials)
    assert detected == trials


def test_no_verified_checkpoint_and_missing_rng(tmp_path: Path, caplog) -> None:
    stage = tmp_path / "stage"
    save_steps(str(stage), 1, 2, keep_last=None)
    (stage / "step-00000002" / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError, match="rng.safetensors: missing"):
        load_checkpoint(stage / "step-00000002")
    (stage / "step-00000001" / "model.safetensors").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert find_latest(stage) is None
    assert "rng.safetensors" in caplog.text and "model.safetensors" in caplog.text
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies") as err:
        find_latest(stage, strict=True)
    assert "rng.safetensors" in str(err.value) and "step-00000001" in str(err.value)
    assert sorted(p.name for p in stage.glob("step-*")) == ["step-00000001", "step-00000002"]  # never deleted
    tensors, state = synthetic(3)
    del tensors["rng"]
    save_checkpoint(tmp_path / "norng", 3, tensors, state, META, keep_last=1)
    with pytest.raises(CheckpointError, match="rng.safetensors missing"):
        load_checkpoint(find_latest(tmp_path / "norng"), expect=("model", "rng"))
    assert find_latest(tmp_path / "empty") is None


def test_unlisted_file_and_symlinked_file_refused(tmp_path: Path) -> None:
    save_steps(str(tmp_path), 1, 1, keep_last=None)
    ckpt = tmp_path / "step-00000001"
    (ckpt / "extra.pt").write_bytes(b"pickle?")
    with pytest.raises(CheckpointError, match="extra.pt: present but not listed"):
        verify_checkpoint(ckpt)
    (ckpt / "extra.pt").unlink()
    model = ckpt / "model.safetensors"
    shutil.move(model, tmp_path / "elsewhere.safetensors")
    model.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot be read"):
        verify_checkpoint(ckpt)


def fill_disk_then_save(stage_dir: str, limit: int) -> None:
    save_steps(stage_dir, 1, 1, keep_last=1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    tensors, state = synthetic(2)
    tensors["model"]["big"] = torch.zeros(1 << 18)  # 1 MiB
    save_checkpoint(Path(stage_dir), 2, tensors, state, META, keep_last=1)


def check_failed_save(stage: Path, message: str, errname: str) -> None:
    assert errname in message and "step 2" in message, message
    assert str(stage) in message
    assert leftovers(stage) == []  # staging dir removed
    assert verified_steps(stage) == [1]
    assert_content(find_latest(stage), 1)


def test_disk_full_and_io_errors(server, tmp_path: Path, fault_env) -> None:
    """RELIABILITY test 10: EFBIG under RLIMIT_FSIZE, injected ENOSPC/EIO/EFBIG at each write phase."""
    passed, failures = 0, []
    result = server.run(fill_disk_then_save, (str(tmp_path / "fsize"), 64 * 1024))
    try:
        assert result.returncode == CheckpointError.exit_code, result.output
        check_failed_save(tmp_path / "fsize", result.output, "EFBIG")
        assert ".safetensors" in result.output  # the file being written is named
        passed += 1
    except AssertionError as err:
        failures.append(f"RLIMIT_FSIZE: {err}")
    cases = [f"{e}:{p}" for e in ("enospc", "eio", "efbig") for p in SAVE_PHASES]
    for i, case in enumerate(cases):
        stage = tmp_path / f"c{i}"
        save_steps(str(stage), 1, 1, keep_last=1)
        fault_env(case.format(k=2))
        try:
            with pytest.raises(CheckpointError) as err:
                save_steps(str(stage), 2, 2, keep_last=1)
            check_failed_save(stage, str(err.value), case.split(":")[0].upper())
            fault_env("")
            save_steps(str(stage), 2, 2, keep_last=1)  # space freed: the next save works
            assert verified_steps(stage) == [2]
            passed += 1
        except AssertionError as err:
            failures.append(f"{case}: {err}")
    record_result("test_disk_full_and_io_errors", passed, len(cases) + 1)
    assert not failures, "\n".join(failures)


def test_latest_failure_is_not_fatal(tmp_path: Path, fault_env, caplog) -> None:
    save_steps(str(tmp_path), 1, 1, keep_last=2)
    fault_env("enospc:before_latest:2")
    with caplog.at_level(logging.WARNING):
        save_steps(str(tmp_path), 2, 2, keep_last=2)
    assert "could not update" in caplog.text
    assert (tmp_path / "LATEST").read_text().strip() == "step-00000001"  # a stale hint...
    assert find_latest(tmp_path).step == 2  # ...that verification overrides


def test_only_safetensors_and_json_written(tmp_path: Path) -> None:
    save_steps(str(tmp_path), 1, 3, keep_last=2)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "LATEST"]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files), files
    manifest = json.loads((tmp_path / "step-00000003" / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["meta"] == META
    assert sorted(manifest["files"]) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]


def test_views_shared_and_noncontiguous_tensors(tmp_path: Path) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    group = {"a": base, "same": base, "t": base.t(), "row": base[1], "empty": torch.zeros(0)}
    save_checkpoint(tmp_path, 1, {"g": group}, {}, {}, keep_last=None)
    tensors, state, meta = load_checkpoint(find_latest(tmp_path))
    assert all(torch.equal(tensors["g"][k], v) for k, v in group.items())
    assert (state, meta) == ({}, {})


def test_json_state_round_trips_exactly(tmp_path: Path) -> None:
    state = {
        "big": 2**70, "neg": -7, "tenth": 0.1, "tiny": 5e-324, "negzero": -0.0, "inf": float("inf"),
        "flags": [True, False, None], "one": 1, "onef": 1.0, "text": "ü\n\"q\"",
        "nested": {"a": [{"b": [1, 2.5, "c"]}], "": 0},
    }
    save_checkpoint(tmp_path, 1, {}, state, META, keep_last=1)
    _, loaded, _ = load_checkpoint(find_latest(tmp_path))
    assert loaded == state and list(loaded) == list(state)
    assert [type(v) for v in loaded.values()] == [type(v) for v in state.values()]
    assert str(loaded["negzero"]) == "-0.0" and type(loaded["flags"][0]) is bool


@pytest.mark.parametrize(
    ("state", "meta", "match"),
    [
        ({"x": (1, 2)}, {}, r"state.x: a tuple"),
        ({"x": {1: 2}}, {}, r"state.x: key 1"),
        ({"x": [torch.tensor(1.0)]}, {}, r"state.x\[0\]: a Tensor"),
        ({}, {"loss": float("nan")}, r"not JSON compliant"),
    ],
)
def test_save_rejects_non_json_before_writing(tmp_path: Path, state: dict, meta: dict, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        save_checkpoint(tmp_path / "s", 1, {}, state, meta, keep_last=1)
    assert not (tmp_path / "s").exists()


def test_resave_of_existing_step_replaces_it_whole(tmp_path: Path) -> None:
    save_steps(str(tmp_path), 1, 2, keep_last=None)
    first = (tmp_path / step_dir_name(2)).stat().st_ino
    save_steps(str(tmp_path), 2, 2, keep_last=None)  # a resume from step 1 redoes step 2
    assert verified_steps(tmp_path) == [1, 2]
    assert (tmp_path / step_dir_name(2)).stat().st_ino != first  # the new directory, not the old
    assert not list(tmp_path.glob(".replaced-*")) and not list(tmp_path.glob(".staging-*"))


def test_commit_dir_puts_the_old_dir_back_when_the_rename_fails(tmp_path: Path, monkeypatch) -> None:
    final, staging = tmp_path / "final", tmp_path / ".staging"
    final.mkdir()
    (final / "a").write_text("old")
    staging.mkdir()
    (staging / "a").write_text("new")
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src) == staging:
            raise OSError(errno.EIO, "rename refused")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError):
        fsio.commit_dir(staging, final)
    assert (final / "a").read_text() == "old" and (staging / "a").read_text() == "new"
    assert not list(tmp_path.glob(".replaced-*"))


def test_a_kill_between_aside_and_cleanup_leaves_a_leftover_the_next_save_removes(tmp_path: Path, monkeypatch) -> None:
    save_steps(str(tmp_path), 1, 1, keep_last=None)
    aside = tmp_path / f".replaced-{step_dir_name(1)}-0123"
    shutil.copytree(tmp_path / step_dir_name(1), aside)  # what a kill after the rename leaves
    save_steps(str(tmp_path), 2, 2, keep_last=None)
    assert not aside.exists() and verified_steps(tmp_path) == [1, 2]


def test_fault_spec_parsing(monkeypatch) -> None:
    f = faults.parse("after_file:3, enospc:mid_file:2:4,kill:nan_loss:7")
    assert [(x.phase, x.step, x.nth, x.errno) for x in f] == [
        ("after_file", 3, 1, None), ("mid_file", 2, 4, 28), ("nan_loss", 7, 1, None)
    ]
    for bad in ("after_file", "after_file:x", "bogus:after_file:1", "after_file:1:0"):
        with pytest.raises(UserInputError, match="RLFT_FAULT"):
            faults.parse(bad)
    monkeypatch.setenv(faults.ENV_VAR, "eio:p:1:2,nan_loss:4")
    faults.reset()
    try:
        faults.fault_point("p", 1)  # first arrival: not armed
        with pytest.raises(OSError) as err:
            faults.fault_point("p", 1, "/x/y")
        assert err.value.errno == 5 and err.value.filename == "/x/y"
        assert [faults.fault_active("nan_loss", s) for s in (3, 4, 4)] == [False, True, False]
    finally:
        monkeypatch.delenv(faults.ENV_VAR)
        faults.reset()
    os.environ.pop(faults.ENV_VAR, None)
    assert faults.match("p", 1) is None
