"""Bad and hostile data files are reported before any model loads, by `rlft validate` and at the
start of `rlft run`: file, 1-based row and column, exit 2, no traceback, bounded memory and time
(RELIABILITY.md test 25, data half). Data paths outside the recipe directory: allowed, shown
resolved, and refused under `data_root`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from forkserver import record_result
from helpers import write_recipe

from rlft.data.rows import load_rows
from rlft.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
RLFT = str(Path(sys.executable).with_name("rlft"))
PC = '{"prompt": "a", "completion": "b"}\n'
BIG = 2_000_000


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _parquet(path: Path) -> None:
    path.write_bytes(b"PAR1 this is not parquet PAR1")


def _big_row(path: Path) -> None:
    path.write_text(PC + json.dumps({"prompt": "x" * BIG, "completion": "b"}) + "\n")


# (case, file name, content or a function that makes the file, data spec overrides, stage kind,
#  expected 1-based row or None, expected fragment of the message)
CORPUS: list[tuple[str, str, Any, dict[str, Any], str, int | None, str]] = [
    ("malformed_json_line", "d.jsonl", PC + '{"prompt": "a", "completion": \n', {}, "sft", 2, "not valid JSON"),
    ("non_object_row", "d.jsonl", PC + '\n["a", "b"]\n', {}, "sft", 3, "expected a JSON object"),
    ("empty_file", "d.jsonl", "", {}, "sft", None, "file is empty"),
    ("whitespace_file", "d.jsonl", "\n  \n", {}, "sft", None, "file is empty"),
    ("missing_column", "d.jsonl", '{"prompt": "a"}\n', {"format": "prompt_completion"}, "sft", None,
     "needs column(s) ['completion']"),
    ("undetectable_format", "d.jsonl", '{"question": "a"}\n', {}, "sft", None, "cannot detect the row format"),
    ("renamed_column_missing", "d.jsonl", '{"q": "a", "completion": "b"}\n', {"columns": {"question": "prompt"}},
     "sft", 1, "no column 'question'"),
    ("content_not_string", "d.jsonl", '{"messages": [{"role": "user", "content": 5}]}\n', {}, "sft", 1,
     "content must be a string, got int"),
    ("messages_not_list", "d.jsonl", '{"messages": "hi"}\n', {}, "sft", 1, "must be a non-empty list"),
    ("unknown_role", "d.jsonl", '{"messages": [{"role": "usr", "content": "x"}]}\n', {}, "sft", 1,
     "unknown role 'usr' (did you mean 'user'?)"),
    ("null_cell", "d.jsonl", PC + '{"prompt": null, "completion": "b"}\n', {}, "sft", 2, "null/None"),
    ("column_type_changes", "d.jsonl", PC + '{"prompt": "a", "completion": ["b"]}\n', {}, "sft", 2,
     "is a list here but a string in row 1"),
    ("mixed_schemas", "d.jsonl", PC + '{"prompt": "a", "answer": "b"}\n', {}, "sft", 2, "mixed schemas"),
    ("eval_size_leaves_none", "d.jsonl", PC, {"eval_size": 1}, "sft", None, "leaves none to train on"),
    ("json_single_object", "d.json", '{\n  "rows": [{"prompt": "a"}]\n}', {}, "sft", None,
     "holds a single JSON object"),
    ("json_array_non_object", "d.json", '[{"prompt": "a", "completion": "b"}, 3]', {}, "sft", 2,
     "expected a JSON object per row"),
    ("csv_empty_cell", "d.csv", "prompt,completion\na,\n", {}, "sft", 1, "null/None"),
    ("csv_header_only", "d.csv", "prompt,completion\n", {}, "sft", None, "only a header"),
    ("csv_ragged_row", "d.csv", "prompt,completion\na,b\nc,d,e\n", {}, "sft", 2, "has 3 fields but the header has 2"),
    ("csv_duplicate_header", "d.csv", "prompt,prompt\na,b\n", {}, "sft", None, "more than once"),
    ("csv_not_utf8", "d.csv", b"prompt,completion\na,b\n\xff\xfe,c\n", {}, "sft", 2, "is not UTF-8"),
    ("jsonl_not_utf8", "d.jsonl", PC.encode() + b'{"prompt": "\xff", "completion": "b"}\n', {}, "sft", 2,
     "is not UTF-8"),
    ("json_nested_100k_deep", "d.jsonl", PC + '{"prompt": "a", "completion": "b", "x": ' + "[" * 100_000
     + "]" * 100_000 + "}\n", {}, "sft", 2, "more than 100 levels deep"),
    ("json_nested_150_deep", "d.jsonl", '{"prompt": "a", "completion": "b", "x": ' + "[" * 150 + "]" * 150 + "}\n",
     {}, "sft", 1, "more than 100 levels deep"),
    ("row_over_max_row_bytes", "d.jsonl", _big_row, {}, "sft", 2, "over max_row_bytes 1000000"),
    ("json_array_row_over_cap", "d.json", json.dumps([{"prompt": "a" * 2000, "completion": "b"}]),
     {"max_row_bytes": 1000}, "sft", 1, "over max_row_bytes 1000"),
    ("not_parquet", "d.parquet", _parquet, {}, "sft", None, "cannot be read as parquet"),
    ("named_pipe", "d.jsonl", _fifo, {}, "sft", None, "is not a regular file"),
    ("directory", "d.jsonl", lambda p: p.mkdir(), {}, "sft", None, "is a directory"),
    ("unsupported_type", "d.txt", "hello", {}, "sft", None, "unsupported file type '.txt'"),
    ("prompt_only_rows_for_sft", "d.jsonl", '{"prompt": "a", "answer": "1"}\n', {}, "sft", 1, "has only a prompt"),
    ("no_assistant_turn_for_sft", "d.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', {}, "sft", 1,
     "has no assistant message"),
    ("text_rows_for_grpo", "d.jsonl", '{"text": "a"}\n', {}, "grpo", 1, "is a text row"),
    ("no_user_turn_for_grpo", "d.jsonl", '{"messages": [{"role": "system", "content": "x"}]}\n', {}, "grpo", 1,
     "has no user message"),
]
CASE_IDS = [c[0] for c in CORPUS]


def _make(tmp: Path, name: str, content: Any) -> Path:
    path = tmp / name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _stage(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    extra = {"rewards": ["math_answer"]} if kind == "grpo" else {}
    return {"kind": kind, "data": data} | extra


def _validate(recipe: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run([RLFT, "validate", str(recipe)], capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - t0


def _is_clear(proc: subprocess.CompletedProcess[str], path: Path, row: int | None, fragment: str) -> bool:
    """Exit 2, no traceback, one message naming the file (and row), saying what is wrong."""
    err = proc.stderr
    where = f"{path}:row {row}" if row is not None else str(path)
    return proc.returncode == 2 and "Traceback" not in err and where in err and fragment in err


def test_bad_input_corpus_gives_clear_errors(tmp_path: Path) -> None:
    """Every case through `rlft validate` in a subprocess; the counts are the figure in
    docs/reliability.md (checked here, so the doc cannot drift from the corpus)."""
    clear, tracebacks, unclear, slowest = 0, 0, [], 0.0
    for case, name, content, over, kind, row, fragment in CORPUS:
        tmp = tmp_path / case
        tmp.mkdir()
        path = _make(tmp, name, content)
        recipe = write_recipe(tmp / "r.yaml", {"model": {"name": "tiny:nano"},
                                               "stages": {"s": _stage(kind, {"source": name} | over)}})
        proc, seconds = _validate(recipe)
        slowest = max(slowest, seconds)
        tracebacks += "Traceback" in proc.stderr
        if _is_clear(proc, path, row, fragment):
            clear += 1
        else:
            unclear.append((case, proc.returncode, proc.stderr[-500:]))
    n = len(CORPUS)
    record_result("test_bad_input_corpus_gives_clear_errors", clear, n, tracebacks=tracebacks,
                  slowest_s=round(slowest, 2))
    assert not unclear, unclear
    assert tracebacks == 0
    doc = (ROOT / "docs/reliability.md").read_text()
    assert f"{n} cases tried, {clear} clear errors, {tracebacks} tracebacks" in doc


@pytest.mark.parametrize("case", [c for c in CORPUS if c[4] == "sft" and c[0] not in (
    "prompt_only_rows_for_sft", "no_assistant_turn_for_sft")], ids=lambda c: c[0])
def test_the_stage_loader_reports_the_same_row(tmp_path: Path, case: tuple) -> None:
    """The loader the stages use (load_rows) stops at the same problem, naming the same row."""
    _, name, content, over, _, row, fragment = case
    path = _make(tmp_path, name, content)
    spec = SimpleNamespace(**({"source": name, "format": "auto", "split": "train", "eval_split": None,
                               "eval_size": 0.1, "num_examples": None, "columns": {}, "system_prompt": None,
                               "subset": None, "max_row_bytes": 1_000_000} | over))
    with pytest.raises(DataError) as err:
        load_rows(spec, tmp_path, 0)
    assert str(err.value).startswith(f"{path}:row {row}" if row else str(path)) and fragment in str(err.value)


def test_validate_reports_every_problem_of_every_file_at_once(tmp_path: Path) -> None:
    lines = [PC, '{"prompt": 5, "completion": "b"}\n', "{oops\n", PC]
    (tmp_path / "a.jsonl").write_text("".join(lines) + "".join('{"prompt": 1, "completion": "b"}\n' for _ in range(30)))
    (tmp_path / "b.csv").write_text("prompt,completion\na,b\nc,d,e\n")
    stages = {"one": _stage("sft", {"source": "a.jsonl"}), "two": _stage("grpo", {"source": "b.csv"})}
    proc, _ = _validate(write_recipe(tmp_path / "r.yaml", {"model": {"name": "tiny:nano"}, "stages": stages}))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr
    assert f"{tmp_path / 'a.jsonl'}:row 2  column 'prompt': is a number here but a string in row 1" in err
    assert f"{tmp_path / 'a.jsonl'}:row 3: is not valid JSON" in err and "[stages.one.data.0]" in err
    assert f"{tmp_path / 'a.jsonl'}: 12 more problem(s) not shown" in err  # 32 problems, 20 shown
    assert f"{tmp_path / 'b.csv'}:row 2: has 3 fields" in err and "[stages.two.data.0]" in err


def test_validate_notes_sources_it_does_not_read(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(PC * 20)
    stages = {
        "sft": _stage("sft", [{"source": "a.jsonl"}, {"source": "tiny:arith"}]),
        "rl": _stage("grpo", {"source": "openai/gsm8k", "subset": "main"}) | {"from": "sft"},
        "sample": {"kind": "sample", "from": "rl", "data": "a.jsonl", "rewards": ["math_answer"]},
        "retrain": _stage("sft", {"source": "sample"}),
    }
    proc, _ = _validate(write_recipe(tmp_path / "r.yaml", {"model": {"name": "tiny:nano"}, "stages": stages}))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"stages.sft.data.0: {tmp_path / 'a.jsonl'}: 20 rows ok" in out
    assert "stages.sft.data.1: tiny:arith (built-in task: generated, nothing to read)" in out
    assert "stages.rl.data.0: openai/gsm8k (hub data set: not read until this stage runs)" in out
    assert "stages.retrain.data.0: sample (output of stage 'sample': not read until this stage runs)" in out


def _rusage_run(args: list[str]) -> tuple[int, float, int, str]:
    """Run `args` under a small wrapper process and return (exit code, seconds, peak RSS in MB,
    stderr): the wrapper's own children usage, so this test process's memory is not counted."""
    wrapper = ("import resource, subprocess, sys, time\n"
               "t = time.monotonic()\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stderr.write(p.stderr)\n"
               "print(p.returncode, time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, timeout=300)
    code, seconds, rss_kb = proc.stdout.split()
    return int(code), float(seconds), int(rss_kb) // 1024, proc.stderr


def test_a_20mb_row_is_refused_in_bounded_memory_and_time(tmp_path: Path) -> None:
    """A 20 MB row once took 9 GB and 75 s to tokenise; now `rlft run` refuses it before any model
    loads. 150 MB is below a bare `import torch` (about 220 MB here), so no model code ran."""
    data = tmp_path / "big.jsonl"
    with open(data, "w") as fh:
        fh.write(PC)
        fh.write('{"prompt": "' + "x" * 20_000_000 + '", "completion": "b"}\n')
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"name": "tiny:nano"}, "output_dir": str(tmp_path / "runs"),
                                                "stages": {"sft": _stage("sft", {"source": "big.jsonl"})}})
    code, seconds, rss_mb, err = _rusage_run([RLFT, "run", str(recipe)])
    assert code == 2 and "Traceback" not in err
    assert f"{data}:row 2: is longer than 1000000 bytes, over max_row_bytes 1000000" in err
    assert rss_mb < 150 and seconds < 2.0, (rss_mb, seconds)
    assert not (tmp_path / "runs").exists()  # nothing was written: no run directory, no model
    record_result("test_a_20mb_row_is_refused_in_bounded_memory_and_time", 1, 1, peak_rss_mb=rss_mb,
                  seconds=round(seconds, 2))

    loader = ("from pathlib import Path; from rlft.recipe.schema import DataSpec; from rlft.data.rows import load_rows\n"
              f"load_rows(DataSpec(source='big.jsonl'), Path({str(tmp_path)!r}), 0)\n")
    code, seconds, rss_mb, err = _rusage_run([sys.executable, "-c", loader])
    assert code == 1 and "over max_row_bytes" in err and rss_mb < 150, (rss_mb, err[-300:])


def test_run_fails_on_bad_data_before_any_model_loads(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(PC + "{oops\n")
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"name": "tiny:nano"}, "output_dir": str(tmp_path / "runs"),
                                                "stages": {"sft": _stage("sft", {"source": "d.jsonl"})}})
    for args in (["run", str(recipe)], ["stage", "sft", "--recipe", str(recipe)]):
        code, seconds, rss_mb, err = _rusage_run([RLFT, *args])
        assert code == 2 and f"{tmp_path / 'd.jsonl'}:row 2: is not valid JSON" in err and "Traceback" not in err
        assert seconds < 2.0 and rss_mb < 150, (seconds, rss_mb)
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- paths outside the recipe


def _outside_layout(tmp_path: Path) -> tuple[Path, Path]:
    """recipe/ with a symlink `linked.jsonl` to ../elsewhere/real.jsonl."""
    (tmp_path / "recipe").mkdir()
    (tmp_path / "elsewhere").mkdir()
    real = tmp_path / "elsewhere" / "real.jsonl"
    real.write_text(PC * 10)
    (tmp_path / "recipe" / "linked.jsonl").symlink_to(real)
    return tmp_path / "recipe", real


@pytest.mark.parametrize("source", ["linked.jsonl", "../elsewhere/real.jsonl", "{real}"])
def test_data_root_refuses_files_that_resolve_outside_it(tmp_path: Path, source: str) -> None:
    recipe_dir, real = _outside_layout(tmp_path)
    source = source.format(real=real)
    recipe = write_recipe(recipe_dir / "r.yaml", {"model": {"name": "tiny:nano"}, "data_root": ".",
                                                  "stages": {"sft": _stage("sft", {"source": source})}})
    proc, _ = _validate(recipe)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(rf"{re.escape(str(recipe))}:\d+:\d+  stages\.sft\.data\.source: ", proc.stderr)
    assert f"resolves to {real} (symlinks followed), outside data_root {recipe_dir.resolve()}" in proc.stderr


def test_data_root_accepts_files_inside_and_eval_split_is_checked(tmp_path: Path) -> None:
    recipe_dir, real = _outside_layout(tmp_path)
    (recipe_dir / "train.jsonl").write_text(PC * 10)
    d = {"source": "train.jsonl", "eval_split": "linked.jsonl"}
    recipe = write_recipe(recipe_dir / "r.yaml", {"model": {"name": "tiny:nano"}, "data_root": ".",
                                                  "stages": {"sft": _stage("sft", d)}})
    proc, _ = _validate(recipe)
    assert proc.returncode == 2 and "stages.sft.data.eval_split: linked.jsonl resolves to" in proc.stderr
    d["eval_split"] = "train.jsonl"
    proc, _ = _validate(write_recipe(recipe_dir / "r.yaml", {"model": {"name": "tiny:nano"}, "data_root": ".",
                                                             "stages": {"sft": _stage("sft", d)}}))
    assert proc.returncode == 0, proc.stderr


def test_without_data_root_outside_files_are_read_and_shown_resolved(tmp_path: Path) -> None:
    recipe_dir, real = _outside_layout(tmp_path)
    stage = _stage("sft", {"source": "linked.jsonl", "eval_size": 2}) | {"max_steps": 1, "batch_size": 4,
                                                                       "eval_samples": 2, "eval_max_new_tokens": 2}
    recipe = write_recipe(recipe_dir / "r.yaml", {"model": {"name": "tiny:nano"}, "output_dir": str(tmp_path / "runs"),
                                                  "stages": {"sft": stage}})
    shown = f"{recipe_dir / 'linked.jsonl'} -> {real}"
    explain = subprocess.run([RLFT, "explain", str(recipe)], capture_output=True, text=True)
    assert explain.returncode == 0 and f"stages.sft.data.0: {shown}" in explain.stdout
    env = os.environ | {"COLUMNS": "4000"}  # log lines unwrapped
    run = subprocess.run([RLFT, "run", str(recipe)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"data stages.sft.data.0: {shown} (10 rows)" in " ".join((run.stdout + run.stderr).split())


def test_missing_data_root_is_a_recipe_error(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(PC)
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"name": "tiny:nano"}, "data_root": "nope",
                                                "stages": {"sft": _stage("sft", {"source": "d.jsonl"})}})
    proc, _ = _validate(recipe)
    assert proc.returncode == 2 and f"data_root: directory not found: {tmp_path / 'nope'}" in proc.stderr

