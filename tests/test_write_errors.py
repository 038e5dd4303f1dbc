"""A full disk outside the checkpoint writer: building the tiny base model and saving a stage's
final model end in one line and exit 3, leave nothing half-written, and the same command run
again after space is freed gives the weights of an uninterrupted run.

The disk is "full" by RLIMIT_FSIZE in the child (SIGXFSZ ignored, so a write past the limit
fails with EFBIG, as ENOSPC would): the tiny model's 366 kB weights exceed 150 kB while
checkpoints of a rank-4 adapter stay below it.
"""

from __future__ import annotations

import errno
import resource
import signal
from pathlib import Path

import pytest
from helpers import final_hashes, sft_recipe, write_recipe
from test_cli import assert_one_line_error, rlft

from rlft.ckpt.fsio import storage_errno, writing
from rlft.errors import WriteError

LIMIT = 150_000


def _small_disk() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _recipe(tmp_path: Path, name: str, model: str = "tiny:nano") -> Path:
    recipe = sft_recipe(tmp_path / name, max_steps=3, save_every=2)
    recipe["model"]["name"] = model
    recipe["lora"] = {"r": 4, "alpha": 8, "targets": "all-linear"}
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """A tiny base built outside any run (what tiny:nano builds) and an uninterrupted run's weights."""
    from rlft.tiny import build_tiny_model

    tmp = tmp_path_factory.mktemp("reference")
    base = str(build_tiny_model(tmp / "base", preset="nano", seed=0))
    proc = rlft("run", str(_recipe(tmp, "reference", base)), cwd=tmp, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return base, final_hashes(tmp / "reference" / "t" / "sft")


def test_disk_full_while_building_the_base_model(tmp_path: Path, reference: tuple[str, dict[str, str]]) -> None:
    recipe = _recipe(tmp_path, "full")
    line = assert_one_line_error(rlft("run", str(recipe), cwd=tmp_path, preexec_fn=_small_disk), code=3)
    assert "the base model tiny:nano not saved" in line and "EFBIG" in line, line
    models = tmp_path / "full" / "t" / "models"
    assert [p.name for p in models.iterdir()] == [], "a half-built model directory was left behind"
    proc = rlft("run", str(recipe), cwd=tmp_path, timeout=600)  # space freed: the same command
    assert proc.returncode == 0, proc.stderr
    assert final_hashes(tmp_path / "full" / "t" / "sft") == reference[1]


def test_disk_full_while_saving_the_final_model_then_resume_is_exact(
    tmp_path: Path, reference: tuple[str, dict[str, str]]
) -> None:
    recipe = _recipe(tmp_path, "full", model=reference[0])  # no model build inside the run
    line = assert_one_line_error(rlft("run", str(recipe), cwd=tmp_path, preexec_fn=_small_disk), code=3)
    assert "stage sft's final model not saved" in line and "EFBIG" in line, line
    stage = tmp_path / "full" / "t" / "sft"
    assert not (stage / "final").exists() and not list(stage.glob(".final-*"))
    assert (stage / "step-00000003").is_dir()  # the training itself was committed
    proc = rlft("run", str(recipe), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert final_hashes(stage) == reference[1]


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
        (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), None),
        (OSError(errno.ENOENT, "No such file or directory"), None),
    ],
)
def test_storage_errors_are_recognised(err: Exception, code: int | None) -> None:
    assert storage_errno(err) == code


def test_safetensors_disk_full_becomes_a_write_error(tmp_path: Path) -> None:
    from safetensors import SafetensorError

    with pytest.raises(WriteError) as caught, writing("the thing", tmp_path / "x"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert caught.value.exit_code == 3
    assert str(caught.value).startswith(f"the thing not saved: {tmp_path / 'x'}: [Errno 28 ENOSPC] No space left")
    with pytest.raises(FileNotFoundError), writing("the thing", tmp_path / "x"):
        raise FileNotFoundError(errno.ENOENT, "gone")  # not a storage error: unchanged
