"""Optional metric loggers beside metrics.jsonl: Weights & Biases and MLflow (`report_to:`).

The recipe's `report_to` (default `[tensorboard]`) is set once per invocation by the pipeline
(`configure`); every stage's MetricsLog then opens the sinks named there. Each sink gets every
numeric, finite value of every row metrics.jsonl gets, at the same step:

- wandb: one W&B run per stage invocation, named `<run_name>/<stage>`, project `rlft` (or
  WANDB_PROJECT), files under `<run>/wandb/`; WANDB_MODE=offline keeps it on disk (`wandb sync`
  uploads it later). The API key comes from the environment (WANDB_API_KEY), never the recipe.
- mlflow: experiment `<run_name>`, one MLflow run per stage invocation named `<stage>`, tracking
  at MLFLOW_TRACKING_URI or else a file store in `<run>/mlruns/` (MLFLOW_ALLOW_FILE_STORE is set
  for it, as MLflow 3 requires). MLflow metric names may not hold
  `:` (a user reward `file.py:fn`), so `:` becomes `_` there.

Both are optional extras (`pip install 'rlft[wandb]'`, `'rlft[mlflow]'`): naming one that is not
installed fails before any training with what to install.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlft.errors import UserInputError

KNOWN = ("tensorboard", "wandb", "mlflow")
_report_to: tuple[str, ...] = ("tensorboard",)


def configure(report_to: Sequence[str]) -> None:
    """Set the loggers of this process's stages; fails at once when an extra is not installed."""
    global _report_to
    import importlib.util

    for name, extra in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if name in report_to and importlib.util.find_spec(name) is None:
            raise UserInputError(f"report_to: {name} is not installed; pip install 'rlft[{extra}]' (or drop it from report_to)")
    _report_to = tuple(report_to)


def wants(name: str) -> bool:
    return name in _report_to


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class WandbSink:
    def __init__(self, stage_dir: Path):
        import wandb

        run_dir = stage_dir.parent
        (run_dir / "wandb").mkdir(exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlft"), name=f"{run_dir.name}/{stage_dir.name}",
                              group=run_dir.name, dir=str(run_dir), reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, step: int, values: dict[str, Any]) -> None:
        scalars = _scalars(values)
        if scalars:
            self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_name(key: str) -> str:
    """The MLflow metric name of a metrics.jsonl key (characters MLflow refuses become `_`)."""
    return _MLFLOW_BAD.sub("_", key)


class MlflowSink:
    def __init__(self, stage_dir: Path):
        from mlflow.tracking import MlflowClient

        run_dir = stage_dir.parent
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # nothing configured: a file store inside the run (MLflow 3 asks for this opt-in)
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(run_dir.name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(run_dir.name)
        self.run_id = self.client.create_run(exp_id, run_name=stage_dir.name).info.run_id

    def log(self, step: int, values: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(k), v, now, step) for k, v in _scalars(values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_sinks(stage_dir: Path) -> list[Any]:
    """The wandb / mlflow sinks `report_to` names, for one stage's main metrics."""
    sinks: list[Any] = []
    if wants("wandb"):
        sinks.append(WandbSink(stage_dir))
    if wants("mlflow"):
        sinks.append(MlflowSink(stage_dir))
    return sinks
