"""The demo's ingredients: a tiny random checkpoint, a file of sample prompts, a results preview.

Contract: `prepare_demo(base)` creates `base/model` (preset `tiny`, seed 0, reused when already
there) and `base/prompts.jsonl` (`rows` prompts with ids); `show_results` prints where the
outputs are and a few rows. The model has random weights: the text is gibberish by design; the
point is the path every row takes.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

SAMPLE_PROMPTS = [
    "The quick brown fox",
    "Permission is hereby granted, free of charge, to any person",
    "In the morning the small village was quiet,",
    "Write a short poem about the sea:",
    "Question: What is the capital of France? Answer:",
    "The software is provided as is, without warranty of any kind",
    "Once upon a time there was a",
    "Summarise the following text in one sentence:",
]


def prepare_demo(base: Path, *, rows: int = 24) -> tuple[Path, Path]:
    from cola_batch.model.checkpoint import save_model
    from cola_batch.model.presets import build_preset

    base.mkdir(parents=True, exist_ok=True)
    model_dir = base / "model"
    if not (model_dir / "cola_dit" / "config.json").exists():
        save_model(build_preset("tiny", seed=0), model_dir)
    prompts = base / "prompts.jsonl"
    with prompts.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            text = SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)]
            handle.write(json.dumps({"id": f"demo-{i:04d}", "prompt": text}) + "\n")
    return model_dir, prompts


def show_results(output: Path, job_id: str, *, seconds: float, limit: int = 5) -> None:
    from cola_batch import keys
    from cola_batch.jobs import read_results

    job = keys.job_uri(str(output), job_id)
    table = read_results(job)
    console = Console()
    preview = Table("id", "sample", "finish", "tokens", "text", title=f"first {limit} rows")
    for row in table.slice(0, limit).to_pylist():
        text = (row["text"] or row["error_message"] or "")[:60]
        preview.add_row(row["id"], str(row["sample_index"]), str(row["finish_reason"]),
                        str(row["completion_tokens"]), repr(text))  # fmt: skip
    console.print(preview)
    console.print(f"{table.num_rows} result rows in {seconds:.1f} s")
    console.print(f"outputs:  {job}/outputs/*.parquet")
    console.print(f"manifest: {job}/manifest.json")
    console.print(f"export:   COLA_BATCH_REDIS_URL=... cola-batch results {job_id} --to out.jsonl "
                  "(or read the Parquet files directly with pandas/polars/DuckDB)")  # fmt: skip
