"""Benchmark files: task inputs, prompt rows, per-task generation files and their discovery.

Contract:
* Task input files (`shared/data/tasks/<task>.jsonl` format, eval.md §1–§2): one JSON object per
  line, blank lines skipped, a malformed line is an error (`TaskFileError`, with line number).
* `build_prompt_rows` turns input records into generation rows `{task, id, prompt,
  ground_truth[, choices]}` (the record layout of inference.md §6 minus `generate`).
* Generation files (`<task>.jsonl`, fields of `shared/data/published/*.jsonl`) are read the way
  the reference scorer reads them: blank lines skipped, lines that do not parse as a JSON object
  dropped (and counted in `GenerationFile.dropped`). Files are only read, never rewritten.
* Discovery (eval.md §6.1): a folder holding task files is one column; otherwise every folder
  below it whose name starts with `tasks_` and holds at least one task file is a column.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cola_batch.eval.scoring import TASKS
from cola_batch.eval.templates import build_prompt

DEFAULT_MAX_SAMPLES = 1000
COLUMN_PREFIX = "tasks_"


class TaskFileError(ValueError):
    """A task input file that cannot be used (unreadable line, non-object row)."""


def read_task_file(path: Path, max_samples: int | None = DEFAULT_MAX_SAMPLES) -> list[dict]:
    """Records of a task input file, first `max_samples` of them (None, 0 or negative = all)."""
    rows: list[dict] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskFileError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise TaskFileError(f"{path}:{lineno}: expected a JSON object")
            rows.append(row)
    if max_samples is not None and max_samples > 0:
        rows = rows[:max_samples]
    return rows


def build_prompt_rows(task: str, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Generation rows for one task: templated prompt plus what the output record copies.

    `ground_truth` is the input's `answer` if that key exists, else `ground_truth`, else ""
    (the generation CLI's priority, inference.md §6); `choices` only when present and non-empty.
    """
    rows: list[dict[str, Any]] = []
    for rec in records:
        truth = rec["answer"] if "answer" in rec else rec.get("ground_truth", "")
        row: dict[str, Any] = {
            "task": task,
            "id": rec.get("id"),
            "prompt": build_prompt(task, rec),
            "ground_truth": truth,
        }
        if rec.get("choices"):
            row["choices"] = rec["choices"]
        rows.append(row)
    return rows


def load_prompt_rows(
    tasks_dir: Path, tasks: Sequence[str], max_samples: int | None = DEFAULT_MAX_SAMPLES
) -> list[dict[str, Any]]:
    """Prompt rows for each task in order, read from `<tasks_dir>/<task>.jsonl`."""
    rows: list[dict[str, Any]] = []
    for task in tasks:
        path = Path(tasks_dir) / f"{task}.jsonl"
        if not path.is_file():
            raise TaskFileError(f"task file not found: {path}")
        rows.extend(build_prompt_rows(task, read_task_file(path, max_samples)))
    return rows


@dataclass
class GenerationFile:
    """Records of one `<task>.jsonl` generation file and how many lines were dropped."""

    task: str
    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0


def read_generation_file(path: Path, task: str | None = None) -> GenerationFile:
    """Read a generation file; the task is the file stem unless given."""
    path = Path(path)
    result = GenerationFile(task or path.stem, path)
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                result.dropped += 1
                continue
            if isinstance(row, dict):
                result.records.append(row)
            else:
                result.dropped += 1
    return result


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line, UTF-8, non-ASCII unescaped (the reference's output style)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _has_task_file(folder: Path) -> bool:
    return any((folder / f"{task}.jsonl").is_file() for task in TASKS)


def column_name(folder: Path) -> str:
    """Folder name minus the `tasks_` prefix (the full name if nothing would remain)."""
    name = folder.name
    stripped = name[len(COLUMN_PREFIX) :] if name.startswith(COLUMN_PREFIX) else name
    return stripped or name


def discover_columns(root: Path) -> list[tuple[str, Path]]:
    """(column name, folder) pairs to score under `root`, sorted by path, names de-duplicated."""
    root = Path(root)
    if _has_task_file(root):
        folders = [root]
    else:
        folders = sorted(
            p
            for p in [root, *root.rglob("*")]
            if p.is_dir() and p.name.startswith(COLUMN_PREFIX) and _has_task_file(p)
        )
    columns: list[tuple[str, Path]] = []
    seen: dict[str, int] = {}
    for folder in folders:
        base = column_name(folder)
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        columns.append((name, folder))
    return columns
