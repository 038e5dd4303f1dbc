"""Training precision: plain fp32, bf16 autocast over fp32 weights, or bf16 weights with fp32 master
weights in the optimizer (`model.precision`).

- `fp32`: weights and arithmetic in float32.
- `bf16_autocast`: float32 weights; every forward runs under `torch.autocast(bfloat16)` (matmuls in
  bf16, reductions and the optimizer in fp32); logits come back as float32 for the losses.
- `bf16_master`: bfloat16 weights (half the memory of the frozen base); the optimizer keeps a
  float32 master copy of each trainable parameter that is not already float32, takes AdamW's step
  on it with fp32 moments, and writes the rounded result back. Small updates accumulate in the
  master instead of being rounded away, as they would be by AdamW on bf16 weights. (peft keeps
  LoRA adapters in float32 already; they need no copy.)
- `auto`: fp32 on CPU (bf16 matmuls are slow there), bf16_master on CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16_autocast", "bf16_master")


def resolve_precision(name: str, dev: torch.device) -> str:
    """`auto` -> bf16_master on CUDA, fp32 elsewhere; any other name is returned as is."""
    if name == "auto":
        return "bf16_master" if dev.type == "cuda" else "fp32"
    return name


def weight_dtype(precision: str, dtype: str, dev: torch.device) -> torch.dtype:
    """The dtype weights load in: the recipe's explicit `dtype`, else what `precision` needs
    (bfloat16 for bf16_master, float32 otherwise)."""
    explicit = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype in explicit:
        return explicit[dtype]
    return torch.bfloat16 if resolve_precision(precision, dev) == "bf16_master" else torch.float32


def enable_autocast(model: Any, dev: torch.device) -> None:
    """Run `model`'s forward under bf16 autocast on `dev` and return its logits in float32.

    The wrapper sits on the instance, so a peft wrapper and generation, which call this forward,
    get it too."""
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        logits = getattr(out, "logits", None)
        if isinstance(logits, torch.Tensor) and logits.dtype != torch.float32:
            out.logits = logits.float()
        return out

    model.forward = autocast_forward


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on float32 master copies of low-precision parameters.

    The model's parameters keep their dtype (bf16) and receive the gradients; `step` copies those
    gradients into the float32 masters, steps the masters, and writes them back rounded. float32
    parameters are stepped directly (they are their own master). The masters are part of the
    state dict (`master` in each parameter's state), so a resume continues from the exact fp32
    values, not from the rounded weights.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], **kwargs: Any):
        self.model_params = list(params)
        self.masters = [
            p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone())
            for p in self.model_params
        ]
        super().__init__(self.masters, **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # pyright: ignore[reportIncompatibleMethodOverride]
        for p, m in zip(self.model_params, self.masters, strict=True):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        out = super().step(closure)
        for p, m in zip(self.model_params, self.masters, strict=True):
            if m is not p:
                self.state[m]["master"] = m
                p.copy_(m)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def load_state_dict(self, state_dict: Any) -> None:
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for p, m in zip(self.model_params, self.masters, strict=True):
                saved = self.state[m].get("master") if m is not p else None
                if saved is not None:
                    m.copy_(saved)
                    self.state[m]["master"] = m
                    p.copy_(m)


def make_adamw(params: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW for `params`, with fp32 masters when any of them is in lower precision (bf16_master, or
    an explicit `dtype: bfloat16`): rlft never steps AdamW on bf16 weights directly."""
    if any(p.dtype != torch.float32 for p in params):
        kwargs.pop("fused", None)  # the masters are stepped by the reference implementation
        return MasterWeightAdamW(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


# --------------------------------------------------------------------------- QLoRA base weights

QUANTIZE = ("none", "4bit", "8bit")


def quantization_problem(quantize: str, cuda: bool | None = None) -> str | None:
    """Why `model.quantize` cannot work on this machine (None when it can, or is "none").

    bitsandbytes' quantized layers run on CUDA only, and need the `bitsandbytes` package."""
    if quantize == "none":
        return None
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return (f"{quantize} base weights (QLoRA, bitsandbytes) need a CUDA GPU and none is available; "
                "set quantize: none to train on this machine (rlft run --dry-run rehearses without it)")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return f"{quantize} base weights (QLoRA) need the bitsandbytes package: pip install bitsandbytes"
    return None


def quantization_kwargs(quantize: str, dev: torch.device) -> dict[str, Any]:
    """`from_pretrained` arguments that load the base weights quantized (transformers'
    `BitsAndBytesConfig`): 4bit = NF4 with double quantization and bf16 compute (QLoRA), 8bit =
    LLM.int8(). Quantized weights are placed by `device_map`, not moved afterwards.

    Raises:
        UserInputError: `quantization_problem` says it cannot work here.
    """
    if quantize == "none":
        return {}
    from rlft.errors import UserInputError

    problem = quantization_problem(quantize, dev.type == "cuda")
    if problem:
        raise UserInputError(f"model.quantize: {problem}")
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": dev.index or 0}}
