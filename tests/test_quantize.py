"""QLoRA base weights (`model.quantize`): a clear recipe error where bitsandbytes cannot run (no
CUDA, package missing), LoRA required, the documented transformers configuration built for the
GPU path (checked with fakes here; the real load is marked gpu), and a --dry-run that rehearses
the recipe on CPU without quantizing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import rlft, sft_recipe, write_recipe

from rlft import precision
from rlft.errors import UserInputError


def _line_of(path: Path, key: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(f"{key}:"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA error")
def test_quantize_without_cuda_is_a_recipe_error_at_its_line(tmp_path: Path) -> None:
    recipe = sft_recipe(tmp_path)
    recipe["model"]["quantize"] = "4bit"
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = rlft("run", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"r.yaml:{_line_of(path, 'quantize')}" in result.stderr
    assert "model.quantize: 4bit base weights (QLoRA, bitsandbytes) need a CUDA GPU" in result.stderr
    assert not (tmp_path / "t" / "sft").exists()  # nothing trained


def test_quantize_needs_lora_in_every_training_stage(tmp_path: Path) -> None:
    recipe = sft_recipe(tmp_path)
    recipe["model"]["quantize"] = "8bit"
    recipe["stages"]["sft"]["lora"] = "full"
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = rlft("validate", str(path))
    assert result.returncode == 2
    lines = path.read_text().splitlines()
    stage_lora = next(i for i, line in enumerate(lines, 1) if line.startswith("    lora: full"))
    assert f"r.yaml:{stage_lora}" in result.stderr and "stages.sft.lora: quantize: 8bit trains a LoRA" in result.stderr


def test_missing_bitsandbytes_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert "pip install bitsandbytes" in (precision.quantization_problem("4bit", cuda=True) or "")
    assert precision.quantization_problem("none", cuda=False) is None
    with pytest.raises(UserInputError, match="model.quantize: 4bit .* bitsandbytes"):
        precision.quantization_kwargs("4bit", torch.device("cuda"))


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_the_gpu_path_builds_the_documented_bitsandbytes_config(monkeypatch: pytest.MonkeyPatch, quantize: str) -> None:
    """With CUDA and bitsandbytes faked present: QLoRA's NF4 + double quantization + bf16 compute
    (4bit) or LLM.int8() (8bit), placed on the training GPU by device_map."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    kwargs = precision.quantization_kwargs(quantize, torch.device("cuda", 1))
    config = kwargs["quantization_config"]
    assert kwargs["device_map"] == {"": 1}
    if quantize == "4bit":
        assert config.load_in_4bit and not config.load_in_8bit
        assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
        assert config.bnb_4bit_compute_dtype == torch.bfloat16
    else:
        assert config.load_in_8bit and not config.load_in_4bit
    assert precision.quantization_kwargs("none", torch.device("cpu")) == {}


def test_dry_run_rehearses_a_quantized_recipe_on_cpu(tmp_path: Path) -> None:
    recipe = sft_recipe(tmp_path, max_steps=2)
    recipe["model"]["quantize"] = "4bit"
    result = rlft("run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "t-dry-run" / "sft" / "stage.done.json").exists()


@pytest.mark.gpu
def test_qlora_sft_on_cuda(tmp_path: Path) -> None:  # pragma: no cover - needs CUDA and bitsandbytes
    pytest.importorskip("bitsandbytes")
    recipe = sft_recipe(tmp_path, max_steps=4)
    recipe["model"]["quantize"] = "4bit"
    result = rlft("run", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 0, result.stdout + result.stderr
