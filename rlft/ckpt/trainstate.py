"""Full training state for exact resume: RNG streams, optimizer/scheduler state, input pinning, SIGTERM.

RELIABILITY.md R1 (exact resume), R5 (inputs pinned), R3 (0 lost steps on SIGTERM). Everything
here turns live objects into (tensors, JSON) pairs for `rlft.ckpt.checkpoint.save_checkpoint` and back,
bit for bit: tensors go to safetensors, Python scalars to JSON (floats are written with `repr`, so
they round-trip exactly), and tuples / non-string dict keys are tagged so they come back as they were.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import threading
from collections.abc import Iterable, Mapping
from types import FrameType
from typing import Any, NoReturn

import numpy as np
import torch

from rlft import hints
from rlft.errors import CheckpointError, UserInputError

log = logging.getLogger(__name__)

_TENSOR, _TUPLE, _ITEMS = "__rlft_tensor__", "__rlft_tuple__", "__rlft_items__"
_SCALARS = (type(None), bool, int, float, str)
WARN_ONLY_KEYS = frozenset({"num_threads"})


def check_json(obj: Any, where: str) -> Any:
    """Check that `obj` round-trips through JSON exactly; return it.

    Allowed: None, bool, int, float, str, list, dict[str, Any] with str keys (exact types: a tuple, an
    IntEnum or a numpy scalar would come back as something else).

    Raises:
        TypeError: naming the offending key path.
    """
    if type(obj) in _SCALARS:
        return obj
    if type(obj) is list:
        for i, v in enumerate(obj):
            check_json(v, f"{where}[{i}]")
        return obj
    if type(obj) is dict:
        for k, v in obj.items():
            if type(k) is not str:
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; JSON keys must be str")
            check_json(v, f"{where}.{k}")
        return obj
    raise TypeError(f"{where}: a {type(obj).__name__} does not round-trip through JSON; use a list, dict or number")


def state_dict_to_tensors(state_dict: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state dict into tensors (named by key path) and a JSON skeleton.

    Args:
        state_dict: e.g. ``optimizer.state_dict()``; tensors, tuples and int keys allowed.

    Returns:
        (tensors, skeleton); `state_dict_from_tensors` inverts it exactly.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            key = path if path not in tensors else f"{path}#{len(tensors)}"
            tensors[key] = obj
            return {_TENSOR: key}
        if isinstance(obj, (list, tuple)):
            items = [enc(v, f"{path}.{i}") for i, v in enumerate(obj)]
            return {_TUPLE: items} if isinstance(obj, tuple) else items
        if isinstance(obj, dict):
            if all(type(k) is str and not k.startswith("__rlft_") for k in obj):
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in obj.items()}
            return {_ITEMS: [[enc(k, path), enc(v, f"{path}.{k}" if path else str(k))] for k, v in obj.items()]}
        if type(obj) in _SCALARS:
            return obj
        raise TypeError(f"{path or 'state dict'}: a {type(obj).__name__} cannot be checkpointed")

    return tensors, enc(state_dict, "")


def state_dict_from_tensors(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    """Rebuild what `state_dict_to_tensors` split.

    Raises:
        CheckpointError: a tensor the skeleton names is missing.
    """

    def dec(obj: Any) -> Any:
        if isinstance(obj, list):
            return [dec(v) for v in obj]
        if isinstance(obj, dict):
            if _TENSOR in obj:
                if obj[_TENSOR] not in tensors:
                    raise CheckpointError(f"checkpoint state names tensor {obj[_TENSOR]!r}, which is missing")
                return tensors[obj[_TENSOR]]
            if _TUPLE in obj:
                return tuple(dec(v) for v in obj[_TUPLE])
            if _ITEMS in obj:
                return {dec(k): dec(v) for k, v in obj[_ITEMS]}
            return {k: dec(v) for k, v in obj.items()}
        return obj

    return dec(skeleton)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """Split an optimizer's state dict (moments, step counts, param groups) for a checkpoint."""
    return state_dict_to_tensors(optimizer.state_dict())


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], skeleton: Any) -> None:
    """Load what `optimizer_to_tensors` saved into a freshly built optimizer (bitwise).

    Raises:
        CheckpointError: the saved state does not fit the optimizer's parameters.
    """
    try:
        optimizer.load_state_dict(state_dict_from_tensors(tensors, skeleton))
    except (ValueError, KeyError) as err:
        raise CheckpointError(
            f"optimizer state in the checkpoint does not fit the trainable parameters ({err}); "
            "did the LoRA rank or target modules change? Use the same recipe, or start the stage again."
        ) from err


def scheduler_state(scheduler: Any) -> Any:
    """JSON state of an LR scheduler (or GradScaler): anything with `state_dict()`."""
    tensors, skeleton = state_dict_to_tensors(scheduler.state_dict())
    if tensors:
        raise TypeError(f"scheduler state holds tensors {sorted(tensors)}; save it with state_dict_to_tensors")
    return skeleton


def load_scheduler(scheduler: Any, state: Any) -> None:
    """Load what `scheduler_state` saved."""
    scheduler.load_state_dict(state_dict_from_tensors({}, state))


def capture_generators(generators: Mapping[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """State of each named `torch.Generator`, as tensors ``generator.<name>``."""
    return {f"generator.{name}": gen.get_state() for name, gen in generators.items()}


def restore_generators(generators: Mapping[str, torch.Generator], tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore named generators captured by `capture_generators`.

    Raises:
        CheckpointError: a generator has no saved state.
    """
    for name, gen in generators.items():
        key = f"generator.{name}"
        if key not in tensors:
            raise CheckpointError(f"the checkpoint's RNG state has no generator {name!r}; cannot resume exactly")
        gen.set_state(tensors[key])


def capture_rng(
    generators: Mapping[str, torch.Generator] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Capture python `random`, numpy, torch CPU, every CUDA device and the named generators.

    Returns:
        (tensors, json_state) to save as the ``rng`` group and under a state key.
    """
    tensors = {"torch_cpu": torch.get_rng_state()}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors.update({f"cuda_{i}": s for i, s in enumerate(cuda)})
    tensors.update(capture_generators(generators or {}))
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": np.asarray(keys).tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "cuda_devices": len(cuda),
    }
    return tensors, state


def restore_rng(
    tensors: Mapping[str, torch.Tensor],
    json_state: Mapping[str, Any],
    generators: Mapping[str, torch.Generator] | None = None,
) -> None:
    """Restore what `capture_rng` captured, so later draws equal an uninterrupted run's.

    Raises:
        CheckpointError: part of the RNG state is missing.
    """
    missing = [k for k in ("python", "numpy", "cuda_devices") if k not in json_state]
    if missing or "torch_cpu" not in tensors:
        raise CheckpointError(f"the checkpoint's RNG state lacks {missing or ['torch_cpu']}; cannot resume exactly")
    py = json_state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = json_state["numpy"]
    keys = np.asarray(npy["keys"], dtype=np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(tensors["torch_cpu"])
    n = json_state["cuda_devices"]
    if n and torch.cuda.is_available() and torch.cuda.device_count() >= n:
        torch.cuda.set_rng_state_all([tensors[f"cuda_{i}"] for i in range(n)])
    elif n:
        log.warning("RNG state was saved on %d CUDA device(s) and none/fewer are here: CUDA draws will differ", n)
    restore_generators(generators or {}, tensors)


def check_inputs(
    saved_meta: Mapping[str, Any], current_meta: Mapping[str, Any], keys: Iterable[str], force: bool
) -> list[str]:
    """Compare pinned inputs of a checkpoint with the current run (R5).

    Keys may be dotted paths into nested dicts. Keys whose last part is in `WARN_ONLY_KEYS`
    (the thread count: it moves results by ~1e-8, it does not change the run) only log a warning.

    Args:
        saved_meta: the checkpoint's meta.
        current_meta: the same keys for this run.
        keys: which keys must not change.
        force: resume anyway; the caller records the returned lines in the next manifest.

    Returns:
        One ``key: old -> new`` line per changed key (warn-only keys excluded).

    Raises:
        UserInputError: inputs changed and not `force`; every changed key is listed.
    """
    changed, warned = [], []
    for key in keys:
        old, new = _lookup(saved_meta, key), _lookup(current_meta, key)
        if old == new and type(old) is type(new):
            continue
        warn_only = key.rsplit(".", 1)[-1] in WARN_ONLY_KEYS
        (warned if warn_only else changed).append(f"{key}: {_show(old)} -> {_show(new)}")
    for line in warned:
        log.warning("%s since the checkpoint; the last bits of results may differ", line)
    if changed and not force:
        raise UserInputError(
            "resume refused: inputs changed since the checkpoint was saved:\n  " + "\n  ".join(changed)
            + f"\nRestore them, start the stage over (`{hints.restart_command()}`), or run the same command"
            " with --force to resume anyway (the override is recorded in the manifest)."
        )
    for line in changed:
        log.warning("--force: resuming although %s", line)
    return changed


_MISSING = object()


def _lookup(meta: Mapping[str, Any], key: str) -> Any:
    if key in meta:
        return meta[key]
    node: Any = meta
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _show(value: Any) -> str:
    if value is _MISSING:
        return "<missing>"
    text = json.dumps(value, sort_keys=True, default=repr)
    return text if len(text) <= 200 else text[:197] + "..."


class GracefulExit:
    """SIGTERM/SIGINT set a flag the stage loop polls after each optimizer step, then saves and exits.

    Handlers are installed on construction (main thread only; elsewhere nothing is installed) and
    restored by `close()`, `exit()` or leaving the `with` block. A second signal of the same kind
    stops at once (default action; KeyboardInterrupt for SIGINT).
    """

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def __enter__(self) -> GracefulExit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signum:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = signum

    def should_stop(self) -> bool:
        """True once a stop signal arrived: save a checkpoint now, then call `exit()`."""
        return self.received is not None

    @property
    def reason(self) -> str:
        """Name of the signal received ("" if none)."""
        return signal.Signals(self.received).name if self.received is not None else ""

    def exit(self) -> NoReturn:
        """Restore the handlers and exit with 128 + signal number (the shell's convention)."""
        self.close()
        code = 128 + (self.received or 0)
        log.warning("stopped by %s after saving a checkpoint; resume with `%s`", self.reason or "request",
                    hints.resume_command())
        raise SystemExit(code)
