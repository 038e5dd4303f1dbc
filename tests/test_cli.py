"""The `rlft` command: exit codes, error text without tracebacks, validate/explain output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlft.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "recipes/tiny-sft.yaml")]) == 0
    assert "ok" in capsys.readouterr().out


def test_validate_reports_every_problem_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        'model: {name: "tiny:nano"}\n'
        "stages:\n"
        '  sft: {kind: sft, data: "tiny:reverse", lrr: 1}\n'
        '  rl: {kind: grpo, from: sf, data: "tiny:reverse", rewards: [math_answer], group_size: 1}\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "rlft.cli", "validate", str(bad)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    err = proc.stderr
    assert "Traceback" not in err
    assert f"{bad}:3:" in err and "stages.sft.lrr: unknown key (did you mean 'lr'?)" in err
    assert f"{bad}:4:" in err and "stages.rl.from" in err and "did you mean 'sft'" in err
    assert "stages.rl.group_size: must be >= 2" in err


def test_set_override_is_validated(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(ROOT / "recipes/tiny-sft.yaml"), "--set", "stages.sft.lr=-1"])
    assert code == 2
    assert "stages.sft.lr" in capsys.readouterr().err


def test_explain_shows_defaults_graph_and_batch_arithmetic(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(ROOT / "recipes/tiny-sft.yaml"), "--set", "stages.sft.micro_batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "max_grad_norm: 1.0" in out  # a default filled in
    assert "sft            sft      from=base" in out
    assert "16 sequences = 4 micro-batches x 4" in out


def test_missing_recipe_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_unknown_stage_name_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stage", "sfx", "--recipe", str(ROOT / "recipes/tiny-sft.yaml")]) == 2
    assert "did you mean 'sft'" in capsys.readouterr().err
