"""Sandbox for model-written code: RELIABILITY.md S3/S6, tests 17 (hostile battery) and 18 (fail closed)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest
import sandbox_battery as battery
from forkserver import record_result

from rlft.rewards import sandbox, sandbox_init
from rlft.rewards.runner import build_rewards

LIMITS = dict(timeout_s=2.0, memory_mb=256, max_procs=8, max_file_mb=4)
needs_isolation = pytest.mark.skipif(not sandbox.isolation_available(), reason="no namespace isolation here")


_BASELINE: set[int] = set()


@pytest.fixture(autouse=True)
def _baseline_processes() -> None:
    """Helpers of this test process that predate the test (e.g. other modules' fork server)."""
    _BASELINE.clear()
    _BASELINE.update(_leftovers())


def _leftovers() -> list[int]:
    return battery.leftover_processes(_BASELINE)


def _describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid} {battery.proc_table()[pid]} {Path(f'/proc/{pid}/cmdline').read_bytes()[:200]!r}")
        except (OSError, KeyError):
            out.append(f"{pid} gone")
    return out


def _assert_contained(attempts: list[battery.Attempt], test: str) -> None:
    """Every attempt contained and no process left; the figure goes to reliability-results.json."""
    record_result(test, sum(a.contained for a in attempts), len(attempts),
                  escaped=[f"{a.name}: {a.detail}" for a in attempts if not a.contained])
    assert all(a.contained for a in attempts), [f"{a.name}: {a.detail}" for a in attempts if not a.contained]
    assert _leftovers() == [], _describe(_leftovers())


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
    """RELIABILITY test 17: 9/9 hostile programs contained within limit + 1 s, no process left, no canary."""
    attempts = battery.group_containment(fake_home / ".cache" / "huggingface" / "token", _leftovers)
    assert len(attempts) == 9
    _assert_contained(attempts, "test_sandbox_contains_hostile_code")


@needs_isolation
def test_no_write_reaches_the_host() -> None:
    """Every world-writable directory of this host (found now) and a few others: the code cannot
    write there, only into its private tmpfs, which has a quota; nothing is left after the run."""
    attempts = battery.group_writes()
    assert any(a.name == "write into /tmp" for a in attempts) and len(attempts) > 10
    _assert_contained(attempts, "test_no_write_reaches_the_host")


@needs_isolation
def test_no_connection_to_host_listeners() -> None:
    """Unix stream and datagram listeners in /run/lock, /tmp, /dev/shm and the working directory,
    abstract ones and TCP on loopback accept 0 connections; vsock and netlink sockets are refused."""
    attempts = battery.group_connections()
    assert sum("socket in" in a.name for a in attempts) >= 4  # /run/lock may be missing on a host
    _assert_contained(attempts, "test_no_connection_to_host_listeners")


@needs_isolation
def test_ipc_objects_die_with_the_run() -> None:
    """SysV shm, queues and semaphores and POSIX queues outlive no run, the host's are invisible,
    and SysV shared memory (which no rlimit counts) stops at the memory limit."""
    before = battery.sysv_objects()
    attempts = battery.group_ipc()
    _assert_contained(attempts, "test_ipc_objects_die_with_the_run")
    assert battery.sysv_objects() == before


@needs_isolation
def test_code_still_works_inside() -> None:
    """What honest code needs keeps working: threads, fork, subprocess, multiprocessing, ctypes, /dev/null."""
    code = ("import ctypes, multiprocessing, os, socket, subprocess, sys, threading\n"
            "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
            "print(subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True).stdout.strip())\n"
            "with multiprocessing.Pool(2) as pool: print(pool.map(abs, [-1, -2]))\n"
            "print(len(socket.socketpair()), open('/dev/null', 'w').write('x'))\n"
            "print(ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)(41))\n")
    res = sandbox.run_python(code, **{**LIMITS, "timeout_s": 10.0, "max_procs": 16})
    assert (res.status, res.stdout.split("\n")) == ("ok", ["thread", "42", "[1, 2]", "2 1", "42", ""]), res


@pytest.mark.parametrize("machine, header", [
    ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"), ("aarch64", "/usr/include/asm-generic/unistd.h")])
def test_seccomp_syscall_numbers_match_the_kernel_headers(machine: str, header: str) -> None:
    if not Path(header).exists():
        pytest.skip(f"{header} not installed")
    text = Path(header).read_text()
    for name, number in sandbox_init.ARCHES[machine][1].items():
        assert re.search(rf"#define __NR(3264)?_{name}\s+{number}\b", text), (machine, name, number)


def test_seccomp_program_jumps_stay_inside_it() -> None:
    for machine in sandbox_init.ARCHES:
        prog = sandbox_init.seccomp_program(machine)
        assert prog[-1] == (sandbox_init.RET, sandbox_init.ALLOW, 0, 0) and len(prog) < 4096
        for i, (code, _, jt, jf) in enumerate(prog):
            if code in (sandbox_init.JEQ, sandbox_init.JGE, sandbox_init.JSET):
                assert i + 1 + max(jt, jf) < len(prog)
    with pytest.raises(OSError, match="no seccomp filter"):
        sandbox_init.seccomp_program("sparc64")  # another architecture fails closed


def _listing(path: str) -> list[str]:
    """What /root or /home may show in the sandbox: only the way down to the interpreter's prefix."""
    prefix = Path(os.path.realpath(sys.base_prefix))
    return [prefix.relative_to(path).parts[0]] if prefix.is_relative_to(path) else []


@needs_isolation
def test_hides_homes_and_limits_files(fake_home: Path) -> None:
    """Homes (and the HF token in them) are absent; the interpreter's own prefix is the only exception."""
    code = ("import os\nls = lambda d: os.listdir(d) if os.path.isdir(d) else []\n"
            f"print(ls('/root'), ls('/home'), os.path.exists({str(fake_home)!r}), os.getcwd())")
    res = sandbox.run_python(code, **LIMITS)
    assert res.stdout.strip() == f"{_listing('/root')} {_listing('/home')} False /tmp/work"
    covered = sandbox._hidden_dirs(["/usr", str(fake_home.parent)])
    assert str(fake_home.resolve()) in covered  # a home inside a bound tree is covered by an empty mount
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


def test_reliability_doc_lists_the_battery(tmp_path: Path) -> None:
    """docs/reliability.md's battery table comes from tests/sandbox_battery.py: every group and every
    reward hack is listed, and every attack tried was contained (regenerate it after adding one)."""
    import reward_hacks

    block = battery.DOC.read_text().split(battery.BEGIN)[1].split(battery.END)[0]
    rows = {cells[1].strip(): cells for line in block.splitlines() if line.startswith("| ")
            and (cells := line.split("|"))[1].strip() not in ("group", "---")}
    assert set(rows) == set(battery.GROUPS)
    assert all(int(cells[2]) == int(cells[3]) > 0 for cells in rows.values())
    assert all(name in rows["reward hacks"][4].replace("\\_", "_") for name in reward_hacks.reward_hacks(tmp_path))
