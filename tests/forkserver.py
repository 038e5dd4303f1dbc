"""Fork server for kill tests, plus the reliability-figure helpers (RELIABILITY.md test plan).

A fresh interpreter pays the torch/transformers/peft import for every run; a kill test needs
dozens of runs. The server is a separate process that imports those libraries once and runs no
torch op (so no thread pool exists to be broken by `fork`), then forks one child per run. The
child calls the given function, and the test waits for it or SIGKILLs it at a chosen instant.

    server = get_server()
    child = server.start(rlft.cli.main, (["stage", "sft", ...],), env={"RLFT_FAULT": "after_file:2"})
    result = child.kill_after(0.8)            # or child.wait()
    assert result.returncode in (0, -9)

Callables travel by pickle, i.e. by reference: use module-level functions. They are unpickled
in the child, so their module is imported there, never in the server.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO_ROOT / "reliability-results.json"
DEFAULT_PRELOAD = ("pytest", "torch", "numpy", "safetensors.torch", "transformers", "peft")


def reliability_n() -> int:
    """Trials per randomized reliability test: 5 by default, `RLFT_RELIABILITY_N` (e.g. 20) in CI."""
    raw = os.environ.get("RLFT_RELIABILITY_N", "5")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"RLFT_RELIABILITY_N={raw!r}: expected a positive integer")
    return int(raw)


def record_result(name: str, passed: int, total: int, **extra: Any) -> None:
    """Record one reliability figure in ``reliability-results.json`` (replacing the test's old entry).

    Args:
        name: the test name, e.g. ``test_kill_at_every_save_phase``.
        passed: trials that met the bar.
        total: trials run.
        **extra: JSON details (e.g. the failing phases).
    """
    entry = {"test": name, "passed": passed, "total": total, **extra}
    fd = os.open(RESULTS_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+", encoding="utf-8") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        text = fh.read()
        try:
            results = json.loads(text) if text.strip() else []
        except ValueError:
            results = []
        results = [r for r in results if isinstance(r, dict) and r.get("test") != name] + [entry]
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(results, indent=1) + "\n")


@dataclass(frozen=True)
class ChildResult:
    """How a forked run ended. `returncode` follows subprocess: -9 means killed by SIGKILL."""

    returncode: int
    killed: bool  # the test sent the SIGKILL (a fault-injected self-kill leaves this False)
    elapsed: float
    output: str


def _send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj)
    sock.sendall(struct.pack("!Q", len(data)) + data)


def _recv(sock: socket.socket) -> Any:
    header = _recv_exact(sock, 8)
    if header is None:
        return None
    (size,) = struct.unpack("!Q", header)
    data = _recv_exact(sock, size)
    if data is None:
        raise EOFError("fork server connection closed mid-message")
    return pickle.loads(data)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class Child:
    """A run forked by the server; wait for it or SIGKILL it (with its process group)."""

    def __init__(self, server: ForkServer, pid: int, log: Path) -> None:
        self.server, self.pid, self.log = server, pid, log
        self.started = time.monotonic()
        self._killed = False
        self._result: ChildResult | None = None

    def kill(self) -> None:
        """SIGKILL the child and everything it started (it leads its own process group)."""
        if self._result is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
                self._killed = True
            except ProcessLookupError:
                pass

    def wait(self, timeout: float = 120.0) -> ChildResult:
        """Wait for the child to end; on timeout kill it and raise `TimeoutError` with its output."""
        result = self._poll(timeout)
        if result is None:
            self.kill()
            result = self._poll(None)
            raise TimeoutError(f"forked run {self.pid} still running after {timeout}s; output:\n{result.output}")
        return result

    def kill_after(self, seconds: float, timeout: float = 120.0) -> ChildResult:
        """SIGKILL the child `seconds` after it started, unless it ended before; then wait."""
        result = self._poll(max(0.0, self.started + seconds - time.monotonic()))
        if result is None:
            self.kill()
            result = self.wait(timeout)
        return result

    def _poll(self, timeout: float | None) -> ChildResult | None:
        if self._result is None:
            status = self.server._wait(self.pid, timeout)
            if status is None:
                return None
            output = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
            self._result = ChildResult(
                returncode=os.waitstatus_to_exitcode(status),
                killed=self._killed,
                elapsed=time.monotonic() - self.started,
                output=output,
            )
        return self._result


class ForkServer:
    """A process that has imported `preload` (and run no torch op) and forks a child per run."""

    def __init__(self, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.pop("RLFT_FAULT", None)  # children get faults only through `env`
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._sock = ours
        self._logs = Path(tempfile.mkdtemp(prefix="rlft-forkserver-"))
        self._ids = count()
        _send(ours, {"sys_path": list(sys.path), "preload": list(preload), "cwd": os.getcwd()})
        reply = _recv(ours)
        if not (isinstance(reply, tuple) and reply[0] == "ready"):
            raise RuntimeError(f"fork server failed to start: {reply!r}")

    def start(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        env: Mapping[str, str | None] | None = None,
    ) -> Child:
        """Fork a child that sets `env` (None values unset), then calls ``fn(*args, **kwargs)``.

        The child exits with fn's int return value (0 for None), SystemExit's code, an exception's
        `exit_code` attribute (rlft errors) or 1; its stdout/stderr go to `Child.log`.
        """
        log = self._logs / f"child-{next(self._ids)}.log"
        _send(self._sock, ("run", pickle.dumps((fn, tuple(args), dict(kwargs or {}))), dict(env or {}), str(log)))
        reply = _recv(self._sock)
        return Child(self, reply[1], log)

    def run(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        env: Mapping[str, str | None] | None = None,
        kill_after: float | None = None,
        timeout: float = 120.0,
    ) -> ChildResult:
        """`start` then wait (or SIGKILL after `kill_after` seconds); returns how it ended."""
        child = self.start(fn, args, kwargs, env)
        return child.wait(timeout) if kill_after is None else child.kill_after(kill_after, timeout)

    def _wait(self, pid: int, timeout: float | None) -> int | None:
        _send(self._sock, ("wait", pid, timeout))
        return _recv(self._sock)[1]

    def close(self) -> None:
        """Stop the server (children still running are killed)."""
        if self._proc.poll() is None:
            self._sock.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


_servers: dict[tuple[str, ...], ForkServer] = {}


def get_server(preload: Sequence[str] = DEFAULT_PRELOAD) -> ForkServer:
    """The session's server for this preload list (started on first use, stopped at exit)."""
    key = tuple(preload)
    if key not in _servers:
        _servers[key] = ForkServer(key)
        atexit.register(_servers[key].close)
    return _servers[key]


# ---- server side ---------------------------------------------------------------------------


def _serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    config = _recv(sock)
    sys.path[:] = config["sys_path"]
    os.chdir(config["cwd"])
    for name in config["preload"]:
        importlib.import_module(name)
    _send(sock, ("ready", os.getpid()))
    children: set[int] = set()
    while (msg := _recv(sock)) is not None:
        if msg[0] == "run":
            pid = os.fork()
            if pid == 0:
                sock.close()
                _child_main(*msg[1:])
            try:
                os.setpgid(pid, pid)  # also done by the child: whichever runs first, kill() finds the group
            except OSError:
                pass  # the child already did it, or already exited
            children.add(pid)
            _send(sock, ("pid", pid))
        elif msg[0] == "wait":
            status = _waitpid(msg[1], msg[2])
            if status is not None:
                children.discard(msg[1])
            _send(sock, ("status", status))
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


def _waitpid(pid: int, timeout: float | None) -> int | None:
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if deadline is not None and time.monotonic() >= deadline:
            return None
        remaining = 0.05 if deadline is None else deadline - time.monotonic()
        time.sleep(max(0.0, min(pause, remaining)))
        pause = min(pause * 1.5, 0.02)


def _child_main(payload: bytes, env: dict[str, str | None], log: str) -> None:
    code = 1
    try:
        os.setpgid(0, 0)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if "rlft.ckpt.faults" in sys.modules:
            sys.modules["rlft.ckpt.faults"].reset()  # the variable may have changed since the server read it
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        fn, args, kwargs = pickle.loads(payload)
        result = fn(*args, **kwargs)
        code = result if type(result) is int else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException as exc:  # the child must reach os._exit whatever happens
        traceback.print_exc()
        code = getattr(exc, "exit_code", 1) if isinstance(getattr(exc, "exit_code", None), int) else 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code & 0xFF)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(int(sys.argv[2]))
