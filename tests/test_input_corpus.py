"""The bad-input corpus for recipes and command-line arguments: every case through the installed
`rlft` console script in a subprocess, counted. A clear error is exit 2, no traceback, the place
(recipe file:line:column, or `--set` and the key, or the command) and what is wrong. The counts are
the figure in docs/reliability.md, checked here so the doc cannot drift from the corpus (the data
files have their own corpus in test_data_check.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from forkserver import record_result
from test_cli import rlft

ROOT = Path(__file__).resolve().parents[1]

HEAD = 'model: {name: "tiny:nano"}\nstages:\n'
SFT = '  s: {kind: sft, data: "tiny:arith", max_steps: 1}\n'
GRPO = '  g: {kind: grpo, data: "tiny:arith", rewards: [task_verifier]'

# (case, recipe bytes, where the error must point, what it must say)
RECIPES: list[tuple[str, bytes, str, str]] = [
    ("typo_key", (HEAD + '  s: {kind: sft, data: "tiny:arith", epoch: 2}\n').encode(), "r.yaml:3:38",
     "did you mean 'epochs'?"),
    ("typo_kind", (HEAD + '  s: {kind: sfft, data: "tiny:arith"}\n').encode(), "r.yaml:3:7", "did you mean 'sft'?"),
    ("not_a_number", (HEAD + '  s: {kind: sft, data: "tiny:arith", lr: fast}\n').encode(), "r.yaml:3:38",
     "expected a number, got 'fast'"),
    ("negative_batch", (HEAD + '  s: {kind: sft, data: "tiny:arith", batch_size: -1}\n').encode(), "r.yaml:3:38",
     "must be >= 1"),
    ("nan_lr", (HEAD + '  s: {kind: sft, data: "tiny:arith", lr: .nan}\n').encode(), "r.yaml:3:38", "got nan"),
    ("duplicate_key", ('model: {name: "tiny:nano"}\n' + HEAD + SFT).encode(), "r.yaml:2:1", "duplicate key 'model'"),
    ("tab_indent", b"model:\n\t name: x\n", "r.yaml:2:1", "tab character"),
    ("empty_file", b"", "r.yaml:1:1", "the recipe is empty"),
    ("binary_file", b"\x00\x01\x02model: x\n", "r.yaml:1:1", "a NUL byte"),
    ("latin1_file", (HEAD + '  s: {kind: sft, data: "caf\xe9.jsonl"}\n').encode("latin-1"), "r.yaml:3:",
     "not UTF-8"),
    ("top_level_list", b"- a\n- b\n", "r.yaml:1:1", "got a list"),
    ("recursive_alias", b"a: &x [*x]\n", "r.yaml:1:4", "an alias refers to a value that contains it"),
    ("python_tag", b"model: !!python/object:os.system {name: x}\nstages: {}\n", "r.yaml:1:8",
     "is not allowed"),
    ("deep_nesting", b"a: " + b"[" * 100_000 + b"\n", "r.yaml:1:", "nest"),
    ("two_documents", (HEAD + SFT + "---\n" + HEAD + SFT).encode(), "r.yaml:4:", "one YAML document"),
    ("no_stages", b'model: {name: "tiny:nano"}\n', "r.yaml:1:1", "missing required key 'stages'"),
    ("from_typo", (HEAD + SFT + GRPO + ", from: ss}\n").encode(), "r.yaml:4:", "did you mean 's'?"),
    ("reward_typo", (HEAD + '  g: {kind: grpo, data: "tiny:arith", rewards: [task_verifer]}\n').encode(),
     "r.yaml:3:49", "did you mean 'task_verifier'?"),
    ("group_of_one", (HEAD + GRPO + ", group_size: 1}\n").encode(), "r.yaml:3:", "must be >= 2"),
    ("class_path", (HEAD.replace("}", ", _component_: x.Y}", 1) + SFT).encode(), "r.yaml:1:",
     "recipes are data"),
    ("token_in_value", (HEAD.replace("}", ", revision: hf_abcdefghijklmnopqrstuvwxyzABCDEFGH}", 1) + SFT).encode(),
     "r.yaml:1:", "looks like a Hugging Face token"),
    ("seed_too_large", (HEAD.replace("stages:", "seed: 99999999999999999999999\nstages:") + SFT).encode(),
     "r.yaml:2:1", "seed: must be <"),
    ("missing_data_file", (HEAD + '  s: {kind: sft, data: "nofile.jsonl"}\n').encode(), "r.yaml:3:",
     "file not found"),
    ("tiny_preset_typo", (HEAD.replace("nano", "nanoo") + SFT).encode(), "r.yaml:1:9", "did you mean 'nano'?"),
    ("reserved_stage_name", (HEAD + '  base: {kind: sft, data: "tiny:arith"}\n').encode(), "r.yaml:3:3",
     "'base' is reserved"),
    ("micro_batch_not_dividing", (HEAD + '  s: {kind: sft, data: "tiny:arith", batch_size: 8, '
                                  'micro_batch_size: 3}\n').encode(), "r.yaml:3:", "must divide batch_size 8"),
    ("over_1_mb", b"# " + b"x" * 1_100_000 + b"\n", "r.yaml", "limited to 1 MB"),
]

# (case, arguments, what the error line must say); run in a directory holding a valid `ok.yaml`,
# a plain file `afile` and a directory `adir`
ARGUMENTS: list[tuple[str, list[str], str]] = [
    ("no_recipe", ["run"], "rlft run: Missing argument"),
    ("option_typo", ["run", "--sett", "x", "ok.yaml"], "No such option: --sett (did you mean"),
    ("command_typo", ["valdate", "ok.yaml"], "No such command 'valdate'"),
    ("set_without_value", ["run", "ok.yaml", "--set"], "'--set' requires an argument"),
    ("stage_without_name", ["stage"], "rlft stage: Missing argument"),
    ("stage_resume_without_run", ["stage", "grpo", "--resume"], "no --recipe given and no run under runs/"),
    ("recipe_not_found", ["run", "ok.yml"], "recipe file not found (did you mean 'ok.yaml'?)"),
    ("recipe_is_a_directory", ["run", "adir"], "a directory, not a recipe file"),
    ("recipe_is_a_fifo", ["validate", "fifo.yaml"], "not a regular file"),
    ("set_unknown_key", ["run", "ok.yaml", "--set", "badkey=1"], "badkey: unknown key"),
    ("set_bad_value", ["run", "ok.yaml", "--set", "stages.s.lr=abc"], "expected a number, got 'abc'"),
    ("set_no_equals", ["run", "ok.yaml", "--set", "noequals"], "expected key.path=value"),
    ("set_unknown_stage", ["run", "ok.yaml", "--set", "stages.ss.lr=1"], "no stage 'ss' in the recipe (did you mean 's'?)"),
    ("set_out_of_range", ["explain", "ok.yaml", "--set", "stages.s.epochs=0"], "must be > 0"),
    ("output_dir_is_a_file", ["run", "ok.yaml", "--set", "output_dir=afile"], "exists and is not a directory"),
    ("unknown_stage", ["stage", "zz", "-r", "ok.yaml"], "no stage named 'zz'"),
    ("resume_and_restart", ["stage", "s", "--resume", "--restart", "-r", "ok.yaml"], "give one"),
    ("explain_not_a_run", ["explain", "--run", "nowhere"], "not a run directory"),
]


def _recipe_case(tmp: Path, case: tuple[str, bytes, str, str]) -> tuple[str, bool, bool, str]:
    name, content, where, fragment = case
    work = tmp / name
    work.mkdir()
    (work / "r.yaml").write_bytes(content)
    proc = rlft("validate", "r.yaml", cwd=work, timeout=120)
    err = proc.stdout + proc.stderr
    clear = proc.returncode == 2 and where in err and fragment in err
    return name, clear, "Traceback" in err, err[-400:]


def _argument_case(tmp: Path, case: tuple[str, list[str], str]) -> tuple[str, bool, bool, str]:
    import os

    name, args, fragment = case
    work = tmp / name
    work.mkdir()
    (work / "ok.yaml").write_text(HEAD + SFT)
    (work / "afile").write_text("")
    (work / "adir").mkdir()
    os.mkfifo(work / "fifo.yaml")
    proc = rlft(*args, cwd=work, timeout=120)
    err = proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    clear = proc.returncode == 2 and len(lines) == 1 and fragment in lines[0]
    return name, clear, "Traceback" in err, err[-400:]


def test_bad_recipes_and_arguments_give_clear_errors(tmp_path: Path) -> None:
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: _recipe_case(tmp_path, c), RECIPES))
        results += list(pool.map(lambda c: _argument_case(tmp_path, c), ARGUMENTS))
    clear = sum(r[1] for r in results)
    tracebacks = sum(r[2] for r in results)
    n = len(results)
    record_result("test_bad_recipes_and_arguments_give_clear_errors", clear, n, tracebacks=tracebacks)
    assert not [r for r in results if not r[1]], [(r[0], r[3]) for r in results if not r[1]]
    assert tracebacks == 0
    doc = (ROOT / "docs/reliability.md").read_text()
    line = (f"{len(RECIPES)} recipes and {len(ARGUMENTS)} argument lists tried, {clear} clear errors, "
            f"{tracebacks} tracebacks")
    assert line in doc, line
