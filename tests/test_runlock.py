"""RELIABILITY test 11: one run per output dir; the loser fails fast naming the holder; stale locks."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
from forkserver import get_server, record_result

from rlft.errors import UserInputError
from rlft.rundir.lock import LOCK_NAME, RunLock, read_lock_info


def hold_lock(run_dir: str, ready: str, release: str) -> int:
    """Hold the run lock until `release` exists (or 30 s pass)."""
    with RunLock(Path(run_dir)):
        Path(run_dir, "written-by-holder").write_text("x")
        Path(ready).write_text(str(os.getpid()))
        deadline = time.monotonic() + 30
        while not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return 0


def try_lock(run_dir: str) -> int:
    with RunLock(Path(run_dir)):
        Path(run_dir, "written-by-loser").write_text("x")
    return 0


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def start_holder(tmp_path: Path, run_dir: Path):
    ready, release = tmp_path / "ready", tmp_path / "release"
    child = get_server().start(hold_lock, (str(run_dir), str(ready), str(release)))
    wait_for(ready)
    return child, release


def test_run_dir_lock(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    checks = []
    holder, release = start_holder(tmp_path, run_dir)
    before = snapshot(run_dir)
    t0 = time.monotonic()
    with pytest.raises(UserInputError) as err:
        with RunLock(run_dir):
            pass
    elapsed = time.monotonic() - t0
    checks.append(elapsed < 2.0)
    message = str(err.value)
    checks.append(f"is in use by PID {holder.pid}" in message and str(run_dir) in message and "output_dir" in message)
    loser = get_server().run(try_lock, (str(run_dir),))
    checks.append(loser.returncode == 2 and f"PID {holder.pid}" in loser.output)
    checks.append(snapshot(run_dir) == before)  # the losers wrote nothing
    release.write_text("go")
    checks.append(holder.wait().returncode == 0)
    with RunLock(run_dir):
        assert read_lock_info(run_dir).pid == os.getpid()
    checks.append(read_lock_info(run_dir) is None)  # released: emptied, not deleted
    record_result("test_run_dir_lock", sum(checks), len(checks))
    assert all(checks), checks


def test_stale_lock_from_killed_holder_is_taken_over(tmp_path: Path, caplog) -> None:
    run_dir = tmp_path / "run"
    holder, _ = start_holder(tmp_path, run_dir)
    holder.kill()
    assert holder.wait().returncode == -9
    assert read_lock_info(run_dir).pid == holder.pid  # the dead holder's record is still there
    with caplog.at_level(logging.INFO, logger="rlft.rundir.lock"):
        with RunLock(run_dir) as lock:
            assert read_lock_info(run_dir).pid == os.getpid() and lock.path == run_dir / LOCK_NAME
    assert f"PID {holder.pid}" in caplog.text and "no longer running" in caplog.text


def test_stale_lock_file_with_dead_pid(tmp_path: Path, caplog) -> None:
    child = get_server().start(int)  # a child that exits at once and is reaped: its PID is dead
    assert child.wait().returncode == 0
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": child.pid, "host": "h", "started": "s"}))
    with caplog.at_level(logging.INFO, logger="rlft.rundir.lock"):
        with RunLock(tmp_path):
            assert read_lock_info(tmp_path).pid == os.getpid()
    assert f"PID {child.pid} on h" in caplog.text


def test_lock_is_exclusive_within_a_process_and_reentry_refused(tmp_path: Path) -> None:
    lock = RunLock(tmp_path)
    with lock:
        with pytest.raises(UserInputError, match=f"PID {os.getpid()}"):
            RunLock(tmp_path).acquire()
        with pytest.raises(RuntimeError):
            lock.acquire()
    with RunLock(tmp_path):
        pass
