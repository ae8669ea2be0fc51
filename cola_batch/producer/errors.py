"""Input errors: what is wrong, where (file, line or row, column), and what to do about it.

Contract: every problem found in user input is a `Rejection` (one row) or an `InputError`
(the submission stops). `InputError`'s message always names the file, the line (JSONL, 1-based)
or row (Parquet, 0-based index) when there is one, the column/field when there is one, the
problem, and a hint. Under `on_bad_rows="skip"` row rejections are streamed to a spool file
(`RejectedRows`), never accumulated in memory, and uploaded as the job's rejected-rows file.
File-level problems (unreadable, empty, missing column, wrong column type) always stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass

SKIP_HINT = "or submit with --on-bad-rows skip to leave such rows out"


def describe_id(value: object, limit: int = 60) -> str:
    """A printable, bounded rendering of a (possibly hostile) row id."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Rejection:
    """One refused input row."""

    file: str
    code: str
    reason: str
    hint: str = ""
    line: int | None = None  # JSONL, 1-based
    row: int | None = None  # Parquet, 0-based row index within the file
    column: str | None = None
    row_id: str | None = None

    def where(self) -> str:
        parts = [self.file]
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.column is not None:
            parts.append(f"column {self.column!r}")
        return ", ".join(parts)

    def message(self) -> str:
        text = f"{self.where()}: {self.reason}"
        return f"{text}. {self.hint}" if self.hint else text

    def to_error(self) -> InputError:
        return InputError(
            self.reason,
            file=self.file,
            code=self.code,
            hint=self.hint,
            line=self.line,
            row=self.row,
            column=self.column,
        )

    def record(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "row": self.row,
            "column": self.column,
            "id": self.row_id,
            "code": self.code,
            "message": self.reason,
        }


class InputError(ValueError):
    """The inputs cannot be submitted as they are. `str()` is the user-facing message."""

    def __init__(
        self,
        reason: str,
        *,
        file: str,
        code: str,
        hint: str = "",
        line: int | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.reason, self.file, self.code, self.hint = reason, file, code, hint
        self.line, self.row, self.column = line, row, column
        rejection = Rejection(file, code, reason, hint, line, row, column)
        super().__init__(rejection.message())


class RejectedRows:
    """A spool of rejections on local disk (bounded memory), uploaded once at the end."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="cola-rejected-", suffix=".jsonl")
        self._handle = os.fdopen(fd, "w", encoding="utf-8")
        self.count = 0

    def add(self, rejection: Rejection) -> None:
        self._handle.write(json.dumps(rejection.record(), ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> str:
        """Flush and return the spool's path."""
        if not self._handle.closed:
            self._handle.close()
        return self.path

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
