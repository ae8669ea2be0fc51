"""Scoring folders of generation files and writing the accuracy table (eval.md §6.1, §6.8, §6.9).

Contract:
* `score_columns` reads each column's `<task>.jsonl` files (read-only) and scores them; a
  missing file gives an empty cell and a message. Remainder buckets are borrowed by id from the
  first column that carries `prompt_len_mod_patch_size` for a task when another column lacks it.
* `table_rows` is the CSV body: one row per task, its `<task>_mod<r>` rows, then `tasks_average`
  (mean of the unrounded available task accuracies). `write_csv` / `render_markdown` /
  `write_details` only format and write; all numbers come from `cola_batch.eval.scoring`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cola_batch.eval.scoring import (
    MOD_FIELD,
    TASKS,
    TaskScore,
    average_accuracy,
    remainder_map,
    score_task,
)
from cola_batch.eval.tasks import GenerationFile, read_generation_file, write_jsonl

AVERAGE_ROW = "tasks_average"
CSV_NAME = "accuracy_summary.csv"
MARKDOWN_NAME = "accuracy_summary.md"


@dataclass
class Summary:
    """Per-column, per-task scores plus everything worth telling the user."""

    columns: list[str]
    tasks: tuple[str, ...] = TASKS
    scores: dict[str, dict[str, TaskScore]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def score_columns(columns: Sequence[tuple[str, Path]], tasks: Sequence[str] = TASKS) -> Summary:
    """Score `<folder>/<task>.jsonl` for every (column, folder) pair and every task."""
    summary = Summary([name for name, _ in columns], tuple(tasks))
    files: dict[str, dict[str, GenerationFile]] = {name: {} for name, _ in columns}
    for name, folder in columns:
        for task in tasks:
            path = Path(folder) / f"{task}.jsonl"
            if not path.is_file():
                summary.messages.append(f"[{name}] missing {path}")
                continue
            gen = read_generation_file(path, task)
            if gen.dropped:
                summary.messages.append(f"[{name}] {path}: dropped {gen.dropped} bad line(s)")
            files[name][task] = gen
    for task in tasks:
        borrowed = _borrowed_remainders(task, files)
        for name, _ in columns:
            gen = files[name].get(task)
            if gen is None:
                continue
            score = score_task(task, gen.records, bucket_of=borrowed)
            summary.messages.extend(f"[{name}] {err}" for err in score.errors)
            summary.scores.setdefault(name, {})[task] = score
    return summary


def _borrowed_remainders(task: str, files: dict[str, dict[str, GenerationFile]]) -> dict | None:
    for by_task in files.values():
        gen = by_task.get(task)
        if gen is not None and any(MOD_FIELD in r for r in gen.records):
            return remainder_map(gen.records)
    return None


def table_rows(summary: Summary) -> list[tuple[str, list[float | None]]]:
    """(row label, accuracy per column) in CSV order; None marks an empty cell."""
    rows: list[tuple[str, list[float | None]]] = []
    for task in summary.tasks:
        cells = [_score(summary, col, task) for col in summary.columns]
        rows.append((task, [s.accuracy if s else None for s in cells]))
        remainders = sorted({r for s in cells if s for r in s.buckets})
        for r in remainders:
            by_r = [s.bucket_accuracy().get(r) if s else None for s in cells]
            rows.append((f"{task}_mod{r}", by_r))
    averages = [
        average_accuracy(_score(summary, col, t) for t in summary.tasks) for col in summary.columns
    ]
    rows.append((AVERAGE_ROW, averages))
    return rows


def _score(summary: Summary, column: str, task: str) -> TaskScore | None:
    return summary.scores.get(column, {}).get(task)


def format_cell(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def write_csv(summary: Summary, path: Path) -> None:
    """`task,<column…>` header, two-decimal accuracies, empty cells for missing tasks.

    Rows end in CRLF (the csv module's default, as in the published summary), so a column named
    `default` over the published generations is byte-identical to the published file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task", *summary.columns])
        for label, values in table_rows(summary):
            writer.writerow([label, *(format_cell(v) for v in values)])


def render_markdown(summary: Summary) -> str:
    """The same table as the CSV, as a GitHub Markdown table ("—" for empty cells)."""
    lines = [
        "| task | " + " | ".join(summary.columns) + " |",
        "|---|" + "---:|" * len(summary.columns),
    ]
    for label, values in table_rows(summary):
        cells = [format_cell(v) or "—" for v in values]
        name = f"**{label}**" if label == AVERAGE_ROW else label
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(summary: Summary, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(summary), encoding="utf-8")


def _detail(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "correct"} for r in records]


def write_details(summary: Summary, out_dir: Path) -> None:
    """`<task>_correct.jsonl` / `_wrong.jsonl` (and `_mod<r>_…` splits) per column.

    One column writes straight into `out_dir`; several columns get one sub-folder each.
    """
    for column in summary.columns:
        folder = Path(out_dir) if len(summary.columns) == 1 else Path(out_dir) / column
        for task, score in summary.scores.get(column, {}).items():
            write_jsonl(folder / f"{task}_correct.jsonl", _detail(score.correct))
            write_jsonl(folder / f"{task}_wrong.jsonl", _detail(score.wrong))
            for r, members in sorted(score.bucket_records.items()):
                right = [x for x in members if x["correct"]]
                wrong = [x for x in members if not x["correct"]]
                write_jsonl(folder / f"{task}_mod{r}_correct.jsonl", _detail(right))
                write_jsonl(folder / f"{task}_mod{r}_wrong.jsonl", _detail(wrong))
