"""Run model-written Python in a sandboxed subprocess (RELIABILITY.md S3, S6; tests 17-18).

`run_python` runs the program as `python -I -S main.py` would (isolated mode: no site-packages,
no PYTHON* variables, no script dir on sys.path), in the confined child of rlft/rewards/sandbox_init.py,
pid 1 of new mount, network, pid and IPC namespaces made by util-linux `unshare` (that file
details each measure):
- file system: a read-only view holding only the system directories (/usr, /etc, /lib*, ...)
  and the interpreter's prefix; homes, /run, /var, the host's /tmp, data and run directories
  are absent. The one writable place is a private tmpfs of max(8, 2 * max_file_mb) MB at /tmp
  (also /dev/shm), working dir /tmp/work; it vanishes with the run;
- no connection of any kind: the network namespace has only a loopback that is down, and a
  seccomp filter refuses Unix (file system and abstract), netlink and vsock sockets, new
  namespaces, io_uring and keyrings;
- the pid namespace kills everything the code started; the IPC namespace takes its SysV and
  POSIX IPC objects with it (its shared memory capped at the memory limit);
- as root: its own unprivileged uid/gid (no groups, no capabilities, no_new_privs) and
  RLIMIT_NPROC. As another user: that user inside a user namespace, capabilities dropped,
  no RLIMIT_NPROC (it would count the user's other processes);
- RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_MSGQUEUE, RLIMIT_CORE = 0; an environment holding
  only LC_ALL (no token reaches the code, S6); a wall-clock timeout; SIGKILL of the namespace and
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
_INIT = str(Path(__file__).with_name("sandbox_init.py"))
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/nix")
_SETUP_FAILED = 125  # sandbox_init.EXIT_SETUP

UNAVAILABLE_HELP = (
    "Model-written code runs only in a sandbox without network (RELIABILITY.md S3), and this "
    "machine cannot create one: {reason}. Fix: install util-linux (`unshare`) and allow "
    "namespaces and seccomp (run as root, or `sysctl kernel.unprivileged_userns_clone=1` / "
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
    unshare: str
    problem: str | None


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_procs: int
    max_file_mb: int


def _python() -> str:
    """The trainer's own interpreter (the base one for a venv); its prefix is bound into the sandbox."""
    return os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _binds(python: str) -> list[str]:
    """Host paths visible (read-only) in the sandbox: system directories and the interpreter's prefix."""
    paths = [d for d in _SYSTEM_DIRS if os.path.lexists(d)]
    for extra in (os.path.dirname(python), sys.base_prefix, sys.base_exec_prefix):
        real = os.path.realpath(extra)
        if not any(_inside(real, p) for p in paths):
            paths = [p for p in paths if not _inside(p, real)] + [real]
    return paths


def _hidden_dirs(binds: list[str]) -> list[str]:
    """Secret-bearing directories (homes, HF cache and token) that a bind would expose: covered by empty mounts."""
    dirs = ["/root", "/home", str(Path.home())]
    for var in ("HF_HOME", "HF_TOKEN_PATH", "XDG_CACHE_HOME"):
        value = os.environ.get(var)
        if value:
            dirs.append(value if os.path.isdir(value) else os.path.dirname(value))
    real = {os.path.realpath(d) for d in dirs if d and os.path.isdir(d)}
    return sorted(d for d in real if any(_inside(d, b) for b in binds) and not any(_inside(b, d) for b in binds))


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
    "nets = [line.split(':')[0].strip() for line in open('/proc/net/dev').read().splitlines()[2:]]\n"
    "open('probe', 'w').write('x')\n"
    "try:\n    socket.socket(socket.AF_UNIX).close()\n    unix = 'unix-open'\n"
    "except OSError:\n    unix = 'unix-refused'\n"
    "ro = 'root-ro' if os.statvfs('/').f_flag & os.ST_RDONLY else 'root-rw'\n"
    "print(os.getuid(), ','.join(nets), os.getcwd(), unix, ro)\n"
)


@functools.lru_cache(maxsize=1)
def _probe() -> _Isolation:
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if unshare is None:
        return _Isolation(None, sys.executable, "", "missing program: unshare")
    # as root a user namespace would map the code to uid 0 on the host: root mode only
    mode: Literal["root", "userns"] = "root" if os.geteuid() == 0 else "userns"
    iso = _Isolation(mode, _python(), unshare, None)
    try:
        res = _run(iso, _PROBE, _Limits(20.0, 512, 16, 8))
    except OSError as exc:
        return _Isolation(None, sys.executable, unshare, f"{mode}: {exc}")
    fields = res.stdout.split()
    want = ["lo", "/tmp/work", "unix-refused", "root-ro"]
    if res.status == "ok" and fields[1:] == want and (mode == "userns" or fields[0] != "0"):
        return iso
    tail = (res.stderr.strip().splitlines() or [res.stdout.strip() or res.status])[-1]
    return _Isolation(None, sys.executable, unshare, f"{mode}: {tail}")


def isolation_available() -> bool:
    """Whether namespaced sandboxing works on this machine (probed once with a real run)."""
    return _probe().mode is not None


def isolation_problem() -> str | None:
    """Why isolation is unavailable (None when it works)."""
    return _probe().problem


def run_python(code: str, *, timeout_s: float, memory_mb: int, max_procs: int, max_file_mb: int,
               allow_unsafe: bool = False, stdin: str = "", stdout_cap: int = OUTPUT_CAP) -> SandboxResult:
    """Run `code` as a Python program in the sandbox and return its outcome.

    Args:
        code: Program text (model-written; treated as hostile).
        timeout_s: Wall-clock limit; CPU time is limited to the same (rounded up) + 1 s.
        memory_mb: Address-space limit (RLIMIT_AS) of every process; also caps SysV shared memory.
        max_procs: Process limit (RLIMIT_NPROC) when the sandbox has its own uid.
        max_file_mb: Largest file the code may write (RLIMIT_FSIZE); the tmpfs holds twice that.
        allow_unsafe: Run without namespaces when they are unavailable (explicit opt-in).
        stdin: The program's standard input (EOF after it).
        stdout_cap: Bytes of stdout kept (the head; OUTPUT_LIMIT still kills the run).

    Returns:
        The status, exit code, capped output and elapsed seconds.

    Raises:
        SandboxUnavailableError: isolation is unavailable and `allow_unsafe` is False.
    """
    limits = _Limits(float(timeout_s), int(memory_mb), int(max_procs), int(max_file_mb))
    if isolation_available():
        return _run(_probe(), code, limits, stdin, stdout_cap)
    if not allow_unsafe:
        reason = isolation_problem() or "namespace isolation is unavailable"
        raise SandboxUnavailableError(UNAVAILABLE_HELP.format(reason=reason))
    return _run(_Isolation(None, sys.executable, "", "unsafe"), code, limits, stdin, stdout_cap)


def _rlimits(limits: _Limits, nproc: bool) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) for the code's processes."""
    cpu = int(limits.timeout_s) + 1
    mem, fsize = limits.memory_mb * 1024 * 1024, limits.max_file_mb * 1024 * 1024
    out = [(resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
           (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_MSGQUEUE, 1 << 20, 1 << 20)]
    if nproc:
        out.append((resource.RLIMIT_NPROC, limits.max_procs, limits.max_procs))
    return [(res, _clamp(res, soft), _clamp(res, hard)) for res, soft, hard in out]


def _clamp(res: int, value: int) -> int:
    """At most the current hard limit: raising it needs CAP_SYS_RESOURCE, which containers often lack."""
    hard = resource.getrlimit(res)[1]
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def _command(iso: _Isolation, limits: _Limits) -> tuple[list[str], list[tuple[int, int, int]]]:
    """argv of the run and the rlimits the trainer applies itself (namespaced: sandbox_init does)."""
    python = [iso.python, "-I", "-S", "main.py"]
    if iso.mode is None:
        return python, _rlimits(limits, nproc=False)
    uid = _sandbox_uid() if iso.mode == "root" else None
    binds = _binds(iso.python)
    options = ["--tmpfs-mb", str(max(8, 2 * limits.max_file_mb)), "--memory-mb", str(limits.memory_mb)]
    options += ["--uid", str(uid)] if uid is not None else []
    options += [x for path in binds for x in ("--bind", path)]
    options += [x for path in _hidden_dirs(binds) for x in ("--cover", path)]
    options += [x for r in _rlimits(limits, nproc=uid is not None) for x in ("--rlimit", ":".join(map(str, r)))]
    ns = ["--mount", "--net", "--pid", "--ipc", "--fork", "--kill-child"]
    if iso.mode == "userns":
        ns = ["--user", "--map-root-user", *ns]
    return [iso.unshare, *ns, "--", iso.python, "-I", "-S", "-B", _INIT, *options], []


def _preexec(rlimits: list[tuple[int, int, int]]) -> Callable[[], None]:
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def limit() -> None:  # runs in the forked child before exec: no imports, no locks
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the trainer
        for res, soft, hard in rlimits:
            resource.setrlimit(res, (soft, hard))

    return limit


def _run(iso: _Isolation, code: str, limits: _Limits, stdin: str = "", stdout_cap: int = OUTPUT_CAP) -> SandboxResult:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="rlft-sbx-") if iso.mode is None else None
    try:
        argv, rlimits = _command(iso, limits)
        program, data = code.encode("utf-8", "surrogateescape"), stdin.encode("utf-8", "surrogateescape")
        if workdir is None:  # sandbox_init reads `<length>\n<program>` and leaves the rest to the program
            data = b"%d\n" % len(program) + program + data
        else:  # unsafe mode: a private dir on disk instead of the namespace's tmpfs
            Path(workdir, "main.py").write_bytes(program)
        proc = subprocess.Popen(
            argv, cwd=workdir or "/", env=dict(_ENV), stdin=subprocess.PIPE if data else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
            preexec_fn=_preexec(rlimits),
        )
        out = _Streams(stdout_cap)
        try:
            ended = out.pump(proc, data, start + limits.timeout_s)
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

    def __init__(self, stdout_cap: int) -> None:
        self.caps = {1: stdout_cap, 2: OUTPUT_CAP}
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
                        head, room = self.head[key.data], max(self.caps[key.data] - len(self.head[key.data]), 0)
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
    elif iso.mode is not None and rc == _SETUP_FAILED and "rlft sandbox setup failed" in stderr:
        note = "the sandbox could not be set up; the code did not run"
    elif rc and "MemoryError" in stderr[-2000:]:
        status, note = "oom", f"memory limit {limits.memory_mb} MB"
    elif rc < 0:
        status, note = "killed", signal.Signals(-rc).name
    return SandboxResult(status, code, stdout, stderr, elapsed, iso.mode is not None, note)
