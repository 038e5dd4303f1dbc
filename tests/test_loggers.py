"""report_to: wandb (offline mode) and MLflow (file store) runs hold the same scalars, at the same
steps, as metrics.jsonl; each test skips when its extra is not installed."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest
from helpers import metrics, rlft, write_recipe
from test_report_html import DIGITS, tiny_grpo

from rlft import loggers
from rlft.errors import UserInputError

HAVE = {name: importlib.util.find_spec(name) is not None for name in ("wandb", "mlflow")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not any(HAVE.values()):
        pytest.skip("neither wandb nor mlflow is installed (pip install 'rlft[wandb,mlflow]')")
    tmp = tmp_path_factory.mktemp("loggers")
    (tmp / "digits.py").write_text(DIGITS)
    recipe = tiny_grpo(tmp / "runs", steps=3, eval_every=0, rewards=["task_verifier", "digits.py:digit_share"])
    recipe["report_to"] = ["tensorboard"] + [name for name, ok in HAVE.items() if ok]
    proc = rlft("run", str(write_recipe(tmp / "r.yaml", recipe)), env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr
    return tmp / "runs/rep"


def expected_scalars(stage_dir: Path) -> dict[int, dict[str, float]]:
    """step -> every numeric, finite value metrics.jsonl holds for it."""
    out: dict[int, dict[str, float]] = {}
    for row in metrics(stage_dir):
        out[row["step"]] = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, int | float)
                            and not isinstance(v, bool) and math.isfinite(v)}
    return out


def wandb_records(path: Path) -> list[bytes]:
    """Protobuf records of a .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB, each
    record behind a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of a block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            out.append(buf)
    return out


@pytest.mark.skipif(not HAVE["wandb"], reason="wandb is not installed (pip install 'rlft[wandb]')")
def test_wandb_offline_run_has_the_metrics_jsonl_scalars(run_dir: Path) -> None:
    from wandb.proto import wandb_internal_pb2

    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    logged: dict[int, dict[str, float]] = {}
    for raw in wandb_records(files[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            logged[int(items["_step"])] = {k: float(v) for k, v in items.items() if not k.startswith("_")}
    expected = expected_scalars(run_dir / "rl")
    assert sorted(logged) == sorted(expected) == [0, 1, 2, 3]
    for step, values in expected.items():
        assert logged[step] == pytest.approx(values), step
    assert "reward/digits.py:digit_share" in logged[3] and "unparsed/task_verifier" in logged[3]


@pytest.mark.skipif(not HAVE["mlflow"], reason="mlflow is not installed (pip install 'rlft[mlflow]')")
def test_mlflow_file_store_has_the_metrics_jsonl_scalars(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("rep")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "rl" and run.info.status == "FINISHED"
    expected = expected_scalars(run_dir / "rl")
    keys = {k for values in expected.values() for k in values}
    assert set(run.data.metrics) == {loggers.mlflow_name(k) for k in keys}
    assert "reward/digits.py_digit_share" in run.data.metrics  # ':' is not allowed in MLflow names
    for key in keys:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, loggers.mlflow_name(key))}
        assert history == pytest.approx({s: v[key] for s, v in expected.items() if key in v}), key


def test_a_missing_extra_is_named_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserInputError, match=r"report_to: wandb is not installed; pip install 'rlft\[wandb\]'"):
        loggers.configure(["tensorboard", "wandb"])
    loggers.configure(["tensorboard"])
    assert loggers.wants("tensorboard") and not loggers.wants("wandb")
