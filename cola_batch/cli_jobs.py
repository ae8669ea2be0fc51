"""Job commands: submit, status, wait, cancel, retry, resume, results, jobs.

Contract: thin typer wrappers over `cola_batch.jobs.Control`; every command talks to the Redis
named by COLA_BATCH_REDIS_URL. Exit codes: 0 ok; 2 bad input or unknown job; `wait` returns
0 completed, 1 failed, 2 cancelled, 3 timed out.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

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
from cola_batch.schemas.job import JobState, JobStatus
from cola_batch.schemas.sampling import SamplingParams
from cola_batch.settings import Settings

WAIT_EXIT = {JobState.COMPLETED: 0, JobState.FAILED: 1, JobState.CANCELLED: 2}
D = SamplingParams()


def _control():  # noqa: ANN202 - imported lazily to keep `--help` fast
    from cola_batch.jobs import Control

    try:
        return Control.connect()
    except RuntimeError as exc:
        fail(str(exc))


def status_dict(status: JobStatus) -> dict[str, object]:
    now = datetime.now(UTC)
    data = json.loads(status.model_dump_json())
    data["rows_per_second"] = status.rows_per_second(now)
    data["tokens_per_second"] = status.tokens_per_second(now)
    data["eta_seconds"] = status.eta_seconds(now)
    return data


def status_table(status: JobStatus) -> Table:
    now = datetime.now(UTC)
    table = Table(title=f"{status.job_id}", show_header=False)
    table.add_row("state", status.state.value + (f" ({status.error})" if status.error else ""))
    table.add_row(
        "rows",
        f"{status.rows_completed} done, {status.rows_failed} failed, of {status.rows_total}",
    )
    table.add_row(
        "shards",
        f"{status.shards_completed} done, {status.shards_failed} failed, of {status.shards_total}",
    )
    tps, eta = status.tokens_per_second(now), status.eta_seconds(now)
    table.add_row(
        "tokens", f"{status.completion_tokens} generated" + (f", {tps:.1f}/s" if tps else "")
    )
    table.add_row("eta", "-" if eta is None else f"{eta:.0f} s")
    for state, stamp in status.timestamps.items():
        table.add_row(f"  {JobState(state).value}", stamp.isoformat(timespec="seconds"))
    return table


def worker_activity(settings: Settings, timeout_s: float = 2.0) -> dict[str, list[dict]]:
    """Per live Celery worker node, the shard tasks it is running right now."""
    from cola_batch.worker.queue import celery_app_for

    inspect = celery_app_for(settings).control.inspect(timeout=timeout_s)
    active = inspect.active() or {}
    return {
        node: [t["args"][0] for t in tasks if t.get("args") and isinstance(t["args"][0], dict)]
        for node, tasks in sorted(active.items())
    }


def workers_table(activity: dict[str, list[dict]], job_id: str) -> Table:
    table = Table("worker", "running", title="workers")
    for node, shards in activity.items():
        mine = [f"shard {s['shard_id']}" for s in shards if s.get("job_id") == job_id]
        other = len(shards) - len(mine)
        text = ", ".join(mine) or ("idle" if not other else "")
        if other:
            text = f"{text} (+{other} of other jobs)".strip()
        table.add_row(node, text)
    if not activity:
        table.add_row("(no worker answered)", "")
    return table


def register(app: typer.Typer) -> None:
    @app.command()
    def submit(
        inputs: Annotated[
            list[str], typer.Argument(help="Parquet / JSONL / .jsonl.gz files or URIs.")
        ],
        model: Annotated[str, typer.Option("--model", help="Model root (cola_vae/, cola_dit/).")],
        output: Annotated[str | None, typer.Option("--output", help="Output base URI.")] = None,
        prompt_column: Annotated[str, typer.Option("--prompt-column")] = "prompt",
        id_column: Annotated[
            str, typer.Option("--id-column", help="'' = use row positions.")
        ] = "id",
        max_tokens_column: MaxTokensColumn = None,
        temperature_column: TemperatureColumn = None,
        prompt_template: Annotated[str | None, typer.Option("--prompt-template")] = None,
        shard_size: Annotated[int | None, typer.Option("--shard-size")] = None,
        queue: Annotated[str | None, typer.Option("--queue")] = None,
        on_bad_rows: Annotated[str, typer.Option("--on-bad-rows", help="fail | skip")] = "fail",
        max_new_tokens: MaxNewTokens = D.max_new_tokens,
        temperature: Temperature = D.temperature,
        top_k: TopK = D.top_k,
        top_p: TopP = D.top_p,
        repetition_penalty: RepetitionPenalty = D.repetition_penalty,
        guidance_scale: GuidanceScale = D.guidance_scale,
        timesteps: Timesteps = D.timesteps,
        samples_per_prompt: SamplesPerPrompt = D.samples_per_prompt,
        seed: Seed = D.seed,
        wait: Annotated[bool, typer.Option("--wait", help="Wait until the job ends.")] = False,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Validate and stage the inputs, enqueue one task per shard, print the job id."""
        if on_bad_rows not in ("fail", "skip"):
            fail(f"--on-bad-rows must be fail or skip, not {on_bad_rows!r}")
        control = _control()
        with user_errors():
            sampling = sampling_from_flags(
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, repetition_penalty=repetition_penalty,
                guidance_scale=guidance_scale, timesteps=timesteps,
                samples_per_prompt=samples_per_prompt, seed=seed,
            )  # fmt: skip
            spec = control.submit(
                inputs, model=model, output=output, sampling=sampling,
                prompt_column=prompt_column, id_column=id_column or None,
                max_tokens_column=max_tokens_column, temperature_column=temperature_column,
                prompt_template=prompt_template, shard_size=shard_size, queue=queue,
                on_bad_rows=on_bad_rows,  # type: ignore[arg-type]
            )  # fmt: skip
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "job_id": spec.job_id,
                        "rows": spec.num_rows,
                        "shards": spec.num_shards,
                        "rejected": spec.rejected_rows,
                    }
                )
            )
        else:
            typer.echo(spec.job_id)
            if spec.rejected_rows:
                typer.secho(
                    f"{spec.rejected_rows} rows rejected (see rejected_rows.jsonl)", err=True
                )
        if wait:
            final = control.wait(spec.job_id)
            raise typer.Exit(WAIT_EXIT.get(final.state, 3))

    @app.command()
    def status(
        job_id: str,
        as_json: Annotated[bool, typer.Option("--json")] = False,
        watch: Annotated[
            bool, typer.Option("--watch", help="Live view until the job ends.")
        ] = False,
        workers: Annotated[
            bool, typer.Option("--workers", help="Also list workers and the shard each runs.")
        ] = False,
    ) -> None:
        """Where a job stands: state, rows and shards done/failed, tokens/s, ETA."""
        control = _control()
        with user_errors():
            current = control.status(job_id)
            if as_json and not watch:
                data = status_dict(current)
                if workers:
                    data["workers"] = worker_activity(control.settings)
                typer.echo(json.dumps(data))
                return
            if not watch:
                Console().print(status_table(current))
                if workers:
                    Console().print(workers_table(worker_activity(control.settings), job_id))
                return
            with Live(status_table(current), refresh_per_second=2) as live:
                while not current.terminal:
                    control.store.wait_for_event(job_id, 1.0)
                    current = control.status(job_id)
                    live.update(status_table(current))

    @app.command()
    def wait(
        job_id: str,
        timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds.")] = None,
    ) -> None:
        """Block until the job ends: exit 0 completed, 1 failed, 2 cancelled, 3 timed out."""
        control = _control()
        with user_errors():
            final = control.wait(job_id, timeout)
        typer.echo(final.state.value)
        raise typer.Exit(WAIT_EXIT.get(final.state, 3))

    @app.command()
    def cancel(job_id: str) -> None:
        """Start no new shard of the job; committed results are kept."""
        control = _control()
        with user_errors():
            typer.echo(control.cancel(job_id).state.value)

    @app.command()
    def retry(
        job_id: str,
        output: Annotated[
            str | None, typer.Option("--job-uri", help="The job's storage prefix.")
        ] = None,
    ) -> None:
        """Re-run only the failed rows and the shards that never ran."""
        control = _control()
        with user_errors():
            sent = control.retry(job_id, output)
        typer.echo(f"{sent} shard tasks re-enqueued")

    @app.command()
    def resume(
        job_id: str,
        output: Annotated[str, typer.Option("--output", help="Output base URI of the job.")],
    ) -> None:
        """Rebuild a job's state from object storage (after Redis lost it) and finish it."""
        from cola_batch import keys

        control = _control()
        with user_errors():
            sent = control.resume(job_id, keys.job_uri(output, job_id))
        typer.echo(f"{sent} shard tasks re-enqueued")

    @app.command()
    def results(
        job_id: str,
        to: Annotated[
            str | None, typer.Option("--to", help="Write all rows to this path/URI.")
        ] = None,
        fmt: Annotated[str, typer.Option("--format", help="parquet | jsonl")] = "jsonl",
        job_uri: Annotated[str | None, typer.Option("--job-uri")] = None,
    ) -> None:
        """One row per input row × sample, joinable on id; failed rows carry their error."""
        from cola_batch.jobs import write_results

        control = _control()
        with user_errors():
            table = control.results_table(job_id, job_uri)
            if to:
                write_results(table, to, fmt)
                typer.echo(f"{table.num_rows} rows written to {to}")
            elif fmt == "jsonl":
                for row in table.to_pylist():
                    sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                fail("--format parquet needs --to PATH")

    @app.command()
    def jobs(limit: Annotated[int, typer.Option("--limit")] = 20) -> None:
        """List recent jobs, newest first."""
        control = _control()
        table = Table("job", "state", "rows done", "failed", "total", "age")
        now = time.time()
        for job_id in control.store.recent(limit):
            st = control.store.get(job_id)
            if st is None:
                continue
            created = st.timestamps.get(JobState.VALIDATING)
            age = f"{now - created.timestamp():.0f} s" if created else "-"
            table.add_row(job_id, st.state.value, str(st.rows_completed), str(st.rows_failed),
                          str(st.rows_total), age)  # fmt: skip
        Console().print(table)
