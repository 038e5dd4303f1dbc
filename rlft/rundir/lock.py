"""One writer per run directory (RELIABILITY.md test 11).

`RunLock` holds an exclusive `flock` on ``<run_dir>/rlft.lock`` for the whole run. The OS drops
the lock when the holder dies (even by SIGKILL), so a lock file left by a dead process is simply
taken over. The file also records the holder's PID, host and start time, so a second run is told
who holds the directory. The file is never deleted: unlinking a lock file lets two processes
lock two different inodes under the same name.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rlft.errors import UserInputError

log = logging.getLogger(__name__)

LOCK_NAME = "rlft.lock"


@dataclass(frozen=True)
class LockInfo:
    """Who holds (or last held) a run directory."""

    pid: int
    host: str
    started: str

    def describe(self) -> str:
        """E.g. ``PID 1234 on host-a (started 2025-01-01T10:00:00+00:00)``."""
        return f"PID {self.pid} on {self.host} (started {self.started})"


def read_lock_info(run_dir: Path) -> LockInfo | None:
    """The holder recorded in the lock file, or None when absent or unreadable."""
    try:
        raw = json.loads((Path(run_dir) / LOCK_NAME).read_text(encoding="utf-8"))
        return LockInfo(pid=int(raw["pid"]), host=str(raw["host"]), started=str(raw["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """Exclusive lock on a run directory, as a context manager.

    Raises on entry:
        UserInputError: another live process holds the directory (names its PID); nothing is
            written in that case, and the check takes milliseconds.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise `UserInputError` naming the holder."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._in_use() from None
        except BaseException:
            os.close(fd)
            raise
        previous = read_lock_info(self.run_dir)
        if previous is not None and previous.pid != os.getpid():
            log.info("taking over %s: its holder %s is no longer running", self.path, previous.describe())
        self._fd = fd
        self._record(fd)

    def _record(self, fd: int) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _in_use(self) -> UserInputError:
        # The holder writes its PID right after locking; allow it a moment if we raced it.
        info = read_lock_info(self.run_dir)
        for _ in range(10):
            if info is not None:
                break
            time.sleep(0.02)
            info = read_lock_info(self.run_dir)
        who = info.describe() if info is not None else "another process (PID not recorded yet)"
        return UserInputError(
            f"run directory {self.run_dir} is in use by {who}; wait for it to finish or pass another output_dir"
        )

    def release(self) -> None:
        """Drop the lock (the file stays, emptied, so the next holder locks the same inode)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError as err:
            log.warning("could not clear %s: %s", self.path, err)
        finally:
            os.close(fd)
