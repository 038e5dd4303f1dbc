"""Rank 0's peak memory at an fsdp checkpoint save: the sharded save rlft does against gathering
the full state to rank 0 (what rlft did before).

    python -m benchmarks.fsdp_checkpoint                  # 2 gloo processes, 24 layers of 1024 x 1024
    python -m benchmarks.fsdp_checkpoint --layers 48

A stack of `--layers` bias-free 1024 x 1024 linear layers (4 MB of float32 each), each layer and
then the root sharded with `fully_shard` over 2 CPU processes; one AdamW step creates the moments
(so the full training state is 3 x the weights). Then one save, each way in its own torchrun job:
`gathered` all-gathers every weight and moment to whole tensors and rank 0 writes them with
`save_checkpoint`; `sharded` is `rlft.ckpt.sharded.save_shards` of each rank's DTensor shards into
the staging dir that `save_checkpoint` then commits. The figure is rank 0's peak RSS (ru_maxrss)
growth over the save, in MB, and the size of the files rank 0 wrote itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _worker(mode: str, layers: int, out: Path) -> None:
    import torch
    import torch.distributed as tdist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from rlft.ckpt import checkpoint, sharded

    tdist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tdist.barrier()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stage = out / "stage"
    if mode == "gathered":
        weights = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
        state = optimizer.state_dict()
        full = {f"{i}.{k}": v.full_tensor() if isinstance(v, DTensor) else v
                for i, s in state["state"].items() for k, v in s.items()}
        if tdist.get_rank() == 0:
            checkpoint.save_checkpoint(stage, 1, {"params": weights, "optimizer": full}, {}, {}, None)
        tdist.barrier()
    else:
        tensors, _ = checkpoint.state_dict_to_tensors(
            {"model": dict(model.state_dict()), "optim": optimizer.state_dict()["state"]})
        shards = {k: v for k, v in tensors.items() if isinstance(v, DTensor)}
        if tdist.get_rank() == 0:
            def staged(staging: Path) -> None:
                tdist.broadcast_object_list([str(staging)], src=0)
                sharded.save_shards(shards, staging)
                tdist.barrier()

            checkpoint.save_checkpoint(stage, 1, {}, {}, {}, None, staged=staged)
        else:
            box: list[object] = [None]
            tdist.broadcast_object_list(box, src=0)
            sharded.save_shards(shards, Path(str(box[0])))
            tdist.barrier()
        tdist.barrier()
    if tdist.get_rank() == 0:
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        files = {p.name: p.stat().st_size for p in (stage / "step-00000001").iterdir()}
        mine = sum(size for name, size in files.items() if not name.startswith("shard-00002"))
        (out / "result.json").write_text(json.dumps({"peak_growth_mb": grown, "rank0_wrote_mb": mine / 2**20,
                                                     "total_mb": sum(files.values()) / 2**20}))
    tdist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--worker", choices=("gathered", "sharded"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.layers, args.out)
        return
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"{args.layers} layers: {args.layers * 4} MB of weights, {args.layers * 12} MB with AdamW, 2 ranks")
    for mode in ("gathered", "sharded"):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "benchmarks.fsdp_checkpoint",
                            "--worker", mode, "--layers", str(args.layers), "--out", tmp],
                           env=env, check=True, capture_output=True)
            result = json.loads((Path(tmp) / "result.json").read_text())
        print(f"{mode:9s} rank 0 peak RSS growth {result['peak_growth_mb']:7.1f} MB, wrote "
              f"{result['rank0_wrote_mb']:6.1f} MB of {result['total_mb']:6.1f} MB")


if __name__ == "__main__":
    main()
