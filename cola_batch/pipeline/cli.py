"""`cola-batch generate`: run the Engine in-process over a JSONL or Parquet file of prompts.

Contract: `register(app)` adds the `generate` command to a typer app. Input rows come from
`--prompt-column` (default `prompt`) and `--id-column` (default `id`; rows without one get their
0-based row index). Every sample of every row writes one JSON line to `--output`
(`id`, `sample_index`, `text`, `token_ids`, `finish_reason`, `prompt_tokens`,
`completion_tokens`, `seed`, `error_code`, `error_message`), in completion order. A rich progress
bar shows rows, tokens/s and ETA. `--stats-json` receives generated tokens, generation seconds
(model load excluded), tokens/s and peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer

from cola_batch.cli_options import (
    GuidanceScale,
    MaxNewTokens,
    RepetitionPenalty,
    SamplesPerPrompt,
    Seed,
    Temperature,
    Timesteps,
    TopK,
    TopP,
    sampling_from_flags,
    user_errors,
)
from cola_batch.schemas.sampling import SamplingParams

D = SamplingParams()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def read_rows(path: Path, prompt_column: str, id_column: str) -> list[tuple[str, str]]:
    """(id, prompt) per input row; a missing id becomes the row index."""
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        records: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    else:
        records = [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    rows = []
    for i, rec in enumerate(records):
        if prompt_column not in rec:
            raise typer.BadParameter(f"row {i} has no column {prompt_column!r}")
        rid = rec.get(id_column)
        rows.append((str(i) if rid is None else str(rid), str(rec[prompt_column] or "")))
    return rows


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        model: Path = typer.Option(
            ..., "--model", help="folder with cola_vae/, cola_dit/, tokenizer.json"
        ),
        input: Path = typer.Option(
            ..., "--input", exists=True, dir_okay=False, help="JSONL or Parquet file of prompts"
        ),
        output: Path = typer.Option(..., "--output", help="JSONL file of results"),
        max_new_tokens: MaxNewTokens = D.max_new_tokens,
        temperature: Temperature = D.temperature,
        top_k: TopK = D.top_k,
        top_p: TopP = D.top_p,
        repetition_penalty: RepetitionPenalty = D.repetition_penalty,
        guidance_scale: GuidanceScale = D.guidance_scale,
        timesteps: Timesteps = D.timesteps,
        samples_per_prompt: SamplesPerPrompt = D.samples_per_prompt,
        seed: Seed = D.seed,
        batch_tokens: int = typer.Option(4096),
        dtype: str = typer.Option("bf16", help="bf16 (autocast) or fp32"),
        device: str = typer.Option("cpu"),
        prompt_column: str = typer.Option("prompt"),
        id_column: str = typer.Option("id"),
        stats_json: Path | None = typer.Option(None, "--stats-json"),
    ) -> None:
        """Generate completions for every row of INPUT (in-process, no queue)."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from cola_batch.model.checkpoint import load_model
        from cola_batch.pipeline.engine import Engine, RowRequest

        with user_errors():
            params = sampling_from_flags(
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, repetition_penalty=repetition_penalty,
                guidance_scale=guidance_scale, timesteps=timesteps,
                samples_per_prompt=samples_per_prompt, seed=seed,
            )  # fmt: skip
        rows = read_rows(input, prompt_column, id_column)
        try:
            engine = Engine(
                load_model(model), device=device, dtype=dtype, batch_tokens=batch_tokens
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        requests = [
            RowRequest(rid, prompt, k) for rid, prompt in rows for k in range(samples_per_prompt)
        ]
        output.parent.mkdir(parents=True, exist_ok=True)
        tokens, errors = 0, 0
        start = time.perf_counter()
        with (
            output.open("w", encoding="utf-8") as out,
            Progress(
                TextColumn("generate"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[tps]:.1f} tok/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            ) as bar,
        ):
            task = bar.add_task("rows", total=len(requests), tps=0.0)
            for res in engine.generate(requests, params):
                record = asdict(res)
                record["id"] = record.pop("row_id")
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                tokens += res.completion_tokens
                errors += res.finish_reason == "error"
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=1, tps=tokens / elapsed)
        seconds = time.perf_counter() - start
        stats = {
            "rows": len(requests),
            "errors": errors,
            "generated_tokens": tokens,
            "generation_seconds": seconds,
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "peak_rss_bytes": _peak_rss_bytes(),
        }
        if stats_json is not None:
            stats_json.write_text(json.dumps(stats, indent=2))
        typer.echo(
            f"{len(requests)} rows, {tokens} tokens in {seconds:.1f}s "
            f"({stats['tokens_per_second']:.1f} tok/s), {errors} errors -> {output}"
        )
