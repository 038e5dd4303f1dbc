"""Sandbox for model-written code: RELIABILITY.md S3/S6, tests 17 (hostile battery) and 18 (fail closed)."""

from __future__ import annotations

import ast
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest

from rlft import sandbox
from rlft.rewards import build_rewards

LIMITS = dict(timeout_s=2.0, memory_mb=256, max_procs=8, max_file_mb=4)
needs_isolation = pytest.mark.skipif(not sandbox.isolation_available(), reason="no namespace isolation here")


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, real uid) of every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            continue
        table[int(entry)] = (int(fields["PPid"]), int(fields["Uid"].split()[0]))
    return table


_BASELINE: set[int] = set()


@pytest.fixture(autouse=True)
def _baseline_processes() -> None:
    """Helpers of this test process that predate the test (e.g. other modules' fork server)."""
    _BASELINE.clear()
    _BASELINE.update(_leftovers())


def _leftovers() -> list[int]:
    """Descendants of this process plus any process running under a sandbox uid, less the baseline."""
    table = _proc_table()
    sandbox_uid = lambda uid: any(first <= uid < first + n for first, n in sandbox._UID_RANGES[:2])  # noqa: E731
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return sorted((found | {pid for pid, (_, uid) in table.items() if sandbox_uid(uid)}) - _BASELINE)


def _describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid} {_proc_table()[pid]} {Path(f'/proc/{pid}/cmdline').read_bytes()[:200]!r}")
        except (OSError, KeyError):
            out.append(f"{pid} gone")
    return out


@pytest.fixture
def fake_home(monkeypatch: pytest.MonkeyPatch) -> Path:
    """A world-readable HOME with a Hugging Face token: only the sandbox may keep it unreadable."""
    home = Path(tempfile.mkdtemp(prefix="rlft-home-"))
    token = home / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_CANARYTOKEN123")
    for p in (home, home / ".cache", token.parent):
        p.chmod(0o755)
    token.chmod(0o644)
    monkeypatch.setenv("HOME", str(home))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_isolation_works_where_it_should() -> None:
    """As root with util-linux present (this project's CI), a broken probe is a failure, not a skip."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("not root or no unshare")
    assert sandbox.isolation_available(), sandbox.isolation_problem()


def test_runs_code_and_caps_output() -> None:
    res = sandbox.run_python("print('hello'); import sys; print('warn', file=sys.stderr)", **LIMITS)
    assert (res.status, res.returncode, res.stdout, res.stderr) == ("ok", 0, "hello\n", "warn\n")
    res = sandbox.run_python("import sys; sys.stdout.write('x' * 200000); sys.exit(3)", **LIMITS)
    assert (res.status, res.returncode) == ("error", 3)
    assert len(res.stdout) < sandbox.OUTPUT_CAP + 5000 and "truncated" in res.stdout
    big = "x = " + repr("y" * 300_000) + "\nprint(len(x))\n"  # larger than a pipe buffer
    assert sandbox.run_python(big, **LIMITS).stdout == "300000\n"


@needs_isolation
def test_child_env_has_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    canaries = {"HF_TOKEN": "hf_CANARY_A", "WANDB_API_KEY": "CANARY_B", "MY_SECRET_TOKEN": "CANARY_C"}
    for k, v in canaries.items():
        monkeypatch.setenv(k, v)
    res = sandbox.run_python("import os; print(repr(dict(os.environ)))", **LIMITS)
    assert res.status == "ok"
    assert not any(v in res.stdout for v in canaries.values())
    env = ast.literal_eval(res.stdout)
    assert "HOME" not in env and "PATH" not in env and set(env) <= {"LC_ALL", "PWD", "OLDPWD"}


@needs_isolation
def test_sandbox_contains_hostile_code(fake_home: Path) -> None:
    """RELIABILITY test 17: 9/9 hostile programs contained within limit + 1 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    token = fake_home / ".cache" / "huggingface" / "token"
    host_tmp_canary = Path(tempfile.gettempdir()) / f"rlft-canary-{os.getpid()}"
    battery = {
        "busy loop": ("while True: pass", {"timeout", "killed"}),
        "allocate 4 GB": ("b = bytearray(4 * 1024**3)", {"oom", "killed"}),
        "fork bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                      {"timeout", "killed"}),
        "1 GB stdout": ("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\n", {"killed"}),
        "write ../../canary": (f"for p in ('../../canary', {str(host_tmp_canary)!r}):\n"
                               "    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n"
                               "raise SystemExit('done')", {"error"}),
        "read HF token": (f"print(open({str(token)!r}).read())", {"error"}),
        "connect to loopback": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                                {"error"}),
        "kill the trainer": (f"import os\nos.kill(os.getppid(), 9)\nos.kill({os.getpid()}, 9)", {"error"}),
        "ignore SIGTERM": ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)",
                           {"timeout"}),
    }
    contained = 0
    for name, (code, expected) in battery.items():
        t0 = time.monotonic()
        res = sandbox.run_python(code, **LIMITS)
        took = time.monotonic() - t0
        assert res.isolated
        assert res.status in expected, f"{name}: {res}"
        assert took <= LIMITS["timeout_s"] + 1.0, f"{name} took {took:.2f} s"
        assert "hf_CANARYTOKEN123" not in res.stdout + res.stderr, name
        assert _leftovers() == [], f"{name} left processes behind: {_describe(_leftovers())}"
        contained += 1
    assert contained == 9
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()  # 0 connections reached the loopback canary
    listener.close()
    assert not Path("/canary").exists() and not host_tmp_canary.exists()


@needs_isolation
def test_hides_homes_and_limits_files(fake_home: Path) -> None:
    assert str(fake_home.resolve()) in sandbox._hidden_dirs() or str(fake_home).startswith("/tmp/")
    res = sandbox.run_python("import os; print(os.listdir('/root'), os.listdir('/home'), os.getcwd())", **LIMITS)
    assert res.stdout.strip() == "[] [] /tmp/work"
    res = sandbox.run_python("open('big', 'wb').write(b'x' * 8 * 2**20)", **LIMITS)  # > max_file_mb = 4
    assert res.status == "error" and "File too large" in res.stderr  # Python ignores SIGXFSZ: EFBIG


@needs_isolation
def test_runs_under_its_own_uid_when_root() -> None:
    res = sandbox.run_python("import os; print(os.getuid(), os.getgroups())", **LIMITS)
    uid = int(res.stdout.split()[0])
    if os.geteuid() == 0:
        assert uid != 0 and res.stdout.split(maxsplit=1)[1].strip() == "[]"


def test_fails_closed_without_isolation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """RELIABILITY test 18: no namespaces -> refuse with an actionable message; opt-in runs."""
    monkeypatch.setattr(sandbox, "isolation_available", lambda: False)
    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "unshare: operation not permitted")
    with pytest.raises(sandbox.SandboxUnavailableError) as err:
        sandbox.run_python("print(1)", **LIMITS)
    assert "unshare: operation not permitted" in str(err.value) and "allow_unsafe_code_exec" in str(err.value)
    with pytest.raises(sandbox.SandboxUnavailableError, match=r"rewards\[0\] code_exec.*allow_unsafe_code_exec"):
        build_rewards(["code_exec"], tmp_path)
    res = sandbox.run_python("print(1)", **LIMITS, allow_unsafe=True)
    assert (res.status, res.stdout, res.isolated) == ("ok", "1\n", False)
    with build_rewards(["code_exec"], tmp_path, allow_code_exec_unsafe=True) as rs:
        assert rs.unsafe_code_exec  # the stage records this in the manifest
        out = rs(["p"], ["```python\ndef f(x):\n    return x + 1\n```"], {"tests": [["assert f(1) == 2"]]})
        assert out.total.tolist() == [1.0]


def test_unsafe_mode_still_limits_and_cleans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "isolation_available", lambda: False)
    monkeypatch.setenv("HF_TOKEN", "hf_CANARY_UNSAFE")
    res = sandbox.run_python("import os; print(dict(os.environ))", **LIMITS, allow_unsafe=True)
    assert "hf_CANARY_UNSAFE" not in res.stdout
    t0 = time.monotonic()
    res = sandbox.run_python("while True: pass", **LIMITS, allow_unsafe=True)
    assert res.status == "timeout" and time.monotonic() - t0 <= LIMITS["timeout_s"] + 1.0
    assert sandbox.run_python("b = bytearray(4 * 1024**3)", **LIMITS, allow_unsafe=True).status == "oom"
    assert _leftovers() == []


def test_private_dir_is_private_in_unsafe_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "isolation_available", lambda: False)
    res = sandbox.run_python("import os; print(os.getcwd()); print(oct(os.stat('.').st_mode))", **LIMITS,
                             allow_unsafe=True)
    cwd, mode = res.stdout.split()
    assert not Path(cwd).exists()  # removed afterwards
    assert stat.S_IMODE(int(mode, 8)) == 0o700
