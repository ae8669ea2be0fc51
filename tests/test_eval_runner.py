"""`cola-batch eval --model M` runs the benchmark prompts as a normal batch job through real
Celery workers, writes per-task generation files in the published format and scores them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner
from workers import WorkerGroup, make_tiny_model

from cola_batch.cli import app

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def test_eval_generates_through_the_queue_and_scores(
    tiny_model: Path, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLA_BATCH_REDIS_URL", redis_url)
    out = tmp_path / "eval"
    args = [
        "eval", "--model", str(tiny_model), "--tasks", "lambada,mmlu", "--max-samples", "3",
        "--data-dir", str(SHARED_DIR / "data" / "tasks"), "--output", str(out),
    ]  # fmt: skip
    with WorkerGroup(tiny_model, redis_url, tmp_path) as group:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output + group.log_text()

    for task in ("lambada", "mmlu"):
        records = [json.loads(line) for line in (out / f"{task}.jsonl").read_text().splitlines()]
        assert len(records) == 3
        assert all(isinstance(r["generate"], str) and r["generate"] for r in records)
        assert all(set(r) >= {"id", "prompt", "generate", "ground_truth"} for r in records)
    assert all(
        "choices" in json.loads(line) for line in (out / "mmlu.jsonl").read_text().splitlines()
    )
    assert "lambada" in (out / "accuracy_summary.md").read_text()
    summary = (out / "accuracy_summary.csv").read_text()
    assert "tasks_average" in summary
    job = json.loads((out / "eval_job.json").read_text())
    assert (Path(job["job_uri"]) / "_SUCCESS").exists()
