"""FSDP2 (`distributed.strategy: fsdp`): a fully fine-tuned model, or a LoRA model with its frozen
base, sharded across ranks with torch.distributed.fsdp `fully_shard`, one group per decoder layer
and one for the rest (embeddings, final norm, output layer).

Each rank keeps 1/N of every weight, gradient and AdamW moment as a DTensor shard. A forward
all-gathers one layer's weights at a time and frees them after use; the backward gathers them
again and reduce-scatters the layer's gradients, so each rank receives the sum of its shard's
gradient over ranks (gradients are summed, not averaged: every rank's loss is already divided
by the global token count). The optimizer steps the local shards. In one process nothing is
sharded and none of this runs.

Checkpoints are sharded: torch.distributed.checkpoint's `get_state_dict` (sharded form) gives
each rank its DTensor shards of the weights and AdamW moments, and each rank writes only those
to its own safetensors file in the step's staging dir (`rlft.ckpt.sharded`); rank 0 then hashes
every file into the manifest and commits the dir (`rlft.training`). A resume reads each rank's
shards back from its own file (`set_state_dict`). Only `final/` gathers the whole model to rank 0
(`full_model_state`), so that it is an ordinary safetensors model.

GRPO and PPO run a different number of forwards and backwards on each rank (sampling, rows,
length buckets), which per-layer collectives cannot follow: their rounds run with the whole
weights on every rank (`gathered`) and each optimizer step accumulates whole gradients without
communication, then reduce-scatters them once (`accumulated`); docs/distributed.md.

On CUDA, `model.precision` bf16_master (the default there) becomes a `MixedPrecisionPolicy`:
float32 sharded weights (the master copy the optimizer steps), bfloat16 weights for the forward
and backward, gradients reduced in float32. The CUDA path follows torch's documented API and is
not run by the project's CPU tests.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, cast

import torch

from rlft import dist, precision


def active(strategy: str) -> bool:
    """True when this run shards: `strategy` is fsdp and the job has more than one process."""
    return strategy == "fsdp" and dist.initialized() and dist.world_size() > 1


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's decoder layers: the modules whose class the model names in `_no_split_modules`
    (transformers' list of blocks that must stay whole: Qwen2DecoderLayer, LlamaDecoderLayer, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); cannot shard it")
    return layers


def mixed_precision(model_spec: Any, dev: torch.device) -> Any:
    """The `MixedPrecisionPolicy` for `model.precision` on `dev`: bf16 compute with float32
    reduction for bf16_master on CUDA, None (float32 throughout, or bf16_autocast's own autocast)
    otherwise."""
    if dev.type != "cuda" or precision.resolve_precision(model_spec.precision, dev) != "bf16_master":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model: Any, model_spec: Any) -> Any:
    """Shard `model` in place with `fully_shard` (every decoder layer, then the root) and return it.

    The trained weights become float32 first (bf16_master's bfloat16 weights are cast: the sharded
    float32 weights are the optimizer's master copy, and the policy casts them to bfloat16 for
    compute). A LoRA model (peft) is sharded the same way, frozen base and adapter together: each
    decoder layer's group holds its frozen weights and its lora_A/lora_B; only the adapter has
    gradients, so only they are reduce-scattered. The frozen base keeps its dtype.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    dev = next(model.parameters()).device
    policy = mixed_precision(model_spec, dev)
    if all(p.requires_grad for p in model.parameters()):
        if any(p.dtype != torch.float32 for p in model.parameters()):
            model.to(torch.float32)
    else:  # a LoRA model: the trained adapter gets float32 masters, the frozen base keeps its dtype (and memory)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    # the root reshards after its forward too (torch's default keeps it gathered until the backward):
    # outside a step, named_parameters() must name the sharded parameters the optimizer holds
    fully_shard(model, reshard_after_forward=True, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # sum, not mean, over ranks; only SUM collectives (gloo has no PREMUL_SUM)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: Any) -> bool:
    """True for a model `shard` wrapped (without importing FSDP when nothing did)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def sharded(params: list[torch.nn.Parameter]) -> bool:
    """True when `params` are DTensor shards (a sharded model's parameters)."""
    tensor = sys.modules.get("torch.distributed.tensor")
    return tensor is not None and any(isinstance(p, tensor.DTensor) for p in params)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (a DTensor's local shard; any other tensor as it is)."""
    to_local = getattr(t, "to_local", None)
    return cast(torch.Tensor, to_local()) if callable(to_local) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of `t` on every rank (a DTensor's `full_tensor`, a collective; else `t`)."""
    full_tensor = getattr(t, "full_tensor", None)
    return cast(torch.Tensor, full_tensor()) if callable(full_tensor) else t


def _modules(model: Any) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


_GATHERED: set[int] = set()  # id() of the models inside `gathered`


def is_gathered(model: Any) -> bool:
    """True inside `gathered(model)`: its forwards are no collectives, so ranks may split work."""
    return id(model) in _GATHERED


@contextlib.contextmanager
def gathered(model: Any) -> Iterator[None]:
    """Every weight of a sharded `model` whole on every rank while inside, so that its forwards
    (and backwards) issue no collective and each rank may run any number of them: an RL round's
    sampling, whose decode steps differ per rank, and its no-grad forwards split by rows.

    On entry every rank all-gathers each sharded group once (`unshard`) and turns resharding after
    forward and backward off; on exit the groups are resharded (the gathered copies freed) and
    resharding is back on. The cost is memory: the full weights on every rank while inside, as a
    rollout engine holds them. Not nestable: `accumulated` reshards when its step is done. A no-op
    for a model that is not sharded.
    """
    if not is_sharded(model):
        yield
        return
    if id(model) in _GATHERED:
        raise RuntimeError("fsdp.gathered is not nestable")
    modules = _modules(model)
    model._get_fsdp_state()._lazy_init()  # pyright: ignore[reportPrivateUsage]  (an unshard before any forward needs it)
    for m in modules:  # the same order on every rank: one all-gather per group
        m.unshard()
    model.set_reshard_after_forward(False)
    model.set_reshard_after_backward(False)
    _GATHERED.add(id(model))
    try:
        yield
    finally:
        _GATHERED.discard(id(model))
        model.set_reshard_after_forward(True)
        model.set_reshard_after_backward(True)
        for m in modules:
            m.reshard()


@contextlib.contextmanager
def accumulated(model: Any) -> Iterator[None]:
    """One optimizer step's forwards and backwards on a sharded `model`, any number on each rank
    (an RL mini-batch: each rank's rows, length buckets and shared prompts differ).

    Inside, the model is `gathered` and gradient sync is off: each backward adds to the whole
    (unsharded) gradients on its rank, with no collective. On a normal exit every rank runs one
    backward with sync on, of a zero-weighted one-token forward: its gradients add exactly zero,
    and each group's post-backward reduce-scatters the accumulated gradients (summed over ranks,
    `shard`) into the sharded gradients the optimizer steps, including parameters no backward of
    this rank reached (`reduce_scatter_unused_params`), then reshards. A no-op for a model that is
    not sharded.
    """
    if not is_sharded(model):
        yield
        return
    with gathered(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        model.set_reshard_after_backward(True)
        model.set_reduce_scatter_unused_params(True)
        try:
            dev = next(model.parameters()).device
            out = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=dev), use_cache=False)
            (out.logits.float().sum() * 0.0).backward()
        finally:
            model.set_reduce_scatter_unused_params(False)


def replicated(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters of `params` that are not DTensor shards (whole on every rank: a critic, a
    value head beside a sharded policy)."""
    tensor = sys.modules.get("torch.distributed.tensor")
    return [p for p in params if tensor is None or not isinstance(p, tensor.DTensor)]


def grads_finite(params: list[torch.nn.Parameter]) -> bool:
    """True when every rank's gradient shards are finite (the same answer on every rank)."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
    return not dist.any_rank(not finite)


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip sharded gradients to the global L2 norm `max_norm`, as `torch.nn.utils.clip_grad_norm_`
    does for whole tensors, and return the global norm (the same on every rank).

    The norm is the square root of the all-reduced sum of every rank's squared shard entries,
    plus the squares of replicated parameters' gradients (the same on every rank, counted once).
    """
    grads = [local(p.grad) for p in params if p.grad is not None]
    whole = {id(p) for p in replicated(params)}

    def squares(gs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([g.float().square().sum() for g in gs]).sum() if gs else torch.zeros(())

    shards = squares([local(p.grad) for p in params if p.grad is not None and id(p) not in whole])
    total = (dist.all_reduce_sum(shards) + squares([p.grad for p in params if p.grad is not None and id(p) in whole])).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _sharded_options(strict: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=False, cpu_offload=False, ignore_frozen_params=True, strict=strict)


def state_module(model: Any, optimizer: torch.optim.Optimizer) -> Any:
    """The module whose state dict names every parameter `optimizer` steps: `model` itself, or,
    when the optimizer also steps parameters outside it (PPO's critic, replicated beside the
    sharded policy), a holder with `model` as `policy` and those parameters, in the optimizer's
    order, as `replicated.<i>` (the same Parameter objects: nothing is copied)."""
    own = {id(p) for p in model.parameters()}
    extra = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in own]
    if not extra:
        return model
    holder = torch.nn.Module()
    holder.add_module("policy", model)
    holder.add_module("replicated", torch.nn.ParameterList(extra))
    return holder


def sharded_state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's part of the model's and optimizer's state (every rank calls it):
    ``{"model": ..., "optim": ...}`` from torch.distributed.checkpoint's `get_state_dict` in its
    sharded form (weights and AdamW moments are DTensors holding this rank's shard; the optimizer
    is keyed by parameter name; a fresh optimizer's state is created first, with a zero-lr step)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # a LoRA model's frozen base is not trained state: it is reloaded from its source on resume
    weights, optim = get_state_dict(state_module(model, optimizer), optimizer, options=_sharded_options())
    return {"model": weights, "optim": optim}


def set_sharded_state(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what `sharded_state` gave (its tensors filled from a checkpoint) into `model` and
    `optimizer` (`set_state_dict`); each rank sets its own shards."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(state_module(model, optimizer), optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_sharded_options(strict=False))  # the frozen base is not in it; every key
    # `sharded_state` names is (the caller filled each from the shard files, refusing a missing one)


def full_model_state(model: Any) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 for `save_pretrained` (None when `model` is not
    sharded; every rank must call it)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    # a tied output layer appears under both names; keep the names a plain model's save keeps
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: cast(torch.Tensor, v) for k, v in state.items() if k in keep}


def unsharded_lora(model: Any, state: dict[str, torch.Tensor]) -> Any:
    """A plain (unsharded) copy of the sharded LoRA model `model`, holding `state` (its full
    weights, `full_model_state` on rank 0), for peft's own `save_pretrained` and
    `merge_and_unload`: the adapter and merged model come out as one process writes them.

    The copy is built on the meta device (no weights allocated) and takes `state`'s tensors
    as they are; the buffers a state dict leaves out (rotary frequencies) are the model's own, and
    weights tied in the model (one parameter under several names) are tied in the copy.
    """
    import copy

    from peft import get_peft_model

    base = model.get_base_model()
    with torch.device("meta"):
        plain = get_peft_model(type(base)(base.config), copy.deepcopy(model.peft_config[model.active_adapter]))
    plain.load_state_dict(state, strict=False, assign=True)
    for name, buffer in model.named_buffers():
        owner, _, attr = name.rpartition(".")
        plain.get_submodule(owner)._buffers[attr] = buffer
    tied: dict[int, list[str]] = {}  # a tied weight (output layer = embeddings) is one parameter under two names
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    for first, *others in tied.values():
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(owner), attr, plain.get_parameter(first))
    plain.get_base_model().generation_config = base.generation_config
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"the gathered state of the sharded model misses {left[:5]}")
    return plain
