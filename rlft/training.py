"""Pieces every training stage shares: optimizer, LR schedule, the NaN guard, the SFT loss and
step, the stage loop's save/stop/fault cadence (`StageLoop`), and the full-state checkpoint that
makes resume exact (RELIABILITY.md design item 2).

A stage hands `save_state` its model, optimizer and a JSON dict of its own counters
(data cursor, metrics history, ...); `restore_state` puts all of it back, RNG included,
so the resumed run computes bitwise what the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from rlft import dist, fsdp, precision
from rlft.ckpt import checkpoint
from rlft.ckpt.faults import fault_active, fault_point
from rlft.ckpt.trainstate import GracefulExit
from rlft.core import losses
from rlft.data.batch import model_inputs
from rlft.errors import CheckpointError, TrainingError
from rlft.metrics import progress
from rlft.models import trainable_named_params

log = logging.getLogger(__name__)


def make_optimizer(model: Any, spec: Any) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (LoRA adapter, or all weights for full fine-tuning);
    low-precision parameters get float32 master weights (`precision.MasterWeightAdamW`)."""
    params = list(trainable_named_params(model).values())
    fused = bool(params) and params[0].is_cuda
    return precision.make_adamw(
        params, lr=spec.lr, betas=tuple(spec.adam_betas), weight_decay=spec.weight_decay, fused=fused or None
    )


def lr_at(step: int, total: int, spec: Any) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear/constant.

    A pure function of the step, so resume needs no scheduler state.
    """
    if spec.warmup_steps and step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant" or total <= spec.warmup_steps + 1:
        return spec.lr
    progress = (step - spec.warmup_steps) / (total - spec.warmup_steps - 1)
    floor = spec.min_lr_ratio
    if spec.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.lr * (floor + (1.0 - floor) * factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class NanGuard:
    """Skip optimizer steps whose loss or gradients are not finite; abort after a streak.

    RELIABILITY R6: a skipped step is counted and logged as NaN, never as a number, and
    never reaches the weights (so no committed checkpoint can hold NaN).
    """

    policy: str
    max_bad_steps: int
    skipped: int = 0
    streak: int = 0

    def check(self, loss: torch.Tensor, params: list[torch.nn.Parameter], step: int) -> bool:
        """True when the step may be taken; False when it must be skipped (grads are zeroed)."""
        finite = bool(torch.isfinite(loss).all())
        if fsdp.sharded(params):  # each rank holds a shard of the gradients: every rank must agree
            finite = fsdp.grads_finite(params) and finite
        elif finite:
            grads = [p.grad for p in params if p.grad is not None]
            finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        if finite:
            self.streak = 0
            return True
        self.skipped += 1
        self.streak += 1
        for p in params:
            p.grad = None
        if self.policy == "abort":
            raise TrainingError(f"step {step}: loss or gradient is NaN/Inf (nan_policy: abort)")
        if self.streak >= self.max_bad_steps:
            raise TrainingError(
                f"step {step}: {self.streak} steps in a row had a NaN/Inf loss or gradient "
                f"(max_bad_steps: {self.max_bad_steps}); the last committed checkpoint is clean"
            )
        log.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", step, self.skipped)
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "streak": self.streak}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.streak = state["skipped"], state["streak"]


def apply_step(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor, guard: NanGuard,
    max_grad_norm: float | None, step: int,
) -> float | None:
    """Clip and take the optimizer step on the accumulated gradients; None when the NaN guard
    skipped it (gradients dropped). Returns the pre-clip gradient norm."""
    if not guard.check(loss, params, step):
        optimizer.zero_grad(set_to_none=True)
        return None
    clip = fsdp.clip_grad_norm_ if fsdp.sharded(params) else torch.nn.utils.clip_grad_norm_
    grad_norm = clip(params, max_grad_norm or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def backward_into(loss: torch.Tensor, total: torch.Tensor, step: int) -> None:
    """Backpropagate one micro-batch's share of the step loss and add it to the step's `total`
    (in place). The `nan_loss` fault point turns the share NaN (tests of the NaN guard)."""
    if fault_active("nan_loss", step):
        loss = loss * float("nan")
    loss.backward()
    total += loss.detach()


def finish_step(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], total: torch.Tensor, guard: NanGuard,
    max_grad_norm: float | None, step: int, n_tokens: torch.Tensor,
) -> dict[str, float]:
    """`apply_step` on the accumulated gradients, and the step's metrics (loss NaN when skipped).

    On several processes the gradients and `total` are first summed over ranks (each rank's
    share is already divided by the global normaliser), so every rank takes the same step; a
    sharded model's backward has already reduce-scattered its gradients (rlft/fsdp.py), so only
    the replicated parameters' gradients are summed here (all of them without fsdp; beside a
    sharded policy, PPO's critic).
    """
    if dist.initialized():
        dist.all_reduce_grads(fsdp.replicated(params))
        total = dist.all_reduce_sum(total)
    grad_norm = apply_step(optimizer, params, total, guard, max_grad_norm, step)
    if grad_norm is None:
        return {"loss": float("nan"), "skipped": guard.skipped}
    return {"loss": float(total), "grad_norm": grad_norm, "tokens": int(n_tokens), "skipped": guard.skipped}


def save_state(
    stage_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Commit a checkpoint of everything a resume needs: weights, optimizer, RNG, `state`.

    On several processes every rank calls it: each rank's RNG goes to rank 0 (group
    `rng.rank<r>` for r > 0), which alone writes the one checkpoint; the ranks meet at a barrier
    after the commit. The weights, optimizer and `state` are rank 0's (the same on every rank),
    except under fsdp, where each rank writes its own shards into the checkpoint first
    (`_save_state_sharded`).
    """
    rng_tensors, rng_state = checkpoint.capture_rng()
    if dist.initialized():
        return _save_state_ranks(stage_dir, step, model, optimizer, state, meta, keep_last, extra_tensors,
                                 (rng_tensors, rng_state))
    return _save_state(stage_dir, step, model, optimizer, state, meta, keep_last, extra_tensors, (rng_tensors, rng_state))


def _save_state_ranks(
    stage_dir: Path, step: int, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    meta: dict[str, Any], keep_last: int, extra_tensors: dict[str, dict[str, torch.Tensor]] | None,
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]],
) -> Path:
    ranks = dist.gather_objects(rng)
    if fsdp.is_sharded(model):
        return _save_state_sharded(stage_dir, step, model, optimizer, state, meta, keep_last, extra_tensors, ranks)
    path = stage_dir / checkpoint.step_dir_name(step)
    if dist.is_main():
        extra = dict(extra_tensors or {})
        extra |= {f"rng.rank{r}": tensors for r, (tensors, _) in enumerate(ranks) if r > 0}
        state = state | {"rank_rng": [s for _, s in ranks[1:]]}
        meta = meta | {"world_size": dist.world_size()}
        path = _save_state(stage_dir, step, model, optimizer, state, meta, keep_last, extra, rng)
    dist.barrier()
    return path


SHARDED_LAYOUT = "dcp-safetensors"  # meta "layout" of an fsdp checkpoint: every rank's own shard file


def _save_state_sharded(
    stage_dir: Path, step: int, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    meta: dict[str, Any], keep_last: int, extra_tensors: dict[str, dict[str, torch.Tensor]] | None,
    ranks: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
) -> Path:
    """A sharded model's checkpoint, committed atomically as one: rank 0 takes the stage lock and
    makes the staging dir, every rank writes its own shards of the weights and AdamW moments there
    (`rlft.ckpt.sharded`, one safetensors file a rank), all meet at a barrier, then rank 0 writes
    the RNG of every rank, the optimizer's remaining tensors (step counts) and `state.json`,
    hashes every file into the manifest and renames the dir into place."""
    from torch.distributed.tensor import DTensor

    from rlft.ckpt import sharded

    tensors, skeleton = checkpoint.state_dict_to_tensors(fsdp.sharded_state(model, optimizer))
    shards = {k: v for k, v in tensors.items() if isinstance(v, DTensor)}
    plain = {k: v.detach().cpu() for k, v in tensors.items() if k not in shards}
    bad = next((k for k, v in shards.items() if k.startswith("model.") and not torch.isfinite(fsdp.local(v)).all()),
               None)
    if dist.any_rank(bad is not None):
        raise TrainingError(f"refusing to checkpoint step {step}: a parameter is NaN/Inf ({bad or 'on another rank'})")
    final = stage_dir / checkpoint.step_dir_name(step)
    if not dist.is_main():
        staging = dist.broadcast_object(None)
        if staging is None:
            raise CheckpointError(f"checkpoint for step {step} not saved: rank 0 could not start it (see its error)")
        sharded.save_shards(_distinct(fsdp.state_module(model, optimizer), shards), Path(staging))
        dist.barrier()  # every rank's file is written; rank 0 commits
        dist.barrier()  # rank 0 committed
        return final
    started = False

    def write_shards(staging: Path) -> None:
        nonlocal started
        started = True
        dist.broadcast_object(str(staging))
        sharded.save_shards(_distinct(fsdp.state_module(model, optimizer), shards), staging)
        dist.barrier()

    rng_tensors, rng_state = ranks[0]
    groups = {"optimizer": plain, "rng": rng_tensors, **(extra_tensors or {})}
    groups |= {f"rng.rank{r}": t for r, (t, _) in enumerate(ranks) if r > 0}
    full_state = {"step": step, "optimizer": skeleton, "rng": rng_state,
                  "stage": state | {"rank_rng": [s for _, s in ranks[1:]]}}
    meta = meta | {"world_size": dist.world_size(), "strategy": "fsdp", "layout": SHARDED_LAYOUT}
    try:
        path = checkpoint.save_checkpoint(stage_dir, step, groups, full_state, meta, keep_last, staged=write_shards)
    except BaseException:
        if not started:
            dist.broadcast_object(None)
        raise
    dist.barrier()
    return path


def _save_state(
    stage_dir: Path, step: int, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    meta: dict[str, Any], keep_last: int, extra_tensors: dict[str, dict[str, torch.Tensor]] | None,
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]],
) -> Path:
    params = {n: p.detach() for n, p in trainable_named_params(model).items()}
    for name, value in params.items():
        if not torch.isfinite(value).all():
            raise TrainingError(f"refusing to checkpoint step {step}: parameter {name} is NaN/Inf")
    optim_tensors, optim_state = checkpoint.optimizer_to_tensors(optimizer)
    rng_tensors, rng_state = rng
    tensors = {"params": params, "optimizer": optim_tensors, "rng": rng_tensors, **(extra_tensors or {})}
    full_state = {"step": step, "optimizer": optim_state, "rng": rng_state, "stage": state}
    return checkpoint.save_checkpoint(stage_dir, step, tensors, full_state, meta, keep_last)


def restore_state(
    stage_dir: Path, model: Any, optimizer: torch.optim.Optimizer, meta: dict[str, Any], force: bool
) -> tuple[int, dict[str, Any], dict[str, dict[str, torch.Tensor]], list[str]] | None:
    """Load the newest verified checkpoint into `model` and `optimizer`; None when there is none.

    Returns (step, the stage's JSON state, every tensor group, input changes accepted with --force).
    Raises UserInputError when the recipe, data, model or seed changed and `force` is off, and
    CheckpointError (exit 3) when the stage has checkpoints but none verifies: starting over
    would silently discard the work they hold, so that takes an explicit --restart.
    """
    strategy = "fsdp" if fsdp.is_sharded(model) else "ddp"
    ckpt = _find_shared(stage_dir) if strategy == "fsdp" else checkpoint.find_latest(stage_dir, strict=True)
    if ckpt is None:
        return None
    saved_meta = ckpt.meta
    saved_world, world = saved_meta.get("world_size", 1), dist.world_size()
    if saved_world != world:
        raise CheckpointError(
            f"{ckpt} was saved by {saved_world} process(es) and this run has {world}: every rank's RNG "
            f"and data share are in it, so it resumes on {saved_world} only (rerun with --nproc {saved_world}, "
            "or pass --restart to start the stage over)"
        )
    saved_strategy = saved_meta.get("strategy", "ddp")
    if saved_strategy != strategy:
        raise CheckpointError(
            f"{ckpt} was saved with distributed.strategy {saved_strategy} and this run uses {strategy}: its "
            f"optimizer state is laid out for {saved_strategy} (set strategy: {saved_strategy}, or pass --restart)"
        )
    if strategy == "fsdp" and saved_meta.get("layout") != SHARDED_LAYOUT:
        raise CheckpointError(
            f"{ckpt} is an fsdp checkpoint in the older layout (whole tensors gathered to rank 0); this rlft "
            "reads fsdp checkpoints in the sharded layout only (each rank's own shard file): pass --restart "
            "to start the stage over"
        )
    shard_files = {n: e for n, e in ckpt.manifest["files"].items() if strategy == "fsdp" and _is_shard_file(n)}
    tensors, full_state, _ = checkpoint.load_checkpoint(ckpt, skip=shard_files)
    saved_inputs = saved_meta.get("inputs", {})
    keys = sorted(set(saved_inputs) | set(meta["inputs"]))
    overrides = checkpoint.check_inputs(saved_inputs, meta["inputs"], keys, force)
    if saved_meta.get("num_threads") != meta.get("num_threads"):
        log.warning(
            "thread count changed (%s -> %s): results will differ in the last bits",
            saved_meta.get("num_threads"),
            meta.get("num_threads"),
        )
    if strategy == "fsdp":
        _load_sharded(ckpt, model, optimizer, shard_files, tensors["optimizer"], full_state["optimizer"])
    else:
        params = trainable_named_params(model)
        missing = set(params) ^ set(tensors["params"])
        if missing:
            raise CheckpointError(f"{ckpt}: parameters differ from the model's: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors["params"][name])
        checkpoint.load_optimizer(optimizer, tensors["optimizer"], full_state["optimizer"])
    if dist.rank() > 0:
        checkpoint.restore_rng(tensors[f"rng.rank{dist.rank()}"], full_state["stage"]["rank_rng"][dist.rank() - 1])
    else:
        checkpoint.restore_rng(tensors["rng"], full_state["rng"])
    return full_state["step"], full_state["stage"], tensors, overrides


def _distinct(model: Any, shards: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`shards` without the second name of a tied weight (the output layer tied to the embedding
    appears under both names in the state dict; the model's `named_parameters` names it once)."""
    names = {f"model.{n}" for n, _ in model.named_parameters()} | {f"model.{n}" for n, _ in model.named_buffers()}
    return {k: v for k, v in shards.items() if not k.startswith("model.") or k in names}


def _is_shard_file(name: str) -> bool:
    from rlft.ckpt import sharded

    return sharded.is_shard_file(name)


def _find_shared(stage_dir: Path) -> checkpoint.Checkpoint | None:
    """`find_latest(strict=True)` on rank 0, which hashes every file of the checkpoint it picks;
    the other ranks take its pick (they verify the manifest, and each file as they read it), so
    no rank but rank 0 reads the other ranks' shard files."""
    if dist.is_main():
        try:
            found = checkpoint.find_latest(stage_dir, strict=True)
        except CheckpointError as err:
            dist.broadcast_object(("error", str(err)))
            raise
        dist.broadcast_object(("path", str(found.path)) if found else None)
        return found
    picked = dist.broadcast_object(None)
    if picked is None:
        return None
    kind, text = picked
    if kind == "error":
        raise CheckpointError(text)
    path = Path(text)
    manifest = checkpoint.read_manifest(path)
    return checkpoint.Checkpoint(path=path, step=manifest["step"], manifest=manifest)


def _load_sharded(
    ckpt: checkpoint.Checkpoint, model: Any, optimizer: torch.optim.Optimizer, shard_files: dict[str, Any],
    plain: dict[str, torch.Tensor], skeleton: Any,
) -> None:
    """Fill this rank's shards of the weights and AdamW state from the checkpoint's shard files
    (each rank reads what it holds), then the rest of the optimizer state from `plain` (step
    counts) and `skeleton` (hyper-parameters)."""
    from torch.distributed.tensor import DTensor

    from rlft.ckpt import sharded

    template, _ = checkpoint.state_dict_to_tensors(fsdp.sharded_state(model, optimizer))
    shards = {k: v for k, v in template.items() if isinstance(v, DTensor)}
    if set(template) - set(shards) != set(plain):
        diff = sorted((set(template) - set(shards)) ^ set(plain))[:5]
        raise CheckpointError(f"{ckpt}: its optimizer state does not fit this model's parameters: {diff}")
    # a key the files lack is refused there; a tied weight's second name shares the first's storage
    sharded.load_shards(_distinct(fsdp.state_module(model, optimizer), shards), ckpt.path, shard_files)
    fsdp.set_sharded_state(model, optimizer, checkpoint.state_dict_from_tensors(shards | plain, skeleton))


def resume_stage(
    ctx: Any, model: Any, optimizer: torch.optim.Optimizer, loader: Any, guard: NanGuard, meta: dict[str, Any]
) -> tuple[int, dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Put a stage back where its newest verified checkpoint left it (when `ctx.resume`).

    Restores the weights, optimizer and RNG (`restore_state`), the data cursor and NaN-guard
    counters, records input changes accepted with --force in `meta`, and returns the step to
    continue from (0 on a fresh start), the stage's own saved state and every tensor group
    (for stage-specific extras such as a critic).
    """
    if fsdp.is_sharded(model):  # before any step: this torch must be able to write sharded checkpoints
        from rlft.ckpt import sharded

        sharded.require()
    restored = restore_state(ctx.stage_dir, model, optimizer, meta, ctx.force) if ctx.resume else None
    if restored is None:
        meta["forced_overrides"] = []
        return 0, {}, {}
    start, state, tensors, meta["forced_overrides"] = restored
    ctx.record.resumed_from_step = start
    loader.load_state_dict(state["loader"])
    guard.load_state_dict(state["guard"])
    return start, state, tensors


def sft_step(
    policy: Any, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, torch.Tensor]],
    guard: NanGuard, max_grad_norm: float | None, step: int,
) -> dict[str, float]:
    """One SFT optimizer step over the micro-batches, with the token-mean over the whole step
    (the SFT stage's and sequence-level distillation's step).

    On several processes each rank takes its contiguous share of the step's micro-batches
    (`dist.shard`) and the token count is summed over ranks, so the step is the one token-mean
    loss over the global batch.
    """
    dev = next(policy.parameters()).device
    share = rank_share(micro_batches)
    n_tokens = global_target_count(share, dev)
    params = list(trainable_named_params(policy).values())
    total = torch.zeros((), device=dev)
    for mb in share:
        loss_sum, _ = sft_loss_sum(policy, {k: v.to(dev) for k, v in mb.items()})
        backward_into(loss_sum / n_tokens, total, step)
    if fsdp.is_sharded(policy) and len(share) < -(-len(micro_batches) // dist.world_size()):
        # every rank must take part in each forward's all-gather and backward's reduce-scatter:
        # a rank one micro-batch short (an epoch's short last batch) runs one pass that adds zero
        loss_sum, _ = sft_loss_sum(policy, {k: v.to(dev) for k, v in micro_batches[0].items()})
        (loss_sum * 0.0).backward()
    return finish_step(optimizer, params, total, guard, max_grad_norm, step, n_tokens)


def rank_share(micro_batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """This rank's contiguous share of a global step's micro-batches (all of them in one process)."""
    return [micro_batches[i] for i in dist.shard(len(micro_batches))]


def global_target_count(micro_batches: list[dict[str, torch.Tensor]], dev: torch.device) -> torch.Tensor:
    """The step's token-mean normaliser: loss-mask tokens of this rank's micro-batches, summed
    over ranks (at least 1), so every rank divides by the global batch's count."""
    counts = [mb["loss_mask"][:, 1:].sum() for mb in micro_batches]
    local = torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.long)
    return dist.all_reduce_sum(local).to(dev).clamp(min=1)


def sft_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the batch's loss-mask tokens, and their count.

    Token t is predicted from position t-1, so targets are input_ids[:, 1:] under loss_mask[:, 1:].
    """
    logits = model(**model_inputs(batch)).logits
    targets, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].to(logits.dtype)
    logp = losses.token_logprobs(logits[:, :-1], targets)  # (N, L-1)
    return -(logp * mask).sum(), mask.sum()


class SaveSpec(Protocol):
    """What the loop reads of a training stage's spec."""

    save_every: int
    keep_last: int


class Halt(Protocol):
    """A training-health monitor that can stop the stage (the RL stages' alarms)."""

    def alarmed(self) -> bool: ...

    def stop_if_alarmed(self) -> None: ...


class StageLoop:
    """The steps of a training stage, and the one cadence that follows each of them.

    Iterating yields step indices `start .. total - 1` under a progress bar. After the body of
    step s has run, the loop saves a full-state checkpoint of step s + 1 (`save_state` of `model`,
    `optimizer`, `state()` and `extra_tensors()`) when s + 1 is a multiple of `spec.save_every`, at
    the last step, when SIGTERM/SIGINT arrived (`GracefulExit`, installed when the loop is made)
    and when `halt` (a `stop` alarm) fired; then `halt` raises (exit 4), and after a signal the loop
    exits with 128 + signal (the last step finishes normally);
    finally the `kill_step` fault point runs (tests die right after a step). A body that raises
    skips all of it, so nothing is saved for a failed step.
    """

    def __init__(
        self, start: int, total: int, desc: str, stage_dir: Path, spec: SaveSpec, model: Any,
        optimizer: torch.optim.Optimizer, meta: dict[str, Any], state: Callable[[], dict[str, Any]],
        extra_tensors: Callable[[], dict[str, dict[str, torch.Tensor]]] | None = None,
        halt: Halt | None = None,
    ) -> None:
        self.start, self.total, self.desc = start, total, desc
        self.stage_dir, self.save_every, self.keep_last = stage_dir, spec.save_every, spec.keep_last
        self.model, self.optimizer, self.meta, self.state, self.extra_tensors = model, optimizer, meta, state, extra_tensors
        self.halt = halt
        self.stop = GracefulExit()

    def save(self, step: int) -> None:
        extra = self.extra_tensors() if self.extra_tensors else None
        save_state(self.stage_dir, step, self.model, self.optimizer, self.state(), self.meta, self.keep_last, extra)

    def is_last(self, step: int) -> bool:
        return step + 1 == self.total

    def __iter__(self) -> Iterator[int]:
        for step in progress(range(self.start, self.total), self.total, self.desc, start=self.start):
            yield step
            done, last = step + 1, self.is_last(step)
            halting = self.halt is not None and self.halt.alarmed()
            stopping = self.stop.should_stop()
            if dist.initialized():  # a signal one rank got stops every rank at the same step
                stopping = dist.any_rank(stopping)
            if done % self.save_every == 0 or last or stopping or halting:
                self.save(done)
            if halting and self.halt is not None:
                self.halt.stop_if_alarmed()  # raises: exit 4 naming the alarm and step
            if stopping and not last:
                self.stop.exit()
            fault_point("kill_step", done)  # tests: die right after this step
