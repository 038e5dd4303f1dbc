"""Loading rows: formats, held-out split, mixing, fingerprints, and precise errors for bad data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rlft.data import rows as data_load
from rlft.data.rows import data_fingerprint, load_rows, mix, row_format
from rlft.errors import DataError


def spec(source: str, **kw: Any) -> SimpleNamespace:
    """An object with DataSpec's fields and defaults."""
    base = dict(source=source, format="auto", split="train", eval_split=None, eval_size=0.1, num_examples=None,
                columns={}, system_prompt=None, max_length=512, long_rows="error", packing=False, weight=1.0,
                subset=None, max_row_bytes=1_000_000)
    return SimpleNamespace(**(base | kw))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "id": i}


def public(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def test_tiny_rows(tmp_path: Path) -> None:
    train, heldout = load_rows(spec("tiny:arith", num_examples=100, eval_size=0.2), tmp_path, seed=0)
    assert (len(train), len(heldout)) == (80, 20)
    row = train[0]
    assert row["task"] == "arith" and row["completion"] == row["solution"] and row["answer"] in row["solution"]
    assert row_format(row) == "prompt_completion"
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert load_rows(spec("tiny:arith", num_examples=100, eval_size=0.2), tmp_path, seed=0) == (train, heldout)
    assert load_rows(spec("tiny:arith", num_examples=100, eval_size=0.2), tmp_path, seed=1)[0] != train
    assert len(load_rows(spec("tiny:sort"), tmp_path, seed=0)[0]) == data_load.DEFAULT_TINY_ROWS * 9 // 10
    assert load_rows(spec("tiny:copy", num_examples=10, eval_size=0), tmp_path, seed=0)[1] == []


def test_real_data_spec_is_accepted(tmp_path: Path) -> None:
    from rlft.recipe.schema import DataSpec

    train, heldout = load_rows(DataSpec(source="tiny:copy", num_examples=20, eval_size=5), tmp_path, seed=0)
    assert (len(train), len(heldout)) == (15, 5)


def test_jsonl_formats_and_renames(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "chat.jsonl", [chat(i) for i in range(10)])
    train, heldout = load_rows(spec("chat.jsonl", eval_size=0), tmp_path, seed=0)
    assert public(train) == [chat(i) for i in range(10)] and heldout == []
    assert train[3]["_row"] == 4 and train[3]["_source"].endswith("chat.jsonl")

    write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2", "final": "4", "answer": "4"}])
    rows = load_rows(spec("qa.jsonl", eval_size=0, columns={"question": "prompt", "final": "completion"}),
                     tmp_path, 0)[0]
    assert public(rows) == [{"prompt": "2+2", "completion": "4", "answer": "4"}]
    write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "2+2", "answer": 4}])
    assert row_format(load_rows(spec("rl.jsonl", eval_size=0), tmp_path, 0)[0][0]) == "prompt"
    write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    assert public(load_rows(spec("t.jsonl", eval_size=0, format="text"), tmp_path, 0)[0]) == [{"text": "hello"}]


def test_json_array_csv_parquet(tmp_path: Path) -> None:
    rows = [{"prompt": "p1", "completion": "NA", "answer": "42"}, {"prompt": "p\n2", "completion": "c", "answer": "3.5"}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "a.csv").write_text('prompt,completion,answer\np1,NA,42\n"p\n2",c,3.5\n')
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    for name in ("a.json", "a.csv", "a.parquet"):
        # CSV cells stay exact strings: "NA" is not missing, "42" is not a number.
        assert public(load_rows(spec(name, eval_size=0), tmp_path, 0)[0]) == rows, name


def test_heldout_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(50)] + [chat(0)])  # row 51 duplicates row 1
    split = [load_rows(spec("d.jsonl", eval_size=0.2), tmp_path, seed=s) for s in (0, 0, 1)]
    train, heldout = split[0]
    assert split[1] == split[0] and split[2][1] != heldout
    assert len(train) == 41 and 9 <= len(heldout) <= 10  # a held-out copy of a training row is dropped
    assert not {r["_row"] for r in train} & {r["_row"] for r in heldout}
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in heldout}
    assert [r["_row"] for r in train] == sorted(r["_row"] for r in train)  # source order kept
    assert len(load_rows(spec("d.jsonl", eval_size=7), tmp_path, 0)[1]) == 7
    write_jsonl(tmp_path / "one.jsonl", [chat(0)])
    assert len(load_rows(spec("one.jsonl", eval_size=0.5), tmp_path, 0)[0]) == 1  # a fraction leaves 1 row
    assert len(load_rows(spec("d.jsonl", num_examples=20, eval_size=0), tmp_path, 0)[0]) == 20


def test_eval_split_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(5)])
    write_jsonl(tmp_path / "dev.jsonl", [chat(i) for i in range(5, 7)])
    train, heldout = load_rows(spec("train.jsonl", eval_split="dev.jsonl"), tmp_path, 0)
    assert len(train) == 5 and public(heldout) == [chat(5), chat(6)]


def test_hub_name_offline_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_rows(spec("nobody/no-such-dataset-rlft"), tmp_path, 0)
    msg = str(err.value)
    assert msg.startswith("nobody/no-such-dataset-rlft") and "cannot load hub data set split 'train'" in msg
    assert "offline" in msg and "no local file" in msg


BAD = [
    # (file name, content, DataSpec overrides, expected row, expected fragment)
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', {}, 2, "not valid JSON"),
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n\n["a", "b"]\n', {}, 3, "expected a JSON object"),
    ("bad.jsonl", "", {}, None, "file is empty"),
    ("bad.jsonl", "\n  \n", {}, None, "file is empty"),
    ("bad.jsonl", '{"prompt": "a"}\n', {"format": "prompt_completion"}, None, "needs column(s) ['completion']"),
    ("bad.jsonl", '{"question": "a"}\n', {}, None, "cannot detect the row format from columns ['question']"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": 5}]}\n', {}, 1, "content must be a string, got int"),
    ("bad.jsonl", '{"messages": "hi"}\n', {}, 1, "must be a non-empty list of {role, content} messages"),
    ("bad.jsonl", '{"messages": [{"role": "usr", "content": "x"}]}\n', {}, 1, "unknown role 'usr' (did you mean 'user'?)"),
    ("bad.jsonl", '{"messages": [{"content": "x"}]}\n', {}, 1, "must be an object with 'role' and 'content'"),
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": null, "completion": "b"}\n', {}, 2, "null/None"),
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ["b"]}\n', {}, 2,
     "is a list here but a string in row 1"),
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "answer": "b"}\n', {}, 2, "mixed schemas"),
    ("bad.jsonl", '{"q": "a", "completion": "b"}\n', {"columns": {"question": "prompt"}}, 1, "no column 'question'"),
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n', {"eval_size": 1}, None, "leaves none to train on"),
    ("bad.json", '{\n  "rows": [{"prompt": "a"}]\n}', {}, None, "holds a single JSON object"),
    ("bad.json", '[{"prompt": "a"}, 3]', {}, 2, "expected a JSON object per row"),
    ("bad.csv", "prompt,completion\na,\n", {}, 1, "null/None"),
    ("bad.csv", "prompt,completion\n", {}, None, "has no rows (only a header)"),
    ("bad.txt", "hello", {}, None, "unsupported file type '.txt'"),
    ("bad.jsonl", b'{"prompt": "\xff"}\n', {}, None, "is not UTF-8"),
]


@pytest.mark.parametrize(("name", "content", "overrides", "row", "fragment"), BAD)
def test_bad_data_is_reported_with_file_and_row(
    tmp_path: Path, name: str, content: str | bytes, overrides: dict, row: int | None, fragment: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as err:
        load_rows(spec(name, **overrides), tmp_path, 0)
    msg = str(err.value)
    assert name in msg and fragment in msg, msg
    if row is not None:
        assert f"{name}:row {row}" in msg and err.value.row == row, msg


def test_missing_file_did_you_mean(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [chat(0)])
    with pytest.raises(DataError, match=r"trian\.jsonl: file not found \(did you mean 'train\.jsonl'\?\)"):
        load_rows(spec("trian.jsonl"), tmp_path, 0)
    with pytest.raises(DataError, match="directory .* does not exist"):
        load_rows(spec("nowhere/train.jsonl"), tmp_path, 0)
    with pytest.raises(DataError, match="is a directory"):
        load_rows(spec("."), tmp_path, 0)
    with pytest.raises(DataError, match="unknown task 'arth' .did you mean 'arith'"):
        load_rows(spec("tiny:arth"), tmp_path, 0)


def test_mix_weights_are_output_shares() -> None:
    a = [{"src": "a", "i": i} for i in range(100)]
    b = [{"src": "b", "i": i} for i in range(20)]
    out = mix([a, b], [1.0, 3.0], seed=0)
    assert len(out) == 120
    assert sum(r["src"] == "a" for r in out) == 30 and sum(r["src"] == "b" for r in out) == 90
    b_counts = Counter(r["i"] for r in out if r["src"] == "b")  # 90 from 20 rows: each 4x, 10 of them 5x
    assert set(b_counts) == set(range(20)) and sorted(Counter(b_counts.values()).items()) == [(4, 10), (5, 10)]
    assert len({r["i"] for r in out if r["src"] == "a"}) == 30  # sampled without replacement
    assert mix([a, b], [1.0, 3.0], seed=0) == out and mix([a, b], [1.0, 3.0], seed=1) != out
    assert len(mix([a, b], [1, 1], seed=0, size=7)) == 7
    assert all(r["src"] == "a" for r in mix([a, b], [1, 0], seed=0))
    with pytest.raises(ValueError, match="positive sum"):
        mix([a, b], [0, 0], seed=0)


def test_fingerprint(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat(0)])
    first = data_fingerprint(spec("d.jsonl"), tmp_path)
    assert first == data_fingerprint(spec(str(path)), Path("/"))
    path.write_text(path.read_text().replace("q0", "q1"))
    assert data_fingerprint(spec("d.jsonl"), tmp_path) != first
    tiny = data_fingerprint(spec("tiny:arith"), tmp_path, seed=0)
    assert tiny == data_fingerprint(spec("tiny:arith"), tmp_path, seed=0)
    assert tiny != data_fingerprint(spec("tiny:arith"), tmp_path, seed=1)
    assert tiny != data_fingerprint(spec("tiny:arith", num_examples=10), tmp_path, seed=0)
    assert tiny != data_fingerprint(spec("tiny:sort"), tmp_path, seed=0)
