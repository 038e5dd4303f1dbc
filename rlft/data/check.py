"""Read a recipe's local data files before any model loads: `rlft validate`, and the start of
`rlft run` / `rlft stage` (RELIABILITY.md, bad input; docs/data.md).

Every local data file a stage names (`data:`, a sample stage's `mix:`, a local source's
`eval_split` file) is streamed once with the reader and the row checks the stages use
(`rlft.data.files.iter_local`, `rlft.data.rows.RowChecker`, `usage_problem`), so memory stays
bounded by the largest row and a file that passes here loads in its stage. Every problem is
reported (the first `MAX_SHOWN` per file, then a count) with the file, 1-based row and column.
Not read here: built-in `tiny:` tasks (generated), hub data sets (read when their stage runs)
and earlier stages' outputs (written by rlft). Token lengths need the model's tokenizer: they
are checked when a stage tokenises its rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlft.data.files import iter_local
from rlft.data.rows import RowChecker, Usage, heldout_count, local_path, usage_problem
from rlft.errors import DataError, UserInputError

MAX_SHOWN = 20
# what a stage does with its `data:` rows; distill's depends on its mode
USAGE_BY_KIND: dict[str, Usage] = {"sft": "reply", "grpo": "prompt", "ppo": "prompt", "sample": "prompt",
                                   "eval": "prompt"}


@dataclass(frozen=True)
class DataSource:
    """One data entry of a stage: its recipe key, spec, what the stage needs of its rows, and
    the absolute path of the local file (None for tiny:, hub and stage-output sources)."""

    key: str
    spec: Any
    usage: Usage
    path: Path | None
    note: str = ""
    hint: str = ""  # added to a row that does not suit the stage: what the stage could do instead

    def shown(self) -> str:
        """The source as logged: the file (and where its symlinks lead) or the source's kind."""
        if self.path is None:
            return f"{self.spec.source} ({self.note})"
        resolved = self.path.resolve()
        return str(self.path) if resolved == self.path else f"{self.path} -> {resolved}"


@dataclass(frozen=True)
class SourceCheck:
    """What reading one data source found."""

    source: DataSource
    rows: int
    problems: tuple[str, ...]


class DataProblems(UserInputError):
    """Every problem found in a recipe's data files, one per line."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__(lines[0] if len(lines) == 1 else f"{len(lines)} data problems:\n" + "\n".join(lines))


def data_sources(loaded: Any, stages: Iterable[str] | None = None) -> Iterator[DataSource]:
    """Each data entry of the given stages (default: all), with its local file resolved.

    Raises:
        DataError: a local file that is missing or no data file (the recipe check names it first).
    """
    recipe = loaded.recipe
    for name in stages if stages is not None else recipe.stages:
        spec = recipe.stages[name]
        usage = _usage(spec)
        entries = [(f"data.{i}", d) for i, d in enumerate(spec.data)]
        entries += [(f"mix.{i}", d) for i, d in enumerate(getattr(spec, "mix", []))]
        for field, d in entries:
            key = f"stages.{name}.{field}"
            needs: Usage = "chat" if field.startswith("mix.") else usage
            hint = LOGITS_HINT if spec.kind == "distill" and spec.mode == "logits" else ""
            yield _source(key, d, needs, loaded.base_dir, set(recipe.stages), hint)
            if d.eval_split and not d.source.startswith("tiny:") and d.source not in recipe.stages:
                path = local_path(d.source, loaded.base_dir)
                if path is not None:  # a local source's eval_split is a file; a hub one's a split name
                    split = local_path(d.eval_split, loaded.base_dir, must_exist=True)
                    yield DataSource(f"{key}.eval_split", d, needs, split, hint=hint)


LOGITS_HINT = ("distill mode logits scores the data's own completions: give prompt + completion or messages rows, "
               "or use `mode: on_policy` (the student writes the completions) or `mode: sequence` (the teacher does)")


def _usage(spec: Any) -> Usage:
    if spec.kind == "distill":
        return "reply" if spec.mode == "logits" else "prompt"
    return USAGE_BY_KIND[spec.kind]


def _source(key: str, d: Any, usage: Usage, base_dir: Path, stages: set[str], hint: str) -> DataSource:
    if d.source in stages:
        return DataSource(key, d, usage, None, f"output of stage '{d.source}': not read until this stage runs")
    if d.source.startswith("tiny:"):
        return DataSource(key, d, usage, None, "built-in task: generated, nothing to read")
    path = local_path(d.source, base_dir)
    return DataSource(key, d, usage, path, "" if path else "hub data set: not read until this stage runs", hint)


def check_data(loaded: Any, stages: Iterable[str] | None = None) -> list[SourceCheck]:
    """Read every local data file of the given stages (default: all); a file used twice with
    the same settings is read once.

    Returns:
        One SourceCheck per data entry (entries that are not local files have no rows).
    """
    out, seen = [], {}
    for source in data_sources(loaded, stages):
        if source.path is None:
            out.append(SourceCheck(source, 0, ()))
            continue
        ident = (str(source.path), source.usage, source.spec.model_dump_json(
            include={"format", "columns", "max_row_bytes", "eval_split", "eval_size", "num_examples"}))
        if ident not in seen:
            seen[ident] = _read(source)
            out.append(seen[ident])
        else:
            out.append(SourceCheck(source, seen[ident].rows, ()))  # its problems are listed once
    return out


def raise_problems(checks: list[SourceCheck]) -> None:
    """Raise DataProblems (exit 2) listing every problem of `checks`; nothing when there is none."""
    lines = [line for check in checks for line in check.problems]
    if lines:
        raise DataProblems(lines)


def _read(source: DataSource) -> SourceCheck:
    """Stream one local file; every problem as a line `file:row N  column 'c': what  [key]`."""
    assert source.path is not None
    spec, name = source.spec, str(source.path)
    check, rows, problems, hidden = RowChecker(spec, name), 0, [], 0
    try:
        for r, item in iter_local(source.path, spec.max_row_bytes):
            problem = item if isinstance(item, DataError) else _row_problem(check, r, item, source)
            if problem is None:
                rows += 1
                continue
            if len(problems) < MAX_SHOWN:
                problems.append(f"{problem}  [{source.key}]")
            else:
                hidden += 1
            if problem.row is None:
                break  # the format of the whole file: every row would repeat it
    except DataError as err:
        problems.append(f"{err}  [{source.key}]")
    if hidden:
        problems.append(f"{name}: {hidden} more problem(s) not shown  [{source.key}]")
    if rows and not problems and spec.eval_split is None:
        try:
            heldout_count(min(rows, spec.num_examples or rows), spec.eval_size, name)
        except DataError as err:
            problems.append(f"{err}  [{source.key}]")
    return SourceCheck(source, rows, tuple(problems))


def _row_problem(check: RowChecker, r: int, row: dict[str, Any], source: DataSource) -> DataError | None:
    try:
        canonical = check(r, row)
    except DataError as err:
        return err
    problem = usage_problem(canonical, source.usage, (str(source.path), r))
    if problem is None or not source.hint:
        return problem
    return DataError(problem.file, f"{problem.message}; {source.hint}", problem.row, problem.column)


def summary(check: SourceCheck) -> str:
    """One line for `rlft validate`: the key, the source and what was found."""
    source = check.source
    if source.path is None:
        return f"{source.key}: {source.shown()}"
    found = f"{len(check.problems)} problem line(s)" if check.problems else f"{check.rows} rows ok"
    return f"{source.key}: {source.shown()}: {found}"
