"""Durable writes: the one fsync helper pair, the one atomic file write, the one atomic directory
commit (checkpoints, stage outputs and tiny models all use `commit_dir`), and the one place a
failed write (disk full, file size limit, I/O error) becomes a `WriteError`."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from rlft.errors import WriteError

log = logging.getLogger(__name__)

# Errors that say the storage refused the bytes, not that rlft asked for something wrong.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})
_HINTS = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "raise the disk quota or free space",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
}


def fsync_dir(path: Path, best_effort: bool = False) -> None:
    """Make a rename or a new entry in `path` durable. `best_effort`: ignore a filesystem that
    refuses a directory fsync (a cache, not a commit, depends on it)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not best_effort:
            raise


def fsync_tree(root: Path, best_effort: bool = False) -> None:
    """fsync every file below `root`, then `root` itself: the contents are on disk before a
    rename makes them visible."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(root, best_effort)


def commit_dir(staging: Path, final: Path, *, best_effort: bool = False) -> None:
    """Swap the fully written directory `staging` in as `final`, durably and atomically.

    Every file of `staging` is fsynced first; an existing `final` (an earlier attempt) is renamed
    aside, `staging` renamed to `final`, the parent fsynced, and only then the old copy removed.
    A kill at any point leaves `final` either absent, the old directory or the new one, never a
    mix; the aside copy (`.replaced-<name>-<uuid>`) is the only possible leftover. When the rename
    fails (another process committed `final` in the meantime), the old directory is put back if
    `final` is free and the error is raised. `best_effort`: a filesystem refusing directory fsync
    is tolerated (caches, not commits of work).
    """
    fsync_tree(staging, best_effort)
    aside = None
    if os.path.lexists(final):
        aside = final.parent / f".replaced-{final.name}-{uuid.uuid4().hex}"
        os.rename(final, aside)
        log.info("%s already exists (an earlier attempt); replacing it", final)
    try:
        os.rename(staging, final)
    except OSError:
        if aside is not None and not os.path.lexists(final):
            os.rename(aside, final)
        raise
    fsync_dir(final.parent, best_effort)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so a reader (or a crash) sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def storage_errno(err: BaseException) -> int | None:
    """The errno of a write the storage refused, or None for any other error.

    safetensors' writer is Rust: it raises `SafetensorError` whose text ends in
    `(os error N)` instead of an `OSError`, so the errno is read from the text.
    """
    code = err.errno if isinstance(err, OSError) else None
    if code is None and type(err).__name__ == "SafetensorError":
        match = re.search(r"\(os error (\d+)\)", str(err))
        code = int(match.group(1)) if match else None
    return code if code in STORAGE_ERRNOS else None


def write_error(what: str, path: Path | str, code: int) -> WriteError:
    """One line: what was not saved, where, the errno, and what to do."""
    hint = _HINTS.get(code, "check the disk")
    return WriteError(
        f"{what} not saved: {path}: [Errno {code} {errno.errorcode.get(code, '?')}] {os.strerror(code)}; "
        f"{hint} and run the same command again (finished stages and checkpoints are kept)"
    )


@contextlib.contextmanager
def writing(what: str, path: Path | str) -> Iterator[None]:
    """Turn a storage failure inside the block into a `WriteError` naming `what` and `path`.

    Raises:
        WriteError: the block failed with ENOSPC, EDQUOT, EFBIG or EIO (also inside safetensors).
    """
    try:
        yield
    except Exception as err:
        code = storage_errno(err)
        if code is None:
            raise
        raise write_error(what, getattr(err, "filename", None) or path, code) from err
