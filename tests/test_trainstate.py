"""Exact-resume state: RNG streams, optimizer/scheduler bitwise round trips, input pinning, SIGTERM."""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from rlft.ckpt.checkpoint import find_latest, load_checkpoint, save_checkpoint
from rlft.ckpt.trainstate import (
    GracefulExit,
    capture_rng,
    check_inputs,
    load_optimizer,
    load_scheduler,
    optimizer_to_tensors,
    restore_rng,
    scheduler_state,
    state_dict_from_tensors,
    state_dict_to_tensors,
)
from rlft.errors import CheckpointError, UserInputError


def draws(gen: torch.Generator) -> list:
    return [
        [random.random() for _ in range(3)], random.gauss(0, 1), random.randrange(10**12),
        np.random.rand(3).tolist(), np.random.normal(size=3).tolist(),
        torch.rand(4).tolist(), torch.randn(3).tolist(), torch.rand(3, generator=gen).tolist(),
        torch.nn.functional.dropout(torch.ones(16), 0.5).tolist(),
    ]


def test_rng_round_trip_through_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.normal()  # and in numpy's
    tensors, state = capture_rng({"dropout": gen})
    save_checkpoint(tmp_path, 1, {"rng": tensors}, {"rng": state}, {}, keep_last=1)
    expected = draws(gen)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    gen.manual_seed(99)
    assert draws(gen) != expected  # the disturbance is real
    loaded, loaded_state, _ = load_checkpoint(find_latest(tmp_path), expect=("rng",))
    restore_rng(loaded["rng"], loaded_state["rng"], {"dropout": gen})
    assert draws(gen) == expected


def test_rng_missing_parts_refused() -> None:
    tensors, state = capture_rng()
    with pytest.raises(CheckpointError, match="generator 'sampler'"):
        restore_rng(tensors, state, {"sampler": torch.Generator()})
    with pytest.raises(CheckpointError, match="torch_cpu"):
        restore_rng({}, state)
    with pytest.raises(CheckpointError, match="numpy"):
        restore_rng(tensors, {k: v for k, v in state.items() if k != "numpy"})


def make_training(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_optimizer_and_scheduler_resume_bitwise(tmp_path: Path) -> None:
    model, opt, sched = make_training(0)
    train(model, opt, sched, range(3))
    opt_tensors, opt_state = optimizer_to_tensors(opt)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    state = {"optimizer": opt_state, "scheduler": scheduler_state(sched)}
    save_checkpoint(tmp_path, 3, {"model": params, "optimizer": opt_tensors}, state, {}, keep_last=1)
    train(model, opt, sched, range(3, 8))  # the uninterrupted run

    resumed, ropt, rsched = make_training(123)  # different init: everything must come from the checkpoint
    tensors, loaded_state, _ = load_checkpoint(find_latest(tmp_path))
    resumed.load_state_dict(tensors["model"])
    load_optimizer(ropt, tensors["optimizer"], loaded_state["optimizer"])
    load_scheduler(rsched, loaded_state["scheduler"])
    train(resumed, ropt, rsched, range(3, 8))
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for sa, sb in zip(opt.state.values(), ropt.state.values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert opt.param_groups[0]["lr"] == ropt.param_groups[0]["lr"] and ropt.param_groups[0]["betas"] == (0.8, 0.95)


def test_optimizer_shape_mismatch_is_a_checkpoint_error() -> None:
    _, opt, _ = make_training(0)
    tensors, skeleton = optimizer_to_tensors(opt)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(CheckpointError, match="LoRA rank"):
        load_optimizer(other, tensors, skeleton)


def test_state_dict_split_is_exact() -> None:
    sd = {
        "state": {0: {"t": torch.arange(3), "n": None}, 7: {"step": torch.tensor(2.0)}},
        "groups": [{"betas": (0.9, (1, 2.5)), "lr": torch.tensor(0.1), "params": [0, 7], "x.y": 1}],
        "__rlft_tensor__": "not a marker",
    }
    tensors, skeleton = state_dict_to_tensors(sd)
    back = state_dict_from_tensors(tensors, skeleton)
    assert back["state"].keys() == {0, 7} and back["groups"][0]["betas"] == (0.9, (1, 2.5))
    assert torch.equal(back["state"][0]["t"], sd["state"][0]["t"]) and back["state"][0]["n"] is None
    assert back["groups"][0]["params"] == [0, 7] and back["__rlft_tensor__"] == "not a marker"
    assert len(tensors) == 3
    with pytest.raises(TypeError, match="cannot be checkpointed"):
        state_dict_to_tensors({"f": np.float32(1.0)})
    with pytest.raises(TypeError, match="holds tensors"):
        scheduler_state(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(0.1)))


def test_check_inputs_reports_every_change(caplog) -> None:
    saved = {"recipe_sha256": "aa", "data": {"train": "d1"}, "seed": 1, "lr": 1e-4, "num_threads": 2, "tok": "t"}
    current = {"recipe_sha256": "bb", "data": {"train": "d2"}, "seed": 1, "lr": 2e-4, "num_threads": 1}
    keys = ["recipe_sha256", "data.train", "seed", "lr", "num_threads", "tok"]
    with pytest.raises(UserInputError) as err:
        check_inputs(saved, current, keys, force=False)
    text = str(err.value)
    for line in ('recipe_sha256: "aa" -> "bb"', 'data.train: "d1" -> "d2"', "lr: 0.0001 -> 0.0002",
                 'tok: "t" -> <missing>', "--force"):
        assert line in text
    assert "seed" not in text and "num_threads" not in text
    with caplog.at_level(logging.WARNING):
        lines = check_inputs(saved, current, keys, force=True)
    assert len(lines) == 4 and "num_threads: 2 -> 1" in caplog.text
    assert check_inputs(saved, dict(saved), keys, force=False) == []
    with pytest.raises(UserInputError, match="seed: 1 -> 1.0"):  # a type change is a change
        check_inputs({"seed": 1}, {"seed": 1.0}, ["seed"], force=False)


def test_graceful_exit_sets_flag_then_exits() -> None:
    before, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = GracefulExit()
    assert not stop.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.should_stop() and stop.reason == "SIGTERM"
    with pytest.raises(SystemExit) as exc:
        stop.exit()
    assert exc.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    with GracefulExit() as stop2:
        signal.raise_signal(signal.SIGINT)
        assert stop2.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # a second Ctrl-C stops at once
    assert signal.getsignal(signal.SIGINT) is before_int
