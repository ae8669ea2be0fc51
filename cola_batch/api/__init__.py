"""OpenAI-compatible HTTP API over the cola-batch queue (`cola-batch serve`).

Entry point: `create_app(model, ...)` returns a FastAPI app; `cola_batch.api.cli.register`
adds the `serve` command. The app holds no model: every request becomes a cola-batch job run
by the ordinary Celery workers (batches on `Settings.queue_batch`, chat/completions requests on
`Settings.queue_interactive`, which workers poll first).
"""

from cola_batch.api.app import create_app

__all__ = ["create_app"]
