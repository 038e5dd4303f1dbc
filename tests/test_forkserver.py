"""The fork server used by the kill tests: exit codes, output, env, SIGKILL timing, process groups."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from forkserver import ChildResult, get_server, record_result, reliability_n

from rlft.errors import CheckpointError


def write_files(out: str, n: int, pause: float) -> int:
    """Write `n` numbered files, `pause` seconds apart; return 7 so the exit code is checkable."""
    for i in range(n):
        Path(out, f"f{i:04d}").write_text(f"{i} {os.environ.get('RLFT_TEST_VALUE', '-')}")
        time.sleep(pause)
    return 7


def fail_with_checkpoint_error() -> None:
    raise CheckpointError("boom: no usable checkpoint")


def fail_with_value_error() -> None:
    raise ValueError("plain failure")


def spawn_grandchild(out: str) -> None:
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    Path(out, "grandchild").write_text(str(pid))
    time.sleep(60)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@pytest.fixture(scope="module")
def server():
    return get_server()


def test_child_runs_function_and_returns_exit_code(server, tmp_path: Path) -> None:
    result = server.run(write_files, (str(tmp_path), 3, 0.0), env={"RLFT_TEST_VALUE": "x"})
    assert isinstance(result, ChildResult)
    assert (result.returncode, result.killed) == (7, False)
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["0 x", "1 x", "2 x"]
    assert "RLFT_TEST_VALUE" not in os.environ  # the env applies to the child only


def test_errors_map_to_exit_codes_with_output(server) -> None:
    result = server.run(fail_with_checkpoint_error)
    assert result.returncode == CheckpointError.exit_code
    assert "boom: no usable checkpoint" in result.output
    result = server.run(fail_with_value_error)
    assert result.returncode == 1 and "ValueError: plain failure" in result.output


def test_child_pins_torch_threads(server) -> None:
    assert server.run(torch_threads).returncode == 1


def test_kill_after_stops_child_mid_work(server, tmp_path: Path) -> None:
    t0 = time.monotonic()
    result = server.start(write_files, (str(tmp_path), 1000, 0.01)).kill_after(0.3)
    assert result.returncode == -signal.SIGKILL and result.killed
    assert time.monotonic() - t0 < 2.0
    written = len(list(tmp_path.iterdir()))
    assert 1 <= written < 1000
    time.sleep(0.1)
    assert len(list(tmp_path.iterdir())) == written  # nothing runs after the kill


def test_kill_after_returns_early_when_child_ends(server, tmp_path: Path) -> None:
    result = server.start(write_files, (str(tmp_path), 2, 0.0)).kill_after(30)
    assert (result.returncode, result.killed) == (7, False) and result.elapsed < 5


def test_kill_takes_the_process_group(server, tmp_path: Path) -> None:
    child = server.start(spawn_grandchild, (str(tmp_path),))
    marker = tmp_path / "grandchild"
    deadline = time.monotonic() + 10
    while (not marker.exists() or not marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    grandchild = int(marker.read_text())
    child.kill()
    assert child.wait().returncode == -signal.SIGKILL
    for _ in range(200):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{grandchild}/stat").read_text().split()[2] == "Z":
            break  # killed; a zombie until init reaps it
        time.sleep(0.01)
    else:
        pytest.fail(f"grandchild {grandchild} survived the group kill")


def test_reliability_helpers(monkeypatch, tmp_path: Path) -> None:
    import forkserver

    monkeypatch.delenv("RLFT_RELIABILITY_N", raising=False)
    assert reliability_n() == 5
    monkeypatch.setenv("RLFT_RELIABILITY_N", "20")
    assert reliability_n() == 20
    monkeypatch.setenv("RLFT_RELIABILITY_N", "many")
    with pytest.raises(ValueError, match="RLFT_RELIABILITY_N"):
        reliability_n()
    monkeypatch.setattr(forkserver, "RESULTS_FILE", tmp_path / "r.json")
    record_result("t_a", 4, 5)
    record_result("t_b", 1, 1, note="x")
    record_result("t_a", 5, 5)
    import json

    assert json.loads((tmp_path / "r.json").read_text()) == [
        {"test": "t_b", "passed": 1, "total": 1, "note": "x"},
        {"test": "t_a", "passed": 5, "total": 5},
    ]
