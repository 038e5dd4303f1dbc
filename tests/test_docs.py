"""docs/recipe-reference.md is generated from the schema and must not drift from it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

import rlft.recipe.schema as schema
from rlft.recipe.docgen import render

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "recipe-reference.md"


def test_committed_reference_matches_schema() -> None:
    assert REFERENCE.read_text() == render(), "run `make docs` (python -m rlft.recipe.docgen > docs/recipe-reference.md)"


def test_every_recipe_key_has_a_row() -> None:
    parts = re.split(r"^#{2,3} (\w[\w ]*)\n", render(), flags=re.M)
    sections = dict(zip(parts[1::2], parts[2::2], strict=True))
    documented = [m for m in vars(schema).values() if isinstance(m, type) and issubclass(m, BaseModel)
                  and m.__doc__ and m.__module__ == schema.__name__]
    assert len(documented) >= 15
    for model in documented:
        for name, info in model.model_fields.items():
            assert f"| `{info.alias or name}` |" in sections[model.__name__], f"{model.__name__}.{name} missing"
    assert "| `group_size` | int | `8` | Completions G per prompt; >= 2. |" in sections["GRPOSpec"]
    assert "| `from` | str | `base` |" in sections["SFTSpec"]
    assert "| `r` | int (>= 1, <= 1024) | `16` |" in sections["LoraSpec"]
    assert "| `loss` | [LossSpec](#lossspec) | `{beta: 0.05, kl_in: reward}` |" in sections["PPOSpec"]


def test_module_entry_point_prints_the_reference() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "rlft.recipe.docgen"], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout == render()
