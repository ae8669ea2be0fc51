"""The `cola-batch` command line: typer commands that compose the packages.

Each package that owns commands exposes a typer sub-app or command functions; this module only
wires them together, so it stays free of any package's internals.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="cola-batch",
    help="Batch generation for Cola DLM: submit prompts, run GPU workers, collect results.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from cola_batch.model.cli import app as model_app

    app.add_typer(model_app, name="model", help="Create, inspect and verify checkpoints.")

    from cola_batch import cli_jobs, cli_run, metrics_cli, pool_cli
    from cola_batch.api import cli as api_cli
    from cola_batch.eval import cli as eval_cli
    from cola_batch.pipeline import cli as pipeline_cli

    for module in (cli_jobs, cli_run, pool_cli, pipeline_cli, api_cli, eval_cli, metrics_cli):
        module.register(app)


_register()


@app.command()
def version() -> None:
    """Print the cola-batch version."""
    from cola_batch import __version__

    typer.echo(__version__)


if __name__ == "__main__":  # pragma: no cover
    app()
