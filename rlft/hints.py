"""Follow-up commands quoted in messages, spelled for what the user ran.

`rlft run` resumes by being run again and has no `--resume`; `rlft stage` has one. Library code
that suggests a command (a refused resume, a stop on SIGTERM) asks here instead of naming a
flag, and the pipeline says which recipe and stage are running.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Invocation:
    """The running command: its recipe as the user gave it, the stage, and whether only it runs."""

    recipe: str = "RECIPE"
    stage: str = "STAGE"
    single_stage: bool = False


_current: ContextVar[Invocation | None] = ContextVar("rlft_invocation", default=None)


@contextlib.contextmanager
def running(recipe: Path, stage: str, single_stage: bool) -> Iterator[None]:
    """Within the block, hints name `recipe` and `stage` (`single_stage`: `rlft stage`, else `rlft run`)."""
    token = _current.set(Invocation(shlex.quote(str(recipe)), stage, single_stage))
    try:
        yield
    finally:
        _current.reset(token)


def resume_command() -> str:
    """The command that continues the running stage from its newest checkpoint."""
    now = _current.get() or Invocation()
    if now.single_stage:
        return f"rlft stage {now.stage} --recipe {now.recipe} --resume"
    return f"rlft run {now.recipe}"


def restart_command() -> str:
    """The command that discards the running stage's checkpoints and runs it again (only that stage)."""
    now = _current.get() or Invocation()
    return f"rlft stage {now.stage} --recipe {now.recipe} --restart"
