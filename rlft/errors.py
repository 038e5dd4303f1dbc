"""Errors a user can act on, with the exit code the CLI maps each to.

Every error names where the problem is (recipe file:line:col and dotted key, or data
file and 1-based row and column) and what to do about it. The CLI prints `str(err)`
without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class RlftError(Exception):
    """Base of the errors rlft reports to the user without a traceback."""

    exit_code = 1


class UserInputError(RlftError):
    """Bad recipe, data or command-line input: nothing was trained."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One problem in a recipe: where it is and what is wrong."""

    file: str
    line: int | None
    col: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.col is not None:
                where += f":{self.col}"
        return f"{where}  {self.path}: {self.message}" if self.path else f"{where}  {self.message}"


class RecipeError(UserInputError):
    """All the problems found in one recipe, reported at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class DataError(UserInputError):
    """A data file problem, named by file, 1-based row and column."""

    def __init__(self, file: str, message: str, row: int | None = None, column: str | None = None):
        self.file, self.message, self.row, self.column = file, message, row, column
        where = file + (f":row {row}" if row is not None else "")
        col = f"  column '{column}'" if column else ""
        super().__init__(f"{where}{col}: {message}")


class CheckpointError(RlftError):
    """No usable checkpoint, a checkpoint that fails verification, or changed inputs on resume."""

    exit_code = 3


class WriteError(RlftError):
    """An output could not be written (disk full, quota, file size limit, I/O error).

    Exit 3 like a checkpoint that could not be saved: what was committed before (finished
    stages, checkpoints) is intact, and the same command continues once there is space.
    """

    exit_code = 3


class TrainingError(RlftError):
    """Training stopped for a reason the user must look at (NaN streak, reward failures, a failed gate)."""

    exit_code = 4
