"""`cola-batch eval`: run the 8-task benchmark through the queue, or re-score existing outputs.

Contract: `register(app)` adds one command, `eval`, to a typer app.

* `eval --score-only DIR [--output OUT]` scores the `<task>.jsonl` generation files in DIR (or in
  every `tasks_*` folder below it, one column each), prints the accuracy table (Markdown) and,
  with `--output`, writes `accuracy_summary.csv`, `accuracy_summary.md` and the per-task
  correct/wrong detail files there. DIR is only read.
* `eval --model M [--tasks a,b] [--max-samples N] [--output OUT] [--data-dir D]` builds the prompt
  rows from D's task files, generates them with `cola_batch.eval.runner.run_generation`
  (imported only on this path), writes `<task>.jsonl` into OUT and scores them as above.
"""

from __future__ import annotations

from pathlib import Path

import typer

from cola_batch.eval.report import (
    CSV_NAME,
    MARKDOWN_NAME,
    Summary,
    render_markdown,
    score_columns,
    write_csv,
    write_details,
    write_markdown,
)
from cola_batch.eval.scoring import TASKS
from cola_batch.eval.tasks import (
    DEFAULT_MAX_SAMPLES,
    TaskFileError,
    column_name,
    discover_columns,
    load_prompt_rows,
    write_jsonl,
)

DEFAULT_DATA_DIR = Path("../shared/data/tasks")
DEFAULT_OUTPUT = Path("eval_output/tasks_default")


def parse_tasks(value: str | None) -> list[str]:
    """Comma-separated task names (all eight when empty), validated, duplicates dropped."""
    if not value:
        return list(TASKS)
    tasks: list[str] = []
    for name in (part.strip() for part in value.split(",")):
        if not name:
            continue
        if name not in TASKS:
            raise typer.BadParameter(f"unknown task {name!r}; known: {', '.join(TASKS)}")
        if name not in tasks:
            tasks.append(name)
    return tasks


def _emit(summary: Summary, output: Path | None) -> None:
    for message in summary.messages:
        typer.echo(message, err=True)
    typer.echo(render_markdown(summary), nl=False)
    if output is not None:
        write_csv(summary, output / CSV_NAME)
        write_markdown(summary, output / MARKDOWN_NAME)
        write_details(summary, output)
        typer.echo(f"wrote {output / CSV_NAME} and {output / MARKDOWN_NAME}", err=True)


def eval_command(
    score_only: Path | None = typer.Option(
        None, "--score-only", help="Re-score a folder of existing <task>.jsonl generation files."
    ),
    model: str | None = typer.Option(None, "--model", help="Model to generate with."),
    tasks: str | None = typer.Option(
        None, "--tasks", help=f"Comma-separated subset of: {','.join(TASKS)} (default: all)."
    ),
    max_samples: int = typer.Option(
        DEFAULT_MAX_SAMPLES, "--max-samples", help="First N rows per task; 0 = all."
    ),
    output: Path | None = typer.Option(
        None, "--output", help="Folder for generations, accuracy_summary.csv/.md and details."
    ),
    data_dir: Path = typer.Option(
        DEFAULT_DATA_DIR, "--data-dir", help="Folder of <task>.jsonl benchmark input files."
    ),
) -> None:
    """Run the 8-task benchmark (spec/eval.md) or re-score existing generations."""
    selected = parse_tasks(tasks)
    if score_only is not None:
        if not score_only.is_dir():
            raise typer.BadParameter(f"not a folder: {score_only}", param_hint="--score-only")
        columns = discover_columns(score_only)
        if not columns:
            typer.echo(f"no <task>.jsonl generation files under {score_only}", err=True)
            raise typer.Exit(1)
        _emit(score_columns(columns, tuple(selected) if tasks else TASKS), output)
        return
    if not model:
        raise typer.BadParameter("give --model, or --score-only DIR", param_hint="--model")
    out_dir = output or DEFAULT_OUTPUT
    try:
        rows = load_prompt_rows(data_dir, selected, max_samples)
    except TaskFileError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    from cola_batch.eval.runner import run_generation  # the queue is needed only here

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = run_generation(rows, model, out_dir)
    except NotImplementedError as exc:
        typer.echo(f"generation is not available yet: {exc}", err=True)
        raise typer.Exit(1) from exc
    for task in selected:
        write_jsonl(out_dir / f"{task}.jsonl", results.get(task, []))
    _emit(score_columns([(column_name(out_dir), out_dir)], tuple(selected)), out_dir)


def register(app: typer.Typer) -> None:
    """Add the `eval` command to `app`."""
    app.command("eval")(eval_command)
