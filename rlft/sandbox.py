"""Run model-written Python in a sandboxed subprocess (RELIABILITY.md S3, S6; tests 17-18).

`run_python` runs `python -I -S main.py` (isolated mode: no site-packages, no PYTHON*
variables, no script dir on sys.path) with:
- namespaces via util-linux `unshare`: network (a loopback that is down: no connection at
  all, not even to 127.0.0.1), pid (everything the code starts dies with it) and mount: a
  fresh size-limited tmpfs on /tmp holds the working dir /tmp/work; /var/tmp, /dev/shm,
  /root, /home, $HOME, $HF_HOME, $XDG_CACHE_HOME are covered by empty read-only mounts;
- as root: its own unprivileged uid/gid (no groups, no capabilities, no_new_privs) and
  RLIMIT_NPROC. As another user: that user inside a user namespace, capabilities dropped,
  no RLIMIT_NPROC (it would count the user's other processes); files the user may write
  outside the covered dirs stay writable, so prefer running the trainer as root in a container;
- RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_CORE = 0; an environment holding only
  LC_ALL (no token reaches the code, S6); a wall-clock timeout; SIGKILL of the namespace and
  the process group at the end; output over OUTPUT_LIMIT kills the run, OUTPUT_CAP kept.
Without namespaces it refuses (fail closed) unless `allow_unsafe=True`, the recipe's opt-in
that the caller records: then only the private temp dir, environment, limits and group kill remain.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import resource
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlft.errors import UserInputError

Status = Literal["ok", "error", "timeout", "oom", "killed"]

OUTPUT_CAP = 64 * 1024  # bytes kept of each stream (head; plus a 4 KiB tail)
OUTPUT_LIMIT = 8 * 1024 * 1024  # bytes read in total before the run is killed
_TAIL = 4096
_ENV = {"LC_ALL": "C.UTF-8"}
_UID_RANGES = ((1 << 30, 1 << 16), (40000, 20000), (65534, 1))  # (first, count) for sandbox uids
_uid_counter = itertools.count()

UNAVAILABLE_HELP = (
    "Model-written code runs only in a sandbox without network (RELIABILITY.md S3), and this "
    "machine cannot create one: {reason}. Fix: install util-linux (`unshare`, `setpriv`, `mount`) "
    "and allow namespaces (run as root, or `sysctl kernel.unprivileged_userns_clone=1` / "
    "`user.max_user_namespaces > 0`; in Docker add `--cap-add SYS_ADMIN` or use a runtime that "
    "allows user namespaces). Or opt in to running the code without isolation with "
    "`allow_unsafe_code_exec: true` in the stage (or --set stages.<stage>.allow_unsafe_code_exec=true); "
    "the run manifest records it."
)


class SandboxUnavailableError(UserInputError):
    """Isolation is unavailable and the recipe did not opt in to unsafe execution."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    status: ok (exit 0), error (non-zero exit), timeout (wall clock), oom (MemoryError under
    RLIMIT_AS), killed (by a signal, e.g. SIGXCPU/SIGXFSZ, or for writing over OUTPUT_LIMIT).
    returncode is negative for a signal (-9 = SIGKILL), None when the sandbox killed the run.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    elapsed: float
    isolated: bool
    note: str = ""


@dataclass(frozen=True)
class _Isolation:
    mode: Literal["root", "userns"] | None
    python: str
    tools: dict[str, str]
    problem: str | None


def _tools() -> dict[str, str] | str:
    found = {name: shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin") for name in
             ("unshare", "setpriv", "mount", "mkdir", "chown", "cat", "sh")}
    missing = [name for name, path in found.items() if path is None]
    return f"missing programs: {', '.join(missing)}" if missing else {k: str(v) for k, v in found.items()}


def _hidden_dirs() -> list[str]:
    """Directories covered by empty read-only mounts in the sandbox (homes, HF cache and token)."""
    dirs = ["/var/tmp", "/dev/shm", "/root", "/home", str(Path.home())]
    for var in ("HF_HOME", "HF_TOKEN_PATH", "XDG_CACHE_HOME"):
        value = os.environ.get(var)
        if value:
            dirs.append(value if os.path.isdir(value) else os.path.dirname(value))
    return sorted({os.path.realpath(d) for d in dirs if d and os.path.isdir(d) and os.path.realpath(d) != "/"})


def _python_for(mode: Literal["root", "userns"]) -> str | None:
    """An interpreter outside the hidden dirs that the sandbox uid can run (every ancestor o+x)."""
    hidden = _hidden_dirs()
    for cand in (sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3", "/usr/local/bin/python3"):
        real = Path(os.path.realpath(cand)) if cand else None
        if real is None or not real.is_file() or any(str(real).startswith(h + "/") for h in hidden):
            continue
        if mode == "userns" or (real.stat().st_mode & 0o005 == 0o005
                                and all(p.stat().st_mode & 0o001 for p in real.parents)):
            return str(real)
    return None


def _sandbox_uid() -> int:
    def mapped(file: str, first: int, count: int) -> bool:
        for line in Path(file).read_text().splitlines():
            inner, _, length = (int(x) for x in line.split())
            if inner <= first and first + count <= inner + length:
                return True
        return False

    for first, count in _UID_RANGES:
        if mapped("/proc/self/uid_map", first, count) and mapped("/proc/self/gid_map", first, count):
            return first + (os.getpid() * 131 + next(_uid_counter)) % count
    raise OSError("no unprivileged uid is mapped in this user namespace")


_PROBE = (
    "import os, socket\n"
    "names = [n for _, n in socket.if_nameindex()]\n"
    "open('probe', 'w').write('x')\n"
    "print(os.getuid(), ','.join(names), os.getcwd())\n"
)


@functools.lru_cache(maxsize=1)
def _probe() -> _Isolation:
    tools = _tools()
    if isinstance(tools, str):
        return _Isolation(None, sys.executable, {}, tools)
    problems = []
    # as root a user namespace would map the code to uid 0 on the host: root mode only
    for mode in ("root",) if os.geteuid() == 0 else ("userns",):
        python = _python_for(mode)
        if python is None:
            problems.append(f"{mode}: no Python interpreter the sandbox user can execute")
            continue
        iso = _Isolation(mode, python, tools, None)
        try:
            res = _run(iso, _PROBE, _Limits(20.0, 512, 16, 8))
        except OSError as exc:
            problems.append(f"{mode}: {exc}")
            continue
        fields = res.stdout.split()
        if res.status == "ok" and len(fields) == 3 and fields[1] == "lo" and fields[2] == "/tmp/work":
            if mode == "userns" or fields[0] != "0":
                return iso
        tail = (res.stderr.strip().splitlines() or [res.stdout.strip() or res.status])[-1]
        problems.append(f"{mode}: {tail}")
    return _Isolation(None, sys.executable, tools, "; ".join(problems))


def isolation_available() -> bool:
    """Whether namespaced sandboxing works on this machine (probed once with a real run)."""
    return _probe().mode is not None


def isolation_problem() -> str | None:
    """Why isolation is unavailable (None when it works)."""
    return _probe().problem


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_procs: int
    max_file_mb: int


def run_python(code: str, *, timeout_s: float, memory_mb: int, max_procs: int, max_file_mb: int,
               allow_unsafe: bool = False) -> SandboxResult:
    """Run `code` as a Python program in the sandbox and return its outcome.

    Args:
        code: Program text (model-written; treated as hostile).
        timeout_s: Wall-clock limit; CPU time is limited to the same (rounded up) + 1 s.
        memory_mb: Address-space limit (RLIMIT_AS) of every process.
        max_procs: Process limit (RLIMIT_NPROC) when the sandbox has its own uid.
        max_file_mb: Largest file the code may write (RLIMIT_FSIZE); also sizes the tmpfs.
        allow_unsafe: Run without namespaces when they are unavailable (explicit opt-in).

    Returns:
        The status, exit code, capped output and elapsed seconds.

    Raises:
        SandboxUnavailableError: isolation is unavailable and `allow_unsafe` is False.
    """
    limits = _Limits(float(timeout_s), int(memory_mb), int(max_procs), int(max_file_mb))
    if isolation_available():
        return _run(_probe(), code, limits)
    if not allow_unsafe:
        reason = isolation_problem() or "namespace isolation is unavailable"
        raise SandboxUnavailableError(UNAVAILABLE_HELP.format(reason=reason))
    return _run(_Isolation(None, sys.executable, {}, "unsafe"), code, limits)


def _setup_script(iso: _Isolation, limits: _Limits, uid: int | None) -> str:
    """Shell run as (namespace) root before the code: private tmpfs cwd, hidden dirs, code from stdin."""
    t, q = iso.tools, shlex.quote
    lines = ["set -e",
             f"{q(t['mount'])} -t tmpfs -o size={max(8, 2 * limits.max_file_mb)}m,mode=1777,nosuid,nodev rlft /tmp"]
    for d in _hidden_dirs():
        if d != "/tmp" and not d.startswith("/tmp/"):
            lines.append(f"{q(t['mount'])} -t tmpfs -o size=4k,mode=755,ro,nosuid,nodev,noexec rlft-hidden {q(d)}")
    lines += [f"{q(t['mkdir'])} -m 700 /tmp/work"]
    if uid is not None:
        lines.append(f"{q(t['chown'])} {uid}:{uid} /tmp/work")
    lines += ["cd /tmp/work", f"{q(t['cat'])} > main.py", "set +e", '"$@" < /dev/null', "exit $?"]
    return "\n".join(lines)


def _command(iso: _Isolation, limits: _Limits) -> tuple[list[str], int | None]:
    """argv of the sandboxed run and the uid it runs under (None: the trainer's)."""
    python = [iso.python, "-I", "-S", "main.py"]
    if iso.mode is None:
        return python, None
    t = iso.tools
    drop = ["--no-new-privs", "--inh-caps=-all", "--bounding-set=-all"]
    uid = _sandbox_uid() if iso.mode == "root" else None
    if uid is not None:
        drop = ["--reuid", str(uid), "--regid", str(uid), "--clear-groups", *drop]
    ns = ["--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if iso.mode == "userns":
        ns = ["--user", "--map-root-user", *ns]
    script = _setup_script(iso, limits, uid)
    return [t["unshare"], *ns, "--", t["sh"], "-c", script, "sh", t["setpriv"], *drop, "--", *python], uid


def _preexec(limits: _Limits, nproc: bool) -> Callable[[], None]:
    cpu = int(limits.timeout_s) + 1
    mem, fsize = limits.memory_mb * 1024 * 1024, limits.max_file_mb * 1024 * 1024
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def limit() -> None:  # runs in the forked child before exec: no imports, no locks
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the trainer
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if nproc:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_procs, limits.max_procs))

    return limit


def _run(iso: _Isolation, code: str, limits: _Limits) -> SandboxResult:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="rlft-sbx-") if iso.mode is None else None
    try:
        argv, uid = _command(iso, limits)
        stdin_data = code.encode("utf-8", "surrogateescape")
        if workdir is not None:  # unsafe mode: a private dir on disk instead of the namespace's tmpfs
            Path(workdir, "main.py").write_bytes(stdin_data)
            stdin_data = b""
        proc = subprocess.Popen(
            argv, cwd=workdir or "/", env=dict(_ENV), stdin=subprocess.PIPE if stdin_data else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
            preexec_fn=_preexec(limits, nproc=uid is not None),
        )
        out = _Streams()
        try:
            ended = out.pump(proc, stdin_data, start + limits.timeout_s)
        finally:
            _stop(proc, namespaced=iso.mode is not None)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                with contextlib.suppress(OSError, AttributeError):
                    stream.close()  # type: ignore[union-attr]
        return _result(iso, proc.returncode, out, ended, time.monotonic() - start, limits)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


class _Streams:
    """Reads stdout/stderr (feeding stdin) with a cap, a total limit and a deadline."""

    def __init__(self) -> None:
        self.head = {1: bytearray(), 2: bytearray()}
        self.tail = {1: b"", 2: b""}
        self.total = 0

    def pump(self, proc: subprocess.Popen, stdin_data: bytes, deadline: float) -> Literal["exit", "timeout", "output"]:
        """Move data until the process exits, the deadline passes or output exceeds the limit."""
        assert proc.stdout is not None and proc.stderr is not None
        sel, pending = selectors.DefaultSelector(), memoryview(stdin_data)
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ, 1)
        sel.register(proc.stderr.fileno(), selectors.EVENT_READ, 2)
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, 0)
        try:
            while any(key.data for key in sel.get_map().values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout"
                for key, _ in sel.select(min(remaining, 0.5)):
                    if key.data == 0:
                        try:
                            pending = pending[os.write(key.fd, pending):]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:  # the program stopped reading its code
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(key.fd)
                            proc.stdin.close()  # type: ignore[union-attr]
                    elif data := os.read(key.fd, 65536):
                        self.total += len(data)
                        head, room = self.head[key.data], max(OUTPUT_CAP - len(self.head[key.data]), 0)
                        head += data[:room]
                        self.tail[key.data] = (self.tail[key.data] + data[room:])[-_TAIL:]
                        if self.total > OUTPUT_LIMIT:
                            return "output"
                    else:
                        sel.unregister(key.fd)
            return _wait_exit(proc.pid, deadline)
        finally:
            sel.close()

    def text(self, key: int) -> str:
        cut = b"\n...[output truncated]...\n" if self.tail[key] else b""
        return (bytes(self.head[key]) + cut + self.tail[key]).decode("utf-8", "replace")


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _stop(proc: subprocess.Popen, namespaced: bool) -> None:
    """Kill everything the run started and reap it.

    In a pid namespace, SIGKILL to its init (unshare's child) makes the kernel kill every
    process in it before init is reaped; unshare then exits. The group kill comes after, and
    before reaping `proc`, so its pgid cannot have been reused.
    """
    if namespaced:
        for child in _children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        _wait_exit(proc.pid, time.monotonic() + 2.0)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_exit(pid: int, deadline: float) -> Literal["exit", "timeout"]:
    """Wait for `pid` to exit without reaping it (its pgid stays reserved for the group kill)."""
    while time.monotonic() < deadline:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return "exit"
        time.sleep(0.005)
    return "timeout"


def _result(iso: _Isolation, rc: int, out: _Streams, ended: str, elapsed: float, limits: _Limits) -> SandboxResult:
    if iso.mode is not None and rc > 128 and (rc - 128) in signal.valid_signals():
        rc = -(rc - 128)  # the namespace's sh reports a signal death as 128 + signo
    stdout, stderr = out.text(1), out.text(2)
    status: Status
    status, code, note = ("error", rc, "") if rc else ("ok", 0, "")
    if ended == "timeout":
        status, code, note = "timeout", None, f"wall-clock limit {limits.timeout_s:g} s"
    elif ended == "output":
        status, code, note = "killed", None, f"wrote more than {OUTPUT_LIMIT} bytes of output"
    elif rc and "MemoryError" in stderr[-2000:]:
        status, note = "oom", f"memory limit {limits.memory_mb} MB"
    elif rc < 0:
        status, note = "killed", signal.Signals(-rc).name
    return SandboxResult(status, code, stdout, stderr, elapsed, iso.mode is not None, note)
