"""Process commands: `worker` (GPU-pinned Celery workers), `run` (the embedded one-machine mode)
and `demo` (a tiny model and sample prompts through `run`).

Contract: `run` is composition, not a second implementation: it starts a private Redis when
COLA_BATCH_REDIS_URL is unset, starts local workers with the same launcher as `worker`, submits
through the same producer, and watches the same job state. Re-running the same command after an
interruption resumes the job (committed shards are kept) instead of starting over: the job id
of a run is remembered under the output directory, keyed by a fingerprint of the command.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cola_batch.cli_options import (
    GuidanceScale,
    MaxNewTokens,
    MaxTokensColumn,
    RepetitionPenalty,
    SamplesPerPrompt,
    Seed,
    Temperature,
    TemperatureColumn,
    Timesteps,
    TopK,
    TopP,
    fail,
    sampling_from_flags,
    user_errors,
)
from cola_batch.schemas.sampling import SamplingParams

D = SamplingParams()
console = Console(stderr=True)


def run_fingerprint(inputs: list[str], model: str, params: SamplingParams, extra: dict) -> str:
    """Same inputs (path, size, mtime), model and parameters → same fingerprint."""
    parts: list[object] = [str(Path(model).resolve()), params.model_dump(mode="json"), extra]
    for uri in inputs:
        path = Path(uri)
        stat = path.stat() if path.exists() else None
        parts.append(
            [
                str(path.resolve()),
                stat.st_size if stat else None,
                stat.st_mtime_ns if stat else None,
            ]
        )
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def run_job(
    inputs: list[str],
    *,
    model: str,
    output: str,
    sampling: SamplingParams,
    gpus: str | None = None,
    shard_size: int | None = None,
    prompt_column: str = "prompt",
    id_column: str | None = "id",
    max_tokens_column: str | None = None,
    temperature_column: str | None = None,
) -> tuple[str, int]:
    """Run a job to its end on this machine; returns (job id, exit status)."""
    from cola_batch import keys, storage
    from cola_batch.embedded import EmbeddedRedis
    from cola_batch.jobs import Control
    from cola_batch.settings import Settings
    from cola_batch.worker.launcher import start_workers, stop_workers

    out_dir = Path(output).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    embedded = None
    if not os.environ.get("COLA_BATCH_REDIS_URL"):
        embedded = EmbeddedRedis().start()
        os.environ["COLA_BATCH_REDIS_URL"] = embedded.url
    settings = Settings()
    if shard_size is None:
        shard_size = min(settings.shard_size, 64)  # small shards: progress and resume granularity
    control = Control.connect(settings)
    extra = {"shard_size": shard_size, "prompt": prompt_column, "id": id_column}
    overrides = {"max_tokens_column": max_tokens_column, "temperature_column": temperature_column}
    extra.update({k: v for k, v in overrides.items() if v})  # unset: earlier runs still resume
    marker = (
        out_dir / ".cola-batch-runs" / f"{run_fingerprint(inputs, model, sampling, extra)}.json"
    )
    procs: list[subprocess.Popen[bytes]] = []
    log_path = out_dir / "worker.log"
    try:
        job_id = None
        if marker.exists():
            job_id = json.loads(marker.read_text())["job_id"]
            job = keys.job_uri(str(out_dir), job_id)
            if storage.exists(keys.success_marker_uri(job)):
                console.print(f"[green]job {job_id} already completed[/]; results in {job}")
                return job_id, 0
            sent = control.resume(job_id, job)
            console.print(f"resuming job {job_id}: {sent} shards left to run")
        else:
            with user_errors():
                spec = control.submit(
                    inputs, model=model, output=str(out_dir), sampling=sampling,
                    shard_size=shard_size, prompt_column=prompt_column, id_column=id_column,
                    **overrides,
                )  # fmt: skip
            job_id = spec.job_id
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"job_id": job_id}))
            console.print(f"job {job_id}: {spec.num_rows} rows in {spec.num_shards} shards")
        with log_path.open("ab") as log_file:
            procs = start_workers(
                model=model, redis_url=settings.redis_url_value() or "",
                queues=[settings.queue_interactive, settings.queue_batch], gpus=gpus,
                stdout=log_file.fileno(), loglevel="WARNING",
            )  # fmt: skip
        final = _watch(control, job_id, procs, log_path)
        job = keys.job_uri(str(out_dir), job_id)
        console.print(f"job {job_id} {final.state.value}: {final.rows_completed} rows ok, "
                      f"{final.rows_failed} failed; outputs under {job}/outputs/")  # fmt: skip
        return job_id, {"completed": 0, "failed": 1, "cancelled": 2}.get(final.state.value, 3)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: committed shards are kept; "
                      "re-run the same command to resume")  # fmt: skip
        return job_id or "", 130
    finally:
        if procs:
            stop_workers(procs, timeout_s=60)
        if embedded is not None:
            embedded.stop()
            os.environ.pop("COLA_BATCH_REDIS_URL", None)


def _watch(control, job_id: str, procs, log_path: Path):  # noqa: ANN001, ANN202
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=console, transient=False) as progress:
        status = control.status(job_id)
        bar = progress.add_task("rows", total=status.rows_total or None, tps="-")
        while not status.terminal:
            if procs and all(p.poll() is not None for p in procs):
                fail(f"every worker exited; see {log_path}", code=1)
            control.store.wait_for_event(job_id, 1.0)
            status = control.status(job_id)
            tps = status.tokens_per_second()
            progress.update(bar, completed=status.rows_done, total=status.rows_total or None,
                            tps=f"{tps:.1f}" if tps else "-")  # fmt: skip
    return status


def register(app: typer.Typer) -> None:
    @app.command()
    def worker(
        model: Annotated[str, typer.Option("--model", help="Model root to load once per GPU.")],
        gpus: Annotated[
            str | None, typer.Option("--gpus", help="e.g. 0,1,2,3 or all; none = CPU")
        ] = None,
        queue: Annotated[
            list[str] | None, typer.Option("--queue", help="Queues to consume.")
        ] = None,
        loglevel: Annotated[str, typer.Option("--loglevel")] = "INFO",
    ) -> None:
        """Start GPU-pinned Celery workers (one process per GPU) and supervise them."""
        from cola_batch.settings import get_settings
        from cola_batch.worker.launcher import run_forever, start_workers

        settings = get_settings()
        url = settings.redis_url_value()
        if not url:
            fail(
                "COLA_BATCH_REDIS_URL is not set: workers need the Redis that jobs are submitted to"
            )
        if not Path(model).exists():
            fail(f"--model {model}: no such directory")
        queues = queue or [settings.queue_interactive, settings.queue_batch]
        with user_errors():
            procs = start_workers(
                model=model, redis_url=url, queues=queues, gpus=gpus, loglevel=loglevel
            )
        raise typer.Exit(run_forever(procs))

    @app.command()
    def run(
        inputs: Annotated[list[str], typer.Argument(help="Parquet / JSONL input files.")],
        model: Annotated[str, typer.Option("--model")],
        output: Annotated[str, typer.Option("--output", help="Local output directory.")],
        gpus: Annotated[str | None, typer.Option("--gpus")] = None,
        shard_size: Annotated[int | None, typer.Option("--shard-size")] = None,
        prompt_column: Annotated[str, typer.Option("--prompt-column")] = "prompt",
        id_column: Annotated[str, typer.Option("--id-column")] = "id",
        max_tokens_column: MaxTokensColumn = None,
        temperature_column: TemperatureColumn = None,
        max_new_tokens: MaxNewTokens = D.max_new_tokens,
        temperature: Temperature = D.temperature,
        top_k: TopK = D.top_k,
        top_p: TopP = D.top_p,
        repetition_penalty: RepetitionPenalty = D.repetition_penalty,
        guidance_scale: GuidanceScale = D.guidance_scale,
        timesteps: Timesteps = D.timesteps,
        samples_per_prompt: SamplesPerPrompt = D.samples_per_prompt,
        seed: Seed = D.seed,
    ) -> None:
        """Run a whole job on this machine: private Redis, local workers, live progress."""
        with user_errors():
            sampling = sampling_from_flags(
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, repetition_penalty=repetition_penalty,
                guidance_scale=guidance_scale, timesteps=timesteps,
                samples_per_prompt=samples_per_prompt, seed=seed,
            )  # fmt: skip
        _, code = run_job(inputs, model=model, output=output, sampling=sampling, gpus=gpus,
                          shard_size=shard_size, prompt_column=prompt_column,
                          id_column=id_column or None, max_tokens_column=max_tokens_column,
                          temperature_column=temperature_column)  # fmt: skip
        raise typer.Exit(code)

    @app.command()
    def demo(
        directory: Annotated[
            str, typer.Option("--dir", help="Where the demo writes.")
        ] = "cola-demo",
        rows: Annotated[int, typer.Option("--rows")] = 24,
    ) -> None:
        """Create a tiny random model and sample prompts, run them end to end, show results."""
        from cola_batch.demo import prepare_demo, show_results

        base = Path(directory).resolve()
        model_dir, prompts = prepare_demo(base, rows=rows)
        started = time.monotonic()
        job_id, code = run_job([str(prompts)], model=str(model_dir), output=str(base / "runs"),
                               sampling=SamplingParams(max_new_tokens=16, timesteps=8))  # fmt: skip
        if code == 0:
            show_results(base / "runs", job_id, seconds=time.monotonic() - started)
        raise typer.Exit(code)
