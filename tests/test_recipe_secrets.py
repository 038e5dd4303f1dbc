"""Secrets in recipe values are refused at the key that holds them (RELIABILITY S6, test 24's
recipe half); values that only resemble a token (a commit sha as a revision, hub names, paths) load.

Token-shaped strings are assembled from pieces so this file does not itself look like it holds one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlft.errors import RecipeError
from rlft.recipe.load import load_recipe

HEX40 = "4c3f0b2a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
HEX64 = HEX40 + "0123456789abcdef01234567"
BASE = "0aB1cD2eF3gH4iJ5kL6mN7oP8qR9sT0uV1w"  # 36 mixed-case characters, like a provider's random part
TOKENS = {
    "hugging-face": "hf" + "_" + BASE[:34],
    "hugging-face-short": "hf" + "_" + BASE[:22],
    "hugging-face-org": "api" + "_org_" + BASE[:34],
    "openai": "sk" + "-" + BASE + "Xy12",
    "openai-project": "sk" + "-proj-" + BASE + "_-" + BASE,
    "anthropic": "sk" + "-ant-api03-" + BASE + BASE,
    "github": "gh" + "p_" + BASE,
    "github-fine-grained": "github" + "_pat_" + BASE + "_" + BASE,
    "slack": "xo" + "xb-1234567890-" + BASE[:24],
    "aws": "AK" + "IA" + "IOSFODNN7EXAMPLE",
    "google": "AI" + "za" + BASE[:35],
    "jwt": "ey" + "JhbGciOiJIUzI1NiJ9.ey" + "JzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQ",
    "wandb": HEX40,
    "wandb-local": "local-" + HEX40,
    "hex32": HEX40[:32],
    "hex64": HEX64,
    "private-key": "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEow",
}
RECIPE = """\
model: {{name: "tiny:nano"}}
run_name: r
stages:
  sft:
    kind: sft
    data:
      source: "tiny:arith"
      system_prompt: {prompt}
    max_steps: 1
  rl:
    kind: grpo
    from: sft
    data: "tiny:arith"
    rewards: [{{name: math_answer, options: {{none_as: zero}}}}]
    sampling: {{stop: [{stop}]}}
"""


def _write(tmp_path: Path, prompt: str = "'Think step by step.'", stop: str = "'</answer>'", extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(prompt=prompt, stop=stop) + extra)
    return path


def _refused(path: Path, overrides: list[str], token: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    text = str(info.value)
    assert token.splitlines()[0] not in text, "the message repeats the secret"
    return text


@pytest.mark.parametrize("shape", list(TOKENS))
def test_token_in_a_value_is_refused_at_its_line(tmp_path: Path, shape: str) -> None:
    token = TOKENS[shape]
    whole = shape in ("wandb", "hex32", "hex64")  # bare hex is refused as a whole value, not inside prose
    prompt = token if whole else f"Use {token} for the hub"
    path = _write(tmp_path, prompt='"' + prompt.replace("\n", "\\n") + '"')
    text = _refused(path, [], token)
    assert f"{path}:8:" in text and "stages.sft.data.system_prompt: the value looks like" in text, text
    assert "do not put secrets in recipes" in text and len(text.splitlines()) == 1, text


@pytest.mark.parametrize("shape", list(TOKENS))
def test_token_in_a_set_override_is_refused(tmp_path: Path, shape: str) -> None:
    token = TOKENS[shape].replace("\n", " ")
    text = _refused(_write(tmp_path), [f"stages.rl.rewards.0.options.header={token}"], token)
    assert "--set  stages.rl.rewards.0.options.header: the value looks like" in text, text


@pytest.mark.parametrize(("where", "value"), [
    ("model.revision", "hf" + "_" + BASE[:34]),
    ("model.revision", HEX64),
    ("model.revision", HEX40.upper()),
    ("run_name", HEX40),
    ("stages.rl.sampling.stop.0", HEX40),
    ("stages.sft.data.columns.prompt", "local-" + HEX40),
])
def test_hex_keys_are_refused_outside_a_model_revision(tmp_path: Path, where: str, value: str) -> None:
    text = _refused(_write(tmp_path), [f"{where}={value}"], value)
    assert f"--set  {where}: the value looks like" in text, text


def test_a_token_used_as_a_mapping_key_is_refused_without_repeating_it(tmp_path: Path) -> None:
    token = TOKENS["hugging-face"]
    path = tmp_path / "recipe.yaml"
    path.write_text(f'model: {{name: "tiny:nano"}}\nstages:\n  sft:\n    kind: sft\n    data:\n'
                    f'      source: "tiny:arith"\n      columns: {{{token}: answer}}\n')
    text = _refused(path, [], token)
    assert f"{path}:7:" in text and "stages.sft.data.columns: a key in this mapping looks like a Hugging Face token" in text


def test_a_credential_key_is_refused(tmp_path: Path) -> None:
    text = _refused(_write(tmp_path), ["stages.rl.rewards.0.options.api_key=abc"], "abc123")
    assert "--set  stages.rl.rewards.0.options.api_key: do not put secrets in recipes" in text


STUDENT = "  d:\n    kind: distill\n    teacher: sft\n    data: 'tiny:arith'\n    student: {name: org/student, revision: %s}\n"
LEGIT = [
    ("model-revision-commit", ["model.name=Qwen/Qwen2.5-0.5B-Instruct", f"model.revision={HEX40}"]),
    ("revision-branch", ["model.name=Qwen/Qwen2.5-0.5B-Instruct", "model.revision=main"]),
    ("remote-code-pinned", ["model.name=org/m", f"model.revision={HEX40}", "model.trust_remote_code=true"]),
    ("snapshot-dir", [f"model.name=/cache/hub/models--Qwen--Qwen2.5-0.5B/snapshots/{HEX40}"]),
    ("hub-data-names", ["stages.rl.data=HuggingFaceH4/ultrachat_200k"]),
    ("hf-prefixed-names", ["stages.rl.data=org/hf_math_problems_v2", "run_name=hf_run"]),
    ("sk-words", ["stages.rl.sampling.stop.0=task-sk-1", "run_name=sk-learn"]),
    ("short-hex", ["run_name=deadbeef", "stages.rl.sampling.stop.0=abc123def"]),
    ("token-count-column", ["stages.sft.data.columns.num_tokens=answer", "stages.sft.data.columns.tokenizer=task"]),
    ("long-prose", ["stages.sft.data.system_prompt=Think it through; answer in <answer></answer> tags."]),
]


@pytest.mark.parametrize("overrides", [c[1] for c in LEGIT], ids=[c[0] for c in LEGIT])
def test_values_that_only_resemble_tokens_load(tmp_path: Path, overrides: list[str]) -> None:
    loaded = load_recipe(_write(tmp_path), overrides)
    assert loaded.recipe.stages["sft"].kind == "sft"


def test_a_student_revision_may_be_a_commit(tmp_path: Path) -> None:
    loaded = load_recipe(_write(tmp_path, extra=STUDENT % HEX40))
    assert loaded.recipe.stages["d"].student.revision == HEX40
    text = _refused(_write(tmp_path, extra=STUDENT % HEX64), [], HEX64)
    assert "stages.d.student.revision: the value looks like an API key (64 hex digits)" in text


def test_validate_through_the_console_script_exits_2_without_the_token(tmp_path: Path) -> None:
    token = TOKENS["hugging-face"]
    rlft = Path(sys.executable).parent / "rlft"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(rlft), "validate", str(_write(tmp_path)), "--set", f"model.revision={token}"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "--set  model.revision: the value looks like a Hugging Face token" in proc.stderr
    assert token not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
