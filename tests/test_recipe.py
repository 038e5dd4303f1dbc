"""Recipe loading: every problem at file:line with the dotted key and a did-you-mean (RELIABILITY 21, 23-25)."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

import rlft.recipe.schema as schema
from rlft.errors import RecipeError
from rlft.recipe.load import load_recipe

REPO = Path(__file__).resolve().parents[1]
M = 'model: {name: "tiny:nano"}\n'  # line 1 of most bad recipes
SFT = "  a: {kind: sft, data: 'tiny:arith'}\n"
GOOD = """\
# tiny R1-style pipeline
model: {name: "tiny:nano", dtype: float32}
lora: {r: 8, alpha: 16, targets: [q_proj, v_proj]}
stages:
  cold_start: {kind: sft, data: "tiny:arith", epochs: 2}
  rl:
    kind: grpo
    from: cold_start
    data: "tiny:arith"
    group_size: 4
    lr: 1e-5
    loss: {eps_low: 0.2, eps_high: 0.28, beta: 0.0, aggregate: token}
    rewards: [math_answer]
  sample: {kind: sample, from: rl, data: "tiny:arith", per_prompt: 4, rewards: [math_answer]}
  retrain: {kind: sft, from: base, data: sample}
"""
BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'x'] * 9)}]\n" for i in range(9))

# (id, recipe text, --set overrides, [(line or None for --set, dotted key, text in the message)])
BAD = [
    ("top-typo", "mdoel: {name: x}\nstages:\n" + SFT, [], [(1, "mdoel", "did you mean 'model'?")]),
    ("stage-typo", M + "stages:\n  rl:\n    kind: grpo\n    data: 'tiny:arith'\n    rewards: [math_answer]\n"
     "    group_sise: 4\n", [], [(7, "stages.rl.group_sise", "did you mean 'group_size'?")]),
    ("lora-typo", M + "lora:\n  alpah: 16\nstages:\n" + SFT, [], [(3, "lora.alpah", "did you mean 'alpha'?")]),
    ("data-typo", M + "stages:\n  a:\n    kind: sft\n    data: [{sorce: x.jsonl}]\n", [],
     [(5, "stages.a.data.0.sorce", "did you mean 'source'?")]),
    ("loss-typo", M + "stages:\n  rl:\n    kind: grpo\n    data: 'tiny:arith'\n    rewards: [math_answer]\n"
     "    loss:\n      eps_hgih: 0.28\n", [], [(8, "stages.rl.loss.eps_hgih", "did you mean 'eps_high'?")]),
    ("from-typo", M + "stages:\n" + SFT + "  b: {kind: sft, form: a, data: 'tiny:arith'}\n", [],
     [(4, "stages.b.form", "did you mean 'from'?")]),
    ("sampling-typo", M + "stages:\n  s:\n    kind: sample\n    data: 'tiny:arith'\n    rewards: [math_answer]\n"
     "    sampling: {temprature: 0.7}\n", [], [(7, "stages.s.sampling.temprature", "did you mean 'temperature'?")]),
    ("model-typo", "model:\n  name: x\n  dtyp: float32\nstages:\n" + SFT, [], [(3, "model.dtyp", "did you mean 'dtype'?")]),
    ("kind-typo-key", M + "stages:\n  a: {knid: sft, data: 'tiny:arith'}\n", [], [(3, "stages.a.knid", "did you mean 'kind'?")]),
    ("bad-kind", M + "stages:\n  a:\n    kind: gpro\n", [], [(4, "stages.a.kind", "did you mean 'grpo'?")]),
    ("str-number", M + "stages:\n  a: {kind: sft, data: 'tiny:arith', lr: abc}\n", [],
     [(3, "stages.a.lr", "expected a number, got 'abc'")]),
    ("float-int", M + "stages:\n  a: {kind: sft, data: 'tiny:arith', batch_size: 2.5}\n", [],
     [(3, "stages.a.batch_size", "expected an integer, got 2.5")]),
    ("targets-type", M + "lora: {targets: q_proj}\nstages:\n" + SFT, [],
     [(2, "lora.targets", "expected a list or 'all-linear', got 'q_proj'")]),
    ("lora-full-typo", M + "lora: fulll\nstages:\n" + SFT, [], [(2, "lora", "did you mean 'full'?")]),
    ("range-r", M + "lora: {r: 0}\nstages:\n" + SFT, [], [(2, "lora.r", "must be >= 1, got 0")]),
    ("range-eps", M + "stages:\n  rl:\n    kind: grpo\n    data: 'tiny:arith'\n    rewards: [math_answer]\n"
     "    loss: {eps_low: 1.5}\n", [], [(7, "stages.rl.loss.eps_low", "must be < 1")]),
    ("enum-no", 'model: {name: "tiny:nano", dtype: no}\nstages:\n' + SFT, [], [(1, "model.dtype", "one of auto, float32")]),
    ("enum-typo", M + "stages:\n  rl:\n    kind: grpo\n    data: 'tiny:arith'\n    rewards: [math_answer]\n"
     "    loss: {aggregate: tokens}\n", [], [(7, "stages.rl.loss.aggregate", "did you mean 'token'?")]),
    ("bool-no", "model:\n  name: x\n  gradient_checkpointing: no\nstages:\n" + SFT, [],
     [(3, "model.gradient_checkpointing", "expected true or false, got 'no'")]),
    ("missing-name", "model: {dtype: float32}\nstages:\n" + SFT, [], [(1, "model", "missing required key 'name'")]),
    ("missing-data", M + "stages:\n  a: {kind: sft}\n", [], [(3, "stages.a", "missing required key 'data'")]),
    ("missing-top", "stages:\n" + SFT, [], [(1, "", "missing required key 'model'")]),
    ("from-unknown", M + "stages:\n  cold_start: {kind: sft, data: 'tiny:arith'}\n"
     "  rl: {kind: sft, from: cold_strat, data: 'tiny:arith'}\n", [],
     [(4, "stages.rl.from", "did you mean 'cold_start'?")]),
    ("from-later", M + "stages:\n  a: {kind: sft, from: b, data: 'tiny:arith'}\n  b: {kind: sft, data: 'tiny:arith'}\n",
     [], [(3, "stages.a.from", "runs after 'a'")]),
    ("from-sample", M + "stages:\n  s: {kind: sample, data: 'tiny:arith', rewards: [math_answer]}\n"
     "  b: {kind: sft, from: s, data: 'tiny:arith'}\n", [], [(4, "stages.b.from", "produces data")]),
    ("data-not-sample", M + "stages:\n" + SFT + "  b: {kind: sft, data: a}\n", [], [(4, "stages.b.data", "kind: sft")]),
    ("data-stage-typo", M + "stages:\n  sample: {kind: sample, data: 'tiny:arith', rewards: [math_answer]}\n"
     "  b: {kind: sft, data: sampel}\n", [], [(4, "stages.b.data", "did you mean stage 'sample'?")]),
    ("teacher-later", M + "stages:\n  d: {kind: distill, teacher: t, student: {name: 'tiny:nano'}, data: 'tiny:arith'}\n"
     "  t: {kind: sft, data: 'tiny:arith'}\n", [], [(3, "stages.d.teacher", "runs after 'd'")]),
    ("eval-models", M + "stages:\n" + SFT + "  e: {kind: eval, data: 'tiny:arith', models: [a, zz]}\n", [],
     [(4, "stages.e.models.1", "unknown stage 'zz'")]),
    ("duplicate", M + "stages:\n" + SFT + "  a: {kind: sft, data: 'tiny:arith'}\n", [], [(4, "stages.a", "duplicate key 'a'")]),
    ("syntax", M + "stages:\n  a: {kind: sft, data: 'tiny:arith'\n  b: 1\n", [], [(4, "", "YAML syntax error")]),
    ("tabs", M + "stages:\n  a:\n\tkind: sft\n", [], [(4, "", "tab character")]),
    ("python-apply", M + "stages:\n  a: {kind: sft, data: !!python/object/apply:os.system ['touch /tmp/x']}\n", [],
     [(3, "stages.a.data", "tag !!python/object/apply:os.system is not allowed")]),
    ("python-name", M + "seed: !!python/name:os.system\nstages:\n" + SFT, [], [(2, "seed", "is not allowed")]),
    ("alias-bomb", BOMB, [], [(5, "l4", "alias bomb")]),
    ("component", M + "stages:\n  a:\n    _component_: torchtune.models.llama\n", [],
     [(4, "stages.a._component_", "recipes are data")]),
    ("target-in-options", M + "stages:\n  s:\n    kind: sample\n    data: 'tiny:arith'\n"
     "    rewards: [{name: math_answer, options: {_target_: os.system}}]\n", [],
     [(6, "stages.s.rewards.0.options._target_", "recipes are data")]),
    ("token-value", "model: {name: x, revision: hf_abcdefghijklmnopqrstuvwxyzABCDEFGH}\nstages:\n" + SFT, [],
     [(1, "model.revision", "do not put secrets in recipes")]),
    ("token-key", M + "api_key: abc123\nstages:\n" + SFT, [], [(2, "api_key", "do not put secrets in recipes")]),
    ("env", M + "env: {LD_PRELOAD: /tmp/x.so}\nstages:\n" + SFT, [], [(2, "env", "environment variables")]),
    ("set-path", M + "stages:\n" + SFT, ["stagse.a.lr=1e-4"], [(None, "stagse", "did you mean 'stages'?")]),
    ("set-type", M + "stages:\n" + SFT, ["stages.a.lr=fast"], [(None, "stages.a.lr", "expected a number")]),
    ("set-into-scalar", M + "stages:\n" + SFT, ["stages.a.data.split=test"], [(None, "stages.a.data.split", "stages.a.data is 'tiny:arith', not a mapping")]),
    ("set-syntax", M + "stages:\n" + SFT, ["stages.a.lr"], [(None, "stages.a.lr", "expected key.path=value")]),
    ("group-size-1", M + "stages:\n  rl:\n    kind: grpo\n    data: 'tiny:arith'\n    rewards: [math_answer]\n"
     "    group_size: 1\n", [], [(7, "stages.rl.group_size", "must be >= 2, got 1")]),
    ("micro-batch", M + "stages:\n  a:\n    kind: sft\n    data: 'tiny:arith'\n    batch_size: 8\n"
     "    micro_batch_size: 3\n", [], [(7, "stages.a.micro_batch_size", "must divide batch_size 8")]),
    ("remote-code", "model:\n  name: org/model\n  trust_remote_code: true\nstages:\n" + SFT, [],
     [(3, "model.trust_remote_code", "40-hex commit")]),
    ("run-name-slash", M + "run_name: a/b\nstages:\n" + SFT, [], [(2, "run_name", "not a safe directory name")]),
    ("run-name-newline", M + 'run_name: "a\\n"\nstages:\n' + SFT, [], [(2, "run_name", "not a safe directory name")]),
    ("stage-name", M + "stages:\n  ../x: {kind: sft, data: 'tiny:arith'}\n  base: {kind: sft, data: 'tiny:arith'}\n",
     [], [(3, "stages.../x", "not a safe directory name"), (4, "stages.base", "reserved")]),
    ("output-dir", M + "output_dir: ../../etc\nstages:\n" + SFT, [], [(2, "output_dir", "must not contain '..'")]),
    ("octal", M + "stages:\n  a: {kind: sft, data: 'tiny:arith', save_every: 0755}\n", [],
     [(3, "stages.a.save_every", "ambiguous number 0755")]),
    ("task-typo", M + "stages:\n  a: {kind: sft, data: 'tiny:arit'}\n", [], [(3, "stages.a.data", "did you mean 'arith'?")]),
    ("data-file", M + "stages:\n  a: {kind: sft, data: trian.jsonl}\n", [], [(3, "stages.a.data", "did you mean 'train.jsonl'?")]),
    ("reward-outside", M + "stages:\n  s: {kind: sample, data: 'tiny:arith', rewards: ['../evil.py:score']}\n", [],
     [(3, "stages.s.rewards.0", "inside the recipe's directory")]),
    ("reward-file-typo", M + "stages:\n  s: {kind: sample, data: 'tiny:arith', rewards: ['reward_fn.py:score']}\n", [],
     [(3, "stages.s.rewards.0", "did you mean 'reward_fns.py'?")]),
    ("reward-typo", M + "stages:\n  s: {kind: sample, data: 'tiny:arith', rewards: [math_anwser]}\n", [],
     [(3, "stages.s.rewards.0", "did you mean 'math_answer'?")]),
    ("reward-stdlib", M + "stages:\n  s: {kind: sample, data: 'tiny:arith', rewards: ['os:system']}\n", [],
     [(3, "stages.s.rewards.0", "os")]),
    ("stage-not-mapping", M + "stages:\n  a: grpo\n", [], [(3, "stages.a", "expected a mapping")]),
    ("empty", "# nothing here\n", [], [(1, "", "the recipe is empty")]),
    ("top-list", "- model\n- stages\n", [], [(1, "", "a recipe is a mapping")]),
    ("two-docs", M + "---\nstages: {}\n", [], [(2, "", "one YAML document")]),
]


@pytest.fixture()
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    (tmp_path / "reward_fns.py").write_text("def score(completions, **kw):\n    return [0.0] * len(completions)\n")
    return tmp_path


def _write(directory: Path, text: str) -> Path:
    path = directory / "recipe.yaml"
    path.write_text(text)
    return path


def _errors(path: Path, overrides: list[str] = ()) -> RecipeError:  # type: ignore[assignment]
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value


@pytest.mark.parametrize(("text", "overrides", "expected"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_recipe_reports_file_line_key(recipe_dir: Path, text: str, overrides: list[str], expected: list) -> None:
    path = _write(recipe_dir, text)
    start = time.perf_counter()
    err = _errors(path, overrides)
    assert time.perf_counter() - start < 1.5
    lines = str(err).splitlines()
    for line, key, fragment in expected:
        where = "--set" if line is None else f"{path}:{line}:"
        prefix = f"{key}: " if key else ""
        hits = [s for s in lines if s.startswith(where) and f"  {prefix}" in s and fragment in s]
        assert hits, f"expected {where} {key!r} {fragment!r} in:\n{err}"
    assert all(p.line is not None or p.file == "--set" for p in err.problems), str(err)


def test_bad_table_is_large() -> None:
    assert len(BAD) >= 30


def test_all_problems_at_once(tmp_path: Path) -> None:
    text = M + "stages:\n  a: {kind: sft, data: 'tiny:arith', lr: -1}\n  b: {kind: grpo, group_sise: 4}\n"
    err = _errors(_write(tmp_path, text), ["stages.a.epochs=many"])
    lines = str(err).splitlines()
    assert len(lines) == 5, str(err)
    assert lines[0] == f"{tmp_path / 'recipe.yaml'}:3:38  stages.a.lr: must be > 0.0, got -1"
    assert lines[1].endswith("stages.b: missing required key 'data'")
    assert lines[2].endswith("stages.b: missing required key 'rewards'")
    assert lines[3].endswith("stages.b.group_sise: unknown key (did you mean 'group_size'?)")
    assert lines[4] == "--set  stages.a.epochs: expected a number, got 'many'"


def test_three_errors_three_lines(tmp_path: Path) -> None:
    text = "mdoel: {name: x}\nstages:\n  a: {kind: sft, data: 'tiny:arith', lr: abc, epohcs: 2}\n"
    lines = str(_errors(_write(tmp_path, text))).splitlines()
    assert [line.split("  ")[1].split(":")[0] for line in lines] == ["mdoel", "stages.a.lr", "stages.a.epohcs"]


def test_good_recipe_loads(tmp_path: Path) -> None:
    loaded = load_recipe(_write(tmp_path, GOOD))
    assert list(loaded.recipe.stages) == ["cold_start", "rl", "sample", "retrain"]
    assert loaded.recipe.stages["rl"].from_ == "cold_start" and loaded.recipe.stages["rl"].group_size == 4
    assert loaded.recipe.stages["retrain"].data[0].source == "sample"
    assert loaded.base_dir == tmp_path and loaded.raw["stages"]["rl"]["loss"]["eps_high"] == 0.28
    assert loaded.positions["stages.rl.group_size"] == (10, 5)
    assert loaded.positions["lora.targets"] == (3, 25)


def test_yaml_12_scalars(tmp_path: Path) -> None:
    text = (
        M + "lora: {alpha: 1E3, dropout: 5e-2}\nstages:\n"
        "  a: {kind: sft, data: 'tiny:arith', lr: 1e-4, weight_decay: .5, packing_off: off}\n"
    )
    err = _errors(_write(tmp_path, text))
    assert "stages.a.packing_off: unknown key" in str(err)  # `off` did not become a boolean key value
    loaded = load_recipe(_write(tmp_path, text.replace(", packing_off: off", "")))
    spec = loaded.recipe.stages["a"]
    assert spec.lr == 1e-4 and isinstance(loaded.raw["stages"]["a"]["lr"], float)
    assert spec.weight_decay == 0.5 and loaded.recipe.lora.alpha == 1000.0 and loaded.recipe.lora.dropout == 0.05
    flags = "model:\n  name: x\n  trust_remote_code: FALSE\n  gradient_checkpointing: True\nstages:\n" + SFT
    model = load_recipe(_write(tmp_path, flags)).recipe.model
    assert model.trust_remote_code is False and model.gradient_checkpointing is True
    octal = load_recipe(_write(tmp_path, M + "seed: 0o17\nstages:\n" + SFT))
    assert octal.recipe.seed == 15


def test_overrides(recipe_dir: Path) -> None:
    path = _write(recipe_dir, GOOD)
    loaded = load_recipe(path, [
        "stages.rl.lr=5e-6", "lora.targets=[q_proj,k_proj]", "stages.rl.loss={beta: 0.1}",
        "stages.rl.sampling.temperature=0.7", "stages.cold_start.data=train.jsonl", "run_name=exp-2",
    ])
    rl = loaded.recipe.stages["rl"]
    assert rl.lr == 5e-6 and rl.loss.beta == 0.1 and rl.loss.eps_high == 0.2  # mapping replaced whole
    assert rl.sampling.temperature == 0.7 and loaded.recipe.lora.targets == ["q_proj", "k_proj"]
    assert loaded.recipe.stages["cold_start"].data[0].source == "train.jsonl"
    assert loaded.recipe.run_name == "exp-2" and loaded.raw["stages"]["rl"]["lr"] == 5e-6
    err = _errors(path, ["stages.rl.rewards.3=x", "stages.rl.lr=!!python/name:os.system"])
    assert "--set  stages.rl.rewards.3: stages.rl.rewards is a list of 1; '3' is not an index in it" in str(err)
    assert "--set  stages.rl.lr: tag !!python/name:os.system is not allowed" in str(err)


def test_sha256_pins_the_resolved_recipe(tmp_path: Path) -> None:
    first = load_recipe(_write(tmp_path, GOOD)).sha256
    assert first == load_recipe(_write(tmp_path, GOOD)).sha256 and re.fullmatch(r"[0-9a-f]{64}", first)
    restyled = GOOD.replace("group_size: 4", "group_size: 4  # G").replace("epochs: 2", "epochs: 2.0")
    assert load_recipe(_write(tmp_path, restyled)).sha256 == first
    assert load_recipe(tmp_path / "recipe.yaml", ["stages.rl.lr=2e-5"]).sha256 != first
    explicit_default = GOOD.replace("group_size: 4", "group_size: 4\n    steps: 100")
    assert load_recipe(_write(tmp_path, explicit_default)).sha256 == first
    lines = GOOD.splitlines(keepends=True)
    swapped = "".join(lines[:4] + lines[14:15] + lines[4:14])  # retrain before everything else
    assert load_recipe(_write(tmp_path, swapped.replace("data: sample", "data: 'tiny:arith'"))).sha256 != first


def test_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(M + "# " + "x" * 10_000_000 + "\n")
    start = time.perf_counter()
    err = _errors(path)
    assert time.perf_counter() - start < 1.0
    assert "recipes are limited to 1 MB" in str(err)


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, M + "seed: " + "[" * 200_000 + "]" * 200_000 + "\n")
    err = str(_errors(path))
    # our own depth check, or (PyYAML >= 6.0.4) libyaml's, whichever the parser reaches first;
    # either way a located error, never a crash of the C parser
    assert "nested more than 64 levels deep" in err or "exceeded maximum nesting depth" in err, err
    assert err.startswith(f"{path}:2:")


def test_missing_recipe_file(tmp_path: Path) -> None:
    assert str(_errors(tmp_path / "nope.yaml")) == f"{tmp_path / 'nope.yaml'}  recipe file not found"


def test_no_torch_import(recipe_dir: Path) -> None:
    """Loading (good or bad) imports neither torch nor transformers, so bad input fails fast (RELIABILITY 21)."""
    good, bad = recipe_dir / "good.yaml", recipe_dir / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(M + "stages:\n  a: {kind: sft, data: !!python/object/apply:os.system ['touch canary']}\n")
    code = (
        "import sys\nfrom rlft.errors import RecipeError\nfrom rlft.recipe.load import load_recipe\n"
        f"load_recipe({str(good)!r})\n"
        f"try:\n    load_recipe({str(bad)!r})\nexcept RecipeError:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=recipe_dir, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
    assert not (recipe_dir / "canary").exists()


# --------------------------------------------------------------------------- generated typo corpus

CORPUS = """\
run_name: corpus
output_dir: runs
seed: 0
model:
  name: tiny:nano
  dtype: float32
  revision: main
  gradient_checkpointing: false
lora:
  r: 8
  alpha: 16
  dropout: 0.0
  targets: [q_proj, v_proj]
stages:
  cold_start:
    kind: sft
    data:
      source: tiny:arith
      num_examples: 100
      max_length: 64
      eval_size: 8
    epochs: 1
    batch_size: 8
    micro_batch_size: 4
    lr: 1e-4
    warmup_steps: 2
    save_every: 10
  rl:
    kind: grpo
    from: cold_start
    data: tiny:arith
    group_size: 4
    prompts_per_step: 2
    steps: 5
    rewards:
      - name: math_answer
        weight: 1.0
    sampling:
      temperature: 0.9
      top_p: 0.95
      max_new_tokens: 32
    loss:
      eps_low: 0.2
      eps_high: 0.28
      beta: 0.0
      aggregate: token
    advantage:
      scale: group
"""
_KEY_LINE = re.compile(r"^(\s*(?:- )?)([a-z_]+):")


def _single_edit_typos(word: str, rng: random.Random) -> set[str]:
    letters = "abcdefghijklmnopqrstuvwxyz_"
    typos = {word[:i] + word[i + 1 :] for i in range(len(word))}
    typos |= {word[:i] + word[i + 1] + word[i] + word[i + 2 :] for i in range(len(word) - 1)}
    for i in range(len(word)):
        typos |= {word[:i] + c + word[i + 1 :] for c in rng.sample([c for c in letters if c != word[i]], 2)}
    return typos - {word, ""}


def _schema_keys() -> set[str]:
    models = [v for v in vars(schema).values() if isinstance(v, type) and issubclass(v, BaseModel)]
    return {info.alias or name for m in models for name, info in m.model_fields.items()}


def test_typo_corpus_did_you_mean(tmp_path: Path) -> None:
    """Every key x single-edit typo (deletion, transposition, substitution): did-you-mean >= 95% (RELIABILITY 25)."""
    load_recipe(_write(tmp_path, CORPUS))
    rng, valid, lines = random.Random(0), _schema_keys(), CORPUS.splitlines(keepends=True)
    total, right, wrong = 0, 0, []
    for number, line in enumerate(lines, 1):
        match = _KEY_LINE.match(line)
        if not match or match.group(2) in ("cold_start", "rl"):
            continue
        indent, key = match.groups()
        for typo in sorted(_single_edit_typos(key, rng) - valid):
            text = "".join(lines[: number - 1] + [indent + typo + line[match.end(2) :]] + lines[number:])
            err = _errors(_write(tmp_path, text))
            total += 1
            at_line = [p for p in err.problems if p.line == number]
            if any(f"did you mean '{key}'?" in p.message for p in at_line):
                right += 1
            else:
                wrong.append(f"{key} -> {typo}: {[p.message for p in at_line]}")
    rate = right / total
    print(f"did-you-mean correct for {right}/{total} single-edit typos ({rate:.1%})")
    assert total > 500 and rate >= 0.95, "\n".join(wrong[:20])


# --------------------------------------------------------------------------- shipped recipes

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.skipif(not RECIPES, reason="no recipes/*.yaml yet")
@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates(path: Path) -> None:
    loaded = load_recipe(path)
    assert loaded.recipe.stages and len(loaded.sha256) == 64


def test_unknown_keys_in_optional_mappings_suggest_the_right_key(tmp_path: Path) -> None:
    """`tiny:`, `student:` and `gate:` are optional mappings; a typo inside one names the key it meant."""
    path = _write(tmp_path, 'model: {name: "tiny:nano", tiny: {hiden_size: 8}}\nstages:\n'
                  "  a: {kind: sft, data: 'tiny:arith', student: {nmae: x}, gate: {metric: eval/loss, mx: 1}}\n")
    problems = {(p.line, p.path): p.message for p in _errors(path).problems}
    assert problems == {
        (1, "model.tiny.hiden_size"): "unknown key (did you mean 'hidden_size'?)",
        (3, "stages.a.student.nmae"): "unknown key (did you mean 'name'?)",
        (3, "stages.a.gate.mx"): "unknown key (did you mean 'max'?)",
    }, problems
