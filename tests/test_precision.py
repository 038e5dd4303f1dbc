"""Training precision (`model.precision`): fp32, bf16 autocast over fp32 weights, bf16 weights with
fp32 master weights in AdamW; and the recipe errors of choices that contradict `dtype`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import rlft, sft_recipe, step_losses, write_recipe
from safetensors.torch import load_file

from rlft import precision
from rlft.ckpt.trainstate import optimizer_to_tensors, state_dict_from_tensors
from rlft.recipe.schema import ModelSpec


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, generator=g).to(dtype) + 8.0)]


def _quadratic_steps(opt: torch.optim.Optimizer, p: torch.nn.Parameter, steps: int) -> list[float]:
    """Pull p towards 0 with a gradient of p, at a learning rate whose updates are far below bf16's
    spacing near 8 (2**-5): only an fp32 accumulator can move it."""
    losses = []
    for _ in range(steps):
        loss = (p.float() ** 2).sum() / 2
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_fp32_master_weights_accumulate_updates_bf16_adamw_rounds_away() -> None:
    [plain_p], [master_p] = _params(torch.bfloat16), _params(torch.bfloat16)
    start = master_p.detach().clone()
    plain = torch.optim.AdamW([plain_p], lr=1e-3, weight_decay=0.0)
    master = precision.make_adamw([master_p], lr=1e-3, weight_decay=0.0)
    assert isinstance(master, precision.MasterWeightAdamW)
    _quadratic_steps(plain, plain_p, 40)
    losses = _quadratic_steps(master, master_p, 40)
    assert torch.equal(plain_p.detach(), start)  # every update of ~1e-3 rounded away at |p| ~ 8
    assert master_p.dtype == torch.bfloat16 and master.masters[0].dtype == torch.float32
    assert float((start.float() - master.masters[0]).mean()) == pytest.approx(0.04, rel=0.05)  # 40 x lr
    assert torch.equal(master_p.detach(), master.masters[0].detach().to(torch.bfloat16))
    assert losses[-1] < losses[0]
    for state in master.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32


def test_master_weights_resume_exactly_from_the_state_dict() -> None:
    [p] = _params(torch.bfloat16)
    opt = precision.make_adamw([p], lr=1e-3)
    assert isinstance(opt, precision.MasterWeightAdamW)
    _quadratic_steps(opt, p, 5)
    tensors, skeleton = optimizer_to_tensors(opt)
    saved = {k: v.clone() for k, v in tensors.items()}
    [q] = _params(torch.bfloat16, seed=1)
    with torch.no_grad():
        q.copy_(p)  # the checkpoint's (rounded) weights
    fresh = precision.make_adamw([q], lr=1e-3)
    assert isinstance(fresh, precision.MasterWeightAdamW)
    fresh.load_state_dict(state_dict_from_tensors(saved, skeleton))
    assert torch.equal(fresh.masters[0], opt.masters[0])  # the fp32 value, not the rounded weight
    _quadratic_steps(opt, p, 3)
    _quadratic_steps(fresh, q, 3)
    assert torch.equal(fresh.masters[0], opt.masters[0]) and torch.equal(q, p)


def test_fp32_parameters_are_their_own_master() -> None:
    [p] = _params(torch.float32)
    assert type(precision.make_adamw([p], lr=1e-3)) is torch.optim.AdamW


def test_autocast_forward_runs_bf16_matmuls_and_returns_fp32_logits() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64))
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        precision.enable_autocast(model, torch.device("cpu"))
        cast = model(input_ids=ids).logits
    assert cast.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32
    assert not torch.equal(cast, reference)  # bf16 matmuls round
    torch.testing.assert_close(cast, reference, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("choice", ["bf16_autocast", "bf16_master"])
def test_sft_loss_falls_and_saved_weights_keep_their_dtype(tmp_path: Path, choice: str) -> None:
    recipe = sft_recipe(tmp_path, epochs=1, batch_size=8, micro_batch_size=8, save_every=2, eval_samples=4)
    recipe["model"]["precision"] = choice
    recipe["lora"] = "full" if choice == "bf16_master" else recipe["lora"]
    result = rlft("run", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [loss for _, loss in step_losses(tmp_path / "t" / "sft")]
    assert len(losses) == 5 and sum(losses[-2:]) < sum(losses[:2]), losses
    weights = load_file(tmp_path / "t/sft/final/model/model.safetensors")
    want = torch.bfloat16 if choice == "bf16_master" else torch.float32
    assert {t.dtype for t in weights.values()} == {want}
    config = json.loads((tmp_path / "t/sft/final/model/config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(want).removeprefix("torch.")


@pytest.mark.parametrize(("choice", "dtype"), [("fp32", "bfloat16"), ("bf16_autocast", "float16"),
                                               ("bf16_master", "float32")])
def test_precision_contradicting_dtype_is_a_recipe_error(tmp_path: Path, choice: str, dtype: str) -> None:
    with pytest.raises(ValueError, match=f"precision: {choice} keeps weights in"):
        ModelSpec(name="tiny:nano", precision=choice, dtype=dtype)  # pyright: ignore[reportArgumentType]
    recipe = sft_recipe(tmp_path)
    recipe["model"] |= {"precision": choice, "dtype": dtype}
    result = rlft("validate", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode != 0
    assert "r.yaml:" in result.stderr + result.stdout and f"precision: {choice}" in result.stderr + result.stdout


def test_auto_is_fp32_on_cpu_and_bf16_master_on_cuda() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.resolve_precision("auto", cpu) == "fp32" and precision.resolve_precision("auto", cuda) == "bf16_master"
    assert precision.weight_dtype("auto", "auto", cpu) == torch.float32
    assert precision.weight_dtype("auto", "auto", cuda) == torch.bfloat16
    assert precision.weight_dtype("bf16_autocast", "auto", cuda) == torch.float32
