"""`cola-batch eval` command: --score-only over folders of generation files, and the run path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cola_batch.eval.cli import register
from cola_batch.eval.scoring import TASKS
from cola_batch.eval.tasks import discover_columns

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PUBLISHED = SHARED / "data" / "published"


@pytest.fixture()
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A callback keeps `eval` a named sub-command, as in the real multi-command app."""

    register(app)
    return app


def _link_published(folder: Path, tasks: tuple[str, ...] = TASKS) -> Path:
    folder.mkdir(parents=True)
    for task in tasks:
        (folder / f"{task}.jsonl").symlink_to(PUBLISHED / f"{task}.jsonl")
    return folder


def test_score_only_prints_the_table_and_writes_the_published_csv(
    app: typer.Typer, tmp_path: Path
) -> None:
    source = _link_published(tmp_path / "tasks_default")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--score-only", str(source), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "| lambada | 50.80 |" in result.stdout
    assert "| **tasks_average** | 26.75 |" in result.stdout
    assert (out / "accuracy_summary.csv").read_bytes() == (
        PUBLISHED / "accuracy_summary.csv"
    ).read_bytes()
    assert "| story_cloze | 30.77 |" in (out / "accuracy_summary.md").read_text()
    wrong = (out / "mmlu_wrong.jsonl").read_text(encoding="utf-8").splitlines()
    right = (out / "mmlu_correct.jsonl").read_text(encoding="utf-8").splitlines()
    assert (len(right), len(wrong)) == (193, 807)
    assert "extracted_gt_choice" in json.loads(right[0])


def test_score_only_without_output_only_prints(app: typer.Typer, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "--score-only", str(PUBLISHED)])
    assert result.exit_code == 0, result.output
    assert "| task | published |" in result.stdout
    assert "| siqa | 28.90 |" in result.stdout


def test_tasks_columns_missing_files_and_bad_lines(app: typer.Typer, tmp_path: Path) -> None:
    _link_published(tmp_path / "runs" / "tasks_a", ("lambada", "squad"))
    second = tmp_path / "runs" / "nested" / "tasks_b"
    second.mkdir(parents=True)
    lines = (PUBLISHED / "lambada.jsonl").read_text(encoding="utf-8").splitlines()
    (second / "lambada.jsonl").write_text("\n".join(lines[:10] + ["{broken", ""]) + "\n")
    assert [name for name, _ in discover_columns(tmp_path / "runs")] == ["b", "a"]

    out = tmp_path / "out"
    args = ["eval", "--score-only", str(tmp_path / "runs"), "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    csv_rows = (out / "accuracy_summary.csv").read_text().splitlines()
    assert csv_rows[0] == "task,b,a"
    assert csv_rows[TASKS.index("squad") + 1] == "squad,,30.90"
    assert csv_rows[TASKS.index("mmlu") + 1] == "mmlu,,"
    assert "dropped 1 bad line" in result.stderr
    assert (out / "a" / "squad_correct.jsonl").is_file()  # one detail folder per column


def test_duplicate_column_names_are_numbered(tmp_path: Path) -> None:
    _link_published(tmp_path / "x" / "tasks_run", ("squad",))
    _link_published(tmp_path / "y" / "tasks_run", ("squad",))
    assert [name for name, _ in discover_columns(tmp_path)] == ["run", "run_2"]


def test_score_only_on_a_folder_without_task_files_fails(app: typer.Typer, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "--score-only", str(tmp_path)])
    assert result.exit_code == 1
    assert "no <task>.jsonl" in result.stderr


def test_generation_path_writes_generations_and_scores_them(
    app: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run path with a stand-in generator that answers with the ground truth."""
    import cola_batch.eval.runner as runner

    seen: dict = {}

    def answer_correctly(rows: list[dict], model: str, output_dir: Path) -> dict:
        seen.update(rows=rows, model=model, output_dir=output_dir)
        out: dict[str, list[dict]] = {}
        for row in rows:
            record = {k: v for k, v in row.items() if k != "task"}
            record["generate"] = " " + str(row["ground_truth"]) + "\nnext question"
            out.setdefault(row["task"], []).append(record)
        return out

    monkeypatch.setattr(runner, "run_generation", answer_correctly)
    out = tmp_path / "tasks_tiny"
    args = [
        "eval",
        "--model",
        "tiny",
        "--tasks",
        "squad,mmlu",
        "--max-samples",
        "3",
        "--data-dir",
        str(SHARED / "data" / "tasks"),
        "--output",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["model"] == "tiny" and seen["output_dir"] == out
    assert [(r["task"], r["id"]) for r in seen["rows"]][:4] == [
        ("squad", "56be4db0acb8001400a502ec"),
        ("squad", "56be4db0acb8001400a502ed"),
        ("squad", "56be4db0acb8001400a502ee"),
        ("mmlu", 0),
    ]
    assert seen["rows"][3]["prompt"].endswith("(D) 6\nAnswer:")
    written = (out / "mmlu.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(written) == 3 and json.loads(written[0])["generate"] == " 4\nnext question"
    assert (out / "accuracy_summary.csv").read_text().splitlines() == [
        "task,tiny",
        "squad,100.00",
        "mmlu,100.00",
        "tasks_average,100.00",
    ]


def test_bad_arguments(app: typer.Typer) -> None:
    assert CliRunner().invoke(app, ["eval"]).exit_code == 2  # neither --model nor --score-only
    unknown = CliRunner().invoke(app, ["eval", "--model", "m", "--tasks", "mmlu,piqa"])
    assert unknown.exit_code == 2 and "piqa" in unknown.output
