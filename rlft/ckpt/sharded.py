"""Sharded checkpoint files (`distributed.strategy: fsdp`): every rank writes and reads only its own
shards of the weights and AdamW moments, through torch.distributed.checkpoint (DCP).

Writing uses DCP's `HuggingFaceStorageWriter(save_distributed=True)`: rank r writes one
safetensors file, ``shard-<r+1:05d>-model-00001-of-00001.safetensors``, holding its local shard
of each tensor; the shard's offset in the whole tensor is JSON in the file's safetensors header
(``DCP_SHARDING_INFO``). No `.metadata` file is written, so nothing in the checkpoint is pickled.
Only tensors are handed to DCP (a non-tensor value would make it pickle bytes into the file).

Reading is a `HuggingFaceStorageReader` restricted to the shard files the checkpoint's manifest
lists (`verified_reader`): DCP plans which slices each rank needs from the headers, and each
file a rank reads is hashed against the manifest first and parsed from those very bytes with
`safetensors.torch.load`, so the verified bytes are the loaded bytes (as `load_checkpoint` does
for the other files). On the world size that saved the checkpoint each rank reads its own file.

The files are written into the staging dir of the step's checkpoint; `checkpoint.save_checkpoint`
hashes them into the manifest and commits them with everything else (one atomic rename).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rlft.ckpt.manifest import check_file
from rlft.errors import CheckpointError

SHARD_RE = re.compile(r"^shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors$")


def is_shard_file(name: str) -> bool:
    """True for the name of a file `save_shards` writes."""
    return bool(SHARD_RE.match(name))


def save_shards(tensors: Mapping[str, torch.Tensor], directory: Path) -> None:
    """Write this rank's shards of `tensors` (DTensors, or plain tensors every rank holds alike)
    into `directory`. A collective: every rank calls it with the same keys; each rank's file is
    written and fsynced before it returns on any rank."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict_saver import save

    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key!r} is a {type(value).__name__}: only tensors go into a sharded checkpoint file")
    try:
        save(dict(tensors), storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True))
    except CheckpointException as err:
        raise CheckpointError(f"shard files not saved in {directory}:\n  {_causes(err)}\nEarlier checkpoints "
                              "are untouched; check the disk and resume") from err


def load_shards(tensors: Mapping[str, torch.Tensor], directory: Path, files: Mapping[str, dict[str, Any]]) -> None:
    """Fill `tensors` (DTensors laid out as the saving run's, or plain tensors) in place from the
    shard files `files` (name -> manifest entry) in `directory`. A collective.

    Raises:
        CheckpointError: a shard file fails verification, or a key is not in the files.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load

    try:
        load(dict(tensors), storage_reader=verified_reader(directory, files))
    except CheckpointException as err:
        raise CheckpointError(f"checkpoint {directory}: its shard files could not be loaded:\n  {_causes(err)}") from err


def _causes(err: Any) -> str:
    """One line per failing rank of DCP's `CheckpointException` (rank -> exception, traceback)."""
    return "\n  ".join(f"rank {r}: {e[0] if isinstance(e, tuple) else e}" for r, e in sorted(err.failures.items()))


def require() -> None:
    """Refuse, before any training, a torch whose DCP cannot write one safetensors file a rank.

    Raises:
        CheckpointError: naming the torch version.
    """
    try:
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    except ImportError:
        found = False
    else:
        found = "save_distributed" in inspect.signature(HuggingFaceStorageWriter.__init__).parameters
    if not found:
        raise CheckpointError(
            "distributed.strategy: fsdp checkpoints need torch.distributed.checkpoint's HuggingFaceStorageWriter "
            f"with save_distributed (torch 2.8 or newer); this is torch {torch.__version__}: upgrade torch, "
            "or use strategy: ddp"
        )


class _Listed:
    """A DCP filesystem whose directory listing holds only the given files (the manifest's shards,
    not the checkpoint's other safetensors files)."""

    def __init__(self, fs: Any, files: list[str]) -> None:
        self._fs, self._files = fs, files

    def ls(self, path: Any) -> list[str]:
        return list(self._files)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


def verified_reader(directory: Path, files: Mapping[str, dict[str, Any]]) -> Any:
    """DCP's safetensors reader over the manifest's shard files, each hashed before it is parsed
    (made on first use: the base class exists in torch 2.8 and newer)."""
    return _reader_class()(directory, files)


@functools.cache
def _reader_class() -> Any:
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    class Reader(HuggingFaceStorageReader):
        def __init__(self, directory: Path, files: Mapping[str, dict[str, Any]]) -> None:
            super().__init__(str(directory))
            self.directory, self.entries = Path(directory), dict(files)
            for name in self.entries:
                if not is_shard_file(name):
                    raise CheckpointError(f"checkpoint {directory}: {name} is not a shard file name")
            # read_metadata lists the directory: only the manifest's shard files are DCP's
            self.fs = _Listed(self.fs, [str(self.directory / name) for name in sorted(self.entries)])

        def read_data(self, plan: Any, planner: Any) -> Any:
            return _read_verified(self, plan, planner)

    return Reader


def _read_verified(self: Any, plan: Any, planner: Any) -> Any:
    """Read each shard file `plan` needs once, check its sha256 against the manifest, parse those
    bytes (`safetensors.torch.load`) and copy each planned slice into its target."""
    import safetensors.torch
    from torch.futures import Future

    per_file: dict[str, list[Any]] = {}
    for item in plan.items:
        per_file.setdefault(Path(self.storage_data[item.storage_index].relative_path).name, []).append(item)
    for name, items in sorted(per_file.items()):
        if name not in self.entries:
            raise CheckpointError(f"checkpoint {self.directory}: {name} is not listed in the manifest")
        loaded = safetensors.torch.load(check_file(self.directory, name, self.entries[name], keep=True))
        for item in items:
            part = loaded[item.storage_index.fqn][
                tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths, strict=True))
            ]
            target = planner.resolve_tensor(item).detach()
            if target.size() != part.size():
                raise CheckpointError(f"checkpoint {self.directory}: {name}: {item.storage_index.fqn} has "
                                      f"shape {tuple(part.size())}, expected {tuple(target.size())}")
            target.copy_(part)
            planner.commit_tensor(item, target)
    done: Future[None] = Future()
    done.set_result(None)
    return done
