"""Resolve reward entries and run reward functions so failures are loud (RELIABILITY.md R8, S4; tests 19-21).

Failure policy of `RewardSet`:
- A function is called on the whole batch; if that raises, on each sample alone, so exactly
  the failing samples count as errors. One traceback is logged per function per call.
- User functions, and built-ins that may hang (math-verify/sympy), run in a persistent worker
  subprocess each, all concurrently. No answer within `timeout_s` of the step's start = an
  error on every sample of the call; the worker's process group is SIGKILLed and the worker
  restarted (one process per function, always). A worker that dies counts the same way.
- Contract: a list of len(completions) numbers or None. A wrong length, a non-list, a str or
  other non-number raises TrainingError naming the function (and sample) at any call; NaN/inf
  raises at the first call and counts as an error later.
- None follows the option `none_as`: `error` (default, counted), `zero` (0.0) or `skip` (the
  function abstains). All None at the first call raises unless `none_as: skip`.
- Errors and skips are NaN in `per_function` and add nothing to `total`; `failed` marks
  errors. TrainingError when a function fails on every sample of the first call, or when its
  error rate over all samples so far exceeds `max_error_rate` once `min_samples` were scored
  (one failure in a batch of 16 is already 6%). `max_error_rate: 1.0` counts, never aborts.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import numbers
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rlft.errors import TrainingError, UserInputError
from rlft.rewards import sandbox
from rlft.rewards.builtin import IN_WORKER, RESERVED_OPTIONS, REWARDS, WARM_IMPORTS, make_builtin

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger("rlft.rewards")

NoneAs = Literal["error", "zero", "skip"]
Kind = Literal["builtin", "module", "file"]
RUNNER_OPTIONS = ("timeout_s", "none_as")
_ENTRY_KEYS = ("name", "weight", "options")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_BOOT = ("import sys; sys.path[:] = [{root!r}] + [p for p in sys.path if p not in ('', '.')]; "
         "from rlft.rewards.runner import worker_main; worker_main()")


@dataclass(frozen=True)
class FunctionSpec:
    """One resolved reward entry; picklable, so a worker can load the same function."""

    index: int
    name: str  # unique; the metric is reward/<name>
    kind: Kind
    target: str  # built-in name, module name, or resolved file path
    function: str
    options: dict[str, Any]
    weight: float
    timeout_s: float
    none_as: NoneAs
    in_worker: bool


# ---------------------------------------------------------------- entries

def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _parse_name(name: str) -> tuple[Kind, str, str] | str:
    """(kind, target, function) or an error message."""
    if name in REWARDS:
        return "builtin", name, ""
    if ":" not in name:
        return (f"unknown reward '{name}'{_did_you_mean(name, REWARDS)}; built-ins: {', '.join(REWARDS)}; "
                "your own function is written 'package.module:function' or 'path/to/file.py:function'")
    left, fn = name.rsplit(":", 1)
    if not re.fullmatch(_IDENT, fn) or fn.startswith("_"):
        return f"'{fn}' in '{name}' is not a public function name"
    if left.endswith(".py"):
        return "file", left, fn
    if not re.fullmatch(rf"{_IDENT}(\.{_IDENT})*", left):
        return f"'{left}' in '{name}' is neither a module path (pkg.module) nor a .py file"
    top = left.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "rlft":
        return f"'{left}' is not your module; a reward must be a function you wrote (pkg.module:function)"
    return "module", left, fn


def _reward_file(target: str, recipe_dir: Path, extra_dirs: Sequence[Path]) -> Path | str:
    """The resolved reward file, or why it is refused (missing, or outside the allowed dirs)."""
    path = recipe_dir / Path(target).expanduser()  # an absolute path replaces recipe_dir
    real = path.resolve()
    allowed = [recipe_dir.resolve(), *(Path(d).resolve() for d in extra_dirs)]
    if not any(real.is_relative_to(a) for a in allowed):
        return (f"reward file {path} is outside the recipe directory {recipe_dir}; put it next to the "
                "recipe (or in a directory given explicitly)")
    if not real.is_file():
        return f"reward file not found: {path}"
    return real


def _check_options(kind: str, target: str, options: dict[str, Any]) -> str | None:
    timeout = options.get("timeout_s", 1.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        return f"option timeout_s must be a number > 0; got {timeout!r}"
    if options.get("none_as", "error") not in ("error", "zero", "skip"):
        return f"option none_as must be one of error, zero, skip; got {options['none_as']!r}"
    own = {k: v for k, v in options.items() if k not in RUNNER_OPTIONS}
    if kind != "builtin":
        return f"a user reward takes only the options {', '.join(RUNNER_OPTIONS)}; got {', '.join(own)}" if own else None
    params = inspect.signature(REWARDS[target]).parameters
    known = [p for p in params if p not in RESERVED_OPTIONS] + list(RUNNER_OPTIONS)
    for key in own:
        if key in RESERVED_OPTIONS:
            return f"option {key} cannot be set here; set the stage's allow_unsafe_code_exec: true instead"
        if key not in params:
            return f"unknown option '{key}' for {target}{_did_you_mean(key, known)}; options: {', '.join(known)}"
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in own]
    if missing:
        return f"{target} needs option '{missing[0]}'"
    try:
        REWARDS[target](**own)
    except (TypeError, ValueError) as exc:
        return f"{target}: {exc}"
    return None


def validate_reward_entry(entry: Any, recipe_dir: Path | None = None, extra_dirs: Sequence[Path] = ()) -> str | None:
    """Why a recipe reward entry is invalid (with a did-you-mean), or None. Imports no user code.

    Args:
        entry: A name string or a mapping `{name, weight, options}`.
        recipe_dir: When given, a `file.py:function` entry must exist inside it (or `extra_dirs`).
        extra_dirs: Further directories explicitly allowed for reward files.
    """
    if isinstance(entry, str):
        name, weight, options = entry, 1.0, {}
    elif isinstance(entry, dict):
        for key in entry:
            if key not in _ENTRY_KEYS:
                return f"unknown key '{key}'{_did_you_mean(str(key), _ENTRY_KEYS)}; an entry has {', '.join(_ENTRY_KEYS)}"
        name, weight, options = entry.get("name"), entry.get("weight", 1.0), entry.get("options") or {}
        if not isinstance(name, str):
            return "an entry needs 'name': a built-in reward, 'pkg.module:function' or 'file.py:function'"
    else:
        return f"a reward is a name or a mapping {{name, weight, options}}; got {type(entry).__name__}"
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        return f"weight must be a finite number; got {weight!r}"
    if not isinstance(options, dict):
        return f"options must be a mapping; got {type(options).__name__}"
    parsed = _parse_name(name)
    if isinstance(parsed, str):
        return parsed
    kind, target, _ = parsed
    if kind == "file" and recipe_dir is not None:
        found = _reward_file(target, Path(recipe_dir), extra_dirs)
        if isinstance(found, str):
            return found
    return _check_options(kind, target, options)


def resolve_entry(entry: Any, index: int, recipe_dir: Path, extra_dirs: Sequence[Path],
                  default_timeout_s: float, taken: Sequence[str] = ()) -> FunctionSpec:
    """Validate `entry` and describe it as a FunctionSpec (no user code is imported here).

    Raises:
        UserInputError: naming `rewards[index]` and what is wrong.
    """
    problem = validate_reward_entry(entry, recipe_dir, extra_dirs)
    label = entry if isinstance(entry, str) else (entry.get("name") if isinstance(entry, dict) else entry)
    if problem:
        raise UserInputError(f"rewards[{index}] {label!r}: {problem}")
    entry = {"name": entry} if isinstance(entry, str) else entry
    options = dict(entry.get("options") or {})
    parsed = _parse_name(entry["name"])
    assert not isinstance(parsed, str)  # validated above
    kind, target, fn = parsed
    if kind == "file":
        target = str(_reward_file(target, recipe_dir, extra_dirs))
    name, nth = entry["name"], 2
    while name in taken:
        name, nth = f"{entry['name']}#{nth}", nth + 1
    return FunctionSpec(
        index, name, kind, target, fn, {k: v for k, v in options.items() if k not in RUNNER_OPTIONS},
        float(entry.get("weight", 1.0)), float(options.get("timeout_s", default_timeout_s)),
        options.get("none_as", "error"), kind != "builtin" or target in IN_WORKER,
    )


def _without_cwd(path: Sequence[str]) -> list[str]:
    cwd = os.path.realpath(os.getcwd())
    return [p for p in path if p not in ("", ".") and os.path.realpath(p) != cwd]


@contextlib.contextmanager
def _cwd_off_sys_path() -> Iterator[None]:
    """Import with neither '' nor the current directory on sys.path (a json.py there must not shadow)."""
    saved = list(sys.path)
    sys.path[:] = _without_cwd(saved)
    try:
        yield
    finally:
        sys.path[:] = saved


def load_function(spec: FunctionSpec) -> Callable[..., Any]:
    """The callable an entry names: a built-in from its factory, or the user's function.

    Raises:
        UserInputError: the module/file cannot be imported, or has no such callable.
    """
    if spec.kind == "builtin":
        return make_builtin(spec.target, spec.options)
    where = spec.target
    try:
        with _cwd_off_sys_path():
            if spec.kind == "module":
                module = importlib.import_module(spec.target)
            else:
                mod_name = "rlft_user_reward_" + hashlib.sha256(spec.target.encode()).hexdigest()[:12]
                file_spec = importlib.util.spec_from_file_location(mod_name, spec.target)
                assert file_spec is not None and file_spec.loader is not None
                module = importlib.util.module_from_spec(file_spec)
                sys.modules[mod_name] = module
                file_spec.loader.exec_module(module)
    except ImportError as exc:
        raise UserInputError(f"rewards[{spec.index}] {where}: cannot import it ({exc}); the current directory "
                             "is not searched: install your package (pip install -e .) or use 'file.py:function' "
                             "next to the recipe") from exc
    except Exception as exc:
        raise UserInputError(f"rewards[{spec.index}] {where}: importing it failed:\n{traceback.format_exc()}") from exc
    fn = getattr(module, spec.function, None)
    if fn is None:
        public = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise UserInputError(f"rewards[{spec.index}] {where} has no function '{spec.function}'"
                             f"{_did_you_mean(spec.function, public)}")
    if not callable(fn):
        raise UserInputError(f"rewards[{spec.index}] {where}:{spec.function} is a {type(fn).__name__}, not a function")
    return fn


# ---------------------------------------------------------------- calling

def _portable(result: Any) -> list[Any] | dict[str, str]:
    """A JSON-safe copy of a reward function's result; what is not a number is tagged for the check."""
    if not isinstance(result, (list, tuple)) and hasattr(result, "tolist"):
        result = result.tolist()  # tensor or ndarray
    if not isinstance(result, (list, tuple)):
        return {"bad": type(result).__name__}
    out: list[Any] = []
    for v in result:
        if v is None or isinstance(v, float):
            out.append(v)
        elif isinstance(v, (numbers.Real, bool)):
            out.append(float(v))
        elif isinstance(v, str):
            out.append({"bad": f"str {v[:40]!r}"})
        else:
            out.append({"bad": type(v).__name__})
    return out


def _apply(fn: Callable[..., Any], prompts: list[str], completions: list[str], columns: dict[str, list]) -> dict[str, Any]:
    """Call on the batch; if that raises, once per sample to find exactly which samples fail."""
    try:
        return {"values": _portable(fn(prompts, completions, **columns))}
    except Exception:
        batch_tb = traceback.format_exc()
    each: list[dict[str, Any]] = []
    for i in range(len(completions)):
        try:
            each.append({"values": _portable(fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()}))})
        except Exception:
            each.append({"error": traceback.format_exc()})
    return {"each": each, "error": batch_tb}


def _watch_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)  # the trainer died: do not outlive it

    threading.Thread(target=watch, daemon=True).start()


def worker_main() -> None:
    """Entry of a reward worker: load one function, then answer calls over stdin/stdout."""
    _watch_parent(int(sys.argv[1]))
    inp, out = Connection(os.dup(0), writable=False), Connection(os.dup(1), readable=False)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)  # the function's prints go to stderr, never into the protocol
    spec, parent_path = pickle.loads(inp.recv_bytes())
    sys.path[:] = [sys.path[0], *_without_cwd(parent_path)]  # [0] is rlft's root, set by _BOOT
    try:
        fn = load_function(spec)
        if spec.kind == "builtin":
            for module in WARM_IMPORTS.get(spec.target, ()):
                importlib.import_module(module)  # pay the import before the first timed call
    except Exception as exc:
        out.send_bytes(json.dumps({"init_error": str(exc)}).encode())
        return
    out.send_bytes(b'{"ready": true}')
    while True:
        try:
            prompts, completions, columns = pickle.loads(inp.recv_bytes())
        except EOFError:
            return
        out.send_bytes(json.dumps(_apply(fn, prompts, completions, columns)).encode())


class _Worker:
    """One persistent subprocess calling one reward function; SIGKILLed and restarted on a hang."""

    def __init__(self, spec: FunctionSpec):
        self.spec, self.restarts = spec, 0
        self._start()

    def _start(self) -> None:
        boot = _BOOT.format(root=str(Path(__file__).resolve().parents[1]))
        self.proc = subprocess.Popen([sys.executable, "-c", boot, str(os.getpid())], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._send = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self._recv = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self._send.send_bytes(pickle.dumps((self.spec, _without_cwd(sys.path))))

    def _read(self, deadline: float, ready: bool = False) -> dict[str, Any]:
        """The next reply (the `ready` handshake only when asked), or {timeout} / {crash: code}."""
        while True:
            if not self._recv.poll(max(0.0, deadline - time.monotonic())):  # poll(0): a reply already sent counts
                return {"timeout": True}
            try:
                msg = json.loads(self._recv.recv_bytes())
            except (EOFError, OSError):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(1.0)
                return {"crash": self.proc.returncode}
            if ready or "ready" not in msg:
                return msg

    def wait_ready(self, timeout_s: float) -> str | None:
        """None once the function is loaded; else why it is not."""
        msg = self._read(time.monotonic() + timeout_s, ready=True)
        return None if "ready" in msg else msg.get("init_error") or f"the reward worker did not start ({msg})"

    def send(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> None:
        data = pickle.dumps((prompts, completions, columns))
        try:
            self._send.send_bytes(data)
        except OSError:  # it died since the last call
            self.restart()
            self._send.send_bytes(data)

    def result(self, deadline: float) -> dict[str, Any]:
        msg = self._read(deadline)
        if "timeout" in msg or "crash" in msg or "init_error" in msg:
            self.restart()
        return msg

    def restart(self) -> None:
        self.close()
        self.restarts += 1
        self._start()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the function's own children too
        self.proc.wait()
        self._send.close()
        self._recv.close()


@dataclass(frozen=True)
class RewardResult:
    """Rewards of one batch of N completions."""

    total: Tensor  # (N,) float32: sum of weight * value over functions; errors/skips add nothing
    per_function: dict[str, Tensor]  # name -> (N,) float32, NaN where the function erred or skipped
    errors: dict[str, int]  # name -> samples that erred in this call
    error_rate: float  # sum(errors) / (N * number of functions)
    failed: Tensor  # (N,) bool: some function erred on the sample


class RewardSet:
    """Weighted reward functions with the failure policy of this module's docstring."""

    def __init__(self, specs: Sequence[FunctionSpec], *, max_error_rate: float = 0.05, min_samples: int = 64,
                 unsafe_code_exec: bool = False, startup_timeout_s: float = 120.0):
        self.specs = list(specs)
        self.names = [s.name for s in self.specs]
        self.weights = [s.weight for s in self.specs]
        self.max_error_rate, self.min_samples = max_error_rate, min_samples
        self.unsafe_code_exec = unsafe_code_exec  # the caller records this in the run manifest
        self.calls = 0
        self.seen = dict.fromkeys(self.names, 0)
        self.failures = dict.fromkeys(self.names, 0)
        self._local = {s.name: load_function(s) for s in self.specs if not s.in_worker}
        self.workers = {s.name: _Worker(s) for s in self.specs if s.in_worker}
        self._finalizer = weakref.finalize(self, _close_workers, list(self.workers.values()))
        for spec in self.specs:
            if spec.in_worker and (problem := self.workers[spec.name].wait_ready(startup_timeout_s)):
                self.close()
                raise UserInputError(problem if problem.startswith("rewards[") else f"rewards[{spec.index}] {spec.name}: {problem}")

    def close(self) -> None:
        """Stop the workers (also done at garbage collection and interpreter exit)."""
        self._finalizer()

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 columns: dict[str, Sequence[Any]] | None = None) -> RewardResult:
        """Score N completions; see the module docstring for errors, timeouts and aborts.

        Raises:
            TrainingError: a contract violation, all samples failing at the first call, or the
                error rate over `max_error_rate`; names the function (and the sample).
        """
        import torch

        n, prompts, completions = len(completions), list(prompts), list(completions)
        cols = {k: list(v) for k, v in (columns or {}).items()}
        bad = [k for k, v in cols.items() if len(v) != n] + (["prompts"] if len(prompts) != n else [])
        if bad:
            raise ValueError(f"rewards: {', '.join(bad)} must have {n} entries (one per completion)")
        start = time.monotonic()
        for w in self.workers.values():
            w.send(prompts, completions, cols)
        replies = {name: _apply(fn, prompts, completions, cols) for name, fn in self._local.items()}
        replies |= {name: w.result(start + w.spec.timeout_s) for name, w in self.workers.items()}
        first, self.calls = self.calls == 0, self.calls + 1
        per_function, errors, tracebacks = {}, {}, {}
        failed = torch.zeros(n, dtype=torch.bool)
        total = torch.zeros(n, dtype=torch.float32)
        for spec in self.specs:
            values, erred, tb = _settle(spec, replies[spec.name], n, first)
            vec = torch.tensor(values, dtype=torch.float32).reshape(n)
            per_function[spec.name], errors[spec.name], tracebacks[spec.name] = vec, sum(erred), tb
            failed |= torch.tensor(erred, dtype=torch.bool).reshape(n)
            total += spec.weight * torch.nan_to_num(vec, nan=0.0)
        self._account(n, errors, tracebacks, first)
        rate = sum(errors.values()) / max(1, n * len(self.specs))
        return RewardResult(total, per_function, errors, rate, failed)

    def _account(self, n: int, errors: dict[str, int], tracebacks: dict[str, str | None], first: bool) -> None:
        for name, count in errors.items():
            self.seen[name] += n
            self.failures[name] += count
            if not count:
                continue
            log.warning("reward %s failed on %d of %d samples at call %d:\n%s", name, count, n, self.calls,
                        tracebacks[name])
            if first and count == n and n and self.max_error_rate < 1.0:
                raise TrainingError(f"reward '{name}' failed on all {n} samples at the first call; "
                                    f"first error:\n{tracebacks[name]}")
            rate = self.failures[name] / self.seen[name]
            if self.seen[name] >= self.min_samples and rate > self.max_error_rate:
                raise TrainingError(
                    f"reward '{name}' failed on {self.failures[name]} of {self.seen[name]} samples ({rate:.1%}), "
                    f"over max_reward_error_rate {self.max_error_rate:.1%}; last error:\n{tracebacks[name]}")


def _close_workers(workers: list[_Worker]) -> None:
    for w in workers:
        with contextlib.suppress(Exception):
            w.close()


def _settle(spec: FunctionSpec, reply: dict[str, Any], n: int, first: bool) -> tuple[list[float], list[bool], str | None]:
    """Per-sample values (NaN = no value), error flags and one traceback, enforcing the contract."""
    name = spec.name
    if "timeout" in reply or "crash" in reply or "init_error" in reply:
        why = (f"timed out after {spec.timeout_s:g} s; the worker was killed and restarted" if "timeout" in reply
               else reply.get("init_error") or f"the worker process died (exit code {reply['crash']})")
        return [math.nan] * n, [True] * n, why
    if "values" in reply:
        raw, erred, tb = _checked(name, reply["values"], n, 0), [False] * n, None
    else:
        raw, erred, tb = [], [], reply["error"]
        for i, item in enumerate(reply["each"]):
            raw.append(None if "error" in item else _checked(name, item["values"], 1, i)[0])
            erred.append("error" in item)
    values: list[float] = []
    for i, v in enumerate(raw):
        if erred[i]:
            values.append(math.nan)
        elif v is None:
            if first and spec.none_as != "skip" and all(x is None for x in raw):
                raise TrainingError(f"reward '{name}' returned None for every sample (0 to {n - 1}) at the first "
                                    "call; return floats, or set the option none_as: skip or zero")
            erred[i] = spec.none_as == "error"
            tb = tb or (f"returned None at sample {i} (none_as: error)" if erred[i] else tb)
            values.append(0.0 if spec.none_as == "zero" else math.nan)
        elif not math.isfinite(v):
            if first:
                raise TrainingError(f"reward '{name}' returned {v} at sample {i} at the first call; rewards must be finite")
            erred[i], tb = True, tb or f"returned {v} at sample {i}"
            values.append(math.nan)
        else:
            values.append(v)
    return values, erred, tb


def _checked(name: str, raw: Any, n: int, offset: int) -> list[Any]:
    if isinstance(raw, dict):
        raise TrainingError(f"reward '{name}' returned a {raw['bad']}; it must return a list of {n} floats (or None)")
    if len(raw) != n:
        raise TrainingError(f"reward '{name}' returned {len(raw)} values for {n} completions"
                            + (f" (sample {offset})" if n == 1 else ""))
    for i, v in enumerate(raw):
        if isinstance(v, dict):
            raise TrainingError(f"reward '{name}' returned a {v['bad']} at sample {offset + i}; "
                                "rewards must be floats (or None)")
    return list(raw)


def build_rewards(entries: Sequence[str | dict[str, Any]], recipe_dir: Path,
                  allow_code_exec_unsafe: bool = False, *, timeout_s: float = 10.0, max_error_rate: float = 0.05,
                  min_samples: int = 64, extra_dirs: Sequence[Path] = ()) -> RewardSet:
    """Resolve recipe reward entries into a guarded `RewardSet`.

    Args:
        entries: Built-in names, `pkg.module:function`, `path/to/file.py:function`, or mappings
            `{name, weight=1.0, options={}}`; options `timeout_s` and `none_as` apply to any entry.
        recipe_dir: Directory that relative reward files are resolved against (and must stay in).
        allow_code_exec_unsafe: The recipe's opt-in to run `code_exec` without namespace isolation.
        timeout_s: Default per-call timeout of functions run in a worker.
        max_error_rate: Abort threshold on a function's error rate (see RewardSet).
        min_samples: Samples scored before the error-rate threshold applies.
        extra_dirs: Further directories reward files may live in (explicitly given by the user).

    Raises:
        UserInputError: a bad entry, a user function that cannot be loaded, or `code_exec`
            without isolation and without the opt-in.
    """
    extra = tuple(Path(d) for d in extra_dirs)
    specs: list[FunctionSpec] = []
    for i, entry in enumerate(entries):
        specs.append(resolve_entry(entry, i, Path(recipe_dir), extra, timeout_s, [s.name for s in specs]))
    unsafe = False
    for j, spec in enumerate(specs):
        if spec.kind == "builtin" and spec.target == "code_exec":
            if not sandbox.isolation_available():
                if not allow_code_exec_unsafe:
                    problem = sandbox.isolation_problem() or "namespace isolation is unavailable"
                    raise sandbox.SandboxUnavailableError(
                        f"rewards[{spec.index}] code_exec: " + sandbox.UNAVAILABLE_HELP.format(reason=problem))
                unsafe = True
            specs[j] = replace(spec, options={**spec.options, "allow_unsafe": bool(allow_code_exec_unsafe)})
    return RewardSet(specs, max_error_rate=max_error_rate, min_samples=min_samples, unsafe_code_exec=unsafe)
