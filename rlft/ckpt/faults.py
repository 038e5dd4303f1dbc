"""Deterministic fault injection for crash-safety tests (RELIABILITY.md, design item 5).

`RLFT_FAULT` holds one or more comma-separated faults, each ``[action:]phase:step[:nth]``:

- ``phase`` names a point in the code (``after_file``, ``mid_file``, ``before_manifest``,
  ``after_manifest``, ``before_rename``, ``after_rename``, ``before_latest``, ``after_latest``,
  ``during_retention`` in the checkpoint writer; stages add their own such as ``nan_loss``,
  ``kill_step`` or ``sample_shard``, after the sample stage commits that shard).
- ``step`` is the step the point is reached at (for the checkpoint writer: the step being saved).
- ``nth`` (default 1) fires on the nth time the point is reached at that step in this process,
  e.g. ``after_file:2:3`` kills after the third file of step 2.
- ``action`` is ``kill`` (default: SIGKILL to this process, as a power cut or OOM killer would)
  or an errno name such as ``enospc``, ``eio`` or ``efbig``: the point raises that ``OSError``
  instead, which is how tests inject disk-full and IO errors without filling a disk.

Code marks a kill point with ``fault_point(phase, step)``; a point that should misbehave rather
than die (``nan_loss``) asks ``fault_active(phase, step)``. The variable is read once, at the
first call, so an unset variable costs one check per point. Tests that change it in-process call
`reset()` afterwards (the fork server's children do so after applying their env).
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from typing import NoReturn

from rlft.errors import UserInputError

ENV_VAR = "RLFT_FAULT"


@dataclass(frozen=True)
class Fault:
    """One armed fault: what to do at which phase and step."""

    phase: str
    step: int
    nth: int = 1
    errno: int | None = None  # None: SIGKILL

    def fire(self, path: str | os.PathLike[str] | None = None) -> None:
        """Kill this process, or raise the configured `OSError` naming `path`."""
        if self.errno is None:
            kill_now()
        code = self.errno
        raise OSError(code, f"{os.strerror(code)} (injected by {ENV_VAR})", None if path is None else str(path))


_faults: tuple[Fault, ...] | None = None
_hits: dict[tuple[str, int], int] = {}


def parse(spec: str) -> tuple[Fault, ...]:
    """Parse an `RLFT_FAULT` value.

    Args:
        spec: comma-separated ``[action:]phase:step[:nth]`` items; empty means no fault.

    Returns:
        The faults, in the order given.

    Raises:
        UserInputError: an item does not follow the format.
    """
    faults = []
    for item in (s.strip() for s in spec.split(",")):
        if item:
            faults.append(_parse_one(item))
    return tuple(faults)


def _parse_one(item: str) -> Fault:
    parts = item.split(":")
    code: int | None = None
    if parts and parts[0].lower() == "kill":
        parts = parts[1:]
    elif parts and parts[0].upper().startswith("E") and isinstance(getattr(errno, parts[0].upper(), None), int):
        code = getattr(errno, parts[0].upper())
        parts = parts[1:]
    if len(parts) not in (2, 3) or not parts[0] or not all(p.isdigit() for p in parts[1:]):
        raise UserInputError(
            f"{ENV_VAR}={item!r}: expected '[kill|<errno name>:]phase:step[:nth]', "
            "e.g. 'after_file:3', 'mid_file:2:1' or 'enospc:before_manifest:1'"
        )
    nth = int(parts[2]) if len(parts) == 3 else 1
    if nth < 1:
        raise UserInputError(f"{ENV_VAR}={item!r}: nth must be >= 1, got {nth}")
    return Fault(phase=parts[0], step=int(parts[1]), nth=nth, errno=code)


def _armed() -> tuple[Fault, ...]:
    global _faults
    if _faults is None:
        _faults = parse(os.environ.get(ENV_VAR, ""))
    return _faults


def reset() -> None:
    """Forget the parsed variable and the hit counts; the next call reads `RLFT_FAULT` again."""
    global _faults
    _faults = None
    _hits.clear()


def match(phase: str, step: int) -> Fault | None:
    """Count one arrival at (phase, step) and return the fault armed for it, if any.

    Use this directly for faults that are not kills (e.g. ``nan_loss``) or that need work before
    firing (``mid_file`` writes half a file first).

    Args:
        phase: the point in the code.
        step: the step it is reached at.

    Returns:
        The matching fault, or None.
    """
    faults = _armed()
    if not faults:
        return None
    key = (phase, step)
    _hits[key] = _hits.get(key, 0) + 1
    for fault in faults:
        if fault.phase == phase and fault.step == step and fault.nth == _hits[key]:
            return fault
    return None


def fault_active(phase: str, step: int) -> bool:
    """True when a fault is armed for this arrival at (phase, step), e.g. ``nan_loss`` in a stage."""
    return match(phase, step) is not None


def fault_point(phase: str, step: int, path: str | os.PathLike[str] | None = None) -> None:
    """Fire the fault armed for (phase, step): SIGKILL, or raise the injected `OSError`.

    Args:
        phase: the point in the code.
        step: the step it is reached at.
        path: the file or directory an injected `OSError` names.
    """
    fault = match(phase, step)
    if fault is not None:
        fault.fire(path)


def kill_now() -> NoReturn:
    """SIGKILL this process: no handlers, no flushing, no atexit (a crash, not an exit)."""
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)  # not reached: a signal sent to oneself is delivered before kill() returns
