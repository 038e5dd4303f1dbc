"""Read raw rows from local files and the hub, with errors that name the file and row.

JSON and JSON Lines are parsed here, line by line, so a bad line is reported by number, and
the values are kept exactly as written (a table loader would turn 42 into 42.0 in a column that
also holds 3.5, and an `answer` would no longer match). Parquet, CSV and hub data sets load
through `datasets.load_dataset`; CSV cells are read as strings, an empty cell as None (never
"NA"/"null" as missing), so answers keep their exact text.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlft.errors import DataError

TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
Rows = list[tuple[int, dict]]


def read_local(path: Path) -> Rows:
    """(1-based row number, row) pairs of a .jsonl/.json/.parquet/.csv file.

    Raises:
        DataError: unsupported type, empty file, malformed JSON line, non-object row, or
            columns/types that change between rows (mixed schemas).
    """
    name = str(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(name, f"unsupported file type {suffix or '(none)'!r}; use {', '.join(TABLE_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise DataError(name, "file is empty")
    if suffix in (".jsonl", ".json"):
        rows = _read_json(path)
        check_consistent(rows, name)
        return rows
    return _read_table(path, suffix[1:])


def _read_json(path: Path) -> Rows:
    name = str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(name, f"is not UTF-8 text (bad byte at offset {err.start})") from None
    if not text.strip():
        raise DataError(name, "file is empty (only whitespace)")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return _read_json_array(text, name)
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == 1 and path.suffix.lower() == ".json" and _is_one_object(text):
                raise DataError(name, "holds a single JSON object; expected a JSON array of row objects "
                                "or JSON Lines (one object per line)") from None
            raise DataError(name, f"is not valid JSON: {err.msg} (column {err.colno}); each line must be "
                            "one JSON object", row=lineno) from None
        if not isinstance(row, dict):
            raise DataError(name, f"expected a JSON object per line, got {type(row).__name__}", row=lineno)
        rows.append((lineno, row))
    return rows


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _read_json_array(text: str, name: str) -> Rows:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(name, f"is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not data:
        raise DataError(name, "holds an empty list: no rows")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise DataError(name, f"expected a JSON object per row, got {type(row).__name__}", row=i)
    return list(enumerate(data, 1))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def check_consistent(rows: Rows, name: str) -> None:
    """Every row has the first row's columns, each column one JSON type (nulls allowed).

    Raises:
        DataError: the first row whose columns or a column's type differ.
    """
    first_row, first = rows[0]
    types = {col: (_json_type(v), first_row) for col, v in first.items() if v is not None}
    for r, row in rows[1:]:
        if row.keys() != first.keys():
            extra, missing = sorted(row.keys() - first.keys()), sorted(first.keys() - row.keys())
            raise DataError(name, f"mixed schemas: this row has columns {sorted(row)} but row {first_row} has "
                            f"{sorted(first)} (extra {extra}, missing {missing}); every row needs the same columns",
                            row=r)
        for col, value in row.items():
            if value is None:
                continue
            kind = _json_type(value)
            seen = types.setdefault(col, (kind, r))
            if seen[0] != kind:
                raise DataError(name, f"is a {kind} here but a {seen[0]} in row {seen[1]}; a column needs one "
                                "type in every row", row=r, column=col)


def _read_table(path: Path, kind: str) -> Rows:
    import datasets

    name = str(path)
    kwargs: dict[str, Any] = {}
    if kind == "csv":
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.reader(fh)
                header, first = next(reader, []), next(reader, None)
        except (UnicodeDecodeError, csv.Error) as err:
            raise DataError(name, f"cannot be read as UTF-8 CSV: {err}") from None
        if first is None:
            raise DataError(name, "has no rows (only a header)")
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                  "keep_default_na": False, "na_values": [""]}
    try:
        with _quiet_datasets():
            table = datasets.load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True, **kwargs)
    except Exception as err:  # any reader failure is a data problem to report
        raise DataError(name, f"cannot be read as {kind}: {type(err).__name__}: {err}") from None
    rows = table.to_list()
    if not rows:
        raise DataError(name, "has no rows")
    return list(enumerate(rows, 1))


def read_hub(source: str, split: str, local_hint: Path | None = None, subset: str | None = None) -> Rows:
    """Rows of split `split` of the hub data set `source` (from the local cache when offline).

    Raises:
        DataError: the data set or split cannot be loaded (with the reason and what to check).
    """
    import datasets

    try:
        with _quiet_datasets():
            table = datasets.load_dataset(source, subset, split=split)
    except Exception as err:  # network, missing split, bad name: all reported alike
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in
                      ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hints = ["offline mode is on, so only data sets already in the local cache load"] if offline else []
        if local_hint is not None:
            hints.append(f"no local file {local_hint} exists either")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise DataError(source, f"cannot load hub data set split {split!r}: {type(err).__name__}: {err}{hint}") from None
    rows = table.to_list()
    if not rows:
        raise DataError(source, f"split {split!r} has no rows")
    return list(enumerate(rows, 1))


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No 'Generating train split' progress bars while rlft loads data."""
    from datasets.utils import logging as ds_logging

    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            ds_logging.enable_progress_bar()
