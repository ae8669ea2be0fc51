"""The `cola-batch serve` command: the OpenAI-compatible API over the queue.

Contract: `register(app)` adds `serve` to a typer app. `serve` needs COLA_BATCH_REDIS_URL
(the Redis the workers use; workers are started separately with `cola-batch worker`) and runs
one uvicorn process. Auth, limits and templates come from `COLA_BATCH_*` settings.
"""

from __future__ import annotations

from typing import Annotated

import typer


def serve(
    model: Annotated[str, typer.Option("--model", help="Model root the workers load.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    output: Annotated[
        str | None,
        typer.Option(help="Output base of batch jobs (default COLA_BATCH_DEFAULT_OUTPUT)."),
    ] = None,
    model_name: Annotated[
        str | None,
        typer.Option(help="Model id clients use (default: the basename of --model)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve OpenAI-compatible /v1/files, /v1/batches, /v1/chat/completions, /v1/completions."""
    import uvicorn

    from cola_batch.api.app import create_app
    from cola_batch.settings import get_settings

    settings = get_settings()
    if not settings.redis_url_value():
        typer.echo(
            "error: COLA_BATCH_REDIS_URL is not set: point it at the Redis your workers use "
            "(start workers with `cola-batch worker --model ...`)",
            err=True,
        )
        raise typer.Exit(2)
    app = create_app(model, settings=settings, output=output, model_name=model_name)
    ctx = app.state.ctx
    typer.echo(
        f"serving model '{ctx.model_name}' on http://{host}:{port}/v1 "
        f"(batch jobs under {ctx.output}, files under {ctx.api_base})"
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
