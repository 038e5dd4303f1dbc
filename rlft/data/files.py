"""Read raw rows from local files and the hub, with errors that name the file and row.

Local files are streamed row by row, so memory stays bounded by the largest row, and every
problem names the file and the 1-based row:
- JSON Lines (and .json files that are not an array) are read line by line; a line longer
  than `max_row_bytes` is refused without being decoded, a line that is not UTF-8 or not
  valid JSON is reported by row, and values are kept exactly as written (a table loader would
  turn 42 into 42.0 in a column that also holds 3.5, and an `answer` would no longer match).
- A .json array is parsed whole (use JSON Lines for large data); its rows count from 1.
- CSV is read with the `csv` module: cells are strings, an empty cell is None (never "NA" or
  "null" as missing), a row with more or fewer fields than the header is an error.
- Parquet is read in record batches with pyarrow.
Hub data sets load through `datasets.load_dataset`. Rows nested deeper than `MAX_DEPTH`
levels are refused (deeper nesting only breaks later, in a recursive encoder).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlft.errors import DataError

TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
DEFAULT_MAX_ROW_BYTES = 1_000_000
MAX_DEPTH = 100
Rows = list[tuple[int, dict]]
# (1-based row, the row or what is wrong with it): row problems do not end a stream
Item = tuple[int, dict | DataError]


def read_local(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Rows:
    """(1-based row number, row) pairs of a .jsonl/.json/.parquet/.csv file.

    Raises:
        DataError: the first problem `iter_local` finds.
    """
    rows = []
    for r, item in iter_local(path, max_row_bytes):
        if isinstance(item, DataError):
            raise item
        rows.append((r, item))
    return rows


def iter_local(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[Item]:
    """Stream the rows of a local file; a row's problem is yielded in place of the row.

    Row problems: a row over `max_row_bytes` bytes, not UTF-8, not valid JSON, not an object,
    nested deeper than MAX_DEPTH, columns or a column's type that differ from earlier rows, a
    CSV row whose field count differs from the header's.

    Raises:
        DataError: a problem with the whole file: not a regular file, unsupported type, empty,
            a .json holding one object, a CSV or parquet file that cannot be read on.
    """
    suffix = check_file(path)
    if suffix == ".csv":
        return _iter_csv(path, max_row_bytes)
    if suffix == ".parquet":
        return _iter_parquet(path, max_row_bytes)
    return _consistent(_iter_json(path, max_row_bytes), str(path))


def check_file(path: Path) -> str:
    """The file's lower-case suffix, after checking it is a non-empty regular file rlft reads.

    Raises:
        DataError: a directory or special file, an unsupported type, an unreadable or empty file.
    """
    name = str(path)
    if path.is_dir():
        raise DataError(name, "is a directory; give a .jsonl, .json, .parquet or .csv file")
    if not path.exists():
        raise DataError(name, "file not found")
    if not path.is_file():
        raise DataError(name, "is not a regular file (a device, pipe or socket); give a data file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(name, f"unsupported file type {suffix or '(none)'!r}; use {', '.join(TABLE_SUFFIXES)}")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise DataError(name, f"cannot be read: {err.strerror}") from None
    if path.stat().st_size == 0:
        raise DataError(name, "file is empty")
    return suffix


def too_large(name: str, row: int, size: int | None, limit: int) -> DataError:
    """The error for a row over the size cap (`size` None: not measured, it was skipped)."""
    what = f"is {size} bytes" if size is not None else f"is longer than {limit} bytes"
    return DataError(name, f"{what}, over max_row_bytes {limit}; rows this large are refused before "
                     "tokenising (raise max_row_bytes if the row is real data)", row=row)


def row_problem(row: Any, name: str, r: int, limit: int) -> DataError | None:
    """Why a parsed row (from a .json array, parquet or the hub) is refused, or None.

    Its size is the length of its JSON encoding in UTF-8 bytes, as a JSON Lines line would be.
    """
    if not isinstance(row, dict):
        return DataError(name, f"expected a JSON object per row, got {type(row).__name__}", row=r)
    if _depth(row) > MAX_DEPTH:
        return _too_deep(name, r)
    size = len(json.dumps(row, ensure_ascii=False, default=str).encode())
    return too_large(name, r, size, limit) if size > limit else None


def _depth(value: Any) -> int:
    """Nesting depth of lists/objects (1 for a flat object), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((child, d + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _too_deep(name: str, r: int) -> DataError:
    return DataError(name, f"nests lists/objects more than {MAX_DEPTH} levels deep; flatten the row", row=r)


# --------------------------------------------------------------------------- JSON and JSON Lines


def _iter_json(path: Path, limit: int) -> Iterator[Item]:
    with open(path, "rb") as fh:
        head = fh.read(64).removeprefix(codecs.BOM_UTF8).lstrip()
        fh.seek(0)
        if path.suffix.lower() == ".json" and head.startswith(b"["):
            yield from _iter_json_array(fh.read(), str(path), limit)
        else:
            yield from _iter_lines(fh, path, limit)


def _iter_lines(fh: Any, path: Path, limit: int) -> Iterator[Item]:
    name, lineno, seen = str(path), 0, False
    while line := fh.readline(limit + 1):
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):  # more than `limit` bytes before the newline
            _skip_line(fh)
            seen = True
            yield lineno, too_large(name, lineno, None, limit)
            continue
        try:
            text = (line.removeprefix(codecs.BOM_UTF8) if lineno == 1 else line).decode("utf-8")
        except UnicodeDecodeError as err:
            seen = True
            yield lineno, DataError(name, f"is not UTF-8 text (bad byte {line[err.start]:#04x} at byte "
                                    f"{err.start + 1} of the row)", row=lineno)
            continue
        if text.strip():
            seen = True
            yield lineno, _parse_line(text, path, lineno)
    if not seen:
        raise DataError(name, "file is empty (only whitespace)")


def _skip_line(fh: Any) -> None:
    """Read past the rest of the current line in bounded chunks."""
    while chunk := fh.readline(1 << 16):
        if chunk.endswith(b"\n"):
            return


def _parse_line(text: str, path: Path, lineno: int) -> dict[str, Any] | DataError:
    name = str(path)
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        if lineno == 1 and path.suffix.lower() == ".json" and _is_one_object(path):
            raise DataError(name, "holds a single JSON object; expected a JSON array of row objects "
                            "or JSON Lines (one object per line)") from None
        return DataError(name, f"is not valid JSON: {err.msg} (column {err.colno}); each line must be "
                         "one JSON object", row=lineno)
    except RecursionError:
        return _too_deep(name, lineno)
    if not isinstance(row, dict):
        return DataError(name, f"expected a JSON object per line, got {type(row).__name__}", row=lineno)
    return _too_deep(name, lineno) if _depth(row) > MAX_DEPTH else row


def _is_one_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_bytes().decode("utf-8-sig")), dict)
    except (ValueError, RecursionError):
        return False


def _iter_json_array(raw: bytes, name: str, limit: int) -> Iterator[Item]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(name, f"is not UTF-8 text (bad byte {raw[err.start]:#04x} on line {line})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(name, f"is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise DataError(name, f"nests lists/objects too deeply to parse (more than {MAX_DEPTH} levels)") from None
    if not data:
        raise DataError(name, "holds an empty list: no rows")
    for i, row in enumerate(data, 1):
        yield i, row_problem(row, name, i, limit) or row


def json_type(value: Any) -> str:
    """The JSON type name of a value: null, boolean, number, string, list, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _consistent(items: Iterable[Item], name: str) -> Iterator[Item]:
    """Every row has the first row's columns, each column one JSON type (nulls allowed); a row
    that differs is replaced by its problem."""
    first: tuple[int, dict[str, Any]] | None = None
    types: dict[str, tuple[str, int]] = {}
    for r, row in items:
        if isinstance(row, DataError):
            yield r, row
            continue
        if first is None:
            first = (r, row)
        elif row.keys() != first[1].keys():
            keys = first[1].keys()
            extra, missing = sorted(row.keys() - keys), sorted(keys - row.keys())
            yield r, DataError(name, f"mixed schemas: this row has columns {sorted(row)} but row {first[0]} has "
                               f"{sorted(keys)} (extra {extra}, missing {missing}); every row needs the same "
                               "columns", row=r)
            continue
        yield r, _type_problem(row, r, types, name) or row


def _type_problem(row: dict[str, Any], r: int, types: dict[str, tuple[str, int]], name: str) -> DataError | None:
    for col, value in row.items():
        if value is None:
            continue
        kind = json_type(value)
        seen = types.setdefault(col, (kind, r))
        if seen[0] != kind:
            return DataError(name, f"is a {kind} here but a {seen[0]} in row {seen[1]}; a column needs one "
                             "type in every row", row=r, column=col)
    return None



# --------------------------------------------------------------------------- CSV and parquet


class _Lines:
    """Decoded lines of a binary file for `csv.reader`, refusing a record over `limit` bytes.

    `record_bytes` is reset by the reader's loop after each record; a problem ends the file.
    """

    def __init__(self, fh: Any, name: str, limit: int):
        self.fh, self.name, self.limit = fh, name, limit
        self.record_bytes, self.row, self.first = 0, 0, True

    def __iter__(self) -> Iterator[str]:
        while line := self.fh.readline(self.limit + 1):
            self.record_bytes += len(line)
            # a line cut by the read limit, or a multi-line record past the cap (+ its line end)
            if len(line) > self.limit and not line.endswith(b"\n") or self.record_bytes > self.limit + 2:
                raise too_large(self.name, self.row or 1, None, self.limit)
            if self.first:
                line, self.first = line.removeprefix(codecs.BOM_UTF8), False
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(self.name, f"is not UTF-8 text (bad byte {line[err.start]:#04x})", row=self.row) from None


def _iter_csv(path: Path, limit: int) -> Iterator[Item]:
    name = str(path)
    csv.field_size_limit(limit)
    with open(path, "rb") as fh:
        lines = _Lines(fh, name, limit)
        reader = csv.reader(lines)
        try:
            header = next(reader, None)
            if header is None or not any(header):
                raise DataError(name, "has no header row")
            dupes = sorted({c for c in header if header.count(c) > 1})
            if dupes:
                raise DataError(name, f"the header names column(s) {dupes} more than once")
            yield from _csv_rows(reader, lines, header, name)
        except csv.Error as err:
            raise DataError(name, f"cannot be read as CSV: {err}", row=lines.row) from None


def _csv_rows(reader: Any, lines: _Lines, header: list[str], name: str) -> Iterator[Item]:
    lines.row, lines.record_bytes = 1, 0
    for values in reader:
        if values:  # blank lines are skipped
            if len(values) != len(header):
                yield lines.row, DataError(name, f"has {len(values)} fields but the header has {len(header)} "
                                           f"({', '.join(header)}); quote cells that contain commas", row=lines.row)
            else:
                yield lines.row, {c: (v if v != "" else None) for c, v in zip(header, values, strict=True)}
            lines.row += 1
        lines.record_bytes = 0
    if lines.row == 1:
        raise DataError(name, "has no rows (only a header)")


def _iter_parquet(path: Path, limit: int) -> Iterator[Item]:
    import pyarrow.parquet as pq

    name, r = str(path), 0
    try:
        with pq.ParquetFile(path) as pf:
            for batch in pf.iter_batches(batch_size=64):
                for row in batch.to_pylist():
                    r += 1
                    yield r, row_problem(row, name, r, limit) or row
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(name, f"cannot be read as parquet: {type(err).__name__}: {err}", row=r + 1 if r else None) from None
    if r == 0:
        raise DataError(name, "has no rows")


# --------------------------------------------------------------------------- the hub


def read_hub(
    source: str, split: str, local_hint: Path | None = None, subset: str | None = None,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> Rows:
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
    name = f"{source}[{split}]"
    for r, row in enumerate(rows, 1):
        problem = row_problem(row, name, r, max_row_bytes)
        if problem is not None:
            raise problem
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
