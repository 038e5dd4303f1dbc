"""Crash-safe checkpoints: staging dir, sha256 manifest written last, atomic rename (RELIABILITY.md §1).

A stage hands this module named tensor groups and JSON state; it knows nothing about models.

    <stage_dir>/step-00000012/       committed: visible only once every byte is durable
        <group>.safetensors          one file per tensor group (adapter, optimizer, rng, ...)
        state.json                   counters, data cursor, metrics history (exact JSON round trip)
        manifest.json                written last: step, sha256 + size per file, meta, own checksum
    <stage_dir>/LATEST               name of the newest committed dir: a hint, verification decides
    <stage_dir>/.staging-step-...    a save in progress; removed at the next save/resume if its writer died
    <stage_dir>/.deleting-step-...   a retention deletion in progress; finished at the next save

Only safetensors and JSON are written or read (never pickle). A save and a cleanup each hold an
exclusive `flock` on the stage dir, so a staging dir seen under the lock belongs to a dead writer.
RNG, optimizer and input-pinning helpers live in `rlft.ckpt.trainstate` and are re-exported here.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from rlft import hints
from rlft.ckpt import faults
from rlft.ckpt.fsio import commit_dir, fsync_dir
from rlft.ckpt.manifest import (
    MANIFEST,
    STATE,
    STEP_RE,
    canonical_json,
    check_file,
    is_regular_file,
    manifest_bytes,
    read_manifest,
    verify_checkpoint,
)
from rlft.ckpt.trainstate import (  # noqa: F401  (re-exported: the checkpoint API stages use)
    GracefulExit,
    capture_generators,
    capture_rng,
    check_inputs,
    check_json,
    load_optimizer,
    optimizer_to_tensors,
    restore_generators,
    restore_rng,
    state_dict_from_tensors,
    state_dict_to_tensors,
)
from rlft.errors import CheckpointError

log = logging.getLogger(__name__)

LATEST = "LATEST"
_GROUP_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint directory whose manifest verified when it was found."""

    path: Path
    step: int
    manifest: dict[str, Any] = field(repr=False, compare=False)

    @property
    def meta(self) -> dict[str, Any]:
        """The `meta` the stage passed to `save_checkpoint` (recipe hash, data hashes, ...)."""
        return self.manifest["meta"]


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint at `step`, zero-padded so names sort by step."""
    return f"step-{step:08d}"


def save_checkpoint(
    stage_dir: Path,
    step: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int | None,
    staged: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint so that it is either complete and verifiable or invisible.

    Args:
        stage_dir: the stage's directory (created if missing).
        step: optimizer steps done; the dir is ``step-<step:08d>``.
        tensors: tensor groups, each written as ``<group>.safetensors``.
        state: JSON state (None/bool/int/float/str/list/dict[str, Any] with str keys; round-trips exactly).
        meta: strict JSON recorded in the manifest (recipe hash, data hashes, versions, seed, ...).
        keep_last: committed checkpoints to keep (>= 1), the new one included; None keeps all.
        staged: called with the new staging dir (under the stage lock, before any file of this
            call is written) to put more files in it, e.g. every rank's shards (`rlft.ckpt.sharded`);
            each file it leaves there is hashed into the manifest and committed with the rest.

    Returns:
        The committed directory.

    Raises:
        CheckpointError: a write failed (disk full, IO error, file size limit); the message names
            the path and errno, the staging dir is removed and earlier checkpoints are untouched.
    """
    if step < 0 or (keep_last is not None and keep_last < 1):
        raise ValueError(f"need step >= 0 and keep_last >= 1 or None, got step={step}, keep_last={keep_last}")
    for group in tensors:
        if not _GROUP_RE.match(group):
            raise ValueError(f"tensor group name {group!r}: use letters, digits, '_', '.', '-'")
    check_json(state, "state")
    canonical_json(check_json(meta, "meta"))  # strict JSON (no NaN) before any byte is written
    stage_dir = Path(stage_dir)
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
        with _stage_lock(stage_dir, blocking=True):
            _remove_leftovers(stage_dir, deleting=True)
            final = _write_and_commit(stage_dir, step, tensors, state, meta, staged)
            _write_latest(stage_dir, final.name, step)
            if keep_last is not None:
                apply_retention(stage_dir, keep_last, step)
    except OSError as err:
        raise _write_error(step, err, stage_dir) from err
    return final


def _write_and_commit(
    stage_dir: Path, step: int, tensors: Mapping[str, Mapping[str, torch.Tensor]], state: dict[str, Any],
    meta: dict[str, Any], staged: Callable[[Path], None] | None = None,
) -> Path:
    staging = stage_dir / f".staging-{step_dir_name(step)}-{uuid.uuid4().hex}"
    final = stage_dir / step_dir_name(step)
    os.mkdir(staging)
    try:
        files = {}
        if staged is not None:
            staged(staging)
            files = {name: _hash_file(staging / name) for name in sorted(os.listdir(staging))}
        for group in sorted(tensors):
            name = f"{group}.safetensors"
            files[name] = _write_file(staging / name, _tensor_bytes(tensors[group], name), step)
        files[STATE] = _write_file(staging / STATE, _json_bytes(state), step)
        faults.fault_point("before_manifest", step, staging)
        _write_file(staging / MANIFEST, manifest_bytes(step, files, meta), step)
        faults.fault_point("after_manifest", step, staging)
        faults.fault_point("before_rename", step, staging)
        commit_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    faults.fault_point("after_rename", step, final)
    return final


def _hash_file(path: Path) -> dict[str, Any]:
    """The manifest entry of a file another writer put in the staging dir (a regular file)."""
    if not is_regular_file(path):
        raise ValueError(f"{path}: not a regular file; only files can be committed in a checkpoint")
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


def _write_error(step: int, err: OSError, stage_dir: Path) -> CheckpointError:
    code = err.errno or 0
    name = errno.errorcode.get(code, "?")
    path = err.filename or stage_dir
    hint = {
        errno.ENOSPC: "free disk space (or lower keep_last) and resume",
        errno.EDQUOT: "raise the disk quota or free space, then resume",
        errno.EFBIG: "the file size limit (ulimit -f) is too small for this checkpoint; raise it and resume",
    }.get(code, "check the disk and resume")
    error = CheckpointError(
        f"checkpoint for step {step} not saved: {path}: [Errno {code} {name}] {err.strerror}. "
        f"Earlier checkpoints in {stage_dir} are untouched; {hint}."
    )
    error.errno, error.path = code, str(path)  # type: ignore[attr-defined]
    return error


def _write_file(path: Path, data: bytes, step: int) -> dict[str, Any]:
    """write -> fsync, with the ``mid_file`` and ``after_file`` fault points; returns the manifest entry."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fault = faults.match("mid_file", step)
        if fault is not None:
            _write_all(fd, memoryview(data)[: len(data) // 2])
            os.fsync(fd)
            fault.fire(path)
        _write_all(fd, memoryview(data))
        os.fsync(fd)
    except OSError as err:
        err.filename = err.filename or str(path)
        raise
    finally:
        os.close(fd)
    faults.fault_point("after_file", step, path)
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _write_all(fd: int, view: memoryview) -> None:
    # os.write may write less than asked (e.g. reaching RLIMIT_FSIZE); the next call raises.
    while view:
        view = view[os.write(fd, view) :]


def _tensor_bytes(group: Mapping[str, torch.Tensor], name: str) -> bytes:
    prepared: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in group.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # safetensors refuses views and storage shared between names: store a private copy.
        if not t.is_contiguous() or storage.nbytes() != t.numel() * t.element_size() or (ptr and ptr in seen):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        prepared[key] = t
    return safetensors.torch.save(prepared)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=True, indent=1) + "\n").encode()


def _write_latest(stage_dir: Path, name: str, step: int) -> None:
    tmp = stage_dir / f".LATEST.tmp-{uuid.uuid4().hex}"
    try:
        faults.fault_point("before_latest", step, stage_dir / LATEST)
        _write_file(tmp, (name + "\n").encode(), -1)
        os.replace(tmp, stage_dir / LATEST)
        fsync_dir(stage_dir)
        faults.fault_point("after_latest", step, stage_dir / LATEST)
    except OSError as err:
        # The checkpoint is committed; LATEST is only a hint, so a failure here is not fatal.
        log.warning("could not update %s: %s (the checkpoint %s is committed)", stage_dir / LATEST, err, name)
        tmp.unlink(missing_ok=True)


def apply_retention(stage_dir: Path, keep_last: int, newest_step: int) -> list[Path]:
    """Delete committed checkpoints older than `newest_step` beyond the newest `keep_last`.

    Only real (non-symlink) ``step-*`` dirs inside `stage_dir` with a manifest are candidates; the
    checkpoint at `newest_step` and anything newer are never touched. Each doomed dir is first
    renamed to ``.deleting-...`` (atomic), so a kill mid-deletion never leaves a half-deleted
    ``step-*`` dir. Failures are logged, not raised: the new checkpoint is already committed.

    Args:
        stage_dir: the stage directory.
        keep_last: committed checkpoints to keep, the one at `newest_step` included (>= 1).
        newest_step: step of the checkpoint just committed.

    Returns:
        The checkpoint dirs deleted.
    """
    older = [(s, p) for s, p in _step_dirs(stage_dir) if s < newest_step and is_regular_file(p / MANIFEST)]
    deleted = []
    for _, path in older[max(keep_last - 1, 0) :]:
        trash = stage_dir / f".deleting-{path.name}-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
            fsync_dir(stage_dir)
            faults.fault_point("during_retention", newest_step, trash)
            shutil.rmtree(trash)
        except OSError as err:
            log.warning("retention could not delete %s: %s", path, err)
            continue
        deleted.append(path)
    return deleted


def _step_dirs(stage_dir: Path) -> list[tuple[int, Path]]:
    """Committed-looking dirs, newest first; symlinks are skipped (never followed out of the stage)."""
    found = []
    with os.scandir(stage_dir) as entries:
        for entry in entries:
            m = STEP_RE.match(entry.name)
            if not m:
                continue
            if entry.is_symlink():
                log.warning("ignoring %s: a symlink, not a checkpoint written here", entry.path)
            elif entry.is_dir(follow_symlinks=False):
                found.append((int(m.group(1)), Path(entry.path)))
    return sorted(found, reverse=True)


@contextmanager
def _stage_lock(stage_dir: Path, blocking: bool) -> Iterator[bool]:
    """Exclusive flock on the stage dir; yields False when not blocking and another holder has it."""
    fd = os.open(stage_dir, _OPEN_DIR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _remove_leftovers(stage_dir: Path, deleting: bool) -> None:
    """Remove staging dirs and LATEST temp files of dead writers (call with the stage lock held)."""
    prefixes = (".staging-step-", ".LATEST.tmp-", ".replaced-step-") + ((".deleting-step-",) if deleting else ())
    with os.scandir(stage_dir) as entries:
        leftovers = [e for e in entries if e.name.startswith(prefixes)]
    for entry in leftovers:
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as err:
            log.warning("could not remove %s, left by a save that did not finish: %s", entry.path, err)
        else:
            log.info("removed %s, left by a save that did not finish", entry.path)


def find_latest(stage_dir: Path, *, strict: bool = False) -> Checkpoint | None:
    """Return the newest checkpoint whose manifest and files verify.

    Dirs that fail verification are logged (a warning naming the dir and the file) and skipped,
    never deleted. `LATEST` is only a hint. Staging dirs left by a dead writer are removed.

    Args:
        stage_dir: the stage directory.
        strict: raise instead of returning None when checkpoints exist but none verifies.

    Returns:
        The newest verified checkpoint, or None.

    Raises:
        CheckpointError: `strict` and no candidate verifies (each failure listed).
    """
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return None
    with _stage_lock(stage_dir, blocking=False) as locked:
        if locked:
            _remove_leftovers(stage_dir, deleting=False)
    failures = []
    for step, path in _step_dirs(stage_dir):
        try:
            manifest = verify_checkpoint(path)
        except CheckpointError as err:
            log.warning("%s; skipping it (left in place)", err)
            failures.append(str(err))
            continue
        hint = _read_hint(stage_dir)
        if hint is not None and hint != path.name:
            log.info("%s names %s; the newest verified checkpoint is %s", stage_dir / LATEST, hint, path.name)
        return Checkpoint(path=path, step=step, manifest=manifest)
    if strict and failures:
        raise CheckpointError(
            f"no checkpoint in {stage_dir} verifies:\n  " + "\n  ".join(failures)
            + f"\nRestore the files from a backup, or start the stage over: `{hints.restart_command()}`."
        )
    return None


def _read_hint(stage_dir: Path) -> str | None:
    try:
        return (stage_dir / LATEST).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def load_checkpoint(
    ckpt: Checkpoint | Path, expect: Collection[str] = (), skip: Collection[str] = ()
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """Verify every file, then load the tensor groups (safetensors only), state and meta.

    The bytes that are hashed are the bytes that are parsed, so nothing changed on disk between
    verification and loading can slip in.

    Args:
        ckpt: a checkpoint from `find_latest`, or a ``step-*`` dir.
        expect: tensor groups the caller needs (e.g. ``("adapter", "optimizer", "rng")``).
        skip: listed files neither read nor returned here: the caller reads them and verifies
            each against the manifest itself (every rank's shards, `rlft.ckpt.sharded`).

    Returns:
        (tensor groups, state, meta).

    Raises:
        CheckpointError: verification failed or an expected group is missing (file named).
    """
    path = ckpt.path if isinstance(ckpt, Checkpoint) else Path(ckpt)
    manifest = read_manifest(path)
    blobs = {name: check_file(path, name, entry, keep=True) for name, entry in sorted(manifest["files"].items())
             if name not in skip}
    for group in expect:
        if f"{group}.safetensors" not in blobs:
            raise CheckpointError(
                f"checkpoint {path}: {group}.safetensors missing: it holds no '{group}' state, so the "
                "run cannot resume exactly. Resume from another checkpoint or start the stage again."
            )
    tensors = {}
    for name, data in blobs.items():
        if name.endswith(".safetensors"):
            try:
                tensors[name[: -len(".safetensors")]] = safetensors.torch.load(data)
            except safetensors.SafetensorError as err:
                raise CheckpointError(f"checkpoint {path}: {name} is not a valid safetensors file: {err}") from err
    return tensors, json.loads(blobs[STATE]), manifest["meta"]

