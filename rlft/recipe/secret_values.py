"""Refuse secrets in recipes (RELIABILITY S6): a recipe is copied into every run directory and
manifest, so a token written in it would be written everywhere. Tokens belong in the environment.

Two checks, on every key and string value (file and `--set` alike):
- a key named like a credential (`token`, `api_key`, `password`, ...) with a non-empty string value;
- a key or value containing a token shape (`TOKEN_SHAPES`), or a value that is nothing but 32 or
  more hex digits (a Weights & Biases key is 40 hex). A 40-hex value is allowed where a git commit
  is expected: a model's `revision` (`model.revision`, `stages.<name>.student.revision`).
Messages name the key and what the value looks like, never the value itself.
"""

from __future__ import annotations

import re
from typing import Any

from rlft.errors import Problem
from rlft.recipe.problems import Locator
from rlft.recipe.yaml_tree import Path_, walk

SECRET_KEY = re.compile(
    r"(?i)(?:^|[_-])(?:token|api[_-]?key|secret|password|passwd|access[_-]?key|private[_-]?key|credentials?)(?:$|[_-])"
)
# (what it looks like, pattern). Lengths are the providers' minimums, long enough that words,
# paths and hub names do not match; `(?<![A-Za-z0-9])` so `x_hf_...` is caught and `ghf_...` is not.
TOKEN_SHAPES = (
    ("a Hugging Face token", r"hf_[A-Za-z0-9]{20,}|api_org_[A-Za-z0-9]{20,}"),
    ("an API key (sk-...)", r"sk-[A-Za-z0-9_-]{20,}"),
    ("a GitHub token", r"gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"),
    ("a Slack token", r"xox[abprs]-[A-Za-z0-9-]{10,}"),
    ("an AWS access key id", r"(?:AKIA|ASIA)[0-9A-Z]{16}"),
    ("a Google API key", r"AIza[0-9A-Za-z_-]{30,}"),
    ("a JSON web token", r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    ("a Weights & Biases key", r"local-[0-9a-f]{40}"),
    ("a private key", r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
)
_SHAPES = [(what, re.compile(rf"(?<![A-Za-z0-9])(?:{pattern})")) for what, pattern in TOKEN_SHAPES]
_HEX = re.compile(r"[0-9a-fA-F]{32,}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
ADVICE = "do not put secrets in recipes; set the environment variable instead (HF_TOKEN, WANDB_API_KEY, ...)"


def looks_like(text: str, path: Path_ = ()) -> str | None:
    """What token `text` looks like (e.g. "a Hugging Face token"), or None.

    Args:
        text: a recipe key or string value.
        path: where it is written; a 40-hex `revision` of a model is a git commit, not a key.
    """
    for what, pattern in _SHAPES:
        if pattern.search(text):
            return what
    stripped = text.strip()
    if _HEX.fullmatch(stripped) and not (commit_expected(path) and _COMMIT.fullmatch(stripped)):
        return f"an API key ({len(stripped)} hex digits)"
    return None


def commit_expected(path: Path_) -> bool:
    """True for the keys that name a git commit: `model.revision`, `stages.<name>.student.revision`."""
    return path == ("model", "revision") or (
        len(path) == 4 and path[0] == "stages" and path[2] == "student" and path[3] == "revision"
    )


def secret_problems(raw: dict[str, Any], loc: Locator) -> list[Problem]:
    """One problem per key whose name or value (or which itself) looks like a secret."""
    problems = []
    for path, value in walk(raw):
        key = path[-1] if path else None
        found = looks_like(key) if isinstance(key, str) else None
        if found:  # a token used as a mapping key: show the parent, not the token
            problems.append(loc.at(path[:-1], f"a key in this mapping looks like {found}; {ADVICE}"))
            continue
        if isinstance(key, str) and SECRET_KEY.search(key) and isinstance(value, str) and value.strip():
            problems.append(loc.at(path, ADVICE))
            continue
        found = looks_like(value, path) if isinstance(value, str) else None
        if found:
            problems.append(loc.at(path, f"the value looks like {found}; {ADVICE}"))
    return problems
