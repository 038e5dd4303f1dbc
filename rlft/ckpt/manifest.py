"""Checkpoint manifest: the commit record of a checkpoint dir, and verification against it.

`manifest.json` lists every file with its sha256 and size, the step and the stage's meta, and
checks itself: it is canonical JSON (sorted keys, fixed layout) carrying the sha256 of its own
body, so a flipped byte anywhere breaks the JSON, the canonical form or that hash (R4).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlft.errors import CheckpointError

FORMAT = 1
MANIFEST = "manifest.json"
STATE = "state.json"
STEP_RE = re.compile(r"^step-(\d+)$")
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\.(safetensors|json)$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(obj: Any) -> bytes:
    """The one byte form rlft writes a manifest in (sorted keys, fixed indent, ASCII, no NaN)."""
    return (json.dumps(obj, sort_keys=True, ensure_ascii=True, indent=1, allow_nan=False) + "\n").encode()


def manifest_bytes(step: int, files: dict[str, dict[str, Any]], meta: dict[str, Any]) -> bytes:
    """The manifest of a checkpoint at `step` listing `files` (name -> sha256, size) and `meta`."""
    body = {
        "format": FORMAT,
        "step": step,
        "files": files,
        "meta": meta,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # The manifest checks itself: any byte change breaks the JSON, the canonical form or this hash.
    return canonical_json({**body, "manifest_sha256": hashlib.sha256(canonical_json(body)).hexdigest()})


def is_regular_file(path: Path) -> bool:
    """A regular file, not a symlink (checkpoints never follow links out of their dir)."""
    return path.is_file() and not path.is_symlink()


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check a checkpoint dir against its manifest without loading any tensor.

    Args:
        path: a ``step-*`` directory.

    Returns:
        The manifest.

    Raises:
        CheckpointError: naming the dir and the first file that is missing, unlisted, of the
            wrong size or hash, or a manifest that is unreadable or modified.
    """
    manifest = read_manifest(Path(path))
    for name in sorted(manifest["files"]):
        check_file(Path(path), name, manifest["files"][name], keep=False)
    return manifest


def _fail(path: Path, name: str, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} failed verification: {name}: {what}")


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check a checkpoint's manifest, and that the dir holds exactly the files it lists.

    Raises:
        CheckpointError: naming the dir and the file at fault.
    """
    file = path / MANIFEST
    if not is_regular_file(file):
        raise _fail(path, MANIFEST, "missing (the save did not finish, or the file was deleted)")
    raw = file.read_bytes()
    try:
        manifest = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise _fail(path, MANIFEST, f"not valid JSON ({err}); truncated or modified") from err
    if not isinstance(manifest, dict) or canonical_json(manifest) != raw:
        raise _fail(path, MANIFEST, "modified (bytes differ from the form rlft writes)")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest.get("manifest_sha256") != hashlib.sha256(canonical_json(body)).hexdigest():
        raise _fail(path, MANIFEST, "its checksum does not match its content (modified)")
    m = STEP_RE.match(path.name)
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict) or not isinstance(
        manifest.get("meta"), dict
    ):
        raise _fail(path, MANIFEST, f"unknown format {manifest.get('format')!r} (this rlft reads {FORMAT})")
    if m is None or manifest.get("step") != int(m.group(1)):
        raise _fail(path, MANIFEST, f"says step {manifest.get('step')!r} but the directory is {path.name}")
    files = manifest["files"]
    if STATE not in files:
        raise _fail(path, STATE, "not listed in the manifest")
    for name, entry in files.items():
        if not _FILE_RE.match(name) or name == MANIFEST or not _valid_entry(entry):
            raise _fail(path, MANIFEST, f"invalid file entry {name!r}")
    with os.scandir(path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name != MANIFEST and entry.name not in files:
                raise _fail(path, entry.name, "present but not listed in the manifest (added after the save)")
    return manifest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a manifest")


def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and type(entry.get("size")) is int
        and isinstance(entry.get("sha256"), str)
        and bool(_SHA_RE.match(entry["sha256"]))
    )


def check_file(path: Path, name: str, entry: dict[str, Any], keep: bool) -> bytes:
    """Hash one listed file; return its bytes when `keep` (so the verified bytes are the loaded ones)."""
    try:
        fd = os.open(path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _fail(path, name, "missing (listed in the manifest)") from None
    except OSError as err:
        raise _fail(path, name, f"cannot be read ({err.strerror}; a symlink is refused)") from err
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _fail(path, name, "not a regular file")
        size = st.st_size
        if size != entry["size"]:
            raise _fail(path, name, f"size {size} bytes, manifest says {entry['size']} (truncated or modified)")
        digest, chunks = hashlib.sha256(), []
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            if keep:
                chunks.append(chunk)
    if digest.hexdigest() != entry["sha256"]:
        raise _fail(path, name, "sha256 does not match the manifest (corrupted or modified)")
    return b"".join(chunks)


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`, by relative path."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[str(path.relative_to(root))] = h.hexdigest()
    return out


def fingerprint(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
