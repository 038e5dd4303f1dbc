"""Load causal LMs and tokenizers, attach and merge LoRA adapters (peft).

Any model loads through `from_pretrained`, by hub name or local directory; a
`tiny:<preset>` name is built locally by `rlft.tiny` first and then loaded the same way.
`trust_remote_code` stays off unless the recipe asks (with a pinned revision). The
reference policy of a LoRA stage is the same model with its adapter disabled
(`reference_logits`), so no second copy of the weights is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlft import precision
from rlft.errors import UserInputError
from rlft.recipe.schema import LoraSpec, ModelSpec

log = logging.getLogger(__name__)


def device() -> torch.device:
    """The device training runs on: the first CUDA device when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, dev: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU (bf16 matmul is far slower there) and bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def prepare_base(spec: ModelSpec, models_dir: Path, base_dir: Path = Path()) -> str:
    """Where the base model loads from: a tiny:<preset> is built under `models_dir` first.

    A local directory comes back absolute (`local_model_dir`, relative paths looked up from the
    recipe's directory `base_dir` first); any other name is a hub name.

    Raises:
        UserInputError: an unknown tiny preset or bad overrides.
        WriteError: the tiny model could not be written (disk full).
    """
    if not spec.name.startswith("tiny:"):
        return local_model_dir(spec.name, base_dir) or spec.name
    from rlft import tiny
    from rlft.ckpt.fsio import writing

    preset = spec.name.removeprefix("tiny:")
    if preset not in tiny.PRESETS:
        raise UserInputError(f"model.name: unknown tiny preset {preset!r}; choose from {sorted(tiny.PRESETS)}")
    overrides = spec.tiny.model_dump(exclude_none=True) if spec.tiny else {}
    out = models_dir / f"tiny-{preset}-seed{spec.seed}-{_short_hash(overrides)}"
    with writing(f"the base model {spec.name}", out):
        return str(tiny.build_tiny_model(out, preset=preset, overrides=overrides, seed=spec.seed))


def local_model_dir(name: str, base_dir: Path) -> str | None:
    """`name` as an absolute model directory: `~` expanded, a relative path looked up in the
    recipe's directory `base_dir` first, then in the working directory (where from_pretrained
    would look); None when neither holds it (a hub name)."""
    path = Path(name).expanduser()
    for candidate in (base_dir / path, path):
        if candidate.is_dir():
            return str(candidate.absolute())
    return None


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(repr(sorted(obj.items())).encode()).hexdigest()[:8]


def _pretrained_kwargs(spec: ModelSpec, source: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    # The revision names a hub commit; a stage's own output directory has none.
    if spec.revision and source == spec.name:
        kwargs["revision"] = spec.revision
    return kwargs


def load_tokenizer(source: str, spec: ModelSpec) -> Any:
    """Tokenizer of `source` with a pad token set (eos when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, **_pretrained_kwargs(spec, source))
    except OSError as err:
        raise UserInputError(f"model.name: cannot load a tokenizer from {source!r}: {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _quiet_transformers() -> None:
    """rlft draws its own progress bars; transformers' per-load bars would interleave with them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model(source: str, spec: ModelSpec, dev: torch.device) -> Any:
    """A causal LM from a hub name or local directory, in the recipe's dtype, on `dev`."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=precision.weight_dtype(spec.precision, spec.dtype, dev), **_pretrained_kwargs(spec, source),
            **precision.quantization_kwargs(spec.quantize, dev),
        )
    except OSError as err:
        raise UserInputError(f"model.name: cannot load a model from {source!r}: {err}") from None
    if spec.gradient_checkpointing:
        enable_checkpointing(model)
    if precision.resolve_precision(spec.precision, dev) == "bf16_autocast":
        precision.enable_autocast(model, dev)
    if spec.quantize != "none":  # placed by device_map; peft readies it for LoRA (GPU only, unverified here)
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    return model.to(dev)  # pyright: ignore[reportArgumentType]  (transformers types `to` through a mixin)


def enable_checkpointing(model: Any) -> None:
    """Activation checkpointing on every decoder layer: its activations are recomputed in the backward.

    Non-reentrant, because the reentrant variant only reaches parameters through inputs that require
    grad, and a frozen base under LoRA has none. transformers 5.x names the switch
    `activation_checkpointing_enable` (the old name warns); 4.x has only `gradient_checkpointing_enable`.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def dropout_free_mode(model: Any) -> Any:
    """Eval mode (no dropout anywhere), with activation checkpointing still in force; returns `model`.

    RL trains without dropout, so the first update's ratio is exactly 1. transformers checkpoints a
    decoder layer only while that layer's own `training` flag is set, so a plain `model.eval()`
    silently turns checkpointing off. Every module goes to eval, then the layers that checkpoint get
    their flag back; their submodules (attention, MLP, LoRA dropout) stay in eval, so the numbers are
    eval mode's with or without checkpointing.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.eval()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True
    return model


def attach_lora(model: Any, lora: LoraSpec) -> Any:
    """Wrap `model` with a fresh LoRA adapter; only the adapter (and modules_to_save) train."""
    from peft import LoraConfig, get_peft_model

    _quiet_transformers()
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # pyright: ignore[reportArgumentType]  (annotated int; peft scales by alpha / r)
        lora_dropout=lora.dropout,
        # copies: peft extends these lists in place (e.g. with tied layers), and the recipe's
        # objects must stay as written, or resume pinning would see a changed recipe
        target_modules=list(lora.targets) if isinstance(lora.targets, list) else lora.targets,
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
        # a trained copy of a tied embedding must stay tied to the output layer, or the merged
        # model would differ from the one that was trained
        ensure_weight_tying=bool(lora.modules_to_save),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UserInputError(f"lora.targets: {err}") from None


def trainable_named_params(model: Any) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer updates, by name (stable across runs)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config")


@contextlib.contextmanager
def reference_mode(model: Any) -> Iterator[Any]:
    """The reference policy: the same model with the LoRA adapter disabled (no second copy)."""
    if not is_lora(model):
        raise ValueError("reference_mode needs a LoRA model; full fine-tuning keeps a frozen copy")
    with model.disable_adapter():
        yield model


def save_model(model: Any, tokenizer: Any, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save a standalone model dir (adapter merged in) and, for LoRA, the adapter beside it.

    Writes `<out_dir>/model/` (loads with AutoModelForCausalLM.from_pretrained) and
    `<out_dir>/adapter/` (loads with peft). The model is merged in place: call this last.
    `state_dict`: the full weights of a sharded (FSDP) model, gathered by the caller.
    """
    if is_lora(model):
        model.save_pretrained(out_dir / "adapter", safe_serialization=True)
        model = model.merge_and_unload()
    model.save_pretrained(out_dir / "model", safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir / "model")


def load_policy(source: str, spec: ModelSpec, lora: LoraSpec | str, seed: int) -> tuple[Any, Any]:
    """Model + tokenizer from `source` with a fresh LoRA adapter (or fully trainable for `full`).

    The adapter's initialisation draws from torch's RNG, seeded here so a stage's start is
    reproducible from (recipe seed, stage).
    """
    dev = device()
    tokenizer = load_tokenizer(source, spec)
    model = load_model(source, spec, dev)
    torch.manual_seed(seed)
    if lora == "full":
        model.requires_grad_(True)
    else:
        assert isinstance(lora, LoraSpec)
        model = attach_lora(model, lora)
    return model, tokenizer


def load_named_policy(
    spec: ModelSpec, models_dir: Path, base_dir: Path, lora: LoraSpec | str, seed: int, key: str
) -> tuple[Any, Any]:
    """Like `load_policy` for a model a stage names itself (a distillation student, a baseline):
    a tiny:<preset> is built under `models_dir` first, a local directory is looked up from the
    recipe's directory `base_dir`; load errors name the recipe `key`."""
    try:
        return load_policy(prepare_base(spec, models_dir, base_dir), spec, lora, seed)
    except UserInputError as err:  # the loaders say `model.name`; here it is the stage's own key
        raise UserInputError(f"{key}.{str(err).removeprefix('model.')}") from None
