"""The `generate` command end to end on the golden tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from cola_batch.pipeline.cli import register

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "tiny-a"


def test_generate_writes_one_line_per_sample_and_stats(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)

    @app.command()
    def _noop() -> None:  # a second command keeps typer in multi-command mode
        pass

    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "the quick brown fox"}\n\n{"id": "x", "prompt": ""}\n')
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(GOLDEN),
            "--input",
            str(src),
            "--output",
            str(out),
            "--max-new-tokens",
            "5",
            "--timesteps",
            "2",
            "--samples-per-prompt",
            "2",
            "--stats-json",
            str(stats),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["id"], r["sample_index"]) for r in lines) == [
        ("0", 0),
        ("0", 1),
        ("x", 0),
        ("x", 1),
    ]
    assert {r["error_code"] for r in lines if r["id"] == "x"} == {"empty_prompt"}
    good = [r for r in lines if r["id"] == "0"]
    assert all(r["completion_tokens"] == 5 for r in good)
    assert good[0]["token_ids"] != good[1]["token_ids"] or good[0]["seed"] != good[1]["seed"]
    s = json.loads(stats.read_text())
    assert s["generated_tokens"] == 10 and s["peak_rss_bytes"] > 0 and s["tokens_per_second"] > 0


def test_generate_rejects_bad_parameters(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    app.command()(lambda: None)
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(GOLDEN),
            "--input",
            str(src),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--top-p",
            "1.5",
        ],
    )
    assert result.exit_code == 2 and "--top-p" in result.output
