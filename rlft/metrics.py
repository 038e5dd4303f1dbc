"""Metrics sinks (metrics.jsonl, TensorBoard, and the wandb/MLflow loggers of `report_to`) and progress.

A resumed stage truncates `metrics.jsonl` back to the checkpoint's step before appending,
so the file of a resumed run equals the file of an uninterrupted one. NaN/Inf values are
written as the strings "nan"/"inf" (never as a number) so a skipped step is visible.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from rlft import dist, loggers

console = Console(stderr=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class MetricsLog:
    """Append-only per-step metrics of one stage: `metrics.jsonl` plus TensorBoard events.

    With `every` = N only steps that are multiples of N are written (the recipe's `log_every`),
    plus any step the caller forces (the last one, held-out evaluations). Which steps are written
    depends on the step alone, so a resumed run writes the rows the uninterrupted one does.
    On several processes only rank 0 writes; the other ranks keep `history` in memory.
    """

    def __init__(self, stage_dir: Path, resume_step: int = 0, tensorboard: bool = True, name: str = "metrics.jsonl",
                 every: int = 1):
        self.path, self.every = stage_dir / name, every
        self.history: list[dict[str, Any]] = []
        self._file, self._tb = None, None
        self._sinks: list[Any] = []
        if not dist.is_main():
            if self.path.exists() and resume_step > 0:
                self.history = [r for r in _read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and resume_step > 0:
            # rows up to the checkpoint's step were written before it was committed; a fresh
            # start (no checkpoint) keeps nothing, not even a step-0 eval of a killed attempt
            self.history = [r for r in _read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        _rewrite_jsonl(self.path, self.history)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._sinks = loggers.open_sinks(stage_dir) if tensorboard else []  # report_to: wandb, mlflow
        if tensorboard and loggers.wants("tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                self._tb = None

    def log(self, step: int, values: dict[str, Any], force: bool = False) -> None:
        """Record the metrics of step `step` (1-based) if it is a multiple of `every`, or `force`."""
        if step % self.every and not force:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self.history.append(row)
        if self._file is None:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        for sink in self._sinks:
            sink.log(step, values)

    def close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        for sink in self._sinks:
            sink.close()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by a kill: everything after it is lost work anyway
    return rows


def _rewrite_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def progress(items: Iterable[int], total: int, description: str, start: int = 0) -> Iterator[int]:
    """Iterate `items` behind a rich progress bar with ETA; not on a terminal (a log file, CI), one
    plain line every RLFT_PROGRESS_EVERY seconds (default 30) and at the end instead; only rank 0 shows it."""
    if not dist.is_main():
        yield from items
        return
    if not console.is_terminal:
        yield from _plain_progress(items, total, description, start)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal or not dist.is_main()) as bar:
        task = bar.add_task(description, total=total, completed=start, info="")
        for item in items:
            yield item
            bar.update(task, advance=1)


def _plain_progress(items: Iterable[int], total: int, description: str, start: int) -> Iterator[int]:
    try:
        every = float(os.environ.get("RLFT_PROGRESS_EVERY", "30"))
    except ValueError:
        every = 30.0  # a malformed setting must not stop a run
    t0 = last = time.monotonic()
    done = start
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every or done == total:
            last = now
            rate = (now - t0) / max(1, done - start)
            eta = rate * (total - done)
            console.print(f"{description}: {done}/{total} ({100 * done / max(1, total):.0f}%) "
                          f"elapsed {_hms(now - t0)} eta {_hms(eta)}", soft_wrap=True, highlight=False)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class StepTimer:
    """Wall time of named phases within a step, for the step-time split metrics."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + now - self._t
        self._t = now


def summary_table(title: str, rows: list[tuple[str, str]]) -> None:
    """Print a two-column summary table at the end of a stage."""
    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
