"""The `rlft` command: exit codes, error text without tracebacks, validate/explain output."""

from __future__ import annotations

import os
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


# --------------------------------------------------------------------------- the installed console script

RLFT = str(Path(sys.executable).with_name("rlft"))


def rlft(*args: str, cwd: Path, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """`rlft ARGS` as a user types it: the installed console script in a subprocess."""
    return subprocess.run([RLFT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """Exit `code`, no traceback, and one `error:` line; returns that line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out and "most recent call last" not in out, out
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["stage", "grpo", "--resume"], "no --recipe given and no run under runs/"),
        (["run"], "rlft run: Missing argument"),
        (["run", "--sett", "x", "r.yaml"], "No such option: --sett (did you mean"),
        (["stage"], "rlft stage: Missing argument"),
        (["run", "r.yaml", "--set"], "'--set' requires an argument"),
        (["valdate", "r.yaml"], "No such command 'valdate'"),
        (["stage", "sft", "--resume", "--recipe"], "'--recipe' requires an argument"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    line = assert_one_line_error(rlft(*args, cwd=tmp_path))
    assert expected in line, line


def test_bare_rlft_prints_the_help(tmp_path: Path) -> None:
    proc = rlft(cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Usage: rlft" in proc.stdout + proc.stderr


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # an unbounded read fails fast instead of swapping


def test_recipe_that_is_not_a_regular_file(tmp_path: Path) -> None:
    """/dev/zero, a FIFO without a writer and a directory are refused before any byte is read."""
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    assert "/dev/zero  not a regular file" in assert_one_line_error(
        rlft("validate", "/dev/zero", cwd=tmp_path, preexec_fn=_limit_memory)
    )
    assert f"{fifo}  not a regular file" in assert_one_line_error(rlft("validate", str(fifo), cwd=tmp_path, timeout=30))
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny-r1.yaml").write_text((ROOT / "recipes/tiny-r1.yaml").read_text())
    line = assert_one_line_error(rlft("run", "recipes", cwd=tmp_path))
    assert "recipes  a directory, not a recipe file; recipes there: tiny-r1.yaml" in line


def test_recipe_size_is_checked_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(4_000_000_000)  # sparse: 4 GB that take no disk, more than the child may allocate
    assert "recipe is 4000.0 MB; recipes are limited to 1 MB" in assert_one_line_error(
        rlft("validate", str(big), cwd=tmp_path, preexec_fn=_limit_memory)
    )


def test_missing_recipe_suggests_a_sibling(tmp_path: Path) -> None:
    (tmp_path / "tiny-r1.yaml").write_text("x: 1\n")
    line = assert_one_line_error(rlft("run", "tiny-r.yaml", cwd=tmp_path))
    assert "tiny-r.yaml  recipe file not found (did you mean 'tiny-r1.yaml'?)" in line


def test_stage_kind_names_the_one_stage_of_that_kind(tmp_path: Path) -> None:
    """`rlft stage grpo` is tiny-r1's `rl`: the error names rl's unfinished parent."""
    recipe = str(ROOT / "recipes/tiny-r1.yaml")
    line = assert_one_line_error(rlft("stage", "grpo", "--recipe", recipe, "--set", f"output_dir={tmp_path}", cwd=tmp_path))
    assert "stage rl needs cold_start to have finished first" in line
    assert f"rlft stage cold_start --recipe {recipe}" in line
    line = assert_one_line_error(rlft("stage", "sft", "--recipe", recipe, cwd=tmp_path))
    assert "3 stages are sft stages (cold_start, retrain, student_baseline); name one" in line
    line = assert_one_line_error(rlft("stage", "rll", "--recipe", recipe, cwd=tmp_path))
    assert "no stage named 'rll' (did you mean 'rl'?)" in line


def test_stage_without_recipe_lists_the_runs_to_choose_from(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "recipe.yaml").write_text((ROOT / "recipes/tiny-sft.yaml").read_text())
    line = assert_one_line_error(rlft("stage", "sft", "--resume", cwd=tmp_path))
    assert "no --recipe given and runs/ holds 2 runs (a, b); pass the recipe, e.g. --recipe runs/a/recipe.yaml" in line


def test_refused_resume_suggests_only_flags_the_command_has(tmp_path: Path) -> None:
    """`rlft run` has no --resume: a resume refused for changed inputs names `rlft stage ... --restart`
    and --force, under `rlft run` and `rlft stage` alike."""
    from helpers import sft_recipe, write_recipe

    recipe = str(write_recipe(tmp_path / "r.yaml", sft_recipe(tmp_path, max_steps=3)))
    killed = rlft("run", recipe, cwd=tmp_path, env={**os.environ, "RLFT_FAULT": "kill_step:1"}, timeout=600)
    assert killed.returncode == -9, killed.stderr
    for args in (["run", recipe], ["stage", "sft", "--recipe", recipe, "--resume"]):
        proc = rlft(*args, "--set", "stages.sft.lr=0.5", cwd=tmp_path, timeout=600)
        assert_one_line_error(proc)
        message = " ".join(proc.stderr.split())
        assert "stages.sft.lr: 0.01 -> 0.5" in message
        assert f"start the stage over (`rlft stage sft --recipe {recipe} --restart`)" in message
        assert "with --force to resume anyway" in message and "--resume" not in message


def test_resume_hints_follow_the_running_command() -> None:
    from rlft import hints
    with hints.running(Path("my recipes/r.yaml"), "rl", single_stage=False):
        assert hints.resume_command() == "rlft run 'my recipes/r.yaml'"
        assert hints.restart_command() == "rlft stage rl --recipe 'my recipes/r.yaml' --restart"
    with hints.running(Path("r.yaml"), "rl", single_stage=True):
        assert hints.resume_command() == "rlft stage rl --recipe r.yaml --resume"
