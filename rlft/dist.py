"""Several processes on torch.distributed: the process group, who writes, and the few collectives
the stages need. Every function is a no-op (or the identity) in one process, so a
single-process run takes exactly the code path it took before.

A job is started by torchrun (`torchrun --nproc-per-node N -m rlft run ...`, or `rlft run
--nproc N`, which launches it): torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT, and `init` joins the group on nccl when CUDA is there and on gloo otherwise.

Rank 0 owns the run directory: the run lock, metrics, progress bars, checkpoints, final
outputs and done markers. The other ranks read the run directory and write only under their
scratch directory, `<run_dir>/.ranks/rank-<r>/`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlft.errors import UserInputError

if TYPE_CHECKING:
    import torch

# torch is imported only where a collective runs: `rlft run` checks the recipe and its data
# before anything imports torch (tests/test_data_check.py bounds that memory and time).

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True inside a job torchrun started with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend() -> str:
    """nccl when this process has a CUDA device, gloo otherwise."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init() -> None:
    """Join the process group described by torchrun's environment (once; no-op in one process).

    Raises:
        UserInputError: WORLD_SIZE > 1 but the rest of torchrun's environment is missing.
    """
    if not launched() or initialized():
        return
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if missing:
        raise UserInputError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: start several processes "
            "with torchrun (torchrun --nproc-per-node N -m rlft run RECIPE) or `rlft run RECIPE --nproc N`"
        )
    import torch
    import torch.distributed as tdist

    name = backend()
    if name == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    tdist.init_process_group(backend=name)


def finish() -> None:
    """Leave the process group after the last collective: every rank meets, then the group is
    destroyed (left to interpreter exit, gloo's threads can abort the process with SIGABRT)."""
    if initialized():
        tdist = _tdist()
        tdist.barrier()
        tdist.destroy_process_group()


def _tdist() -> Any:
    """torch.distributed once something imported it, else None (then no group can exist)."""
    return sys.modules.get("torch.distributed")


def initialized() -> bool:
    tdist = _tdist()
    return tdist is not None and tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return _tdist().get_rank() if initialized() else 0


def world_size() -> int:
    return _tdist().get_world_size() if initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one writer of the run directory."""
    return rank() == 0


def scratch_dir(run_dir: Path) -> Path:
    """Where this rank may write: the run directory itself on rank 0, else its own subdirectory."""
    if is_main():
        return run_dir
    path = run_dir / ".ranks" / f"rank-{rank()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def barrier() -> None:
    if initialized():
        _tdist().barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over ranks (a new tensor; `value` itself is left as it is)."""
    if not initialized():
        return value
    out = value.detach().clone()
    tdist = _tdist()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over ranks in place, as one flat all-reduce.

    A rank without a gradient for a parameter (no micro-batch of its own this step) adds zeros,
    and gets the sum. Gradients are summed, not averaged: each rank's loss is already divided by
    the global normaliser, so the sum is the gradient of the one loss over the global batch.
    """
    if not initialized() or not params:
        return
    import torch

    tdist = _tdist()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any rank (every rank gets the same answer)."""
    if not initialized():
        return flag
    import torch

    tdist = _tdist()
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    _tdist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    _tdist().broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int, of: int | None = None, index: int | None = None) -> range:
    """This rank's contiguous share of `n` items: rank r of W takes items [r*n/W, (r+1)*n/W)
    (rounded so shares differ by at most one; some are empty when n < W)."""
    w = world_size() if of is None else of
    r = rank() if index is None else index
    return range(r * n // w, (r + 1) * n // w)

